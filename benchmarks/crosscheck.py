"""Does the default ``bingo`` carry beyond the benchmark it was tuned on? A check on digits.

    python benchmarks/crosscheck.py      # also run by `make benchmarks`

The default (the hybrid search's significance ranked together with weight
magnitude) was chosen on Fashion-MNIST with LeNet-300-100. This runs the same
comparison on scikit-learn's digits, with the small ``mlp`` and the ``conv``
model, without and with a fine-tune: ``bingo`` (the default), ``bingo`` with
``--bingo-magnitude-weight 0`` (the search's significance alone), one-shot
magnitude and GMP. Each cell is one ``bingo compare`` run into
``benchmarks/results/crosscheck/<name>`` (resumed if already there); the table
goes to ``benchmarks/results/crosscheck.md``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from bingo.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("benchmarks/results/crosscheck")
MODELS = ("mlp", "conv")
FINETUNE = (0, 5)
SPARSITIES = (0.8, 0.9, 0.95)
COMMON = ["--data", "digits", "--epochs", "20", "--seeds", "5", "--sparsities", ",".join(f"{s:g}" for s in SPARSITIES)]
#: column -> (method in compare, extra flags)
COLUMNS = {
    "bingo": ("bingo", []),
    "bingo, significance alone": ("bingo", ["--bingo-magnitude-weight", "0"]),
    "magnitude": ("magnitude", []),
    "gmp": ("gmp", []),
}


def _run(model: str, finetune: int, alone: bool) -> dict:
    methods = "bingo" if alone else "bingo,magnitude,gmp"
    out = OUT / f"{model}-finetune{finetune}{'-alone' if alone else ''}"
    command = [sys.executable, "-m", "bingo", "compare", *COMMON, "--model", model, "--methods", methods,
               "--finetune-epochs", str(finetune), "--out", str(out), "--resume", "--no-progress",
               *(COLUMNS["bingo, significance alone"][1] if alone else [])]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((ROOT / out / "results.json").read_text())


def _cell(results: dict, method: str, sparsity: float) -> tuple[float, str]:
    values = [r["accuracy"] for r in results["runs"] if r["method"] == method and r["sparsity"] == sparsity]
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, f"{mean:.3f} ± {std:.3f}"


def _tally(means: list[dict[str, float]]) -> str:
    """How often the default bingo is ahead of each other column (by the rounded means)."""
    parts = []
    for column in list(COLUMNS)[1:]:
        ahead = sum(round(m["bingo"], 3) > round(m[column], 3) for m in means)
        tied = sum(round(m["bingo"], 3) == round(m[column], 3) for m in means)
        parts.append(f"ahead of {column} in {ahead} of {len(means)} cells" + (f" (tied in {tied})" if tied else ""))
    return "The default `bingo` is " + "; ".join(parts) + "."


def main() -> str:
    header = "| model | dense | fine-tune | sparsity | " + " | ".join(COLUMNS) + " |"
    lines = [header, "|:---|---:|---:|---:|" + "---:|" * len(COLUMNS)]
    means = []
    for model in MODELS:
        for finetune in FINETUNE:
            shared, alone = _run(model, finetune, alone=False), _run(model, finetune, alone=True)
            dense = statistics.mean(d["accuracy"] for d in shared["dense"])
            for sparsity in SPARSITIES:
                cells = {column: _cell(alone if flags else shared, method, sparsity) for column, (method, flags) in COLUMNS.items()}
                means.append({column: mean for column, (mean, _) in cells.items()})
                best = max(round(mean, 3) for mean, _ in cells.values())
                shown = [f"**{text}**" if round(mean, 3) == best else text for mean, text in cells.values()]
                lines.append(f"| {model} | {dense:.3f} | {finetune} ep | {sparsity:g} | " + " | ".join(shown) + " |")
    text = (
        "`bingo compare " + " ".join(COMMON) + " --model M --finetune-epochs E` for each model and budget "
        "(and once more with `--methods bingo --bingo-magnitude-weight 0` for the search's significance alone); "
        "20 epochs of Adam 1.2e-3, batch 128; accuracy on the 360 test digits; "
        "mean ± std over 5 seeds, best in bold. Settings in `benchmarks/crosscheck.py`.\n\n"
        + "\n".join(lines) + "\n\n" + _tally(means) + "\n"
    )
    atomic_write(ROOT / "benchmarks/results/crosscheck.md", lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
