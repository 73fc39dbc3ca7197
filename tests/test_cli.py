"""Tests for the ``bingo`` command line (bingo.bench.cli).

Almost everything calls :func:`bingo.bench.cli.main` in-process with tiny settings
(scikit-learn digits, the small MLP, one or two epochs, no progress bar);
one test runs ``python -m bingo`` as a real process to prove the exit codes
and that no traceback reaches the user.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import bingo
import bingo.bench.cli as cli
import bingo.bench.model_file
import bingo.bench.strategies
import bingo.io as bingo_io
from bingo import load_pruned_state_dict, load_scores
from conftest import assert_user_error, call
from bingo.bench.data import load_dataset
from bingo.io import write_json
from bingo.bench.models import build_model
from bingo.bench.training import evaluate

SRC = Path(bingo.__file__).resolve().parents[1]

REPORT_KEYS = {
    "method",
    "data",
    "model",
    "granularity",
    "seed",
    "dense_accuracy",
    "results",
    "train_seconds",
    "search_seconds",
    "uncalibrated_layers",
}


# --------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------




def check_accuracy(value: float) -> None:
    assert isinstance(value, float)
    assert 0.0 <= value <= 1.0


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out.json"


@pytest.fixture
def run_args(out: Path):
    """``run`` arguments on digits with the MLP, one epoch; ``*extra`` are appended."""

    def build(*extra: str, data: str = "digits", model: str = "mlp", epochs: int = 1) -> list[str]:
        return [
            "run",
            "--data",
            data,
            "--model",
            model,
            "--epochs",
            str(epochs),
            "--no-progress",
            "--out",
            str(out),
            *map(str, extra),
        ]

    return build


def write_npz(path: Path, *, drop: tuple[str, ...] = (), **override: np.ndarray) -> Path:
    """A tiny .npz dataset: 40 train / 12 test samples of 8x8 images, labels 0..3."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.random((40, 8, 8), dtype=np.float32),
        "y_train": np.arange(40) % 4,
        "x_test": rng.random((12, 8, 8), dtype=np.float32),
        "y_test": np.arange(12) % 4,
    }
    arrays.update(override)
    for key in drop:
        del arrays[key]
    np.savez(path, **arrays)
    return path


def folder_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# --------------------------------------------------------------------------
# bingo demo
# --------------------------------------------------------------------------


def test_demo_prints_table_of_methods_by_sparsity(capsys):
    code, out, err = call(capsys, "demo", "--epochs", "2", "--no-progress")
    assert code == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    columns = ["sparsity", "bingo", "bingo-uncompensated", "bingo-paper", "magnitude", "magnitude+compensation", "random"]
    header = next(i for i, line in enumerate(lines) if line.split() == columns)
    assert set(lines[header + 1].replace(" ", "")) == {"-"}
    rows = [line.split() for line in lines[header + 2 : header + 8]]
    assert [row[0] for row in rows] == ["0.00", "0.50", "0.70", "0.80", "0.90", "0.95"]
    # bingo's blend weight, chosen per pruned sparsity on the validation digits
    chosen = re.search(r"bingo's magnitude weight, chosen on the \d+ validation digits: (.*) \(", out).group(1)
    assert [part.split(" at ")[1] for part in chosen.split(", ")] == ["0.5", "0.7", "0.8", "0.9", "0.95"]
    assert all(float(part.split(" at ")[0]) in bingo.BLEND_WEIGHTS for part in chosen.split(", "))
    for row in rows:
        assert len(row) == len(columns)
        for value in row[1:]:
            assert 0.0 <= float(value) <= 1.0
    # Nothing is pruned at sparsity 0, so every method shows the dense accuracy.
    dense = re.search(r"dense test accuracy (\d\.\d{3})", out).group(1)
    assert rows[0][1:] == [dense] * (len(columns) - 1)
    # compensation changes the pruned network: the compensated columns differ from their uncompensated twins
    by_column = {name: [row[i] for row in rows[1:]] for i, name in enumerate(columns)}
    assert by_column["bingo"] != by_column["bingo-uncompensated"]
    assert by_column["magnitude+compensation"] != by_column["magnitude"]
    assert "2 epochs" in out


# --------------------------------------------------------------------------
# bingo run: results
# --------------------------------------------------------------------------


