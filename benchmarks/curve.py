"""The whole accuracy-vs-sparsity curve from one training run: every method, five benchmarks.

    python benchmarks/curve.py             # also run by `make benchmarks`
    python benchmarks/curve.py --only fashion-mnist-lenet300

For each benchmark (data, model, training recipe) it runs, into
``benchmarks/results/curve/<benchmark>/``, resuming whatever is already there:

- ``methods/``: ``bingo compare`` of every method with its preset (``bingo``
  compensates; no method fine-tunes);
- ``magnitude+compensation/`` and ``bingo-uncompensated/``: the ablation rows
  for compensation, with the same seeds;
- ``floor-<method>-seed<k>.json`` (the small benchmarks): ``bingo run
  --max-accuracy-drop 0.01``, the sparsity each one-shot method reaches with
  no retraining at most 1 point below the dense validation accuracy.

and writes ``benchmarks/results/curve.md`` from their JSON files: accuracy
per sparsity, the cost of the whole curve, and the accuracy floor. Nothing
in it is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bingo import count_flops
from bingo.io import atomic_write
from bingo.bench.data import load_dataset
from bingo.bench.models import build_model
from bingo.bench.strategies import CompensationConfig

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("benchmarks/results/curve")
METHODS = ("bingo", "bingo-paper", "bingo-gradual", "gmp", "imp", "snip", "magnitude", "random")
#: column -> (folder, method in that folder): the compensation ablation rows sit in their own compare runs
VARIANTS = {
    "magnitude+compensation": ("magnitude", ["--magnitude-compensate"]),
    "bingo-uncompensated": ("bingo", ["--no-bingo-compensate"]),
    "bingo+batchnorm-reestimated": ("bingo", ["--bingo-batchnorm", "reestimate"]),
}
#: models with BatchNorm, where re-estimating its statistics after compensation is a question
BATCHNORM_MODELS = ("conv", "resnet")
#: one-shot methods that can prune to an accuracy floor (run flags after ``--method``)
FLOOR_METHODS = {
    "bingo": ["--method", "bingo"],
    "bingo-uncompensated": ["--method", "bingo", "--no-compensate"],
    "magnitude+compensation": ["--method", "magnitude", "--compensate"],
    "magnitude": ["--method", "magnitude"],
}
MAX_DROP = 0.01


@dataclass(frozen=True)
class Benchmark:
    """One data set, model and training recipe."""

    data: str
    model: str
    epochs: int
    seeds: int
    sparsities: tuple[float, ...]
    train_samples: int | None = None  #: a seeded subset of the training split, to keep the conv nets' runs short
    floor: bool = False  #: also measure the accuracy floor (each floor run trains its own dense model; with compensation at every probe, too slow for the conv nets here)
    methods: tuple[str, ...] = METHODS

    def flags(self) -> list[str]:
        flags = ["--data", self.data, "--model", self.model, "--epochs", str(self.epochs), "--seeds", str(self.seeds),
                 "--sparsities", ",".join(f"{s:g}" for s in self.sparsities)]
        return flags + (["--train-samples", str(self.train_samples)] if self.train_samples else [])


#: Ordered by cost: an interrupted `make benchmarks` has the cheap ones done first. The resnet ran one
#: seed: on 2 shared cores its IMP trajectory alone took about 20 minutes.
BENCHMARKS = {
    "fashion-mnist-lenet300": Benchmark("fashion-mnist", "lenet300", 3, 3, (0.5, 0.8, 0.9, 0.95, 0.98), floor=True),
    "digits-mlp": Benchmark("digits", "mlp", 20, 5, (0.8, 0.9, 0.95), floor=True),
    "digits-conv": Benchmark("digits", "conv", 20, 3, (0.8, 0.9, 0.95)),
    # bingo-paper left out on the conv nets: its every-step fake passes cost most on deep models (17 forwards per
    # step on the ResNet) and it prunes no better than random on every benchmark above.
    "fashion-mnist-conv": Benchmark("fashion-mnist", "conv", 3, 2, (0.9, 0.95, 0.98), train_samples=5_000,
                                    methods=tuple(m for m in METHODS if m != "bingo-paper")),
    "fashion-mnist-resnet": Benchmark("fashion-mnist", "resnet", 3, 1, (0.9, 0.95, 0.98), train_samples=5_000,
                                      methods=tuple(m for m in METHODS if m != "bingo-paper")),
}


def _bingo(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "bingo", *args, "--no-progress"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def compare_command(name: str, folder: str) -> list[str]:
    bench = BENCHMARKS[name]
    if folder == "methods":
        extra = ["--methods", ",".join(bench.methods)]
    else:
        method, flags = VARIANTS[folder]
        extra = ["--methods", method, *flags]
    return ["compare", *bench.flags(), *extra, "--out", str(OUT / name / folder), "--resume", "--rerun-changed"]


def floor_command(name: str, method: str, seed: int) -> list[str]:
    bench = BENCHMARKS[name]
    return ["run", "--data", bench.data, "--model", bench.model, "--epochs", str(bench.epochs), *FLOOR_METHODS[method],
            "--max-accuracy-drop", f"{MAX_DROP:g}", "--seed", str(seed), "--out", str(OUT / name / f"floor-{method}-seed{seed}.json")]


def folders(name: str) -> list[str]:
    """The compare runs of benchmark ``name``: all methods, then the ablation variants that apply."""
    batchnorm = BENCHMARKS[name].model in BATCHNORM_MODELS
    return ["methods", *(v for v in VARIANTS if batchnorm or "batchnorm" not in v)]


def run(name: str) -> None:
    """Every compare and floor run of benchmark ``name`` that is not recorded yet."""
    for folder in folders(name):
        _bingo(*compare_command(name, folder))
    bench = BENCHMARKS[name]
    if bench.floor:
        for method in FLOOR_METHODS:
            for seed in range(bench.seeds):
                if not _floor_current(ROOT / OUT / name / f"floor-{method}-seed{seed}.json"):
                    _bingo(*floor_command(name, method, seed))


def _floor_current(path: Path) -> bool:
    """Whether the floor run in ``path`` exists and was recorded with today's compensation settings.

    A compensated run recorded before a compensation setting existed (the
    solver, say) ran with another compensation, so it runs again.
    """
    if not path.exists():
        return False
    compensation = json.loads(path.read_text()).get("config", {}).get("compensation") or {}
    now = set(CompensationConfig().to_dict())  # compensation_steps is recorded only when not 1
    return not compensation.get("compensate") or set(compensation) == now


def _load(name: str, folder: str) -> dict | None:
    path = ROOT / OUT / name / folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def accuracy_table(name: str) -> tuple[str, dict]:
    """Mean ± std test accuracy per method and sparsity (no retraining anywhere), and the means by (column, sparsity)."""
    main = _load(name, "methods")
    columns: dict[str, list[dict]] = {}
    if main:
        for method in BENCHMARKS[name].methods:
            columns[method] = [r for r in main["runs"] if r["method"] == method]
    for column, (method, _) in VARIANTS.items():
        results = _load(name, column)
        columns[column] = [r for r in results["runs"] if r["method"] == method] if results else []
    order = ["bingo", "bingo+batchnorm-reestimated", "bingo-uncompensated", "magnitude+compensation", "magnitude", "bingo-gradual", "gmp", "imp", "snip",
             "bingo-paper", "random"]
    order = [c for c in order if columns.get(c)]
    sparsities = BENCHMARKS[name].sparsities
    means: dict = {}
    lines = ["| sparsity | " + " | ".join(order) + " |", "|:---|" + "---:|" * len(order)]
    if main:
        dense = [d["accuracy"] for d in main["dense"]]
        lines.append("| 0 (dense) | " + " | ".join(_mean_std(dense) for _ in order) + " |")
        means["dense"] = statistics.mean(dense)
    for s in sparsities:
        cells = []
        for column in order:
            values = [r["accuracy"] for r in columns[column] if r["sparsity"] == s]
            cells.append(_mean_std(values))
            if values:
                means[(column, s)] = statistics.mean(values)
        best = max((means.get((c, s), -1.0) for c in order), default=-1.0)
        cells = [f"**{cell}**" if means.get((c, s)) == best else cell for c, cell in zip(order, cells)]
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines), means


#: examples per compensation forward call (bingo.compensate's default batch size)
CALIBRATION_BATCH = 256


def curve_cost(results: dict, method: str, macs_per_sample: int | None = None) -> tuple[float, float, float, float, float] | None:
    """Cost of the whole curve for ``method``, averaged over seeds, in dense-training units and seconds.

    Returns ``(calls, compute, seconds, seconds ÷ dense seconds, solves)``.
    ``calls`` counts batch forward calls (a training step, a fake pass, a
    calibration call: one each) over dense training's; ``compute`` weighs
    them by work in forward-equivalents of one training batch: a training
    step 3 (forward and backward), a fake pass 1, a calibration call ``256 /
    batch size``, and compensation's least-squares solves their FLOPs
    (``solve_flops``) over a training batch's forward FLOPs (``2 ·
    macs_per_sample · batch size``); ``solves`` is that last part alone (0
    when ``macs_per_sample`` is not given).
    One-shot methods (bingo, bingo-paper, magnitude, random) train once and pay
    each sparsity's prune (and compensation) on top; GMP, bingo-gradual and
    SNIP train once per target; IMP walks one trajectory, so its curve costs
    what its sparsest point cost.
    """
    calls, compute, seconds, ratios, solves = [], [], [], [], []
    batch_flops = 2 * macs_per_sample * results["settings"]["batch_size"] if macs_per_sample else None
    overheads = {(o["method"], o["seed"]): o for o in results.get("search_overhead", [])}
    calibration_weight = CALIBRATION_BATCH / results["settings"]["batch_size"]
    for dense in results["dense"]:
        seed = dense["seed"]
        runs = [r for r in results["runs"] if r["method"] == method and r["seed"] == seed]
        if len(runs) != len(results["settings"]["sparsities"]) or not runs:
            continue
        if method in ("gmp", "bingo-gradual", "snip"):
            passes, secs = sum(r["forward_passes"] for r in runs), sum(r["seconds"] for r in runs)
            work = sum(3 * r["train_steps"] + r["forward_passes"] - r["train_steps"] for r in runs)
        elif method == "imp":
            last = max(runs, key=lambda r: r["sparsity"])
            passes, secs, work = last["forward_passes"], last["seconds"], 3 * last["train_steps"]
        else:
            overhead = overheads.get((method, seed))
            train_passes = overhead["forward_passes_with_search"] if overhead else dense["forward_passes"]
            calibration = sum(r["forward_passes"] - train_passes for r in runs)
            passes = train_passes + calibration
            train_secs = overhead["train_seconds_with_search"] if overhead else dense["seconds"]
            # Every run's seconds hold the training plus its own prune. A resumed benchmark may have timed the
            # dense row in another process than the runs, so a difference below zero counts as no prune time.
            secs = train_secs + sum(max(r["seconds"] - train_secs, 0.0) for r in runs)
            work = 3 * dense["train_steps"] + (train_passes - dense["train_steps"]) + calibration * calibration_weight
        solve_work = sum(r.get("solve_flops", 0.0) for r in runs) / batch_flops if batch_flops else 0.0
        work += solve_work
        solves.append(solve_work / (3 * dense["train_steps"]))
        calls.append(passes / dense["forward_passes"])
        compute.append(work / (3 * dense["train_steps"]))
        seconds.append(secs)
        # the one-shot methods' own process timed plain training too (the search-overhead check): divide by that,
        # so the ratio is measured in one process even when the dense row came from another machine
        plain = overheads.get((method, seed), {}).get("train_seconds") if method not in ("gmp", "bingo-gradual", "snip", "imp") else None
        ratios.append(secs / (plain or dense["seconds"]))
    if not calls:
        return None
    return (statistics.mean(calls), statistics.mean(compute), statistics.mean(seconds), statistics.mean(ratios),
            statistics.mean(solves))


def macs_per_sample(name: str) -> int:
    """Multiply-accumulates of one sample through benchmark ``name``'s model (:func:`bingo.count_flops`)."""
    bench = BENCHMARKS[name]
    data = load_dataset(bench.data)
    return count_flops(build_model(bench.model, data.input_shape, data.num_classes), data.input_shape)


