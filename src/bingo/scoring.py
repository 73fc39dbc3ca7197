"""Reference scores that need no search (magnitude, random), and rank blending.

Same contract as :meth:`bingo.TicketSearch.significance`: ``{weight key:
tensor}``, higher = more significant, shaped like the weight (granularity
``"weight"``) or ``(out_units,)`` (``"neuron"``; the output layer is left out).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError, check_choice
from .layers import find_layers, output_layer_name, weight_of
from .search import GRANULARITIES

__all__ = ["combine_ranks", "magnitude_scores", "normalised_ranks", "random_scores"]


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


def normalised_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks of ``values`` (any shape) scaled to [0, 1]: 0 = smallest, 1 = largest.

    Ties share their average rank, so equal values stay equal. A single
    value gets rank 0. Float64, shaped like ``values``. NaN is refused.
    """
    flat = values.detach().reshape(-1).double().cpu()
    if torch.isnan(flat).any():
        raise ConfigError("cannot rank scores that contain NaN; decide how to score never-probed weights (significance(unprobed=...))")
    n = flat.numel()
    sorted_values, order = torch.sort(flat, stable=True)
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0)
    average = ((ends - counts) + (ends - 1)).double() / 2  # mean of the positions start..end-1 of each tie group
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(average, counts)
    return (ranks / max(n - 1, 1)).reshape(values.shape)


def combine_ranks(
    scores: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Blend several sets of scores by their global ranks.

    Each set is ranked over all its entries jointly (every layer in one
    ranking, as global pruning compares them) with :func:`normalised_ranks`;
    the result is the weighted mean of those ranks, in [0, 1], higher = more
    significant, with the keys and shapes of the inputs. Ranks rather than
    values, because the sets live on unrelated scales (a loss change, a
    weight magnitude); a weight that every set ranks low stays low.

    Why: BINGO's estimate of the loss change measures the damage a cut does
    at once and is the better ranking without fine-tuning; magnitude ranks
    better for what a network recovers after fine-tuning (BENCHMARKS.md,
    ablation). ``combine_ranks([search.significance(), magnitude_scores(model)])``
    is the default ``bingo`` score.

    Args:
        scores: two or more ``{key: tensor}`` dicts with the same keys and shapes.
        weights: one non-negative weight per set (summing to more than 0);
            default equal weights.
    """
    scores = list(scores)
    if not scores:
        raise ConfigError("combine_ranks needs at least one set of scores")
    weights = [1.0] * len(scores) if weights is None else [float(w) for w in weights]
    if len(weights) != len(scores):
        raise ConfigError(f"combine_ranks got {len(scores)} sets of scores but {len(weights)} weights")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"combine_ranks weights must be >= 0 with a positive sum, got {weights}")
    keys = list(scores[0])
    for other in scores[1:]:
        if list(other) != keys or any(other[k].shape != scores[0][k].shape for k in keys):
            raise ConfigError("combine_ranks needs score sets with the same keys and shapes: "
                              f"{ {k: tuple(v.shape) for k, v in scores[0].items()} } vs { {k: tuple(v.shape) for k, v in other.items()} }")
    total = sum(weights)
    blended = sum(
        normalised_ranks(torch.cat([one[k].detach().reshape(-1).cpu() for k in keys])) * (weight / total)
        for weight, one in zip(weights, scores)
    )
    pieces = torch.split(blended, [scores[0][k].numel() for k in keys])
    return {k: piece.float().reshape(scores[0][k].shape) for k, piece in zip(keys, pieces)}
