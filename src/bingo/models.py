"""The models the CLI trains, in one name -> class registry.

Every model is built from the data's per-sample input shape and its number
of classes, so one name works on 8×8 digits, 28×28 Fashion-MNIST and flat
feature vectors alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import ConfigError, check_choice

__all__ = ["MODELS", "ConvNet", "LeNet300", "SmallMLP", "build_model"]


class LeNet300(nn.Module):
    """LeNet-300-100 (Frankle & Carbin 2019): inputs flattened, 300-100 hidden ReLU units."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
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

    Needs image input, ``(C, H, W)`` or ``(H, W)``.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) == 2:
            input_shape = (1, *input_shape)
        if len(input_shape) != 3:
            raise ConfigError(
                f"model 'conv' needs image input (C, H, W); this data has per-sample shape {tuple(input_shape)}; "
                "use 'mlp' or 'lenet300' for flat features"
            )
        channels, height, width = input_shape
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
            nn.Linear(32 * (height // 2) * (width // 2), 128),
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
