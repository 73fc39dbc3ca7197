"""Reference scores that need no search: magnitude and random.

Same contract as :meth:`bingo.TicketSearch.significance`: ``{weight key:
tensor}``, higher = more significant, shaped like the weight (granularity
``"weight"``) or ``(out_units,)`` (``"neuron"``; the output layer is left out).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .errors import check_choice
from .layers import find_layers, output_layer_name, weight_of
from .search import GRANULARITIES

__all__ = ["magnitude_scores", "random_scores"]


def _layers(model: nn.Module, granularity: str, include: Iterable[str] | None, exclude: Iterable[str]) -> dict[str, nn.Module]:
    check_choice("granularity", granularity, GRANULARITIES)
    layers = find_layers(model, include, exclude)
    if granularity == "neuron":
        output = output_layer_name(layers)
        layers = {k: m for k, m in layers.items() if k != output}
    return layers


def magnitude_scores(
    model: nn.Module,
    granularity: str = "weight",
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """``|w|`` per weight, or the L2 norm of each unit's incoming weights per neuron."""
    scores = {}
    for key, module in _layers(model, granularity, include, exclude).items():
        weight = weight_of(module).detach().float()
        mask = getattr(module, "weight_mask", None)
        if mask is not None:
            weight = weight * mask
        if granularity == "weight":
            scores[key] = weight.abs().cpu()
        else:
            scores[key] = weight.reshape(weight.shape[0], -1).norm(dim=1).cpu()
    return scores


def random_scores(
    model: nn.Module,
    granularity: str = "weight",
    seed: int = 0,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, torch.Tensor]:
    """Uniform random scores in [0, 1) from a seeded generator: the control."""
    generator = torch.Generator().manual_seed(seed)
    scores = {}
    for key, module in _layers(model, granularity, include, exclude).items():
        weight = weight_of(module)
        shape = weight.shape if granularity == "weight" else weight.shape[:1]
        scores[key] = torch.rand(shape, generator=generator)
    return scores
