"""Output files of ``bingo run``: checked before training, never on top of each other; JSON without NaN.

Tests run as root, where a folder without write permission is writable all
the same; so the permission case fakes ``os.access`` and a real
unwritable place (``/sys``, where even root cannot create files) is used
where the machine has one.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

import bingo.bench.strategies
from conftest import assert_user_error, call
from bingo.errors import BingoError
from bingo.io import atomic_write, save_scores, write_json




def run_args(out, *extra) -> list:
    return ["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--no-progress", "--sparsity", "0.5",
            "--out", out, *extra]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if anything is trained: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("trained before the output paths were checked")

    monkeypatch.setattr(bingo.bench.strategies.Experiment, "train", refuse)


# --------------------------------------------------------------------------
# writable folders, checked before training, named as the user wrote them
# --------------------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """``tmp_path/ro``, which ``os.access`` says is not writable (root could write it all the same)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() == folder.resolve():
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.chdir(tmp_path)
    return folder


@pytest.mark.parametrize("flag", ["--out", "--save", "--scores", "--checkpoint", "--export"])
@pytest.mark.parametrize("where", ["ro/result", "ro/new/deeper/result"])
def test_output_in_unwritable_folder_is_refused_before_training(capsys, read_only, no_training, flag, where):
    argv = run_args("r.json") if flag != "--out" else run_args(where)
    if flag != "--out":
        argv += [flag, where]
    code, stdout, err = call(capsys, *argv)
    assert_user_error(code, err, rf"^bingo: error: {flag} {re.escape(where)} cannot be written: the folder ro is not writable$")
    assert stdout == ""
    assert sorted(p.name for p in read_only.iterdir()) == []


def test_unwritable_current_folder_is_named_so(capsys, read_only, no_training, monkeypatch):
    monkeypatch.chdir(read_only)
    code, _, err = call(capsys, *run_args("r.json"))
    assert_user_error(code, err, r"--out r\.json cannot be written: the current folder is not writable$")


SYS = Path("/sys/kernel")


def _sys_refuses_files() -> bool:
    try:
        with tempfile.TemporaryFile(dir=SYS):
            return False
    except OSError:
        return SYS.is_dir()


@pytest.mark.skipif(not _sys_refuses_files(), reason="no folder here that refuses new files")
def test_really_unwritable_folder_is_refused_before_training(capsys, no_training):
    """/sys refuses new files even to root, though ``os.access`` says yes: the check tries for real."""
    assert os.access(SYS, os.W_OK) or os.geteuid() != 0
    code, _, err = call(capsys, *run_args(SYS / "bingo-result.json"))
    assert_user_error(code, err, rf"--out {SYS}/bingo-result\.json cannot be written: the folder {SYS} is not writable$")


def test_atomic_write_failure_names_the_destination_not_the_temporary_file(tmp_path, monkeypatch):
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".out.json.x1y2.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError) as caught:
        write_json(tmp_path / "out.json", {"a": 1})
    assert caught.value.filename == str(tmp_path / "out.json")
    monkeypatch.undo()

    def fail(tmp):
        raise OSError(28, "No space left on device", tmp)

    with pytest.raises(OSError) as caught:
        atomic_write(tmp_path / "out.json", fail)
    assert caught.value.filename == str(tmp_path / "out.json")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# two outputs on one path
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first,second",
    [("--scores", "--out"), ("--checkpoint", "--out"), ("--save", "--scores"), ("--save", "--checkpoint")],
)
def test_two_outputs_on_one_path_are_refused(capsys, tmp_path, no_training, monkeypatch, first, second):
    monkeypatch.chdir(tmp_path)
    shared = tmp_path / "shared.bin"
    save_scores({"w": torch.ones(3)}, shared)  # e.g. scores from an earlier run
    before = shared.read_bytes()
    spellings = {first: "shared.bin", second: str(shared)}  # the same file, written two ways
    argv = run_args(spellings.get("--out", "r.json"))
    for flag in (first, second):
        if flag != "--out":
            argv += [flag, spellings[flag]]
    code, stdout, err = call(capsys, *argv)
    flags = [f for f in ("--out", "--save", "--scores", "--checkpoint") if f in (first, second)]
    assert_user_error(code, err, rf"{flags[0]} and {flags[1]} are the same file \(.*shared\.bin\); give each output its own path$")
    assert stdout == ""
    assert shared.read_bytes() == before


def test_symlinked_output_is_the_same_file(capsys, tmp_path, no_training):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    code, _, err = call(capsys, *run_args(tmp_path / "real" / "x.json", "--checkpoint", tmp_path / "link" / "x.json"))
    assert_user_error(code, err, r"--out and --checkpoint are the same file")


def test_output_inside_the_export_folder_that_export_writes(capsys, tmp_path, no_training):
    export = tmp_path / "exported"
    code, _, err = call(capsys, *run_args(export / "model.json", "--export", export))
    assert_user_error(code, err, rf"--out and --export both write {re.escape(str(export / 'model.json'))}; give each output its own path$")
    code, _, err = call(capsys, *run_args(tmp_path / "r.json", "--save", export, "--export", export))
    assert_user_error(code, err, r"--save and --export are the same")


def test_distinct_outputs_still_run(capsys, tmp_path):
    code, _, err = call(capsys, *run_args(tmp_path / "r.json", "--scores", tmp_path / "s.safetensors",
                                          "--export", tmp_path / "exported", "--save", tmp_path / "exported.pt"))
    assert code == 0, err
    assert json.loads((tmp_path / "r.json").read_text())["scores_file"] == str(tmp_path / "s.safetensors")


# --------------------------------------------------------------------------
# JSON: never NaN or Infinity
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,key,value",
    [
        ({"dense_accuracy": math.nan}, "dense_accuracy", "nan"),
        ({"results": [{"sparsity": 0.5, "accuracy": math.inf}]}, r"results\[0\]\.accuracy", "inf"),
        ({"a": {"b": [1.0, (2.0, -math.inf)]}}, r"a\.b\[1\]\[1\]", "-inf"),
    ],
)
def test_write_json_refuses_non_finite_numbers_naming_the_key(tmp_path, data, key, value):
    path = tmp_path / "r.json"
    write_json(path, {"old": True})
    with pytest.raises(BingoError, match=rf"^cannot write {re.escape(str(path))}: {key} is {value}, and JSON has no NaN or Infinity$"):
        write_json(path, data)
    assert json.loads(path.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_write_json_still_writes_finite_floats_and_other_values(tmp_path):
    data = {"a": 1e308, "b": -0.0, "c": [None, True, "nan"], "d": 3}
    write_json(tmp_path / "r.json", data)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and json.loads(text) == data
