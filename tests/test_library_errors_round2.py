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
