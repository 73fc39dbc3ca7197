"""Prune once after dense training: BINGO, one-shot magnitude, random.

All three train dense from θ0, score the trained weights, prune one-shot to
each sparsity and optionally fine-tune the pruned network
(``finetune_epochs``, charged to the method's cost).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..pruning import prune
from ..scoring import combine_ranks, magnitude_scores, random_scores
from ..search import ESTIMATORS, GRANULARITIES, METRICS, MODES, RULES, SearchConfig, TicketSearch
from ..selection import SCOPES
from ..errors import ConfigError, check_choice
from .base import DenseRun, Experiment, Outcome, Strategy, register

__all__ = ["BingoConfig", "BingoPaperConfig", "BingoPaperStrategy", "BingoStrategy", "MagnitudeStrategy", "OneShotConfig", "RandomStrategy"]


def _check_oneshot(finetune_epochs: int, scope: str, granularity: str) -> None:
    if int(finetune_epochs) != finetune_epochs or finetune_epochs < 0:
        raise ConfigError(f"finetune epochs must be a whole number >= 0, got {finetune_epochs!r}")
    check_choice("scope", scope, SCOPES)
    check_choice("granularity", granularity, GRANULARITIES)


@dataclass(frozen=True)
class OneShotConfig:
    """Settings shared by the prune-once-after-training methods."""

    finetune_epochs: int = field(default=0, metadata={"help": "epochs of masked fine-tuning after the prune (charged to the method)"})
    scope: str = field(default="global", metadata={"help": "global or layer"})
    granularity: str = field(default="weight", metadata={"help": "weight, or neuron (sparsity = fraction of hidden units; magnitude = L2 norm of a unit's weights)"})

    def __post_init__(self) -> None:
        _check_oneshot(self.finetune_epochs, self.scope, self.granularity)


class OneShotStrategy(Strategy):
    """Dense training, scores, one-shot prune per sparsity, optional fine-tune."""

    Config = OneShotConfig

    def trained(self, experiment: Experiment) -> tuple[DenseRun, dict[str, torch.Tensor]]:
        """The dense run this method starts from, and its scores."""
        raise NotImplementedError

    def run(self, experiment: Experiment, sparsities: list[float]) -> Iterator[Outcome]:
        dense, scores = self.trained(experiment)
        for sparsity in sparsities:
            model = copy.deepcopy(dense.model)
            start = time.perf_counter()
            masks = prune(model, scores, sparsity, self.config.scope, seed=experiment.seed)
            seconds = dense.cost.seconds + time.perf_counter() - start
            steps, forwards = dense.cost.steps, dense.cost.forward_passes
            if self.config.finetune_epochs:
                tuned = experiment.train(
                    model, epochs=self.config.finetune_epochs, description=f"{self.name} fine-tune {sparsity:g}"
                )
                seconds += tuned.seconds
                steps += tuned.steps
                forwards += tuned.forward_passes
            yield Outcome(self.name, experiment.seed, sparsity, experiment.evaluate(model), seconds, steps, forwards, masks)


@dataclass(frozen=True)
class BingoConfig:
    """BINGO in ``compare``, the best variant measured (BENCHMARKS.md, ablation).

    The search runs during the one dense training run; the prune is one-shot
    after it. Default: the hybrid estimator. Every weight gets the Taylor
    estimate of the loss change of zeroing it, from the gradients training
    computes anyway; real fake passes (1% of a layer zeroed, every 10th step)
    measure the actual loss change and calibrate each layer's scale, so the
    global ranking compares layers by measured damage.
    """

    estimator: str = field(default="hybrid", metadata={"help": f"{'|'.join(ESTIMATORS)}"})
    mode: str = field(default="zero", metadata={"help": f"{'|'.join(MODES)}"})
    decay: float = field(default=0.99, metadata={"help": "taylor/hybrid: running-average weight of the past (1 = mean over all steps)"})
    fraction: float = field(default=0.01, metadata={"help": "fraction of each layer reset per fake pass"})
    metric: str = field(default="loss", metadata={"help": f"fake-pass metric: {'|'.join(METRICS)}"})
    rule: str = field(default="contrast", metadata={"help": f"probe: {'|'.join(RULES)}"})
    every: int = field(default=10, metadata={"help": "fake passes on every k-th step"})
    target: float = field(default=0.0, metadata={"help": "targeted ticket searching: concentrate fake passes where the decision at this sparsity is uncertain (0 = uniform)"})
    band: float = field(default=0.1, metadata={"help": "targeted: rank band either side of the threshold kept in focus"})
    batched: bool = field(default=False, metadata={"help": "one vmap-ed forward for all of a step's fake passes"})
    magnitude_weight: float = field(default=0.5, metadata={"help": "weight of the magnitude rank in the final score, in [0, 1]: 0 = the search's significance alone, 0.5 = equal rank blend"})
    finetune_epochs: int = field(default=0, metadata={"help": "epochs of masked fine-tuning after the prune (charged to the method)"})
    scope: str = field(default="global", metadata={"help": "global or layer"})
    granularity: str = field(default="weight", metadata={"help": "weight, or neuron (sparsity = fraction of hidden units)"})

    def __post_init__(self) -> None:
        self.search_config(0)  # validates the search fields
        _check_oneshot(self.finetune_epochs, self.scope, self.granularity)
        if not 0.0 <= self.magnitude_weight <= 1.0:
            raise ConfigError(f"magnitude weight must be in [0, 1], got {self.magnitude_weight!r}")

    def final_scores(self, search: TicketSearch, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The scores the one-shot prune ranks by, after training.

        ``search.significance()`` alone when ``magnitude_weight`` is 0;
        otherwise its global rank blended with the rank of the trained
        weights' magnitude (L2 norm per unit for neurons) by
        :func:`bingo.scoring.combine_ranks`, weights ``1 − m`` and ``m``.
        """
        significance = search.significance()
        if self.magnitude_weight == 0.0:
            return significance
        # Per weight first, for exactly the searched layers (a neuron search leaves the output layer out).
        magnitude = magnitude_scores(model, "weight", include=list(significance))
        if self.granularity == "neuron":
            magnitude = {k: w.reshape(w.shape[0], -1).norm(dim=1) for k, w in magnitude.items()}
        return combine_ranks([significance, magnitude], [1.0 - self.magnitude_weight, self.magnitude_weight])

    def search_config(self, seed: int) -> SearchConfig:
        return SearchConfig(
            fraction=self.fraction, mode=self.mode, metric=self.metric, rule=self.rule,
            estimator=self.estimator, every=self.every, decay=self.decay, target=self.target, band=self.band, batched=self.batched, granularity=self.granularity, seed=seed,
        )


