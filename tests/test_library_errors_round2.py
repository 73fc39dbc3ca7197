"""Issue 20, "The library": the second hostile round's library misuse gives one-line BingoErrors.

Each case was a raw torch error, an AttributeError or a silent wrong answer before.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import bingo
from bingo import BingoError, CheckpointError, ConfigError
from conftest import make_cnn, make_mlp


def _pruned_mlp() -> nn.Module:
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    return model


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


# -- 1. compensate ---------------------------------------------------------------------------


def test_compensate_calibration_of_the_wrong_width_names_the_layer_and_leaves_the_model():
    model = _pruned_mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match=r"^compensate: the calibration inputs give layer '1' \(Linear\) 15 input "
                                          r"features; it takes 16$"):
        bingo.compensate(model, None, torch.randn(64, 15))
    assert _unchanged(model, before)


def test_compensate_calibration_of_an_integer_dtype_names_the_layer_and_the_dtypes():
    model = _pruned_mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match=r"^compensate: the calibration inputs reach layer '1' \(Linear\) as "
                                          r"torch.int64; it computes in torch.float32"):
        bingo.compensate(model, None, torch.randint(0, 3, (64, 16)))
    assert _unchanged(model, before)


def test_compensate_masks_of_a_wrong_width_calibration_are_not_applied():
    model = make_mlp()
    masks = bingo.select_masks(bingo.magnitude_scores(model), 0.5)
    with pytest.raises(ConfigError, match=r"15 input features; it takes 16$"):
        bingo.compensate(model, masks, torch.randn(64, 15))
    assert not bingo.pruned_parameters(model)


def test_compensate_conv_calibration_of_the_wrong_channels():
    model = make_cnn()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    with pytest.raises(ConfigError, match=r"^compensate: the calibration inputs give layer '0' \(Conv2d\) 2 input "
                                          r"channels; it takes 1$"):
        bingo.compensate(model, None, torch.randn(32, 2, 4, 4))


class _Reshaping(nn.Module):
    """An MLP that reshapes its input itself: a wrong sample shape fails in ``view``, not in a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = make_mlp()

    def forward(self, x):
        return self.mlp(x.view(len(x), 4, 4)[:, :, :4].reshape(len(x), 16))


def test_compensate_calibration_the_model_cannot_take_otherwise_is_one_line():
    model = _Reshaping()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    before = _state(model)
    with pytest.raises(ConfigError, match=r"^compensate: the model cannot take the calibration inputs \(one sample: "
                                          r"shape \(1, 15\)\): RuntimeError: shape '\[1, 4, 4\]' is invalid") as info:
        bingo.compensate(model, None, torch.randn(32, 15))
    assert "\n" not in str(info.value)
    assert _unchanged(model, before)


def test_compensate_reference_of_another_architecture_names_the_module():
    model = _pruned_mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match=r"^compensate: reference has no '1.weight' \(the model's Linear\); it must be "
                                          r"the dense model of the same architecture$"):
        bingo.compensate(model, None, torch.randn(64, 16), reference=nn.Sequential(nn.Linear(16, 4)))
    other = nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ConfigError, match=r"^compensate: reference's '1.weight' has shape \(10, 16\), the model's "
                                          r"\(12, 16\); it must be the dense model of the same architecture$"):
        bingo.compensate(model, None, torch.randn(64, 16), reference=other)
    with pytest.raises(ConfigError, match=r"^compensate: reference must be a torch.nn.Module, got str 'dense'$"):
        bingo.compensate(model, None, torch.randn(64, 16), reference="dense")
    assert _unchanged(model, before)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, None, "8"])
def test_compensate_batch_size_must_be_a_positive_int(batch_size):
    model = _pruned_mlp()
    with pytest.raises(ConfigError, match=r"^compensate: batch_size must be an integer >= 1, got "):
        bingo.compensate(model, None, torch.randn(64, 16), batch_size=batch_size)


@pytest.mark.parametrize("name,value", [("damping", "a"), ("damping", float("nan")), ("damping", -0.1), ("damping", None),
                                        ("validation", "0.1"), ("validation", float("inf")), ("validation", 1.0)])
def test_compensate_damping_and_validation_ranges(name, value):
    model = _pruned_mlp()
    with pytest.raises(ConfigError, match=rf"^{name} must be a fraction in \[0, 1\), got "):
        bingo.compensate(model, None, torch.randn(64, 16), **{name: value})


def test_compensate_siblings_check_batch_size_and_calibration():
    model = make_cnn()
    with pytest.raises(ConfigError, match=r"^reestimate_batchnorm: batch_size must be an integer >= 1, got int 0$"):
        bingo.reestimate_batchnorm(model, torch.randn(8, 1, 4, 4), batch_size=0)
    with pytest.raises(ConfigError, match=r"^reestimate_batchnorm: the calibration inputs give layer '0' \(Conv2d\) 3 "):
        bingo.reestimate_batchnorm(model, torch.randn(8, 3, 4, 4))
    with pytest.raises(ConfigError, match=r"^suggested_calibration_samples: the calibration inputs give layer '1' "):
        bingo.suggested_calibration_samples(make_mlp(), torch.randn(1, 15))
    with pytest.raises(ConfigError, match=r"^suggested_calibration_samples: minimum must be an integer >= 1, got "):
        bingo.suggested_calibration_samples(make_mlp(), torch.randn(1, 16), minimum=-3)


