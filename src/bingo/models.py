"""The models the CLI trains, in one name -> class registry.

Every model is built from the data's per-sample input shape and its number
of classes, so one name works on 8×8 digits, 28×28 Fashion-MNIST and flat
feature vectors alike. A shape a model cannot take (a sample with no values,
an image smaller than the conv net's pooling allows) is refused when the
model is built, with a :class:`~bingo.errors.ConfigError`, not by the first
forward pass.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from .errors import ConfigError, check_choice

__all__ = ["MODELS", "ConvNet", "LeNet300", "SmallMLP", "build_model"]


def _check_sizes(model: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse samples with no values and fewer than one class, naming ``model``."""
    if any(int(d) < 1 for d in input_shape):
        raise ConfigError(
            f"model {model!r} needs at least one input value per sample, got shape {tuple(input_shape)}"
        )
    if int(num_classes) < 1:
        raise ConfigError(f"model {model!r} needs num_classes >= 1, got {num_classes}")


class LeNet300(nn.Module):
    """LeNet-300-100 (Frankle & Carbin 2019): inputs flattened, 300-100 hidden ReLU units."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        _check_sizes("lenet300", input_shape, num_classes)
        features = math.prod(input_shape)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


class SmallMLP(nn.Module):
    """A small MLP for small inputs (e.g. 8×8 digits): 64-32 hidden ReLU units."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        _check_sizes("mlp", input_shape, num_classes)
        features = math.prod(input_shape)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(features, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    """A small Conv-2-style CNN: two 3×3 conv blocks (32 filters, BatchNorm, ReLU), max-pool, 128-unit FC, output.

    Needs image input, ``(C, H, W)`` or ``(H, W)``, of at least
    :meth:`min_image_side` pixels a side (the max-pool must leave one pixel).
    """

    #: (kernel, stride, padding) of the layers in ``features`` that change the maps' size:
    #: the two padded 3×3 convs keep it, the 2×2 max-pool halves it, rounding down.
    #: Kept apart from the modules so that sizing never draws from the RNG.
    SIZE_STEPS: tuple[tuple[int, int, int], ...] = ((3, 1, 1), (3, 1, 1), (2, 2, 0))

    @classmethod
    def side_after(cls, side: int) -> int:
        """Height (or width) of the feature maps for images ``side`` pixels high; < 1: too small."""
        for kernel, stride, padding in cls.SIZE_STEPS:
            side = (side + 2 * padding - kernel) // stride + 1
            if side < 1:
                break
        return side

    @classmethod
    def min_image_side(cls) -> int:
        """The smallest image height and width that leave the feature maps one pixel (2)."""
        return next(side for side in itertools.count(1) if cls.side_after(side) >= 1)

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) == 2:
            input_shape = (1, *input_shape)
        if len(input_shape) != 3:
            raise ConfigError(
                f"model 'conv' needs image input (C, H, W); this data has per-sample shape {tuple(input_shape)}; "
                "use 'mlp' or 'lenet300' for flat features"
            )
        _check_sizes("conv", input_shape, num_classes)
        channels, height, width = input_shape
        side = self.min_image_side()
        if height < side or width < side:
            raise ConfigError(
                f"model 'conv' needs images of at least {side}x{side}, got {height}x{width}; "
                "use 'mlp' or 'lenet300' for smaller inputs"
            )
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * self.side_after(height) * self.side_after(width), 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )
        self._image_shape = (channels, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (N, H, W) -> (N, 1, H, W)
            x = x.unsqueeze(1)
        return self.classifier(self.features(x))


#: name -> model class; each takes ``(input_shape, num_classes)``.
MODELS: dict[str, type[nn.Module]] = {"lenet300": LeNet300, "mlp": SmallMLP, "conv": ConvNet}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """Build model ``name`` with initial weights drawn from ``seed`` (the global RNG is left as it was)."""
    check_choice("model", name, MODELS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](tuple(input_shape), num_classes)
