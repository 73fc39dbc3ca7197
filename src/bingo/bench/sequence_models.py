"""Sequence models for the CLI: a small transformer encoder and a 1-D CNN.

Both take 2-D samples, ``(length, features)`` rows for the transformer (a
token per row: the ``tokens`` task's one-hot rows, or an image's pixel rows)
and ``(channels, length)`` for ``conv1d`` (the ``signals`` task), and are
built from ``(input_shape, num_classes)`` like every model in
:data:`bingo.bench.models.MODELS`. A grey-scale image ``(1, H, W)`` is taken
as ``(H, W)``. Dropout is off: a run is a function of its seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = ["Conv1dNet", "TokenTransformer"]


def _sequence_shape(model: str, input_shape: tuple[int, ...], num_classes: int, what: str) -> tuple[int, int]:
    """``(a, b)`` of a 2-D sample (or a ``(1, a, b)`` one), refusing what ``model`` cannot take."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 2:
        raise ConfigError(
            f"model {model!r} needs 2-D samples {what}; this data has per-sample shape {tuple(input_shape)}; "
            "use 'mlp' or 'lenet300' for flat features"
        )
    if min(shape) < 1:
        raise ConfigError(f"model {model!r} needs at least one input value per sample, got shape {tuple(input_shape)}")
    if int(num_classes) < 1:
        raise ConfigError(f"model {model!r} needs num_classes >= 1, got {num_classes}")
    return shape


class TokenTransformer(nn.Module):
    """A 2-layer pre-norm transformer encoder classifier over ``(length, features)`` samples.

    ``embed`` (an ``nn.Linear``, the token embedding for one-hot rows) maps
    each row to ``WIDTH`` dimensions, a learned position embedding is added,
    ``LAYERS`` ``nn.TransformerEncoderLayer`` s (``HEADS`` heads, feed-forward
    ``2 · WIDTH``, batch first, no dropout) follow, then the mean over
    positions, a LayerNorm and the ``head`` Linear. Scored by default: the
    embedding, each layer's attention q/k/v and ``out_proj``, its two
    feed-forward Linears and the head.
    """

    WIDTH, HEADS, LAYERS = 32, 4, 2

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        length, features = _sequence_shape("transformer", input_shape, num_classes, "(length, features): a token per row")
        self._sample_dims = len(input_shape)
        self.embed = nn.Linear(features, self.WIDTH)
        self.position = nn.Parameter(torch.randn(length, self.WIDTH))
        layer = nn.TransformerEncoderLayer(self.WIDTH, self.HEADS, 2 * self.WIDTH, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, self.LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(self.WIDTH)
        self.head = nn.Linear(self.WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (N, 1, H, W) images: rows are tokens
            x = x.squeeze(1)
        h = self.encoder(self.embed(x) + self.position)
        return self.head(self.norm(h.mean(dim=1)))


class Conv1dNet(nn.Module):
    """A small 1-D CNN over ``(channels, length)`` samples.

    ``conv1`` (32 filters, kernel 7) and ``conv2`` (32 filters, kernel 5),
    both padded to keep the length, each followed by ReLU; the maximum over
    time; ``fc`` (64 units, ReLU) and the ``head`` Linear.
    """

    FILTERS, HIDDEN = 32, 64

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, _ = _sequence_shape("conv1d", input_shape, num_classes, "(channels, length)")
        self.conv1 = nn.Conv1d(channels, self.FILTERS, 7, padding=3)
        self.conv2 = nn.Conv1d(self.FILTERS, self.FILTERS, 5, padding=2)
        self.fc = nn.Linear(self.FILTERS, self.HIDDEN)
        self.head = nn.Linear(self.HIDDEN, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # (N, 1, C, L)
            x = x.squeeze(1)
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.relu(self.fc(h.amax(dim=2))))
