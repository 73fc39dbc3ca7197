"""Gradual pruning on Zhu & Gupta's cubic schedule, shaped like an LR scheduler.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning
for model compression" (2017), eq. (1): every ``Δt`` steps from ``t0`` the
least significant weights are masked until the sparsity reaches

    s_t = s_f + (s_i − s_f) (1 − (t − t0) / (n Δt))³,   t ∈ {t0, t0 + Δt, ..., t0 + n Δt},

pruning fast while there are many redundant weights and slowly near the
end; training continues at ``s_f`` after ``t0 + n Δt`` so the network recovers.

:func:`gmp_sparsity` is the value at step ``t`` (a pure function);
:class:`SparsityScheduler` drives a model along it, like
``torch.optim.lr_scheduler`` drives an optimizer's learning rate. What ranks
the weights is the caller's: magnitude gives GMP, a
:class:`~bingo.TicketSearch`'s significance gives gradual BINGO.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable

import torch
from torch import nn

from .checks import check_model, check_seed, describe
from .errors import CheckpointError, ConfigError, check_choice
from .masks import current_masks
from .pruning import prune
from .selection import SCOPES, check_sparsity, prune_count

__all__ = ["SparsityScheduler", "gmp_sparsity", "is_update_step"]


def _whole(name: str, value: object) -> int:
    """``value`` as an int: a whole number (an int, or a float with no fraction), never a bool, NaN or infinity."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            isinstance(value, numbers.Integral) or math.isfinite(value) and float(value).is_integer()):
        raise ConfigError(f"the sparsity schedule's {name} must be a whole number of steps, got {describe(value)}")
    return int(value)


def _check_steps(start_step: int, end_step: int, frequency: int) -> None:
    start_step, end_step = _whole("start step", start_step), _whole("end step", end_step)
    if not 0 <= start_step <= end_step:
        raise ConfigError(f"the sparsity schedule needs 0 <= start step <= end step, got {start_step} and {end_step}")
    if (isinstance(frequency, bool) or not isinstance(frequency, numbers.Real) or frequency < 1
            or not (isinstance(frequency, numbers.Integral) or math.isfinite(frequency) and float(frequency).is_integer())):
        raise ConfigError(f"the sparsity schedule's frequency must be a whole number of steps >= 1, got {frequency!r}")


