"""Datasets: sklearn digits, Fashion-MNIST, MNIST and user ``.npz`` files.

Every dataset is returned as a :class:`Dataset` holding float32 inputs that
are already preprocessed with ``(raw - offset) / scale`` (scalar mean and
standard deviation of the raw training values), int64 labels, and a
validation split carved from the training data with a seeded generator.

Images are N x C x H x W (C = 1 for the grey-scale sets); ``.npz`` files may
also hold flat N x F features. Every problem with the data raises
:class:`~bingo.errors.DataError` with a one-line message; an unknown dataset
name raises :class:`~bingo.errors.ConfigError`.

What every source must hold: a non-empty training and test split; samples
with at least one value, finite and within float32's range (also once
standardised); labels that are class indices ``0 .. MAX_CLASSES - 1``, as
integers or booleans or as floats holding whole numbers (checked in the
file's own dtype, so a uint64 ``2**64 - 1`` is refused, not wrapped to -1).
``num_classes`` is the largest label of any split plus one; classes with no
training example (seen only in the validation or test split) are named in a
:class:`UserWarning`.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import math
import os
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bingo.errors import ConfigError, DataError
from bingo.bench.generated import GENERATED_TASKS, TASK_SEED, generate
from bingo.io import special_file

__all__ = [
    "DATASETS",
    "FASHION_MNIST_DIR",
    "IDX_FILES",
    "MAX_CLASSES",
    "MNIST_FILES",
    "MNIST_URL",
    "Dataset",
    "dataset_files",
    "default_mnist_dir",
    "download_mnist",
    "load_dataset",
    "read_idx",
    "training_subset",
    "write_idx",
]

DATASETS: tuple[str, ...] = ("digits", "fashion-mnist", "mnist", *GENERATED_TASKS)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

#: The four IDX files of (Fashion-)MNIST, without the ``.gz`` suffix:
#: (train images, train labels, test images, test labels).
IDX_FILES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

#: Gzipped MNIST files on the mirror and their md5 checksums (torchvision's list).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

DOWNLOAD_TIMEOUT = 30.0  # seconds, per request
#: Labels are class indices below this bound. A larger label is almost always an ID or a
#: corrupt value, and the output layer would need a row per index (a label of 10**9 asks
#: the mlp for 128 GB); remap such labels to 0..K-1.
MAX_CLASSES = 100_000
#: How many classes the warning about classes without training examples lists.
_SHOWN_CLASSES = 10
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# np.load reads a zip (.npz) or an .npy by these first bytes and takes anything else for a pickle.
_NPZ_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY")


# --------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """Preprocessed train / validation / test splits of one dataset."""

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_val: torch.Tensor = field(repr=False)
    y_val: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    num_classes: int
    offset: float
    scale: float
    #: Shape of one sample as the source stores it, before a channel axis is
    #: added: ``(28, 28)`` for IDX files and N×H×W arrays, ``(64,)`` for digits
    #: (as ``sklearn.datasets.load_digits(return_X_y=True)`` gives it).
    #: ``None``: the same as :attr:`input_shape`.
    stored_shape: tuple[int, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 28, 28)`` or ``(64,)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def raw_shape(self) -> tuple[int, ...]:
        """Shape of one raw sample in the dataset's own layout (what an export takes)."""
        return self.input_shape if self.stored_shape is None else tuple(self.stored_shape)

    def preprocess(self, raw: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Apply this dataset's preprocessing ``(raw - offset) / scale`` as float32."""
        x = torch.as_tensor(raw).to(torch.float32)
        return (x - self.offset) / self.scale

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, train={len(self.y_train)}, "
            f"val={len(self.y_val)}, test={len(self.y_test)}, "
            f"offset={self.offset:.6g}, scale={self.scale:.6g})"
        )


# --------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------

