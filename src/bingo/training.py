"""A plain training loop with an optional ticket search, resumable per epoch.

This is what the CLI runs; library users keep their own loop and add the two
lines shown in the README. The data order comes from a ``torch.Generator``
seeded by the config, so two runs with the same seed see the same batches.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset
from .errors import CheckpointError, ConfigError, check_choice
from .io import load_checkpoint, save_checkpoint
from .search import TicketSearch

__all__ = ["OPTIMIZERS", "TrainConfig", "TrainResult", "evaluate", "load_model_state", "train"]

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Field ``help`` texts become CLI help."""

    epochs: int = field(default=3, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    lr: float = field(default=1.2e-3, metadata={"help": "learning rate (Adam 1.2e-3 as in the Lottery Ticket paper's LeNet)"})
    optimizer: str = field(default="adam", metadata={"help": "adam, or sgd (momentum 0.9)", "choices": OPTIMIZERS})
    seed: int = field(default=0, metadata={"help": "seed for data order", "cli": False})

    def __post_init__(self) -> None:
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise ConfigError(f"epochs must be a whole number >= 0, got {self.epochs!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ConfigError(f"batch size must be a whole number >= 1, got {self.batch_size!r}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr!r}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)


@dataclass
class TrainResult:
    """Timing and counts of one training run (resumed runs include earlier epochs)."""

    train_seconds: float  #: wall time of training, search included
    search_seconds: float  #: part of train_seconds spent in TicketSearch.step
    steps: int  #: optimizer steps taken
    epochs: int  #: epochs completed


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in eval mode; the train/eval flag is restored."""
    if len(x) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, len(x), batch_size):
            outputs = model(x[start : start + batch_size])
            correct += int((outputs.argmax(dim=1) == y[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    return correct / len(x)


def _data_signature(data: Dataset) -> str:
    """What a checkpoint records of its data, to refuse resuming on other data."""
    return f"{data.name} ({len(data.x_train)} training examples of shape {tuple(data.input_shape)})"


def load_model_state(model: nn.Module, state: dict, source: str | os.PathLike) -> None:
    """``model.load_state_dict(state)`` with a one-line :class:`CheckpointError` if it does not fit."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"checkpoint {source} does not fit the model: {detail}") from None


def train(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    *,
    search: TicketSearch | Sequence[TicketSearch] | None = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = True,
    callback: Callable[[int], None] | None = None,
    description: str | None = None,
) -> TrainResult:
    """Train ``model`` on ``data.x_train`` with cross-entropy; call ``search.step`` after every step.

    ``search`` may also be a list of searches (they never perturb training,
    so several can watch the same run, e.g. to compare estimators).

    With ``checkpoint``, the whole state (model, optimizer, search, data order,
    global RNG, elapsed time) is written atomically after every epoch, and a
    run that finds the file resumes after its last completed epoch, giving
    the same model and the same scores as an uninterrupted run.

    ``callback(step)`` runs after every optimizer step (and search step), with
    the number of steps taken so far: the place for schedules such as gradual
    magnitude pruning or saving weights to rewind to.
    """
    searches = [] if search is None else (list(search) if isinstance(search, (list, tuple)) else [search])
    optimizer = _make_optimizer(model, config)
    order = torch.Generator().manual_seed(config.seed)
    first_epoch, steps, elapsed = 0, 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        if not isinstance(state, dict) or state.get("kind") != "bingo-train":
            raise CheckpointError(f"{checkpoint} is not a bingo training checkpoint")
        # Epochs may grow between runs (train longer from a checkpoint); the rest must match.
        saved = {k: v for k, v in state["config"].items() if k != "epochs"}
        wanted = {k: v for k, v in asdict(config).items() if k != "epochs"}
        if saved != wanted:
            differing = ", ".join(f"{k}={saved.get(k)!r} (now {wanted[k]!r})" for k in wanted if saved.get(k) != wanted[k])
            raise CheckpointError(f"checkpoint {checkpoint} was written with different training settings: {differing}")
        if state.get("data") != _data_signature(data):
            raise CheckpointError(
                f"checkpoint {checkpoint} was trained on {state.get('data')}, not on {_data_signature(data)}"
            )
        if state["epoch"] > config.epochs:
            raise CheckpointError(
                f"checkpoint {checkpoint} has {state['epoch']} epochs done, more than the {config.epochs} asked for"
            )
        load_model_state(model, state["model"], checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        saved = state["search"]
        saved = [] if saved is None else (saved if isinstance(saved, list) else [saved])
        if len(saved) != len(searches):
            raise CheckpointError(
                f"checkpoint {checkpoint} was written with {len(saved)} ticket search(es), this run has {len(searches)}"
            )
        for one, one_state in zip(searches, saved):
            one.load_state_dict(one_state)
        order.set_state(state["order"])
        torch.set_rng_state(state["rng"])
        first_epoch, steps, elapsed = state["epoch"], state["steps"], state["train_seconds"]

    n = len(data.x_train)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        initial=first_epoch * steps_per_epoch,
        desc=description or ("train" + (" + ticket search" if searches else "")),
        unit="step",
        disable=not progress,
        leave=False,
    )
    model.train()
    try:
        for epoch in range(first_epoch, config.epochs):
            start = time.perf_counter()
            permutation = torch.randperm(n, generator=order)
            for i in range(0, n, config.batch_size):
                index = permutation[i : i + config.batch_size]
                x, y = data.x_train[index], data.y_train[index]
                loss = F.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                for one in searches:
                    one.step(x, y)
                steps += 1
                if callback is not None:
                    callback(steps)
                bar.update(1)
            elapsed += time.perf_counter() - start
            if checkpoint is not None:
                save_checkpoint(
                    {
                        "kind": "bingo-train",
                        "config": asdict(config),
                        "data": _data_signature(data),
                        "epoch": epoch + 1,
                        "steps": steps,
                        "train_seconds": elapsed,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "search": [one.state_dict() for one in searches] or None,
                        "order": order.get_state(),
                        "rng": torch.get_rng_state(),
                    },
                    checkpoint,
                )
    finally:
        bar.close()
    return TrainResult(
        train_seconds=elapsed,
        search_seconds=sum(one.seconds for one in searches),
        steps=steps,
        epochs=config.epochs,
    )
