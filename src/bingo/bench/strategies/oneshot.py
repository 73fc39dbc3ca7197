"""Prune once after dense training: BINGO, one-shot magnitude, random.

All of them train dense from θ0, score the trained weights, prune one-shot
to each sparsity (or, :meth:`OneShotStrategy.prune_to_floor`, as far as
validation accuracy allows) and optionally fine-tune the pruned network
(``finetune_epochs``, charged to the method's cost).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...blend import choose_magnitude_weight
from ...checks import check_field_types
from ...compensation import BATCHNORM_CHOICES, compensate, suggested_calibration_samples
from ...solvers import SOLVERS
from ...coupled import prune_coupled
from ...errors import ConfigError, check_choice
from ...multistep import prune_in_steps
from ...layers import GRANULARITIES
from ...pruning import AccuracyFloorResult, prune, prune_to_accuracy
from ...scoring import MAGNITUDE_WEIGHT, bingo_scores, check_magnitude_weight, magnitude_scores, random_scores
from ...search import BINGO_SEARCH, SearchConfig, TicketSearch
from ...selection import SCOPES
from ..configs import config_record
from ..training import evaluate
from .base import DenseRun, Experiment, Outcome, Strategy, register

#: samples per forward when judging a blend weight on the validation split (evaluate's own default)
EVALUATION_BATCH = 2048

__all__ = [
    "BINGO",
    "BINGO_PAPER",
    "BingoConfig",
    "BingoPaperStrategy",
    "BingoStrategy",
    "ChosenBlend",
    "CompensationConfig",
    "MagnitudeStrategy",
    "OneShotConfig",
    "OneShotStrategy",
    "RandomStrategy",
]


def _check_steps(what: str, value: int, minimum: int) -> None:
    """A count of steps: a whole number (not a bool) of at least ``minimum``, else a one-line ConfigError."""
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ConfigError(f"{what} must be a whole number >= {minimum}, got {value!r}")


def _check_finetune(finetune_epochs: int) -> None:
    if int(finetune_epochs) != finetune_epochs or finetune_epochs < 0:
        raise ConfigError(f"finetune epochs must be a whole number >= 0, got {finetune_epochs!r}")


#: the solvers a compensation can use: auto (chosen per layer), then every registered one
SOLVER_CHOICES = ("auto", *SOLVERS)


@dataclass(frozen=True)
class CompensationConfig:
    """Whether and how a one-shot prune re-fits the surviving weights (:func:`bingo.compensate`)."""

    compensate: bool = field(default=False, metadata={"help": "re-fit the surviving weights of every pruned layer to the dense layer's outputs (least squares on calibration data) before any fine-tune"})
    calibration_samples: int = field(default=1024, metadata={"help": "training samples the compensation fits on, at least: more where a layer is wide (4 design rows per input of the widest layer; bingo.suggested_calibration_samples)"})
    batchnorm: str = field(default="keep", metadata={"help": "after compensating: keep the BatchNorm statistics, or re-estimate them on the calibration samples", "choices": BATCHNORM_CHOICES})
    solver: str = field(default="auto", metadata={"help": "least-squares solver of the re-fit: auto (per layer, by counted work), exact (per-row Cholesky), cg (conjugate gradients to the exact optimum), sparsegpt (the SparseGPT sweep, approximate)", "choices": SOLVER_CHOICES})
    recovery_steps: int = field(default=0, metadata={"help": "after the prune (and its re-fit): this many steps of masked fine-tuning with the training recipe, charged to the method (a fraction of an epoch buys back much of what one-shot loses); 0 = none"})
    compensation_steps: int = field(default=1, metadata={"help": "reach each sparsity in this many prune-and-refit steps up the cubic schedule, re-scoring the re-fitted weights before each (bingo.prune_in_steps; no training); 1 = one-shot"})

    def __post_init__(self) -> None:
        check_field_types(self)
        if int(self.calibration_samples) != self.calibration_samples or self.calibration_samples < 1:
            raise ConfigError(f"calibration samples must be a whole number >= 1, got {self.calibration_samples!r}")
        check_choice("batchnorm", self.batchnorm, BATCHNORM_CHOICES)
        check_choice("solver", self.solver, SOLVER_CHOICES)
        _check_steps("recovery steps", self.recovery_steps, 0)
        _check_steps("compensation steps", self.compensation_steps, 1)
        if self.compensation_steps > 1 and not self.compensate:  # nothing re-fits between the steps: it would be ignored
            raise ConfigError(f"compensation steps ({self.compensation_steps}) re-fit between prunes, so they need "
                              "compensation: add --compensate (compensate=True), or leave them at 1")

    def to_dict(self) -> dict:
        """The JSON record; ``compensation_steps`` only when it is not 1 and ``recovery_steps`` when not 0, so runs
        recorded before them resume unchanged."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if record["compensation_steps"] == 1:
            del record["compensation_steps"]
        if record["recovery_steps"] == 0:
            del record["recovery_steps"]
        return record


