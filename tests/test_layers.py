"""Which layers are scored (bingo.layers), and which one is the output layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bingo
from bingo.errors import ConfigError
from bingo.layers import GRANULARITIES, find_layers, output_layer_name


class Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x))))


class TwoBlocks(nn.Module):
    """A small ResNet-shaped model (without the skips): the case a new user tried first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.b1 = Block(1, 4)
        self.b2 = Block(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(x)).mean(dim=(2, 3)))


def test_output_layer_is_found_from_the_model():
    model = TwoBlocks()
    assert output_layer_name(model) == "head.weight"
    assert output_layer_name(nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))) == "2.weight"


def test_neuron_scores_keep_every_included_hidden_layer():
    # The last *included* layer (b2.conv1) is a hidden layer, not the output: both stay.
    scores = bingo.magnitude_scores(TwoBlocks(), "neuron", include=["b1.conv1", "b2.conv1"])
    assert {k: tuple(v.shape) for k, v in scores.items()} == {"b1.conv1.weight": (4,), "b2.conv1.weight": (6,)}
    random = bingo.random_scores(TwoBlocks(), "neuron", include=["b1.conv1", "b2.conv1"])
    assert list(random) == ["b1.conv1.weight", "b2.conv1.weight"]


def test_neuron_scores_leave_out_the_real_output_layer_when_it_is_included():
    model = TwoBlocks()
    assert list(find_layers(model, include=["b1.conv1", "b2.conv1", "head"])) == ["b1.conv1.weight", "b2.conv1.weight", "head.weight"]
    scores = bingo.magnitude_scores(model, "neuron", include=["b1.conv1", "b2.conv1", "head"])
    assert list(scores) == ["b1.conv1.weight", "b2.conv1.weight"]
    # weight granularity scores the output layer like any other
    assert list(bingo.magnitude_scores(model, "weight", include=["b2.conv1", "head"])) == ["b2.conv1.weight", "head.weight"]


def test_neuron_scores_of_the_output_layer_alone_are_refused():
    with pytest.raises(ConfigError, match=r"^neuron granularity needs a hidden layer; the only layer selected is the output layer 'head\.weight'"):
        bingo.magnitude_scores(TwoBlocks(), "neuron", include=["head"])


def test_output_layer_of_a_model_without_layers_is_refused():
    with pytest.raises(ConfigError, match=r"^cannot tell the output layer of Sequential: it has no layer of a type that maps inputs to outputs "
                       r"\(Linear, Conv, MultiheadAttention.out_proj, Conv1D\)$"):
        output_layer_name(nn.Sequential(nn.ReLU()))


def test_granularity_choices():
    assert GRANULARITIES == ("weight", "neuron")
    with pytest.raises(ConfigError, match=r"^unknown granularity 'unit'; valid choices: weight, neuron$"):
        bingo.magnitude_scores(TwoBlocks(), "unit")