def _sparsity(name: str, value: object) -> float:
    """A schedule's end point as a float in [0, 1): :class:`ConfigError` naming it otherwise (NaN and infinities too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"the sparsity schedule's {name} sparsity must be a fraction in [0, 1), got {describe(value)}")
    return float(value)


def gmp_sparsity(step: int, final: float, initial: float, start_step: int, end_step: int, frequency: int) -> float:
    """The sparsity ``s_t`` the masks are set to at training step ``step`` (Zhu & Gupta 2017, eq. 1).

    ``s_t = final + (initial − final)(1 − (t − start_step) / (end_step − start_step))³``
    where ``t`` is the latest update step at or before ``step``: updates
    happen at ``start_step + k · frequency`` and at ``end_step`` itself (see
    :func:`is_update_step`), so the value holds between updates. It is
    ``initial`` up to ``start_step`` and exactly ``final`` from ``end_step``
    on, also when ``end_step − start_step`` is not a multiple of
    ``frequency`` (the paper's ``n Δt``).
    """
    _check_steps(start_step, end_step, frequency)
    step = _whole("step", step)
    final, initial = _sparsity("final", final), _sparsity("initial", initial)
    if step >= end_step:
        return final
    last_update = start_step + max(step - start_step, 0) // frequency * frequency
    if last_update == start_step:
        return initial
    return final + (initial - final) * (1.0 - (last_update - start_step) / (end_step - start_step)) ** 3


def is_update_step(step: int, start_step: int, end_step: int, frequency: int) -> bool:
    """Whether the masks change at ``step``: ``start_step + k · frequency`` up to ``end_step``, and ``end_step``."""
    _check_steps(start_step, end_step, frequency)
    step = _whole("step", step)
    return start_step <= step <= end_step and ((step - start_step) % frequency == 0 or step == end_step)


#: the settings a state dict must agree on to be loaded
_SETTINGS = ("final_sparsity", "initial_sparsity", "start_step", "end_step", "frequency", "scope", "seed")


class SparsityScheduler:
    """Prune ``model`` gradually along :func:`gmp_sparsity`, like an LR scheduler.

    Construct it over the model before training, call :meth:`step` once
    after every ``optimizer.step()`` (after a ticket search's ``step``, so the
    scores include that step), checkpoint it with :meth:`state_dict`. At each
    update step (:func:`is_update_step`) it calls ``scores()`` and prunes
    through :func:`bingo.prune` to exactly ``round(s_t × n)`` of the ``n``
    scored entries; entries already pruned count first, so masks only grow,
    whatever the scores say now. Constructing it is step 0: if
    ``start_step`` is 0 and ``initial_sparsity`` above 0 it prunes to
    ``initial_sparsity`` at once (as an LR scheduler sets the initial rate).

    >>> scheduler = SparsityScheduler(model, lambda: bingo.magnitude_scores(model), 0.9, start_step=100, end_step=700, frequency=50)
    >>> for x, y in batches:
    ...     loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
    ...     scheduler.step()

    Args:
        model: the model to prune (masks go on through ``torch.nn.utils.prune``).
        scores: called at each update step: ``{"fc1.weight": tensor}``,
            higher = more significant (magnitude for GMP, a search's
            significance for gradual BINGO), shaped like the weights or
            ``(out_units,)`` for neurons.
        final_sparsity: ``s_f``, reached exactly at ``end_step``.
        initial_sparsity: ``s_i``, set at ``start_step``; at most ``s_f``.
        start_step, end_step: first and last update ``t0`` and ``t0 + n Δt``, in optimizer steps.
        frequency: ``Δt``, steps between updates.
        scope: ``"global"`` (one ranking over all scored entries) or ``"layer"``.
        seed: tie-breaking seed of the selection.
        groups: neuron scores on a residual network: the tied channels of
            :func:`bingo.channel_groups`, pruned together by
            :func:`bingo.prune_coupled` at every update.

    The masks themselves travel in the model's ``state_dict`` (load them with
    :func:`bingo.load_pruned_state_dict`); :meth:`state_dict` holds only
    where the schedule stands.
    """

    def __init__(
        self,
        model: nn.Module,
        scores: Callable[[], dict[str, torch.Tensor]],
        final_sparsity: float,
        *,
        initial_sparsity: float = 0.0,
        start_step: int = 0,
        end_step: int,
        frequency: int = 1,
        scope: str = "global",
        seed: int = 0,
        groups: list | None = None,
    ) -> None:
        check_model("SparsityScheduler", model)
        if not callable(scores):
            raise ConfigError(f"scores must be a callable returning {{weight key: tensor}}, got {type(scores).__name__}")
        final_sparsity, initial_sparsity = check_sparsity(final_sparsity), check_sparsity(initial_sparsity)
        if final_sparsity < initial_sparsity:
            raise ConfigError(f"final sparsity {final_sparsity:g} is below the initial sparsity {initial_sparsity:g}")
        _check_steps(start_step, end_step, frequency)
        check_choice("scope", scope, SCOPES)
        self.model, self.scores = model, scores
        self.final_sparsity, self.initial_sparsity = final_sparsity, initial_sparsity
        self.start_step, self.end_step, self.frequency = int(start_step), int(end_step), int(frequency)
        self.scope, self.seed = scope, check_seed("SparsityScheduler", "seed", seed)
        from .coupled import check_groups  # (imported here, as in _prune: coupled imports the pruning stack)
        from .distributed import unwrap

        #: tied channels pruned together (bingo.channel_groups)
        self.groups = check_groups(unwrap(model), groups, "SparsityScheduler") if groups else None
        self.last_step = 0  #: optimizer steps taken so far (0 = construction)
        self.last_sparsity = 0.0  #: the sparsity the latest update pruned to (0 before the first)
        # A first update at sparsity 0 prunes nothing: skipped, so that construction reads no scores (a search
        # that has not stepped yet) and, rebuilt over a resumed pruned model, does not "prune" it to 0.
        if self.sparsity_at(0) > 0:
            self._update()

    def sparsity_at(self, step: int) -> float:
        """``s_t`` at ``step``: :func:`gmp_sparsity` with this scheduler's settings."""
        return gmp_sparsity(step, self.final_sparsity, self.initial_sparsity, self.start_step, self.end_step, self.frequency)

    def step(self) -> dict[str, torch.Tensor] | None:
        """Advance one optimizer step; at an update step prune to ``s_t`` and return the model's keep-masks, else None."""
        self.last_step += 1
        return self._update()

    def _update(self) -> dict[str, torch.Tensor] | None:
        if not is_update_step(self.last_step, self.start_step, self.end_step, self.frequency):
            return None
        sparsity = self.sparsity_at(self.last_step)
        masks = self._prune(self.scores(), sparsity)
        self.last_sparsity = sparsity
        return masks

    def _prune(self, scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
        if self.groups:
            from .coupled import prune_coupled

            return prune_coupled(self.model, scores, self.groups, sparsity, self.scope, seed=self.seed)
        return prune(self.model, scores, sparsity, self.scope, seed=self.seed)

    def finish(self) -> dict[str, torch.Tensor]:
        """Bring the model to ``final_sparsity`` now, if it is not there yet; return its keep-masks.

        Only needed when training stopped before ``end_step`` (e.g. fewer
        steps than the schedule assumed): after ``end_step`` the model is
        already at exactly ``final_sparsity`` and nothing changes.
        """
        scores = self.scores()
        masks = current_masks(self.model, scores)
        if self.groups:  # tied channels count once, by each group's first member
            keys = [group.key for group in self.groups if group.key in masks]
            pruned, total = sum(int((~masks[key]).sum()) for key in keys), sum(masks[key].numel() for key in keys)
        else:
            pruned, total = sum(int((~mask).sum()) for mask in masks.values()), sum(s.numel() for s in scores.values())
        if pruned != prune_count(self.final_sparsity, total):
            masks = self._prune(scores, self.final_sparsity)
        self.last_sparsity = self.final_sparsity
        return masks

    def state_dict(self) -> dict:
        """Where the schedule stands (step, last sparsity) and the settings it runs with."""
        return {"last_step": self.last_step, "last_sparsity": self.last_sparsity, **{k: getattr(self, k) for k in _SETTINGS}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a :meth:`state_dict`. :class:`CheckpointError` if its settings differ from this scheduler's."""
        try:
            last_step, last_sparsity = operator.index(state["last_step"]), float(state["last_sparsity"])
            saved = {key: state[key] for key in _SETTINGS}
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"not a SparsityScheduler state dict (missing or bad {exc})") from None
        differing = [key for key in _SETTINGS if saved[key] != getattr(self, key)]
        if differing:
            raise CheckpointError(
                "scheduler state was saved with different settings: "
                + ", ".join(f"{key}={saved[key]!r} (now {getattr(self, key)!r})" for key in differing)
            )
        if last_step < 0:
            raise CheckpointError(f"scheduler state has a negative step count {last_step}")
        self.last_step, self.last_sparsity = last_step, last_sparsity