@dataclass(frozen=True)
class ChosenBlend:
    """A prune at the blend weight chosen on validation data, and the cost of choosing it (every candidate's)."""

    model: nn.Module  #: pruned (and compensated) at ``magnitude_weight``
    masks: dict[str, torch.Tensor]  #: ``{layer key: bool mask}``, True = kept
    magnitude_weight: float  #: the chosen weight of the magnitude rank, in [0, 1]
    calibration_passes: int  #: forward calls: every candidate's compensation, judging steps and validation batches
    solve_flops: float  #: every candidate's least-squares solves
    training_steps: int  #: masked training steps spent judging candidates (``judge_steps`` each)


@dataclass(frozen=True)
class OneShotConfig:
    """Settings shared by the prune-once-after-training methods."""

    finetune_epochs: int = field(default=0, metadata={"help": "epochs of masked fine-tuning after the prune (charged to the method)"})
    scope: str = field(default="global", metadata={"help": "global: rank all layers together (each keeps at least 1%); layer: prune each layer to the sparsity; lamp: rank globally by LAMP-normalised scores (Lee et al. 2021); block: prune each block (the path up to its first numeric index, e.g. h.0) to the sparsity, one ranking inside it", "choices": SCOPES})
    granularity: str = field(default="weight", metadata={"help": "prune single weights, or whole neurons / output channels (sparsity = fraction of hidden units)", "choices": GRANULARITIES})
    compensation: CompensationConfig = field(default=CompensationConfig(), metadata={"help": "compensation settings"})

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_finetune(self.finetune_epochs)
        check_choice("scope", self.scope, SCOPES)
        check_choice("granularity", self.granularity, GRANULARITIES)


