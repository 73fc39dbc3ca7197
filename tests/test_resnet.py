"""The `resnet` model (issue 10, item 4): a small ResNet-14 with BatchNorm and skip connections.

Built from ``(input_shape, num_classes)`` like the other models, it must be
small, train, take BINGO's weight-level search and pruning, refuse images too
small for it up front, and be refused (not silently broken) by ``shrink``,
which cannot follow a residual join.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo import ConfigError
from bingo.bench.cli import main
from bingo.bench.models import MODELS, BasicBlock, ResNet, build_model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _batch(shape: tuple[int, ...], n: int = 16, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=generator), torch.randint(classes, (n,), generator=generator)


def test_resnet_is_registered():
    assert MODELS["resnet"] is ResNet


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (8, 8)])
def test_parameter_count_and_output_shape(shape):
    model = build_model("resnet", shape, 10)
    # global average pooling: the count does not depend on the image size.
    # stem 16*9 + BN 32; stage 1: 2 blocks * (2*16*16*9 + 2*32); stage 2: 16*32*9 + 32*32*9 + 3*32*32*9
    # + 4 BN*64 + projection 16*32 + BN 64; stage 3 likewise with 64; head 64*10 + 10.
    assert _count(model) == 174_970
    assert 100_000 <= _count(model) <= 300_000
    x, _ = _batch(shape, n=3)
    assert model.eval()(x).shape == (3, 10)


def test_architecture_has_identity_and_projection_shortcuts():
    model = build_model("resnet", (1, 28, 28), 10)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6
    projections = [b for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    # where the stage changes channels and stride (stages 2 and 3), a 1x1 conv + BatchNorm
    assert len(projections) == 2
    for block in projections:
        conv, norm = block.shortcut
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(norm, nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 15
    layers = list(bingo.find_layers(model))
    assert len(layers) == 16  # 13 3x3 convs, 2 projections, the head
    assert (layers[0], layers[-1]) == ("stem.0.weight", "fc.weight")


def test_same_seed_same_weights_and_global_rng_left_alone():
    state = torch.get_rng_state()
    a, b = (build_model("resnet", (1, 8, 8), 10, seed=7) for _ in range(2))
    c = build_model("resnet", (1, 8, 8), 10, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.stem[0].weight, c.stem[0].weight)


def test_a_few_sgd_steps_lower_the_loss():
    model = build_model("resnet", (1, 8, 8), 10, seed=0).train()
    x, y = _batch((1, 8, 8), n=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_ticket_search_and_exact_weight_level_sparsity():
    model = build_model("resnet", (1, 8, 8), 10, seed=0).train()
    x, y = _batch((1, 8, 8), n=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", every=1, seed=0)
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        search.step(x, y)
    scores = search.significance()
    assert set(scores) == set(bingo.find_layers(model))
    masks = bingo.prune(model, scores, 0.8)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)
    assert bingo.model_sparsity(model) == pytest.approx(round(0.8 * total) / total)
    for key, module in bingo.find_layers(model).items():
        assert (module.weight[~masks[key]] == 0).all(), key
    assert torch.isfinite(model.eval()(x)).all()


@pytest.mark.parametrize("shape", [(1, 4, 4), (1, 4, 28), (3, 28, 1), (4, 4), (1, 1)])
def test_refuses_images_below_the_minimum(shape):
    height, width = shape[-2:]
    with pytest.raises(
        ConfigError,
        match=rf"^model 'resnet' needs images of at least 5x5, got {height}x{width}; use 'conv', 'mlp' or 'lenet300' for smaller inputs$",
    ):
        build_model("resnet", shape, 10)


def test_minimum_leaves_the_last_stage_two_pixels_and_is_trainable_with_a_batch_of_one():
    assert ResNet.min_image_side() == 5
    model = build_model("resnet", (1, 5, 6), 3).train()
    # the last stage's maps are 2x2: BatchNorm has 4 values per channel even for one sample
    maps = model.stages(model.stem(torch.zeros(1, 1, 5, 6)))
    assert maps.shape[-2:] == (ResNet.side_after(5), ResNet.side_after(6)) == (2, 2)
    F.cross_entropy(model(torch.randn(1, 1, 5, 6)), torch.tensor([1])).backward()


def test_refuses_flat_features():
    with pytest.raises(ConfigError, match=r"^model 'resnet' needs image input \(C, H, W\); this data has per-sample shape \(64,\); "
                                          r"use 'mlp' or 'lenet300' for flat features$"):
        build_model("resnet", (64,), 10)


def test_cli_trains_and_prunes_resnet_on_digits(tmp_path):
    out = tmp_path / "run.json"
    code = main(["run", "--data", "digits", "--model", "resnet", "--epochs", "1", "--sparsity", "0.5", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"] == "resnet"
    assert [r["sparsity"] for r in report["results"]] == [0.5]


def test_shrink_without_an_input_shape_refuses_the_residual_join():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem, self.a, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            s = torch.relu(self.stem(x))
            return self.head(torch.relu(self.a(s)) + s)

    torch.manual_seed(0)
    model = Residual()
    bingo.prune(model, bingo.magnitude_scores(model, "neuron"), 0.5, scope="layer")
    # without input_shape the chain shrink is all there is, and it names the join it cannot follow
    with pytest.raises(ConfigError, match=r"^cannot shrink Residual: the outputs of 'stem' and 'a' meet at node 'add' \(add\); shrink follows a single chain"):
        bingo.shrink(model)
    x = torch.randn(5, 3)
    with torch.no_grad():  # with it: the coupled path (tests/test_coupled.py), exact whatever it can remove
        torch.testing.assert_close(bingo.shrink(model, (3,))(x), model(x))
