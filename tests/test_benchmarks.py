"""The benchmark scripts' own arithmetic: the cost of a whole accuracy-vs-sparsity curve."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
curve = pytest.importorskip("curve")


def _results() -> dict:
    sparsities = [0.5, 0.9]
    runs = []
    for s in sparsities:
        # bingo: 1,100 forwards of training with its search (fake passes included), + 40 calibration calls per prune
        runs.append({"method": "bingo", "seed": 0, "sparsity": s, "forward_passes": 1140, "train_steps": 1000, "seconds": 12.0})
        # gmp: one run per target
        runs.append({"method": "gmp", "seed": 0, "sparsity": s, "forward_passes": 1000, "train_steps": 1000, "seconds": 10.0})
        # imp: one trajectory; the sparser point was reached later, at the cost of all rounds before it
        passes = 3000 if s == 0.5 else 9000
        runs.append({"method": "imp", "seed": 0, "sparsity": s, "forward_passes": passes, "train_steps": passes, "seconds": passes / 100})
    return {
        "settings": {"sparsities": sparsities, "batch_size": 128},
        "dense": [{"seed": 0, "forward_passes": 1000, "train_steps": 1000, "seconds": 10.0}],
        "runs": runs,
        "search_overhead": [{"method": "bingo", "seed": 0, "forward_passes_with_search": 1100, "train_seconds_with_search": 11.0}],
    }


def test_whole_curve_cost_by_kind_of_method():
    results = _results()
    # bingo: one training run (1,000 steps + 100 fake passes) + each prune's own 40 calibration calls, twice:
    # 1,180 calls; compute (3 × 1,000 + 100 + 80 × 256 / 128) / 3,000; 11 s + 2 × 1 s
    assert curve.curve_cost(results, "bingo") == pytest.approx((1.18, 3260 / 3000, 13.0, 1.3, 0.0))
    # the solves: 2 × 6.4e6 FLOPs over a training batch's forward (2 × 500 MACs × 128 samples) = 100 forward-equivalents
    for run in results["runs"]:
        if run["method"] == "bingo":
            run["solve_flops"] = 6.4e6
    assert curve.curve_cost(results, "bingo", macs_per_sample=500) == pytest.approx((1.18, 3360 / 3000, 13.0, 1.3, 100 / 3000))
    # the wall-time ratio divides by the plain training its own process timed, when it did (one process, one machine)
    results["search_overhead"][0]["train_seconds"] = 5.0
    assert curve.curve_cost(results, "bingo")[3] == pytest.approx(13.0 / 5.0)
    # gmp: both runs
    assert curve.curve_cost(results, "gmp") == pytest.approx((2.0, 2.0, 20.0, 2.0, 0.0))
    # imp: its sparsest point's cost, once
    assert curve.curve_cost(results, "imp") == pytest.approx((9.0, 9.0, 90.0, 9.0, 0.0))
    # a method with a sparsity missing has no whole curve
    results["runs"] = [r for r in results["runs"] if not (r["method"] == "gmp" and r["sparsity"] == 0.9)]
    assert curve.curve_cost(results, "gmp") is None


def test_shrink_speed_compares_identical_results_round_by_round():
    shrink_speed = pytest.importorskip("shrink_speed")
    result = shrink_speed.measure(rounds=2, side=32)
    dense, shrunk = result["parameters"]
    assert dense == 11_689_512 and shrunk < 0.3 * dense  # torchvision's ResNet-18, half of every group's channels gone
    assert all(same and gap == 0.0 for same, gap in result["checks"].values())  # bingo's result is Torch-Pruning's
    assert result["masked_gap"] < 1e-4
    assert set(result["ratios"]) == {"bingo, groups reused", "bingo, no groups"}
    assert all(len(r) == 2 and all(v > 0 for v in r) for r in result["ratios"].values())
    parts = dict(result["profile"])
    assert parts["whole `shrink`"] >= parts["one copy, masks baked in (`permanent_copy`)"] > 0
    text = shrink_speed.report(result)
    assert "| bingo, groups reused |" in text and "NO" not in text


def test_gpt2_benchmark_writes_its_table_as_markdown_beside_the_json(tmp_path, capsys):
    gpt2 = pytest.importorskip("gpt2")
    out = tmp_path / "gpt2.json"
    text = gpt2.main(["--quick", "--seeds", "0", "--out", str(out)])
    assert json.loads(out.read_text())["table"] == text
    assert (tmp_path / "gpt2.md").read_text() == text + "\n"  # the same table: the two files cannot disagree
    assert "| sparsity | dense | pruned | compensated |" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.json", "gpt2.md"]
