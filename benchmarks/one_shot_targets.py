"""Issue 21's targets, as measured on every benchmark, misses included: read from the result files, runs nothing.

    python benchmarks/one_shot_targets.py                  # also run by `make benchmarks`; writes benchmarks/results/one_shot_targets.md
    python benchmarks/one_shot_targets.py --results DIR    # another results folder (writes DIR/one_shot_targets.md)

The targets (test accuracy, mean over seeds, at 80–95% sparsity on every benchmark):

- **a**: compensated ``bingo`` with no retraining ≥ compensated magnitude;
- **a′**: the same ``bingo`` within 1 point of GMP, where GMP is within 2 points of dense;
  **a′ (4 steps)**: the same with each sparsity reached in 4 prune-and-refit steps, where measured
  (``generated_tasks/<task>/bingo-4-step``; on Fashion-MNIST LeNet-300-100 the K = 4 rows of
  ``benchmarks/multistep_compensation.py``), to show what multi-step compensation buys;
- **b**: ``bingo`` + fine-tune ≥ magnitude + the same fine-tune;
- **c**: ``bingo-gradual`` ≥ GMP − 0.3 points;
- **d**: on Fashion-MNIST LeNet-300-100 at 98%, no retraining, ``bingo`` ≥ GMP − 3 points
  (plain one-step ``bingo`` and each K-step compensation of ``benchmarks/multistep_compensation.py``).

Everything is read from the ``bingo compare`` folders under the results folder:
``curve/<benchmark>/methods`` and ``curve/<benchmark>/magnitude+compensation``
(``benchmarks/curve.py``), the same two under ``generated_tasks/<task>/``
(``benchmarks/generated_tasks.py``), the fine-tune comparisons ``targets-finetune3``,
``targets-finetune6`` (``benchmarks/fashion_mnist.py``), ``finetune_ranking/<task>/default``
(``benchmarks/finetune_ranking.py``) and ``recovery/steps-<N>`` (``benchmarks/recovery.py``,
whose magnitude is compensated too), and ``multistep_compensation/seed-<k>.json``.
Means over seeds come from :func:`bingo.bench.report.aggregate`, over the seeds
both sides of a comparison measured (a seed one side lacks would compare two
different sets of trained networks). A benchmark without the rows a target
needs gets a "not measured" line, never silence.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from bingo.bench.report import aggregate
from bingo.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks/results"
REPORT = "one_shot_targets.md"
LOW, HIGH = 0.8, 0.95  #: the sparsities the targets a-c are set at
EXTREME = 0.98  #: target d's
POINT = 0.01
#: means of equal accuracies must compare equal although ``gmp - 0.003`` is rounded in binary
TOLERANCE = 1e-9

#: benchmark -> folder (under the results folder) holding its ``methods/`` and ``magnitude+compensation/`` compares
BENCHMARKS = {
    "fashion-mnist-lenet300": "curve/fashion-mnist-lenet300",
    "digits-mlp": "curve/digits-mlp",
    "digits-conv": "curve/digits-conv",
    "fashion-mnist-conv": "curve/fashion-mnist-conv",
    "fashion-mnist-resnet": "curve/fashion-mnist-resnet",
    "teacher-student": "generated_tasks/teacher-student",
    "tokens": "generated_tasks/tokens",
    "signals": "generated_tasks/signals",
}
#: benchmark -> the compare folders with a fine-tune (or recovery) where ``bingo`` and ``magnitude`` got the same one;
#: their recipes (dense epochs) are their own and shown in the table
FINETUNES = {
    "fashion-mnist-lenet300": ("targets-finetune3", "targets-finetune6", "finetune_ranking/fashion-mnist-lenet300/default",
                               "recovery/steps-25", "recovery/steps-63"),
    "digits-mlp": ("finetune_ranking/digits-mlp/default", "finetune_ranking/digits-mlp-10ep/default"),
    "teacher-student": ("finetune_ranking/teacher-student-mlp/default",),
    "digits-conv": ("finetune_ranking/digits-conv/default",),
    "fashion-mnist-conv": ("finetune_ranking/fashion-mnist-conv/default",),
    "tokens": ("finetune_ranking/tokens-transformer/default",),
    "signals": ("finetune_ranking/signals-conv1d/default",),
    "fashion-mnist-resnet": ("finetune_ranking/fashion-mnist-resnet/default",),
}
#: the compare folder (beside ``methods/``) of ``bingo`` reaching each sparsity in 4 prune-and-refit steps, where measured
STEPPED = "bingo-4-step"
MULTISTEP = "multistep_compensation"
MULTISTEP_BENCHMARK = "fashion-mnist-lenet300"  #: the benchmark (and seeds) multistep_compensation.py prunes
#: its rows' methods as the table names them: the ``bingo`` method (blend chosen per candidate), and its fixed equal blend
MULTISTEP_NAMES = {"bingo (m chosen)": "bingo", "bingo": "bingo (m = 0.5)"}

TARGETS = {
    "a": "compensated `bingo`, no retraining, ≥ compensated magnitude (80–95%)",
    "a′": "compensated `bingo`, no retraining, within 1 point of GMP where GMP is within 2 points of dense (80–95%)",
    "a′ (4 steps)": "a′ with each sparsity reached in 4 prune-and-refit steps (`--bingo-compensation-steps 4`), where measured",
    "b": "`bingo` + fine-tune ≥ magnitude + the same fine-tune (80–95%)",
    "c": "`bingo-gradual` ≥ GMP − 0.3 points (80–95%)",
    "d": "Fashion-MNIST LeNet-300-100 at 98%, no retraining: `bingo` ≥ GMP − 3 points",
}


@dataclass(frozen=True)
class Side:
    """One side of a comparison: ``method``'s runs in one compare results dict (``None``: the folder is missing), shown as ``label``."""

    label: str
    results: dict | None
    method: str