def test_run_writes_json_report(capsys, run_args, out):
    code, stdout, err = call(capsys, *run_args("--sparsity", "0.5,0.9"))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    assert report["method"] == "bingo"
    assert report["data"] == "digits"
    assert report["model"] == "mlp"
    assert report["granularity"] == "weight"
    assert report["seed"] == 0
    check_accuracy(report["dense_accuracy"])
    assert [r["sparsity"] for r in report["results"]] == [0.5, 0.9]
    for result in report["results"]:
        # the default bingo records the blend weight it chose on the validation split at each sparsity
        assert set(result) == {"sparsity", "accuracy", "sparsity_all_parameters", "prune_seconds", "magnitude_weight"}
        assert result["magnitude_weight"] in bingo.BLEND_WEIGHTS
        check_accuracy(result["accuracy"])
    for key in ("train_seconds", "search_seconds"):
        assert isinstance(report[key], float) and report[key] >= 0.0
    assert report["search_seconds"] <= report["train_seconds"]
    assert report["training"]["epochs"] == 1
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["threads"] == torch.get_num_threads()
    # The table on stdout shows the same numbers as the file.
    assert f"{report['results'][1]['accuracy']:.4f}" in stdout
    assert str(out) in stdout
    assert "Traceback" not in err
    assert report["processes"] == 1


def test_run_trains_on_a_subset_when_asked(capsys, run_args, out):
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--train-samples", "300"))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["train_examples"] == 300
    assert report["train_steps"] == 3  # one epoch of 300 at batch 128
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--train-samples", "0"))
    assert_user_error(code, err, r"--train-samples must be a whole number >= 1, got 0")


def test_run_on_npz_file(capsys, run_args, out, tmp_path):
    data = write_npz(tmp_path / "tiny.npz")
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", data=str(data)))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["data"] == str(data)
    assert report["train_examples"] + report["validation_examples"] == 40
    assert report["test_examples"] == 12
    check_accuracy(report["results"][0]["accuracy"])


def test_run_neuron_granularity_prunes_whole_units(capsys, run_args, out, tmp_path):
    model_file = tmp_path / "neuron.pt"
    code, _, err = call(capsys, *run_args("--granularity", "neuron", "--sparsity", "0.5", "--save", model_file))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["granularity"] == "neuron"
    assert report["search"]["granularity"] == "neuron"
    assert [r["sparsity"] for r in report["results"]] == [0.5]
    check_accuracy(report["results"][0]["accuracy"])
    state = torch.load(model_file, weights_only=True)["state_dict"]
    for layer in ("fc1", "fc2"):
        rows = state[f"{layer}.weight_mask"].bool()
        # Every unit is kept or removed whole.
        assert torch.all(rows.all(dim=1) | (~rows).all(dim=1))
    removed = sum(int((~state[f"{k}.weight_mask"].bool()).all(dim=1).sum()) for k in ("fc1", "fc2"))
    assert removed == round(0.5 * (64 + 32))
    # The output layer's units are the classes: never pruned.
    assert "fc3.weight_mask" not in state


def test_run_min_accuracy_keeps_floor(capsys, run_args, out):
    code, stdout, err = call(capsys, *run_args("--min-accuracy", "0.3", epochs=2))
    assert code == 0, err
    assert "warning" not in err
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report)
    [result] = report["results"]
    assert result["validation_floor"] == 0.3
    assert result["validation_accuracy"] >= 0.3
    assert 0.0 < result["sparsity"] < 1.0
    assert result["evaluations"] >= 2
    check_accuracy(result["accuracy"])


def test_run_min_accuracy_out_of_reach_warns(capsys, run_args, out):
    # One epoch does not get near 100 % validation accuracy: nothing can be pruned.
    code, _, err = call(capsys, *run_args("--min-accuracy", "1.0"))
    assert code == 0, err
    [result] = json.loads(out.read_text())["results"]
    assert result["sparsity"] == 0.0
    assert result["validation_accuracy"] < result["validation_floor"] == 1.0
    assert re.search(r"^bingo: warning: .*below the floor 1\.0000; nothing was pruned$", err.strip(), flags=re.M)


def test_run_max_accuracy_drop(capsys, run_args, out):
    code, stdout, err = call(capsys, *run_args("--max-accuracy-drop", "0.1", epochs=2))
    assert code == 0, err
    # where one-shot stops holding, and what goes further
    assert re.search(r"^one-shot \S+ holds the floor up to sparsity 0\.\d{4} .*beyond it, prune during training: --method bingo-gradual", stdout, flags=re.M)
    # bingo compensates by default, so it is also pointed to the multi-step re-fit; uncompensated magnitude is not
    assert re.search(r"^one-shot bingo holds .*without training reach --sparsity S in prune-and-refit steps: --compensation-steps 4$",
                     stdout, flags=re.M)
    report = json.loads(out.read_text())
    [result] = report["results"]
    assert set(result) == {"sparsity", "accuracy", "validation_accuracy", "validation_floor", "evaluations", "sparsity_all_parameters",
                           "prune_seconds"}
    assert result["validation_accuracy"] >= result["validation_floor"]
    assert 0.0 <= result["validation_floor"] <= 1.0
    assert 0.0 < result["sparsity"] < 1.0
    check_accuracy(result["accuracy"])


