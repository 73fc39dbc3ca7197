"""Tests for bingo.export: compact files and the self-contained export (API and CLI).

The export is checked where it matters: in a separate Python process that
imports only torch (``bingo`` is made unimportable there), on raw inputs, at
batch sizes other than the one it was traced with.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bingo
from bingo import (
    CheckpointError,
    ConfigError,
    export_model,
    load_compact,
    magnitude_scores,
    make_permanent,
    save_compact,
    state_dict_size,
)
from bingo.bench.cli import main
from bingo.bench.data import load_dataset
from bingo.export import export_checkpoint
from bingo.io import save_checkpoint
from bingo.bench.models import build_model
from bingo.bench.training import evaluate
from bingo.shrink import is_shrunk

from conftest import make_cnn

# Runs in a fresh interpreter: bingo cannot be imported, so the program must stand alone.
TORCH_ONLY = """
import json, sys
sys.modules["bingo"] = None  # any 'import bingo' now fails
import torch
program = torch.export.load(sys.argv[1]).module()
data = torch.load(sys.argv[2])
with torch.no_grad():
    logits = program(data["raw"])
    single = program(data["raw"][:1])
print(json.dumps({
    "accuracy": (logits.argmax(dim=1) == data["y"]).sum().item() / len(data["y"]),
    "max_diff": (logits - data["expected"]).abs().max().item(),
    "single_diff": (single - data["expected"][:1]).abs().max().item(),
    "bingo_loaded": any(name.startswith("bingo") and mod is not None for name, mod in sys.modules.items()),
}))
"""


def run_torch_only(program: Path, raw: torch.Tensor, y: torch.Tensor, expected: torch.Tensor, tmp_path: Path) -> dict:
    inputs = tmp_path / "inputs.pt"
    torch.save({"raw": raw, "y": y, "expected": expected}, inputs)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", TORCH_ONLY, str(program), str(inputs)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def raw_digits(x: torch.Tensor, data) -> torch.Tensor:
    """The raw 0..16 pixel values back from the preprocessed inputs, checked to preprocess bit-identically."""
    raw = torch.round(x * data.scale + data.offset)
    assert raw.min() >= 0 and raw.max() <= 16
    assert torch.equal(data.preprocess(raw), x), "raw values must reproduce the dataset's inputs exactly"
    return raw


def randomise_norms(model: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(n, generator=generator))
    return model


# --------------------------------------------------------------------------
# compact files
# --------------------------------------------------------------------------


def masked_lenet(sparsity: float = 0.9) -> nn.Module:
    model = build_model("lenet300", (1, 28, 28), 10, seed=0)
    bingo.prune(model, magnitude_scores(model), sparsity)
    return model


def test_compact_round_trip_is_bit_exact(tmp_path):
    model = masked_lenet()
    path = save_compact(model, tmp_path / "m.safetensors")
    restored = load_compact(build_model("lenet300", (1, 28, 28), 10, seed=1), path)
    for name in ("fc1", "fc2", "fc3"):
        saved, got = getattr(model, name), getattr(restored, name)
        assert torch.equal(got.weight, saved.weight)  # the weights the forward pass uses
        assert torch.equal(got.weight_mask, saved.weight_mask) and got.weight_mask.dtype == saved.weight_mask.dtype
        assert torch.equal(got.bias, saved.bias)
    x = torch.randn(7, 1, 28, 28)
    assert torch.equal(restored(x), model(x))
    plain = load_compact(build_model("lenet300", (1, 28, 28), 10, seed=1), path, masks=False)
    assert not hasattr(plain.fc1, "weight_mask")
    assert torch.equal(plain(x), model(x))


def test_compact_file_is_small_at_90_percent(tmp_path):
    model = masked_lenet(0.9)
    size = save_compact(model, tmp_path / "m.safetensors").stat().st_size
    dense = build_model("lenet300", (1, 28, 28), 10)
    make_permanent(masked := masked_lenet(0.9))
    weights = 784 * 300 + 300 * 100 + 100 * 10
    assert size < 0.2 * state_dict_size(dense)  # vs the dense torch.save(state_dict)
    assert size < 0.1 * state_dict_size(masked_lenet(0.9))  # vs the masked state dict (weight_orig + mask)
    assert size < 4 * round(0.1 * weights) + weights / 8 + 4 * 410 + 4096  # survivors + bits + biases + header
    assert state_dict_size(masked) == pytest.approx(state_dict_size(dense), rel=0.01)


def test_compact_keeps_neuron_masks_and_buffers(tmp_path):
    model = randomise_norms(make_cnn())
    bingo.prune(model, magnitude_scores(model, "neuron"), 0.5)
    path = save_compact(model, tmp_path / "m.safetensors")
    restored = load_compact(make_cnn(seed=3), path)
    for key, value in model.state_dict().items():
        if key.endswith("_orig"):
            mask = model.state_dict()[key[: -len("_orig")] + "_mask"]
            assert torch.equal(restored.state_dict()[key], value * mask)
        else:
            assert torch.equal(restored.state_dict()[key], value), key
    x = torch.randn(5, 1, 4, 4)
    assert torch.equal(restored.eval()(x), model.eval()(x))


def test_compact_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"^no such compact file: .*nothing\.safetensors$"):
        load_compact(make_cnn(), tmp_path / "nothing.safetensors")
    bingo.save_scores({"a": torch.zeros(2)}, tmp_path / "scores.safetensors")
    with pytest.raises(CheckpointError, match=r"is not a bingo compact file \(format None, expected 'bingo-compact'\)"):
        load_compact(make_cnn(), tmp_path / "scores.safetensors")
    path = save_compact(masked_lenet(), tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"mask 'fc1.weight_mask' has shape \(300, 784\), the model's weight has \(64, 64\)"):
        load_compact(build_model("mlp", (1, 8, 8), 10), path)
    with pytest.raises(CheckpointError, match=r"does not fit the model: size mismatch for fc3.weight: "):
        load_compact(build_model("mlp", (1, 8, 8), 10), path, masks=False)


# --------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------


def test_exported_conv_runs_on_raw_digits_without_bingo(tmp_path, digits):
    model = randomise_norms(build_model("conv", digits.input_shape, digits.num_classes, seed=0))
    bingo.prune(model, magnitude_scores(model, "neuron"), 0.5)
    model.eval()
    accuracy = evaluate(model, digits.x_test, digits.y_test)
    result = export_model(
        model, (digits.offset, digits.scale), digits.input_shape, tmp_path / "out",
        metadata={"architecture": "conv", "sparsity": 0.5, "accuracy": accuracy},
    )
    assert result.shrunk and bingo.count_parameters(result.model) < 0.6 * bingo.count_parameters(model)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.json", "model.pt2", "weights.safetensors"]
    with torch.no_grad():
        expected = model(digits.x_test)
    raw = raw_digits(digits.x_test, digits)
    got = run_torch_only(result.program, raw, digits.y_test, expected, tmp_path)
    assert not got["bingo_loaded"]
    assert got["max_diff"] < 1e-4 and got["single_diff"] < 1e-4  # dynamic batch: 360 and 1
    assert got["accuracy"] == accuracy

    record = json.loads(result.metadata.read_text())
    assert record["format"] == "bingo-export" and record["architecture"] == "conv"
    assert record["input"]["shape"] == ["batch", 1, 8, 8] and record["model_input_shape"] == [1, 8, 8]
    assert record["preprocess"]["offset"] == digits.offset and record["preprocess"]["scale"] == digits.scale
    assert (record["sparsity"], record["accuracy"], record["shrunk"]) == (0.5, accuracy, True)
    assert record["parameters"] == bingo.count_parameters(result.model)
    from safetensors.torch import load_file

    weights = load_file(result.weights)
    assert {k: list(v.shape) for k, v in weights.items() if k.endswith("weight") and v.dim() > 1} == {
        f"{k}.weight": v for k, v in record["layers"].items()
    }


def test_weight_level_export_bakes_masks_without_shrinking(tmp_path):
    model = build_model("mlp", (64,), 10, seed=0)
    bingo.prune(model, magnitude_scores(model), 0.8)
    result = export_model(model, (3.0, 2.0), (64,), tmp_path, raw_shape=(8, 8))
    assert not result.shrunk and not hasattr(result.model.fc1, "weight_mask")
    record = json.loads(result.metadata.read_text())
    assert record["input"]["shape"] == ["batch", 8, 8]
    assert record["weight_sparsity"] == pytest.approx(0.8, abs=1e-3)
    program = torch.export.load(str(result.program)).module()
    raw = torch.randint(0, 17, (5, 8, 8)).float()
    torch.testing.assert_close(program(raw), model((raw.reshape(5, 64) - 3.0) / 2.0))


def test_model_json_says_shrunk_for_a_model_shrunk_before_export_and_not_for_one_with_nothing_removed(tmp_path):
    model = build_model("mlp", (64,), 10, seed=0)
    bingo.prune(model, magnitude_scores(model, "neuron"), 0.5)
    small = bingo.shrink(model, (64,))
    assert bingo.count_parameters(small) < 0.6 * bingo.count_parameters(model)
    # already shrunk: no neuron masks left, so the export itself removes nothing; the record says what the network is
    for given, name in ((small, "pre"), (copy.deepcopy(small), "copy")):
        result = export_model(given, (3.0, 2.0), (64,), tmp_path / name)
        assert result.shrunk and json.loads(result.metadata.read_text())["shrunk"] is True
    dense = build_model("mlp", (64,), 10, seed=0)
    result = export_model(dense, (3.0, 2.0), (64,), tmp_path / "dense", shrink_units=True)  # shrink ran, nothing to remove
    assert not result.shrunk and json.loads(result.metadata.read_text())["shrunk"] is False
    assert not is_shrunk(dense) and not is_shrunk(result.model)


def test_every_shrink_marks_the_network_it_removed_units_from():
    resnet = build_model("resnet", (1, 12, 12), 10, seed=0)
    groups = bingo.channel_groups(resnet, (1, 12, 12))
    assert not is_shrunk(bingo.shrink_coupled(resnet, (1, 12, 12)))  # nothing pruned: nothing removed
    bingo.prune_coupled(resnet, magnitude_scores(resnet, "neuron"), groups, 0.5)
    assert is_shrunk(bingo.shrink_coupled(resnet, (1, 12, 12))) and is_shrunk(bingo.shrink(resnet, (1, 12, 12)))

    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 1, enable_nested_tensor=False)
    assert not is_shrunk(bingo.shrink_heads(encoder))
    bingo.prune_heads(encoder, {"layers.0.self_attn": torch.tensor([1.0, 2, 3, 4])}, 0.5)
    assert is_shrunk(bingo.shrink_heads(encoder))


def test_export_argument_errors(tmp_path):
    model = build_model("mlp", (64,), 10)
    with pytest.raises(ConfigError, match=r"preprocess needs a finite offset and a finite nonzero scale, got \(0\.0, 0\.0\)"):
        export_model(model, (0.0, 0.0), (64,), tmp_path)
    with pytest.raises(ConfigError, match=r"raw_shape \(10,\) has 10 entries; input_shape \(64,\) has 64"):
        export_model(model, (0.0, 1.0), (64,), tmp_path, raw_shape=(10,))
    with pytest.raises(ConfigError, match=r"metadata key\(s\) files are reserved; reserved keys: "):
        export_model(model, (0.0, 1.0), (64,), tmp_path, metadata={"files": 1})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"export folder .*file is a file; give a folder"):
        export_model(model, (0.0, 1.0), (64,), tmp_path / "file")


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch.onnx internals
def test_onnx_is_a_single_self_contained_file(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from onnx.reference import ReferenceEvaluator

    model = build_model("mlp", (64,), 10, seed=0)
    bingo.prune(model, magnitude_scores(model), 0.5)
    result = export_model(model, (3.0, 2.0), (64,), tmp_path / "out", raw_shape=(8, 8), onnx=True)
    # No external-data sidecar (hidden or not) next to it: the four files and nothing else.
    assert sorted(os.listdir(tmp_path / "out")) == ["model.json", "model.onnx", "model.pt2", "weights.safetensors"]
    alone = tmp_path / "elsewhere" / "model.onnx"
    alone.parent.mkdir()
    alone.write_bytes(result.onnx.read_bytes())
    proto = onnx.load(str(alone))
    onnx.checker.check_model(proto)
    session = ReferenceEvaluator(proto)
    for batch in (1, 5):
        raw = torch.randint(0, 17, (batch, 8, 8)).float()
        (logits,) = session.run(None, {"raw": raw.numpy()})
        with torch.no_grad():
            expected = model((raw.reshape(batch, 64) - 3.0) / 2.0)
        torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*LeafSpec:FutureWarning")  # torch.onnx internals
def test_failed_onnx_write_leaves_no_files(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "model.onnx":
            raise OSError("disk full")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        export_model(build_model("mlp", (64,), 10), (0.0, 1.0), (64,), tmp_path, onnx=True)
    assert sorted(os.listdir(tmp_path)) == ["model.pt2", "weights.safetensors"]


def test_onnx_is_skipped_cleanly_when_not_installed(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "onnx" else find_spec(name, *args))
    with pytest.warns(UserWarning, match=r"ONNX export skipped: onnx.* not installed"):
        result = export_model(build_model("mlp", (64,), 10), (0.0, 1.0), (64,), tmp_path, onnx=True)
    assert result.onnx is None and not (tmp_path / "model.onnx").exists()
    assert json.loads(result.metadata.read_text())["files"]["onnx"] is None


def test_export_checkpoint_refuses_other_files(tmp_path):
    torch.save({"kind": "bingo-model"}, tmp_path / "plain.pt")  # a plain torch.save file, not written by bingo
    with pytest.raises(CheckpointError, match=r"plain\.pt is not a bingo checkpoint \(corrupt or from another program\)$"):
        export_checkpoint(tmp_path / "plain.pt", tmp_path / "out")
    save_checkpoint({"kind": "something"}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt is not a bingo model file \(kind 'something'\); expected the --save file of 'bingo run'"):
        export_checkpoint(tmp_path / "x.pt", tmp_path / "out")
    save_checkpoint({"kind": "bingo-model", "model": "mlp"}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match=r"y\.pt lacks input_shape, num_classes, preprocess, state_dict"):
        export_checkpoint(tmp_path / "y.pt", tmp_path / "out")
    model = build_model("mlp", (64,), 10)
    save_checkpoint({"kind": "bingo-model", "model": "mlp", "input_shape": [64], "raw_shape": [8, 9], "num_classes": 10,
                "preprocess": {"offset": 0.0, "scale": 1.0}, "state_dict": model.state_dict()}, tmp_path / "z.pt")
    with pytest.raises(CheckpointError, match=r"z\.pt: raw_shape \[8, 9\] does not hold the 64 values of input_shape \[64\]"):
        export_checkpoint(tmp_path / "z.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def test_cli_run_export_reproduces_the_reported_accuracy(tmp_path, digits, capsys):
    out, model_file, export_dir = tmp_path / "r.json", tmp_path / "m.pt", tmp_path / "exported"
    code = main(["run", "--data", "digits", "--model", "mlp", "--epochs", "2", "--granularity", "neuron",
                 "--sparsity", "0.5", "--out", str(out), "--save", str(model_file), "--export", str(export_dir),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["export_dir"] == str(export_dir)
    record = json.loads((export_dir / "model.json").read_text())
    assert record["shrunk"] and record["accuracy"] == report["results"][-1]["accuracy"]
    assert record["layers"]["fc1"][0] + record["layers"]["fc2"][0] == 48  # half of the 96 hidden units removed
    assert record["layers"]["fc3"] == [10, record["layers"]["fc2"][0]]  # output units all kept

    ckpt = torch.load(model_file, weights_only=True)
    masked = build_model("mlp", digits.input_shape, digits.num_classes)
    bingo.load_pruned_state_dict(masked, ckpt["state_dict"])
    with torch.no_grad():
        expected = masked.eval()(digits.x_test)
    # The program takes the digits as scikit-learn stores them: 64 raw 0..16 values per row.
    assert record["input"]["shape"] == ["batch", 64] and ckpt["raw_shape"] == [64]
    raw = raw_digits(digits.x_test, digits).reshape(-1, 64)
    got = run_torch_only(export_dir / "model.pt2", raw, digits.y_test, expected, tmp_path)
    assert got["accuracy"] == report["results"][-1]["accuracy"]
    assert got["max_diff"] < 1e-4

    # `bingo export CHECKPOINT DIR` gives the same program from the --save file.
    assert main(["export", str(model_file), str(tmp_path / "again"), "--onnx"]) == 0
    captured = capsys.readouterr()
    assert "exported the shrunk model to" in captured.out
    if importlib.util.find_spec("onnx") is None:
        assert captured.err.startswith("bingo: warning: ONNX export skipped: onnx") and captured.err.count("\n") == 1
    again = torch.export.load(str(tmp_path / "again" / "model.pt2")).module()
    torch.testing.assert_close(again(raw), expected, atol=1e-4, rtol=1e-4)


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert main(["export", str(tmp_path / "notes.txt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"bingo: error: {tmp_path / 'notes.txt'} is not a bingo checkpoint (corrupt or from another program)\n"
    assert main(["export", str(tmp_path / "missing.pt"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"bingo: error: no such checkpoint: {tmp_path / 'missing.pt'}\n"
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "0", "--granularity", "neuron",
                 "--sparsity", "0.99", "--out", str(tmp_path / "r.json"), "--export", str(tmp_path / "e"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err  # --epochs 0: also the warning that the search measured nothing
    assert err.startswith("bingo: warning: significance() before any search.step")
    error = [line for line in err.splitlines() if not line.startswith("bingo: warning:")]
    assert len(error) == 1 and error[0].startswith("bingo: error: this sparsity would remove every unit of 'fc")
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "0", "--sparsity", "0.5",
                 "--out", str(tmp_path / "r.json"), "--export", str(tmp_path / "notes.txt"), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"bingo: error: --export {tmp_path / 'notes.txt'} is a file; give a folder\n"