@dataclass(frozen=True)
class Check:
    """One row of the table: ``candidate ≥ baseline − allowance`` at one sparsity, or why it could not be checked."""

    target: str
    benchmark: str
    source: str  #: where the numbers come from, as shown
    sparsity: float | None
    candidate: str = ""
    baseline: str = ""
    candidate_mean: float | None = None
    baseline_mean: float | None = None
    allowance: float = 0.0  #: how far (accuracy, not points) the candidate may be below the baseline
    seeds: int = 0
    note: str = ""  #: why the row has no outcome
    applies: bool = True  #: False: measured, but the target's condition does not hold here (a′ with GMP far from dense)

    @property
    def margin(self) -> float | None:
        """Candidate minus what it needed, in accuracy (≥ 0 is a hit)."""
        if self.candidate_mean is None or self.baseline_mean is None:
            return None
        return self.candidate_mean - (self.baseline_mean - self.allowance)

    @property
    def outcome(self) -> str:
        if self.margin is None:
            return "not measured"
        if not self.applies:
            return "n/a"
        return "hit" if self.margin >= -TOLERANCE else "MISS"


def load(root: Path, folder: str) -> dict | None:
    path = root / folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def _seeds(results: dict | None, method: str, sparsity: float) -> set:
    return {r["seed"] for r in (results or {}).get("runs", []) if r["method"] == method and r["sparsity"] == sparsity}


def mean_accuracy(results: dict, method: str, sparsity: float, seeds: set) -> float | None:
    """``method``'s mean test accuracy at ``sparsity`` over ``seeds`` (:func:`aggregate` of those runs alone)."""
    subset = {
        "settings": results.get("settings", {}),
        "dense": [d for d in results.get("dense", []) if d["seed"] in seeds],
        "runs": [r for r in results["runs"] if r["method"] == method and r["sparsity"] == sparsity and r["seed"] in seeds],
    }
    rows = aggregate(subset)
    return rows[0]["accuracy_mean"] if rows else None


def _sparsities(*sources: dict | None, low: float = LOW, high: float = HIGH) -> list[float]:
    """The sparsities in [low, high] that any of ``sources`` measured (or meant to, by its settings)."""
    found = set()
    for results in sources:
        if results:
            found |= {float(r["sparsity"]) for r in results.get("runs", [])}
            found |= {float(s) for s in results.get("settings", {}).get("sparsities", [])}
    return sorted(s for s in found if low - TOLERANCE <= s <= high + TOLERANCE)