def test_run_max_accuracy_drop_uncompensated_is_not_pointed_to_compensation_steps(capsys, run_args):
    code, stdout, err = call(capsys, *run_args("--method", "magnitude", "--max-accuracy-drop", "0.1", epochs=2))
    assert code == 0, err
    assert re.search(r"^one-shot magnitude holds the floor up to .*--method bingo-gradual --sparsity S \(one training run per target\)$",
                     stdout, flags=re.M)


def test_run_save_and_scores_files(capsys, run_args, out, tmp_path):
    model_file, scores_file = tmp_path / "model.pt", tmp_path / "scores.safetensors"
    code, _, err = call(capsys, *run_args("--sparsity", "0.9", "--save", model_file, "--scores", scores_file))
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["model_file"] == str(model_file)
    assert report["scores_file"] == str(scores_file)

    saved = torch.load(model_file, weights_only=True)
    assert saved["kind"] == "bingo-model"
    assert saved["model"] == "mlp"
    assert saved["sparsity"] == 0.9
    assert saved["accuracy"] == report["results"][-1]["accuracy"]
    state = saved["state_dict"]
    layers = ("fc1", "fc2", "fc3")
    for layer in layers:
        assert state[f"{layer}.weight_mask"].shape == state[f"{layer}.weight_orig"].shape
    total = sum(state[f"{k}.weight_mask"].numel() for k in layers)
    pruned = sum(int((state[f"{k}.weight_mask"] == 0).sum()) for k in layers)
    assert pruned == round(0.9 * total)

    # The saved model reproduces the reported accuracy on the same data.
    data = load_dataset("digits", seed=0)
    assert list(data.input_shape) == saved["input_shape"]
    assert (data.offset, data.scale) == (saved["preprocess"]["offset"], saved["preprocess"]["scale"])
    model = build_model("mlp", data.input_shape, saved["num_classes"])
    load_pruned_state_dict(model, state)
    assert evaluate(model, data.x_test, data.y_test) == report["results"][-1]["accuracy"]

    scores = load_scores(scores_file)
    assert set(scores) == {f"{k}.weight" for k in layers}
    for layer in layers:
        assert scores[f"{layer}.weight"].shape == state[f"{layer}.weight_orig"].shape
        assert torch.all((scores[f"{layer}.weight"] >= 0) & (scores[f"{layer}.weight"] <= 1))


def test_run_default_scores_blend_the_search_with_magnitude(capsys, run_args, tmp_path):
    """The default bingo prunes by combine_ranks(significance, magnitude); --magnitude-weight 0 by significance alone."""
    blended_file, alone_file, model_file = tmp_path / "blend.safetensors", tmp_path / "alone.safetensors", tmp_path / "m.pt"
    code, _, err = call(capsys, *run_args("--sparsity", "0", "--scores", blended_file, "--save", model_file))
    assert code == 0, err
    alone_args = run_args("--sparsity", "0", "--scores", alone_file, "--magnitude-weight", "0")
    alone_args[alone_args.index("--out") + 1] = str(tmp_path / "alone.json")
    code, _, err = call(capsys, *alone_args)
    assert code == 0, err
    model = build_model("mlp", (1, 8, 8), 10)
    load_pruned_state_dict(model, torch.load(model_file, weights_only=True)["state_dict"])  # sparsity 0: every weight kept
    alone, blended = load_scores(alone_file), load_scores(blended_file)
    magnitude = bingo.magnitude_scores(model)
    assert blended.keys() == alone.keys() == magnitude.keys()

    # Reference: scipy's average ranks over all layers at once, scaled to [0, 1], averaged with equal weights.
    def global_ranks(scores):
        flat = np.concatenate([scores[k].double().flatten().numpy() for k in blended])
        return (scipy.stats.rankdata(flat, method="average") - 1) / (flat.size - 1)

    expected = torch.from_numpy((global_ranks(alone) + global_ranks(magnitude)) / 2).float()
    got = torch.cat([blended[k].flatten() for k in blended])
    torch.testing.assert_close(got, expected)
    for key in blended:
        assert not torch.equal(blended[key], alone[key])


