"""shrink and channel_groups take one sample's shape or example inputs with a batch dimension; a wrong one is a one-line ConfigError."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bingo
from bingo import ConfigError
from bingo.bench.models import build_model

SHAPE = (1, 12, 12)


def _pruned_resnet() -> nn.Module:
    model = build_model("resnet", SHAPE, 10, seed=0)
    groups = bingo.channel_groups(model, SHAPE)
    bingo.prune_coupled(model, bingo.magnitude_scores(model, "neuron"), groups, 0.5)
    return model.eval()


class Small(nn.Module):
    """conv -> flatten -> linear, written for (N, 1, 8, 8): (1, 8, 8) is the one per-sample shape it takes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_a_batched_shape_names_both_conventions_and_the_first_layer():
    model = _pruned_resnet()
    want = (r"ResNet cannot run on input_shape \(1, 1, 12, 12\) taken as one sample \(a batch of shape \(2, 1, 1, 12, 12\)\): "
            r"Expected 3D \(unbatched\) or 4D \(batched\) input to conv2d, but got input of size: \[2, 1, 1, 12, 12\]; "
            r"pass one sample's shape without the batch dimension, here \(1, 12, 12\), or an example input tensor with a "
            r"batch dimension, here torch\.randn\(1, 1, 12, 12\); its first layer 'stem\.0' \(Conv2d\) takes \(N, 1, H, W\)$")
    with pytest.raises(ConfigError, match="^shrink: " + want) as info:
        bingo.shrink(model, (1, 1, 12, 12))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="^channel_groups: " + want):
        bingo.channel_groups(model, (1, 1, 12, 12))
    with pytest.raises(ConfigError, match="^shrink_coupled: " + want):
        bingo.shrink_coupled(model, (1, 1, 12, 12))


def test_other_wrong_inputs_are_one_line_errors():
    model = _pruned_resnet()
    with pytest.raises(ConfigError, match=r"^channel_groups: ResNet cannot run on input_shape \(2, 12, 12\) .*: Given groups=1.*; "
                       r"pass one sample's shape without the batch dimension, e\.g\. \(1, 12, 12\), or an example input tensor "
                       r"with a batch dimension; its first layer 'stem\.0' \(Conv2d\) takes \(N, 1, H, W\)$"):
        bingo.channel_groups(model, (2, 12, 12))  # two channels: the stem takes one
    with pytest.raises(ConfigError, match=r"^shrink: Small cannot run on the example inputs \(a tensor of shape \(3, 8, 8\)\): .*; "
                       r"pass example inputs with a batch dimension, as the model takes them, or one sample's shape without it; "
                       r"its first layer 'conv' \(Conv2d\) takes \(N, 1, H, W\)$"):
        bingo.shrink(Small(), torch.randn(3, 8, 8))  # one unbatched sample of the wrong channels
    with pytest.raises(ConfigError, match=r"^shrink: Sequential cannot run on input_shape \(5,\) .*; its first layer '1' \(Linear\) takes \(N, \.\.\., 16\)$"):
        bingo.shrink(nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 2)), (5,))
    with pytest.raises(ConfigError, match=r"^shrink: input_shape must be one sample's shape as a tuple of ints, e\.g\. \(1, 28, 28\), or "
                       r"example inputs \(a tensor, or a tuple / dict of tensors\); got \(1\.0, 8, 8\) \(holding float\)$"):
        bingo.shrink(Small(), (1.0, 8, 8))
    with pytest.raises(ConfigError, match=r"^shrink: input_shape \(1, 0, 8\) has a dimension below 1; give one sample's shape"):
        bingo.shrink(Small(), (1, 0, 8))
    with pytest.raises(ConfigError, match=r"^channel_groups: give one sample's shape as a tuple of ints, .*; got str$"):
        bingo.channel_groups(Small(), "1, 8, 8")
    with pytest.raises(ConfigError, match=r"^channel_groups: give .*; got tuple mixing tensors and other values$"):
        bingo.channel_groups(Small(), (torch.zeros(2, 1, 8, 8), 3))


