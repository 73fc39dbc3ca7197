"""Hostile round 5: what a reviewer found by using bingo as a PyTorch user would (each test failed before its fix)."""

from __future__ import annotations

import json
import logging
import os
import re
import warnings

import pytest
import torch
from torch import nn

import bingo
from bingo.bench.cli import main


@pytest.mark.parametrize("method", ["imp", "snip"])
def test_run_saves_and_exports_the_model_of_methods_that_retrain(tmp_path, method):
    out, save, export = tmp_path / "r.json", tmp_path / "m.pt", tmp_path / "exp"
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.5", "--method", method,
                 "--out", str(out), "--save", str(save), "--export", str(export), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    record = json.loads((export / "model.json").read_text())
    assert record["sparsity"] == report["results"][-1]["sparsity"] == 0.5
    assert save.is_file() and (export / "model.pt2").is_file()
    # the saved model is the pruned one: its scored weights are half zero, as the report says
    assert abs(record["weight_sparsity"] - report["results"][-1]["sparsity_all_parameters"]) < 0.05


class _Cumulative(nn.Module):
    """``cumulative=True`` uses an op torch.onnx cannot convert (aten.cummax); torch.export can."""

    def __init__(self, cumulative: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.cumulative = nn.Linear(4, 3), cumulative

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.cummax(h, dim=1).values if self.cumulative else h


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_an_onnx_conversion_failure_is_a_config_error_and_leaves_the_earlier_export_whole(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    logging.disable(logging.WARNING)  # torch.onnx's progress lines
    try:
        folder = tmp_path / "exp"
        bingo.export_model(_Cumulative(False), (0.0, 1.0), (4,), folder, onnx=True)
        before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
        with pytest.raises(bingo.ConfigError, match=re.escape("ONNX cannot convert _Cumulative (model.pt2 holds it; leave "
                                                              "out onnx): No ONNX function found for")):
            bingo.export_model(_Cumulative(True), (0.0, 1.0), (4,), folder, onnx=True)
        assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_exporting_again_without_onnx_removes_the_earlier_models_onnx(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    logging.disable(logging.WARNING)
    try:
        folder = tmp_path / "exp"
        bingo.export_model(_Cumulative(False), (0.0, 1.0), (4,), folder, onnx=True)
        assert (folder / "model.onnx").is_file()
        bingo.export_model(_Cumulative(True), (0.0, 1.0), (4,), folder)
        assert sorted(os.listdir(folder)) == ["model.json", "model.pt2", "weights.safetensors"]
        assert json.loads((folder / "model.json").read_text())["files"]["onnx"] is None
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize("flags, message", [
    (["--method", "magnitude", "--compensation-steps", "8"],
     "compensation steps (8) re-fit between prunes, so they need compensation: add --compensate"),
    (["--no-compensate", "--judge-steps", "5"],
     "judge steps apply where the blend is chosen on validation, which needs compensation (--compensate), not with "
     "--no-compensate"),
])
def test_flags_that_do_nothing_without_compensation_are_refused_before_training(tmp_path, capsys, flags, message):
    out = tmp_path / "r.json"
    assert main(["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.9", *flags,
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bingo: error: {message}") and err.count("\n") == 1
    assert not out.exists()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def test_an_evaluate_that_returns_a_percentage_is_refused_before_anything_is_pruned():
    model = _mlp()
    with pytest.raises(bingo.ConfigError, match=re.escape("prune_to_accuracy: evaluate(model) returned 85 for the "
                                                          "unpruned model; the floor is an accuracy in [0, 1]")):
        bingo.prune_to_accuracy(model, bingo.magnitude_scores(model), lambda m: 85.0, min_accuracy=0.9)
    assert bingo.model_sparsity(model) == 0.0


def test_a_global_prune_that_empties_a_layer_says_so():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    with pytest.warns(UserWarning, match=re.escape("sparsity 0.999 leaves no weight in '2.weight': such a layer outputs "
                                                   "only its bias")):
        masks = bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.999)
    assert not masks["2.weight"].any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bingo.prune(_mlp(), bingo.magnitude_scores(_mlp()), sparsity=0.9)  # every layer keeps some: no warning


@pytest.mark.parametrize("wrap", [nn.DataParallel, lambda m: torch.compile(m, backend="eager")], ids=["DataParallel", "compile"])
def test_a_compact_file_of_a_wrapped_model_loads_into_the_plain_one_and_back(tmp_path, wrap):
    wrapped = wrap(_mlp())
    bingo.prune(wrapped, bingo.magnitude_scores(wrapped), 0.5)
    path = bingo.save_compact(wrapped, tmp_path / "m.safetensors")
    x = torch.randn(3, 8)
    plain = bingo.load_compact(_mlp(), path)
    torch.testing.assert_close(plain(x), wrapped(x))
    again = wrap(_mlp())
    assert bingo.load_compact(again, path) is again
    torch.testing.assert_close(again(x), wrapped(x))


def test_model_sparsity_counts_the_zeros_of_a_prune_made_permanent():
    model = _mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    assert bingo.model_sparsity(model) == 0.5
    bingo.make_permanent(model)
    assert bingo.model_sparsity(model) == 0.5
    assert bingo.model_sparsity(_mlp()) == 0.0


def test_a_mask_that_is_not_0_or_1_is_refused_when_loading():
    model = _mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    state = model.state_dict()
    state["0.weight_mask"] = state["0.weight_mask"] * 2
    fresh = _mlp()
    with pytest.raises(bingo.CheckpointError, match=re.escape("state dict entry '0.weight_mask' is not a pruning mask: "
                                                              "it holds values other than 0 and 1")):
        bingo.load_pruned_state_dict(fresh, state)


def test_export_into_an_empty_folder_name_is_refused(tmp_path, capsys):
    assert main(["export", str(tmp_path / "m.pt"), ""]) == 2
    assert capsys.readouterr().err == "bingo: error: the export folder is empty; give a folder name\n"


def test_channels_last_images_in_an_npz_get_a_warning(tmp_path):
    import numpy as np

    from bingo.bench.data import load_dataset
    generator = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=generator.random((30, 8, 8, 3), dtype=np.float32), y_train=np.arange(30) % 3,
             x_test=generator.random((9, 8, 8, 3), dtype=np.float32), y_test=np.arange(9) % 3)
    with pytest.warns(UserWarning, match=re.escape("x_train has shape (30, 8, 8, 3), which looks channels-last (N, H, W, "
                                                   "C); bingo reads images as N x C x H x W")):
        load_dataset(str(path))


def test_an_unchecked_re_fit_on_fewer_design_rows_than_inputs_warns():
    def compensated(samples: int) -> list[str]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        bingo.prune(model, bingo.magnitude_scores(model), 0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bingo.compensate(model, None, torch.randn(samples, 64))
        return [str(w.message) for w in caught]

    assert any(m.startswith("compensate re-fitted on fewer design rows than inputs, so each fit interpolates its 40 "
                            "calibration samples") and "0.weight (40 rows for 65 inputs)" in m for m in compensated(40))
    assert not any("fewer design rows" in m for m in compensated(100))  # more rows than inputs: a determined fit


def test_prune_heads_takes_only_the_scopes_that_mean_something_for_heads():
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1, enable_nested_tensor=False)
    scores = {name: torch.rand(4) for name, m in encoder.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for scope in ("lamp", "block"):
        with pytest.raises(bingo.ConfigError, match=f"^unknown scope '{scope}'; valid choices: global, layer$"):
            bingo.prune_heads(encoder, scores, 0.5, scope=scope)
    assert [int(m.sum()) for m in bingo.prune_heads(encoder, scores, 0.5, scope="layer").values()] == [2]


def test_a_scheduler_starting_at_sparsity_0_reads_no_scores_at_construction_and_resumes_without_a_warning():
    model = _mlp()
    search = bingo.TicketSearch(model, config=bingo.BINGO_SEARCH, seed=0)
    read = []

    def scores():
        read.append(True)
        return bingo.bingo_scores(search, model)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "significance() before any search.step" nor a prune to 0
        bingo.SparsityScheduler(model, scores, final_sparsity=0.8, start_step=0, end_step=10, frequency=2)
    assert read == []
    # rebuilt over a model already pruned (a resume), then its state loaded: no "already had ... pruned" warning
    pruned = _mlp()
    bingo.prune(pruned, bingo.magnitude_scores(pruned), 0.6)
    before = bingo.model_sparsity(pruned)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = bingo.SparsityScheduler(pruned, lambda: bingo.magnitude_scores(pruned), final_sparsity=0.8,
                                            start_step=0, end_step=10, frequency=2)
    assert bingo.model_sparsity(pruned) == before and scheduler.last_sparsity == 0.0


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["runs"].append(dict(d["runs"][0], accuracy=0.99)),
     "runs[1] repeats runs[0] (method 'magnitude', seed 0, sparsity 0.5)"),
    (lambda d: d["runs"][0].update(accuracy="x"), "runs[0]['accuracy'] is a str"),
    (lambda d: d["runs"].append(dict(d["runs"][0], method="imp")),
     "runs[1] has method 'imp', which settings['methods'] does not list"),
    (lambda d: d["runs"][0].update(accuracy=float("nan")), "it holds NaN, which bingo never writes"),
])
def test_a_hand_edited_compare_results_file_is_refused_on_resume_in_one_line(tmp_path, capsys, damage, message):
    arguments = ["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--methods", "magnitude",
                 "--sparsities", "0.5", "--seeds", "1", "--out", str(tmp_path / "c"), "--no-progress"]
    assert main(arguments) == 0
    path = tmp_path / "c" / "results.json"
    results = json.loads(path.read_text())
    damage(results)
    path.write_text(json.dumps(results))  # json.dumps writes NaN as NaN, as a hand edit could
    before = path.read_bytes()
    capsys.readouterr()
    assert main([*arguments, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert path.read_bytes() == before  # left as it was


@pytest.mark.parametrize("data, where", [({1: 2, "1": 3}, "'1'"), ({"a": [{1.5: 2, "1.5": 3}]}, "'a[0].1.5'")])
def test_write_json_refuses_two_keys_that_would_be_written_as_one(tmp_path, data, where):
    from bingo.io import write_json

    path = tmp_path / "r.json"
    path.write_text("{}\n")
    with pytest.raises(bingo.BingoError, match=re.escape(f"two keys would both be written as {where}")):
        write_json(path, data)
    assert path.read_text() == "{}\n"  # left as it was
    write_json(path, {"a": 1, 2: {"b": 3}})  # non-str keys that do not clash are written as JSON writes them
    assert json.loads(path.read_text()) == {"a": 1, "2": {"b": 3}}