# --------------------------------------------------------------------------
# bingo run: checkpoints
# --------------------------------------------------------------------------


def test_checkpoint_resume_equals_uninterrupted_run(capsys, run_args, tmp_path):
    checkpoint = tmp_path / "train.ckpt"
    resumed_out, resumed_scores = tmp_path / "resumed.json", tmp_path / "resumed.safetensors"
    straight_out, straight_scores = tmp_path / "straight.json", tmp_path / "straight.safetensors"

    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--checkpoint", checkpoint, epochs=1))
    assert code == 0, err
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1

    resumed = run_args("--sparsity", "0.5", "--checkpoint", checkpoint, "--scores", resumed_scores, epochs=2)
    resumed[resumed.index("--out") + 1] = str(resumed_out)
    code, _, err = call(capsys, *resumed)
    assert code == 0, err
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2

    straight = run_args("--sparsity", "0.5", "--scores", straight_scores, epochs=2)
    straight[straight.index("--out") + 1] = str(straight_out)
    code, _, err = call(capsys, *straight)
    assert code == 0, err

    a, b = json.loads(resumed_out.read_text()), json.loads(straight_out.read_text())
    assert a["dense_accuracy"] == b["dense_accuracy"]
    untimed = [[{k: v for k, v in row.items() if k != "prune_seconds"} for row in r["results"]] for r in (a, b)]
    assert untimed[0] == untimed[1]  # every row but its wall time
    assert a["train_steps"] == b["train_steps"] == 2 * 11  # 1293 samples / batch 128 -> 11 steps per epoch
    sa, sb = load_scores(resumed_scores), load_scores(straight_scores)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key])


def test_checkpoint_of_other_model_is_refused(capsys, run_args, out, tmp_path):
    checkpoint = tmp_path / "mlp.ckpt"
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--checkpoint", checkpoint))
    assert code == 0, err
    before_ckpt, before_out = checkpoint.read_bytes(), out.read_bytes()

    code, stdout, err = call(capsys, *run_args("--sparsity", "0.5", "--checkpoint", checkpoint, model="lenet300"))
    assert_user_error(code, err, rf"checkpoint {re.escape(str(checkpoint))} does not fit the model")
    # Neither the checkpoint nor the earlier results were touched.
    assert checkpoint.read_bytes() == before_ckpt
    assert out.read_bytes() == before_out
    assert stdout == ""


@pytest.mark.parametrize(
    ("changed", "pattern"),
    [
        (("--granularity", "neuron"), r"search state was saved with different settings: granularity='weight' \(now 'neuron'\)"),
        (("--lr", "0.01"), r"checkpoint .*train\.ckpt was written with different training settings: lr=0\.0012 \(now 0\.01\)"),
    ],
    ids=["search-settings", "training-settings"],
)
def test_checkpoint_with_other_settings_is_refused(capsys, run_args, tmp_path, changed, pattern):
    checkpoint = tmp_path / "train.ckpt"
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--checkpoint", checkpoint))
    assert code == 0, err
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--checkpoint", checkpoint, *changed, epochs=2))
    assert_user_error(code, err, pattern)


def test_checkpoint_that_is_not_a_training_checkpoint(capsys, run_args, tmp_path):
    model_file = tmp_path / "model.pt"
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--save", model_file))
    assert code == 0, err
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--checkpoint", model_file))
    assert_user_error(code, err, rf"{re.escape(str(model_file))} is not a bingo training checkpoint")

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a torch file")
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--checkpoint", garbage))
    assert_user_error(code, err, rf"{re.escape(str(garbage))} is not a bingo checkpoint \(corrupt or from another program\)$")


# --------------------------------------------------------------------------
# bad input: exit 2, one line, no traceback
# --------------------------------------------------------------------------

