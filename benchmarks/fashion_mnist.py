"""Regenerate BENCHMARKS.md: BINGO vs the baselines on Fashion-MNIST with LeNet-300-100.

    python benchmarks/fashion_mnist.py            # or: make benchmarks

Runs ``bingo compare`` (resuming whatever is already in the output folder, so
an interrupted benchmark loses nothing) and writes BENCHMARKS.md from its
``results.json``: nothing in that file is typed by hand.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

import torch

from bingo.io import atomic_write
from bingo.report import aggregate, markdown_tables

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("benchmarks/results/fashion-mnist-lenet300")
SETTINGS = [
    "--data", "fashion-mnist",
    "--model", "lenet300",
    "--epochs", "3",
    "--batch-size", "128",
    "--lr", "1.2e-3",
    "--optimizer", "adam",
    "--methods", "bingo,bingo-paper,imp,gmp,magnitude,snip,random",
    "--sparsities", "0.5,0.8,0.9,0.95,0.98",
    "--seeds", "3",
]
#: The issue-4 targets: BINGO's default against magnitude and GMP with the same fine-tune budget
#: (IMP comes from the main run: fine-tuning does not apply to it).
#: Two budgets: 3 epochs (as long as the training run) and 6 (still within 25% of IMP's time).
TARGETS_FINETUNE = (3, 6)


def targets_out(epochs: int) -> Path:
    return Path(f"benchmarks/results/targets-finetune{epochs}")


def targets_settings(epochs: int) -> list[str]:
    return [
        *SETTINGS[: SETTINGS.index("--methods")],
        "--methods", "bingo,magnitude,gmp",
        "--sparsities", "0.9,0.95,0.98",
        "--seeds", "3",
        "--finetune-epochs", str(epochs),
    ]


def verdict(results: dict, method: str = "bingo") -> str:
    """Where ``method`` wins and loses, sparsity by sparsity, in plain words (from the means)."""
    rows = aggregate(results)
    lines = []
    for sparsity in sorted({r["sparsity"] for r in rows}):
        at = {r["method"]: r for r in rows if r["sparsity"] == sparsity}
        if method not in at:
            continue
        own = at[method]["accuracy_mean"]
        better = [f"{m} ({r['accuracy_mean']:.3f})" for m, r in at.items() if m != method and r["accuracy_mean"] < own]
        worse = [f"{m} ({r['accuracy_mean']:.3f})" for m, r in at.items() if m != method and r["accuracy_mean"] >= own]
        lines.append(
            f"- {sparsity:.0%} sparsity: {method} {own:.3f}; "
            f"beats {', '.join(better) or 'nothing'}; loses to {', '.join(worse) or 'nothing'}."
        )
    return "\n".join(lines)


def targets_table(main: dict, tuned: dict) -> str:
    """At each target sparsity: IMP, BINGO with and without the fine-tune, magnitude and GMP with it, and cost.

    Costs are compared as multiples of dense training time measured in the same run,
    so a machine that got slower between the two runs does not flatter either side.
    """
    plain = {(r["method"], r["sparsity"]): r for r in aggregate(main)}
    ft = {(r["method"], r["sparsity"]): r for r in aggregate(tuned)}
    e = tuned["settings"]["finetune_epochs"]
    columns = [("imp", plain, "imp"), ("bingo", plain, "bingo, no fine-tune"), ("bingo", ft, f"bingo + {e} ep"),
               ("magnitude", ft, f"magnitude + {e} ep"), ("gmp", ft, f"gmp + {e} ep")]
    lines = ["| sparsity | " + " | ".join(title for _, _, title in columns)
             + f" | bingo + {e} ep − imp | cost of bingo + {e} ep ÷ cost of imp |",
             "|:---|" + "---:|" * (len(columns) + 2)]
    for sparsity in sorted({r["sparsity"] for r in aggregate(tuned)}):
        cells = []
        for method, source, _ in columns:
            row = source.get((method, sparsity))
            cells.append(f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}" if row else "—")
        imp, bingo = plain.get(("imp", sparsity)), ft.get(("bingo", sparsity))
        if imp and bingo:
            cells.append(f"{(bingo['accuracy_mean'] - imp['accuracy_mean']) * 100:+.1f} points")
            mine, theirs = bingo["cost_vs_dense"], imp["cost_vs_dense"]
            cells.append(f"{mine:.1f}× ÷ {theirs:.1f}× dense = {mine / theirs:.0%}")
        else:
            cells += ["—", "—"]
        lines.append(f"| {sparsity:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_table(results: dict) -> str:
    """Per-layer sparsity of each method's masks (mean over seeds), from ``layer_sparsity`` in the runs."""
    runs = [r for r in results["runs"] if "layer_sparsity" in r]
    if not runs:
        return "(no per-layer sparsity recorded)"
    layers = list(runs[0]["layer_sparsity"])
    methods = list(dict.fromkeys(r["method"] for r in runs))
    lines = ["| sparsity | method | " + " | ".join(layers) + " |", "|:---|:---|" + "---:|" * len(layers)]
    for sparsity in sorted({r["sparsity"] for r in runs}):
        for method in methods:
            rows = [r for r in runs if r["method"] == method and r["sparsity"] == sparsity]
            if rows:
                cells = [f"{sum(r['layer_sparsity'][k] for r in rows) / len(rows):.3f}" for k in layers]
                lines.append(f"| {sparsity:g} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-run", action="store_true", help="only rewrite BENCHMARKS.md from existing results")
    args = parser.parse_args()
    command = [sys.executable, "-m", "bingo", "compare", *SETTINGS, "--out", str(OUT), "--resume"]
    if not args.skip_run:
        subprocess.run(command, cwd=ROOT, check=True)
        for epochs in TARGETS_FINETUNE:
            targets_command = ["compare", *targets_settings(epochs), "--out", str(targets_out(epochs)), "--resume"]
            subprocess.run([sys.executable, "-m", "bingo", *targets_command], cwd=ROOT, check=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ablation

    import crosscheck

    ablation_text = ablation.main() if not args.skip_run else (ROOT / "benchmarks/results/ablation.md").read_text()
    crosscheck_text = crosscheck.main() if not args.skip_run else (ROOT / "benchmarks/results/crosscheck.md").read_text()
    if not args.skip_run:
        subprocess.run([sys.executable, "benchmarks/size_latency.py"], cwd=ROOT, check=True)
    size_text = (ROOT / "benchmarks/results/size_latency.md").read_text().replace("\n# ", "\n## ").removeprefix("# ")
    import json

    results = json.loads((ROOT / OUT / "results.json").read_text())
    shown = " ".join(["bingo", "compare", *SETTINGS, "--out", str(OUT), "--resume"])
    targets_text = ""
    for epochs in TARGETS_FINETUNE:
        tuned = json.loads((ROOT / targets_out(epochs) / "results.json").read_text())
        shown_targets = " ".join(["bingo", "compare", *targets_settings(epochs), "--out", str(targets_out(epochs)), "--resume"])
        targets_text += f"""### {epochs} epochs of fine-tuning

```sh
{shown_targets}
```

{targets_table(results, tuned)}

"""
    text = f"""# Benchmarks

Regenerate everything below with `make benchmarks` (= `python benchmarks/fashion_mnist.py`),
which runs

```sh
{shown}
```

and rewrites this file from `{OUT}/results.json`. Machine of the last run:
{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}.

## BINGO vs IMP, GMP, SNIP, one-shot magnitude and random: Fashion-MNIST, LeNet-300-100

Settings: every (re)training is {results['epochs']} epochs of Adam (lr {results['settings']['lr']}),
batch {results['settings']['batch_size']}, on 54,000 training images (6,000 held out for
validation); accuracy is on the 10,000 test images; seeds {results['settings']['seeds']} (each seed fixes the
initial weights and the data order, shared by all methods). Sparsity is the fraction of
the weights of all three layers removed (global ranking); no fine-tune after one-shot
pruning (`--finetune-epochs {results['settings']['finetune_epochs']}`). Method settings:
`{json.dumps(results['settings']['method_configs'])}`.

`seconds` is the whole wall time a method needed to deliver its pruned network, dense
training included; `forward passes` counts every training-batch forward, BINGO's fake
passes included.

### Where BINGO wins and where it loses (mean test accuracy over seeds)

`bingo` (the default: hybrid Taylor + calibrating fake passes, ranked together with weight magnitude):

{verdict(results, "bingo")}

`bingo-paper` (the faithful reproduction):

{verdict(results, "bingo-paper")}

![accuracy vs sparsity]({OUT}/accuracy.png)
![cost]({OUT}/cost.png)

{markdown_tables(results)}

## The targets of issue 4: BINGO's default vs IMP, with the same fine-tune budget as magnitude and GMP

One-shot methods get E epochs of masked fine-tuning after the prune, GMP gets the same
E epochs at its final masks after its schedule; IMP (no fine-tune: each of its rounds is a full
retraining) and the no-fine-tune BINGO column come from the run above. Mean ± std over seeds.
Cost is the whole wall time to deliver the pruned network as a multiple of dense training
time measured in the same run.

{targets_text}
## Ablation: what each ingredient of the new `bingo` buys

{ablation_text}

### Where each method puts its cuts

Fraction of each layer's weights removed (mean over seeds). All methods rank
globally; how they share the budget between layers is part of what they learn.

{layer_table(results)}

## Beyond Fashion-MNIST: the default on digits, two models

The default `bingo` (blend of the search's significance with weight magnitude) was
chosen on the Fashion-MNIST benchmark above. Here the same comparison on data and a
model it was not chosen on, regenerated by `python benchmarks/crosscheck.py`:

{crosscheck_text}

## {size_text}"""
    atomic_write(ROOT / "BENCHMARKS.md", lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
