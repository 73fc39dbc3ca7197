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
from .layer_types import unit_matrix
from .layers import GRANULARITIES, find_layers, parameter_name, unit_axis, weight_of
from .selection import NAN_CAUSES, check_scores_finite

__all__ = ["combine_ranks", "magnitude_scores", "normalised_ranks", "random_scores"]


def _layers(model: nn.Module, granularity: str, include: Iterable[str] | None, exclude: Iterable[str]) -> dict[str, nn.Module]:
    check_choice("granularity", granularity, GRANULARITIES)
    layers = find_layers(model, include, exclude, granularity)
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
        weight = weight_of(module, key).detach().float()
        mask = getattr(module, f"{parameter_name(key)}_mask", None)
        if mask is not None:
            weight = weight * mask
        if granularity == "weight":
            scores[key] = weight.abs().cpu()
        else:
            scores[key] = unit_matrix(weight, unit_axis(module, key)).norm(dim=1).cpu()
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
        weight = weight_of(module, key)
        shape = weight.shape if granularity == "weight" else (weight.shape[unit_axis(module, key)],)
        scores[key] = torch.rand(shape, generator=generator)
    return scores


def normalised_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks of ``values`` (any shape) scaled to [0, 1]: 0 = smallest, 1 = largest.

    Ties share their average rank, so equal values stay equal. A single
    value gets rank 0. Float64, shaped like ``values``. NaN is refused.
    """
    flat = values.detach().reshape(-1).double().cpu()
    if torch.isnan(flat).any():
        raise ConfigError(f"cannot rank scores that contain NaN: {NAN_CAUSES}")
    n = flat.numel()
    sorted_values, order = torch.sort(flat, stable=True)
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0)
    average = ((ends - counts) + (ends - 1)).double() / 2  # mean of the positions start..end-1 of each tie group
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.repeat_interleave(average, counts)
    return (ranks / max(n - 1, 1)).reshape(values.shape)


def _is_per_unit(unit_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    return len(unit_shape) == 1 and len(weight_shape) >= 2 and unit_shape[0] == weight_shape[0]


def _check_same_entries(scores: list[Mapping[str, torch.Tensor]]) -> None:
    """Raise :class:`ConfigError` unless every set scores the same entries as set 0.

    A granularity mismatch is reported first: blending a neuron significance
    with weight-level magnitude also differs in keys (only the weight level
    scores the output layer), but the keys are not what the caller must fix.
    """
    first = scores[0]
    for i, other in enumerate(scores[1:], start=1):
        for key in (k for k in first if k in other):
            a, b = tuple(first[key].shape), tuple(other[key].shape)
            if _is_per_unit(a, b) or _is_per_unit(b, a):
                (unit, unit_set), (weight, weight_set) = ((a, 0), (b, i)) if _is_per_unit(a, b) else ((b, i), (a, 0))
                raise ConfigError(
                    f"combine_ranks: score sets mix granularities: {key!r} is per neuron {unit} in set {unit_set} "
                    f"and per weight {weight} in set {weight_set}; pass granularity 'neuron' to "
                    "magnitude_scores/random_scores (and the same include) so every set scores the same units"
                )
        missing, extra = [k for k in first if k not in other], [k for k in other if k not in first]
        if missing or extra:
            parts = ([f"lacks {', '.join(map(repr, missing))}"] if missing else []) + (
                [f"has extra {', '.join(map(repr, extra))}"] if extra else []
            )
            raise ConfigError(
                f"combine_ranks needs score sets with the same keys: set {i} {' and '.join(parts)} compared with set 0; "
                "score every set over the same layers (the same include/exclude)"
            )
        for key in first:
            a, b = tuple(first[key].shape), tuple(other[key].shape)
            if a != b:
                raise ConfigError(f"combine_ranks needs score sets with the same shapes: {key!r} is {a} in set 0 and {b} in set {i}")


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
        scores: two or more ``{key: tensor}`` dicts with the same keys and
            shapes (in any key order); the result follows the first's order.
            :class:`ConfigError` otherwise, naming the keys or the
            granularity that differ.
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
    _check_same_entries(scores)
    keys = list(scores[0])
    for one in scores:
        check_scores_finite(one)
    total = sum(weights)
    blended = sum(
        normalised_ranks(torch.cat([one[k].detach().reshape(-1).cpu() for k in keys])) * (weight / total)
        for weight, one in zip(weights, scores)
    )
    pieces = torch.split(blended, [scores[0][k].numel() for k in keys])
    return {k: piece.float().reshape(scores[0][k].shape) for k, piece in zip(keys, pieces)}
