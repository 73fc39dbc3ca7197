"""Files on disk, written atomically.

Every writer goes to a temporary file in the destination folder and then
``os.replace``s it into place, so a crash or Ctrl-C leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

__all__ = ["atomic_write", "load_checkpoint", "load_scores", "save_checkpoint", "save_scores", "write_json"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically.

    The file ends up with the permissions an ordinary ``open()`` gives
    (``0o666`` less the umask), whatever ``write`` did to the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # After writing, not before: mkstemp makes 0600, and writers that recreate
        # the file (safetensors' save_file) make their own 0600.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    return atomic_write(path, write)


def save_scores(scores: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save ``{key: tensor}`` significance scores as safetensors, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in scores.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_scores(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load scores written by :func:`save_scores`."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"no such scores file: {path}") from None
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read scores from {path}: {exc}") from None


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | os.PathLike) -> Any:
    """``torch.load`` a checkpoint (tensors and plain data only), with a one-line error if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {path}") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
