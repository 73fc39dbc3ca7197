"""BINGO in a Lightning ``Trainer.fit``: ``pip install bingo-prune[lightning]``.

    from bingo.integrations.lightning import BingoCallback

    trainer = lightning.Trainer(max_epochs=3, callbacks=[BingoCallback(sparsity=0.9)])
    trainer.fit(module, train_loader)        # module is pruned to 90% when fit ends

The callback attaches a ticket search when fit starts, steps it once per
optimizer step (after ``accumulate_grad_batches`` micro-batches, reading the
gradients before Lightning zeroes them), keeps its state in Lightning
checkpoints, and prunes when fit ends (see
:class:`~bingo.integrations.session.PruneAfterTraining` for the settings).
Fake passes re-run ``training_step`` on the batch just trained on with the
probed weights swapped in, with ``self.log`` silenced so they log nothing;
pass ``closure=`` to measure something else.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("bingo.integrations.lightning needs Lightning: pip install 'bingo-prune[lightning]'") from exc

from torch import nn

from ..errors import ConfigError
from .session import PrunedLoading, PruneAfterTraining

__all__ = ["BingoCallback"]


@contextmanager
def _silenced(module: nn.Module):
    """``module.log`` and ``log_dict`` as no-ops: a fake pass must not log as if it were training."""
    saved = {name: module.__dict__.get(name) for name in ("log", "log_dict")}
    module.log = lambda *args, **kwargs: None
    module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del module.__dict__[name]
            else:
                module.__dict__[name] = value


class BingoCallback(pl.Callback):
    """Ticket search during ``fit``, prune when it ends.

    Takes the arguments of :class:`~bingo.integrations.session.PruneAfterTraining`
    (``sparsity=`` or ``min_accuracy=``/``max_accuracy_drop=`` with
    ``evaluate=``; ``search=``, ``magnitude_weight=``, ``calibration=``,
    ``scope=``) and ``closure(module, batch, batch_idx) -> loss`` (default:
    ``module.training_step(batch, batch_idx)``, its ``"loss"`` if it returns
    a dict). After fit, ``callback.session`` holds the search, the masks and
    what the floor and compensation did.

    Checkpoints Lightning writes during fit (``last.ckpt`` included) hold the
    model as it was then: dense, with a one-shot prune, which happens when
    fit ends. Save the pruned module after ``fit`` returns, e.g.
    ``trainer.save_checkpoint("pruned.ckpt")``. With ``gradual=`` they hold
    the masks reached so far, and ``fit(..., ckpt_path=)`` into a fresh
    module puts them on before Lightning loads the weights
    (:class:`~bingo.integrations.session.PrunedLoading`), so the run resumes
    where it stopped; if fit ends before the schedule's ``end_step``, the rest
    is pruned then, and the module ends at ``sparsity``.
    """

    def __init__(self, sparsity: float | str | None = None, *, closure: Callable[[nn.Module, Any, int], Any] | None = None, **settings: Any) -> None:
        super().__init__()
        self.session = PruneAfterTraining(sparsity, **settings)
        self.closure = closure
        self._optimizer_steps = 0
        self._loading: PrunedLoading | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Lightning loads a ckpt_path's state dict before any callback hook that could see it (on_load_checkpoint
        # comes after): a checkpoint of a model pruned during fit needs its masks on the fresh module first.
        if self._loading is not None and self._loading.model is not pl_module:  # a fit that failed on another module
            self._detach_loading()
        if self._loading is None:
            self._loading = PrunedLoading(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._detach_loading()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach_loading()  # Lightning skips teardown when fit raises: no hook may stay on the module

    def _detach_loading(self) -> None:
        if self._loading is not None:
            self._loading.remove()
            self._loading = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.closure is None and not pl_module.automatic_optimization:
            # its training_step zeroes, backpropagates and steps itself: re-run as a fake pass it would train
            raise ConfigError(
                f"BingoCallback: {type(pl_module).__name__} uses manual optimization (automatic_optimization = False), "
                "so its training_step steps the optimizer and cannot be re-run to measure the loss: pass "
                "closure=(module, batch, batch_idx) -> loss that only computes it"
            )
        self.session.start(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not at fit start: a ckpt_path restores global_step after on_fit_start
        self._optimizer_steps = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimizer steps: while gradients accumulate it does not move, and there is nothing to record.
        if trainer.global_step == self._optimizer_steps:
            return
        self._optimizer_steps = trainer.global_step
        # Lightning zeroes gradients at the start of the next step, so this step's are still on the parameters.
        if self.closure is not None:
            self.session.step(lambda model: self.closure(model, batch, batch_idx))
            return
        with _silenced(pl_module):
            self.session.step(lambda model: model.training_step(batch, batch_idx))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.session.finish(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {**self.session.state_dict(), "optimizer_steps": self._optimizer_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self._optimizer_steps = state.pop("optimizer_steps", 0)
        self.session.load_state_dict(state)
