"""Structured pruning of residual networks: tied channels get one joint score, go together, and are removed exactly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo import ConfigError
from bingo.bench.cli import main
from bingo.bench.models import build_model
from test_export import digits, raw_digits, run_torch_only  # noqa: F401 - digits is a fixture

SHAPE = (1, 12, 12)


def _trained_like(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters far from their defaults, as after training."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(module.num_features, generator=generator))
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
    return model


def _resnet() -> nn.Module:
    return _trained_like(build_model("resnet", SHAPE, 10, seed=0))


class TinyResidual(nn.Module):
    """stem -> (a -> b) + stem -> head: channels of stem and b are tied by the add.

    ``activation=torch.sigmoid`` turns a zero channel into 0.5 before it is read.
    """

    def __init__(self, activation=torch.relu) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.activation = activation
        self.stem, self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.activation
        s = act(self.stem(x))
        return self.head(act(self.b(act(self.a(s))) + s))


def test_resnet_groups_tie_each_stage_residual_stream():
    groups = bingo.channel_groups(_resnet(), SHAPE)
    assert len(groups) == 9  # three residual streams, and one conv1 -> bn1 -> conv2 chain per block
    coupled = [g for g in groups if len(g.members) > 1]
    assert [(g.members, g.norms, g.channels) for g in coupled] == [
        (("stem.0.weight", "stages.0.0.conv2.weight", "stages.0.1.conv2.weight"), ("stem.1", "stages.0.0.bn2", "stages.0.1.bn2"), 16),
        (("stages.1.0.conv2.weight", "stages.1.0.shortcut.0.weight", "stages.1.1.conv2.weight"),
         ("stages.1.0.bn2", "stages.1.0.shortcut.1", "stages.1.1.bn2"), 32),
        (("stages.2.0.conv2.weight", "stages.2.0.shortcut.0.weight", "stages.2.1.conv2.weight"),
         ("stages.2.0.bn2", "stages.2.0.shortcut.1", "stages.2.1.bn2"), 64),
    ]
    single = [g.members for g in groups if len(g.members) == 1]
    assert single == [(f"stages.{s}.{b}.conv1.weight",) for s in range(3) for b in range(2)]
    assert not any("fc.weight" in g.members for g in groups)  # the output layer's units are the classes


def test_joint_score_is_the_mean_of_the_members_hand_computed():
    model = TinyResidual()
    groups = bingo.channel_groups(model, (3,))
    assert [g.members for g in groups] == [("stem.weight", "b.weight"), ("a.weight",)]
    scores = {"stem.weight": torch.tensor([6.0, 1.0, 4.0, 5.0]), "b.weight": torch.tensor([0.0, 1.0, 4.0, 5.0]),
              "a.weight": torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])}
    # joint mean [3, 1, 4, 5]: channels 1 and 0 go (the max, or the first member alone, would take 1 and 2)
    masks = bingo.prune_coupled(model, scores, groups, 0.5)
    assert masks["stem.weight"].tolist() == masks["b.weight"].tolist() == [False, False, True, True]
    assert masks["a.weight"].tolist() == [True, True, True, False, False, False]
    x = torch.randn(5, 3)
    with torch.no_grad():
        small = bingo.shrink(model, (3,))
        torch.testing.assert_close(small(x), model(x))
    assert (small.stem.out_features, small.a.in_features, small.a.out_features, small.b.out_features, small.head.in_features) == (2, 2, 3, 2, 2)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_coupled_prune_masks_every_member_alike_and_its_batchnorms(scope):
    model = _resnet()
    groups = bingo.channel_groups(model, SHAPE)
    masks = bingo.prune_coupled(model, bingo.magnitude_scores(model, "neuron"), groups, 0.5, scope)
    total = sum(g.channels for g in groups)
    removed = sum(int((~masks[g.key]).sum()) for g in groups)
    assert removed == total // 2  # exact, each tied channel counted once
    for group in groups:
        pruned = ~masks[group.key]
        if scope == "layer":
            assert int(pruned.sum()) == group.channels // 2
        for key in group.members:
            assert torch.equal(masks[key], masks[group.key])
            module = model.get_submodule(key.rpartition(".")[0])
            assert bool((module.weight[pruned] == 0).all())
        for name in group.norms:
            norm = model.get_submodule(name)
            assert bool((norm.weight[pruned] == 0).all() and (norm.bias[pruned] == 0).all())


def test_shrunk_resnet_computes_what_the_masked_one_does_and_is_smaller():
    model = _resnet()
    groups = bingo.channel_groups(model, SHAPE)
    bingo.prune_coupled(model, bingo.magnitude_scores(model, "neuron"), groups, 0.5)
    small = bingo.shrink(model, SHAPE)  # residual: removal by the dependency graph
    assert type(small) is type(model)
    assert bingo.count_parameters(small) < 0.3 * bingo.count_parameters(model)
    assert small.stem[0].out_channels == 8 and small.stages[2][1].conv2.out_channels == 32
    assert all(not hasattr(m, "weight_mask") for m in small.modules())
    x = torch.randn(6, *SHAPE)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        getattr(small, mode)()
        with torch.no_grad():
            torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    program = torch.export.export(small.eval(), (x,))
    torch.testing.assert_close(program.module()(x), small(x))


def test_uncoupled_neuron_masks_on_a_resnet_shrink_exactly_by_keeping_what_cannot_go():
    model = _resnet()
    bingo.prune(model, bingo.magnitude_scores(model, "neuron"), 0.5, scope="layer")  # per layer: tied layers disagree
    with pytest.warns(UserWarning, match=r"shrink kept \d+ channel\(s\) whose weights are zero but whose BatchNorm still adds a constant"):
        small = bingo.shrink(model, SHAPE)
    x = torch.randn(6, *SHAPE)
    model.eval()
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    assert bingo.count_parameters(small) == bingo.count_parameters(model)  # nothing was exactly removable


def test_a_coupled_prune_keeps_training_with_pruned_channels_at_zero():
    model = _resnet()
    groups = bingo.channel_groups(model, SHAPE)
    masks = bingo.prune_coupled(model, bingo.magnitude_scores(model, "neuron"), groups, 0.5)
    copy.deepcopy(model)  # copyable, BatchNorm masks included
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, *SHAPE), torch.randint(0, 10, (8,))
    model.train()
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for group in groups:
        pruned = ~masks[group.key]
        for name in group.norms:
            norm = model.get_submodule(name)
            assert bool((norm.weight[pruned] == 0).all() and (norm.bias[pruned] == 0).all())
            assert not torch.equal(norm.weight_orig[~pruned], torch.zeros_like(norm.weight_orig[~pruned]))


def test_coupled_errors_are_one_line():
    model = _resnet()
    groups = bingo.channel_groups(model, SHAPE)
    with pytest.raises(ConfigError, match=r"^none of the coupled channel groups has scores"):
        bingo.prune_coupled(model, {}, groups, 0.5)
    with pytest.raises(ConfigError, match=r"^scores for 'stem.0.weight' have shape \(3,\); coupled pruning takes one score per channel, \(16,\)$"):
        bingo.prune_coupled(model, {"stem.0.weight": torch.rand(3)}, groups, 0.5)
    with pytest.raises(ConfigError, match=r"^channel_groups: ResNet cannot run on input_shape \(2, 12, 12\) .* its first layer 'stem\.0' \(Conv2d\) takes \(N, 1, H, W\)$"):
        bingo.channel_groups(model, (2, 12, 12))  # the stem takes one channel: refused before tracing


def test_cli_neuron_pruning_of_a_resnet_exports_a_shrunk_program_that_runs_without_bingo(tmp_path, digits, capsys):
    out, export_dir, saved = tmp_path / "r.json", tmp_path / "exported", tmp_path / "m.pt"
    code = main(["run", "--data", "digits", "--model", "resnet", "--epochs", "1", "--granularity", "neuron",
                 "--method", "magnitude", "--sparsity", "0.5", "--out", str(out), "--export", str(export_dir),
                 "--save", str(saved), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    record = json.loads((export_dir / "model.json").read_text())
    assert record["shrunk"] and record["parameters"] < 0.35 * 174_970
    assert record["layers"]["stem.0"][0] == 8 and record["layers"]["fc"] == [10, 32]  # half of every stream's channels
    masked = build_model("resnet", digits.input_shape, digits.num_classes)
    bingo.load_pruned_state_dict(masked, torch.load(saved, weights_only=True)["state_dict"])
    with torch.no_grad():
        expected = masked.eval()(digits.x_test)
    raw = raw_digits(digits.x_test, digits).reshape(-1, 64)
    got = run_torch_only(export_dir / "model.pt2", raw, digits.y_test, expected, tmp_path)
    assert not got["bingo_loaded"] and got["max_diff"] < 1e-4
    assert got["accuracy"] == report["results"][-1]["accuracy"]


class TinyTransformerBlock(nn.Module):
    """A residual stream with a LayerNorm and an attention on it, and a feed-forward branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.up, self.down, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.norm(h + self.attention(h, h, h, need_weights=False)[0])
        h = h + self.down(torch.relu(self.up(h)))
        return self.head(h.mean(dim=1))