class OneShotStrategy(Strategy):
    """Dense training, scores, one-shot prune per sparsity, optional fine-tune."""

    default_config = OneShotConfig()

    def trained(self, experiment: Experiment) -> tuple[DenseRun, dict[str, torch.Tensor]]:
        """The dense run this method starts from, and its scores (cached by the experiment)."""
        raise NotImplementedError

    def run(self, experiment: Experiment, sparsities: list[float | str]) -> Iterator[Outcome]:
        """One outcome per sparsity: a fraction, or an N:M pattern such as ``"2:4"`` (:func:`bingo.prune` takes both)."""
        dense, scores = self.trained(experiment)
        for sparsity in sparsities:
            model = copy.deepcopy(dense.model)
            start = time.perf_counter()
            groups = experiment.coupled_groups() if self.config.granularity == "neuron" else []
            settings = self.config.compensation
            stepped = settings.compensate and settings.compensation_steps > 1 and not groups
            choice = None if groups else self.choose_blend(experiment, dense, sparsity)
            if stepped and choice is None:
                result = self._prune_in_steps(experiment, dense, model, self.step_scores(dense, scores), sparsity)
                yield self._deliver(experiment, dense, model, result.masks, sparsity, time.perf_counter() - start,
                                    result.forward_passes, result.solve_flops)
                continue
            if choice is not None:  # pruned and compensated at each blend weight; the best on validation data
                yield self._deliver(experiment, dense, choice.model, choice.masks, sparsity, time.perf_counter() - start,
                                    choice.calibration_passes, choice.solve_flops,
                                    magnitude_weight=choice.magnitude_weight, extra_steps=choice.training_steps)
                continue
            if groups:  # a residual network: tied channels get one joint score and go together
                masks = prune_coupled(model, scores, groups, sparsity, self.config.scope, seed=experiment.seed)
            else:
                masks = prune(model, scores, sparsity, self.config.scope, seed=experiment.seed)
            calls, flops = self._compensate(experiment, dense, model)
            yield self._deliver(experiment, dense, model, masks, sparsity, time.perf_counter() - start, calls, flops)

    def choose_blend(self, experiment: Experiment, dense: DenseRun, sparsity: float | str) -> ChosenBlend | None:
        """The pruned network at the blend weight chosen for ``sparsity``, with what choosing it cost; None where no blend is chosen."""
        return None

    def _prune_in_steps(self, experiment: Experiment, dense: DenseRun, model: nn.Module, scores, sparsity: float | str):
        """:func:`bingo.prune_in_steps` of ``model`` with this config's compensation settings, re-fitting to the dense run."""
        settings = self.config.compensation
        return prune_in_steps(
            model, scores, sparsity, experiment.calibration(self._calibration_samples(experiment, model)),
            steps=settings.compensation_steps, scope=self.config.scope, seed=experiment.seed, reference=dense.model,
            solver=settings.solver, batchnorm=settings.batchnorm)

    def step_scores(self, dense: DenseRun, scores: dict[str, torch.Tensor]):
        """What a multi-step prune ranks by before each step: ``scores`` as they are (overridden where a score reads the weights)."""
        return scores

    def _calibration_samples(self, experiment: Experiment, model: nn.Module) -> int:
        return suggested_calibration_samples(model, experiment.calibration(1), minimum=self.config.compensation.calibration_samples)

    def _compensate(self, experiment: Experiment, dense: DenseRun, model: nn.Module) -> tuple[int, float]:
        """Re-fit the pruned ``model``'s survivors to the dense run's layer outputs if configured.

        Returns ``(forward calls on calibration batches, FLOPs of the solves)``."""
        settings = self.config.compensation
        if not settings.compensate or not any(hasattr(m, "weight_mask") for m in model.modules()):
            return 0, 0.0
        samples = suggested_calibration_samples(model, experiment.calibration(1), minimum=settings.calibration_samples)
        result = compensate(model, None, experiment.calibration(samples), reference=dense.model,
                            batchnorm=settings.batchnorm, solver=settings.solver)
        return result.forward_passes, result.solve_flops

    def prune_to_floor(
        self, experiment: Experiment, *, min_accuracy: float | None = None, max_drop: float | None = None
    ) -> tuple[Outcome, AccuracyFloorResult]:
        """The paper's rule: prune as far as validation accuracy stays at the floor, then fine-tune.

        See :func:`bingo.prune_to_accuracy`; needs a validation split.
        """
        data = experiment.data
        if len(data.x_val) == 0:
            raise ConfigError("pruning to an accuracy floor needs a validation split, and this data has none")
        if self.config.compensation.compensate and self.config.compensation.compensation_steps > 1:
            raise ConfigError("--compensation-steps applies to --sparsity, not to an accuracy floor (--min-accuracy, --max-accuracy-drop)")
        dense, scores = self.trained(experiment)
        model = copy.deepcopy(dense.model)
        start = time.perf_counter()
        calls, flops = 0, 0.0

        def validation_accuracy(candidate: nn.Module) -> float:
            # With compensation, every probe of the floor is judged as it will be delivered: compensated.
            nonlocal calls, flops
            if self.config.compensation.compensate:
                candidate = copy.deepcopy(candidate)
                more, solves = self._compensate(experiment, dense, candidate)
                calls, flops = calls + more, flops + solves
            return evaluate(candidate, data.x_val, data.y_val)

        floor = prune_to_accuracy(
            model, scores, validation_accuracy,
            min_accuracy=min_accuracy, max_drop=max_drop, scope=self.config.scope, seed=experiment.seed,
            groups=experiment.coupled_groups() if self.config.granularity == "neuron" else None,
        )
        more, solves = self._compensate(experiment, dense, model)
        masks = {key: mask.bool() for key, mask in floor.masks.items()}
        return self._deliver(experiment, dense, model, masks, floor.sparsity, time.perf_counter() - start, calls + more,
                             flops + solves), floor

    def _deliver(
        self, experiment: Experiment, dense: DenseRun, model: nn.Module, masks: dict, sparsity: float | str,
        prune_seconds: float, calibration_passes: int = 0, solve_flops: float = 0.0, magnitude_weight: float | None = None,
        extra_steps: int = 0,
    ) -> Outcome:
        """Fine-tune the pruned ``model`` if asked and charge everything to one :class:`Outcome`.

        ``prune_seconds`` and ``calibration_passes`` (compensation's forward calls on calibration batches,
        counted with the training forwards) and ``solve_flops`` (its least-squares solves) are the prune's own cost;
        ``extra_steps`` the training steps it took (blend candidates judged after ``judge_steps``).
        """
        seconds = dense.cost.seconds + prune_seconds
        steps, forwards = dense.cost.steps + extra_steps, dense.cost.forward_passes + calibration_passes
        recovery = self.config.compensation.recovery_steps
        if recovery:
            label = sparsity if isinstance(sparsity, str) else format(sparsity, "g")
            tuned = experiment.train(model, steps=recovery, description=f"{self.name} recovery {label}")
            seconds, steps, forwards = seconds + tuned.seconds, steps + tuned.steps, forwards + tuned.forward_passes
        if self.config.finetune_epochs:
            tuned = experiment.train(model, epochs=self.config.finetune_epochs, description=f"{self.name} fine-tune {sparsity if isinstance(sparsity, str) else format(sparsity, 'g')}")
            seconds, steps, forwards = seconds + tuned.seconds, steps + tuned.steps, forwards + tuned.forward_passes
        return Outcome(self.name, experiment.seed, sparsity, experiment.evaluate(model), seconds, steps, forwards, masks, model,
                       solve_flops, prune_seconds=prune_seconds, magnitude_weight=magnitude_weight)


