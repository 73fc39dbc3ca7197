"""A plain training loop with an optional ticket search, resumable per epoch.

This is what the CLI runs; library users keep their own loop and add the two
lines shown in the README. The data order comes from a ``torch.Generator``
seeded by the config, so two runs with the same seed see the same batches.
"""

from __future__ import annotations

import copy
import hashlib
import math
import operator
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checks import check_field_types
from .. import distributed
from .data import Dataset
from ..devices import model_device, to_device
from ..masks import cached_masks
from ..errors import CheckpointError, ConfigError, TrainingError, check_choice
from ..io import load_checkpoint, save_checkpoint
from ..search import TicketSearch

__all__ = ["DIVERGED_LOSS_FACTOR", "OPTIMIZERS", "SEED_RANGE", "TrainConfig", "check_seed", "TrainResult", "data_digest", "evaluate", "load_model_state", "train"]

OPTIMIZERS = ("adam", "sgd")
#: The seeds a torch generator takes (``torch.Generator().manual_seed``): 64-bit, signed or unsigned.
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(seed: object, what: str = "seed") -> int:
    """``seed`` as an int, or :class:`ConfigError` naming :data:`SEED_RANGE` (was an OverflowError deep in torch)."""
    low, high = SEED_RANGE
    try:
        value = operator.index(seed)  # int, numpy integers; not floats, not bool
    except TypeError:
        value = None
    if value is None or isinstance(seed, bool) or not low <= value <= high:
        raise ConfigError(f"{what} must be a whole number in [{low}, {high}], got {seed!r}")
    return value

#: An epoch whose mean training loss is over this many times ``ln(num_classes)``
#: (the cross-entropy of guessing every class equally) has diverged, even if
#: every number is still finite. On digits with the mlp, lenet300 and conv
#: models, every Adam/SGD run that ended at chance accuracy (lr 1 and up)
#: had a first-epoch mean of 300 to 1e22 times that, and every run that
#: learned stayed under 12 times it.
DIVERGED_LOSS_FACTOR = 100


@dataclass(frozen=True)
class TrainConfig:
    """How the model is trained. Field ``help`` texts become CLI help."""

    epochs: int = field(default=3, metadata={"help": "training epochs"})
    batch_size: int = field(default=128, metadata={"help": "training batch size"})
    lr: float = field(default=1.2e-3, metadata={"help": "learning rate (Adam 1.2e-3 as in the Lottery Ticket paper's LeNet)"})
    optimizer: str = field(default="adam", metadata={"help": "adam, or sgd (momentum 0.9)", "choices": OPTIMIZERS})
    seed: int = field(default=0, metadata={"help": "seed for data order", "cli": False})

    def __post_init__(self) -> None:
        check_field_types(self)
        if int(self.epochs) != self.epochs or self.epochs < 0:
            raise ConfigError(f"epochs must be a whole number >= 0, got {self.epochs!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ConfigError(f"batch size must be a whole number >= 1, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a finite number > 0, got {self.lr!r}")
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_seed(self.seed)


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
@cached_masks()  # a masked model's weights are multiplied out once, not once per batch
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2048) -> float:
    """Accuracy of ``model`` on ``(x, y)`` in eval mode; the train/eval flag is restored."""
    if len(x) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    device = model_device(model)
    try:
        for start in range(0, len(x), batch_size):
            outputs = model(to_device(x[start : start + batch_size], device))
            correct += int((outputs.argmax(dim=1) == to_device(y[start : start + batch_size], device)).sum())
    finally:
        model.train(was_training)
    return correct / len(x)


def _data_signature(data: Dataset) -> str:
    """What a checkpoint records of its data, to refuse resuming on other data."""
    return f"{data.name} ({len(data.x_train)} training examples of shape {tuple(data.input_shape)})"