def test_a_wrong_shape_is_refused_as_such_not_as_a_tracing_error(monkeypatch):
    # The inputs are checked when the trace fails (a good input costs no forward of its own): the message says what
    # the inputs lack, whatever the tracer said, and the chain's fx trace is never reached.
    def tracing_fails(*args, **kwargs):
        raise ConfigError("cannot trace: some tracer error")

    def no_tracing(*args, **kwargs):
        raise AssertionError("traced before the shape was checked")

    model = _pruned_resnet()
    groups = bingo.channel_groups(model, SHAPE)
    monkeypatch.setattr(bingo.coupled, "_graph", tracing_fails)
    monkeypatch.setattr(importlib.import_module("bingo.shrink"), "_trace", no_tracing)
    for call in (bingo.shrink, bingo.channel_groups, bingo.shrink_coupled):
        with pytest.raises(ConfigError, match="cannot run on input_shape"):
            call(model, (1, 1, 12, 12))
    monkeypatch.undo()
    monkeypatch.setattr(importlib.import_module("bingo.shrink"), "_trace", no_tracing)
    with pytest.raises(ConfigError, match="cannot run on input_shape"):  # with groups: traced or checked, the same message
        bingo.shrink(model, (1, 1, 12, 12), groups=groups)


def test_a_batched_tensor_tuple_or_dict_gives_what_the_sample_shape_gives():
    model = _pruned_resnet()
    x = torch.randn(1, *SHAPE)
    assert bingo.channel_groups(model, x) == bingo.channel_groups(model, SHAPE) == bingo.channel_groups(model, {"x": x})
    reference = bingo.shrink(model, SHAPE)
    for example in (x, (x,), {"x": x}, list(SHAPE), torch.Size(SHAPE)):
        small = bingo.shrink(model, example)
        state, want = small.state_dict(), reference.state_dict()
        assert list(state) == list(want)
        for key, value in want.items():
            assert torch.equal(state[key], value), key
    assert bingo.count_parameters(reference) < bingo.count_parameters(model)

    # the chain path, traced on meta tensors of the example (the conv model's forward branches on x.dim())
    conv = build_model("conv", (1, 8, 8), 10, seed=1)
    bingo.prune(conv, bingo.magnitude_scores(conv, "neuron"), 0.5)
    by_shape, by_tensor = bingo.shrink(conv, (1, 8, 8)), bingo.shrink(conv, torch.randn(2, 1, 8, 8))
    assert [tuple(p.shape) for p in by_shape.parameters()] == [tuple(p.shape) for p in by_tensor.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(by_shape.parameters(), by_tensor.parameters()))
    assert bingo.count_parameters(by_shape) < bingo.count_parameters(conv)


_DIMS = st.lists(st.integers(-1, 9), max_size=5).map(tuple)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=_DIMS | st.lists(st.one_of(st.integers(1, 9), st.floats(0.5, 9), st.text(max_size=2), st.none()),
                               min_size=1, max_size=4).map(tuple))
def test_any_wrong_shape_is_a_config_error_and_the_right_one_works(shape):
    model = Small()
    for call in (bingo.shrink, bingo.channel_groups):
        if shape == (1, 8, 8):
            call(model, shape)  # the one shape that fits
            continue
        with pytest.raises(ConfigError, match=rf"^{call.__name__}: .*(one sample's shape|below 1)"):
            call(model, shape)


def test_conv1d_and_embedding_first_layers_say_what_they_take():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14, 3))
    with pytest.raises(ConfigError, match=r"pass one sample's shape without the batch dimension, here \(2, 16\), or an example input "
                       r"tensor with a batch dimension, here torch\.randn\(1, 2, 16\); its first layer '0' \(Conv1d\) takes \(N, 2, L\)$"):
        bingo.shrink(model, (1, 2, 16))
    tokens = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(4 * 6, 2))
    with pytest.raises(ConfigError, match=r"its first layer '0' \(Embedding\) takes \(N, \.\.\.\) integer indices in \[0, 10\)$"):
        bingo.shrink(tokens, torch.zeros(2, 5, dtype=torch.long))  # 5 tokens where the model takes 6


class _Scale(nn.Module):
    """A layer type of one's own: ``y = x * w`` over the last axis."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_a_registered_layer_type_says_what_its_layer_takes():
    from bingo.layer_types import LAYER_TYPES, LayerType, register_layer_type

    class ScaleLayer(LayerType):
        name = "Scale"
        module_type = _Scale

        def takes(self, module: nn.Module) -> str | None:
            return f"(N, {module.weight.numel()})"

    model = nn.Sequential(_Scale(4), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"its first layer '1' \(Linear\) takes \(N, \.\.\., 4\)$"):
        bingo.shrink(model, (5,))  # not a registered type yet: not a layer bingo knows
    register_layer_type(ScaleLayer)
    try:
        with pytest.raises(ConfigError, match=r"its first layer '0' \(_Scale\) takes \(N, 4\)$"):
            bingo.shrink(model, (5,))
    finally:
        LAYER_TYPES.remove(next(t for t in LAYER_TYPES if isinstance(t, ScaleLayer)))
