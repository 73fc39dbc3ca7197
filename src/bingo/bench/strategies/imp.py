"""Iterative magnitude pruning with rewinding: the Lottery Ticket procedure (IMP).

Frankle & Carbin, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable
Neural Networks" (ICLR 2019), iterative pruning: train; prune ``p`` of the
*surviving* weights by ``|w|``; reset the survivors to their initial values
θ0; retrain; repeat. After ``n`` rounds the sparsity is ``1 − (1 − p)^n``.
Rewinding to iteration ``k`` instead of θ0 is Frankle, Dziugaite, Roy &
Carbin, "Linear Mode Connectivity and the Lottery Ticket Hypothesis" (ICML 2020).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ...checks import check_field_types
from ...errors import ConfigError, check_choice
from ...layers import output_layer_name
from ...masks import current_masks
from ...pruning import prune
from ...scoring import magnitude_scores
from ...selection import check_sparsity, prune_count
from .base import Experiment, Outcome, Strategy, register, rewind

__all__ = ["ImpConfig", "ImpStrategy", "imp_schedule"]

# log((1 − s) / (1 − s0)) / log(1 − p) is a whole number of rounds up to rounding
# error (0.36 at p = 0.2 is 2.0000000000000004 rounds); this keeps it from costing a round.
_ROUND_SLACK = 1e-9


def _check_rate(rate: float) -> None:
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"IMP pruning rate must be in (0, 1) (fraction of surviving weights per round), got {rate!r}")


def _round_times(t_start: float, t_end: float) -> list[float]:
    """Positions on the trajectory after each round: whole rounds from ``t_start``, the last trimmed to ``t_end``."""
    n = math.ceil(t_end - t_start - _ROUND_SLACK)
    return [t_start + i for i in range(1, n)] + [t_end] if n > 0 else []


def imp_schedule(target: float, rate: float, start: float = 0.0) -> list[float]:
    """Cumulative sparsity after each IMP round, from sparsity ``start`` to ``target``.

    Each round prunes ``rate`` of the weights still alive, so after ``i``
    rounds the sparsity is ``1 − (1 − start)(1 − rate)^i``. The number of
    rounds is ``ceil(log((1 − target) / (1 − start)) / log(1 − rate))`` and
    the last round is trimmed to land on ``target`` exactly.

    Example: ``imp_schedule(0.5, 0.2)`` is ``[0.2, 0.36, 0.488, 0.5]`` (up to
    float rounding): the fourth round prunes to 0.5 instead of 0.5904.
    ``target == start`` needs no round: ``[]``.
    """
    target, start = check_sparsity(target), check_sparsity(start)
    _check_rate(rate)
    if target < start:
        raise ConfigError(f"IMP cannot go from sparsity {start:g} down to {target:g}; sparsities must ascend")
    decay = math.log1p(-rate)
    times = _round_times(math.log1p(-start) / decay, math.log1p(-target) / decay)
    return [1.0 - (1.0 - start) * (1.0 - rate) ** i for i in range(1, len(times))] + ([target] if times else [])


def _allocate(ideal: dict[str, float], total: int, lower: dict[str, int], upper: dict[str, int]) -> dict[str, int]:
    """Whole counts within ``[lower, upper]`` that sum to ``total``, each as near its ``ideal`` as the sum allows.

    Largest remainder: start from the floors, then give the missing units to
    the layers furthest below their ideal (or take the excess from those
    furthest above it).
    """
    counts = {key: min(max(math.floor(value), lower[key]), upper[key]) for key, value in ideal.items()}
    while sum(counts.values()) < total:
        key = max((k for k in counts if counts[k] < upper[k]), key=lambda k: ideal[k] - counts[k])
        counts[key] += 1
    while sum(counts.values()) > total:
        key = min((k for k in counts if counts[k] > lower[k]), key=lambda k: ideal[k] - counts[k])
        counts[key] -= 1
    return counts


def _layer_rounds(
    target: float, sizes: dict[str, int], rates: dict[str, float], t_start: float, pruned: dict[str, int]
) -> tuple[list[dict[str, int]], float]:
    """Per-layer pruned counts after each layer-wise round toward overall ``target``, and the end position.

    Layer ``l`` keeps ``(1 − r_l)^t`` of its weights at position ``t`` (``t``
    rounds done). The end position ``t*`` solves ``Σ n_l (1 − r_l)^t* = (1 −
    target) N`` (bisection); rounds run at ``t_start + 1, t_start + 2, ...`` and
    the last at ``t*``. Each round prunes the rounded ideal total,
    ``round(Σ n_l (1 − (1 − r_l)^t))``, shared out by :func:`_allocate`; the
    last prunes exactly ``round(target · N)``. Counts never fall (masks only
    shrink) and every layer keeps at least one weight.
    """
    total_size = sum(sizes.values())
    wanted = prune_count(target, total_size)
    if wanted > total_size - len(sizes):
        raise ConfigError(
            f"sparsity {target:g} with scope='layer' would empty a layer ({total_size} weights in {len(sizes)} layers); "
            "lower the sparsity or use scope='global'"
        )

    if wanted == sum(pruned.values()):
        return [], t_start

    def kept(t: float) -> float:
        return sum(n * (1.0 - rates[key]) ** t for key, n in sizes.items())

    low, high = t_start, t_start + 1.0
    while kept(high) > total_size - wanted:
        high = t_start + 2.0 * (high - t_start)
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (middle, high) if kept(middle) > total_size - wanted else (low, middle)
    t_end = high
    # Rounding of earlier rounds can leave the ideal trajectory a hair past the target; still prune once.
    times = _round_times(t_start, t_end) or [t_end]

    upper = {key: n - 1 for key, n in sizes.items()}
    rounds, lower = [], dict(pruned)
    for t in times:
        ideal = {key: n * (1.0 - (1.0 - rates[key]) ** t) for key, n in sizes.items()}
        round_total = min(max(round(sum(ideal.values())), sum(lower.values())), wanted)
        counts = _allocate(ideal, wanted if t == times[-1] else round_total, lower, upper)
        rounds.append(counts)
        lower = counts
    return rounds, t_end


@dataclass(frozen=True)
class ImpConfig:
    """Iterative magnitude pruning with rewinding (Lottery Ticket)."""

    rate: float = field(default=0.2, metadata={"help": "fraction of the surviving weights pruned per round"})
    rewind_step: int = field(default=0, metadata={"help": "training step the survivors are reset to (0 = θ0)"})
    scope: str = field(default="global", metadata={"help": "global (one magnitude ranking) or layer (per-layer rates)", "choices": ("global", "layer")})
    output_rate_factor: float = field(
        default=0.5, metadata={"help": "with scope=layer, the output layer is pruned at rate × this factor per round"}
    )

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_rate(self.rate)
        if int(self.rewind_step) != self.rewind_step or self.rewind_step < 0:
            raise ConfigError(f"rewind step must be a whole number >= 0, got {self.rewind_step!r}")
        check_choice("scope", self.scope, ("global", "layer"))  # IMP's rounds are one ranking or per-layer rates
        if not 0.0 < self.output_rate_factor <= 1.0:
            raise ConfigError(f"output rate factor must be in (0, 1], got {self.output_rate_factor!r}")


@register
class ImpStrategy(Strategy):
    """Lottery Ticket IMP: prune ``rate`` of the survivors by ``|w|``, rewind, retrain; repeat.

    Round 0 is the experiment's dense run. Each further round scores the
    current (masked, trained) weights by magnitude, prunes through
    :func:`bingo.prune` (already-pruned weights count first, so masks only
    shrink), resets every parameter to the rewind point (θ0, or the dense
    run's state at ``rewind_step``) with :func:`rewind`, keeping the masks,
    and retrains for the experiment's full epochs. With ``rewind_step = k``
    the retraining still runs the full recipe (``T`` steps, not ``T − k``),
    from a fresh optimizer.

    Several targets follow one trajectory: rounds toward ``s1`` (the last one
    trimmed to ``s1``, see :func:`imp_schedule`), the ``s1`` network is
    delivered, and rounds continue from ``s1`` toward ``s2`` with the same
    rule. Each outcome's cost is cumulative: the dense run plus every round
    so far (scoring, pruning, rewinding and retraining; evaluation is not
    charged). The ``s2`` network therefore depends on ``s1`` being asked for
    too (:attr:`one_trajectory`): a resumed comparison asks for both again.

    ``scope="global"`` ranks all weights together and prunes ``rate`` of the
    survivors overall. ``scope="layer"`` is the paper's LeNet recipe: every
    layer loses ``rate`` of its survivors per round, the output layer (last
    scored) ``rate × output_rate_factor``; the last round's per-layer counts
    are allocated so that the overall sparsity is still exactly the target.
    """

    name = "imp"
    default_config = ImpConfig()
    one_trajectory = True

    def run(self, experiment: Experiment, sparsities: list[float]) -> Iterator[Outcome]:
        config = self.config
        if config.rewind_step:
            dense = experiment.dense(snapshot_steps=(config.rewind_step,))
            rewind_state = dense.snapshots[config.rewind_step]
        else:
            dense = experiment.dense()
            rewind_state = experiment.initial_state()
        model = copy.deepcopy(dense.model)
        seconds, steps, forwards = dense.cost.seconds, dense.cost.steps, dense.cost.forward_passes

        sizes = {key: scores.numel() for key, scores in magnitude_scores(model).items()}
        output = output_layer_name(model)
        rates = {key: config.rate * (config.output_rate_factor if key == output else 1.0) for key in sizes}
        reached, position, pruned = 0.0, 0.0, dict.fromkeys(sizes, 0)

        for target in sparsities:
            if config.scope == "global":
                rounds = imp_schedule(target, config.rate, start=reached)
            else:
                rounds, position = _layer_rounds(check_sparsity(target), sizes, rates, position, pruned)
            for i, round_target in enumerate(rounds, start=1):
                start = time.perf_counter()
                scores = magnitude_scores(model)
                if config.scope == "global":
                    prune(model, scores, round_target, "global", seed=experiment.seed)
                else:
                    for key, count in round_target.items():
                        if count > pruned[key]:
                            prune(model, {key: scores[key]}, count / sizes[key], "layer", seed=experiment.seed)
                    pruned = round_target
                rewind(model, rewind_state)
                seconds += time.perf_counter() - start
                retrained = experiment.train(model, description=f"imp round {i}/{len(rounds)} toward {target:g}")
                seconds += retrained.seconds
                steps += retrained.steps
                forwards += retrained.forward_passes
            reached = target
            masks = current_masks(model, magnitude_scores(model))
            # a copy: the next target prunes this model further (``bingo run --save/--export`` take the last one)
            yield Outcome(self.name, experiment.seed, target, experiment.evaluate(model), seconds, steps, forwards, masks,
                          model=copy.deepcopy(model))
