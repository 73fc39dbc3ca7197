"""The models the CLI trains, in one name -> class registry.

Every model is built from the data's per-sample input shape and its number
of classes, so one name works on 8×8 digits, 28×28 Fashion-MNIST and flat
feature vectors alike. A shape a model cannot take (a sample with no values,
an image smaller than an image model can take) is refused when the
model is built, with a :class:`~bingo.errors.ConfigError`, not by the first
forward pass.

The image models (``conv``, ``resnet``) take ``(C, H, W)`` or ``(H, W)``
(one channel) samples and size their feature maps from ``SIZE_STEPS``, the
``(kernel, stride, padding)`` of each layer that changes the maps' size, so
the smallest image a model accepts is computed, not hard-coded, and sizing
never draws from the RNG.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from ..errors import ConfigError, check_choice
from .sequence_models import Conv1dNet, TokenTransformer

__all__ = ["MODELS", "BasicBlock", "ConvNet", "LeNet300", "ResNet", "SmallMLP", "build_model"]


def _check_sizes(model: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Refuse samples with no values and fewer than one class, naming ``model``."""
    if any(int(d) < 1 for d in input_shape):
        raise ConfigError(
            f"model {model!r} needs at least one input value per sample, got shape {tuple(input_shape)}"
        )
    if int(num_classes) < 1:
        raise ConfigError(f"model {model!r} needs num_classes >= 1, got {num_classes}")


def _side_after(steps: tuple[tuple[int, int, int], ...], side: int) -> int:
    """Height (or width) of the maps after the ``(kernel, stride, padding)`` ``steps``; < 1: too small."""
    for kernel, stride, padding in steps:
        side = (side + 2 * padding - kernel) // stride + 1
        if side < 1:
            break
    return side


def _image_input(
    model: str, input_shape: tuple[int, ...], num_classes: int, min_side: int, smaller: str
) -> tuple[int, int, int]:
    """``(C, H, W)`` from an ``(H, W)`` or ``(C, H, W)`` sample shape, refusing what ``model`` cannot take.

    ``smaller`` names the models to use instead for images below ``min_side``.
    """
    if len(input_shape) == 2:
        input_shape = (1, *input_shape)
    if len(input_shape) != 3:
        raise ConfigError(
            f"model {model!r} needs image input (C, H, W); this data has per-sample shape {tuple(input_shape)}; "
            "use 'mlp' or 'lenet300' for flat features"
        )
    _check_sizes(model, input_shape, num_classes)
    channels, height, width = (int(d) for d in input_shape)
    if height < min_side or width < min_side:
        raise ConfigError(
            f"model {model!r} needs images of at least {min_side}x{min_side}, got {height}x{width}; "
            f"use {smaller} for smaller inputs"
        )
    return channels, height, width


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
        return _side_after(cls.SIZE_STEPS, side)

    @classmethod
    def min_image_side(cls) -> int:
        """The smallest image height and width that leave the feature maps one pixel (2)."""
        return next(side for side in itertools.count(1) if cls.side_after(side) >= 1)

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = _image_input("conv", input_shape, num_classes, self.min_image_side(), "'mlp' or 'lenet300'")
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


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016): two 3×3 conv + BatchNorm, added to a shortcut, then ReLU.

    The shortcut is the identity when the shape is kept, and a 1×1 conv +
    BatchNorm projection (He et al.'s option B) when ``stride`` or the number
    of channels changes it. Convs have no bias: the BatchNorm after each adds one.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet (ResNet-14, CIFAR-style after He et al. 2016, section 4.2).

    A 3×3 stem conv with 16 filters, then three stages of two
    :class:`BasicBlock` each with 16, 32 and 64 channels and strides 1, 2, 2,
    global average pooling and one Linear head. The prunable layers are the
    13 3×3 convs, the two 1×1 projections and the head; a BatchNorm follows
    every conv. 174,970 parameters for one input channel and 10 classes,
    whatever the image size (the pooling makes the head independent of it).

    Needs image input, ``(C, H, W)`` or ``(H, W)``, of at least
    :meth:`min_image_side` pixels a side: the last stage's maps must keep
    2×2 pixels, so that every stride-2 stage has something to downsample and
    every BatchNorm sees more than one value per channel even in a training
    batch of one sample (the last batch of an epoch may be that short).
    """

    #: (out channels, stride) of each stage; every stage has ``BLOCKS`` blocks.
    STAGES: tuple[tuple[int, int], ...] = ((16, 1), (32, 2), (64, 2))
    BLOCKS = 2
    STEM = 16
    #: The convs that change the maps' size: each stage's first 3×3 conv (its
    #: stride-2 1×1 projection gives the same size); all others keep it.
    SIZE_STEPS: tuple[tuple[int, int, int], ...] = tuple((3, stride, 1) for _, stride in STAGES if stride != 1)
    #: Height and width the last stage's maps must keep (see the class docstring).
    MIN_FINAL_SIDE = 2

    @classmethod
    def side_after(cls, side: int) -> int:
        """Height (or width) of the last stage's maps for images ``side`` pixels high."""
        return _side_after(cls.SIZE_STEPS, side)

    @classmethod
    def min_image_side(cls) -> int:
        """The smallest image height and width that leave the last stage's maps 2×2 (5)."""
        return next(side for side in itertools.count(1) if cls.side_after(side) >= cls.MIN_FINAL_SIDE)

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, _, _ = _image_input(
            "resnet", input_shape, num_classes, self.min_image_side(), "'conv', 'mlp' or 'lenet300'"
        )
        self.stem = nn.Sequential(
            nn.Conv2d(channels, self.STEM, 3, padding=1, bias=False),
            nn.BatchNorm2d(self.STEM),
            nn.ReLU(),
        )
        stages, width_in = [], self.STEM
        for width_out, stride in self.STAGES:
            blocks = [BasicBlock(width_in, width_out, stride)]
            blocks += [BasicBlock(width_out, width_out) for _ in range(self.BLOCKS - 1)]
            stages.append(nn.Sequential(*blocks))
            width_in = width_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(width_in, num_classes)
        # He et al.'s initialisation for ReLU nets, as torchvision's ResNets; Linear keeps PyTorch's default.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # (N, H, W) -> (N, 1, H, W)
            x = x.unsqueeze(1)
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


#: name -> model class; each takes ``(input_shape, num_classes)``.
MODELS: dict[str, type[nn.Module]] = {"lenet300": LeNet300, "mlp": SmallMLP, "conv": ConvNet, "resnet": ResNet,
                                     "transformer": TokenTransformer, "conv1d": Conv1dNet}


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, seed: int = 0) -> nn.Module:
    """Build model ``name`` with initial weights drawn from ``seed`` (the global RNG is left as it was)."""
    check_choice("model", name, MODELS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](tuple(input_shape), num_classes)
