"""Saving a pruned model small, and exporting it to run without bingo.

Two things live here:

- **Compact files for weight-level pruning.** :func:`save_compact` keeps, per
  masked tensor, only the surviving values plus a bitmask packed eight
  entries to a byte (``numpy.packbits``), and every other tensor dense, in one
  safetensors file. At sparsity ``s`` a float32 weight costs about
  ``4 (1 - s) + 1/8`` bytes per entry instead of 4 (a plain ``state_dict``)
  or 8 (a masked ``state_dict``, which holds ``weight_orig`` and a float mask).
  :func:`load_compact` restores it.
- **Self-contained export.** :func:`export_model` writes a folder with
  ``model.pt2`` (a ``torch.export`` program with a dynamic batch dimension
  that includes the dataset's preprocessing, so it takes *raw* values),
  ``weights.safetensors`` and ``model.json``. Loading it needs only
  ``torch.export.load(path).module()``: no bingo, no model class.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checks import check_model, check_shape
from .distributed import unwrap
from .errors import CheckpointError, ConfigError
from .io import atomic_write, write_json
from .layer_types import layer_type_of, unit_matrix
from .layers import unit_axis
from .masks import load_pruned_state_dict, make_permanent
from .shrink import count_parameters, is_shrunk, shrink

__all__ = [
    "COMPACT_FORMAT",
    "EXPORT_FORMAT",
    "ExportResult",
    "RawInputModel",
    "export_checkpoint",
    "export_model",
    "load_compact",
    "save_compact",
    "state_dict_size",
]

COMPACT_FORMAT = "bingo-compact"
EXPORT_FORMAT = "bingo-export"
_VALUES, _BITS = ".values", ".bitmask"


# --------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------


def state_dict_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of the usual checkpoint file.

    A masked model's state dict holds ``weight_orig`` and the mask, so it is
    about twice the dense one; bake the masks in (:func:`bingo.make_permanent`
    on a copy) to measure the plain dense file.
    """
    check_model("state_dict_size", model, meta=False)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# --------------------------------------------------------------------------
# compact files
# --------------------------------------------------------------------------