def test_a_stream_through_a_layernorm_or_an_attention_is_left_whole_and_the_feed_forward_shrinks():
    model = TinyTransformerBlock()
    groups = bingo.channel_groups(model, (5, 6))
    assert [g.members for g in groups] == [("up.weight",)]  # the residual stream (embed, out_proj, down) is not a group
    bingo.prune_coupled(model, bingo.magnitude_scores(model, "neuron", include=["up"]), groups, 0.5)
    small = bingo.shrink(model, (5, 6))
    assert (small.up.out_features, small.down.in_features, small.embed.out_features) == (8, 8, 8)
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_pruning_a_resnet_to_an_accuracy_floor_keeps_tied_channels_together():
    model = _resnet()
    groups = bingo.channel_groups(model, SHAPE)
    x, y = torch.randn(32, *SHAPE), torch.randint(0, 10, (32,))
    model.eval()
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # the dense model is right on every sample: accuracy 1.0

    def accuracy(candidate):
        with torch.no_grad():
            return float((candidate.eval()(x).argmax(dim=1) == y).float().mean())

    result = bingo.prune_to_accuracy(model, bingo.magnitude_scores(model, "neuron"), accuracy, min_accuracy=0.5,
                                     scope="layer", groups=groups)
    assert result.dense_accuracy == 1.0 and result.accuracy >= 0.5 and 0 < result.sparsity < 1
    assert result.accuracy == accuracy(model)
    for group in groups:
        for key in group.members:
            assert torch.equal(result.masks[key], result.masks[group.key])
    small = bingo.shrink(model, SHAPE)  # every pruned channel goes: nothing kept, no warning
    assert bingo.count_parameters(small) < bingo.count_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model(x), atol=1e-5, rtol=1e-5)


