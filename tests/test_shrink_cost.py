"""What a shrink costs and what reusing the caller's channel groups changes: one copy, one traced forward, one check.

``bingo.shrink(model, example, groups=groups)`` takes the groups the caller's own ``bingo.channel_groups`` found;
they decide the path and are checked against the model, never trusted, and the result is the one without them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bingo
from bingo import ConfigError
from bingo.bench.models import build_model
from bingo.masks import permanent_copy

SHAPE = (1, 12, 12)


def _pruned_resnet() -> tuple[nn.Module, list]:
    model = build_model("resnet", SHAPE, 10, seed=0).eval()
    groups = bingo.channel_groups(model, SHAPE)
    bingo.prune_coupled(model, bingo.magnitude_scores(model, "neuron"), groups, 0.5)
    return model, groups


def _same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class Residual(nn.Module):
    """stem -> a -> b, added to stem's output -> head: stem's and b's channels are tied."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.a, self.b, self.head = nn.Linear(3, 4), nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.stem(x))
        return self.head(torch.relu(self.b(torch.relu(self.a(s))) + s))


class Chain(Residual):
    """The same layers under the same names, without the add: every layer's channels are its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x)))))))


def test_given_groups_give_the_model_shrunk_without_them_and_leave_the_input_alone():
    model, groups = _pruned_resnet()
    before = copy.deepcopy(model.state_dict())
    reference = bingo.shrink(model, SHAPE)
    for small in (bingo.shrink(model, SHAPE, groups=groups), bingo.shrink(model, torch.randn(2, *SHAPE), groups=groups),
                  bingo.shrink_coupled(model, SHAPE, groups=groups), bingo.shrink(model, SHAPE, groups=groups[:3])):
        _same_model(small, reference)  # a part of the groups checks that part; removal is the same
    assert bingo.count_parameters(reference) < 0.3 * bingo.count_parameters(model)
    assert list(model.state_dict()) == list(before) and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x), atol=1e-5, rtol=1e-5)

    # a chain: the groups say so, and no dependency graph is built at all
    mlp = build_model("lenet300", SHAPE, 10, seed=0)
    bingo.prune(mlp, bingo.magnitude_scores(mlp, "neuron"), 0.5)
    chain_groups = bingo.channel_groups(mlp, SHAPE)
    assert chain_groups and not bingo.coupled.is_coupled(chain_groups)
    _same_model(bingo.shrink(mlp, SHAPE, groups=chain_groups), bingo.shrink(mlp, SHAPE))
    _same_model(bingo.shrink(mlp, groups=chain_groups), bingo.shrink(mlp))


def test_stale_or_foreign_groups_are_refused_in_one_line():
    model, groups = _pruned_resnet()
    small = bingo.shrink(model, SHAPE)
    again = r" \(groups from another model, or from this one before it changed\? call bingo.channel_groups on it again\)$"
    # the groups of the model before it was shrunk
    with pytest.raises(ConfigError, match=r"^shrink: groups give 'stem.0.weight' 16 channels; in ResNet it has 8" + again):
        bingo.shrink(small, SHAPE, groups=groups)
    # another model's groups
    mlp = build_model("lenet300", SHAPE, 10, seed=0)
    with pytest.raises(ConfigError, match=r"^shrink_coupled: groups name 'stem.0.weight', which LeNet300 does not have" + again):
        bingo.shrink_coupled(mlp, SHAPE, groups=groups)
    with pytest.raises(ConfigError, match=r"^shrink: groups name 'stem.1.weight', which is a BatchNorm2d in ResNet, not a Conv/Linear layer"):
        bingo.shrink(model, SHAPE, groups=[bingo.ChannelGroup(("stem.1.weight",), (), 16)])
    # the same layer names and widths, tied otherwise: known from the trace, in both directions
    tied = r"is not one of the channel groups {} has now: groups from another model, or from this one before it changed\? "
    for traced, given in ((Residual(), Chain()), (Chain(), Residual())):
        foreign = bingo.channel_groups(given, (3,))
        with pytest.raises(ConfigError, match=r"^shrink: the group of '\w+.weight' \(\d channels written by [\w., ]+\) "
                           + tied.format(type(traced).__name__) + "call bingo.channel_groups on it again$"):
            bingo.shrink(traced, (3,), groups=foreign)
    with pytest.raises(ConfigError, match=r"^shrink: groups must be the list bingo.channel_groups\(model, example_inputs\) returns, got dict$"):
        bingo.shrink(model, SHAPE, groups={"stem.0.weight": 16})
    with pytest.raises(ConfigError, match=r"^shrink: these groups tie channels of several layers .*: pass input_shape$"):
        bingo.shrink(model, groups=groups)


def _count(monkeypatch, model: nn.Module) -> tuple[dict[str, int], list[int]]:
    """Deep copies of ``model``'s class, and the ids of the modules of that class whose forward ran (a hook copies carry)."""
    copies = {"n": 0}
    real = copy.deepcopy

    def counting(x, memo=None, _nil=[]):  # noqa: B006 - copy.deepcopy's own signature
        if type(x) is type(model):
            copies["n"] += 1
        return real(x, memo)

    monkeypatch.setattr(copy, "deepcopy", counting)
    calls: list[int] = []
    model.register_forward_pre_hook(lambda module, args: calls.append(id(module)))
    return copies, calls


