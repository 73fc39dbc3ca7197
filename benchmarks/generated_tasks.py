"""Benchmarks on tasks generated offline (issue 21, item 6): not derived from Fashion-MNIST or digits.

    python benchmarks/generated_tasks.py                 # runs what is missing, writes benchmarks/results/generated_tasks.md
    python benchmarks/generated_tasks.py --only tokens   # one task
    python benchmarks/generated_tasks.py --skip-run      # only rewrite the report from the results on disk

Three tasks from :mod:`bingo.bench.generated` (``--data`` names, seed 0, no download):
``teacher-student`` with the small ``mlp`` (a student with little room to spare),
``tokens`` with the ``transformer``, ``signals`` with ``conv1d``. For each, into
``benchmarks/results/generated_tasks/<task>/``, two ``bingo compare`` runs with
``--resume --rerun-changed`` (an interrupted benchmark continues where it stopped):

- ``methods/``: ``bingo`` (compensated, its preset), ``bingo-gradual`` and ``gmp``;
- ``magnitude+compensation/``: one-shot magnitude with the same re-fit;
- ``bingo-4-step/``: ``bingo`` with ``--bingo-compensation-steps 4`` (each sparsity reached in 4
  prune-and-refit steps, its blend chosen per candidate after them; still no training).

No method fine-tunes after its prune. The report's numbers are all read from
those folders' ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bingo.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("benchmarks/results/generated_tasks")
REPORT = ROOT / "benchmarks/results/generated_tasks.md"
SPARSITIES = (0.8, 0.9, 0.95)
#: column -> (folder, method in it, extra compare flags)
COLUMNS = {
    "bingo": ("methods", "bingo", []),
    "magnitude+compensation": ("magnitude+compensation", "magnitude", ["--magnitude-compensate"]),
    "bingo-gradual": ("methods", "bingo-gradual", []),
    "gmp": ("methods", "gmp", []),
    # issue 21 item 1 on tasks other than Fashion-MNIST: the same bingo, reaching each sparsity in 4 prune-and-refit steps
    "bingo, 4-step compensation": ("bingo-4-step", "bingo", ["--bingo-compensation-steps", "4"]),
}


@dataclass(frozen=True)
class Task:
    """One generated data set, the model it is made for, and its training recipe."""

    data: str
    model: str
    epochs: int
    seeds: int
    lr: float = 1.2e-3
    about: str = ""

    def flags(self) -> list[str]:
        return ["--data", self.data, "--model", self.model, "--epochs", str(self.epochs), "--seeds", str(self.seeds),
                "--lr", f"{self.lr:g}", "--sparsities", ",".join(f"{s:g}" for s in SPARSITIES)]


TASKS = {
    "teacher-student": Task("teacher-student", "mlp", 20, 2, about=(
        "32 Gaussian features labelled into 10 classes by a fixed random 32-256-256-10 ReLU teacher; "
        "20,000 training / 2,000 test samples; the student is the 64-32 `mlp` (4,522 weights)")),
    "tokens": Task("tokens", "transformer", 10, 2, lr=3e-3, about=(
        "16 one-hot tokens of a 16-word vocabulary; 8 classes: the most frequent of 4 marker tokens × whether one "
        "order token comes before another; 8,000 / 2,000 samples; a 2-layer, 32-wide, 4-head transformer encoder")),
    "signals": Task("signals", "conv1d", 10, 2, about=(
        "2-channel noisy signals of length 64 with one of 6 fixed ±1 motifs (length 7) added at a random place; "
        "6,000 / 2,000 samples; a 2-conv-layer 1-D CNN")),
}


def compare_command(name: str, folder: str) -> list[str]:
    task = TASKS[name]
    if folder == "methods":
        extra = ["--methods", ",".join(m for f, m, _ in COLUMNS.values() if f == "methods")]
    else:
        _, method, flags = next(c for c in COLUMNS.values() if c[0] == folder)
        extra = ["--methods", method, *flags]
    return ["compare", *task.flags(), *extra, "--out", str(OUT / name / folder), "--resume", "--rerun-changed"]


def folders() -> list[str]:
    return list(dict.fromkeys(folder for folder, _, _ in COLUMNS.values()))


def run(name: str) -> None:
    for folder in folders():
        subprocess.run([sys.executable, "-m", "bingo", *compare_command(name, folder), "--no-progress"], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)


def _load(name: str, folder: str) -> dict | None:
    path = ROOT / OUT / name / folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def accuracy_table(name: str) -> str:
    """Mean ± std test accuracy per column and sparsity (best mean in bold), with the dense row."""
    loaded = {folder: _load(name, folder) for folder in folders()}
    lines = ["| sparsity | " + " | ".join(COLUMNS) + " |", "|:---|" + "---:|" * len(COLUMNS)]
    dense = loaded["methods"]["dense"] if loaded["methods"] else []
    lines.append("| 0 (dense) | " + " | ".join(_mean_std([d["accuracy"] for d in dense]) for _ in COLUMNS) + " |")
    for s in SPARSITIES:
        values = {}
        for column, (folder, method, _) in COLUMNS.items():
            runs = loaded[folder]["runs"] if loaded[folder] else []
            values[column] = [r["accuracy"] for r in runs if r["method"] == method and r["sparsity"] == s]
        means = {c: statistics.mean(v) for c, v in values.items() if v}
        best = max(means.values(), default=None)
        cells = [f"**{_mean_std(v)}**" if c in means and means[c] == best else _mean_std(v) for c, v in values.items()]
        lines.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wall_time(name: str) -> str:
    """Seconds each compare folder's runs recorded, summed (training included), as one line."""
    parts = []
    for folder in folders():
        results = _load(name, folder)
        if results:
            parts.append(f"`{folder}` {sum(r['seconds'] for r in results['runs']):.0f} s")
    return ", ".join(parts) or "not run yet"


def section(name: str) -> str:
    task = TASKS[name]
    shown = "\n".join("bingo " + " ".join(compare_command(name, folder)) for folder in folders())
    return f"""## {name}: {task.model}, {task.epochs} epochs, {task.seeds} seeds

{task.about}.

```sh
{shown}
```

Test accuracy, mean ± std over seeds, no retraining after any prune (best mean in bold):

{accuracy_table(name)}

Sum of the seconds the rows recorded (each row counts its method's training again, so this overstates the wall time): {wall_time(name)}.
"""


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=list(TASKS), action="append", help="run only this task (repeatable)")
    parser.add_argument("--skip-run", action="store_true", help="only rewrite the report from the results on disk")
    args = parser.parse_args(argv)
    if not args.skip_run:
        for name in args.only or TASKS:
            run(name)
    text = "# Generated tasks: bingo against magnitude + compensation, GMP and gradual BINGO\n\n" + (
        "`python benchmarks/generated_tasks.py`. Data generated offline from seed 0 by `bingo.bench.generated` "
        "(no download); the commands below are the whole benchmark.\n\n") + "\n".join(section(n) for n in TASKS)
    atomic_write(REPORT, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
