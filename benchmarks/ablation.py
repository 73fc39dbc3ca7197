"""The BINGO ablation: each ingredient on and off, Fashion-MNIST, LeNet-300-100.

    python benchmarks/ablation.py        # also run by `make benchmarks`

Every variant is one ``bingo compare`` run into ``benchmarks/results/ablation/<name>``
(resumed if already there); the table is built from their ``results.json``
files and written to ``benchmarks/results/ablation.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bingo.io import atomic_write

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("benchmarks/results/ablation")
COMMON = ["--data", "fashion-mnist", "--model", "lenet300", "--epochs", "3", "--seeds", "3"]
WEIGHT = ["--sparsities", "0.9,0.95"]
NEURON = ["--sparsities", "0.5,0.7"]
#: The search's own significance, without the default's blend with weight magnitude.
ALONE = ["--bingo-magnitude-weight", "0"]
#: The search ingredients were measured before compensation and the automatic probe interval
#: became the default: those rows keep that setting, so they still show what each ingredient buys.
THEN = ["--no-bingo-compensate", "--bingo-every", "10"]

#: name -> (what changes, method, compare flags). In order: the paper, then one ingredient at a time.
VARIANTS = {
    "paper": ("faithful BINGO: 1% reset-to-θ0 probes every step, accuracy change, mean rule", "bingo-paper", WEIGHT),
    "loss": ("+ loss change instead of accuracy change", "bingo-paper", [*WEIGHT, "--bingo-paper-metric", "loss"]),
    "contrast": ("+ contrast estimator (mean loss change when probed − when not)", "bingo-paper",
                 [*WEIGHT, "--bingo-paper-metric", "loss", "--bingo-paper-rule", "contrast"]),
    "contrast+targeted": ("+ targeted ticket searching at 90%: probes leave weights whose contrast is 2 standard errors from the threshold",
                          "bingo-paper", [*WEIGHT, "--bingo-paper-metric", "loss", "--bingo-paper-rule", "contrast",
                                          "--bingo-paper-target", "0.9"]),
    "taylor-mean": ("Taylor estimate of the reset's loss change, (g·(θ0−w))² averaged over all steps; no fake passes",
                    "bingo", [*WEIGHT, *ALONE, *THEN, "--bingo-estimator", "taylor", "--bingo-mode", "reset", "--bingo-decay", "1"]),
    "taylor-recent": ("+ running average weighted to recent steps (decay 0.99)", "bingo",
                      [*WEIGHT, *ALONE, *THEN, "--bingo-estimator", "taylor", "--bingo-mode", "reset"]),
    "taylor-zero": ("+ estimate zeroing (what pruning does) instead of reset: (g·w)²", "bingo",
                    [*WEIGHT, *ALONE, *THEN, "--bingo-estimator", "taylor", "--bingo-mode", "zero"]),
    "hybrid": ("+ real fake passes (1%, every 10th step) calibrate each layer's scale: the search's significance alone",
               "bingo", [*WEIGHT, *ALONE, *THEN]),
    "hybrid+blend": ("+ ranked together with the weights' magnitude (equal rank blend): the `bingo` default before compensation", "bingo", [*WEIGHT, *THEN]),
    "blend-0.25": ("the default with the magnitude rank weighted 0.25 (sensitivity of the blend)", "bingo",
                   [*WEIGHT, *THEN, "--bingo-magnitude-weight", "0.25"]),
    "blend-0.25+finetune": ("the magnitude rank weighted 0.25 + 1 epoch of masked fine-tuning", "bingo",
                            [*WEIGHT, *THEN, "--bingo-magnitude-weight", "0.25", "--finetune-epochs", "1"]),
    "blend-0.75": ("the default with the magnitude rank weighted 0.75 (sensitivity of the blend)", "bingo",
                   [*WEIGHT, *THEN, "--bingo-magnitude-weight", "0.75"]),
    "blend-0.75+finetune": ("the magnitude rank weighted 0.75 + 1 epoch of masked fine-tuning", "bingo",
                            [*WEIGHT, *THEN, "--bingo-magnitude-weight", "0.75", "--finetune-epochs", "1"]),
    "hybrid+targeted": ("the search alone + targeted fake passes: drawn from the weights ranked within 10% of the 90% threshold",
                        "bingo", [*WEIGHT, *ALONE, *THEN, "--bingo-target", "0.9"]),
    "hybrid-every-step": ("the search alone with fake passes on every step", "bingo", [*WEIGHT, *ALONE, "--no-bingo-compensate", "--bingo-every", "1"]),
    "hybrid+finetune": ("the search alone + 1 epoch of masked fine-tuning", "bingo", [*WEIGHT, *ALONE, *THEN, "--finetune-epochs", "1"]),
    "hybrid+blend+finetune": ("the default before compensation + 1 epoch of masked fine-tuning", "bingo", [*WEIGHT, *THEN, "--finetune-epochs", "1"]),
    "every-auto": ("the default before compensation with fake passes every 27th step (chosen from the layer count: about 5% of training)",
                   "bingo", [*WEIGHT, "--no-bingo-compensate"]),
    "hybrid+blend+compensation": ("+ survivors re-fitted to the dense layer outputs (at least 1,024 calibration images, 4 rows per input of the widest layer: 3,140 here): the default `bingo`",
                                  "bingo", WEIGHT),
    "hybrid+compensation": ("the search's significance alone, compensated", "bingo", [*WEIGHT, *ALONE]),
    "compensation-4096": ("the default with 4,096 calibration images", "bingo", [*WEIGHT, "--bingo-calibration-samples", "4096"]),
    "compensation+lamp": ("the default with LAMP-normalised scores (global allocation by Lee et al. 2021)", "bingo",
                          [*WEIGHT, "--bingo-scope", "lamp"]),
    "compensation+layer": ("the default with the same sparsity in every layer", "bingo", [*WEIGHT, "--bingo-scope", "layer"]),
    "magnitude+compensation": ("reference: one-shot magnitude, compensated", "magnitude", [*WEIGHT, "--magnitude-compensate"]),
    "gradual": ("bingo-gradual: pruned during the run by the default's score on GMP's schedule (one run per target)",
                "bingo-gradual", WEIGHT),
    "magnitude": ("reference: one-shot magnitude", "magnitude", WEIGHT),
    "magnitude+finetune": ("reference: one-shot magnitude + 1 epoch of fine-tuning", "magnitude", [*WEIGHT, "--finetune-epochs", "1"]),
    "gmp": ("reference: gradual magnitude pruning (one run)", "gmp", WEIGHT),
    "neuron-paper": ("neurons: faithful BINGO probes (1% of units, accuracy)", "bingo-paper",
                     [*NEURON, "--bingo-paper-granularity", "neuron", "--bingo-paper-scope", "layer"]),
    "neuron-contrast": ("neurons: probes with loss contrast", "bingo-paper",
                        [*NEURON, "--bingo-paper-granularity", "neuron", "--bingo-paper-scope", "layer",
                         "--bingo-paper-metric", "loss", "--bingo-paper-rule", "contrast"]),
    "neuron-hybrid": ("neurons: the hybrid search's significance alone", "bingo",
                      [*NEURON, *ALONE, *THEN, "--bingo-granularity", "neuron", "--bingo-scope", "layer"]),
    "neuron-hybrid+blend": ("neurons: the `bingo` default before compensation (ranked with each unit's L2 norm)", "bingo",
                            [*NEURON, *THEN, "--bingo-granularity", "neuron", "--bingo-scope", "layer"]),
    "neuron-hybrid+blend+compensation": ("neurons: the default `bingo`, compensated (the next layer re-fitted to the missing units)",
                                         "bingo", [*NEURON, "--bingo-granularity", "neuron", "--bingo-scope", "layer"]),
    "neuron-l2": ("neurons, reference: L2 norm of each unit's weights", "magnitude",
                  [*NEURON, "--magnitude-granularity", "neuron", "--magnitude-scope", "layer"]),
    "neuron-l2+compensation": ("neurons, reference: L2 norm, compensated", "magnitude",
                               [*NEURON, "--magnitude-granularity", "neuron", "--magnitude-scope", "layer", "--magnitude-compensate"]),
}


def run(name: str) -> dict:
    _, method, flags = VARIANTS[name]
    out = OUT / name
    command = [sys.executable, "-m", "bingo", "compare", *COMMON, "--methods", method, *flags, "--out", str(out), "--resume", "--rerun-changed", "--no-progress"]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads((ROOT / out / "results.json").read_text())


def _mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def table(results: dict[str, dict]) -> str:
    lines = []
    for title, sparsities in (("Weights", (0.9, 0.95)), ("Neurons (fraction of hidden units removed, per layer)", (0.5, 0.7))):
        names = [n for n in VARIANTS if VARIANTS[n][2][1] == ",".join(f"{s:g}" for s in sparsities)]
        lines += [f"#### {title}", "", "| variant | what changes | "
                  + " | ".join(f"accuracy at {s:.0%}" for s in sparsities)
                  + " | seconds | search seconds | training × plain | forward passes |",
                  "|:---|:---|" + "---:|" * (len(sparsities) + 4)]
        for name in names:
            what, method, _ = VARIANTS[name]
            runs = [r for r in results[name]["runs"] if r["method"] == method]
            cells = [_mean_std([r["accuracy"] for r in runs if r["sparsity"] == s]) for s in sparsities]
            last = [r for r in runs if r["sparsity"] == sparsities[-1]]
            seconds = sum(r["seconds"] for r in last) / len(last)
            passes = sum(r["forward_passes"] for r in last) / len(last)
            overhead = [o for o in results[name].get("search_overhead", []) if o.get("method") == method]
            ratio = f"{sum(o['ratio'] for o in overhead) / len(overhead):.2f}×" if overhead else "—"
            search = f"{sum(o['search_seconds'] for o in overhead) / len(overhead):.2f}" if overhead else "—"
            lines.append(f"| {name} | {what} | " + " | ".join(cells) + f" | {seconds:.1f} | {search} | {ratio} | {passes:,.0f} |")
        lines.append("")
    return "\n".join(lines)


#: Measured rows of variants that no longer exist, kept as history (they are not rerun).
HISTORY = """
Removed after measurement: `paper-batched` (the faithful fake passes, all layers' in one
`torch.func.vmap`-ed forward) gave the same accuracies as `paper` but was slower
(5.9 s vs 5.4 s whole cost, search 3.92 s vs 3.44 s, 3 seeds, measured by this script
with `--bingo-paper-batched` before the option was deleted), so the option was removed.
"""


def main() -> str:
    results = {name: run(name) for name in VARIANTS}
    text = (
        "Each row is `bingo compare` with the flags in `benchmarks/ablation.py`: "
        + " ".join(COMMON)
        + "; mean ± std over the seeds; `seconds` is the whole cost at the larger sparsity (dense "
        "training, search, fine-tune); `search seconds` is the time spent inside `search.step` "
        "during the 3 epochs (measured within the run, so the least noisy cost of the search); "
        "`training × plain` is training time with the search divided by the time of a separate "
        "training without it (wall-clock noise between two separate runs can move it by a few tenths).\n\n"
        + table(results)
        + HISTORY
    )
    atomic_write(ROOT / "benchmarks/results/ablation.md", lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