BAD_OPTIONS = [
    # (extra run arguments, pattern of the message)
    (("--model", "vgg"), r"unknown model 'vgg'; valid choices: lenet300, mlp, conv, resnet, transformer, conv1d$"),
    (("--data", "cifar"), r"unknown dataset 'cifar'; valid choices: digits, fashion-mnist, mnist"),
    (("--sparsity", "1.0"), r"sparsity must be in \[0, 1\), got 1\.0$"),
    (("--sparsity", "-0.1"), r"sparsity must be in \[0, 1\), got -0\.1$"),
    (("--sparsity", "0.5,1.5"), r"sparsity must be in \[0, 1\), got 1\.5$"),
    (("--sparsity", "nan"), r"sparsity must be in \[0, 1\), got nan$"),
    (("--sparsity", "half"), r"argument --sparsity: --sparsity expects fractions in \[0, 1\) or N:M patterns such as 2:4, separated by commas, got 'half'$"),
    (("--sparsity", ","), r"--sparsity needs at least one value$"),
    (("--sparsity", "0.9,,0.95"), r"--sparsity has an empty item in '0\.9,,0\.95'; separate the values by single commas$"),
    (("--sparsity", "0.5,"), r"--sparsity has an empty item in '0\.5,'; separate the values by single commas$"),
    (("--onnx",), r"--onnx writes model\.onnx into the --export folder; add --export DIR, or drop --onnx$"),
    (("--data-dir", "."), r"--data-dir applies to fashion-mnist and mnist \(the folder of their IDX files\), not to --data digits; drop --data-dir$"),
    (("--out", ""), r"--out is empty; give a file path$"),
    (("--save", " "), r"--save is empty; give a file path$"),
    (("--fraction", "0"), r"fraction must be in \(0, 1\], got 0\.0$"),
    (("--fraction", "1.5"), r"fraction must be in \(0, 1\], got 1\.5$"),
    (("--fraction", "lots"), r"--fraction expects a float, got 'lots'$"),
    (("--mode", "shuffle"), r"argument --mode: invalid choice: 'shuffle' \(choose from 'reset', 'zero'\)$"),
    (("--metric", "f1"), r"argument --metric: invalid choice: 'f1' \(choose from 'accuracy', 'loss'\)$"),
    (("--granularity", "layer"), r"argument --granularity: invalid choice: 'layer' \(choose from 'weight', 'neuron'\)$"),
    (("--rule", "max"), r"argument --rule: invalid choice: 'max' \(choose from 'mean', 'paper', 'contrast'\)$"),
    (("--optimizer", "rmsprop"), r"argument --optimizer: invalid choice: 'rmsprop' \(choose from 'adam', 'sgd'\)$"),
    (("--scope", "model"), r"argument --scope: invalid choice: 'model' \(choose from 'global', 'layer', 'lamp', 'block'\)$"),
    (("--magnitude-weight", "1.5"), r"magnitude weight must be in \[0, 1\], got 1\.5$"),
    (("--epochs", "two"), r"--epochs expects an int, got 'two'$"),
    (("--epochs", "-1"), r"epochs must be a whole number >= 0, got -1$"),
    (("--batch-size", "0"), r"batch size must be a whole number >= 1, got 0$"),
    (("--lr", "0"), r"learning rate must be a finite number > 0, got 0\.0$"),
    (("--lr", "inf"), r"learning rate must be a finite number > 0, got inf$"),
    (("--min-accuracy", "1.5"), r"--min-accuracy must be in \[0, 1\], got 1\.5$"),
    (("--max-accuracy-drop", "-0.1"), r"--max-accuracy-drop must be in \[0, 1\], got -0\.1$"),
    (("--min-accuracy", "0.5", "--max-accuracy-drop", "0.1"), r"argument --max-accuracy-drop: not allowed with argument --min-accuracy$"),
]


@pytest.mark.parametrize(("extra", "pattern"), BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_error(capsys, monkeypatch, out, extra, pattern):
    monkeypatch.chdir(out.parent)  # a relative output the code failed to refuse lands here, not in the checkout
    args = {"--data": "digits", "--model": "mlp"}
    rest = list(extra)
    for flag in ("--data", "--model"):
        if flag in rest:
            i = rest.index(flag)
            args[flag] = rest[i + 1]
            del rest[i : i + 2]
    if not any(flag in rest for flag in ("--sparsity", "--min-accuracy", "--max-accuracy-drop")):
        rest += ["--sparsity", "0.5"]
    argv = ["run", "--data", args["--data"], "--model", args["--model"], "--epochs", "1", "--no-progress", "--out", out, *rest]
    code, stdout, err = call(capsys, *argv)
    assert_user_error(code, err, pattern)
    assert stdout == ""
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        ((), r"the following arguments are required: command$"),
        (("train",), r"argument command: invalid choice: 'train'"),
        (("run", "--data", "digits", "--model", "mlp", "--sparsity", "0.5"), r"the following arguments are required: --out$"),
        (("run", "--data", "digits", "--model", "mlp", "--out", "x.json"), r"one of the arguments --sparsity --min-accuracy --max-accuracy-drop is required$"),
        (("demo", "--epochs", "many"), r"argument --epochs: invalid int value: 'many'$"),
    ],
    ids=["no-command", "unknown-command", "no-out", "no-target", "demo-epochs"],
)
def test_bad_command_line_is_one_line_error(capsys, argv, pattern):
    code, _, err = call(capsys, *argv)
    assert_user_error(code, err, pattern)