def cost_table(name: str) -> tuple[str, dict]:
    main = _load(name, "methods")
    if not main:
        return "(not run yet)", {}
    rows, costs = [], {}
    sources = [(m, main, m) for m in BENCHMARKS[name].methods] + [(c, _load(name, c), VARIANTS[c][0]) for c in folders(name)[1:]]
    macs = macs_per_sample(name)
    for column, results, method in sources:
        if results is None:
            continue
        cost = curve_cost(results, method, macs)
        if cost:
            costs[column] = cost
            rows.append(f"| {column} | {cost[0]:.2f} | {cost[1]:.2f} | {cost[4]:.3f} | {cost[2]:.1f} s | {cost[3]:.2f}× |")
    n = len(main["settings"]["sparsities"])
    head = [f"| method | whole {n}-point curve: forward calls ÷ dense training's | compute (forward-equivalents, solves included) ÷ dense training's | of which compensation's solves | wall time | wall time ÷ dense training |",
            "|:---|---:|---:|---:|---:|---:|"]
    return "\n".join(head + rows), costs


def floor_table(name: str) -> tuple[str, dict]:
    bench = BENCHMARKS[name]
    if not bench.floor:
        return "", {}
    lines = ["| method | sparsity reached | test accuracy | validation accuracy / floor | runs |", "|:---|---:|---:|---:|---:|"]
    reached = {}
    for method in FLOOR_METHODS:
        reports = []
        for seed in range(bench.seeds):
            path = ROOT / OUT / name / f"floor-{method}-seed{seed}.json"
            if path.exists():
                reports.append(json.loads(path.read_text()))
        if not reports:
            continue
        rows = [r["results"][0] for r in reports]
        sparsity = [r["sparsity"] for r in rows]
        reached[method] = statistics.mean(sparsity)
        validation = statistics.mean(r["validation_accuracy"] for r in rows)
        floor = statistics.mean(r["validation_floor"] for r in rows)
        lines.append(f"| {method} | {_mean_std(sparsity)} | {_mean_std([r['accuracy'] for r in rows])} | "
                     f"{validation:.3f} / {floor:.3f} | {len(rows)} |")
    return "\n".join(lines), reached


