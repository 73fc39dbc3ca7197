"""What every pruning strategy shares: the experiment it runs in, its outcome, the registry.

A strategy is a small class with a frozen config dataclass (whose fields
become ``bingo compare`` flags) and one method, :meth:`Strategy.run`, that
turns an :class:`Experiment` (data, initial weights, training recipe) into
one :class:`Outcome` per requested sparsity. Masks always come from the same
selection and application code (:func:`bingo.prune`), so every strategy hits
its sparsity exactly.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from ...coupled import ChannelGroup, channel_groups, is_coupled
from ..data import Dataset
from ...errors import ConfigError
from ..models import build_model
from ...masks import refresh_masked
from ...search import TicketSearch
from ..training import TrainConfig, evaluate, train

__all__ = [
    "STRATEGIES",
    "DenseRun",
    "Experiment",
    "ForwardCounter",
    "Outcome",
    "Strategy",
    "Trained",
    "get_strategy",
    "register",
    "rewind",
]


class ForwardCounter:
    """Counts forward calls of a module (fake passes through ``functional_call`` included).

    >>> with ForwardCounter(model) as counter:
    ...     model(x)
    >>> counter.count
    1
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.count = 0
        self._handle = None

    def _hook(self, module: nn.Module, args: object, output: object) -> None:
        self.count += 1

    def __enter__(self) -> ForwardCounter:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


@dataclass(frozen=True)
class Trained:
    """Cost of one training phase."""

    seconds: float  #: wall time, search included
    steps: int  #: optimizer steps
    forward_passes: int  #: forward calls on training batches, fake passes included


@dataclass
class DenseRun:
    """A model trained dense from the experiment's initial weights, and what it cost."""

    model: nn.Module
    cost: Trained
    snapshots: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  #: step -> state_dict, for rewinding
    search: TicketSearch | None = None
    search_seconds: float = 0.0


@dataclass(frozen=True)
class Outcome:
    """One pruned network delivered by a strategy."""

    method: str
    seed: int
    sparsity: float | str  #: requested fraction of prunable weights removed (hit exactly), or an N:M pattern ("2:4")
    accuracy: float  #: test accuracy of the delivered network
    seconds: float  #: whole wall time to deliver it: dense training and fine-tune included
    train_steps: int  #: optimizer steps, all phases
    forward_passes: int  #: training-batch forward calls, all phases, fake ones included
    masks: dict[str, torch.Tensor] = field(repr=False, compare=False)  #: keep-masks (True = kept)
    model: nn.Module | None = field(default=None, repr=False, compare=False)  #: the delivered network itself
    #: floating-point operations of compensation's least-squares solves (``CompensationResult.solve_flops``)
    solve_flops: float = 0.0
    #: wall time of the one-shot prune itself, compensation included (part of ``seconds``); None for
    #: methods that prune during training (IMP, GMP), where no single prune has a time of its own
    prune_seconds: float | None = None
    #: the magnitude weight of the blended score, where it was chosen per sparsity on validation data (else None)
    magnitude_weight: float | None = None

    def record(self) -> dict:
        """The JSON row (masks left out)."""
        row = {
            "method": self.method,
            "seed": self.seed,
            "sparsity": self.sparsity,
            "accuracy": self.accuracy,
            "seconds": self.seconds,
            "train_steps": self.train_steps,
            "forward_passes": self.forward_passes,
            "solve_flops": self.solve_flops,
        }
        if self.magnitude_weight is not None:
            row["magnitude_weight"] = self.magnitude_weight
        return row