def compare(target: str, benchmark: str, source: str, sparsity: float, candidate: Side, baseline: Side,
            allowance: float = 0.0) -> Check:
    """``candidate`` against ``baseline`` at ``sparsity``, over the seeds both measured."""
    row = Check(target, benchmark, source, sparsity, candidate.label, baseline.label, allowance=allowance)
    seeds = _seeds(candidate.results, candidate.method, sparsity) & _seeds(baseline.results, baseline.method, sparsity)
    if not seeds:
        missing = [side.label for side in (candidate, baseline) if not _seeds(side.results, side.method, sparsity)]
        return replace(row, note=f"no {' and no '.join(missing)} run")
    return replace(row, seeds=len(seeds),
                   candidate_mean=mean_accuracy(candidate.results, candidate.method, sparsity, seeds),
                   baseline_mean=mean_accuracy(baseline.results, baseline.method, sparsity, seeds))


def _not_measured(target: str, benchmark: str, why: str) -> Check:
    return Check(target, benchmark, "—", None, note=why)


def _dense_mean(results: dict, seeds: set) -> float | None:
    values = [float(d["accuracy"]) for d in results.get("dense", []) if d["seed"] in seeds]
    return statistics.fmean(values) if values else None


def finetune_budget(results: dict, method: str) -> str:
    """What fine-tune ``method`` got after its prune in ``results``, in words."""
    config = results.get("settings", {}).get("method_configs", {}).get(method, {})
    epochs = config.get("finetune_epochs", results.get("settings", {}).get("finetune_epochs", 0))
    steps = (config.get("compensation") or {}).get("recovery_steps", 0)
    parts = ([f"{epochs} ep fine-tune"] if epochs else []) + ([f"{steps} recovery steps"] if steps else [])
    return " + ".join(parts) or "no fine-tune"


def _compensated(results: dict, method: str) -> bool:
    config = results.get("settings", {}).get("method_configs", {}).get(method, {})
    return bool((config.get("compensation") or {}).get("compensate"))


def no_retraining_checks(root: Path, benchmark: str) -> list[Check]:
    """Targets a, a′ and c on one benchmark's no-retraining compares."""
    folder = BENCHMARKS[benchmark]
    methods, magnitude = load(root, f"{folder}/methods"), load(root, f"{folder}/magnitude+compensation")
    if methods is None:
        return [_not_measured(t, benchmark, f"no {folder}/methods/results.json") for t in ("a", "a′", "c")]
    rows = []
    bingo, gmp = Side("bingo", methods, "bingo"), Side("gmp", methods, "gmp")
    source = f"{folder}, {methods.get('epochs', '?')} ep"
    sparsities = _sparsities(methods, magnitude)
    if magnitude is None:
        rows.append(_not_measured("a", benchmark, f"no {folder}/magnitude+compensation/results.json"))
    else:
        rows += [compare("a", benchmark, source, s, bingo, Side("magnitude+compensation", magnitude, "magnitude"))
                 for s in sparsities]
    rows += [near_gmp("a′", benchmark, source, s, bingo, gmp) for s in sparsities]
    stepped = load(root, f"{folder}/{STEPPED}")
    if stepped is None and benchmark == MULTISTEP_BENCHMARK and (multistep := multistep_results(root)) is not None:
        stepped, method, source4 = multistep, f"{MULTISTEP_NAMES['bingo (m chosen)']}, 4-step compensation", f"{MULTISTEP} + GMP of {folder}"
    else:
        method, source4 = "bingo", f"{folder}/{STEPPED}, {(stepped or {}).get('epochs', '?')} ep"
    if stepped is not None:
        candidate = Side("bingo, 4 steps", stepped, method)
        rows += [near_gmp("a′ (4 steps)", benchmark, source4, s, candidate, gmp) for s in _sparsities(stepped)]
    rows += [compare("c", benchmark, source, s, Side("bingo-gradual", methods, "bingo-gradual"), gmp, allowance=0.3 * POINT)
             for s in sparsities]
    return rows


