"""benchmarks/one_shot_targets.py: issue 21's hit / MISS / not measured rows on a tiny hand-made results folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
targets = pytest.importorskip("one_shot_targets")


def _compare(root: Path, folder: str, runs: dict, dense: dict, finetune_epochs: int = 0, compensate: bool = False) -> None:
    """A ``bingo compare`` results.json reduced to what the targets read: ``runs`` is {(method, sparsity): {seed: accuracy}}."""
    methods = list(dict.fromkeys(m for m, _ in runs))
    sparsities = sorted({s for _, s in runs})
    compensation = {"compensate": compensate, "calibration_samples": 1024, "batchnorm": "keep", "solver": "auto"}
    results = {
        "data": "fake", "model": "mlp", "epochs": 3,
        "settings": {"methods": methods, "sparsities": sparsities, "seeds": sorted({s for d in runs.values() for s in d}),
                     "finetune_epochs": finetune_epochs, "batch_size": 128,
                     "method_configs": {m: {"finetune_epochs": finetune_epochs, "compensation": compensation} for m in methods}},
        "dense": [{"seed": seed, "accuracy": acc, "seconds": 10.0, "train_steps": 100, "forward_passes": 100} for seed, acc in dense.items()],
        "runs": [{"method": m, "seed": seed, "sparsity": s, "accuracy": acc, "seconds": 12.0, "train_steps": 100, "forward_passes": 110}
                 for (m, s), by_seed in runs.items() for seed, acc in by_seed.items()],
    }
    path = root / folder / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(results))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    dense = {0: 0.90, 1: 0.90}
    _compare(tmp_path, "curve/fashion-mnist-lenet300/methods", {
        ("bingo", 0.9): {0: 0.87, 1: 0.87},
        ("gmp", 0.9): {0: 0.885, 1: 0.885},           # 1.5 points below dense: a′ applies
        ("bingo-gradual", 0.9): {0: 0.882, 1: 0.882},  # exactly GMP − 0.3 points
        ("bingo", 0.98): {0: 0.80, 1: 0.80},
        ("gmp", 0.98): {0: 0.83, 1: 0.83},
        ("bingo-gradual", 0.98): {0: 0.10, 1: 0.10},   # outside 80–95%: no row
        ("bingo", 0.5): {0: 0.10, 1: 0.10},           # outside 80–95%: no row
    }, dense)
    # compensated magnitude exactly equal to bingo on the shared seeds; seed 2, which bingo lacks, must not count
    _compare(tmp_path, "curve/fashion-mnist-lenet300/magnitude+compensation",
             {("magnitude", 0.9): {0: 0.87, 1: 0.87, 2: 0.10}}, {**dense, 2: 0.90}, compensate=True)
    # equal in decimal, but the float means differ by one ulp the wrong way: still a hit
    three = {0: 0.9, 1: 0.9, 2: 0.9}
    _compare(tmp_path, "curve/digits-conv/methods", {("bingo", 0.9): {0: 0.9884, 1: 0.9802, 2: 0.9881}}, three)
    _compare(tmp_path, "curve/digits-conv/magnitude+compensation", {("magnitude", 0.9): {0: 0.9900, 1: 0.9871, 2: 0.9796}},
             three, compensate=True)
    _compare(tmp_path, "targets-finetune3", {("bingo", 0.9): {0: 0.89, 1: 0.89}, ("magnitude", 0.9): {0: 0.90, 1: 0.90}},
             dense, finetune_epochs=3)
    # a generated task without bingo-gradual (and without a magnitude+compensation folder), where GMP is 3 points
    # below dense: a′ does not apply
    _compare(tmp_path, "generated_tasks/tokens/methods", {("bingo", 0.8): {0: 0.90}, ("gmp", 0.8): {0: 0.94}}, {0: 0.97})
    # the same task's 4-step bingo: at 0.8 against its GMP (3 points below dense), at 0.9 with no GMP run to face
    _compare(tmp_path, "generated_tasks/tokens/bingo-4-step", {("bingo", 0.8): {0: 0.925}, ("bingo", 0.9): {0: 0.955}}, {0: 0.97})
    multistep = tmp_path / "multistep_compensation"
    multistep.mkdir()
    for seed in (0, 1):
        rows = [{"method": "bingo (m chosen)", "sparsity": 0.98, "steps": k, "accuracy": acc, "calibration_forwards": 28 * k,
                 "seconds": 1.0} for k, acc in ((1, 0.80), (4, 0.79))]
        rows.append({"method": "bingo (m chosen)", "sparsity": 0.9, "steps": 4, "accuracy": 0.876, "calibration_forwards": 1,
                     "seconds": 1.0})
        rows.append({"method": "bingo", "sparsity": 0.98, "steps": 4, "accuracy": 0.81, "calibration_forwards": 1, "seconds": 1.0})
        rows.append({"method": "magnitude+compensation", "sparsity": 0.98, "steps": 4, "accuracy": 0.5, "calibration_forwards": 1, "seconds": 1.0})
        (multistep / f"seed-{seed}.json").write_text(json.dumps({"seed": seed, "dense": {"bingo": 0.9, "magnitude+compensation": 0.9},
                                                                 "dense_train_forwards": 100, "rows": rows}))
    return tmp_path


def _by_key(rows):
    return {(r.target, r.benchmark, r.sparsity, r.candidate): r for r in rows}


def test_hits_misses_and_margins_by_hand(root):
    rows = _by_key(targets.checks(root))
    lenet = "fashion-mnist-lenet300"
    a = rows[("a", lenet, 0.9, "bingo")]
    assert (a.outcome, a.seeds, a.baseline_mean) == ("hit", 2, pytest.approx(0.87))  # equal is a hit; seed 2 left out
    assert a.margin == pytest.approx(0.0)
    a2 = rows[("a′", lenet, 0.9, "bingo")]  # needs 0.885 − 0.01 = 0.875, has 0.87
    assert a2.outcome == "MISS" and a2.margin == pytest.approx(-0.005)
    c = rows[("c", lenet, 0.9, "bingo-gradual")]  # 0.882 ≥ 0.885 − 0.003, on the boundary
    assert c.outcome == "hit" and c.margin == pytest.approx(0.0)
    b = rows[("b", lenet, 0.9, "bingo")]
    assert (b.outcome, b.baseline, b.margin) == ("MISS", "magnitude", pytest.approx(-0.01))
    d = rows[("d", lenet, 0.98, "bingo (one step)")]  # 0.80 ≥ 0.83 − 0.03
    assert d.outcome == "hit" and d.margin == pytest.approx(0.0)
    d4 = rows[("d", lenet, 0.98, "bingo, 4-step compensation")]
    assert (d4.outcome, d4.seeds, d4.margin) == ("MISS", 2, pytest.approx(-0.01))
    fixed = rows[("d", lenet, 0.98, "bingo (m = 0.5), 4-step compensation")]  # the benchmark's fixed-blend rows, named so
    assert (fixed.outcome, fixed.margin) == ("hit", pytest.approx(0.01))
    rounded = rows[("a", "digits-conv", 0.9, "bingo")]
    assert rounded.candidate_mean < rounded.baseline_mean and rounded.outcome == "hit"
    assert ("d", lenet, 0.98, "bingo, 1-step compensation") not in rows  # the one-step row is already there
    # only 80–95% for a–c
    assert {r.sparsity for r in rows.values() if r.target in ("a", "a′", "c") and r.benchmark == lenet} == {0.9}


def test_four_step_rows_from_the_stepped_folder_and_from_the_multistep_benchmark(root):
    rows = _by_key(targets.checks(root))
    lenet = rows[("a′ (4 steps)", "fashion-mnist-lenet300", 0.9, "bingo, 4 steps")]  # 0.876 ≥ 0.885 − 0.01
    assert (lenet.outcome, lenet.seeds, lenet.margin) == ("hit", 2, pytest.approx(0.001))
    assert lenet.source.startswith("multistep_compensation")
    tokens = rows[("a′ (4 steps)", "tokens", 0.8, "bingo, 4 steps")]  # against the tokens GMP, 3 points below dense
    assert (tokens.outcome, tokens.note) == ("n/a", "GMP -3.0 points from dense")
    assert tokens.source == "generated_tasks/tokens/bingo-4-step, 3 ep"
    assert ("a′ (4 steps)", "tokens", 0.9, "bingo, 4 steps") in rows  # measured by the stepped run, GMP not: not measured
    assert rows[("a′ (4 steps)", "tokens", 0.9, "bingo, 4 steps")].outcome == "not measured"
    assert not any(r.target == "a′ (4 steps)" and r.benchmark == "digits-conv" for r in rows.values())  # no stepped run there


def test_missing_runs_are_not_measured_not_skipped(root):
    rows = targets.checks(root)
    outcome = {(r.target, r.benchmark): r for r in rows if r.outcome == "not measured"}
    # a benchmark with no results at all: every target says so
    for target in ("a", "a′", "b", "c"):
        assert outcome[(target, "digits-mlp")].note
    assert outcome[("b", "digits-conv")].note == "no finetune_ranking/digits-conv/default/results.json"
    # a benchmark that ran, without bingo-gradual and without compensated magnitude
    assert outcome[("c", "tokens")].note == "no bingo-gradual run"
    assert "magnitude+compensation" in outcome[("a", "tokens")].note
    (tokens,) = [r for r in rows if r.benchmark == "tokens" and r.target == "a′"]
    assert (tokens.outcome, tokens.note) == ("n/a", "GMP -3.0 points from dense")


def test_report_summary_and_file(root):
    text = targets.main(["--results", str(root)])
    assert (root / "one_shot_targets.md").read_text() == text
    summary = {line.split("**")[1]: line for line in text.splitlines() if line.startswith("- **")}
    assert "**2/2 hit**" in summary["a"] and "not measured" in summary["a"]
    assert "**0/1 hit**" in summary["a′"] and "1 n/a" in summary["a′"]  # lenet300 at 0.9 misses; tokens n/a
    assert "**0/1 hit**" in summary["b"]
    assert "**1/1 hit**" in summary["c"]
    assert "**2/3 hit**" in summary["d"] and "bingo, 4-step compensation -1.00 points" in summary["d"]
    assert "| b | digits-conv | — | — | — | — | — | — | — | not measured: no finetune_ranking/digits-conv/default/results.json |" in text