_IDX_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_TYPES: dict[np.dtype, int] = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def _reason(e: BaseException | object) -> str:
    """An exception (or reason) as one line of text."""
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _label_text(value) -> str:
    """A label as the user would write it: ``7``, ``18446744073709551615``, ``1e+30``."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else f"{value:g}"
    return str(int(value))


def _label_range_problem(y: np.ndarray) -> str | None:
    """Why the values of labels ``y`` are not class indices, or None.

    Compared in ``y``'s own dtype, before any cast: a uint64 ``2**64 - 1``
    must not wrap to -1, nor a float 1e30 turn into garbage.
    """
    if y.size == 0 or y.dtype.kind == "b":
        return None
    low, high = y.min().item(), y.max().item()  # Python numbers: exact, and 100000 never cast to float16
    if low < 0:
        return f"negative label {_label_text(low)}; labels must be >= 0"
    if high >= MAX_CLASSES:
        return (
            f"label {_label_text(high)}; labels must be class indices 0..{MAX_CLASSES - 1} "
            f"(at most MAX_CLASSES = {MAX_CLASSES} classes)"
        )
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a native-endian array.

    Compression is detected from the file's content, not its name. Raises
    :class:`DataError` naming the file if it is missing, cannot be
    decompressed, has a bad magic number, or its size does not match the
    dimensions in its header.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DataError(f"no such file: {path}") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {_reason(e.strerror or e)}") from None

    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"corrupt IDX file {path}: cannot decompress gzip data ({_reason(e)})") from None

    if len(data) < 4:
        raise DataError(f"corrupt IDX file {path}: truncated header ({len(data)} bytes)")
    zero, code, ndim = int.from_bytes(data[0:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_CODES or ndim == 0:
        raise DataError(
            f"corrupt IDX file {path}: bad magic number 0x{data[:4].hex()} "
            "(expected 0x0000TTNN with a known type TT and NN >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"corrupt IDX file {path}: truncated header "
            f"({len(data)} bytes, {ndim} dimensions need {header})"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_CODES[code]
    expected = math.prod(dims) * dtype.itemsize
    found = len(data) - header
    if found < expected:
        raise DataError(
            f"corrupt IDX file {path}: truncated, header dims {dims} need "
            f"{expected} bytes of data but only {found} are present"
        )
    if found > expected:
        raise DataError(
            f"corrupt IDX file {path}: size mismatch, header dims {dims} need "
            f"{expected} bytes of data but {found} are present"
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    if not array.flags.writeable:  # a view of immutable bytes; torch.from_numpy would warn
        array = array.copy()
    return array.reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed if ``path`` ends with ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64. The gzip
    header carries no timestamp, so equal arrays give byte-identical files.
    """
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_TYPES:
        valid = ", ".join(str(d) for d in _IDX_TYPES)
        raise DataError(f"cannot write dtype {array.dtype} as IDX; supported dtypes: {valid}")
    if array.ndim == 0 or array.ndim > 255:
        raise DataError(f"cannot write a {array.ndim}-dimensional array as IDX; need 1 to 255 dimensions")
    header = bytes([0, 0, _IDX_TYPES[native], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    path = Path(path)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)


def _find_idx(directory: Path) -> tuple[list[Path], list[str]]:
    """Locate the four IDX files (plain preferred over ``.gz``) in ``directory``."""
    found, missing = [], []
    for name in IDX_FILES:
        plain, packed = directory / name, directory / (name + ".gz")
        for candidate in (plain, packed):
            kind = special_file(candidate)
            if kind is not None:  # a FIFO would block the read, a download would replace it
                raise DataError(f"{candidate} is {kind}, not a regular file; bingo reads only regular files")
        if plain.is_file():
            found.append(plain)
        elif packed.is_file():
            found.append(packed)
        else:
            missing.append(name + "[.gz]")
    return found, missing


def _load_idx_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise DataError(
            f"corrupt IDX file {images_path}: expected 3-D images (N, H, W), got shape {images.shape}"
        )
    if labels.ndim != 1:
        raise DataError(
            f"corrupt IDX file {labels_path}: expected 1-D labels (N,), got shape {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"IDX files {images_path} and {labels_path} do not match: "
            f"{len(images)} images but {len(labels)} labels"
        )
    if labels.dtype.kind not in "iu":
        raise DataError(f"corrupt IDX file {labels_path}: labels must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise DataError(f"corrupt IDX file {labels_path}: negative label {int(labels.min())}")
    problem = _label_range_problem(labels)
    if problem:
        raise DataError(f"IDX file {labels_path} has {problem}")
    if 0 in images.shape[1:]:
        raise DataError(f"corrupt IDX file {images_path}: images hold no values (each is {images.shape[1]}x{images.shape[2]})")
    if images.dtype.kind == "f" and not np.all(np.isfinite(images)):
        raise DataError(f"IDX file {images_path} contains NaN or infinite values")
    return images[:, None], labels


def _load_idx_dataset(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    found, missing = _find_idx(directory)
    assert not missing
    x_train, y_train = _load_idx_split(found[0], found[1])
    x_test, y_test = _load_idx_split(found[2], found[3])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"IDX files in {directory} disagree: train images are {x_train.shape[2:]} "
            f"but test images are {x_test.shape[2:]}"
        )
    if len(x_train) == 0:
        raise DataError(f"IDX file {found[0]} holds no training images")
    if len(x_test) == 0:
        raise DataError(f"IDX file {found[2]} holds no test images")
    return x_train, y_train, x_test, y_test, x_train.shape[2:]  # stored as N x H x W


# --------------------------------------------------------------------------
# MNIST download
# --------------------------------------------------------------------------


def default_mnist_dir() -> Path:
    """``$BINGO_DATA_DIR/mnist`` if that variable is set, else ``~/.cache/bingo/mnist``."""
    root = os.environ.get("BINGO_DATA_DIR")
    if root:
        return Path(root).expanduser() / "mnist"
    return Path.home() / ".cache" / "bingo" / "mnist"


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    base_url: str = MNIST_URL,
    files: Mapping[str, str] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> Path:
    """Download the gzipped MNIST IDX files into ``data_dir`` and return it.

    ``files`` maps file names to md5 checksums and defaults to
    :data:`MNIST_FILES` (looked up at call time). Each file is streamed into
    a temporary file in ``data_dir`` and renamed into place only once its
    md5 matches; a file already present with the right checksum is kept.
    Raises :class:`DataError` on network failure or checksum mismatch; no
    partial or bad download is left behind.
    """
    directory = Path(data_dir).expanduser() if data_dir is not None else default_mnist_dir()
    files = MNIST_FILES if files is None else files
    url_root = base_url if base_url.endswith("/") else base_url + "/"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create MNIST folder {directory}: {_reason(e.strerror or e)}") from None

    for name, md5 in files.items():
        target = directory / name
        if target.is_file() and _md5(target) == md5:
            continue
        url = url_root + name
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=directory)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.md5(usedforsecurity=False)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                    for chunk in iter(lambda: response.read(1 << 16), b""):
                        digest.update(chunk)
                        out.write(chunk)
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                reason = _reason(getattr(e, "reason", None) or e)
                raise DataError(
                    f"could not download MNIST from {url} ({reason}); "
                    f"put the four IDX files in {directory} or pass --data-dir"
                ) from None
            got = digest.hexdigest()
            if got != md5:
                raise DataError(
                    f"checksum mismatch for {name} downloaded from {url}: expected md5 {md5}, "
                    f"got {got}; the download was discarded"
                )
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return directory


# --------------------------------------------------------------------------
# npz and digits
# --------------------------------------------------------------------------


def _check_labels(y: np.ndarray, key: str, source: str) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"{source}: {key} must be 1-D (N,), got shape {y.shape}")
    if y.dtype.kind in "iub":
        pass
    elif y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise DataError(f"{source}: {key} holds NaN or infinite labels")
        if not np.all(y == np.round(y)):
            raise DataError(f"{source}: {key} must hold integer class labels, got non-integral values")
    else:
        raise DataError(f"{source}: {key} must hold integer class labels, got dtype {y.dtype}")
    problem = _label_range_problem(y)
    if problem:
        raise DataError(f"{source}: {key} has {problem}")
    return y.astype(np.int64, copy=False)  # every value is now in [0, MAX_CLASSES): the cast is exact


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_inputs(x: np.ndarray, key: str, source: str) -> np.ndarray:
    if x.dtype.kind not in "iubf":
        raise DataError(f"{source}: {key} must be numeric, got dtype {x.dtype}")
    shape = x.shape
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim not in (2, 4):
        raise DataError(
            f"{source}: {key} must be N x F features, N x H x W or N x C x H x W images, "
            f"got shape {x.shape}"
        )
    if 0 in shape[1:]:
        raise DataError(f"{source}: {key} samples hold no values (each has shape {tuple(shape[1:])})")
    if len(shape) == 4 and shape[3] in (1, 3, 4) and min(shape[1], shape[2]) > 4:
        # (N, H, W, C) read as (N, C, H, W) would train on H "channels" of W x C images, without any error
        warnings.warn(f"{source}: {key} has shape {tuple(shape)}, which looks channels-last (N, H, W, C); bingo reads "
                      f"images as N x C x H x W: store them as {key}.transpose(0, 3, 1, 2) if so", stacklevel=2)
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)):
            raise DataError(f"{source}: {key} contains NaN or infinite values")
        if x.dtype.itemsize > 4 and x.size:
            largest = float(np.max(np.abs(x)))
            if largest > _FLOAT32_MAX:
                raise DataError(f"{source}: {key} has values beyond float32's range (largest magnitude {largest:.3g})")
        if x.dtype.itemsize > 8:  # long double: torch takes float16/32/64 only
            x = x.astype(np.float64)
    if not x.dtype.isnative:  # torch.from_numpy refuses a foreign byte order
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    kind = special_file(path)
    if kind is not None:  # a FIFO would block the read forever
        raise DataError(f"{path} is {kind}, not a regular file; bingo reads only regular files")
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        npz = np.load(path, allow_pickle=False) if head.startswith(_NPZ_MAGICS) else None
    except Exception as e:  # unreadable, BadZipFile, bad .npy headers, ...
        raise DataError(f"cannot read {path} as .npz: {_reason(e)}") from None
    if npz is None:  # else np.load says the file "contains pickled (object) data"
        raise DataError(f"cannot read {path} as .npz: not a NumPy .npz archive (a zip of .npy arrays)")
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"cannot read {path} as .npz: it holds a single array, not an .npz archive")
    with npz:
        missing = [k for k in _NPZ_KEYS if k not in npz.files]
        if missing:
            raise DataError(
                f"{path} is missing array(s) {', '.join(missing)}; "
                f"an .npz dataset needs {', '.join(_NPZ_KEYS)}"
            )
        arrays = {}
        for key in _NPZ_KEYS:
            try:
                arrays[key] = npz[key]
            except Exception as e:  # object arrays, corrupt members
                # numpy names allow_pickle both for an object array and as a way around its
                # header size limit: only the first is "an array of Python objects".
                if isinstance(e, ValueError) and "Object arrays cannot be loaded" in str(e):
                    raise DataError(
                        f"cannot read {path} as .npz: {key} is an array of Python objects, which would need "
                        "unpickling; store numbers (e.g. np.asarray(x, dtype=np.float32))"
                    ) from None
                if isinstance(e, ValueError) and "max_header_size" in str(e):
                    raise DataError(
                        f"cannot read {path} as .npz: {key} has a .npy header over NumPy's safety limit "
                        "(max_header_size), as no array numpy writes has; save the arrays again with np.savez"
                    ) from None
                raise DataError(f"cannot read {path} as .npz: {key}: {_reason(e)}") from None
            if not isinstance(arrays[key], np.ndarray):  # np.load hands back a non-.npy member's bytes
                raise DataError(
                    f"cannot read {path} as .npz: {key} is not a .npy array (a raw pickle or other data); "
                    "save the arrays with np.savez"
                )
    return _check_arrays(arrays, str(path))


