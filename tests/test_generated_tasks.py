"""The generated tasks (``teacher-student``, ``tokens``, ``signals``) and their models (``transformer``, ``conv1d``)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import bingo
from bingo.bench import generated
from bingo.bench.data import DATASETS, load_dataset
from bingo.bench.models import MODELS, build_model
from bingo.errors import ConfigError
from conftest import assert_user_error, call

#: name -> (per-sample shape, classes, training size, test size), as the module docstring documents them
DOCUMENTED = {
    "teacher-student": ((32,), 10, 20000, 2000),
    "tokens": ((16, 16), 8, 8000, 2000),
    "signals": ((2, 64), 6, 6000, 2000),
}
#: the model each task is made for
MODEL_FOR = {"teacher-student": "mlp", "tokens": "transformer", "signals": "conv1d"}


@pytest.mark.parametrize("name", list(generated.GENERATED_TASKS))
def test_same_seed_same_bytes_other_seed_other_data(name):
    first, again, other = generated.generate(name, 3), generated.generate(name, 3), generated.generate(name, 4)
    for a, b in zip(first[:4], again[:4]):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    assert first[0].tobytes() != other[0].tobytes()
    assert first[1].tobytes() != other[1].tobytes()


def _digest(arrays) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()[:16]


def test_task_bytes_are_pinned():
    """The seed-0 tasks are the benchmarks' data: a change of generator would silently change every number.

    Pinned: every array made by elementwise operations on NumPy's PCG64 stream (bit-exact everywhere); not
    the teacher's labels, which go through BLAS matrix products.
    """
    digests = {}
    for name in generated.GENERATED_TASKS:
        x_train, y_train, x_test, y_test, _ = generated.generate(name)
        digests[name] = _digest([x_train, x_test] if name == "teacher-student" else [x_train, y_train, x_test, y_test])
    assert digests == {"teacher-student": "74c89a1c62fdf735", "tokens": "6662dbc274aed7b9", "signals": "6aafddb020d7a123"}


@pytest.mark.parametrize("name", list(generated.GENERATED_TASKS))
def test_shapes_and_classes_as_documented(name):
    shape, classes, train, test = DOCUMENTED[name]
    x_train, y_train, x_test, y_test, stored = generated.generate(name)
    assert stored == shape
    assert x_train.shape == (train, *shape) and x_test.shape == (test, *shape)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert set(np.unique(y_train)) == set(range(classes)) == set(np.unique(y_test))
    # no class dominates: every class holds at least a third of its fair share
    assert np.bincount(y_train).min() > train / classes / 3
    data = load_dataset(name)
    assert data.input_shape == shape and data.num_classes == classes
    assert len(data.y_train) + len(data.y_val) == train and len(data.y_test) == test


def test_tokens_labels_follow_the_rule():
    """Recomputed by hand, sample by sample: the majority marker (ties to the lowest) and the order of the two order tokens."""
    x, y, _, _, _ = generated.tokens(5, train=300, test=1)
    assert np.all(x.sum(axis=2) == 1.0)  # one-hot rows
    ids = x.argmax(axis=2)
    m = generated.MARKERS
    for row, label in zip(ids.tolist(), y.tolist()):
        assert row.count(m) == 1 and row.count(m + 1) == 1
        counts = [row.count(k) for k in range(m)]
        majority = counts.index(max(counts))
        assert label == 2 * majority + int(row.index(m) < row.index(m + 1))


def test_signals_hold_their_class_motif():
    """With the motif far above the noise, every sample of a class shows the same ±1 pattern, and classes differ."""
    x, y, _, _, _ = generated.signals(2, train=200, test=1, amplitude=100.0)
    patterns: dict[int, set] = {}
    for sample, label in zip(x, y.tolist()):
        start = int(np.argmax(np.abs(sample).sum(axis=0)))  # the first place the motif covers (noise << 100)
        loud = np.flatnonzero(np.abs(sample).sum(axis=0) > 50)
        assert loud.tolist() == list(range(loud[0], loud[0] + 7)) and start in loud
        patterns.setdefault(label, set()).add(tuple(np.sign(sample[:, loud]).ravel().tolist()))
    assert sorted(patterns) == list(range(6))
    assert all(len(p) == 1 for p in patterns.values())
    assert len({next(iter(p)) for p in patterns.values()}) == 6


def test_teacher_student_is_hard_for_a_linear_model():
    """The teacher is nonlinear: a least-squares linear read-out of the inputs is far from perfect."""
    x, y, xt, yt, _ = generated.teacher_student(0, train=4000, test=1000)
    onehot = np.eye(10)[y]
    w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], onehot, rcond=None)
    accuracy = np.mean(np.argmax(np.c_[xt, np.ones(len(xt))] @ w, axis=1) == yt)
    assert 0.15 < accuracy < 0.8


@pytest.mark.parametrize("name", list(generated.GENERATED_TASKS))
def test_bingo_run_end_to_end(name, tmp_path, capsys):
    out = tmp_path / "run.json"
    code, _, err = call(capsys, "run", "--data", name, "--model", MODEL_FOR[name], "--epochs", "1", "--train-samples", "300",
                        "--sparsity", "0.5,0.9", "--out", out, "--no-progress")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert [r["sparsity"] for r in report["results"]] == [0.5, 0.9]
    for row in report["results"]:
        assert 0.0 <= row["accuracy"] <= 1.0


@pytest.mark.parametrize("model", ["transformer", "conv1d"])
def test_sequence_models_prune_and_compensate(model):
    """The new models go through the library's prune and compensation: exact sparsity, outputs closer to dense after the re-fit."""
    name = {"transformer": "tokens", "conv1d": "signals"}[model]
    data = load_dataset(name)
    net = build_model(model, data.input_shape, data.num_classes, seed=1).eval()
    x = data.x_train[:512]
    with torch.no_grad():
        dense = net(x)
    scores = bingo.magnitude_scores(net)
    masks = bingo.prune(net, scores, sparsity=0.7)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(1 - kept / total - 0.7) < 1e-3
    with torch.no_grad():
        before = (net(x) - dense).pow(2).mean()
    bingo.compensate(net, masks, x)
    with torch.no_grad():
        after = (net(x) - dense).pow(2).mean()
    assert after < before


