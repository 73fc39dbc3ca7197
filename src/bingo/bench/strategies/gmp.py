"""Gradual magnitude pruning (GMP) during one training run from θ0.

Zhu & Gupta (2017): the weights are masked on the cubic schedule of
:func:`bingo.schedule.gmp_sparsity` by a :class:`~bingo.SparsityScheduler`
fed with ``|w|``. :class:`ScheduledStrategy` is that run with the score
source left open; ``bingo-gradual`` (:mod:`.gradual`) is the same run fed
with a ticket search's significance.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ...checks import check_field_types
from ...errors import ConfigError
from ...schedule import SparsityScheduler, gmp_sparsity
from ...scoring import magnitude_scores
from ...search import TicketSearch
from ...selection import check_sparsity
from .base import Experiment, Outcome, Strategy, register

__all__ = ["GmpConfig", "GmpStrategy", "ScheduleConfig", "ScheduledStrategy", "gmp_sparsity"]


@dataclass(frozen=True)
class ScheduleConfig:
    """The cubic schedule's settings, in fractions of the training run (shared by GMP and gradual BINGO)."""

    label: ClassVar[str] = "schedule"  #: the method's name in error messages

    initial_sparsity: float = field(default=0.0, metadata={"help": "sparsity s_i of the first mask update"})
    start_fraction: float = field(default=0.1, metadata={"help": "first mask update t0, as a fraction of all training steps"})
    end_fraction: float = field(default=0.7, metadata={"help": "last mask update t0 + nΔt, as a fraction of all training steps"})
    frequency: int = field(default=50, metadata={"help": "steps Δt between mask updates"})
    finetune_epochs: int = field(default=0, metadata={"help": "extra epochs at the final sparsity after the schedule (the one-shot methods' fine-tune budget)"})

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0.0 <= self.initial_sparsity < 1.0:
            raise ConfigError(f"{self.label} initial sparsity must be in [0, 1), got {self.initial_sparsity!r}")
        if not 0.0 <= self.start_fraction < self.end_fraction <= 1.0:
            raise ConfigError(
                f"{self.label} needs 0 <= start fraction < end fraction <= 1, "
                f"got start {self.start_fraction!r} and end {self.end_fraction!r}"
            )
        if int(self.frequency) != self.frequency or self.frequency < 1:
            raise ConfigError(f"{self.label} frequency must be a whole number of steps >= 1, got {self.frequency!r}")
        if int(self.finetune_epochs) != self.finetune_epochs or self.finetune_epochs < 0:
            raise ConfigError(f"finetune epochs must be a whole number >= 0, got {self.finetune_epochs!r}")

    def steps(self, total_steps: int) -> tuple[int, int]:
        """``(start_step, end_step)`` of a run of ``total_steps``: ``round(fraction · total_steps)`` each."""
        start_step = round(self.start_fraction * total_steps)
        return start_step, max(round(self.end_fraction * total_steps), start_step)


@dataclass(frozen=True)
class GmpConfig(ScheduleConfig):
    """Gradual magnitude pruning (Zhu & Gupta 2017)."""

    label: ClassVar[str] = "GMP"


class ScheduledStrategy(Strategy):
    """One training run from θ0 per target sparsity, pruned on the cubic schedule as it trains.

    The step numbers come from the experiment's recipe (``T`` = epochs ×
    batches per epoch; see :meth:`ScheduleConfig.steps`). A
    :class:`~bingo.SparsityScheduler` fed by :meth:`watch` prunes globally
    at every update step; masks only grow. The delivered network has exactly
    the target sparsity; its cost is that one training run, mask updates
    (and any search) included, plus ``finetune_epochs`` more epochs at the
    final masks when ``compare`` gives the one-shot methods a fine-tune
    budget (so every method gets as many epochs after its last mask change
    as the others). A subclass says only where the scores come from.
    """

    default_config: ClassVar[ScheduleConfig]

    @abstractmethod
    def watch(self, model: nn.Module, experiment: Experiment) -> tuple[Callable[[], dict[str, torch.Tensor]], TicketSearch | None]:
        """The score source for ``model``'s run (called at each update), and the search that trains alongside it (or None)."""

    def run(self, experiment: Experiment, sparsities: list[float]) -> Iterator[Outcome]:
        recipe = experiment.train_config
        total_steps = recipe.epochs * math.ceil(len(experiment.data.x_train) / recipe.batch_size)
        start_step, end_step = self.config.steps(total_steps)
        for target in sparsities:
            target = check_sparsity(target)
            if target < self.config.initial_sparsity:
                raise ConfigError(
                    f"{self.config.label} target sparsity {target:g} is below its initial sparsity {self.config.initial_sparsity:g}"
                )
            yield self._deliver(experiment, target, start_step, end_step)

    def _deliver(self, experiment: Experiment, target: float, start_step: int, end_step: int) -> Outcome:
        """Train one model from θ0, pruned on the schedule to ``target``; fine-tune if asked; charge it all."""
        config = self.config
        model = experiment.new_model()
        scores, search = self.watch(model, experiment)
        start = time.perf_counter()
        scheduler = SparsityScheduler(
            model, scores, target, initial_sparsity=config.initial_sparsity, start_step=start_step,
            end_step=end_step, frequency=config.frequency, scope="global", seed=experiment.seed,
            groups=experiment.coupled_groups() if getattr(config, "granularity", "weight") == "neuron" else None,
        )  # step 0: prunes at once if the schedule starts there
        seconds = time.perf_counter() - start
        trained = experiment.train(
            model, search=search, callback=lambda step: scheduler.step(), description=f"{self.name} to {target:g}"
        )
        seconds += trained.seconds
        start = time.perf_counter()
        masks = scheduler.finish()  # changes the masks only without training steps (epochs = 0)
        seconds += time.perf_counter() - start
        steps, forwards = trained.steps, trained.forward_passes
        if config.finetune_epochs:
            tuned = experiment.train(model, epochs=config.finetune_epochs, description=f"{self.name} fine-tune {target:g}")
            seconds, steps, forwards = seconds + tuned.seconds, steps + tuned.steps, forwards + tuned.forward_passes
        return Outcome(self.name, experiment.seed, target, experiment.evaluate(model), seconds, steps, forwards, masks, model)


@register
class GmpStrategy(ScheduledStrategy):
    """Gradual magnitude pruning: the weights ranked globally by ``|w|`` at every update.

    (The paper prunes each layer to ``s_t``; one global ranking keeps the
    sparsity exact and matches the other baselines.)
    """

    name = "gmp"
    default_config = GmpConfig()

    def watch(self, model: nn.Module, experiment: Experiment) -> tuple[Callable[[], dict[str, torch.Tensor]], None]:
        return (lambda: magnitude_scores(model)), None
