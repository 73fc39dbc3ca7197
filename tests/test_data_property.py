"""Property test: whatever an ``.npz`` holds, ``load_dataset`` loads it or says why in one line.

Random small archives (random shapes, dtypes and byte orders, empty arrays,
NaN and infinities, labels far beyond the class limit, missing members and
members that are not ``.npy`` arrays) go through :func:`bingo.bench.data.load_dataset`.
Either it returns a :class:`~bingo.bench.data.Dataset` whose invariants hold
(finite float32 inputs of one sample shape, int64 labels in
``[0, num_classes)``, non-empty training and test splits) or it raises a
one-line :class:`~bingo.errors.DataError`; never any other exception, and no
warning but the one naming classes without training examples.

Runs ``MAX_EXAMPLES`` random cases each time the suite runs.
"""

from __future__ import annotations

import io
import math
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bingo.bench.data import MAX_CLASSES, Dataset, load_dataset
from bingo.errors import DataError

MAX_EXAMPLES = 100
KEYS = ("x_train", "y_train", "x_test", "y_test")

# Dtypes an .npz may hold: every numeric kind, foreign byte orders, long double, and two that
# are refused (complex, text). Object arrays are left out: np.savez would pickle them, and the
# loader's answer to those has its own test in test_data.py.
DTYPES = [
    "bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "float32", "float64", "longdouble", ">f4", ">i8", ">u2", "complex64", "<U2",
]
# Labels the loader must refuse, or accept at the edge of the limit.
SPECIAL_LABELS = [-1, MAX_CLASSES - 1, MAX_CLASSES, 10**9, 2**63 - 1, 2**64 - 1, 1e30, 0.5, math.nan, math.inf]
SPECIAL_INPUTS = [0.0, -1.0, 1e300, -1e300, 3e38, -3e38, 1e-45, math.nan, math.inf, -math.inf]


def cast(values, dtype: str) -> np.ndarray:
    """``values`` as ``dtype`` the way a careless writer of the file would get them: wrapped, overflowed."""
    dtype = np.dtype(dtype)
    array = np.asarray(values, dtype=object)
    flat = array.ravel().tolist()
    if dtype.kind in "iu":  # exact for Python ints such as 2**64 - 1; out-of-range values wrap
        bits = dtype.itemsize * 8
        ints = [(int(v) if math.isfinite(v) else 0) % (1 << bits) for v in flat]
        if dtype.kind == "i":
            ints = [v - (1 << bits) if v >= 1 << (bits - 1) else v for v in ints]
        return np.array(ints, dtype=object).reshape(array.shape).astype(dtype)
    floats = np.array([float(v) for v in flat], dtype=np.float64).reshape(array.shape)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return floats.astype(str).astype(dtype) if dtype.kind == "U" else floats.astype(dtype)


@st.composite
def labels(draw, n: int) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    element = st.integers(0, 4)
    if draw(st.booleans()):  # half the arrays are tame, so that many archives load
        element = st.one_of(element, st.sampled_from(SPECIAL_LABELS))
    values = draw(st.lists(element, min_size=n, max_size=n))
    return cast(values, dtype)


@st.composite
def inputs(draw, n: int, sample: tuple[int, ...]) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    count = n * math.prod(sample)
    element = st.floats(-300, 300, allow_nan=False)
    if draw(st.booleans()):
        element = st.one_of(element, st.sampled_from(SPECIAL_INPUTS))
    values = draw(st.lists(element, min_size=count, max_size=count))
    return cast(np.asarray(values, dtype=object).reshape((n, *sample)), dtype)


@st.composite
def npz_contents(draw) -> dict[str, np.ndarray | bytes | None]:
    """The four members; ``None``: left out; ``bytes``: stored as that raw member, not as a .npy array."""
    rank = draw(st.sampled_from([1, 1, 2, 2, 3, 3, 0, 4]))  # 1..3: features, N x H x W, N x C x H x W
    sample = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 1, 2, 3, 0]), min_size=rank, max_size=rank)))
    n_train, n_test = draw(st.integers(0, 6)), draw(st.integers(0, 4))
    members: dict[str, np.ndarray | bytes | None] = {
        "x_train": draw(inputs(n_train, sample)),
        "y_train": draw(labels(n_train)),
        "x_test": draw(inputs(n_test, sample)),
        "y_test": draw(labels(n_test)),
    }
    # now and then, break the archive's structure rather than its values
    damage = draw(st.sampled_from(["none"] * 6 + ["drop", "raw", "npy-header", "length", "shape", "wide-y"]))
    key = draw(st.sampled_from(KEYS))
    if damage == "drop":
        members[key] = None
    elif damage == "raw":
        members[key] = draw(st.binary(max_size=40))
    elif damage == "npy-header":
        members[key] = b"\x93NUMPY" + draw(st.binary(max_size=60))
    elif damage == "length":
        members[key] = members[key][: max(len(members[key]) - 1, 0)]
    elif damage == "shape":
        members[key] = draw(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=3)))
    elif damage == "wide-y":
        members["y_train"] = members["y_train"].reshape(-1, 1)
    return members


def write_npz(path, members) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in members.items():
            if value is None:
                continue
            if isinstance(value, bytes):
                archive.writestr(key + ".npy", value)
            else:
                buffer = io.BytesIO()
                np.save(buffer, value, allow_pickle=False)
                archive.writestr(key + ".npy", buffer.getvalue())


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    return tmp_path_factory.mktemp("property") / "random.npz"


def check_invariants(d: Dataset) -> None:
    xs = (d.x_train, d.x_val, d.x_test)
    ys = (d.y_train, d.y_val, d.y_test)
    assert len(d.y_train) >= 1 and len(d.y_test) >= 1
    assert 1 <= d.num_classes <= MAX_CLASSES
    for x, y in zip(xs, ys):
        assert x.dtype == torch.float32 and x.ndim in (2, 4)
        assert x.shape[1:] == d.input_shape and math.prod(d.input_shape) >= 1
        assert bool(torch.isfinite(x).all())
        assert y.dtype == torch.int64 and y.shape == (len(x),)
        if len(y):
            assert 0 <= int(y.min()) and int(y.max()) < d.num_classes
    assert d.num_classes == max(int(y.max()) for y in ys if len(y)) + 1
    assert math.isfinite(d.offset) and math.isfinite(d.scale) and d.scale > 0


@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(members=npz_contents())
def test_random_npz_loads_or_raises_one_line_data_error(npz_path, members):
    write_npz(npz_path, members)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            dataset = load_dataset(str(npz_path))
        except DataError as e:
            message = str(e)
            assert message and "\n" not in message
            dataset = None
    # the only warning the loader may give is its own, one line naming untrained classes
    for warning in caught:
        assert warning.category is UserWarning, (warning.category, str(warning.message))
        assert f"{npz_path}: no training examples for class(es) " in str(warning.message)
        assert "\n" not in str(warning.message)
    if dataset is not None:
        check_invariants(dataset)


def test_the_strategy_reaches_both_outcomes(npz_path):
    """The random contents must both load and fail, or the property means little.

    Derandomized, so that it checks the strategy, not luck: a fixed sequence of draws.
    """
    outcomes = set()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(members=npz_contents())
    def run(members):
        write_npz(npz_path, members)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                load_dataset(str(npz_path))
                outcomes.add("loaded")
            except DataError:
                outcomes.add("refused")

    run()
    assert outcomes == {"loaded", "refused"}
