"""BINGO in a Hugging Face ``Trainer``: ``pip install bingo-prune[transformers]``.

    from bingo.integrations.transformers import BingoTrainerCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[BingoTrainerCallback(sparsity=0.5)])
    trainer.train()                          # the model is pruned to 50% when training ends

The callback attaches a ticket search when training begins, steps it at
``on_optimizer_step`` (after the optimizer step, before the Trainer zeroes
the gradients: the taylor and hybrid estimators read them; once per
optimizer step, whatever ``gradient_accumulation_steps``), saves its state
into every checkpoint folder (``bingo_search.pt``) and restores it when
training resumes from one, and prunes when training ends (settings:
:class:`~bingo.integrations.session.PruneAfterTraining`). Fake passes re-run
the model on the last training batch it was called with (the model's loss
output, so the batch must carry labels), or ``closure(model, args, kwargs)``
if given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("bingo.integrations.transformers needs Hugging Face Transformers: pip install 'bingo-prune[transformers]'") from exc

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..io import load_checkpoint, save_checkpoint
from .session import PruneAfterTraining

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
    """

    def __init__(self, sparsity: float | str | None = None, *, closure: Callable[[nn.Module, tuple, dict], Any] | None = None, **settings: Any) -> None:
        self.session = PruneAfterTraining(sparsity, **settings)
        self.closure = closure
        self._call: tuple[tuple, dict] | None = None
        self._hook = None

    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:  # training forwards only; fake passes run in eval mode
            self._call = (args, kwargs)

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        self.session.start(model)
        if state.global_step > 0:  # resumed: the checkpoint of this step holds the search
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not saved.exists():
                raise ConfigError(f"resuming at step {state.global_step} but {saved} is missing: the search's state was not saved with this checkpoint")
            self.session.load_state_dict(_load_state(saved))
        self._hook = model.register_forward_pre_hook(self._remember, with_kwargs=True)

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._call is None:
            return
        call_args, call_kwargs = self._call
        if self.closure is not None:
            self.session.step(lambda m: self.closure(m, call_args, call_kwargs))
        else:
            self.session.step(lambda m: m(*call_args, **call_kwargs))  # a ModelOutput's "loss" is read as the loss

    def on_save(self, args, state, control, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            save_checkpoint(self.session.state_dict(), folder / STATE_FILE)  # atomic, checksummed: as every bingo checkpoint

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.session.finish(model)


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