def section(name: str) -> tuple[str, dict]:
    bench = BENCHMARKS[name]
    accuracy, means = accuracy_table(name)
    cost, costs = cost_table(name)
    floor, reached = floor_table(name)
    shown = "\n".join("bingo " + " ".join(compare_command(name, folder)) for folder in folders(name))
    subset = f" on a seeded subset of {bench.train_samples:,} training images" if bench.train_samples else ""
    text = f"""### {name}: {bench.model} on {bench.data}, {bench.epochs} epochs{subset}, {bench.seeds} seed{"s" if bench.seeds != 1 else ""}

```sh
{shown}
```

Test accuracy, mean ± std over seeds, no retraining after any prune (best in bold):

{accuracy}

Cost of the whole curve ({len(bench.sparsities)} sparsities), mean over seeds:

{cost}
"""
    if floor:
        text += f"""
`bingo run --max-accuracy-drop {MAX_DROP:g}` (no retraining): the sparsity each one-shot method reaches
with validation accuracy at most {MAX_DROP * 100:g} point below the dense model's (bisection on the
validation split; compensation at every probe where the method compensates):

{floor}
"""
    return text, {"means": means, "costs": costs, "reached": reached}


def _mark(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def targets_table(measured: dict[str, dict]) -> str:
    """Issue 10's targets, each with what was measured and whether it was met (from the sections' numbers)."""
    lines = ["| target | measured | |", "|:---|:---|:---|"]
    lenet = measured.get("fashion-mnist-lenet300", {})
    means, costs, reached = lenet.get("means", {}), lenet.get("costs", {}), lenet.get("reached", {})
    for s, goal in ((0.9, 0.866), (0.95, 0.860), (0.98, 0.82)):
        got = means.get(("bingo", s))
        lines.append(f"| lenet300: bingo, no fine-tune, ≥ {goal:.3f} at {s:.0%} | "
                     f"{'—' if got is None else f'{got:.3f}'} (GMP {means.get(('gmp', s), float('nan')):.3f}) | "
                     f"{_mark(None if got is None else got >= goal)} |")
    for s in (0.95, 0.98):
        got, rival = means.get(("bingo", s)), means.get(("magnitude+compensation", s))
        ok = None if got is None or rival is None else got > rival
        lines.append(f"| lenet300: bingo ahead of magnitude + compensation at {s:.0%} | "
                     f"{got if got is None else f'{got:.3f}'} vs {rival if rival is None else f'{rival:.3f}'} | {_mark(ok)} |")
    got = reached.get("bingo")
    lines.append(f"| lenet300: `--max-accuracy-drop 0.01`, no retraining, reaches ≥ 90% | "
                 f"{'—' if got is None else f'{got:.1%}'} | {_mark(None if got is None else got >= 0.9)} |")
    mine, gmp, imp = costs.get("bingo"), costs.get("gmp"), costs.get("imp")
    if mine and gmp and imp:
        for rival, name, fraction in ((gmp, "GMP", 4), (imp, "IMP", 15)):
            lines.append(f"| lenet300: whole curve ≤ 1/{fraction} of {name}'s cost | forward calls 1/{rival[0] / mine[0]:.1f}, "
                         f"compute 1/{rival[1] / mine[1]:.1f}, wall time 1/{rival[2] / mine[2]:.1f} | "
                         f"{_mark(mine[1] * fraction <= rival[1])} (by compute) |")
    for name, bench in BENCHMARKS.items():
        means = measured.get(name, {}).get("means", {})
        cells = []
        ok = True
        for s in bench.sparsities:
            if s < 0.9:
                continue
            got, rival = means.get(("bingo-gradual", s)), means.get(("gmp", s))
            if got is None or rival is None:
                ok = None
                continue
            cells.append(f"{s:g}: {got:.3f} vs {rival:.3f}")
            ok = ok and got >= rival if ok is not None else None
        if cells:
            lines.append(f"| {name}: bingo-gradual ≥ GMP at 90–98% | {'; '.join(cells)} | {_mark(ok)} |")
    for name in BENCHMARKS:
        main = _load(name, "methods")
        ratios = [o["ratio"] for o in (main or {}).get("search_overhead", []) if o["method"] == "bingo"]
        if ratios:
            lines.append(f"| {name}: training with bingo's search ≤ 1.10× plain training (both timed in the same comparison) | "
                         f"{statistics.mean(ratios):.2f}× (range {min(ratios):.2f}–{max(ratios):.2f}×, {len(ratios)} seed{'s' if len(ratios) != 1 else ''}) | "
                         f"{_mark(statistics.mean(ratios) <= 1.10)} |")
    for name in ("fashion-mnist-conv", "fashion-mnist-resnet"):
        means = measured.get(name, {}).get("means", {})
        got, comp, gmp = means.get(("bingo", 0.9)), means.get(("magnitude+compensation", 0.9)), means.get(("gmp", 0.9))
        if got is None or comp is None or gmp is None:
            lines.append(f"| {name}: bingo ≥ magnitude + compensation and within 2 points of GMP at 90% | not measured | — |")
            continue
        lines.append(f"| {name}: bingo ≥ magnitude + compensation at 90% | {got:.3f} vs {comp:.3f} | {_mark(got >= comp)} |")
        lines.append(f"| {name}: bingo within 2 points of GMP at 90% | {got:.3f} vs {gmp:.3f} | {_mark(got >= gmp - 0.02)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(BENCHMARKS), action="append", help="run only this benchmark (repeatable)")
    parser.add_argument("--skip-run", action="store_true", help="only rewrite the report from the results on disk")
    args = parser.parse_args(argv)
    for name in args.only or BENCHMARKS:
        if not args.skip_run:
            try:
                run(name)
            except subprocess.CalledProcessError as exc:  # report it and go on: the others are independent
                print(f"benchmark {name} stopped: {' '.join(exc.cmd)} exited with {exc.returncode}", file=sys.stderr)
    sections = {name: section(name) for name in BENCHMARKS}
    text = ("#### Issue 10's targets, as measured\n\n" + targets_table({name: found for name, (_, found) in sections.items()})
            + "\n\n" + "\n".join(body for body, _ in sections.values()))
    atomic_write(ROOT / OUT.parent / "curve.md", lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    main()
    print(f"wrote {ROOT / OUT.parent / 'curve.md'}")