@dataclass(frozen=True)
class BingoPaperConfig(BingoConfig):
    """BINGO as the paper describes it: 1% reset-to-θ0 probes scored by accuracy change."""

    estimator: str = field(default="probe", metadata={"help": f"{'|'.join(ESTIMATORS)}"})
    mode: str = field(default="reset", metadata={"help": f"{'|'.join(MODES)}"})
    metric: str = field(default="accuracy", metadata={"help": f"probe: {'|'.join(METRICS)}"})
    rule: str = field(default="mean", metadata={"help": f"probe: {'|'.join(RULES)}"})
    every: int = field(default=1, metadata={"help": "fake passes on every k-th step"})
    magnitude_weight: float = field(default=0.0, metadata={"help": "weight of the magnitude rank in the final score, in [0, 1]: 0 = the search's significance alone"})


@register
class BingoStrategy(OneShotStrategy):
    """BINGO: significance from ticket search during the one dense training run."""

    name = "bingo"
    Config = BingoConfig

    def trained(self, experiment: Experiment) -> tuple[DenseRun, dict[str, torch.Tensor]]:
        search_config = self.config.search_config(experiment.seed)
        key = repr(sorted(search_config.to_dict().items()))
        dense = experiment.dense_with_search(lambda model: TicketSearch(model, config=search_config), key)
        return dense, self.config.final_scores(dense.search, dense.model)


@register
class BingoPaperStrategy(BingoStrategy):
    """The faithful reproduction of the paper's BINGO, to run beside the improved default."""

    name = "bingo-paper"
    Config = BingoPaperConfig


@register
class MagnitudeStrategy(OneShotStrategy):
    """One-shot global magnitude pruning of the trained network (|w|, smallest first)."""

    name = "magnitude"

    def trained(self, experiment: Experiment) -> tuple[DenseRun, dict[str, torch.Tensor]]:
        dense = experiment.dense()
        return dense, magnitude_scores(dense.model, self.config.granularity)


@register
class RandomStrategy(OneShotStrategy):
    """The control: prune the trained network at random (seeded)."""

    name = "random"

    def trained(self, experiment: Experiment) -> tuple[DenseRun, dict[str, torch.Tensor]]:
        dense = experiment.dense()
        return dense, random_scores(dense.model, self.config.granularity, seed=experiment.seed)
