"""Reach a sparsity in several prune-and-refit steps, without any training between them.

A one-shot prune removes every weight at once, then :func:`bingo.compensate`
re-fits the survivors. Past the network's redundancy that single jump loses
what GMP's training between prunes recovers. :func:`prune_in_steps` walks
instead up the cubic schedule of Zhu & Gupta (:func:`bingo.gmp_sparsity`
with ``initial = 0`` over steps ``1 .. K``):

    s_k = s · (1 − (1 − k / K)³),   k = 1, ..., K     (s_K = s exactly),

and at each step scores the current model (a score that reads the weights,
such as the magnitude half of :func:`bingo.bingo_scores`, sees the re-fitted
ones), prunes to ``s_k`` with :func:`bingo.prune` (entries already pruned go
first, so masks only shrink) and re-fits the survivors with
:func:`bingo.compensate` to the *dense* network's layer outputs on the same
calibration inputs. With fixed scores the steps change nothing that matters
(the same ranking gives the same final masks); the gain, if any, comes from
re-scoring. It is still one training run: each step costs one compensation
(its calibration forwards and solves), no gradient step.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .compensation import Calibration, CompensationResult, check_compensate_arguments, compensate
from .errors import ConfigError
from .masks import current_masks, masked_names
from .pruning import prune
from .schedule import gmp_sparsity
from .selection import SCOPES, check_sparsity

__all__ = ["MultiStepResult", "prune_in_steps", "step_sparsities"]

Scores = Mapping[str, torch.Tensor]


def step_sparsities(sparsity: float, steps: int) -> tuple[float, ...]:
    """The ``steps`` sparsities ``s_1 < ... < s_K = sparsity`` of the cubic schedule (see the module docstring).

    ``step_sparsities(0.9, 1) == (0.9,)``; ``step_sparsities(0.9, 2) == (0.7875, 0.9)``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a whole number >= 1, got {steps!r}")
    target = check_sparsity(sparsity)
    return tuple(gmp_sparsity(k, target, 0.0, 0, steps, 1) for k in range(1, steps + 1))


@dataclass(frozen=True)
class MultiStepResult:
    """What :func:`prune_in_steps` did."""

    sparsities: tuple[float, ...]  #: the sparsity each step pruned to, the last being the target
    masks: dict[str, torch.Tensor]  #: the final keep-masks (True = kept), keyed like the scores
    compensations: tuple[CompensationResult, ...]  #: one per step, in order
    seconds: float  #: wall time of all steps (scoring, pruning and re-fits)

    @property
    def forward_passes(self) -> int:
        """Forward calls on calibration batches over all steps (each step's :attr:`CompensationResult.forward_passes`)."""
        return sum(c.forward_passes for c in self.compensations)

    @property
    def solve_flops(self) -> float:
        """Floating-point operations of every step's least-squares solves."""
        return sum(c.solve_flops for c in self.compensations)


def prune_in_steps(
    model: nn.Module,
    scores: Scores | Callable[[nn.Module], Scores],
    sparsity: float,
    calibration: Calibration,
    *,
    steps: int = 4,
    scope: str = "global",
    seed: int = 0,
    blocks: str | Callable[[str], str] | None = None,
    reference: nn.Module | None = None,
    solver: str = "auto",
    batchnorm: str = "keep",
    batch_size: int = 256,
) -> MultiStepResult:
    """Prune ``model`` in place to ``sparsity`` in ``steps`` prune-and-refit steps (no training between them).

    Step ``k`` computes the scores (``scores(model)`` when ``scores`` is a
    callable, on the model as the previous step left it: pruned and
    re-fitted; a dict is used as it is at every step), calls
    ``bingo.prune(model, scores, s_k, scope, seed=seed, blocks=blocks)``
    with ``s_k`` from :func:`step_sparsities`, then
    ``bingo.compensate(model, None, calibration, reference=reference,
    solver=solver, batchnorm=batchnorm, batch_size=batch_size)``. With
    ``steps=1`` that is exactly a one-shot prune followed by a compensation.

    Args:
        model: the trained dense network (no masks yet unless ``reference``
            is given); modified in place.
        scores: ``{key: tensor}`` as :func:`bingo.prune` takes them (higher
            = more significant), or ``model -> scores``, called before every
            step, e.g. ``lambda m: bingo.bingo_scores(significance, m)`` to
            re-rank the magnitude half on the re-fitted weights.
        sparsity: the final fraction of the scored entries pruned, in [0, 1)
            (N:M patterns are one-shot by nature: refused).
        calibration: compensation's inputs, the same at every step (see
            :func:`bingo.compensate`).
        steps: K >= 1.
        reference: the dense network whose layer outputs every re-fit aims at.
            Default: a copy of ``model`` taken before the first step (after a
            re-fit, ``weight_orig`` no longer holds the dense weights, so
            compensate's own default would aim at the previous step's).
            Required when ``model`` already carries masks.

    Returns:
        A :class:`MultiStepResult`: the step sparsities, the final masks, each
        step's :class:`~bingo.CompensationResult`, and the total cost.
    """
    if isinstance(sparsity, str):
        raise ConfigError(f"prune_in_steps takes a fraction, not the N:M pattern {sparsity!r}; N:M prunes in one step (bingo.prune)")
    schedule = step_sparsities(sparsity, steps)
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; valid choices: {', '.join(SCOPES)}")
    if not callable(scores) and not isinstance(scores, Mapping):
        raise ConfigError(f"scores must be a {{key: tensor}} dict or a function model -> scores, got {type(scores).__name__}")
    if reference is None:
        if any(masked_names(module) for module in model.modules()):
            raise ConfigError("prune_in_steps: the model is already pruned; pass reference= (the dense network the re-fits aim at)")
    # compensate's own checks, before the first prune: a bad solver or calibration must leave the model as it was
    check_compensate_arguments(model, calibration, reference=reference, solver=solver, batchnorm=batchnorm,
                               batch_size=batch_size)
    if reference is None:
        reference = copy.deepcopy(model)
    start = time.perf_counter()
    compensations = []
    step_scores: Scores = {}
    for target in schedule:
        step_scores = scores(model) if callable(scores) else scores
        prune(model, dict(step_scores), target, scope, seed=seed, blocks=blocks)
        compensations.append(compensate(model, None, calibration, reference=reference, solver=solver,
                                        batchnorm=batchnorm, batch_size=batch_size))
    masks = current_masks(model, step_scores)
    return MultiStepResult(schedule, masks, tuple(compensations), time.perf_counter() - start)
