"""The estimator contract: what a ticket search asks of a significance estimator.

:class:`~bingo.TicketSearch` is a shell: it owns the model, the scored
layers, their initial values θ0, its random generator, the step count and
its timing. An :class:`Estimator` owns only its accumulators and answers two
questions: what to record after a training step (:meth:`Estimator.observe`)
and what the raw scores are (:meth:`Estimator.raw_scores`). The search turns
raw scores into ``significance()`` (scaling to [0, 1], filling weights with no
estimate) and checkpoints the estimator's ``state`` with its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from ..search import SearchConfig, TicketSearch
    from .fake_pass import Batch

__all__ = ["ESTIMATORS", "Estimator", "get_estimator", "register_estimator"]


class Estimator(ABC):
    """A significance estimator, plugged into a :class:`~bingo.TicketSearch`.

    A subclass implements :meth:`observe` and :meth:`raw_scores` and keeps
    its accumulators in ``self.state`` (a dict, nested as deep as it likes,
    of tensors), allocated in :meth:`attach`; checkpointing then needs no
    code of its own. ``self.search`` gives what the shell owns:
    ``search.layers`` (``{weight key: module}``), ``search.theta0``,
    ``search.config`` (granularity, mode, metric, ...), ``search.generator``,
    ``search.steps`` and ``search.unit_shape(key)``.

    Register it with :func:`register_estimator` to make it available by
    name (``TicketSearch(model, estimator="mine")``, the CLI's
    ``--estimator``), or pass an instance: ``TicketSearch(model, estimator=Mine())``.
    """

    #: registry name (``--estimator``)
    name: ClassVar[str] = ""
    #: read-outs ``significance(rule=...)`` accepts, the default first; empty = a single read-out
    rules: ClassVar[tuple[str, ...]] = ()
    #: the metric a search with this estimator uses when none is given (``SearchConfig(metric=None)``)
    default_metric: ClassVar[str] = "accuracy"

    def __init__(self) -> None:
        self.search: TicketSearch | None = None
        self.state: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: SearchConfig) -> Estimator:
        """The estimator a :class:`~bingo.SearchConfig` names, built from its settings.

        Raises :class:`~bingo.ConfigError` for settings this estimator cannot
        honour. The default takes no settings.
        """
        return cls()

    def attach(self, search: TicketSearch) -> None:
        """Bind to ``search`` (once) and allocate the accumulators in ``self.state``."""
        if self.search is not None and self.search is not search:
            raise ConfigError(f"this {type(self).__name__} already serves another TicketSearch; give each search its own instance")
        self.search = search

    @abstractmethod
    def observe(self, batch: Batch) -> dict[str, float]:
        """Record what this training step says about each weight.

        Called by ``search.step`` right after the optimizer step, after
        ``search.steps`` was incremented, under ``torch.no_grad()``; gradients
        of the step just taken are still on the parameters. ``batch``
        (:class:`~bingo.estimators.fake_pass.Batch`) is what the step was
        given: inputs and targets, or a closure; ``batch.score(model, metric)``
        evaluates it, and :func:`~bingo.estimators.fake_pass.measure` runs fake
        passes on it. It must leave the model exactly as it was. Returns
        ``{layer key: damage}`` for logging (``{}`` if it measures nothing
        this step).
        """

    def records_at(self, step: int) -> bool:
        """False if :meth:`observe` would record nothing at training step ``step`` (1-based), so ``search.step`` need not call it.

        ``search.step`` then only counts the step: on a small model the call's
        own bookkeeping, paid on every step of a run, was about 2% of a
        LeNet-300-100 step. The default, True, calls :meth:`observe` always.
        """
        return True

    @abstractmethod
    def raw_scores(self, rule: str | None) -> dict[str, torch.Tensor]:
        """``{layer key: float tensor}``, higher = more significant, NaN where nothing is known yet.

        Shapes are ``search.unit_shape(key)``: the weight's, or ``(out_units,)``
        for neuron granularity. Any scale: the search maps the known values of
        all layers to [0, 1] by one affine map (order kept) unless
        :meth:`in_unit_range` says they already are. ``rule`` is one of
        :attr:`rules` (or None when there are none).
        """

    def in_unit_range(self, rule: str | None) -> bool:
        """True if :meth:`raw_scores` under ``rule`` are already in [0, 1] and comparable across layers."""
        return False

    def notes(self) -> list[str]:
        """Caveats about the current scores, one line each (``significance()`` issues them as warnings). Default: none."""
        return []

    def counts(self) -> dict[str, torch.Tensor]:
        """``{key: int64 tensor}``: how many observations informed each weight (unit)."""
        raise ConfigError(f"estimator {self.name or type(self).__name__!r} does not count observations per weight")

    def resolve_rule(self, rule: str | None) -> str | None:
        """``rule``, or the default read-out when None; :class:`ConfigError` if this estimator has no such read-out."""
        if rule is None:
            return self.rules[0] if self.rules else None
        if rule not in self.rules:
            name = self.name or type(self).__name__
            valid = ", ".join(self.rules) if self.rules else "none (it has a single read-out)"
            raise ConfigError(f"unknown rule {rule!r} for estimator {name!r}; valid choices: {valid}")
        return rule

    def state_dict(self) -> dict[str, Any]:
        """A copy of ``self.state``."""
        return _map_tensors(self.state, lambda t: t.clone())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy a :meth:`state_dict` into ``self.state``; :class:`CheckpointError` if its layout differs."""
        _check_layout(self.state, state, self.name or type(self).__name__)
        _copy_into(self.state, state)


