"""The one-shot prune: scores in, masks on the model, to a sparsity or to an accuracy floor.

Selection (:mod:`bingo.selection`) decides which entries go from the scores;
:mod:`bingo.masks` puts the masks on. What is here ties the two together:
:func:`prune` to a target sparsity, :func:`prune_to_accuracy` as far as a
held-out accuracy allows (the paper's rule), by one bisection whether the
units are single weights, whole units or tied channel groups.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .checks import check_judgement, check_model, check_scores
from .coupled import prune_coupled
from .errors import ConfigError, check_choice
from .layers import unit_axis
from .masks import apply_masks, check_units_left, current_masks, is_unit_mask, weight_owner
from .selection import SCOPES, n_m_groups, parse_sparsity, ranking_values, select_masks, select_n_m

__all__ = ["AccuracyFloorResult", "largest_passing", "prune", "prune_to_accuracy"]


def _effective_scores(model: nn.Module, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Entries already pruned go first, so masks only ever shrink and the
    # sparsity target counts them.
    existing = current_masks(model, scores)
    return {
        key: torch.where(existing[key], ranking_values(s, scores.values()), torch.tensor(-math.inf))
        for key, s in scores.items()
    }


def _already_pruned(model: nn.Module, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries the model's masks prune already (True = pruned): a ``-inf`` score is not one of them."""
    return {key: ~mask.bool().cpu() for key, mask in current_masks(model, scores).items()}