@pytest.mark.parametrize("given", [False, True])
def test_a_coupled_shrink_copies_once_and_runs_one_traced_forward_and_one_of_the_result(monkeypatch, given):
    model, groups = _pruned_resnet()
    copies, calls = _count(monkeypatch, model)
    small = bingo.shrink(model, SHAPE, groups=groups if given else None)
    assert copies["n"] == 1
    # the input model never runs: the trace runs its copy, then the check runs the copy shrunk, which is the result
    assert calls == [id(small), id(small)]


def test_a_chain_with_its_groups_given_is_copied_once_and_run_once(monkeypatch):
    mlp = build_model("lenet300", SHAPE, 10, seed=0)
    bingo.prune(mlp, bingo.magnitude_scores(mlp, "neuron"), 0.5)
    groups = bingo.channel_groups(mlp, SHAPE)
    copies, calls = _count(monkeypatch, mlp)
    small = bingo.shrink(mlp, SHAPE, groups=groups)
    assert copies["n"] == 1
    assert len(calls) == 1 and calls[0] != id(mlp)  # the inputs checked on the copy: no graph, no output check (exact by construction)
    assert bingo.count_parameters(small) < bingo.count_parameters(mlp)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.embed(tokens))))


def test_permanent_copy_is_make_permanent_of_a_deepcopy_without_copying_the_masks():
    torch.manual_seed(0)
    for model in (_pruned_resnet()[0], TiedLM()):
        if isinstance(model, TiedLM):
            bingo.prune(model, bingo.magnitude_scores(model, include=["*"]), 0.5)
            model.hidden.weight_orig.requires_grad_(False)
        want = copy.deepcopy(model)
        bingo.make_permanent(want)
        got = permanent_copy(model)
        _same_model(got, want)
        assert [n for n, _ in got.named_parameters()] == [n for n, _ in want.named_parameters()]
        assert [p.requires_grad for p in got.parameters()] == [p.requires_grad for p in want.parameters()]
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in got.modules())
        originals = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
        assert not any(t.data_ptr() in originals for t in [*got.parameters(), *got.buffers()])  # a copy, not a view
        assert any("_mask" in name for name, _ in model.named_buffers())  # the input keeps its masks
    assert got.head.weight is got.embed.weight  # still tied: one parameter
    tokens = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(got(tokens), model(tokens))


def test_a_layer_used_twice_is_a_one_line_config_error_not_a_torch_shape_error():
    # The chain path refuses it; the dependency-graph fallback used to let torch's shape error through.
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    torch.manual_seed(0)
    model = Twice()
    bingo.prune(model, bingo.magnitude_scores(model, granularity="neuron"), 0.5)
    with pytest.raises(ConfigError, match=r"^cannot shrink Twice: 'a' \(Linear\) is used more than once in forward; .*fails too \(.*\)$"):
        bingo.shrink(model, (8,))