def near_gmp(target: str, benchmark: str, source: str, sparsity: float, candidate: Side, gmp: Side) -> Check:
    """``candidate`` ≥ GMP − 1 point, applying only where GMP is within 2 points of dense (over the seeds both measured)."""
    row = compare(target, benchmark, source, sparsity, candidate, gmp, allowance=POINT)
    if row.margin is None:
        return row
    seeds = _seeds(candidate.results, candidate.method, sparsity) & _seeds(gmp.results, gmp.method, sparsity)
    dense = _dense_mean(gmp.results, seeds)
    if dense is None:
        return replace(row, candidate_mean=None, note="no dense run to compare GMP with")
    if row.baseline_mean < dense - 2 * POINT - TOLERANCE:
        return replace(row, applies=False, note=f"GMP {(row.baseline_mean - dense) / POINT:+.1f} points from dense")
    return row


def finetune_checks(root: Path, benchmark: str) -> list[Check]:
    """Target b on every fine-tune compare of one benchmark."""
    folders = FINETUNES.get(benchmark, ())
    rows = []
    for folder in folders:
        results = load(root, folder)
        if results is None:
            rows.append(_not_measured("b", benchmark, f"no {folder}/results.json"))
            continue
        budget = finetune_budget(results, "bingo")
        if finetune_budget(results, "magnitude") != budget:
            budget += f" (magnitude: {finetune_budget(results, 'magnitude')})"
        source = f"{folder}, {results.get('epochs', '?')} ep + {budget}"
        baseline = "magnitude+compensation" if _compensated(results, "magnitude") else "magnitude"
        rows += [compare("b", benchmark, source, s, Side("bingo", results, "bingo"), Side(baseline, results, "magnitude"))
                 for s in _sparsities(results)]
    if not folders:
        rows.append(_not_measured("b", benchmark, "no fine-tune comparison on this benchmark"))
    return rows


def multistep_results(root: Path) -> dict | None:
    """``multistep_compensation/seed-<k>.json`` as one compare-shaped dict, method ``<method>, <K>-step compensation``."""
    paths = sorted((root / MULTISTEP).glob("seed-*.json"))
    if not paths:
        return None
    dense, runs = [], []
    for path in paths:
        seed_rows = json.loads(path.read_text())
        seed = seed_rows["seed"]
        steps = seed_rows.get("dense_train_forwards", 0)
        dense.append({"seed": seed, "accuracy": seed_rows["dense"]["bingo"], "seconds": 0.0, "train_steps": steps,
                      "forward_passes": steps})
        runs += [{"method": f"{MULTISTEP_NAMES.get(row['method'], row['method'])}, {row['steps']}-step compensation",
                  "seed": seed, "sparsity": row["sparsity"],
                  "accuracy": row["accuracy"], "seconds": row.get("seconds", 0.0), "train_steps": 0,
                  "forward_passes": row.get("calibration_forwards", 0)} for row in seed_rows["rows"]]
    return {"settings": {}, "dense": dense, "runs": runs}


def extreme_checks(root: Path) -> list[Check]:
    """Target d: plain ``bingo`` and every K > 1 of the multi-step compensation, against GMP, at 98%."""
    benchmark = MULTISTEP_BENCHMARK
    folder = BENCHMARKS[benchmark]
    methods = load(root, f"{folder}/methods")
    if methods is None:
        return [_not_measured("d", benchmark, f"no {folder}/methods/results.json")]
    gmp = Side("gmp", methods, "gmp")
    rows = [compare("d", benchmark, f"{folder}, {methods.get('epochs', '?')} ep", EXTREME,
                    Side("bingo (one step)", methods, "bingo"), gmp, allowance=3 * POINT)]
    multistep = multistep_results(root)
    if multistep is None:
        return rows + [_not_measured("d", benchmark, f"no {MULTISTEP}/seed-*.json (multi-step compensation)")]
    names = sorted({r["method"] for r in multistep["runs"] if r["method"].startswith("bingo")},
                   key=lambda m: (m.startswith("bingo ("), int(m.rpartition(", ")[2].split("-")[0])))
    for name in names:
        if name != "bingo, 1-step compensation":  # K = 1 is the one-step prune of the row above, recomputed
            # the candidate's runs and GMP's sit in different files; compare() takes the seeds both have
            rows.append(compare("d", benchmark, f"{MULTISTEP} + GMP of {folder}", EXTREME, Side(name, multistep, name), gmp,
                                allowance=3 * POINT))
    return rows