def data_digest(data: Dataset) -> str:
    """SHA-256 (hex) of the training and validation splits as trained on: dtype, shape and every byte, labels too.

    What a training checkpoint records beside :func:`_data_signature`: other
    data of the same name, count and shape (an ``.npz`` rewritten in place)
    has another digest.
    """
    digest = hashlib.sha256()
    for tensor in (data.x_train, data.y_train, data.x_val, data.y_val):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{flat.dtype}{tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def load_model_state(model: nn.Module, state: dict, source: str | os.PathLike) -> None:
    """``model.load_state_dict(state)`` with a one-line :class:`CheckpointError` if it does not fit."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"checkpoint {source} does not fit the model: {detail}") from None


def _lower_lr(config: TrainConfig) -> str:
    return f"try a lower learning rate (--lr, now {config.lr})"


def _check_weights(model: nn.Module, epoch: int, config: TrainConfig) -> None:
    """Raise :class:`TrainingError` naming the first parameter that holds a NaN or infinity."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not bool(torch.isfinite(parameter).all()):
                raise TrainingError(f"training diverged in epoch {epoch + 1}: {name} is not finite; {_lower_lr(config)}")


_TRAIN_KEYS = ("config", "data", "epoch", "steps", "train_seconds", "model", "optimizer", "search", "order", "rng")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_generator_state(checkpoint: str | os.PathLike, key: str, state: object) -> None:
    try:
        torch.Generator().set_state(state)  # a throwaway generator: nothing is changed yet
    except (TypeError, RuntimeError, ValueError):
        raise CheckpointError(f"checkpoint {checkpoint}: {key} is not a random generator state") from None


def _check_optimizer_state(checkpoint: str | os.PathLike, optimizer: torch.optim.Optimizer, state: object) -> None:
    """Load ``state`` into the fresh ``optimizer``; refuse what would fail, or fail later at ``step()``."""

    def refuse(detail: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {checkpoint}: optimizer state does not fit this model and optimizer: {detail}")

    try:
        optimizer.load_state_dict(state)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise refuse(lines[0] if lines else type(exc).__name__) from None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, parameter in enumerate(params):
        for name, value in optimizer.state.get(parameter, {}).items():
            if isinstance(value, torch.Tensor):
                if value.dim() > 0 and value.shape != parameter.shape:
                    raise refuse(f"{name} of parameter {index} has shape {tuple(value.shape)}, the parameter {tuple(parameter.shape)}")
            elif value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                raise refuse(f"{name} of parameter {index} is a {type(value).__name__}")


def _resume(
    checkpoint: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    searches: list[TicketSearch],
    order: torch.Generator,
    data: Dataset,
    config: TrainConfig,
) -> tuple[int, int, float]:
    """Load a training checkpoint into the run; return ``(epochs done, steps, seconds)``.

    Every field is checked before anything is changed, and a failure while
    loading puts the model and searches back as they were: a bad checkpoint
    is one :class:`CheckpointError` and leaves the caller's objects (and the
    file) as they were.
    """
    state = load_checkpoint(checkpoint)
    if state.get("kind") != "bingo-train":
        raise CheckpointError(f"{checkpoint} is not a bingo training checkpoint")
    missing = [key for key in _TRAIN_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} lacks {', '.join(missing)}; not a complete training checkpoint")
    if not isinstance(state["config"], dict):
        raise CheckpointError(f"checkpoint {checkpoint}: config must be a dict of training settings, got {type(state['config']).__name__}")
    # Epochs may grow between runs (train longer from a checkpoint); the rest must match.
    saved = {k: v for k, v in state["config"].items() if k != "epochs"}
    wanted = {k: v for k, v in asdict(config).items() if k != "epochs"}
    if saved != wanted:
        differing = ", ".join(f"{k}={saved.get(k)!r} (now {wanted[k]!r})" for k in wanted if saved.get(k) != wanted[k])
        raise CheckpointError(f"checkpoint {checkpoint} was written with different training settings: {differing}")
    if state["data"] != _data_signature(data):
        raise CheckpointError(f"checkpoint {checkpoint} was trained on {state['data']}, not on {_data_signature(data)}")
    if "data_sha256" not in state:  # written before bingo recorded the digest: name, count and shape are all it can check
        warnings.warn(f"checkpoint {checkpoint} records no digest of its data (an older bingo wrote it): resumed as it matches "
                      f"{_data_signature(data)} by name, count and shape, its contents unchecked", UserWarning, stacklevel=3)
    elif state["data_sha256"] != data_digest(data):
        raise CheckpointError(f"checkpoint {checkpoint} was trained on other data: {_data_signature(data)} holds other values "
                              "than it did (its SHA-256 differs); give the data it was trained on, or another --checkpoint")
    for key in ("epoch", "steps"):
        if not _whole(state[key]):
            raise CheckpointError(f"checkpoint {checkpoint}: {key} must be a whole number >= 0, got {state[key]!r}")
    seconds = state["train_seconds"]
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
        raise CheckpointError(f"checkpoint {checkpoint}: train_seconds must be a number >= 0, got {seconds!r}")
    if state["epoch"] > config.epochs:
        raise CheckpointError(
            f"checkpoint {checkpoint} has {state['epoch']} epochs done, more than the {config.epochs} asked for"
        )
    for key in ("order", "rng"):
        _check_generator_state(checkpoint, key, state[key])
    saved_searches = state["search"]
    saved_searches = [] if saved_searches is None else (saved_searches if isinstance(saved_searches, list) else [saved_searches])
    if len(saved_searches) != len(searches):
        raise CheckpointError(
            f"checkpoint {checkpoint} was written with {len(saved_searches)} ticket search(es), this run has {len(searches)}"
        )

    model_before = copy.deepcopy(model.state_dict())
    searches_before = [copy.deepcopy(one.state_dict()) for one in searches]
    try:
        load_model_state(model, state["model"], checkpoint)
        _check_optimizer_state(checkpoint, optimizer, state["optimizer"])  # the optimizer is this run's own
        for one, one_state in zip(searches, saved_searches):
            try:
                one.load_state_dict(one_state)
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
                raise CheckpointError(f"checkpoint {checkpoint}: {str(exc).strip() or type(exc).__name__}") from None
    except CheckpointError:
        model.load_state_dict(model_before)
        for one, before in zip(searches, searches_before):
            one.load_state_dict(before)
        raise
    order.set_state(state["order"])
    torch.set_rng_state(state["rng"])
    return state["epoch"], state["steps"], float(seconds)


#: fewer training steps than this in a whole run draw a warning (the issue-20 case: 3 epochs of a 500-sample file, 9 steps)
FEW_STEPS = 10


def warn_if_few_steps(config: TrainConfig, examples: int) -> None:
    """A warning when the whole run is under :data:`FEW_STEPS` training steps (``bingo run``, ``bingo compare``)."""
    steps = config.epochs * -(-examples // config.batch_size)
    if 0 < steps < FEW_STEPS:
        warnings.warn(f"only {steps} training steps in all ({config.epochs} epochs of {-(-examples // config.batch_size)} batches "
                      f"of {config.batch_size} from {examples} examples): too few for training and the search to learn much; "
                      "raise --epochs or lower --batch-size")


def on_terminal() -> bool:
    """True when stderr is a terminal: where progress bars go (elsewhere, plain lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


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
    max_steps: int | None = None,
) -> TrainResult:
    """Train ``model`` on ``data.x_train`` with cross-entropy; call ``search.step`` after every step.

    ``max_steps`` stops after that many optimizer steps (part of an epoch:
    a short recovery fine-tune); it takes no ``checkpoint``.

    ``search`` may also be a list of searches (they never perturb training,
    so several can watch the same run, e.g. to compare estimators).

    With ``checkpoint``, the whole state (model, optimizer, search, data order,
    global RNG, elapsed time) is written atomically after every epoch, and a
    run that finds the file resumes after its last completed epoch, giving
    the same model and the same scores as an uninterrupted run.

    ``callback(step)`` runs after every optimizer step (and search step), with
    the number of steps taken so far: the place for schedules such as gradual
    magnitude pruning or saving weights to rewind to.

    Under ``torch.distributed`` (``torchrun``), the model trains wrapped in
    ``DistributedDataParallel``: every rank draws the same global batch (one
    data order, seeded the same) and trains on its shard of it
    (:func:`bingo.distributed.shard`), so the global batch is the
    one-process batch (the gradient is the mean of the shards' mean losses:
    the one-process gradient when the shards are equal in size); a last
    global batch with fewer than two samples per process is dropped; the
    loss checked for divergence is the mean over ranks; only rank 0 writes
    the checkpoint and shows progress.

    Training stops with a :class:`~bingo.errors.TrainingError` when it
    diverges: a loss that is not finite (checked every step, before the
    step is taken), a weight that is not finite, or an epoch's mean loss over
    :data:`DIVERGED_LOSS_FACTOR` times ``ln(num_classes)`` (both checked at
    the end of each epoch, before its checkpoint is written, so the
    checkpoint keeps the last good epoch).

    Raises:
        CheckpointError: ``checkpoint`` exists but cannot be resumed here
            (unreadable, other settings, data or model, a bad field); the
            model, searches and file are left as they were.
        TrainingError: training diverged.
    """
    searches = [] if search is None else (list(search) if isinstance(search, (list, tuple)) else [search])
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0 or checkpoint is not None):
        raise ConfigError(f"max_steps must be a whole number >= 0 and takes no checkpoint, got {max_steps!r}")
    optimizer = _make_optimizer(model, config)
    order = torch.Generator().manual_seed(config.seed)
    first_epoch, steps, elapsed = 0, 0, 0.0
    if checkpoint is not None and Path(checkpoint).exists():
        first_epoch, steps, elapsed = _resume(checkpoint, model, optimizer, searches, order, data, config)

    n = len(data.x_train)
    steps_per_epoch = (n + config.batch_size - 1) // config.batch_size
    trained = model
    if distributed.active():  # on a GPU, DDP's buckets live on this rank's device
        cuda = model_device(model).type == "cuda"
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[model_device(model).index] if cuda else None)
    label = description or ("train" + (" + ticket search" if searches else ""))
    reporting = progress and distributed.is_main_process()
    # A bar on a terminal only: piped into a log, tqdm's \r-frames bury the lines that matter; a line per epoch instead.
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        initial=first_epoch * steps_per_epoch,
        desc=label,
        unit="step",
        disable=not reporting or not on_terminal(),
        leave=False,
    )
    plain_lines = reporting and not on_terminal()
    diverged_loss = DIVERGED_LOSS_FACTOR * math.log(max(int(data.num_classes), 2))
    digest = data_digest(data) if checkpoint is not None and distributed.is_main_process() else None  # once, not per epoch
    device = model_device(model)  # the data go where the model is, a batch at a time
    model.train()
    try:
        for epoch in range(first_epoch, config.epochs):
            start = time.perf_counter()
            permutation = torch.randperm(n, generator=order)
            loss_sum, epoch_steps = 0.0, 0
            for i in range(0, n, config.batch_size):
                if max_steps is not None and steps >= max_steps:
                    break
                if distributed.active() and len(permutation[i : i + config.batch_size]) < 2 * distributed.world_size():
                    # Under DDP, a last global batch too small to give every process two samples is dropped
                    # (an empty shard has no loss; BatchNorm needs two values): on every rank alike.
                    continue
                index = distributed.shard(permutation[i : i + config.batch_size])
                x, y = to_device(data.x_train[index], device), to_device(data.y_train[index], device)
                loss = F.cross_entropy(trained(x), y)
                value = distributed.mean_over_ranks([loss.item()])[0]
                if not math.isfinite(value):  # before the step: the model keeps its last finite weights
                    raise TrainingError(
                        f"training diverged at epoch {epoch + 1}, step {i // config.batch_size + 1} of {steps_per_epoch}: "
                        f"the loss is {value}; {_lower_lr(config)}"
                    )
                loss_sum += value
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                for one in searches:
                    one.step(x, y)
                steps += 1
                epoch_steps += 1
                if callback is not None:
                    callback(steps)
                bar.update(1)
            elapsed += time.perf_counter() - start
            # Checked before the epoch is saved, so a checkpoint never holds a diverged model.
            _check_weights(model, epoch, config)
            mean_loss = float(loss_sum) / max(epoch_steps if max_steps is not None else steps_per_epoch, 1)
            if plain_lines:
                print(f"{label}: epoch {epoch + 1}/{config.epochs}, mean loss {mean_loss:.4f}", file=sys.stderr, flush=True)
            if mean_loss > diverged_loss:
                raise TrainingError(
                    f"training diverged in epoch {epoch + 1}: its mean loss {mean_loss:.3g} is over "
                    f"{DIVERGED_LOSS_FACTOR} times that of guessing ({diverged_loss / DIVERGED_LOSS_FACTOR:.2f}); {_lower_lr(config)}"
                )
            if checkpoint is not None and distributed.is_main_process():
                save_checkpoint(
                    {
                        "kind": "bingo-train",
                        "config": asdict(config),
                        "data": _data_signature(data),
                        "data_sha256": digest,
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
            distributed.barrier()  # no rank runs ahead of the checkpoint rank 0 is writing
            if max_steps is not None and steps >= max_steps:
                break
    finally:
        bar.close()
    distributed.broadcast_buffers(model)  # each rank's BatchNorm counted its own last shard: make them rank 0's
    return TrainResult(
        train_seconds=elapsed,
        search_seconds=sum(one.seconds for one in searches),
        steps=steps,
        epochs=config.epochs,
    )