def save_compact(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model``'s state with only the surviving entries of every masked tensor.

    For every ``<module>.<name>_mask`` in the state dict (weights, and biases
    under neuron granularity) the file holds ``<module>.<name>.values`` (the
    entries the mask keeps, in row-major order) and ``<module>.<name>.bitmask``
    (the mask, ``numpy.packbits`` of its flattened bools, uint8). Every other
    entry (unmasked parameters, BatchNorm statistics, ...) is stored dense
    under its own key. Shapes and dtypes go in the safetensors metadata. The
    file is written atomically. Values at pruned positions (``weight_orig``
    where the mask is 0) are not stored: they never reach the forward pass.
    A wrapped model (``torch.compile``, DDP, ``nn.DataParallel``) is saved as
    its inner module, keys without the wrapper's prefix.
    """
    check_model("save_compact", model)
    state = unwrap(model).state_dict()
    tensors: dict[str, torch.Tensor] = {}
    masked: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        if key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state:
            continue
        if key.endswith("_orig") and key[: -len("_orig")] + "_mask" in state:
            logical = key[: -len("_orig")]
            mask_tensor = state[logical + "_mask"]
            mask = mask_tensor.detach().bool().cpu()
            tensors[logical + _VALUES] = value.detach().cpu()[mask].contiguous()
            tensors[logical + _BITS] = torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))
            masked[logical] = {"shape": list(mask.shape), "mask_dtype": str(mask_tensor.dtype).removeprefix("torch.")}
        else:
            tensors[key] = value.detach().cpu().clone().contiguous()
    metadata = {"format": COMPACT_FORMAT, "version": "1", "masked": json.dumps(masked)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_compact(model: nn.Module, path: str | os.PathLike, *, masks: bool = True) -> nn.Module:
    """Load a file written by :func:`save_compact` into ``model`` (in place) and return it.

    ``model`` is a model of the same architecture, fresh (unpruned) or pruned
    with the same masks. With ``masks=True`` the masks are put back through
    :func:`bingo.load_pruned_state_dict`, so the model is pruned exactly as the
    saved one (``weight_orig`` holds the survivors and zeros elsewhere) and
    stays so through further training. With ``masks=False`` the weights are
    loaded plain, zeros included, into an unpruned model. Either way every
    weight the forward pass uses is bit-identical to the saved model's.

    Raises:
        CheckpointError: the file is missing, not a compact file, or does not
            fit ``model``.
    """
    check_model("load_compact", model, meta=False)
    wrapped, model = model, unwrap(model)  # keys name the inner module's entries, as save_compact writes them
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise CheckpointError(f"no such compact file: {path}") from None
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read {path} as safetensors: {' '.join(str(exc).split())}") from None
    if metadata.get("format") != COMPACT_FORMAT:
        raise CheckpointError(f"{path} is not a bingo compact file (format {metadata.get('format')!r}, expected {COMPACT_FORMAT!r})")
    state: dict[str, torch.Tensor] = {}
    for logical, shape, mask_dtype in _masked_entries(path, metadata):
        try:
            values, bits = tensors.pop(logical + _VALUES), tensors.pop(logical + _BITS)
        except KeyError:
            raise CheckpointError(f"{path} is corrupt: {logical!r} lacks its values or bitmask") from None
        if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() * 8 < math.prod(shape):
            raise CheckpointError(f"{path} is corrupt: the bitmask of {logical!r} is not {math.prod(shape)} bits of uint8")
        flat = np.unpackbits(bits.numpy(), count=math.prod(shape)).astype(bool)
        mask = torch.from_numpy(flat).reshape(shape)
        if int(mask.sum()) != values.numel():
            raise CheckpointError(f"{path} is corrupt: {logical!r} has {values.numel()} values for {int(mask.sum())} kept entries")
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[mask] = values.reshape(-1)
        if masks:
            state[logical + "_orig"] = dense
            state[logical + "_mask"] = mask.to(mask_dtype)
        else:
            state[logical] = dense
    state.update(tensors)
    if masks:
        load_pruned_state_dict(model, state)  # refreshes module.weight from the loaded values too
    else:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            raise CheckpointError(f"compact file {path} does not fit the model: {lines[-1] if lines else exc}") from None
    return wrapped


def _masked_entries(path: str | os.PathLike, metadata: dict) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``(logical key, shape, mask dtype)`` of every masked tensor a compact file's metadata lists, or a :class:`CheckpointError`."""
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is corrupt: its metadata {why} (write it again with bingo.save_compact)")

    if "masked" not in metadata:
        raise corrupt("lacks the 'masked' entry")
    try:
        masked = json.loads(metadata["masked"])
    except (TypeError, ValueError) as exc:
        raise corrupt(f"'masked' is not JSON ({' '.join(str(exc).split())})") from None
    if not isinstance(masked, dict):
        raise corrupt(f"'masked' is a {type(masked).__name__}, not a dict")
    entries = []
    for logical, info in masked.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
            raise corrupt(f"gives {logical!r} the shape {shape!r}, not a list of sizes")
        dtype = getattr(torch, str(info.get("mask_dtype", "bool")), None)
        if not isinstance(dtype, torch.dtype):
            raise corrupt(f"gives {logical!r} the mask dtype {info.get('mask_dtype')!r}")
        entries.append((logical, tuple(shape), dtype))
    return entries


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------


class RawInputModel(nn.Module):
    """``model`` behind the dataset's preprocessing: takes raw values, as stored in the dataset.

    ``forward(raw)``: ``raw`` is float32 of shape ``(N, *raw_shape)``; it is
    reshaped to ``(N, *input_shape)`` and standardised as
    ``x = (raw - offset) / scale`` (the same float32 operations as
    :meth:`bingo.bench.data.Dataset.preprocess`, so integer raw values give inputs
    bit-identical to the dataset's), then cast to the dtype of the model's
    floating-point parameters (a float64 or bfloat16 model gets its own dtype)
    and passed to ``model``.
    """

    def __init__(self, model: nn.Module, offset: float, scale: float, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model = check_model("RawInputModel", model, meta=False)
        self.offset = float(offset)
        self.scale = float(scale)
        self.input_shape = check_shape("RawInputModel", "input_shape", input_shape)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.to(torch.float32).reshape(-1, *self.input_shape)
        floating = next((t.dtype for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point()),
                        torch.float32)  # read here: the model may have been cast since
        return self.model(((x - self.offset) / self.scale).to(floating))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote, and the network it exported."""

    directory: Path
    program: Path  #: model.pt2, for torch.export.load
    weights: Path  #: weights.safetensors, the exported network's state dict
    metadata: Path  #: model.json
    onnx: Path | None  #: model.onnx, when asked for and possible
    model: nn.Module  #: the exported network: masks baked in, shrunk if it was
    shrunk: bool  #: whether the network lost units or heads, by this export or before it (see model.json's "shrunk")


def _unit_pruned(model: nn.Module) -> bool:
    """True if some layer carries neuron-granularity masks (whole rows masked, every row all or nothing)."""
    for module in model.modules():
        mask = getattr(module, "weight_mask", None)
        if mask is None or mask.dim() < 2:
            continue
        rows = unit_matrix(mask, unit_axis(module)).bool()
        uniform = (rows.all(dim=1) | ~rows.any(dim=1)).all()
        if uniform and not rows.any(dim=1).all():
            return True
    return False


def _weight_sparsity(model: nn.Module) -> float:
    zeros = total = 0
    for module in _weight_layers(model).values():
        zeros += int((module.weight == 0).sum())
        total += module.weight.numel()
    return zeros / total if total else 0.0


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of a registered layer type that have a weight matrix (``weight``), by name."""
    return {
        name: module for name, module in model.named_modules()
        if layer_type_of(module) is not None and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() >= 2
    }


def _write_program(program, path: Path) -> Path:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())

    return atomic_write(path, write)


def _onnx_bytes(wrapper: nn.Module, example: torch.Tensor, name: str) -> bytes | None:
    """The ONNX program of ``wrapper`` as bytes (None, with a warning, without the packages); nothing is written.

    Made before any file of the export is written, so a model ONNX cannot
    convert leaves the folder as it was (:class:`ConfigError`).
    """
    missing = [package for package in ("onnx", "onnxscript") if importlib.util.find_spec(package) is None]
    if missing:
        warnings.warn(f"ONNX export skipped: {', '.join(missing)} not installed (pip install {' '.join(missing)})", stacklevel=3)
        return None

    import torch.onnx

    # Export in memory and write the protobuf ourselves: given a file, torch.onnx.export
    # puts the weights in a sidecar named after it (here atomic_write's temporary file),
    # and model.onnx is useless without that file.
    try:
        program = torch.onnx.export(
            wrapper, (example,), input_names=["raw"], output_names=["logits"],
            dynamic_shapes={"raw": {0: torch.export.Dim("batch", min=1)}}, verbose=False,
        )
    except Exception as exc:  # noqa: BLE001 - the converter's own failure on an op it lacks, in one line
        raise ConfigError(f"ONNX cannot convert {name} (model.pt2 holds it; leave out onnx): {_onnx_reason(exc)}") from None
    proto = program.model_proto
    size = proto.ByteSize()
    if size >= 2**31:  # protobuf's limit: weights this large cannot be embedded
        raise ConfigError(f"model.onnx would be {size / 2**30:.1f} GiB, over ONNX's 2 GiB limit for one file; use model.pt2")
    return proto.SerializeToString()


def _onnx_reason(exc: Exception) -> str:
    """The line of torch.onnx's long report that names the cause ("No ONNX function found for ... aten.cummax ...")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # its colour codes
    causes = [line.split(">: ", 1)[1] for line in text.splitlines() if line.startswith("<class ") and ">: " in line]
    lines = [line for line in text.splitlines() if line.strip()]
    return (causes[0] if causes else lines[0] if lines else type(exc).__name__).strip()


def _write_bytes(path: Path, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


_RESERVED = {"format", "version", "input", "model_input_shape", "preprocess", "parameters", "weight_sparsity",
             "shrunk", "layers", "attention_heads", "files", "torch_version"}


def export_model(
    model: nn.Module,
    preprocess: tuple[float, float],
    input_shape: tuple[int, ...],
    out_dir: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    raw_shape: tuple[int, ...] | None = None,
    shrink_units: bool | None = None,
    onnx: bool = False,
) -> ExportResult:
    """Export ``model`` with its preprocessing as a self-contained folder.

    Args:
        model: the trained (possibly masked) model; not modified.
        preprocess: ``(offset, scale)`` of the dataset (:class:`bingo.bench.data.Dataset`
            ``.offset`` / ``.scale``): the model expects ``(raw - offset) / scale``.
        input_shape: the model's per-sample input shape (``Dataset.input_shape``).
        out_dir: folder to write; created if needed, existing files replaced.
        metadata: JSON-serialisable facts to record in ``model.json``, e.g.
            ``{"architecture": "lenet300", "sparsity": 0.9, "accuracy": 0.87}``.
        raw_shape: per-sample shape of the raw values the program takes, if
            not ``input_shape`` (e.g. ``(28, 28)`` or ``(784,)``); same number
            of entries.
        shrink_units: remove dead units with :func:`bingo.shrink` first.
            ``None`` (default): shrink when the model carries neuron-granularity
            masks. Masks are made permanent in any case, and attention heads
            pruned by :func:`bingo.prune_heads` are removed
            (:func:`bingo.shrink_heads`).
        onnx: also write ``model.onnx`` (needs the ``onnx`` and ``onnxscript``
            packages; skipped with a warning if they are not installed).

    Writes (each file atomically; ``model.json`` last):
        - ``model.pt2``: ``torch.export`` program, input ``raw`` float32 of
          shape ``(batch, *raw_shape)`` with a dynamic batch (>= 1), output
          the model's logits. Load with ``torch.export.load(p).module()``.
        - ``weights.safetensors``: the exported network's state dict.
        - ``model.onnx`` (with ``onnx=True``): the same program as ONNX, weights
          embedded, so the file works on its own (no external-data sidecar).
          Converted before anything is written (a model ONNX cannot convert
          leaves the folder as it was); a ``model.onnx`` of an earlier export
          is removed when this one writes none, so the folder never holds
          two models.
        - ``model.json``: the caller's ``metadata`` plus input shapes,
          preprocessing, parameter count, weight sparsity, layer shapes, and
          ``"shrunk"``: true when the exported network is physically smaller
          than the model was built, units or heads removed by this export
          or before it (a model returned by :func:`bingo.shrink`,
          :func:`bingo.shrink_coupled` or :func:`bingo.shrink_heads` carries
          that mark); false when nothing was removed, even if ``shrink_units``
          ran and found no dead unit.

    Raises:
        ConfigError: bad preprocessing or shapes, metadata that is not JSON or
            uses a reserved key, a model that cannot be shrunk or exported.
    """
    check_model("export_model", model)
    try:
        offset, scale = (float(v) for v in preprocess)
    except (TypeError, ValueError):
        raise ConfigError(f"preprocess must be (offset, scale) numbers, got {preprocess!r}") from None
    if not (math.isfinite(offset) and math.isfinite(scale)) or scale == 0:
        raise ConfigError(f"preprocess needs a finite offset and a finite nonzero scale, got ({offset}, {scale})")
    input_shape = check_shape("export_model", "input_shape", input_shape)
    raw_shape = input_shape if raw_shape is None else check_shape("export_model", "raw_shape", raw_shape)
    if math.prod(raw_shape) != math.prod(input_shape):
        raise ConfigError(f"raw_shape {raw_shape} has {math.prod(raw_shape)} entries; input_shape {input_shape} has {math.prod(input_shape)}")
    metadata = dict(metadata or {})
    clash = sorted(_RESERVED & set(metadata))
    if clash:
        raise ConfigError(f"metadata key(s) {', '.join(clash)} are reserved; reserved keys: {', '.join(sorted(_RESERVED))}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"metadata must be JSON-serialisable: {exc}") from None
    directory = Path(out_dir)
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"export folder {directory} is a file; give a folder")

    if shrink_units is None:
        shrink_units = _unit_pruned(model)
    if shrink_units:
        net = shrink(model, input_shape)
    else:
        net = copy.deepcopy(model)
        make_permanent(net)
    if any(isinstance(m, nn.MultiheadAttention) and hasattr(m, "in_proj_weight_mask") for m in model.modules()):
        from .heads import shrink_heads

        net = shrink_heads(net)  # attention heads whose output is zero go (the exact ones only)
    net.eval()
    wrapper = RawInputModel(net, offset, scale, input_shape).eval()
    example = torch.zeros((2, *raw_shape))
    try:
        with torch.no_grad():
            program = torch.export.export(
                wrapper, (example,), dynamic_shapes={"raw": {0: torch.export.Dim("batch", min=1)}}
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"torch.export cannot export {type(model).__name__} for input {raw_shape}: {first}") from None

    onnx_data = _onnx_bytes(wrapper, example, type(model).__name__) if onnx else None
    directory.mkdir(parents=True, exist_ok=True)
    program_path = _write_program(program, directory / "model.pt2")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in net.state_dict().items()}
    weights_path = atomic_write(directory / "weights.safetensors", lambda tmp: save_file(state, tmp))
    onnx_path = _write_bytes(directory / "model.onnx", onnx_data) if onnx_data is not None else None
    if onnx_path is None and (directory / "model.onnx").is_file():
        (directory / "model.onnx").unlink()  # an earlier export's model, not this one
    record = {
        "format": EXPORT_FORMAT,
        "version": 1,
        **metadata,
        "input": {"shape": ["batch", *raw_shape], "dtype": "float32", "values": "raw, as stored in the dataset"},
        "model_input_shape": list(input_shape),
        "preprocess": {"offset": offset, "scale": scale, "formula": "x = (raw - offset) / scale", "in_program": True},
        "parameters": count_parameters(net),
        "weight_sparsity": _weight_sparsity(net),
        "shrunk": is_shrunk(net),
        "layers": {name: list(module.weight.shape) for name, module in _weight_layers(net).items()},
        "attention_heads": {
            name: module.num_heads for name, module in net.named_modules() if hasattr(module, "num_heads")
        },
        "files": {"program": program_path.name, "weights": weights_path.name, "onnx": onnx_path.name if onnx_path else None},
        "torch_version": torch.__version__,
    }
    metadata_path = write_json(directory / "model.json", record)
    return ExportResult(directory, program_path, weights_path, metadata_path, onnx_path, net, is_shrunk(net))


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shrink_units: bool | None = None,
    onnx: bool = False,
) -> ExportResult:
    """Export the ``--save`` file of ``bingo run`` with :func:`export_model`.

    The file names one of the benchmark harness's models, so this is
    :func:`bingo.bench.model_file.export_checkpoint` (see there for the
    file's contents and the errors); the harness is imported only when this
    is called, never by ``import bingo``.
    """
    from .bench.model_file import export_checkpoint as export

    return export(checkpoint, out_dir, shrink_units=shrink_units, onnx=onnx)
