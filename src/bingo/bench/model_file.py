"""The ``--save`` file of ``bingo run``: a pruned harness model with what it takes to rebuild it, and its export.

:func:`save_model_file` writes it; :func:`export_checkpoint` rebuilds the named
model (:data:`bingo.bench.models.MODELS`) and exports it with
:func:`bingo.export_model`. ``bingo.export_checkpoint`` is this function,
imported when called.
"""

from __future__ import annotations

import math
import os

from torch import nn

from ..errors import CheckpointError
from ..export import ExportResult, export_model
from ..io import load_checkpoint, save_checkpoint
from ..masks import load_pruned_state_dict
from .data import Dataset
from .models import build_model

__all__ = ["export_checkpoint", "save_model_file"]

_CHECKPOINT_KEYS = ("model", "input_shape", "num_classes", "preprocess", "state_dict")


def save_model_file(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    architecture: str,
    data: Dataset,
    granularity: str,
    sparsity: float | str,
    accuracy: float,
) -> None:
    """Write the ``--save`` file of ``bingo run`` (atomically): what :func:`export_checkpoint` reads.

    A dict with ``kind: "bingo-model"``, the architecture name, granularity,
    the data's input and raw shapes, number of classes and preprocessing,
    sparsity, accuracy and the pruned ``state_dict`` (with masks).
    """
    save_checkpoint(
        {
            "kind": "bingo-model",
            "model": architecture,
            "granularity": granularity,
            "input_shape": list(data.input_shape),
            "raw_shape": list(data.raw_shape),
            "num_classes": data.num_classes,
            "preprocess": {"offset": data.offset, "scale": data.scale},
            "sparsity": sparsity,
            "accuracy": accuracy,
            "state_dict": model.state_dict(),
        },
        path,
    )


def _count(value: object) -> bool:
    """A whole number >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shape(checkpoint: str | os.PathLike, key: str, value: object) -> tuple[int, ...]:
    """``value`` as a shape: a non-empty list of whole numbers >= 1; else a one-line :class:`CheckpointError`."""
    if not isinstance(value, (list, tuple)) or not value or not all(_count(d) for d in value):
        raise CheckpointError(f"{checkpoint}: {key} must be a list of whole numbers >= 1, got {value!r}; the file is damaged")
    return tuple(value)


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shrink_units: bool | None = None,
    onnx: bool = False,
) -> ExportResult:
    """Export the ``--save`` file of ``bingo run`` with :func:`bingo.export_model`.

    The checkpoint is a dict with ``kind: "bingo-model"``, ``model`` (a name
    in :data:`bingo.bench.models.MODELS`), ``input_shape``, ``num_classes``,
    ``preprocess: {offset, scale}``, ``state_dict`` (with masks) and
    optionally ``sparsity`` and ``accuracy``, which go to ``model.json``, and
    ``raw_shape``, the per-sample shape of the dataset's own layout that the
    exported program takes (default: ``input_shape``).

    Raises:
        CheckpointError: unreadable, not a bingo model file, or a state dict
            that does not fit the named model.
    """
    ckpt = load_checkpoint(checkpoint)
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "bingo-model":
        kind = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{checkpoint} is not a bingo model file (kind {kind!r}); expected the --save file of 'bingo run'")
    missing = [key for key in _CHECKPOINT_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{checkpoint} lacks {', '.join(missing)}; a bingo model file has {', '.join(_CHECKPOINT_KEYS)}")
    preprocess = ckpt["preprocess"]
    if not isinstance(preprocess, dict) or not {"offset", "scale"} <= set(preprocess):
        raise CheckpointError(f"{checkpoint}: preprocess must be {{offset, scale}}, got {preprocess!r}")
    if not all(_number(preprocess[key]) for key in ("offset", "scale")) or preprocess["scale"] == 0:
        raise CheckpointError(f"{checkpoint}: preprocess offset and scale must be finite numbers, scale not 0, got {preprocess!r}")
    input_shape = _shape(checkpoint, "input_shape", ckpt["input_shape"])
    raw_shape = _shape(checkpoint, "raw_shape", ckpt.get("raw_shape", list(input_shape)))
    if not _count(ckpt["num_classes"]):
        raise CheckpointError(f"{checkpoint}: num_classes must be a whole number >= 1, got {ckpt['num_classes']!r}")
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{checkpoint}: state_dict must be a dict of tensors, got {type(ckpt['state_dict']).__name__}")
    if math.prod(raw_shape) != math.prod(input_shape):
        raise CheckpointError(f"{checkpoint}: raw_shape {list(raw_shape)} does not hold the {math.prod(input_shape)} values of input_shape {list(input_shape)}")
    model = build_model(ckpt["model"], input_shape, int(ckpt["num_classes"]))
    load_pruned_state_dict(model, ckpt["state_dict"])
    metadata = {"architecture": ckpt["model"], "num_classes": int(ckpt["num_classes"]), "source": os.fspath(checkpoint)}
    for key in ("sparsity", "accuracy", "granularity"):
        if key in ckpt:
            metadata[key] = ckpt[key]
    if shrink_units is None and "granularity" in ckpt:
        shrink_units = ckpt["granularity"] == "neuron"
    return export_model(
        model, (preprocess["offset"], preprocess["scale"]), input_shape, out_dir,
        metadata=metadata, raw_shape=raw_shape, shrink_units=shrink_units, onnx=onnx,
    )
