"""Property: whatever the command line and the .npz holds, `bingo run` succeeds or fails with one line.

Random argument lists (valid and invalid values for every kind of flag) and
random small ``.npz`` files are fed to the CLI in-process. Each run must
either exit 0 and write strict JSON (no NaN or Infinity), or exit 2 with a
single ``bingo: error: ...`` line on stderr and no traceback. Runs train for
at most one epoch on tiny data, so a case costs well under a second.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bingo.bench.cli import main

# Values that are valid, borderline or wrong for each option.
NUMBERS = st.sampled_from(["0", "0.5", "0.9", "1", "1.5", "-0.1", "nan", "inf", "half", "", "0.5,0.9", "1e-9"])
OPTIONS = {
    "--model": st.sampled_from(["mlp", "conv", "lenet300", "resnet", "vgg", ""]),
    "--method": st.sampled_from(["bingo", "bingo-paper", "magnitude", "random", "gmp", "imp", "snip", "lasso"]),
    "--epochs": st.sampled_from(["0", "1", "-1", "two", "1.5"]),
    "--batch-size": st.sampled_from(["1", "16", "0", "-3", "x"]),
    "--lr": st.sampled_from(["0.01", "0", "-1", "1e6", "abc"]),
    "--optimizer": st.sampled_from(["adam", "sgd", "rmsprop"]),
    "--fraction": NUMBERS,
    "--mode": st.sampled_from(["reset", "zero", "shuffle"]),
    "--metric": st.sampled_from(["accuracy", "loss", "f1"]),
    "--estimator": st.sampled_from(["probe", "taylor", "hybrid", "fisher"]),
    "--granularity": st.sampled_from(["weight", "neuron", "layer"]),
    "--rule": st.sampled_from(["mean", "paper", "contrast", "max"]),
    "--every": st.sampled_from(["1", "3", "0", "-2", "x"]),
    "--target": NUMBERS,
    "--magnitude-weight": NUMBERS,
    "--finetune-epochs": st.sampled_from(["0", "1", "-1"]),
    "--scope": st.sampled_from(["global", "layer", "model"]),
    "--rate": NUMBERS,
    "--frequency": st.sampled_from(["1", "5", "0"]),
    "--seed": st.sampled_from(["0", "1", "-1", "x"]),
}
TARGETS = st.one_of(
    st.tuples(st.just("--sparsity"), NUMBERS),
    st.tuples(st.just("--min-accuracy"), NUMBERS),
    st.tuples(st.just("--max-accuracy-drop"), NUMBERS),
)


@st.composite
def npz_contents(draw) -> dict[str, np.ndarray]:
    """Small, often malformed datasets: odd shapes, dtypes, labels and empty or missing splits."""
    n_train, n_test = draw(st.integers(0, 24)), draw(st.integers(0, 8))
    shape = draw(st.sampled_from([(), (4,), (2, 3), (1, 1), (6, 6), (8, 8)]))
    dtype = draw(st.sampled_from(["float32", "float64", "uint8", "int64", "bool"]))
    label_dtype = draw(st.sampled_from(["int64", "uint8", "uint64", "float32", "int8"]))
    high = draw(st.sampled_from([1, 2, 3, 10, 1000, 10**9]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))

    def images(n):
        x = (rng.random((n, *shape)) * 255).astype(dtype)
        if dtype.startswith("float") and n and draw(st.booleans()):
            x.flat[0] = draw(st.sampled_from([np.nan, np.inf]))
        return x

    def labels(n):
        y = rng.integers(0, high, n)
        if n and draw(st.booleans()):
            y[0] = draw(st.sampled_from([-1, high, 2**63 - 1]))
        with np.errstate(all="ignore"):
            return y.astype(label_dtype)

    contents = {"x_train": images(n_train), "y_train": labels(n_train), "x_test": images(n_test), "y_test": labels(n_test)}
    for key in draw(st.lists(st.sampled_from(list(contents)), max_size=1)):
        del contents[key]
    return contents


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> None:
        raise AssertionError(f"JSON holds {constant}")

    return json.loads(text, parse_constant=refuse)


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse exits 2 on its own errors
            code = exc.code
    return code, err.getvalue()


def _data_argument(data: str | dict, folder: Path) -> str:
    """``data`` as a ``--data`` value: a dataset name as it is, generated contents saved as ``folder/data.npz``."""
    if isinstance(data, dict):
        np.savez(folder / "data.npz", **data)
        return str(folder / "data.npz")
    return data


def _check(code: int, err: str, out: Path) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        _strict_json(out.read_text())
    else:
        assert code == 2, (code, err)
        lines = [line for line in err.splitlines() if not line.startswith("bingo: warning:")]
        assert len(lines) == 1 and lines[0].startswith("bingo: error: "), err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=6).flatmap(
        lambda chosen: st.fixed_dictionaries({k: OPTIONS[k] for k in chosen})
    ),
    target=TARGETS,
    data=st.one_of(st.just("digits"), npz_contents(), st.just("nowhere.npz"), st.just("mnist")),
)
def test_run_succeeds_or_fails_in_one_line(options, target, data):
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = _data_argument(data, folder)
        out = folder / "out.json"
        argv = ["run", "--data", data, "--model", "mlp", "--epochs", "1", "--out", str(out), "--no-progress", *target]
        for flag, value in options.items():
            argv += [flag, value]
        code, err = _run(argv)
        _check(code, err, out)


ONE_SHOT = ("bingo", "bingo-paper", "magnitude", "random")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    method=st.sampled_from([*ONE_SHOT, "gmp", "imp", "snip"]),
    training=st.fixed_dictionaries({
        "--epochs": st.sampled_from(["0", "1"]),
        "--batch-size": st.sampled_from(["1", "7", "64"]),  # tiny data: a few steps per epoch
        "--lr": st.sampled_from(["0.003", "0.05", "1e6"]),
        "--optimizer": st.sampled_from(["adam", "sgd"]),
        "--seed": st.sampled_from(["0", "3"]),
    }),
    granularity=st.sampled_from(["weight", "neuron"]),
    target=st.sampled_from([("--sparsity", "0.5"), ("--sparsity", "0,0.9"), ("--min-accuracy", "0.2"), ("--max-accuracy-drop", "0.1")]),
    model=st.sampled_from(["mlp", "conv", "lenet300"]),
    data=st.one_of(st.just("digits"), npz_contents()),
)
def test_valid_flags_on_random_data_succeed_or_fail_in_one_line(method, training, granularity, target, model, data):
    """The deeper paths: training, searching, pruning and writing on odd data, with flags that parse."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = _data_argument(data, folder)
        out = folder / "out.json"
        argv = ["run", "--data", data, "--model", model, "--method", method, "--out", str(out), "--no-progress", *target]
        if data == "digits":  # 1,293 real images: keep the case cheap, no training epochs
            training = {**training, "--epochs": "0"}
        for flag, value in training.items():
            argv += [flag, value]
        if method in ONE_SHOT:
            argv += ["--granularity", granularity]
        code, err = _run(argv)
        _check(code, err, out)