# -- 2. -inf, NaN and +inf scores ---------------------------------------------------------------


def _with(scores: dict[str, torch.Tensor], key: str, value: float) -> dict[str, torch.Tensor]:
    scores = {k: v.clone() for k, v in scores.items()}
    scores[key].fill_(value)
    return scores


@pytest.mark.parametrize("scope", ["global", "lamp", "block"])
def test_a_layer_scored_all_minus_inf_keeps_its_floor(scope):
    model = make_mlp()
    scores = _with(bingo.magnitude_scores(model), "1.weight", -math.inf)
    masks = bingo.prune(model, scores, 0.9, scope)
    floor = bingo.selection.floor_count(192)
    if scope == "block":  # each layer of a Sequential is a block of its own: pruned to 90% inside it
        assert int(masks["1.weight"].sum()) == 192 - round(0.9 * 192)
    else:
        assert int(masks["1.weight"].sum()) == floor
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)  # still exact


def test_minus_inf_scores_on_a_pruned_model_keep_the_floor_and_masks_only_shrink():
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    before = bingo.current_masks(model, bingo.magnitude_scores(model))
    masks = bingo.prune(model, _with(bingo.magnitude_scores(model), "3.weight", -math.inf), 0.9)
    assert 1 <= int(masks["3.weight"].sum())
    assert all(not (m & ~before[k]).any() for k, m in masks.items())  # nothing pruned came back


def test_prune_to_accuracy_keeps_the_floor_of_a_minus_inf_layer():
    model = make_mlp()
    scores = _with(bingo.magnitude_scores(model), "1.weight", -math.inf)
    # the floor binds up to N - sum of floors; evaluate says fine up to 90% pruned, worse beyond
    total = sum(s.numel() for s in scores.values())

    def evaluate(net):
        pruned = sum(int((getattr(net[i], "weight_mask", torch.ones(1)) == 0).sum()) for i in (1, 3, 5))
        return 1.0 if pruned <= 0.9 * total else 0.0

    result = bingo.prune_to_accuracy(model, scores, evaluate, min_accuracy=0.5)
    assert int(result.masks["1.weight"].sum()) >= bingo.selection.floor_count(192)


def test_n_m_with_minus_inf_scores_keeps_n_of_every_group():
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    scores["1.weight"][0, :4] = -math.inf  # a whole group of 4
    masks = bingo.prune(model, scores, "2:4")
    assert bingo.is_n_m(masks["1.weight"], 2, 4)
    assert (masks["1.weight"].reshape(12, 4, 4).sum(-1) == 2).all()  # exactly 2 of 4 kept, the -inf group too


def test_select_masks_without_pruned_still_reads_minus_inf_as_already_pruned():
    # the pure function's contract is unchanged: -inf = already pruned, unless pruned= says which are
    scores = {"a": torch.full((100,), -math.inf), "b": torch.arange(100.0)}
    assert int(bingo.select_masks(scores, 0.6)["a"].sum()) == 0
    pruned = {"a": torch.zeros(100, dtype=torch.bool), "b": torch.zeros(100, dtype=torch.bool)}
    assert int(bingo.select_masks(scores, 0.6, pruned=pruned)["a"].sum()) == bingo.selection.floor_count(100)
    with pytest.raises(ConfigError, match=r"^pruned\['a'\] must be a bool tensor of the scores' shape \(100,\), got \(3,\)$"):
        bingo.select_masks(scores, 0.6, pruned={"a": torch.zeros(3, dtype=torch.bool), "b": pruned["b"]})


@pytest.mark.parametrize("call", [
    lambda m, s: bingo.prune(m, s, 0.5),
    lambda m, s: bingo.prune(m, s, 0.5, "layer"),
    lambda m, s: bingo.prune(m, s, 0.5, "lamp"),
    lambda m, s: bingo.prune(m, s, "2:4"),
    lambda m, s: bingo.prune_to_accuracy(m, s, lambda net: 1.0, max_drop=0.1),
], ids=["global", "layer", "lamp", "n:m", "to-accuracy"])
def test_nan_scores_are_refused_the_same_way_everywhere(call):
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    scores["3.weight"][0, 0] = math.nan
    with pytest.raises(ConfigError, match=r"^scores of '3.weight' contain NaN \(1 of 96\): "):
        call(model, scores)
    assert not bingo.pruned_parameters(model)


def test_plus_inf_scores_are_the_most_significant_and_lamp_refuses_them():
    model = make_mlp()
    scores = _with(bingo.magnitude_scores(model), "5.weight", math.inf)
    assert bool(bingo.prune(make_mlp(), scores, 0.5)["5.weight"].all())
    assert bool(bingo.prune(make_mlp(), scores, 0.8, "layer")["5.weight"].sum() == 32 - round(0.8 * 32))
    with pytest.raises(ConfigError, match=r"^scope 'lamp' needs finite scores >= 0 .*got infinite scores$"):
        bingo.prune(model, scores, 0.5, "lamp")


def test_prune_heads_keeps_a_head_of_an_attention_scored_all_minus_inf():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    scores = bingo.head_scores(model, bingo.magnitude_scores(model))
    first = next(iter(scores))
    scores[first] = torch.full_like(scores[first], -math.inf)
    keep = bingo.prune_heads(model, scores, 0.5)
    assert int(keep[first].sum()) >= 1
    assert sum(int((~k).sum()) for k in keep.values()) == 4