def test_bad_data_files(capsys, run_args, tmp_path):
    """Every kind of bad data file names the file and the problem."""
    cases = []

    missing = tmp_path / "nothere.npz"
    cases.append((missing, rf"no such file: {re.escape(str(missing))}$"))

    no_y_test = write_npz(tmp_path / "no_y_test.npz", drop=("y_test",))
    cases.append((no_y_test, r"no_y_test\.npz is missing array\(s\) y_test; an \.npz dataset needs x_train, y_train, x_test, y_test$"))

    mismatched = write_npz(tmp_path / "mismatched.npz", y_train=np.arange(39) % 4)
    cases.append((mismatched, r"mismatched\.npz: x_train has 40 samples but y_train has 39 labels$"))

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a zip archive" * 10)
    cases.append((corrupt, rf"cannot read {re.escape(str(corrupt))} as \.npz: "))

    for path, pattern in cases:
        code, _, err = call(capsys, *run_args("--sparsity", "0.5", data=str(path)))
        assert_user_error(code, err, pattern)


def test_fashion_mnist_missing_files(capsys, run_args, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--data-dir", empty, data="fashion-mnist"))
    line = assert_user_error(code, err, rf"Fashion-MNIST IDX files not found in {re.escape(str(empty))}")
    assert "apt-get install dataset-fashion-mnist" in line
    assert "train-images-idx3-ubyte" in line


def test_output_path_that_is_a_folder(capsys, run_args, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    for flag in ("--out", "--save", "--scores", "--checkpoint"):
        argv = run_args("--sparsity", "0.5")
        if flag == "--out":
            argv[argv.index("--out") + 1] = str(folder)
        else:
            argv += [flag, str(folder)]
        code, stdout, err = call(capsys, *argv)
        assert_user_error(code, err, rf"{flag} {re.escape(str(folder))} is a folder; give a file path$")
        assert stdout == ""  # refused before training
    assert folder_listing(folder) == []


def test_output_path_under_a_file(capsys, run_args, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    target = blocker / "deeper" / "out.json"
    argv = run_args("--sparsity", "0.5")
    argv[argv.index("--out") + 1] = str(target)
    code, stdout, err = call(capsys, *argv)
    assert_user_error(
        code, err, rf"--out {re.escape(str(target))} cannot be created: {re.escape(str(blocker))} is a file, not a folder$"
    )
    assert stdout == ""
    assert blocker.read_text() == "a file, not a folder"


def test_write_failure_after_training_is_one_line_error(capsys, run_args, out, monkeypatch):
    def full_disk(path, data):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(cli, "write_json", full_disk)
    code, _, err = call(capsys, *run_args("--sparsity", "0.5"))
    assert_user_error(code, err, rf"No space left on device: {re.escape(str(out))}$")


# --------------------------------------------------------------------------
# atomic output
# --------------------------------------------------------------------------

OLD_REPORT = {"method": "bingo", "results": [{"sparsity": 0.5, "accuracy": 0.9}]}


@pytest.fixture
def existing_out(out: Path) -> bytes:
    write_json(out, OLD_REPORT)
    return out.read_bytes()


def test_failed_run_leaves_existing_output_unchanged(capsys, run_args, out, existing_out, tmp_path, monkeypatch):
    failures = [
        # rejected before anything is loaded
        (run_args("--sparsity", "1.0"), 2),
        (run_args("--sparsity", "0.5", model="vgg"), 2),
        # rejected while loading data
        (run_args("--sparsity", "0.5", data=str(write_npz(tmp_path / "bad.npz", drop=("x_test",)))), 2),
    ]
    for argv, expected in failures:
        code, _, err = call(capsys, *argv)
        assert code == expected, err
        assert "Traceback" not in err
        assert out.read_bytes() == existing_out
        assert json.loads(out.read_text()) == OLD_REPORT

    # Fails after training, while writing the model file (before the report).
    def full_disk(obj, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(bingo.bench.model_file, "save_checkpoint", full_disk)
    code, _, err = call(capsys, *run_args("--sparsity", "0.5", "--save", tmp_path / "model.pt"))
    assert_user_error(code, err, r"No space left on device: .*model\.pt$")
    assert out.read_bytes() == existing_out

    # Ctrl-C during training: exit 130, old report intact.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bingo.bench.strategies.Experiment, "train", interrupted)
    code, _, err = call(capsys, *run_args("--sparsity", "0.5"))
    assert code == 130
    assert err.startswith("bingo: interrupted")
    assert "Traceback" not in err
    assert out.read_bytes() == existing_out
    # No temporary files were left next to the report.
    assert folder_listing(out.parent) == sorted(["bad.npz", out.name])


def test_successful_run_replaces_output(capsys, run_args, out, existing_out):
    code, _, err = call(capsys, *run_args("--sparsity", "0.5"))
    assert code == 0, err
    assert json.loads(out.read_text())["model"] == "mlp"
    assert folder_listing(out.parent) == [out.name]


def test_write_json_keeps_old_file_when_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    write_json(path, {"old": True})
    before = path.read_bytes()

    def broken_dump(obj, fp, **kwargs):
        fp.write('{"new": tr')  # half a document, then the failure
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(bingo_io.json, "dump", broken_dump)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_json(path, {"new": True})
    assert path.read_bytes() == before
    assert json.loads(path.read_text()) == {"old": True}
    assert folder_listing(tmp_path) == ["report.json"]

    # A new file that fails midway is not created at all.
    with pytest.raises(RuntimeError):
        write_json(tmp_path / "fresh.json", {"new": True})
    assert folder_listing(tmp_path) == ["report.json"]

    monkeypatch.undo()
    write_json(path, {"new": True})
    assert json.loads(path.read_text()) == {"new": True}
    assert folder_listing(tmp_path) == ["report.json"]


# --------------------------------------------------------------------------
# a real process
# --------------------------------------------------------------------------


def test_real_process_help_and_bad_input(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}

    def bingo_process(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "bingo", *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )

    helped = bingo_process("--help")
    assert helped.returncode == 0, helped.stderr
    assert "demo" in helped.stdout and "run" in helped.stdout
    assert helped.stderr == ""

    failed = bingo_process("run", "--data", "digits", "--model", "vgg", "--sparsity", "0.5", "--out", "out.json")
    assert failed.returncode == 2
    assert failed.stdout == ""
    assert "Traceback" not in failed.stderr
    assert failed.stderr.splitlines() == ["bingo: error: unknown model 'vgg'; valid choices: lenet300, mlp, conv, resnet, transformer, conv1d"]
    assert not (tmp_path / "out.json").exists()


def test_run_method_presets_and_overrides(capsys, tmp_path):
    out = tmp_path / "r.json"
    base = ["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--out", str(out), "--no-progress"]
    code, _, err = call(capsys, *base)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["method"] == "bingo"
    assert (report["search"]["estimator"], report["search"]["mode"], report["search"]["every"]) == ("hybrid", "zero", None)
    assert report["config"]["compensation"]["compensate"] is True
    code, _, err = call(capsys, *base, "--method", "bingo-paper", "--fraction", "0.2", "--finetune-epochs", "1")
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["method"] == "bingo-paper" and report["finetune_epochs"] == 1
    assert report["config"]["finetune_epochs"] == 1 and report["config"]["magnitude_weight"] == 0.0
    assert (report["search"]["estimator"], report["search"]["metric"], report["search"]["fraction"]) == ("probe", "accuracy", 0.2)
    code, _, err = call(capsys, *base, "--granularity", "neuron")
    assert code == 0, err
    assert json.loads(out.read_text())["scope"] == "layer"  # neurons rank per layer unless told otherwise
    code, _, err = call(capsys, *base, "--method", "lottery")
    assert code == 2 and "argument --method: invalid choice: 'lottery' (choose from 'bingo', 'bingo-paper', 'magnitude'" in err


def test_run_takes_every_registered_method(capsys, tmp_path):
    out = tmp_path / "r.json"
    base = ["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--out", str(out), "--no-progress"]
    for method in ("magnitude", "random", "gmp", "imp", "snip"):
        code, _, err = call(capsys, *base, "--method", method)
        assert code == 0, (method, err)
        [result] = json.loads(out.read_text())["results"]
        assert result["sparsity"] == 0.5 and 0.0 <= result["accuracy"] <= 1.0
    code, _, err = call(capsys, *base, "--method", "imp", "--rate", "0.5")
    assert code == 0, err
    assert json.loads(out.read_text())["config"]["rate"] == 0.5
    code, _, err = call(capsys, *base, "--method", "magnitude", "--fraction", "0.2")
    assert code == 2 and err.startswith("bingo: error: --fraction does not apply to method 'magnitude'; its settings: --finetune-epochs")
    code, _, err = call(capsys, *base[:-5], "--min-accuracy", "0.5", "--out", str(out), "--no-progress", "--method", "imp")
    assert code == 2 and "--min-accuracy needs a method that prunes once after training (bingo, bingo-paper, magnitude, random); 'imp' does not" in err


def test_library_warnings_are_one_line_each(capsys, tmp_path):
    """A class seen only in the test set is named in one 'bingo: warning:' line, not Python's two-line warning."""
    y_test = np.array([0, 1, 2, 3, 0, 1, 2, 4, 0, 1, 2, 3])  # class 4 has no training example
    data = write_npz(tmp_path / "d.npz", y_test=y_test)
    code, _, err = call(capsys, "run", "--data", data, "--model", "mlp", "--epochs", "1", "--sparsity", "0.5",
                        "--out", tmp_path / "r.json", "--no-progress")
    assert code == 0, err
    warning_lines = [line for line in err.splitlines() if "no training examples" in line]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("bingo: warning: ")
    assert all(line.startswith("bingo: warning: ") for line in err.splitlines())


@pytest.mark.parametrize("command", ["run", "compare", "demo"])
def test_every_subcommand_prints_its_help(capsys, command):
    # Help texts are formatted with %-style by argparse: a bare "%" in any setting's help crashed --help.
    code, out, err = call(capsys, command, "--help")
    assert code == 0, err
    assert out.startswith(f"usage: bingo {command}")
    if command == "run":
        assert "(each keeps at least 1%)" in " ".join(out.split())
    if command == "compare":  # one screen; every method's settings are behind --help-methods
        assert len(out.splitlines()) < 80 and "--bingo-fraction" not in out.replace("e.g. --bingo-", "")
        code, full, err = call(capsys, "compare", "--help-methods")
        assert code == 0, err
        assert "(each keeps at least 1%)" in " ".join(full.split()) and "--gmp-frequency FREQUENCY" in full
        assert "METHOD_" not in full and "[None" not in full and "None]" not in full  # no internal names leak


def test_compare_train_samples_out_of_range_is_one_line(capsys, tmp_path):
    code, _, err = call(capsys, "compare", "--data", "digits", "--model", "mlp", "--methods", "random", "--train-samples", "5000",
                        "--epochs", "1", "--out", tmp_path / "c", "--no-progress")
    assert_user_error(code, err, r"training samples must be a whole number in \[1, 1293\]")
    assert not (tmp_path / "c" / "results.json").exists()


@pytest.mark.parametrize(("extra", "pattern"), [
    (("--data-dir", "."), r"--data-dir applies to fashion-mnist and mnist \(the folder of their IDX files\), not to --data digits; drop --data-dir$"),
    (("--methods", "random,,magnitude"), r"--methods has an empty item in 'random,,magnitude'; separate the values by single commas$"),
    (("--gmp-frequency", "0"), r"--gmp-frequency sets method 'gmp', which --methods does not include \(random\); add gmp to --methods, or drop --gmp-frequency$"),
], ids=["data-dir", "empty-method", "flag-of-a-method-not-compared"])
def test_compare_refuses_what_it_would_ignore(capsys, tmp_path, extra, pattern):
    code, _, err = call(capsys, "compare", "--data", "digits", "--model", "mlp", "--methods", "random", "--epochs", "1",
                        "--out", tmp_path / "c", "--no-progress", *extra)
    assert_user_error(code, err, pattern)
    assert not (tmp_path / "c").exists()


def test_run_reports_what_was_scored_and_the_sparsity_over_all_parameters(capsys, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = call(capsys, "run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.9",
                             "--method", "magnitude", "--out", out, "--no-progress")
    assert code == 0, err
    report = json.loads(out.read_text())
    # mlp 64-64-32-10: weights 4096 + 2048 + 320 = 6464 scored, biases 64 + 32 + 10 = 106 not
    assert report["coverage"] == {"tensors": 3, "scored": 6464, "total": 6570, "unscored": {"biases": 106}}
    assert report["results"][0]["sparsity_all_parameters"] == round(0.9 * 6464) / 6570
    assert "scoring 3 weight tensors: 6,464 of 6,570 parameters (98.4%); not scored: biases 106" in stdout