def _check_arrays(arrays: Mapping[str, np.ndarray], source: str):
    stored_shape = tuple(np.shape(arrays["x_train"])[1:])
    x_train = _check_inputs(arrays["x_train"], "x_train", source)
    x_test = _check_inputs(arrays["x_test"], "x_test", source)
    y_train = _check_labels(arrays["y_train"], "y_train", source)
    y_test = _check_labels(arrays["y_test"], "y_test", source)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(
                f"{source}: x_{split} has {len(x)} samples but y_{split} has {len(y)} labels"
            )
    if len(x_train) == 0:
        raise DataError(f"{source}: the training set is empty (x_train has 0 samples)")
    if len(x_test) == 0:
        raise DataError(f"{source}: the test set is empty (x_test has 0 samples)")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"{source}: train and test samples differ in shape: "
            f"{tuple(x_train.shape[1:])} vs {tuple(x_test.shape[1:])}"
        )
    return x_train, y_train, x_test, y_test, stored_shape


def _load_digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.reshape(-1, 1, 8, 8).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=_DIGITS_TEST_FRACTION, random_state=_DIGITS_SPLIT_SEED, stratify=y
    )
    return x_train, y_train, x_test, y_test, digits.data.shape[1:]


# --------------------------------------------------------------------------
# load_dataset
# --------------------------------------------------------------------------


