"""Regenerate BENCHMARKS.md: BINGO vs every baseline, five benchmarks, ablation, fine-tuning, size and latency.

    python benchmarks/fashion_mnist.py            # or: make benchmarks

Runs ``benchmarks/curve.py`` (every method on five benchmarks, no
retraining), the fine-tune comparisons below, ``benchmarks/ablation.py`` and
``benchmarks/size_latency.py`` (each resuming whatever is already in its
output folder, so an interrupted benchmark loses nothing) and writes
BENCHMARKS.md from their result files: nothing in it is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from bingo.io import atomic_write
from bingo.bench.report import aggregate, markdown_tables

ROOT = Path(__file__).resolve().parent.parent
#: the main comparison: every method on Fashion-MNIST / LeNet-300-100 (run by curve.py)
OUT = Path("benchmarks/results/curve/fashion-mnist-lenet300/methods")
SETTINGS = ["--data", "fashion-mnist", "--model", "lenet300", "--epochs", "3", "--batch-size", "128", "--lr", "1.2e-3", "--optimizer", "adam"]
#: The issue-4 targets: BINGO's default against magnitude and GMP with the same fine-tune budget
#: (IMP comes from the main run: fine-tuning does not apply to it).
#: Two budgets: 3 epochs (as long as the training run) and 6 (still within 25% of IMP's time).
TARGETS_FINETUNE = (3, 6)


def ablation_staleness() -> str:
    """A warning line when the ablation's ``bingo`` rows were recorded with another Taylor interval than today's preset."""
    from bingo.bench.strategies import BINGO

    stale = []
    for path in sorted((ROOT / "benchmarks/results/ablation").glob("*/results.json")):
        config = json.loads(path.read_text())["settings"]["method_configs"].get("bingo")
        if config and isinstance(config.get("search"), dict) and config["search"].get("taylor_every", 1) != BINGO.search.taylor_every:
            stale.append(path.parent.name)
    if not stale:
        return ""
    return (f"**Not regenerated since the preset changed** (the Taylor average from every {BINGO.search.taylor_every}th step, "
            f"the hybrid's median fallback factor, the blend chosen on validation data): the `bingo` rows of {len(stale)} "
            "variants were recorded with the Taylor average from every step and the fixed blend (each results.json records "
            "its settings); `python benchmarks/ablation.py` reruns them.\n\n")


def targets_out(epochs: int) -> Path:
    return Path(f"benchmarks/results/targets-finetune{epochs}")


def targets_settings(epochs: int) -> list[str]:
    return [
        *SETTINGS,
        "--methods", "bingo,magnitude,gmp",
        "--sparsities", "0.9,0.95,0.98",
        "--seeds", "3",
        "--finetune-epochs", str(epochs),
    ]


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
             + f" | bingo + {e} ep − imp | forward calls of bingo + {e} ep ÷ imp's |",
             "|:---|" + "---:|" * (len(columns) + 2)]
    for sparsity in sorted({r["sparsity"] for r in aggregate(tuned)}):
        cells = []
        for method, source, _ in columns:
            row = source.get((method, sparsity))
            cells.append(f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f}" if row else "—")
        imp, bingo = plain.get(("imp", sparsity)), ft.get(("bingo", sparsity))
        if imp and bingo:
            cells.append(f"{(bingo['accuracy_mean'] - imp['accuracy_mean']) * 100:+.1f} points")
            mine, theirs = bingo["forward_passes_mean"], imp["forward_passes_mean"]
            cells.append(f"{mine:,.0f} ÷ {theirs:,.0f} = {mine / theirs:.0%}")
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


def _demoted(markdown: str) -> str:
    """Headings of a report pushed under this file's level-3 section."""
    return "\n".join("#### " + line.lstrip("#").lstrip() if line.startswith("#") else line for line in markdown.splitlines())