def _map_tensors(tree: Any, fn) -> Any:
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return fn(tree) if isinstance(tree, torch.Tensor) else tree


def _check_layout(mine: Any, saved: Any, path: str) -> None:
    if isinstance(mine, dict):
        if not isinstance(saved, dict) or set(saved) != set(mine):
            found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise CheckpointError(f"search state {path} has entries {found}, expected {sorted(mine)}")
        for key in mine:
            _check_layout(mine[key], saved[key], f"{path}.{key}")
    elif isinstance(mine, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or saved.shape != mine.shape:
            shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
            raise CheckpointError(f"search state {path} has shape {shape}, expected {tuple(mine.shape)}")


def _copy_into(mine: dict[str, Any], saved: dict[str, Any]) -> None:
    for key, value in mine.items():
        if isinstance(value, dict):
            _copy_into(value, saved[key])
        elif isinstance(value, torch.Tensor):
            value.copy_(saved[key])
        else:
            mine[key] = saved[key]


#: name -> estimator class, filled by :func:`register_estimator`.
ESTIMATORS: dict[str, type[Estimator]] = {}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: make ``cls`` available as ``estimator=cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        kind = f"class {cls.__name__}" if isinstance(cls, type) else type(cls).__name__
        raise ConfigError(f"register_estimator takes a subclass of bingo.Estimator (a class), got {kind}")
    if not isinstance(cls.name, str):
        raise ConfigError(f"{cls.__name__}.name must be a str (the estimator= name), got {type(cls.name).__name__}")
    if not cls.name:
        raise ConfigError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    taken = ESTIMATORS.get(cls.name)
    if taken is not None and taken is not cls and _is_builtin(taken):
        # Replacing a built-in would change what bingo.BINGO_SEARCH and the CLI's methods run, silently.
        # A user's own name registered again (a notebook cell run twice) replaces the earlier class.
        builtin = ", ".join(name for name, other in ESTIMATORS.items() if _is_builtin(other))
        raise ConfigError(
            f"register_estimator: the name {cls.name!r} of {cls.__name__} is a built-in estimator's (built-in: "
            f"{builtin}); give {cls.__name__} another name"
        )
    ESTIMATORS[cls.name] = cls
    return cls


def _is_builtin(cls: type[Estimator]) -> bool:
    """True for the estimators that ship with bingo (defined in the package itself)."""
    return cls.__module__ == "bingo" or cls.__module__.startswith("bingo.")


def get_estimator(name_or_instance: str | Estimator, config: SearchConfig) -> Estimator:
    """A new estimator for ``config`` by registered name, or the instance given (checked)."""
    if isinstance(name_or_instance, Estimator):
        return name_or_instance
    if not isinstance(name_or_instance, str) or name_or_instance not in ESTIMATORS:
        raise ConfigError(
            f"unknown estimator {name_or_instance!r}; valid choices: {', '.join(ESTIMATORS)}, or an Estimator instance"
        )
    return ESTIMATORS[name_or_instance].from_config(config)
