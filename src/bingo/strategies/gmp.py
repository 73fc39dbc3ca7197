"""Gradual magnitude pruning (GMP) during one training run from θ0.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning
for model compression" (2017), eq. (1): every ``Δt`` steps from ``t0`` the
smallest-magnitude weights are masked until the sparsity reaches

    s_t = s_f + (s_i − s_f) (1 − (t − t0) / (n Δt))³,   t ∈ {t0, t0 + Δt, ..., t0 + n Δt},

pruning fast while there are many redundant weights and slowly near the
end; training continues at ``s_f`` after ``t0 + n Δt`` so the network recovers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..pruning import current_masks, prune
from ..scoring import magnitude_scores
from ..selection import check_sparsity, prune_count
from .base import Experiment, Outcome, Strategy, register

__all__ = ["GmpConfig", "GmpStrategy", "gmp_sparsity"]


def gmp_sparsity(step: int, final: float, initial: float, start_step: int, end_step: int, frequency: int) -> float:
    """The sparsity ``s_t`` the masks are set to at training step ``step`` (Zhu & Gupta 2017, eq. 1).

    ``s_t = final + (initial − final)(1 − (t − start_step) / (end_step − start_step))³``
    where ``t`` is the latest update step at or before ``step``: updates
    happen at ``start_step + k · frequency`` and at ``end_step`` itself, so
    the value holds between updates. It is ``initial`` up to ``start_step``
    and exactly ``final`` from ``end_step`` on, also when ``end_step −
    start_step`` is not a multiple of ``frequency`` (the paper's ``n Δt``).
    """
    if not 0 <= start_step <= end_step:
        raise ConfigError(f"GMP needs 0 <= start step <= end step, got {start_step} and {end_step}")
    if int(frequency) != frequency or frequency < 1:
        raise ConfigError(f"GMP frequency must be a whole number of steps >= 1, got {frequency!r}")
    if step >= end_step:
        return final
    last_update = start_step + max(step - start_step, 0) // frequency * frequency
    if last_update == start_step:
        return initial
    return final + (initial - final) * (1.0 - (last_update - start_step) / (end_step - start_step)) ** 3


def _is_update(step: int, start_step: int, end_step: int, frequency: int) -> bool:
    return start_step <= step <= end_step and ((step - start_step) % frequency == 0 or step == end_step)


@dataclass(frozen=True)
class GmpConfig:
    """Gradual magnitude pruning (Zhu & Gupta 2017)."""

    initial_sparsity: float = field(default=0.0, metadata={"help": "sparsity s_i of the first mask update"})
    start_fraction: float = field(default=0.1, metadata={"help": "first mask update t0, as a fraction of all training steps"})
    end_fraction: float = field(default=0.7, metadata={"help": "last mask update t0 + nΔt, as a fraction of all training steps"})
    frequency: int = field(default=50, metadata={"help": "steps Δt between mask updates"})
    finetune_epochs: int = field(default=0, metadata={"help": "extra epochs at the final sparsity after the schedule (the one-shot methods' fine-tune budget)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.initial_sparsity < 1.0:
            raise ConfigError(f"GMP initial sparsity must be in [0, 1), got {self.initial_sparsity!r}")
        if not 0.0 <= self.start_fraction < self.end_fraction <= 1.0:
            raise ConfigError(
                "GMP needs 0 <= start fraction < end fraction <= 1, "
                f"got start {self.start_fraction!r} and end {self.end_fraction!r}"
            )
        if int(self.frequency) != self.frequency or self.frequency < 1:
            raise ConfigError(f"GMP frequency must be a whole number of steps >= 1, got {self.frequency!r}")
        if int(self.finetune_epochs) != self.finetune_epochs or self.finetune_epochs < 0:
            raise ConfigError(f"finetune epochs must be a whole number >= 0, got {self.finetune_epochs!r}")


@register
class GmpStrategy(Strategy):
    """Gradual magnitude pruning: one training run from θ0 per target sparsity.

    The step numbers come from the experiment's recipe (``T`` = epochs ×
    batches per epoch): ``t0 = round(start_fraction · T)``, ``end =
    round(end_fraction · T)``. At every update step (see
    :func:`gmp_sparsity`) the weights are ranked globally by ``|w|`` and
    pruned through :func:`bingo.prune` to ``s_t``; already-pruned weights
    count first, so masks only grow. (The paper prunes each layer to ``s_t``;
    one global ranking keeps the sparsity exact and matches the other
    baselines.) The delivered network has exactly the target sparsity; its
    cost is that one training run, mask updates included, plus
    ``finetune_epochs`` more epochs at the final masks when ``compare`` gives
    the one-shot methods a fine-tune budget (so every method gets as many
    epochs after its last mask change as the others).
    """

    name = "gmp"
    default_config = GmpConfig()

    def run(self, experiment: Experiment, sparsities: list[float]) -> Iterator[Outcome]:
        config = self.config
        recipe = experiment.train_config
        total_steps = recipe.epochs * math.ceil(len(experiment.data.x_train) / recipe.batch_size)
        start_step = round(config.start_fraction * total_steps)
        end_step = max(round(config.end_fraction * total_steps), start_step)
        for target in sparsities:
            target = check_sparsity(target)
            if target < config.initial_sparsity:
                raise ConfigError(f"GMP target sparsity {target:g} is below its initial sparsity {config.initial_sparsity:g}")
            model = experiment.new_model()

            def update(step: int) -> None:
                if _is_update(step, start_step, end_step, config.frequency):
                    sparsity = gmp_sparsity(step, target, config.initial_sparsity, start_step, end_step, config.frequency)
                    prune(model, magnitude_scores(model), sparsity, "global", seed=experiment.seed)

            start = time.perf_counter()
            update(0)
            seconds = time.perf_counter() - start
            trained = experiment.train(model, callback=update, description=f"gmp to {target:g}")
            seconds += trained.seconds
            scores = magnitude_scores(model)
            masks = current_masks(model, scores)
            if sum(int((~mask).sum()) for mask in masks.values()) != prune_count(target, sum(s.numel() for s in scores.values())):
                # Only without training steps (epochs = 0) does the schedule not reach its end.
                start = time.perf_counter()
                masks = prune(model, scores, target, "global", seed=experiment.seed)
                seconds += time.perf_counter() - start
            steps, forwards = trained.steps, trained.forward_passes
            if config.finetune_epochs:
                tuned = experiment.train(model, epochs=config.finetune_epochs, description=f"gmp fine-tune {target:g}")
                seconds, steps, forwards = seconds + tuned.seconds, steps + tuned.steps, forwards + tuned.forward_passes
            yield Outcome(self.name, experiment.seed, target, experiment.evaluate(model), seconds, steps, forwards, masks)