def ddp_limits() -> str:
    """What limits two processes on this machine, with the gradient sizes computed from the models."""
    from bingo.bench.models import build_model
    from bingo.shrink import count_parameters

    sizes = {name: count_parameters(build_model(name, (1, 28, 28), 10)) for name in ("lenet300", "conv")}  # Fashion-MNIST's
    return (
        "\n**What limits it here.** This machine has 2 cores, and one process already uses both (two intra-op "
        "threads), so a second process adds no arithmetic; what it adds is DistributedDataParallel's gradient "
        f"all-reduce every step over gloo's TCP loopback ({sizes['lenet300']:,} float32 values, "
        f"{sizes['lenet300'] * 4 / 2**20:.1f} MiB, for lenet300; {sizes['conv']:,}, {sizes['conv'] * 4 / 2**20:.1f} MiB, "
        "for conv), bingo's per-step average of the loss, and the average of each fake pass's measurements. On "
        "lenet300 a training step is a few milliseconds, so that overhead roughly halves the throughput; on conv a "
        "step is tens of milliseconds of convolution and two processes come close to one. Two processes pay off "
        "where each has cores (or a GPU) of its own; this table shows the cost of DDP here, not its scaling.\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-run", action="store_true", help="only rewrite BENCHMARKS.md from existing results")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ablation
    import curve

    curve_text = curve.main(["--skip-run"] if args.skip_run else [])
    if not args.skip_run:
        for epochs in TARGETS_FINETUNE:
            targets_command = ["compare", *targets_settings(epochs), "--out", str(targets_out(epochs)), "--resume", "--rerun-changed", "--no-progress"]
            subprocess.run([sys.executable, "-m", "bingo", *targets_command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    ablation_text = ablation.main() if not args.skip_run else (ROOT / "benchmarks/results/ablation.md").read_text()
    ablation_text = ablation_staleness() + ablation_text
    if not args.skip_run:
        subprocess.run([sys.executable, "benchmarks/size_latency.py"], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "benchmarks/ddp_throughput.py"], cwd=ROOT, check=True)
        subprocess.run([sys.executable, "benchmarks/n_m.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/masked_speed.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/search_overhead.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/search_budget.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/blend_weight.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/shrink_speed.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/generated_tasks.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/multistep_compensation.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/recovery.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "benchmarks/finetune_ranking.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        if not (ROOT / "benchmarks/results/compensation_scaling.md").exists():  # 35 minutes: rerun it by hand
            subprocess.run([sys.executable, "benchmarks/compensation_scaling.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    # issue 21's targets table reads the result files written above (it runs no benchmark): after all of them
    subprocess.run([sys.executable, "benchmarks/one_shot_targets.py"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    one_shot_targets = "\n## " + (ROOT / "benchmarks/results/one_shot_targets.md").read_text().replace(
        "\n## ", "\n### ").replace("\n# ", "\n## ").removeprefix("# ").strip() + "\n"
    size_text = (ROOT / "benchmarks/results/size_latency.md").read_text().replace("\n# ", "\n## ").removeprefix("# ")
    ddp_text = (ROOT / "benchmarks/results/ddp_throughput.md").read_text().replace("\n# ", "\n## ").removeprefix("# ")
    ddp_text += ddp_limits()
    extra = ""
    # Sections of their own, if they have been run (gpu_check.md only on a machine with a CUDA GPU).
    for name in ("generated_tasks.md", "multistep_compensation.md", "recovery.md", "finetune_ranking.md", "search_overhead.md", "search_budget.md", "blend_weight.md", "masked_speed.md", "shrink_speed.md", "n_m.md", "compensation_scaling.md", "gpu_check.md"):
        path = ROOT / "benchmarks/results" / name
        if path.exists():
            extra += "\n\n## " + path.read_text().replace("\n## ", "\n### ").replace("\n# ", "\n## ").removeprefix("# ").strip()
    results = json.loads((ROOT / OUT / "results.json").read_text())
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

Regenerate everything below with `make benchmarks` (= `python benchmarks/fashion_mnist.py`;
about two hours on 2 cores, resumable), which runs `benchmarks/curve.py`, the fine-tune
comparisons, `benchmarks/ablation.py`, `benchmarks/size_latency.py` and
`benchmarks/ddp_throughput.py`, `benchmarks/n_m.py`, `benchmarks/masked_speed.py`, `benchmarks/search_overhead.py`, `benchmarks/search_budget.py`, `benchmarks/blend_weight.py`, `benchmarks/shrink_speed.py`, `benchmarks/generated_tasks.py`, `benchmarks/multistep_compensation.py`, `benchmarks/recovery.py`, `benchmarks/finetune_ranking.py` and (when its results are not there:
it takes 35 minutes) `benchmarks/compensation_scaling.py`, then `benchmarks/one_shot_targets.py` (issue 21's targets
table below, from their result files), and rewrites this
file from their result files. Machine of the last run: {platform.machine()},
{torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}
(each results.json lists the machines that measured its rows).
{one_shot_targets}
## The whole accuracy-vs-sparsity curve from one training run, without retraining

Every method with its preset, no fine-tune after any prune: `bingo` (the default: hybrid
Taylor + calibrating fake passes, ranked together with weight magnitude, survivors
re-fitted to the dense layer outputs on at least 1,024 training images, more where a
layer is wide: 4 design rows per input, so 3,140 for LeNet-300-100's 784-input first
layer; `bingo.suggested_calibration_samples`), `bingo-uncompensated`
(the same scores, survivors left as they are), `magnitude+compensation` and `magnitude`
(one-shot global magnitude with and without the same re-fit), `bingo-gradual` and `gmp`
(pruned during the run on GMP's cubic schedule by the blended BINGO score / by magnitude:
one run per target), `imp` (iterative magnitude pruning with rewinding to θ0, 20% per
round: one trajectory), `snip` (pruned at initialisation, then trained: one run per
target), the paper-faithful `bingo-paper`, and `random`. Each seed fixes the initial
weights and the data order, shared by all methods; accuracy is on the test split.

Costs are counted work, in units of one dense training run: forward calls (a training
step, a fake pass and a calibration call count one each) and compute in
forward-equivalents of a training batch (a training step 3: forward and backward; a fake
pass 1; a calibration call of 256 images 256 / batch size). Wall time is beside them, as
measured; the last regeneration shared the machine between up to four benchmark jobs, so
its wall times (and the search's overhead ratios) are noisier than counted work, and a
ratio to dense training uses a dense run timed at another moment.

{curve_text}

### Fashion-MNIST / LeNet-300-100 in detail

`seconds` is the whole wall time a method needed to deliver its pruned network, dense
training included; `forward passes` counts every batch forward, BINGO's fake passes and
the compensation's calibration forwards included.

{_demoted(markdown_tables(results))}

### Where each method puts its cuts

Fraction of each layer's weights removed (mean over seeds). All methods rank
globally (each layer keeps at least 1%); how they share the budget between layers is part
of what they learn.

{layer_table(results)}

## With a fine-tune: BINGO's default vs IMP, magnitude and GMP given the same budget

One-shot methods get E epochs of masked fine-tuning after the prune (`bingo` compensates
first), GMP gets the same E epochs at its final masks after its schedule; IMP (no
fine-tune: each of its rounds is a full retraining) and the no-fine-tune BINGO column come
from the main run above. Mean ± std over seeds. Cost is counted: every batch forward call
to deliver the pruned network (training steps, fake passes, calibration calls, fine-tune
steps), bingo's divided by IMP's.

{targets_text}
## Ablation: what each ingredient of `bingo` buys

{ablation_text}

## {size_text}

## {ddp_text}{extra}
"""
    atomic_write(ROOT / "BENCHMARKS.md", lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