def test_shrink_refuses_rather_than_drop_a_constant_a_sigmoid_makes():
    model = TinyResidual(activation=torch.sigmoid)
    groups = bingo.channel_groups(model, (3,))
    bingo.prune_coupled(model, bingo.magnitude_scores(model, "neuron"), groups, 0.5)
    with pytest.raises(ConfigError, match=r"^cannot shrink TinyResidual exactly: removing its zero channels changes its output by "):
        bingo.shrink(model, (3,))


def test_gradual_pruning_of_a_resnet_prunes_tied_channels_together_on_the_schedule():
    model = _resnet()
    groups = bingo.channel_groups(model, SHAPE)
    scheduler = bingo.SparsityScheduler(model, lambda: bingo.magnitude_scores(model, "neuron"), 0.5, start_step=0,
                                        end_step=4, frequency=2, scope="layer", groups=groups)
    for _ in range(4):
        scheduler.step()
    masks = scheduler.finish()
    total = sum(g.channels for g in groups)
    assert sum(int((~masks[g.key]).sum()) for g in groups) == total // 2
    for group in groups:
        assert all(torch.equal(masks[key], masks[group.key]) for key in group.members)
    x = torch.randn(4, *SHAPE)
    small = bingo.shrink(model, SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)
    assert bingo.count_parameters(small) < 0.3 * bingo.count_parameters(model)
