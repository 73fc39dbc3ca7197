"""BINGO in a Hugging Face ``Trainer``: ``pip install bingo-prune[transformers]``.

    from bingo.integrations.transformers import BingoTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[BingoTrainerCallback(sparsity=0.5)])
    trainer.train()                          # the model is pruned to 50% when training ends

The callback attaches a ticket search when training begins, steps it at
``on_optimizer_step`` (after the optimizer step, before the Trainer zeroes
the gradients: the taylor and hybrid estimators read them; once per
optimizer step, whatever ``gradient_accumulation_steps``), saves its state
into every checkpoint folder (``bingo_search.pt``) and restores it when
training resumes from one (the folder ``train(resume_from_checkpoint=)``
resumes, wherever it is), and prunes when training ends (settings:
:class:`~bingo.integrations.session.PruneAfterTraining`). Fake passes re-run
the model on the last training batch it was called with (the model's loss
output, so the batch must carry labels), or ``closure(model, args, kwargs)``
if given.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("bingo.integrations.transformers needs Hugging Face Transformers: pip install 'bingo-prune[transformers]'") from exc

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import load_checkpoint, save_checkpoint
from ..masks import masked_names
from .session import PrunedLoading, PruneAfterTraining

__all__ = ["BingoTrainerCallback", "STATE_FILE"]

#: the search's state in every checkpoint folder
STATE_FILE = "bingo_search.pt"


class BingoTrainerCallback(TrainerCallback):
    """Ticket search during ``Trainer.train``, prune when it ends.

    Takes the arguments of :class:`~bingo.integrations.session.PruneAfterTraining`
    (``sparsity=`` or ``min_accuracy=``/``max_accuracy_drop=`` with
    ``evaluate=``; ``search=``, ``magnitude_weight=``, ``calibration=``,
    ``scope=``) and ``closure(model, args, kwargs) -> loss`` (default: the
    ``loss`` of ``model(*args, **kwargs)``, the last training call). After
    training, ``callback.session`` holds the search, the masks and what the
    floor and compensation did.

    With ``gradual=``, the ``checkpoint-N`` folders hold the masks reached so
    far; from Trainer construction to the start of training, loading such a
    model state puts its masks on first
    (:class:`~bingo.integrations.session.PrunedLoading`), so
    ``train(resume_from_checkpoint=)`` continues the pruned model (pass the
    callback to ``Trainer(callbacks=)``: one added later comes after that
    load). If training ends before the schedule's ``end_step``, the rest is
    pruned then, and the model ends at ``sparsity``.
    """

    def __init__(self, sparsity: float | str | None = None, *, closure: Callable[[nn.Module, tuple, dict], Any] | None = None, **settings: Any) -> None:
        self.session = PruneAfterTraining(sparsity, **settings)
        self.closure = closure
        self._call: tuple[tuple, dict] | None = None
        self._hook = None
        self._loading: PrunedLoading | None = None

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:  # training forwards only; fake passes run in eval mode
            self._call = (args, kwargs)

    def on_init_end(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        # train(resume_from_checkpoint=) loads the model before on_train_begin: a pruned one needs its masks on first
        if model is not None and self._loading is None:
            self._loading = PrunedLoading(model)

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._loading is not None:  # the checkpoint's weights are loaded by now
            self._loading.remove()
            self._loading = None
        self.session.start(model)
        if state.global_step > 0:  # resumed: the checkpoint resumed from holds the search
            folder = _resumed_checkpoint()
            if folder is None:  # a Trainer that does not say: its own naming in output_dir
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                warnings.warn(f"could not tell which checkpoint the Trainer resumed from; reading the search's state "
                              f"from {folder}", stacklevel=2)
            saved = Path(folder) / STATE_FILE
            if not saved.exists():
                raise ConfigError(f"resuming at step {state.global_step} but {saved} is missing: the search's state was not saved with this checkpoint")
            self.session.load_state_dict(_load_state(saved))
            scheduler = self.session.scheduler
            if scheduler is not None and scheduler.last_sparsity > 0 and not any(masked_names(m) for m in model.modules()):
                raise ConfigError(f"resuming at step {state.global_step} a model pruned to {scheduler.last_sparsity:g}, but its "
                                  "masks were not loaded: pass BingoTrainerCallback to Trainer(callbacks=[...]), not add_callback")
        self._hook = model.register_forward_pre_hook(self._remember, with_kwargs=True)

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._call is None:
            return
        call_args, call_kwargs = self._call
        if self.closure is not None:
            self.session.step(lambda m: self.closure(m, call_args, call_kwargs))
        else:
            self.session.step(lambda m: _model_loss(m(*call_args, **call_kwargs)))

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_checkpoint(self.session.state_dict(), folder / STATE_FILE)  # atomic, checksummed: as every bingo checkpoint

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.session.finish(model)


def _model_loss(output: Any) -> Any:
    """The loss of a model call the Trainer made: its output's ``loss`` (:class:`ConfigError` when there is none)."""
    loss = output.get("loss") if isinstance(output, Mapping) else None  # a ModelOutput is a Mapping of its set fields
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].numel() == 1:
        loss = output[0]  # return_dict=False: (loss, logits, ...) when the call had labels
    if loss is None:
        raise ConfigError(
            "BingoTrainerCallback: the Trainer called the model without labels (label_smoothing_factor > 0, or a "
            "compute_loss that pops them), so its output has no loss for the fake passes to measure: leave the labels "
            "in the model's inputs, or pass closure=(model, args, kwargs) -> loss"
        )
    return loss


def _resumed_checkpoint() -> str | None:
    """The folder the running ``Trainer.train`` resumes from, or None if it cannot be told.

    The Trainer hands callbacks its state, not the ``resume_from_checkpoint``
    it was given, and ``output_dir/checkpoint-<step>`` may be another run's
    folder (or none, for a checkpoint elsewhere): the path is read from the
    Trainer's own frame on the stack, ``_inner_training_loop(...,
    resume_from_checkpoint, ...)``, which ``train`` calls with the folder it
    resolved (``True`` already turned into the last checkpoint).
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if isinstance(frame.f_locals.get("self"), Trainer) and "resume_from_checkpoint" in frame.f_code.co_varnames:
                folder = frame.f_locals.get("resume_from_checkpoint")
                if isinstance(folder, (str, os.PathLike)):
                    return os.fspath(folder)
            frame = frame.f_back
        return None
    finally:
        del frame


def _load_state(path: Path) -> dict:
    """The search state saved at ``path``: a checksummed bingo checkpoint (:func:`bingo.io.load_checkpoint`).

    A file of an older bingo, written with a plain ``torch.save`` and no
    checksum, is still loaded (tensors and plain data only, as before), with
    a warning that it could not be verified; anything unreadable is the
    one-line :class:`CheckpointError` of :func:`~bingo.io.load_checkpoint`.
    """
    try:
        return load_checkpoint(path)
    except CheckpointError:
        try:
            legacy = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - corrupt or foreign: the checked loader's message says so
            legacy = None
        if not isinstance(legacy, dict) or "format" in legacy or "sha256" in legacy:
            raise
    warnings.warn(f"{path} was written by an older bingo without a checksum; it is loaded unverified, and the next "
                  "save writes it checksummed", stacklevel=3)
    return legacy
