"""Issue 20, the second hostile round: nothing lost, nothing hangs, one-line errors.

Each test here failed before its fix. Tests that could hang on a regression
(a warning loop, a FIFO that blocks) run their case in a subprocess with a
timeout, so a regression fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import bingo
from conftest import assert_user_error, call

SRC = Path(bingo.__file__).resolve().parents[1]


def run_python(code: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter that imports this bingo; fail (not hang) past ``timeout`` seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout} s (a hang)")


def run_bingo(*argv, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``python -m bingo ARGV`` as a real process, with a timeout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    try:
        return subprocess.run([sys.executable, "-m", "bingo", *map(str, argv)], capture_output=True, text=True,
                              timeout=timeout, env=env, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"bingo {' '.join(map(str, argv))} did not finish within {timeout} s (a hang)")


# -- a foreign warning inside run / compare ---------------------------------------------


@pytest.mark.parametrize("category", ["UserWarning", "DeprecationWarning", "RuntimeWarning"])
def test_a_foreign_warning_inside_the_cli_block_is_shown_once_and_does_not_hang(category):
    result = run_python(f"""
        import warnings
        from bingo.bench.cli import _one_line_warnings
        warnings.simplefilter("always")
        with _one_line_warnings():
            warnings.warn("from another library", {category})
            warnings.warn("from another library, twice", {category})
        print("done")
    """, timeout=15)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "done\n"
    assert result.stderr.count("from another library") == 2
    assert "bingo: warning" not in result.stderr


def test_a_foreign_warning_raised_with_an_exception_in_the_block_is_shown_and_the_error_kept():
    result = run_python("""
        import warnings
        from bingo.bench.cli import _one_line_warnings
        try:
            with _one_line_warnings():
                warnings.warn("foreign")
                raise KeyError("inner")
        except KeyError as exc:
            print("kept", exc)
    """, timeout=15)
    assert result.returncode == 0, result.stderr
    assert "kept 'inner'" in result.stdout and result.stderr.count("foreign") == 1


@pytest.mark.parametrize("writer", ["pickle", "torch-protocol-4"])
def test_a_foreign_pickle_as_checkpoint_is_one_line_and_returns(tmp_path, writer):
    """Was: torch's UserWarning about the pickle protocol sent the CLI into an endless loop (4.8 GB in 45 s)."""
    import pickle

    checkpoint = tmp_path / "x.pkl"
    if writer == "pickle":
        checkpoint.write_bytes(pickle.dumps({"a": 1}))
    else:
        torch.save({"a": 1}, checkpoint, pickle_protocol=4, _use_new_zipfile_serialization=False)
    result = run_bingo("run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--method", "magnitude",
                       "--out", tmp_path / "r.json", "--checkpoint", checkpoint, "--no-progress", timeout=60)
    assert_user_error(result.returncode, result.stderr, r"x\.pkl is not a bingo checkpoint \(corrupt or from another program\)")
    assert "UserWarning" not in result.stderr
    assert not (tmp_path / "r.json").exists()