def _check_fraction(validation_fraction: float) -> float:
    try:
        fraction = float(validation_fraction)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    return fraction


def _build(name, x_train, y_train, x_test, y_test, stored_shape, fraction: float, seed: int) -> Dataset:
    x_train_t = torch.from_numpy(np.ascontiguousarray(x_train))
    y_train_t = torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64))
    x_test_t = torch.from_numpy(np.ascontiguousarray(x_test))
    y_test_t = torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64))

    n = len(y_train_t)
    n_val = min(int(round(n * fraction)), n - 1)
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    val_idx, _ = torch.sort(perm[:n_val])
    train_idx, _ = torch.sort(perm[n_val:])

    x_tr = x_train_t[train_idx].to(torch.float32)
    std, mean = torch.std_mean(x_tr, correction=0)
    offset, scale = float(mean), float(std)
    if not math.isfinite(scale) or scale <= 0.0:
        scale = 1.0
    x_tr.sub_(offset).div_(scale)

    # Indexing copies, so the in-place ops below never touch the caller's arrays;
    # x_test_t shares memory with a numpy array, so its first op is out of place.
    x_val = x_train_t[val_idx].to(torch.float32).sub_(offset).div_(scale)
    x_te = x_test_t.to(torch.float32).sub(offset).div_(scale)
    y_tr, y_val = y_train_t[train_idx], y_train_t[val_idx]
    for split, x in (("training", x_tr), ("validation", x_val), ("test", x_te)):
        if not bool(torch.isfinite(x).all()):
            raise DataError(
                f"{name}: the inputs cannot be standardised in float32 (mean {offset:.3g}, std {scale:.3g} "
                f"leave non-finite values in the {split} split); rescale them"
            )

    labels = [y for y in (y_tr, y_val, y_test_t) if y.numel()]
    num_classes = max(int(y.max()) for y in labels) + 1
    untrained = _untrained_classes(y_tr, y_val, y_test_t)
    if untrained:
        shown = ", ".join(untrained[:_SHOWN_CLASSES])
        if len(untrained) > _SHOWN_CLASSES:
            shown += f" and {len(untrained) - _SHOWN_CLASSES} more"
        warnings.warn(
            f"{name}: no training examples for class(es) {shown}; "
            f"num_classes = {num_classes} counts them, but the model cannot learn them",
            UserWarning,
            stacklevel=3,
        )
    return Dataset(
        name=name,
        x_train=x_tr.contiguous(),
        y_train=y_tr,
        x_val=x_val.contiguous(),
        y_val=y_val,
        x_test=x_te.contiguous(),
        y_test=y_test_t.clone(),
        num_classes=num_classes,
        offset=offset,
        scale=scale,
        stored_shape=tuple(int(d) for d in stored_shape),
    )


