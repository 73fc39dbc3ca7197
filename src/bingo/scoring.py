"""Reference scores that need no search (magnitude, random), rank blending, and bingo's default score.

:func:`bingo_scores` is the recipe the ``bingo`` method, the CLI and the
trainer integrations prune by: a search's significance blended with weight
magnitude by rank. Same contract as :meth:`bingo.TicketSearch.significance`: ``{weight key:
tensor}``, higher = more significant, shaped like the weight (granularity
``"weight"``) or ``(out_units,)`` (``"neuron"``; the output layer is left out).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checks import check_model, check_scores, check_seed
from .errors import ConfigError, check_choice
from .layer_types import unit_matrix
from .layers import GRANULARITIES, find_layers, parameter_name, unit_axis, weight_of
from .selection import NAN_CAUSES, check_scores_finite

if TYPE_CHECKING:
    from .search import TicketSearch

__all__ = [
    "MAGNITUDE_WEIGHT",
    "bingo_scores",
    "check_magnitude_weight",
    "combine_ranks",
    "magnitude_scores",
    "normalised_ranks",
    "random_scores",
]

#: bingo's default weight of the magnitude rank in :func:`bingo_scores`: an equal blend with the significance.
MAGNITUDE_WEIGHT = 0.5


def _layers(
    model: nn.Module,
    granularity: str | None,
    include: Iterable[str] | None,
    exclude: Iterable[str],
    like: Mapping[str, torch.Tensor] | None,
) -> dict[str, tuple[nn.Module, str]]:
    """``{key: (module, granularity)}`` to score: chosen by include/exclude, or exactly the keys of ``like``."""
    if like is not None:
        like = check_scores("scores", like, "like")
    if like is None:
        granularity = "weight" if granularity is None else granularity
        check_choice("granularity", granularity, GRANULARITIES)
        return {key: (module, granularity) for key, module in find_layers(model, include, exclude, granularity).items()}
    if include is not None or list(exclude):
        raise ConfigError("give like= or include=/exclude=, not both: like= scores exactly the keys of the scores it is given")
    if granularity is not None:
        check_choice("granularity", granularity, GRANULARITIES)
    weights = find_layers(model, include=["*"])  # every weight a score can name
    layers = {}
    for key, reference in like.items():
        if key not in weights:
            raise ConfigError(f"like= names {key!r}, which is not a weight of {type(model).__name__} "
                              f"(its weights: {', '.join(map(repr, weights))})")
        shape, weight_shape = tuple(reference.shape), tuple(weight_of(weights[key], key).shape)
        units = weight_shape[unit_axis(weights[key], key)]
        found = "weight" if shape == weight_shape else "neuron" if shape == (units,) else None
        if found is None or granularity not in (None, found):
            want = {"weight": f"{weight_shape} (per weight)", "neuron": f"({units},) (per neuron)"}
            expected = want[granularity] if granularity else " or ".join(want.values())
            raise ConfigError(f"like= scores {key!r} with shape {shape}; expected {expected}")
        layers[key] = (weights[key], found)
    return layers


def magnitude_scores(
    model: nn.Module,
    granularity: str | None = None,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    like: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``|w|`` per weight, or the L2 norm of each unit's incoming weights per neuron.

    The weights scored are those of :func:`bingo.find_layers` (``include``,
    ``exclude``, ``granularity``, default ``"weight"``), or, with
    ``like=scores``, exactly the keys of ``scores`` at their granularity (a
    tensor shaped like the weight: per weight; ``(out_units,)``: per neuron),
    so ``combine_ranks([search.significance(), magnitude_scores(model,
    like=search.significance())])`` blends the same entries whatever scope
    the search used. ``like`` with ``include``/``exclude`` is a
    :class:`ConfigError`, as is a key that is not a weight of ``model``.
    """
    scores = {}
    check_model("magnitude_scores", model)
    for key, (module, grain) in _layers(model, granularity, include, exclude, like).items():
        weight = weight_of(module, key).detach().float()
        mask = getattr(module, f"{parameter_name(key)}_mask", None)
        if mask is not None:
            weight = weight * mask
        if grain == "weight":
            scores[key] = weight.abs().cpu()
        else:
            scores[key] = unit_matrix(weight, unit_axis(module, key)).norm(dim=1).cpu()
    return scores