def checks(root: Path) -> list[Check]:
    """Every row of the table, target by target."""
    rows = []
    for benchmark in BENCHMARKS:
        rows += no_retraining_checks(root, benchmark)
        rows += finetune_checks(root, benchmark)
    rows += extreme_checks(root)
    return sorted(rows, key=lambda r: list(TARGETS).index(r.target))


def summary(rows: list[Check]) -> list[str]:
    """One line per target: hits of the rows it applies to, and how many could not be checked."""
    lines = []
    for target, words in TARGETS.items():
        mine = [r for r in rows if r.target == target]
        counted = [r for r in mine if r.outcome in ("hit", "MISS")]
        hits = sum(r.outcome == "hit" for r in counted)
        extra = [f"{n} {what}" for what in ("not measured", "n/a") if (n := sum(r.outcome == what for r in mine))]
        if target == "d":  # few rows, each a different variant of bingo: say which one gets closest
            extra += [f"{r.candidate} {r.margin / POINT:+.2f} points" for r in counted]
        lines.append(f"- **{target}** ({words}): **{hits}/{len(counted)} hit**" + (f"; {'; '.join(extra)}" if extra else ""))
    return lines


def table(rows: list[Check]) -> list[str]:
    lines = ["| target | benchmark | measured in | sparsity | seeds | candidate | baseline | needed | margin (points) | result |",
             "|:---|:---|:---|---:|---:|:---|:---|---:|---:|:---|"]
    for r in rows:
        sparsity = "—" if r.sparsity is None else f"{r.sparsity:g}"
        if r.margin is None:
            cells = [r.candidate or "—", r.baseline or "—", "—", "—", f"not measured: {r.note}"]
        else:
            needed = r.baseline_mean - r.allowance
            result = r.outcome if r.outcome != "MISS" else "**MISS**"
            if r.note:
                result += f" ({r.note})"
            cells = [f"{r.candidate} {r.candidate_mean:.4f}", f"{r.baseline} {r.baseline_mean:.4f}"
                     + (f" − {r.allowance / POINT:g} pt" if r.allowance else ""), f"{needed:.4f}",
                     f"{r.margin / POINT:+.2f}", result]
        lines.append(f"| {r.target} | {r.benchmark} | {r.source} | {sparsity} | {r.seeds or '—'} | " + " | ".join(cells) + " |")
    return lines


def report(rows: list[Check]) -> str:
    return "\n".join([
        "# Issue 21's targets on every benchmark, misses included",
        "",
        "`python benchmarks/one_shot_targets.py`: read from the result files of the benchmarks in BENCHMARKS.md (it runs nothing).",
        "Test accuracy with 4 decimals (a few rows are decided in the fourth), mean over the seeds both sides of",
        "a row measured; *needed* is the baseline less the allowance, *margin* the candidate less *needed* (≥ 0 is",
        "a hit). Where a benchmark lacks the runs a target needs, the row says so. Fine-tune rows come from their",
        "own compares, whose dense recipe (epochs) may differ from the no-retraining benchmark's; a recovery row's",
        "baseline is compensated magnitude given the same recovery steps. a′ does not apply (n/a) where GMP itself",
        "is more than 2 points below dense.",
        "",
        *summary(rows),
        "",
        *table(rows),
        "",
    ])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help=f"the results folder to read (and to write {REPORT} into); default: benchmarks/results")
    args = parser.parse_args(argv)
    text = report(checks(args.results))
    atomic_write(args.results / REPORT, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