def prune(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    sparsity: float | str,
    scope: str = "global",
    *,
    seed: int = 0,
    blocks: str | Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` one-shot: remove the ``sparsity`` least significant entries.

    Args:
        model: the trained model; modified in place (masks attached).
        scores: ``{"fc1.weight": tensor}``, higher = more significant, shaped
            like the weight (weight granularity) or ``(out_units,)`` (neuron).
        sparsity: fraction of the scored entries to prune, in [0, 1); exact
            to the entry (``round(sparsity * n)``). Or an N:M pattern,
            ``"2:4"``, ``"4:8"``, ``"1:4"``: at most N of every M consecutive
            input weights of a unit are kept, the ``M - N`` least significant
            of each group pruned (NVIDIA's and PyTorch's convention:
            ``torch.sparse.to_sparse_semi_structured`` takes 2:4; see
            :func:`bingo.selection.select_n_m`). A group runs along the
            fan-in of one row of the weight's unit matrix (a Linear's row,
            a ``Conv1D``'s column, a conv filter's flattened ``C·kh·kw``).
            N:M needs one score per weight, and every fan-in a multiple of M.
        scope: ``"global"`` (one ranking over all scored entries, each layer
            keeping a floor: :data:`bingo.selection.MIN_KEEP`), ``"layer"``, or
            ``"lamp"`` (one ranking by layer-normalised LAMP scores), or
            ``"block"`` (each block, e.g. a transformer's ``h.0.``, pruned to
            ``sparsity`` with one ranking inside it); see
            :func:`bingo.selection.select_masks`. An N:M pattern ignores
            it (and ``blocks``): it gives every group, layer and block the
            same sparsity, so every scope's budget holds.
        seed: tie-breaking seed (see :mod:`bingo.selection`).
        blocks: with ``scope="block"``, what a block is: a regex or ``key ->
            block name`` (default: the path up to the first numeric index;
            :func:`bingo.selection.block_of`).

    Returns:
        The keep-masks the model has now, keyed and shaped like ``scores``
        (True = kept). Masks only shrink: on a model already pruned beyond
        ``sparsity`` nothing more is removed, the masks returned are the
        model's (sparser than asked), and a warning says so. With N:M, a
        group already pruned beyond ``M - N`` stays so, and a warning says
        how many groups are.
    """
    check_model("prune", model)
    scores = check_scores("prune", scores)
    check_choice("scope", scope, SCOPES)
    target = parse_sparsity(sparsity)
    if isinstance(target, tuple):
        return _prune_n_m(model, scores, *target, seed=seed)
    sparsity = target
    masks = select_masks(_effective_scores(model, scores), sparsity, scope, seed, blocks=blocks,
                         pruned=_already_pruned(model, scores))
    check_units_left(masks, model)
    emptied = [key for key, mask in masks.items() if mask.numel() and not mask.any()]
    if emptied:  # the floors (MIN_KEEP) give way when the budget cannot cover them all; say what that costs
        warnings.warn(f"sparsity {sparsity:g} leaves no weight in {', '.join(repr(k) for k in emptied)}: such a layer "
                      "outputs only its bias, whatever its input; lower the sparsity or use scope='layer'", stacklevel=2)
    apply_masks(model, masks)
    applied = current_masks(model, scores)
    pruned = sum(int((~m).sum()) for m in applied.values())
    total = sum(m.numel() for m in applied.values())
    if total and pruned > sum(int((~m.bool()).sum()) for m in masks.values()):
        warnings.warn(
            f"the model already had {pruned / total:.4g} of these entries pruned, more than the requested "
            f"{sparsity:g}; masks only shrink, so it stays at {pruned / total:.4g}",
            stacklevel=2,
        )
    return applied


def _prune_n_m(model: nn.Module, scores: dict[str, torch.Tensor], n: int, m: int, *, seed: int) -> dict[str, torch.Tensor]:
    """:func:`prune` to the pattern N:M: :func:`bingo.selection.select_n_m` on each weight's unit matrix."""
    axes = {}
    for key, values in scores.items():
        module = weight_owner(model, key)
        if is_unit_mask(module, values, key):
            raise ConfigError(f"N:M sparsity prunes single weights; the scores of {key!r} are per unit (neuron granularity, "
                              f"shape {tuple(values.shape)}): score per weight")
        axes[key] = unit_axis(module, key)
    effective = _effective_scores(model, scores)
    already = _already_pruned(model, scores)
    masks = select_n_m(effective, n, m, seed, axes=axes, pruned=already)
    apply_masks(model, masks)
    over = sum(int((n_m_groups(already[key], m, axes[key]).sum(-1) > m - n).sum()) for key in effective)
    if over:
        warnings.warn(
            f"{over} groups of {m} were already pruned beyond {n}:{m} (more than {m - n} of {m} pruned); "
            "masks only shrink, so they stay sparser",
            stacklevel=3,
        )
    return current_masks(model, scores)


@dataclass(frozen=True)
class AccuracyFloorResult:
    """Outcome of :func:`prune_to_accuracy`."""

    masks: dict[str, torch.Tensor]
    sparsity: float  #: fraction of scored entries pruned
    accuracy: float  #: evaluate() of the pruned model
    floor: float  #: the accuracy that had to be kept
    dense_accuracy: float
    evaluations: int  #: how many times evaluate() ran


def prune_to_accuracy(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    *,
    min_accuracy: float | None = None,
    max_drop: float | None = None,
    scope: str = "global",
    seed: int = 0,
    groups: list | None = None,
) -> AccuracyFloorResult:
    """Prune as far as possible while ``evaluate(model) >= floor`` (the paper's rule).

    With ``groups`` (:func:`bingo.channel_groups`; neuron scores), every
    probe prunes tied channels together with :func:`bingo.prune_coupled`,
    and the sparsity is the fraction of the groups' channels.

    The floor is ``min_accuracy`` (absolute) or ``dense - max_drop`` (relative to
    the unpruned model); give exactly one. Entries are removed in score order
    (least significant first); the largest count that keeps the floor is found
    by bisection, about ``log2(n)`` evaluations instead of one per weight. This
    assumes accuracy falls monotonically along the score order, which holds
    closely but not exactly; the returned accuracy is always measured, never
    interpolated. Use a held-out (validation) set in ``evaluate``, not the test set.
    """
    check_model("prune_to_accuracy", model)
    scores = check_scores("prune_to_accuracy", scores)
    if not callable(evaluate):
        raise ConfigError(f"prune_to_accuracy: evaluate must be a function model -> accuracy, got {type(evaluate).__name__}")
    if (min_accuracy is None) == (max_drop is None):
        raise ConfigError("give exactly one of min_accuracy (absolute floor) or max_drop (drop from dense)")
    for name, value in (("min_accuracy", min_accuracy), ("max_drop", max_drop)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise ConfigError(f"{name} must be an accuracy in [0, 1], got {value!r}")
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be an accuracy in [0, 1], got {value!r}")
    check_choice("scope", scope, SCOPES)
    dense = check_judgement("prune_to_accuracy", evaluate(model), "for the unpruned model")
    if not 0.0 <= dense <= 1.0:  # a percentage (85.0) would clear a floor of 0.9 at any sparsity
        raise ConfigError(f"prune_to_accuracy: evaluate(model) returned {dense:g} for the unpruned model; the floor is "
                          "an accuracy in [0, 1], so evaluate must return one (a percentage divided by 100)")
    floor = float(min_accuracy) if min_accuracy is not None else dense - float(max_drop)
    evaluations = 1

    def accuracy_at(j: int) -> float:
        nonlocal evaluations
        trial = copy.deepcopy(model)
        try:
            prune_at(trial, j)
        except ConfigError:
            return -math.inf  # a layer or group left with no units: never allowed, whatever the floor
        evaluations += 1
        value = evaluate(trial)
        try:
            if math.isnan(float(value)) or math.isinf(float(value)):
                return -math.inf  # an over-pruned trial whose metric overflowed: below any floor, not an error
        except (TypeError, ValueError):
            pass  # not a number: check_judgement says so
        return check_judgement("prune_to_accuracy", value, f"at {j} pruned")

    if groups:
        sizes = [group.channels for group in groups if any(key in scores for key in group.members)]
        if not sizes:
            raise ConfigError("none of the coupled channel groups has scores: pass neuron-granularity scores of their layers")
        steps, start = (max(sizes) if scope == "layer" else sum(sizes)), 0

        def prune_at(net: nn.Module, j: int) -> dict[str, torch.Tensor]:
            return prune_coupled(net, scores, groups, j / steps, scope, seed=seed)
    else:
        effective = _effective_scores(model, scores)
        already_pruned = _already_pruned(model, scores)
        # Step j is sparsity j / steps. In the global scopes (global, lamp) steps is the number of
        # entries, so select_masks prunes round(j / steps * steps) = j of them; per layer it prunes
        # round(j / steps * n_l) of each layer's n_l.
        if scope == "layer":
            steps = max(s.numel() for s in effective.values())
        else:
            steps = sum(s.numel() for s in effective.values())
        already = int(sum((~m).sum() for m in current_masks(model, scores).values()))
        start = 0 if scope in ("layer", "block") else already  # per layer or block: from nothing pruned

        def prune_at(net: nn.Module, j: int) -> dict[str, torch.Tensor]:
            masks = select_masks(effective, j / steps, scope, seed, pruned=already_pruned)
            check_units_left(masks, net)
            apply_masks(net, masks)
            return masks

    # pruning everything (j = steps) is never allowed: treated as failing
    j, accuracy = largest_passing(start, steps, accuracy_at, floor, dense)
    masks = prune_at(model, j)
    if groups:
        sparsity = sum(int((~masks[group.key]).sum()) for group in groups if group.key in masks) / sum(sizes)
    else:
        sparsity = int(sum((~m).sum() for m in masks.values())) / sum(m.numel() for m in masks.values())
    return AccuracyFloorResult(masks, sparsity, accuracy, floor, dense, evaluations)


def largest_passing(low: int, high: int, value_at: Callable[[int], float], floor: float, low_value: float) -> tuple[int, float]:
    """The largest ``j`` in ``[low, high)`` with ``value_at(j) >= floor``, and its value, by bisection.

    ``low`` is taken to pass (with ``low_value``) and ``high`` to fail; about
    ``log2(high - low)`` calls. Exact when the value falls monotonically in
    ``j``; otherwise some passing ``j``, whose value is measured, never interpolated.
    """
    while high - low > 1:
        middle = (low + high) // 2
        value = value_at(middle)
        if value >= floor:
            low, low_value = middle, value
        else:
            high = middle
    return low, low_value
