"""Which per-sample input shapes each model accepts (issue 9, item 6).

Images too small for a model, or samples with no values, are refused when
the model is built, with a one-line ConfigError naming the minimum, not by a
raw RuntimeError from the first forward pass.
"""

from __future__ import annotations

import re

import pytest
import torch

from bingo.errors import ConfigError
from bingo.bench.models import MODELS, ConvNet, build_model


def test_conv_minimum_follows_its_pooling():
    # two padded 3x3 convs keep the size, one 2x2 max-pool halves it: 2x2 is the smallest image
    assert ConvNet.min_image_side() == 2


@pytest.mark.parametrize("side", [2, 3, 7, 8, 28])
def test_conv_size_steps_match_its_layers(side):
    # SIZE_STEPS sizes the net without building it; it must say what the layers do
    model = build_model("conv", (1, side, side + 1), 3).eval()
    maps = model.features(torch.zeros(1, 1, side, side + 1))
    assert maps.shape[-2:] == (ConvNet.side_after(side), ConvNet.side_after(side + 1))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 5), (3, 7, 1), (1, 1)])
def test_conv_refuses_images_below_the_minimum(shape):
    height, width = shape[-2:]
    with pytest.raises(
        ConfigError,
        match=rf"^model 'conv' needs images of at least 2x2, got {height}x{width}; use 'mlp' or 'lenet300' for smaller inputs$",
    ):
        build_model("conv", shape, 3)


@pytest.mark.parametrize("shape", [(0, 4, 4), (1, 0, 4)])
def test_conv_refuses_empty_images(shape):
    with pytest.raises(ConfigError, match=rf"^model 'conv' needs at least one input value per sample, got shape {re.escape(str(shape))}$"):
        build_model("conv", shape, 3)


@pytest.mark.parametrize("shape", [(1, 2, 2), (1, 3, 3), (2, 2, 5), (5, 4)])
def test_conv_accepts_images_from_the_minimum_up(shape):
    model = build_model("conv", shape, 3).eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 3)


@pytest.mark.parametrize("name", ["mlp", "lenet300"])
@pytest.mark.parametrize("shape", [(1,), (1, 1, 1), (1, 1), (3, 1, 5), (7,)])
def test_mlps_accept_any_non_empty_sample(name, shape):
    assert build_model(name, shape, 4)(torch.zeros(2, *shape)).shape == (2, 4)


@pytest.mark.parametrize("name", ["mlp", "lenet300"])
@pytest.mark.parametrize("shape", [(0,), (1, 0, 4)])
def test_mlps_refuse_empty_samples(name, shape):
    with pytest.raises(ConfigError, match=rf"^model '{name}' needs at least one input value per sample, got shape {re.escape(str(shape))}$"):
        build_model(name, shape, 4)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("classes", [0, -3])
def test_models_need_a_class(name, classes):
    with pytest.raises(ConfigError, match=rf"^model '{name}' needs num_classes >= 1, got {classes}$"):
        build_model(name, (1, 8, 8), classes)