# --------------------------------------------------------------------------- issue 20's generators

SPECIAL_KINDS = st.sampled_from(["fifo", "link to a fifo", "link to /dev/null"])
OUTPUT_FLAGS = st.sampled_from(["--out", "--save", "--scores", "--checkpoint"])


def _special(path: Path, kind: str) -> None:
    import os

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link to a fifo":
        os.mkfifo(path.with_name(path.name + ".fifo"))
        path.symlink_to(path.with_name(path.name + ".fifo"))
    else:
        path.symlink_to("/dev/null")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flag=OUTPUT_FLAGS, kind=SPECIAL_KINDS)
def test_any_output_that_is_not_a_regular_file_is_refused_in_one_line_and_left_alone(flag, kind):
    import os
    import stat

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "target"
        _special(target, kind)
        before = os.lstat(target)
        argv = ["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--no-progress"]
        argv += ["--out", str(Path(tmp) / "r.json")] if flag != "--out" else []
        argv += [flag, str(target)]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
        lines = err.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("bingo: error: "), (argv, err.getvalue())
        after = os.lstat(target)
        assert stat.S_IFMT(after.st_mode) == stat.S_IFMT(before.st_mode) and after.st_ino == before.st_ino
        assert not (Path(tmp) / "r.json").exists()


@settings(max_examples=25, deadline=None)
@given(category=st.sampled_from([UserWarning, DeprecationWarning, RuntimeWarning, FutureWarning, ResourceWarning]),
       message=st.text(min_size=0, max_size=60), count=st.integers(1, 4))
def test_any_foreign_warnings_inside_the_cli_become_lines_and_never_hang(category, message, count):
    import warnings

    from bingo.bench.cli import _one_line_warnings

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        with _one_line_warnings():
            for i in range(count):
                warnings.warn_explicit(f"{message} {i}", category, "elsewhere.py", i + 1)
    shown = err.getvalue()
    # Bounded: each warning shown at most once, never re-shown into the list being read (which looped forever).
    lines_per_warning = len(f"{message} 0".splitlines()) or 1
    assert len(shown.splitlines()) <= count * lines_per_warning, shown
