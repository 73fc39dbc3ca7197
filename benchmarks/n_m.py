"""2:4 against 50% unstructured, both compensated, from one training run (issue 18, item 4).

    python benchmarks/n_m.py            # writes benchmarks/results/n_m.md and benchmarks/results/n_m/seed-*.json

For each seed, one ``bingo run`` per method on Fashion-MNIST / LeNet-300-100
(the main benchmark's recipe: 3 epochs, Adam 1.2e-3, batch 128) prunes its
one dense run at ``0.5`` (any weights) and ``2:4`` (at most 2 of every 4
consecutive inputs of each unit kept: 50%, PyTorch's semi-structured
pattern), and ``0.75`` beside ``1:4``, no fine-tune (4:8 does not divide the
300 inputs of LeNet-300-100's second layer).
``bingo`` compensates by default; ``magnitude --compensate`` is the baseline with
the same re-fit. Each run's JSON is kept, so an interrupted benchmark
resumes with the seeds it has.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from bingo.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks/results/n_m"
REPORT = ROOT / "benchmarks/results/n_m.md"
SETTINGS = ["--data", "fashion-mnist", "--model", "lenet300", "--epochs", "3", "--batch-size", "128", "--lr", "1.2e-3",
            "--optimizer", "adam"]
SPARSITIES = "0.5,0.75,2:4,1:4"  # 4:8 does not divide fc2's 300 inputs
METHODS = {"bingo": ["--method", "bingo"], "magnitude --compensate": ["--method", "magnitude", "--compensate"]}
SEEDS = 3


def run(method: str, seed: int) -> dict:
    path = OUT / f"{method.split()[0]}-seed-{seed}.json"
    if not path.exists():
        command = [sys.executable, "-m", "bingo", "run", *SETTINGS, *METHODS[method], "--sparsity", SPARSITIES,
                   "--seed", str(seed), "--out", str(path), "--no-progress"]
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def table(results: dict[str, list[dict]]) -> str:
    columns = SPARSITIES.split(",")
    lines = ["| method | dense | " + " | ".join(columns) + " |", "|:---|" + "---:|" * (len(columns) + 1)]
    for method, runs in results.items():
        cells = [_mean_std([r["dense_accuracy"] for r in runs])]
        for column in columns:
            values = [row["accuracy"] for r in runs for row in r["results"] if str(row["sparsity"]) == column]
            cells.append(_mean_std(values))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> str:
    OUT.mkdir(parents=True, exist_ok=True)
    results = {method: [run(method, seed) for seed in range(SEEDS)] for method in METHODS}
    commands = "\n".join(" ".join(["bingo run", *SETTINGS, *METHODS[m], "--sparsity", SPARSITIES, "--seed", "S",
                                   "--out", "OUT.json"]) for m in METHODS)
    text = f"""# N:M (2:4) against unstructured sparsity, compensated, no fine-tune

`python benchmarks/n_m.py`: Fashion-MNIST, LeNet-300-100, 3 epochs, {SEEDS} seeds (mean ± std of test accuracy),
each seed one dense run pruned at every sparsity; the same commands for seeds S = 0..{SEEDS - 1}:

```sh
{commands}
```

{table(results)}
"""
    atomic_write(REPORT, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
