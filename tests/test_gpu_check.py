"""benchmarks/gpu_check.py: its plumbing on the CPU (the same code a GPU runs), and the run itself where CUDA is present."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
gpu_check = pytest.importorskip("gpu_check")


def test_the_check_runs_on_the_cpu_and_reports_every_part(tmp_path):
    out = tmp_path / "gpu.md"
    text = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert out.read_text() == text
    assert "Host syncs inside `search.step`: step without fake passes: 0, step with fake passes: 1 " in text
    assert "## Compensation" in text and "solver " in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 64 |")]
    assert {row.split("|")[2].strip() for row in rows} == {"bingo masked", "bingo.to_sparse"}  # no 2:4 kernels on the CPU
    assert "`to_sparse` converted: (the Linear itself)." in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for machines without CUDA")
def test_without_a_gpu_it_says_so_and_measures_nothing(tmp_path, capsys):
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--out", str(out)]) is None
    assert "no CUDA GPU here" in capsys.readouterr().out and not out.exists()


@pytest.mark.cuda
def test_the_quick_check_on_cuda(tmp_path):
    text = gpu_check.main(["--device", "cuda", "--quick", "--out", str(tmp_path / "gpu.md")])
    assert "step without fake passes: 0," in text
