"""Files on disk, written atomically; checkpoints with a format version and a checksum.

Every writer goes to a temporary file in the destination folder and then
``os.replace``s it into place, so a crash or Ctrl-C leaves either the old
file or the new one, never half of one.

A checkpoint (:func:`save_checkpoint`) is an ordinary ``torch.save`` dict,
readable with ``torch.load(path, weights_only=True)``: the caller's keys plus
three of its own,

- ``format``: ``"bingo-checkpoint"``,
- ``format_version``: :data:`CHECKPOINT_VERSION`,
- ``sha256``: the SHA-256 of the content (every other key), computed over
  its values rather than over the file's bytes (:func:`content_digest`), so
  it is the same whatever zip layout ``torch.save`` picks.

:func:`load_checkpoint` checks all three; a file that fails any check was
damaged or written by another program, and is refused with one message.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import math
import os
import re
import stat
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import BingoError, CheckpointError, ConfigError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "atomic_write",
    "content_digest",
    "folder_is_writable",
    "load_checkpoint",
    "load_scores",
    "save_checkpoint",
    "save_scores",
    "refuse_special",
    "special_file",
    "write_json",
]

CHECKPOINT_FORMAT = "bingo-checkpoint"
CHECKPOINT_VERSION = 1
_HEADER = ("format", "format_version", "sha256")


def special_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is, in words, when it exists but is neither a regular file nor a folder; else None.

    ``"a FIFO (named pipe)"``, ``"a character device"``, ``"a block device"``,
    ``"a socket"``; ``"a symbolic link to a character device"`` and so on
    when a link leads there. bingo reads and writes regular files only: a
    FIFO would block a reader forever, and the atomic replace of a writer
    would put a regular file where the device or pipe was (as root, in
    place of ``/dev/null``).
    """
    try:
        mode = os.stat(path).st_mode
        linked = os.path.islink(path)
    except (OSError, ValueError):  # missing, a dangling link, a NUL in the name: not a special file
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    kind = next((words for test, words in kinds if test(mode)), "a special file")
    return f"a symbolic link to {kind}" if linked else kind


