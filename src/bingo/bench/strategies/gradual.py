"""Gradual BINGO: GMP's cubic schedule, ranked by a ticket search's significance.

For users who know the target sparsity before training. A
:class:`~bingo.TicketSearch` watches the one training run per target and,
at every update step of the :class:`~bingo.SparsityScheduler`, the weights
are ranked by its significance blended with magnitude, exactly as the
one-shot ``bingo`` ranks them (:func:`bingo.bingo_scores`). Everything
else is GMP's run (:class:`.gmp.ScheduledStrategy`), so the two stay
comparable: they differ only in the score source.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ...checks import check_field_types
from ...errors import ConfigError
from ...scoring import MAGNITUDE_WEIGHT, check_magnitude_weight
from ...search import BINGO_SEARCH, SearchConfig, TicketSearch
from .base import Experiment, register
from .gmp import ScheduleConfig, ScheduledStrategy
from .oneshot import BingoConfig

__all__ = ["GradualBingoConfig", "GradualBingoStrategy"]


@dataclass(frozen=True)
class GradualBingoConfig(ScheduleConfig):
    """Gradual BINGO: the cubic schedule's settings, the search's, and the magnitude blend (defaults: ``bingo``'s)."""

    label: ClassVar[str] = "bingo-gradual"

    search: SearchConfig = field(default=BINGO_SEARCH, metadata={"help": "ticket search settings"})
    magnitude_weight: float = field(default=MAGNITUDE_WEIGHT, metadata={"help": "weight of the magnitude rank in the score, in [0, 1]: 0 = the search's significance alone, 0.5 = equal rank blend"})

    def __post_init__(self) -> None:
        check_field_types(self)
        super().__post_init__()
        if not isinstance(self.search, SearchConfig):
            raise ConfigError(f"GradualBingoConfig.search must be a SearchConfig, got {type(self.search).__name__}")
        check_magnitude_weight(self.magnitude_weight)

    @property
    def scoring(self) -> BingoConfig:
        """The one-shot config whose :meth:`~BingoConfig.final_scores` ranks the weights at each update."""
        return BingoConfig(search=self.search, magnitude_weight=self.magnitude_weight)

    @property
    def granularity(self) -> str:
        """The search's granularity: what is scored is what is pruned."""
        return self.search.granularity


@register
class GradualBingoStrategy(ScheduledStrategy):
    """``bingo-gradual``: prune during the one run per target, by the search's significance blended with magnitude.

    The search keeps scoring weights after they are pruned; that does not
    matter, since :func:`bingo.prune` ranks pruned weights first, so masks
    only grow. Its steps, fake passes included, are charged to the run.
    """

    name = "bingo-gradual"
    default_config = GradualBingoConfig()

    def watch(self, model: nn.Module, experiment: Experiment) -> tuple[Callable[[], dict[str, torch.Tensor]], TicketSearch]:
        search = TicketSearch(model, config=dataclasses.replace(self.config.search, seed=experiment.seed))
        scoring = self.config.scoring
        return (lambda: scoring.final_scores(search, model)), search