def test_unknown_names_list_the_new_choices(capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"valid choices: .*teacher-student, tokens, signals"):
        load_dataset("teacher")
    assert {"teacher-student", "tokens", "signals"} <= set(DATASETS)
    with pytest.raises(ConfigError, match=r"valid choices: .*transformer, conv1d"):
        build_model("transfomer", (16, 16), 8)
    assert {"transformer", "conv1d"} <= set(MODELS)
    with pytest.raises(ConfigError, match=r"unknown generated task 'signal'; valid choices: teacher-student, tokens, signals"):
        generated.generate("signal")
    code, _, err = call(capsys, "run", "--data", "tokenz", "--model", "transformer", "--sparsity", "0.5", "--out", tmp_path / "r.json", "--no-progress")
    assert_user_error(code, err, r"unknown dataset 'tokenz'; valid choices: .*tokens")


def test_bad_shapes_and_sizes_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"model 'transformer' needs 2-D samples \(length, features\).*shape \(32,\)"):
        build_model("transformer", (32,), 10)
    with pytest.raises(ConfigError, match=r"model 'conv1d' needs 2-D samples \(channels, length\).*\(3, 8, 8\)"):
        build_model("conv1d", (3, 8, 8), 10)
    with pytest.raises(ConfigError, match=r"teacher-student: classes must be a whole number >= 2, got 1"):
        generated.teacher_student(classes=1)
    with pytest.raises(ConfigError, match=r"tokens: needs vocabulary >= 7"):
        generated.tokens(vocabulary=5)
    with pytest.raises(ConfigError, match=r"signals: motif \(80\) must not be longer than the signal \(64\)"):
        generated.signals(motif=80)