@dataclass(frozen=True)
class BingoConfig:
    """BINGO as a method: a ticket search during the dense run, then a one-shot prune.

    ``search`` holds the search's settings (its ``seed`` is the experiment's);
    the final score blends the search's significance with weight magnitude
    by rank (``magnitude_weight``). The presets are instances:
    :data:`BINGO` and :data:`BINGO_PAPER`.
    """

    search: SearchConfig = field(default=BINGO_SEARCH, metadata={"help": "ticket search settings"})
    magnitude_weight: float | None = field(default=None, metadata={"help": "weight of the magnitude rank in the final score, in [0, 1]: 0 = the search's significance alone, 0.5 = equal rank blend; none given (bingo's preset): chosen per sparsity among 0, 0.25, 0.5, 0.75, 1 by validation accuracy after compensation (bingo.choose_magnitude_weight; each candidate judged as delivered, multi-step prunes included; 0.5 where there is no validation split, no compensation, or a coupled prune)"})
    finetune_epochs: int = field(default=0, metadata={"help": "epochs of masked fine-tuning after the prune (charged to the method)"})
    scope: str = field(default="global", metadata={"help": "global: rank all layers together (each keeps at least 1%); layer: prune each layer to the sparsity; lamp: rank globally by LAMP-normalised scores (Lee et al. 2021); block: prune each block (the path up to its first numeric index, e.g. h.0) to the sparsity, one ranking inside it", "choices": SCOPES})
    # On by default: without retraining, re-fitting the survivors is what makes a one-shot prune hold up (BENCHMARKS.md).
    compensation: CompensationConfig = field(default=CompensationConfig(compensate=True), metadata={"help": "compensation settings"})
    judge_steps: int = field(default=0, metadata={"help": "with the blend chosen on validation: masked training steps (the training recipe) each candidate gets, on a copy, before its validation accuracy is judged, for runs that fine-tune, where the ranking after the fine-tune can differ from the one right after the prune; charged to the method; 0 = judged right after the prune"})

    def __post_init__(self) -> None:
        check_field_types(self)
        if not isinstance(self.search, SearchConfig):
            raise ConfigError(f"BingoConfig.search must be a SearchConfig, got {type(self.search).__name__}")
        _check_finetune(self.finetune_epochs)
        check_choice("scope", self.scope, SCOPES)
        if self.magnitude_weight is not None:
            check_magnitude_weight(self.magnitude_weight)
        _check_steps("judge steps", self.judge_steps, 0)
        if self.judge_steps and self.magnitude_weight is not None:  # nothing is chosen, so nothing would be judged
            raise ConfigError(f"judge steps apply where the blend is chosen on validation (magnitude_weight none), "
                              f"not with magnitude_weight={self.magnitude_weight!r}")
        if self.judge_steps and not self.compensation.compensate:  # the blend is chosen only after a re-fit
            raise ConfigError("judge steps apply where the blend is chosen on validation, which needs compensation "
                              "(--compensate), not with --no-compensate")

    def to_dict(self) -> dict:
        """The JSON record; ``judge_steps`` only when it is not 0, so runs recorded before it resume unchanged."""
        record = {f.name: config_record(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if record["judge_steps"] == 0:
            del record["judge_steps"]
        return record

    @property
    def granularity(self) -> str:
        """The search's granularity: what is scored is what is pruned."""
        return self.search.granularity

    @property
    def fixed_magnitude_weight(self) -> float:
        """The weight used where none is chosen per sparsity: ``magnitude_weight``, or bingo's 0.5 if that is None."""
        return MAGNITUDE_WEIGHT if self.magnitude_weight is None else self.magnitude_weight

    def final_scores(self, search: TicketSearch, model: nn.Module) -> dict[str, torch.Tensor]:
        """The scores the one-shot prune ranks by, after training: :func:`bingo.bingo_scores`.

        ``search.significance()`` blended by rank with the trained weights'
        magnitude, weights ``1 − m`` and ``m`` (:attr:`fixed_magnitude_weight`),
        at this config's granularity (the significance alone at weight 0).
        """
        return bingo_scores(search.significance(), model, self.fixed_magnitude_weight, granularity=self.granularity)


#: the default ``bingo``: hybrid Taylor + calibrating fake passes, blended with magnitude, survivors compensated
BINGO = BingoConfig()
#: the faithful ``bingo-paper``: 1% reset-to-θ0 probes every step, scored by accuracy change, nothing blended, no compensation
BINGO_PAPER = BingoConfig(
    search=SearchConfig(estimator="probe", metric="accuracy", mode="reset", rule="mean"),
    magnitude_weight=0.0,
    compensation=CompensationConfig(compensate=False),
)


@register
class BingoStrategy(OneShotStrategy):
    """BINGO: significance from ticket search during the one dense training run."""

    name = "bingo"
    default_config = BINGO

    def search_config(self, experiment: Experiment) -> SearchConfig:
        """This method's search settings with the experiment's seed."""
        return dataclasses.replace(self.config.search, seed=experiment.seed)

    def trained(self, experiment: Experiment) -> tuple[DenseRun, dict[str, torch.Tensor]]:
        config = self.search_config(experiment)
        key = repr(sorted(config.to_dict().items()))
        dense = experiment.dense_with_search(lambda model: TicketSearch(model, config=config), key)
        return dense, self.config.final_scores(dense.search, dense.model)

    def step_scores(self, dense: DenseRun, scores: dict[str, torch.Tensor]):
        """Before each step of a multi-step prune: the search's significance re-blended with the re-fitted weights' magnitude."""
        return lambda model: self.config.final_scores(dense.search, model)

    def choose_blend(self, experiment: Experiment, dense: DenseRun, sparsity: float | str) -> ChosenBlend | None:
        """With ``magnitude_weight=None`` and compensation on: :func:`bingo.choose_magnitude_weight` on the validation split.

        Each candidate is compensated as the delivered network is (in
        ``compensation_steps`` prune-and-refit steps where that is more than
        one, re-scored by its own blend before each), then its validation
        accuracy judged; every candidate's calibration passes and solves, and
        its validation forwards, are charged to the outcome.
        """
        data, settings = experiment.data, self.config.compensation
        if self.config.magnitude_weight is not None or not settings.compensate or len(data.x_val) == 0:
            return None
        calls, flops, steps = 0, 0.0, 0

        def in_steps(candidate: nn.Module, scores) -> dict[str, torch.Tensor]:
            nonlocal calls, flops
            result = self._prune_in_steps(experiment, dense, candidate, scores, sparsity)
            calls, flops = calls + result.forward_passes, flops + result.solve_flops
            return result.masks

        prune_with = in_steps if settings.compensation_steps > 1 else None

        def judge(candidate: nn.Module) -> float:
            nonlocal calls, flops, steps
            if prune_with is None:  # a multi-step prune has re-fitted already
                more, solves = self._compensate(experiment, dense, candidate)
                calls, flops = calls + more, flops + solves
            judged = candidate
            if self.config.judge_steps:  # judged as a fine-tune will leave it: after a few masked steps, on a copy
                judged = copy.deepcopy(candidate)
                trained = experiment.train(judged, steps=self.config.judge_steps, description="bingo judging a blend")
                calls, steps = calls + trained.forward_passes, steps + trained.steps
            calls += math.ceil(len(data.x_val) / EVALUATION_BATCH)
            return evaluate(judged, data.x_val, data.y_val, batch_size=EVALUATION_BATCH)

        choice = choose_magnitude_weight(dense.model, dense.search.significance(), sparsity, judge, scope=self.config.scope,
                                         seed=experiment.seed, granularity=self.config.granularity, prune_with=prune_with)
        return ChosenBlend(choice.model, choice.masks, choice.magnitude_weight, calls, flops, steps)

    def extras(self, experiment: Experiment) -> dict[str, dict]:
        """The search's overhead: dense training time with the search / without, and whether both ended bit-identical."""
        searched, _ = self.trained(experiment)
        plain = experiment.dense()
        identical = all(
            torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(), searched.model.state_dict().values())
        )
        return {
            "search_overhead": {
                "method": self.name,
                "seed": experiment.seed,
                "train_seconds": plain.cost.seconds,
                "train_seconds_with_search": searched.cost.seconds,
                "search_seconds": searched.search_seconds,
                # None when plain training took no time (--epochs 0): no ratio to give
                "ratio": searched.cost.seconds / plain.cost.seconds if plain.cost.seconds > 0 else None,
                "forward_passes": plain.cost.forward_passes,
                "forward_passes_with_search": searched.cost.forward_passes,
                "identical_to_plain_training": identical,
            }
        }


@register
class BingoPaperStrategy(BingoStrategy):
    """The faithful reproduction of the paper's BINGO, to run beside the improved default."""

    name = "bingo-paper"
    default_config = BINGO_PAPER


@register
class MagnitudeStrategy(OneShotStrategy):
    """One-shot global magnitude pruning of the trained network (|w|, smallest first)."""

    name = "magnitude"

    def trained(self, experiment: Experiment) -> tuple[DenseRun, dict[str, torch.Tensor]]:
        dense = experiment.dense()
        return dense, magnitude_scores(dense.model, self.config.granularity)

    def step_scores(self, dense: DenseRun, scores: dict[str, torch.Tensor]):
        """Before each step of a multi-step prune: the magnitude of the re-fitted weights."""
        return lambda model: magnitude_scores(model, self.config.granularity)


@register
class RandomStrategy(OneShotStrategy):
    """The control: prune the trained network at random (seeded)."""

    name = "random"

    def trained(self, experiment: Experiment) -> tuple[DenseRun, dict[str, torch.Tensor]]:
        dense = experiment.dense()
        return dense, random_scores(dense.model, self.config.granularity, seed=experiment.seed)
