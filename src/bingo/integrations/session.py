"""What a trainer integration does, trainer-free: search during training, prune when it ends.

The Lightning and Hugging Face callbacks only decide *when* to call these
methods; everything that can be tested without a trainer is here.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..checks import describe
from ..compensation import CompensationResult, _check_calibration, _check_model_takes, compensate
from ..distributed import unwrap
from ..errors import ConfigError, check_choice
from ..masks import current_masks, masked_names, put_masks_from_state, refresh_masked
from ..pruning import AccuracyFloorResult, prune, prune_to_accuracy
from ..schedule import SparsityScheduler, _check_steps
from ..scoring import MAGNITUDE_WEIGHT, bingo_scores, check_magnitude_weight
from ..search import BINGO_SEARCH, SearchConfig, TicketSearch
from ..selection import SCOPES, parse_sparsity

__all__ = ["PrunedLoading", "PruneAfterTraining"]


class PrunedLoading:
    """While attached, loading a pruned model's state into the unpruned ``model`` puts its masks on first.

    A model pruned during training (``gradual=``) is saved by the trainers
    with ``<name>_orig`` / ``<name>_mask`` entries; their own resume
    (Lightning's ``ckpt_path``, the Trainer's ``resume_from_checkpoint``)
    loads that into a fresh, unpruned model, which has ``<name>`` instead:
    Lightning fails on the keys, the Trainer loads non-strictly and keeps
    the fresh weights. Attached, every ``model.load_state_dict`` first puts
    on each mask the state holds (:func:`bingo.masks.put_masks_from_state`,
    as :func:`bingo.load_pruned_state_dict` does: ``model.parameters()``
    keeps its order, so an optimizer built over it afterwards matches the
    optimizer state saved with the checkpoint), and afterwards sets the
    masked weights to the loaded values (:func:`bingo.masks.refresh_masked`).
    :meth:`remove` detaches it; nothing else stays on the model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles = [model.register_load_state_dict_pre_hook(self._put_masks),
                         model.register_load_state_dict_post_hook(self._refresh)]

    def _put_masks(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        put_masks_from_state(module, state_dict, prefix, strict=False)  # what does not fit, the load itself reports

    def _refresh(self, module: nn.Module, incompatible_keys: Any) -> None:
        if any(masked_names(submodule) for submodule in module.modules()):
            refresh_masked(module)

    def remove(self) -> None:
        """Detach from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class PruneAfterTraining:
    """A ticket search during training and a one-shot prune when it ends, with ``bingo``'s defaults.

    Args:
        sparsity: fraction of the scored weights to remove at the end, or an
            N:M pattern such as ``"2:4"`` (:func:`bingo.prune`); or
        min_accuracy / max_accuracy_drop with ``evaluate``: prune as far as
            ``evaluate(model)`` (higher = better, e.g. validation accuracy)
            stays at the floor (:func:`bingo.prune_to_accuracy`).
        search: the search's settings (default: the ``bingo`` method's,
            :data:`bingo.search.BINGO_SEARCH`).
        magnitude_weight: weight of the magnitude rank in the final score
            (:func:`bingo.bingo_scores`).
        calibration: training inputs as the model takes them (a tensor
            ``(N, ...)``, a tuple for ``model(*x)``, a dict for
            ``model(**x)``, every tensor N samples first); given, the survivors are compensated
            (:func:`bingo.compensate`) after the prune (and at every probe of
            an accuracy floor). None: no compensation.
        scope: ``"global"``, ``"layer"``, ``"lamp"`` or ``"block"`` (see :func:`bingo.prune`).
        gradual: ``(start_step, end_step)``: prune *during* training instead,
            ``bingo-gradual``'s way: a :class:`bingo.SparsityScheduler` on GMP's
            cubic schedule (every ``frequency`` optimizer steps) ranks by the
            same blended score and reaches ``sparsity`` at ``end_step``. If
            training ends before ``end_step`` (fewer steps than planned, early
            stopping), :meth:`finish` prunes the rest at once
            (:meth:`bingo.SparsityScheduler.finish`), so the model always ends at
            ``sparsity``. Needs ``sparsity``; nothing is compensated (training
            adapts), so ``calibration`` is refused beside it.

    Every argument is checked when the session is built; whether the model
    takes ``calibration`` is checked at :meth:`start`, before training.

    Shaped like an optimizer: :meth:`start` with the model before training,
    :meth:`step` after every optimizer step, :meth:`finish` at the end,
    :meth:`state_dict` / :meth:`load_state_dict` for checkpoints.
    """

    def __init__(
        self,
        sparsity: float | str | None = None,
        *,
        min_accuracy: float | None = None,
        max_accuracy_drop: float | None = None,
        evaluate: Callable[[nn.Module], float] | None = None,
        search: SearchConfig | None = None,
        magnitude_weight: float = MAGNITUDE_WEIGHT,
        calibration: torch.Tensor | tuple | dict | None = None,
        scope: str = "global",
        gradual: tuple[int, int] | None = None,
        frequency: int = 1,
    ) -> None:
        targets = [name for name, value in (("sparsity", sparsity), ("min_accuracy", min_accuracy), ("max_accuracy_drop", max_accuracy_drop)) if value is not None]
        if len(targets) > 1:
            raise ConfigError(f"give one of sparsity, min_accuracy, max_accuracy_drop; got {', '.join(targets)}")
        if (min_accuracy is not None or max_accuracy_drop is not None) and evaluate is None:
            raise ConfigError("an accuracy floor needs evaluate=callable(model) -> accuracy (higher = better)")
        if sparsity is not None:
            parsed = parse_sparsity(sparsity)
            if gradual is not None and isinstance(parsed, tuple):
                raise ConfigError(f"gradual pruning needs a fraction to reach, not the pattern {sparsity!r}; "
                                  "an N:M pattern is pruned once, after training")
        check_choice("scope", scope, SCOPES)
        if search is not None and not isinstance(search, SearchConfig):
            raise ConfigError(f"search must be a SearchConfig, got {type(search).__name__}")
        if gradual is not None and sparsity is None:
            raise ConfigError("gradual pruning needs the target: give sparsity= (an accuracy floor needs a prune after training)")
        if gradual is not None:  # checked now, not when training starts
            if not isinstance(gradual, (tuple, list)) or len(gradual) != 2:
                raise ConfigError(f"gradual must be (start_step, end_step), two whole numbers of optimizer steps, got "
                                  f"{describe(gradual)}")
            _check_steps(gradual[0], gradual[1], frequency)
            if calibration is not None:
                raise ConfigError("gradual pruning compensates nothing (training adapts to the masks): leave out "
                                  "calibration=, or prune once after training (no gradual=) to compensate")
        if calibration is not None:  # its shape and values now; whether the model takes it at start()
            _check_calibration(calibration)
        self.gradual, self.frequency = gradual, frequency
        self.scheduler: SparsityScheduler | None = None
        self.sparsity, self.min_accuracy, self.max_accuracy_drop = sparsity, min_accuracy, max_accuracy_drop
        self.evaluate, self.calibration, self.scope = evaluate, calibration, scope
        #: what the search runs with, and the magnitude rank's weight in the score it prunes by (:meth:`scores`)
        self.search_config: SearchConfig = search or BINGO_SEARCH
        self.magnitude_weight = check_magnitude_weight(magnitude_weight)
        self.search: TicketSearch | None = None
        self._pending: dict | None = None
        #: after :meth:`finish`: the masks, and what the floor and the compensation did
        self.masks: dict[str, torch.Tensor] | None = None
        self.floor: AccuracyFloorResult | None = None
        self.compensation: CompensationResult | None = None

    def start(self, model: nn.Module) -> TicketSearch:
        """Attach the search to ``model`` (before its first optimizer step: θ0 is read now), or restore it."""
        if self.search is None or self.search.model is not model:
            if self.calibration is not None:  # before training, not after it, when the prune has already happened
                _check_model_takes("compensate", unwrap(model), self.calibration)
            self.search = TicketSearch(model, config=self.search_config)
            if self.gradual is not None:
                start_step, end_step = self.gradual
                self.scheduler = SparsityScheduler(
                    model, lambda: self.scores(model), self.sparsity,
                    start_step=start_step, end_step=end_step, frequency=self.frequency, scope=self.scope,
                )
        if self._pending is not None:
            self.search.load_state_dict(self._pending["search"])
            if self.scheduler is not None and "scheduler" in self._pending:
                self.scheduler.load_state_dict(self._pending["scheduler"])
            self._pending = None
        return self.search

    def step(self, closure: Callable[[nn.Module], Any]) -> dict[str, float]:
        """Record the optimizer step just taken; ``closure(model) -> loss`` re-evaluates its batch."""
        if self.search is None:
            raise ConfigError("PruneAfterTraining.step before start(model)")
        damages = self.search.step(closure)
        if self.scheduler is not None:
            self.scheduler.step()
        return damages

    def scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What the prune ranks by: :func:`bingo.bingo_scores` of the search and ``model``, at :attr:`magnitude_weight`."""
        if self.search is None:
            raise ConfigError("PruneAfterTraining.scores before start(model)")
        return bingo_scores(self.search, model, self.magnitude_weight)

    def finish(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Prune ``model`` once, by the search's significance blended with magnitude; returns the keep-masks.

        With ``gradual``: bring the masks to ``sparsity`` if the schedule has not
        (training stopped before ``end_step``), and return them.
        """
        if self.search is None or self.search.steps == 0:
            raise ConfigError("nothing to prune by: the search saw no optimizer step")
        if self.scheduler is not None:  # pruned during training already; to the target now if training stopped early
            self.scheduler.finish()
            self.masks = {key: mask.bool() for key, mask in current_masks(model, dict(self.search.theta0)).items()}
            return self.masks
        scores = self.scores(model)
        # the dense model, before pruning: compensation's targets
        reference = copy.deepcopy(model) if self.calibration is not None else None
        if self.sparsity is not None:
            self.masks = prune(model, scores, self.sparsity, self.scope)
        elif self.min_accuracy is not None or self.max_accuracy_drop is not None:

            def judged(candidate: nn.Module) -> float:
                if reference is not None:  # every probe of the floor judged as delivered: compensated
                    candidate = copy.deepcopy(candidate)
                    compensate(candidate, None, self.calibration, reference=reference)
                return float(self.evaluate(candidate))

            self.floor = prune_to_accuracy(model, scores, judged, min_accuracy=self.min_accuracy,
                                           max_drop=self.max_accuracy_drop, scope=self.scope)
            self.masks = {key: mask.bool() for key, mask in self.floor.masks.items()}
        else:
            return {}
        if reference is not None:
            self.compensation = compensate(model, None, self.calibration, reference=reference)
        return self.masks

    def state_dict(self) -> dict:
        """The search's state (θ0, sums, generator) and the gradual schedule's; empty before :meth:`start`."""
        if self.search is None:
            return {}
        state = {"search": self.search.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; applied at :meth:`start` if the search does not exist yet."""
        if not state:
            return
        self._pending = state
        if self.search is not None:
            self.start(self.search.model)
