"""Hostile round 5: what a reviewer found by using bingo as a PyTorch user would (each test failed before its fix)."""

from __future__ import annotations

import json
import logging
import os
import re

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