def random_scores(
    model: nn.Module,
    granularity: str | None = None,
    seed: int = 0,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    like: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Uniform random scores in [0, 1) from a seeded generator: the control.

    Scores the weights :func:`magnitude_scores` would (``like=scores``: exactly the keys and shapes of ``scores``).
    """
    generator = torch.Generator().manual_seed(check_seed("random_scores", "seed", seed))
    scores = {}
    for key, (module, grain) in _layers(model, granularity, include, exclude, like).items():
        weight = weight_of(module, key)
        shape = weight.shape if grain == "weight" else (weight.shape[unit_axis(module, key)],)
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
                    "magnitude_scores/random_scores (and the same include), or like=<set 0>, so every set scores the same units"
                )
        missing, extra = [k for k in first if k not in other], [k for k in other if k not in first]
        if missing or extra:
            parts = ([f"lacks {', '.join(map(repr, missing))}"] if missing else []) + (
                [f"has extra {', '.join(map(repr, extra))}"] if extra else []
            )
            raise ConfigError(
                f"combine_ranks needs score sets with the same keys: set {i} {' and '.join(parts)} compared with set 0; "
                "score every set over the same layers: magnitude_scores(model, like=<set 0>) and "
                "random_scores(model, like=<set 0>) score exactly its keys (or pass the same include/exclude)"
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
    ablation). ``combine_ranks([significance, magnitude_scores(model,
    like=significance)])``, with ``significance = search.significance()``,
    is the default ``bingo`` score.

    Args:
        scores: two or more ``{key: tensor}`` dicts with the same keys and
            shapes (in any key order); the result follows the first's order.
            :class:`ConfigError` otherwise, naming the keys or the
            granularity that differ.
        weights: one non-negative weight per set (summing to more than 0);
            default equal weights.
    """
    if isinstance(scores, Mapping) or not isinstance(scores, Sequence):
        raise ConfigError(f"combine_ranks: scores must be a list of score dicts ([significance, magnitude]), got "
                          f"{type(scores).__name__}")
    scores = [check_scores("combine_ranks", one, f"scores[{i}]") for i, one in enumerate(scores)]
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


def check_magnitude_weight(magnitude_weight: float) -> float:
    """``magnitude_weight`` as a float if it is in [0, 1]; :class:`ConfigError` otherwise."""
    try:
        value = float(magnitude_weight)
    except (TypeError, ValueError):
        raise ConfigError(f"magnitude weight must be in [0, 1], got {magnitude_weight!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"magnitude weight must be in [0, 1], got {magnitude_weight!r}")
    return value


def bingo_scores(
    search: TicketSearch | Mapping[str, torch.Tensor],
    model: nn.Module,
    magnitude_weight: float = MAGNITUDE_WEIGHT,
    *,
    granularity: str | None = None,
) -> dict[str, torch.Tensor]:
    """bingo's default score: a search's significance blended with weight magnitude by rank.

    What the ``bingo`` method prunes by after training (and ``bingo-gradual``
    at every update, and the trainer integrations when training ends):
    ``combine_ranks([significance, magnitude], [1 - m, m])`` with
    ``m = magnitude_weight``, where ``magnitude`` is
    :func:`magnitude_scores` of ``model`` (``|w|`` per weight; the L2 norm of
    each unit's incoming weights per neuron, the masked entries counting as
    zero) over exactly the significance's keys.

    Args:
        search: a :class:`~bingo.TicketSearch` (its ``significance()`` is read
            and its granularity used), or the ``{key: tensor}`` significance
            itself.
        model: the trained model the search watched, whose current weights
            give the magnitudes.
        magnitude_weight: weight of the magnitude rank, in [0, 1]. 0 returns
            the significance unchanged (no ranking: the same tensors
            ``significance()`` gives); 1 ranks by magnitude alone over the
            searched keys.
        granularity: ``"weight"`` or ``"neuron"``; default the search's, or,
            for a significance dict, ``"neuron"`` when every score is
            one-dimensional (one per unit) and ``"weight"`` otherwise.

    Returns:
        ``{key: tensor}`` with the significance's keys, order and shapes, in
        [0, 1], higher = more significant (or the significance as it is, for
        weight 0): what :func:`bingo.prune` ranks.

    Raises:
        ConfigError: a magnitude weight outside [0, 1], or a significance
            that does not fit ``model`` (see :func:`combine_ranks`).
    """
    magnitude_weight = check_magnitude_weight(magnitude_weight)
    if isinstance(search, Mapping):
        search = check_scores("bingo_scores", search, "search")
    elif not callable(getattr(search, "significance", None)):
        raise ConfigError(f"bingo_scores: search must be a TicketSearch or its significance {{key: tensor}}, got "
                          f"{type(search).__name__}")
    if isinstance(search, Mapping):
        significance = dict(search)
    else:
        significance = search.significance()
        if granularity is None:
            granularity = getattr(getattr(search, "config", None), "granularity", None)
    if magnitude_weight == 0.0:
        return significance
    if granularity is None:
        granularity = "neuron" if all(score.dim() == 1 for score in significance.values()) else "weight"
    check_choice("granularity", granularity, GRANULARITIES)
    magnitude = magnitude_scores(model, granularity, include=list(significance))
    return combine_ranks([significance, magnitude], [1.0 - magnitude_weight, magnitude_weight])