def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Set every parameter and buffer of a (possibly pruned) model to ``state``, keeping its masks.

    ``state`` is the ``state_dict`` of the unpruned model (keys ``fc1.weight``);
    on a pruned module the value goes into ``weight_orig``. This is the
    Lottery Ticket reset of the surviving weights to θ0 (or to iteration k).
    """
    with torch.no_grad():
        own = model.state_dict(keep_vars=True)
        for key, value in state.items():
            target = own.get(key)
            if target is None:
                module_name, _, name = key.rpartition(".")
                target = own.get(f"{module_name}.{name}_orig" if module_name else f"{name}_orig")
            if target is None:
                raise ConfigError(f"cannot rewind {key!r}: the model has no such parameter")
            target.copy_(value)
        # Keep the masked tensors that torch's prune caches on the module in step
        # (they are otherwise refreshed only by the next forward).
        refresh_masked(model)


class Experiment:
    """One seed of a comparison: same initial weights and data order for every method.

    Dense training is computed once and shared by the methods that start
    from it (each still charges its cost to itself).
    """

    def __init__(
        self, data: Dataset, model_name: str, train_config: TrainConfig, seed: int, *, progress: bool = True,
        checkpoint: str | None = None, device: torch.device | str = "cpu",
    ) -> None:
        self.data = data
        #: where every model of this experiment lives; data are moved there a batch at a time
        self.device = torch.device(device)
        self.checkpoint = checkpoint  #: resumable per-epoch checkpoint of the dense training (bingo run)
        self.model_name = model_name
        self.train_config = replace(train_config, seed=seed)
        self.seed = seed
        self.progress = progress
        self._dense: DenseRun | None = None
        self._searched: dict[tuple, DenseRun] = {}
        self._groups: list[ChannelGroup] | None = None

    def new_model(self) -> nn.Module:
        """A fresh model with this seed's initial weights θ0, on the experiment's device."""
        return build_model(self.model_name, self.data.input_shape, self.data.num_classes, seed=self.seed).to(self.device)

    def calibration(self, samples: int) -> torch.Tensor:
        """``samples`` training inputs drawn without replacement by this seed (all of them if fewer): compensation's data."""
        generator = torch.Generator().manual_seed(self.seed)
        x = self.data.x_train
        if samples >= len(x):
            return x
        return x[torch.randperm(len(x), generator=generator)[:samples].sort().values]

    def coupled_groups(self) -> list[ChannelGroup]:
        """The model's groups of tied channels (:func:`bingo.channel_groups`) if a residual add ties some, else ``[]`` (cached)."""
        if self._groups is None:
            groups = channel_groups(self.new_model(), self.data.input_shape)
            self._groups = groups if is_coupled(groups) else []
        return self._groups

    def initial_state(self) -> dict[str, torch.Tensor]:
        """θ0 as a state dict."""
        return self.new_model().state_dict()

    def evaluate(self, model: nn.Module) -> float:
        """Test accuracy."""
        return evaluate(model, self.data.x_test, self.data.y_test)

    def train(
        self,
        model: nn.Module,
        *,
        epochs: int | None = None,
        search: TicketSearch | None = None,
        callback: Callable[[int], None] | None = None,
        description: str | None = None,
        checkpoint: str | None = None,
        steps: int | None = None,
    ) -> Trained:
        """Train ``model`` (masks, if any, stay on) with this experiment's recipe; return its cost.

        ``steps``: that many optimizer steps instead of whole epochs (a recovery fine-tune).
        """
        config = self.train_config if epochs is None else replace(self.train_config, epochs=epochs)
        if steps is not None:
            per_epoch = -(-len(self.data.x_train) // config.batch_size)
            config = replace(config, epochs=max(1, -(-steps // per_epoch)))
        with ForwardCounter(model) as counter:
            result = train(
                model, self.data, config, search=search, callback=callback, progress=self.progress,
                description=description, checkpoint=checkpoint, max_steps=steps,
            )
        return Trained(result.train_seconds, result.steps, counter.count)

    def dense(self, snapshot_steps: tuple[int, ...] = ()) -> DenseRun:
        """The dense model trained from θ0 (cached), with state dicts saved at ``snapshot_steps``."""
        if self._dense is None or not set(snapshot_steps) <= set(self._dense.snapshots):
            model = self.new_model()
            snapshots: dict[int, dict[str, torch.Tensor]] = {}
            if 0 in snapshot_steps:
                snapshots[0] = copy.deepcopy(model.state_dict())

            def keep(step: int) -> None:
                if step in snapshot_steps:
                    snapshots[step] = copy.deepcopy(model.state_dict())

            cost = self.train(model, callback=keep, description=f"dense (seed {self.seed})", checkpoint=self.checkpoint)
            missing = set(snapshot_steps) - set(snapshots)
            if missing:
                raise ConfigError(f"rewind step {min(missing)} is beyond the {cost.steps} steps of training")
            self._dense = DenseRun(model, cost, snapshots)
        return self._dense

    def dense_with_search(self, make_search: Callable[[nn.Module], TicketSearch], key: tuple) -> DenseRun:
        """Dense training from θ0 with a ticket search attached (cached per ``key``)."""
        if key not in self._searched:
            model = self.new_model()
            search = make_search(model)
            cost = self.train(
                model, search=search, description=f"dense + ticket search (seed {self.seed})", checkpoint=self.checkpoint
            )
            self._searched[key] = DenseRun(model, cost, search=search, search_seconds=search.seconds)
        return self._searched[key]


class Strategy(ABC):
    """A pruning method: ``run(experiment, sparsities)`` yields one :class:`Outcome` per sparsity.

    ``default_config`` is a frozen dataclass instance: the method's preset.
    Its fields (nested dataclasses included) become CLI flags.
    """

    name: ClassVar[str]
    default_config: ClassVar[Any]
    #: True if a network depends on the earlier sparsities of the same request (IMP's one
    #: trajectory through every target): a resumed ``bingo compare`` then asks for those again
    #: and records only the missing ones, so it delivers what an uninterrupted run would.
    one_trajectory: ClassVar[bool] = False

    def __init__(self, config: object | None = None) -> None:
        if config is not None and type(config) is not type(self.default_config):
            raise ConfigError(
                f"method {self.name!r} takes a {type(self.default_config).__name__}, got {type(config).__name__}"
            )
        self.config = self.default_config if config is None else config

    @abstractmethod
    def run(self, experiment: Experiment, sparsities: list[float]) -> Iterator[Outcome]:
        """Deliver a pruned network per sparsity (ascending), measuring its whole cost."""

    def extras(self, experiment: Experiment) -> dict[str, dict]:
        """Rows this method adds to the comparison beyond its outcomes, ``{section: row}``, after :meth:`run`.

        E.g. ``{"search_overhead": {...}}`` for a method that searches during
        training. Default: none.
        """
        return {}


#: name -> strategy class, filled by :func:`register`.
STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: add a strategy to :data:`STRATEGIES` under ``cls.name``."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str, config: object | None = None) -> Strategy:
    """The strategy called ``name``; :class:`ConfigError` listing the valid names otherwise."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown method {name!r}; valid choices: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](config)