def refuse_special(path: str | os.PathLike, what: str = "", *, reading: bool = False) -> None:
    """Raise :class:`~bingo.errors.ConfigError` if ``path`` is a FIFO, device or socket (see :func:`special_file`).

    ``what`` names the path as the user gave it (``"--out"``); the message
    is one line, e.g. ``--out /tmp/p is a FIFO (named pipe), not a regular
    file; bingo writes only regular files``.
    """
    kind = special_file(path)
    if kind is not None:
        name = f"{what} {os.fspath(path)}" if what else os.fspath(path)
        verb = "reads" if reading else "writes"
        raise ConfigError(f"{name} is {kind}, not a regular file; bingo {verb} only regular files (give a file path)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process (alive), or not a pid
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer of ``path`` left beside it; returns those removed.

    Only bingo's own pattern, ``.NAME.PID.XXXX.tmp`` (what :func:`atomic_write`
    creates), and only when process PID is gone on this machine: a write
    in progress in another live process is never touched (a reused pid
    only keeps a leftover longer). Errors are ignored: this is tidying.
    """
    path = Path(path)
    removed = []
    prefix = f".{path.name}."
    try:
        candidates = list(path.parent.glob(glob.escape(prefix) + "*.tmp"))
    except OSError:
        return removed
    for candidate in candidates:
        middle = candidate.name[len(prefix):-len(".tmp")]
        pid, _, rest = middle.partition(".")
        if not pid.isdigit() or not rest or "." in rest or _alive(int(pid)):
            continue
        try:
            if candidate.is_file() and not candidate.is_symlink():
                candidate.unlink()
                removed.append(candidate)
        except OSError:
            pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically.

    The file ends up with the permissions an ordinary ``open()`` gives
    (``0o666`` less the umask), whatever ``write`` did to the temporary file.
    An ``OSError`` names ``path``, not the temporary file the user never asked for.
    A ``path`` that is a FIFO, device or socket (or a link to one) is refused
    with :class:`~bingo.errors.ConfigError` and left as it is: replacing it
    would turn ``/dev/null`` into a regular file.
    """
    path = Path(path)
    refuse_special(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        # The writer's pid in the name: a later write can tell a killed writer's leftover from a live one's file.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        # After writing, not before: mkstemp makes 0600, and writers that recreate
        # the file (safetensors' save_file) make their own 0600.
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename in (tmp, None):
            raise _naming(exc, path) from None
        raise
    except Exception as exc:
        # torch.save and safetensors wrap a failed write (a full disk) in their own
        # errors: "[enforce fail at inline_container.cc:672] ...", "SafetensorError:
        # ... (os error 28)". Give it back as the OSError it is, naming ``path``.
        failed = _failed_write(exc, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if failed is None:
            raise
        raise _naming(failed, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _failed_write(exc: Exception, folder: Path) -> OSError | None:
    """The ``OSError`` behind a writer's own error for a failed write; None if ``exc`` is not one.

    The ``OSError`` itself when it is in the chain (``torch.save`` into a file
    object keeps it as the context); the errno of a safetensors ``(os error
    N)``; for torch's ``inline_container.cc`` error without one, ``ENOSPC``
    when the folder has less than 1 MiB free, else ``EIO``.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(exc).split())
    found = re.search(r"os error (\d+)\)", text)
    if found and type(exc).__name__ == "SafetensorError":
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    if "inline_container.cc" in text or "PytorchStreamWriter" in text:
        try:
            free = os.statvfs(folder)
            full = free.f_bavail * free.f_frsize < (1 << 20)
        except (OSError, AttributeError):
            full = False
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if full else OSError(errno.EIO, f"write failed ({text})")
    return None


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name (same type and errno)."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, os.fspath(path))


def folder_is_writable(folder: str | os.PathLike) -> bool:
    """Whether new files can be created in the existing ``folder``.

    Asks ``os.access`` (permissions), then creates and drops an unnamed
    temporary file there, which also catches what permissions do not show:
    a read-only mount, or a file system such as ``/sys`` that refuses new
    files even to root.
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


def _non_finite(data: Any, where: str = "") -> tuple[str, float] | None:
    """The first ``(key path, value)`` in ``data`` that is a NaN or infinite float, e.g. ``results[0].accuracy``."""
    if isinstance(data, float):
        return None if math.isfinite(data) else (where or "the value", data)
    if isinstance(data, dict):
        items = ((f"{where}.{key}" if where else str(key), value) for key, value in data.items())
    elif isinstance(data, (list, tuple)):
        items = ((f"{where}[{i}]", value) for i, value in enumerate(data))
    else:
        return None
    for key, value in items:
        found = _non_finite(value, key)
        if found is not None:
            return found
    return None


def _json_key(key: Any) -> Any:
    """The object key ``json.dump`` writes for dict key ``key`` (non-str keys are converted; others it refuses)."""
    if isinstance(key, str):
        return key
    if key is True or key is False or key is None:
        return {True: "true", False: "false", None: "null"}[key]
    return repr(key) if isinstance(key, (int, float)) else key


def _clashing_key(data: Any, where: str = "") -> str | None:
    """The first key path in ``data`` where two keys would be written as one (``{1: .., "1": ..}``), else None."""
    if isinstance(data, dict):
        seen: set = set()
        for key, value in data.items():
            written = _json_key(key)
            if written in seen:
                return f"{where}.{written}" if where else str(written)
            seen.add(written)
            found = _clashing_key(value, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            found = _clashing_key(value, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically.

    JSON has no NaN or Infinity (Python's ``json`` would write bare ``NaN``,
    which other readers reject). A non-finite number means something went
    wrong upstream (a diverged training, an empty split), so it is refused
    with a :class:`~bingo.errors.BingoError` naming the key, and the file is
    not touched; so are two keys that would be written as one (``1`` and
    ``"1"``: JSON keys are strings, and a reader keeps only the last).
    """
    found = _non_finite(data)
    if found is not None:
        key, value = found
        raise BingoError(f"cannot write {path}: {key} is {value}, and JSON has no NaN or Infinity")
    clash = _clashing_key(data)
    if clash is not None:  # json.dump would write the key twice, and a reader keeps only the last
        raise BingoError(f"cannot write {path}: two keys would both be written as {clash!r} (e.g. 1 and '1')")

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")

    return atomic_write(path, write)


def save_scores(scores: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save ``{key: tensor}`` significance scores as safetensors, atomically."""
    from .checks import check_scores  # a ConfigError naming the key, not an AttributeError

    tensors = {k: v.detach().contiguous().cpu() for k, v in check_scores("save_scores", scores).items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_scores(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load scores written by :func:`save_scores`."""
    kind = special_file(path)
    if kind is not None:
        raise CheckpointError(f"scores file {path} is {kind}, not a regular file; bingo reads only regular files")
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"no such scores file: {path}") from None
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"cannot read scores from {path}: {exc}") from None


def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of a checkpoint's content: its structure and every value, tensors byte by byte.

    Covers what ``torch.load(weights_only=True)`` gives back: dicts (in
    order), lists, tuples, strings, bytes, numbers, booleans, ``None``,
    tensors (dtype, shape and data), dtypes and devices. Anything else
    raises ``TypeError``: it could not be loaded back safely.
    """
    digest = hashlib.sha256()

    def add(tag: bytes, payload: bytes = b"") -> None:
        digest.update(tag + struct.pack("<Q", len(payload)) + payload)

    def visit(value: Any) -> None:
        if value is None:
            add(b"N")
        elif isinstance(value, bool):
            add(b"B", b"1" if value else b"0")
        elif isinstance(value, int):
            add(b"I", str(value).encode())
        elif isinstance(value, float):
            add(b"F", value.hex().encode())
        elif isinstance(value, str):
            add(b"S", value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, bytes):
            add(b"Y", value)
        elif isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                raise TypeError(f"cannot store a {value.layout} tensor in a checkpoint; make it dense first")
            data = value.detach().cpu().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
            add(b"X", f"{value.dtype}{tuple(value.shape)}".encode())
            add(b"x", data.numpy().tobytes())
        elif isinstance(value, (torch.dtype, torch.device)):
            add(b"T", str(value).encode())
        elif isinstance(value, dict):
            add(b"D", str(len(value)).encode())
            for key, item in value.items():
                visit(key)
                visit(item)
        elif isinstance(value, (list, tuple)):
            add(b"L" if isinstance(value, list) else b"U", str(len(value)).encode())
            for item in value:
                visit(item)
        else:
            raise TypeError(f"cannot store {type(value).__module__}.{type(value).__qualname__} in a checkpoint")

    visit(obj)
    return digest.hexdigest()


def save_checkpoint(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` the dict ``obj`` to ``path`` atomically, with format, version and checksum.

    Raises:
        TypeError: ``obj`` is not a dict, or holds something ``torch.load``
            with ``weights_only=True`` could not read back.
        ValueError: ``obj`` uses one of the keys ``format``,
            ``format_version`` or ``sha256``, which the file format reserves.
    """
    if not isinstance(obj, dict):
        raise TypeError(f"a checkpoint is a dict, got {type(obj).__name__}")
    for key in _HEADER:
        if key in obj:
            raise ValueError(f"{key!r} is reserved for the checkpoint format; rename that key")
    record = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "sha256": content_digest(obj), **obj}

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # into a file object: a failed write's OSError stays in torch's error, as its context
            torch.save(record, f)

    return atomic_write(path, write)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a file written by :func:`save_checkpoint` (tensors and plain data only), checking its checksum.

    Returns the dict that was saved, without the format's own keys.

    Raises:
        CheckpointError: one line: no such file; ``PATH is not a bingo
            checkpoint (corrupt or from another program)`` for anything
            unreadable, without the format's keys, or whose content does
            not match its checksum; or a newer format version than this
            bingo reads.
    """
    not_ours = f"{path} is not a bingo checkpoint (corrupt or from another program)"
    kind = special_file(path)
    if kind is not None:  # torch.load would wait forever for a FIFO's writer
        raise CheckpointError(f"checkpoint {path} is {kind}, not a regular file; bingo reads only regular files")
    try:
        with warnings.catch_warnings():  # torch's caveats about a foreign pickle: the file is refused below anyway
            warnings.simplefilter("ignore")
            record = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path} is a folder, not a file") from None
    except OSError as exc:  # permissions, I/O errors: the file may be fine
        if exc.errno == errno.EINVAL:  # torch's zip reader on a file cut short (its end of archive missing)
            raise CheckpointError(f"{not_ours}: it is incomplete (truncated) or damaged") from None
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    except Exception:  # noqa: BLE001 (a bad file raises UnpicklingError, RuntimeError, EOFError, ...)
        # PyTorch's own message would advise weights_only=False: wrong (the
        # file is corrupt or foreign) and unsafe (it runs arbitrary pickles).
        raise CheckpointError(not_ours) from None
    if not isinstance(record, dict) or record.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(not_ours)
    version = record.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this bingo reads version {CHECKPOINT_VERSION}: upgrade bingo"
        )
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(not_ours)
    content = {key: value for key, value in record.items() if key not in _HEADER}
    try:
        matches = content_digest(content) == record.get("sha256")
    except TypeError:
        matches = False
    if not matches:
        raise CheckpointError(f"{not_ours}: its content does not match its sha256")
    return content