def _untrained_classes(y_train: torch.Tensor, y_val: torch.Tensor, y_test: torch.Tensor) -> list[str]:
    """Classes of the validation or test labels that the training labels lack, as ``"7 (in test)"``."""
    trained = set(torch.unique(y_train).tolist())
    where: dict[int, list[str]] = {}
    for split, y in (("validation", y_val), ("test", y_test)):
        for label in torch.unique(y).tolist():
            if label not in trained:
                where.setdefault(label, []).append(split)
    return [f"{label} (in {', '.join(where[label])})" for label in sorted(where)]


def dataset_files(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The files :func:`load_dataset` would read for these arguments (existing or not): what no output may replace.

    The ``.npz`` file itself, or the four IDX files (plain and ``.gz``) of
    ``fashion-mnist`` and ``mnist`` in their folder; none for ``digits``
    (scikit-learn's copy) or an unknown name.
    """
    name = os.fspath(name_or_path)
    if name in ("fashion-mnist", "mnist"):
        default = FASHION_MNIST_DIR if name == "fashion-mnist" else default_mnist_dir()
        directory = Path(data_dir if data_dir is not None else default).expanduser()
        return [directory / f"{idx}{suffix}" for idx in IDX_FILES for suffix in ("", ".gz")]
    if name != "digits" and name.lower().endswith(".npz"):
        return [Path(name).expanduser()]
    return []


def load_dataset(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    validation_fraction: float = 0.1,
    seed: int = 0,
    download: bool = True,
) -> Dataset:
    """Load a dataset by name (``digits``, ``fashion-mnist``, ``mnist``, a generated task) or ``.npz`` path.

    The generated tasks (``teacher-student``, ``tokens``, ``signals``:
    :mod:`bingo.bench.generated`) are made offline from seed ``TASK_SEED``;
    ``seed`` only draws their validation split, as for every dataset.

    ``data_dir`` is where the IDX files of ``fashion-mnist`` (default
    :data:`FASHION_MNIST_DIR`) and ``mnist`` (default
    :func:`default_mnist_dir`) are found; it is ignored otherwise. Missing
    MNIST files are downloaded when ``download`` is true.
    ``validation_fraction`` of the training split, chosen with ``seed``,
    becomes the validation split. Data that breaks the rules in this
    module's docstring raises :class:`DataError`; classes with no training
    example give a :class:`UserWarning` naming them.
    """
    name = os.fspath(name_or_path)
    fraction = _check_fraction(validation_fraction)

    if name == "digits":
        arrays = _load_digits()
    elif name == "fashion-mnist":
        directory = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR).expanduser()
        _, missing = _find_idx(directory)
        if missing:
            raise DataError(
                f"Fashion-MNIST IDX files not found in {directory} (missing: {', '.join(missing)}); "
                "install them with 'apt-get install dataset-fashion-mnist' or pass --data-dir"
            )
        arrays = _load_idx_dataset(directory)
    elif name == "mnist":
        directory = Path(data_dir).expanduser() if data_dir is not None else default_mnist_dir()
        _, missing = _find_idx(directory)
        if missing and download:
            download_mnist(directory)
            _, missing = _find_idx(directory)
        if missing:
            raise DataError(
                f"MNIST IDX files not found in {directory} (missing: {', '.join(missing)}); "
                "allow the download or put the four IDX files there or pass --data-dir"
            )
        arrays = _load_idx_dataset(directory)
    elif name in GENERATED_TASKS:  # generated offline, one fixed task per name (bingo.bench.generated)
        arrays = generate(name, TASK_SEED)
    elif name.lower().endswith(".npz"):
        arrays = _load_npz(Path(name).expanduser())
    else:
        raise ConfigError(
            f"unknown dataset {name!r}; valid choices: {', '.join(DATASETS)}, or a PATH.npz"
        )
    return _build(name, *arrays, fraction=fraction, seed=seed)


def training_subset(data: Dataset, samples: int, seed: int = 0) -> Dataset:
    """``data`` with its training split cut to ``samples`` examples drawn at random (seeded; order kept).

    For short experiments on big data: validation and test splits are
    unchanged, so accuracies stay comparable with full-data runs. The same
    ``seed`` gives the same subset.
    """
    available = len(data.y_train)
    if isinstance(samples, bool) or int(samples) != samples or not 1 <= samples <= available:
        raise ConfigError(f"training samples must be a whole number in [1, {available}] (the training split's size), got {samples!r}")
    if samples == available:
        return data
    chosen = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[: int(samples)].sort().values
    return dataclasses.replace(data, x_train=data.x_train[chosen], y_train=data.y_train[chosen])
