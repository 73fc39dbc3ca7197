"""The magnitude blend weight chosen per sparsity on held-out data, rather than fixed.

:func:`bingo.bingo_scores` ranks by ``combine_ranks([significance,
magnitude], [1 - m, m])``. Which ``m`` prunes best depends on the network
and the sparsity: over five tasks (``benchmarks/blend_weight.py``) the best
fixed ``m`` was 0.5 on some and 0.75 or 1 (magnitude alone) on others, and
the equal blend fell up to 2 points below compensated magnitude on one.
:func:`choose_magnitude_weight` tries each ``m`` of ``weights``: it prunes a
copy of the model by the blended score, hands it to the caller's ``judge``
(compensate it and measure validation accuracy, say) and keeps the best,
ties going to the larger ``m``. Chosen so on validation data, the same
benchmark was at least compensated magnitude in 15 of 15 cases. The cost is
``len(weights)`` prunes and judgements instead of one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .checks import check_model, check_scores, describe
from .errors import ConfigError, check_choice
from .pruning import prune
from .scoring import bingo_scores, check_magnitude_weight
from .selection import SCOPES

__all__ = ["BLEND_WEIGHTS", "BlendChoice", "choose_magnitude_weight"]

#: the magnitude weights :func:`choose_magnitude_weight` tries by default: significance alone to magnitude alone
BLEND_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class BlendChoice:
    """What :func:`choose_magnitude_weight` chose, and what every weight it tried was judged."""

    magnitude_weight: float  #: the chosen weight
    model: nn.Module  #: the pruned copy of the chosen weight, as the judge left it (e.g. compensated)
    masks: dict[str, torch.Tensor]  #: its keep-masks (True = kept)
    judged: dict[float, float]  #: every tried weight's judgement (higher = better)


def choose_magnitude_weight(
    model: nn.Module,
    significance: Mapping[str, torch.Tensor],
    sparsity: float | str,
    judge: Callable[[nn.Module], float],
    *,
    weights: tuple[float, ...] = BLEND_WEIGHTS,
    scope: str = "global",
    seed: int = 0,
    granularity: str | None = None,
    prune_with: Callable[[nn.Module, Callable[[nn.Module], dict[str, torch.Tensor]]], Mapping[str, torch.Tensor]] | None = None,
) -> BlendChoice:
    """Prune a copy of ``model`` at each magnitude weight in ``weights``; keep the one ``judge`` rates highest.

    ``significance`` is a search's (``search.significance()``), blended with
    ``model``'s magnitude by :func:`bingo.bingo_scores` at each weight;
    ``sparsity``, ``scope`` and ``seed`` are :func:`bingo.prune`'s.
    ``judge(candidate) -> float`` (higher = better) receives the pruned copy
    and may change it (compensate it, fine-tune it) before measuring; use
    held-out data, not the test set. Ties (and NaN judgements, which never
    win) go to the larger weight, the one closer to plain magnitude. ``model``
    itself is not changed.

    ``prune_with(candidate, scores) -> masks`` says how a candidate is pruned,
    given the copy and its blended score as a function of the weights
    (``scores(model) -> {key: tensor}``, so a prune that re-fits between steps
    can re-score); default: ``bingo.prune(candidate, scores(candidate),
    sparsity, scope, seed=seed)``, one shot. For a multi-step prune,
    ``lambda m, s: prune_in_steps(m, s, sparsity, calibration, steps=4).masks``
    (it re-fits as it goes, so the judge only measures).
    """
    check_model("choose_magnitude_weight", model)
    significance = check_scores("choose_magnitude_weight", dict(significance))
    if not callable(judge):
        raise ConfigError(f"choose_magnitude_weight: judge must be a function model -> number (higher = better), got {type(judge).__name__}")
    if prune_with is not None and not callable(prune_with):
        raise ConfigError(f"choose_magnitude_weight: prune_with must be a function (model, scores) -> masks, got {type(prune_with).__name__}")
    if not isinstance(weights, (tuple, list)) or not weights:
        raise ConfigError(f"choose_magnitude_weight: weights must be a non-empty tuple of magnitude weights in [0, 1], got {weights!r}")
    tried = sorted({check_magnitude_weight(w) for w in weights}, reverse=True)  # the larger first: ties stay with it
    check_choice("scope", scope, SCOPES)
    best: tuple[float, float, nn.Module, dict] | None = None
    judged: dict[float, float] = {}
    for weight in tried:
        candidate = copy.deepcopy(model)

        def scores(pruned: nn.Module, weight: float = weight) -> dict[str, torch.Tensor]:
            return bingo_scores(significance, pruned, weight, granularity=granularity)

        if prune_with is None:
            masks = prune(candidate, scores(candidate), sparsity, scope, seed=seed)
        else:
            masks = dict(prune_with(candidate, scores))
        value = judge(candidate)
        try:
            value = float(value)  # NaN never wins, below
        except (TypeError, ValueError):
            raise ConfigError(f"choose_magnitude_weight: judge(candidate) must return a number (higher = better), "
                              f"got {describe(value)}") from None
        judged[weight] = value
        if best is None or (not math.isnan(value) and (math.isnan(best[1]) or value > best[1])):
            best = (weight, value, candidate, masks)
    weight, _, chosen, masks = best
    return BlendChoice(weight, chosen, masks, dict(sorted(judged.items())))
