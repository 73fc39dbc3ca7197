"""What a short masked fine-tune after the compensated prune buys, per added cost (issue 21, item 2).

    python benchmarks/recovery.py      # ~15 min on 2 cores; resumable; writes benchmarks/results/recovery.md

Fashion-MNIST LeNet-300-100 with the curve benchmark's recipe (3 epochs, Adam
1.2e-3, batch 128, seeds 0-2): ``bingo`` and compensated magnitude pruned
one-shot to 90 / 95 / 98%, then ``--recovery-steps`` 0, 2% and 5% of the
dense run's training steps (25 and 63 of 1,266) of masked fine-tuning. GMP
(one full training run per target) is read from the curve benchmark's
results for the same seeds. Costs are counted: training steps relative to
one dense run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from bingo.io import atomic_write  # noqa: E402

OUT = ROOT / "benchmarks/results/recovery"
REPORT = ROOT / "benchmarks/results/recovery.md"
CURVE = ROOT / "benchmarks/results/curve/fashion-mnist-lenet300/methods/results.json"
DENSE_STEPS = 1266  # 3 epochs of 422 batches of 128 from 54,000 training images
RECOVERY = (0, 25, 63)  # 0, 2% and 5% of the dense run's steps
SPARSITIES = "0.9,0.95,0.98"
COMMON = ["compare", "--data", "fashion-mnist", "--model", "lenet300", "--epochs", "3", "--seeds", "3", "--lr", "0.0012",
          "--batch-size", "128", "--sparsities", SPARSITIES, "--no-progress", "--resume", "--rerun-changed"]


def command(steps: int) -> list[str]:
    return [*COMMON, "--methods", "bingo,magnitude", "--magnitude-compensate",
            "--bingo-recovery-steps", str(steps), "--magnitude-recovery-steps", str(steps),
            "--out", str((OUT / f"steps-{steps}").relative_to(ROOT))]


def main() -> str:
    for steps in RECOVERY:
        subprocess.run([sys.executable, "-m", "bingo", *command(steps)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    curve = json.loads(CURVE.read_text())
    sparsities = [float(s) for s in SPARSITIES.split(",")]

    def mean(rows, method, sparsity):
        values = [r["accuracy"] for r in rows if r["method"] == method and r["sparsity"] == sparsity]
        return statistics.mean(values) if values else float("nan")

    lines = ["| method | recovery steps | added cost (dense runs) | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
             "|:---|---:|---:|" + "---:|" * len(sparsities)]
    for method, label in (("bingo", "bingo"), ("magnitude", "magnitude+compensation")):
        for steps in RECOVERY:
            rows = json.loads((OUT / f"steps-{steps}" / "results.json").read_text())["runs"]
            cells = " | ".join(f"{mean(rows, method, s):.3f}" for s in sparsities)
            lines.append(f"| {label} | {steps} | {steps / DENSE_STEPS:.3f} | {cells} |")
    cells = " | ".join(f"{mean(curve['runs'], 'gmp', s):.3f}" for s in sparsities)
    lines.append(f"| gmp (one full run per target) | — | 1 per sparsity | {cells} |")
    shown = "\n".join("bingo " + " ".join(command(steps)) for steps in RECOVERY)
    text = f"""# Recovery: a short masked fine-tune after the compensated one-shot prune

`python benchmarks/recovery.py`: Fashion-MNIST LeNet-300-100, 3 epochs, 3 seeds, test accuracy (mean over seeds).
The added cost is the recovery's training steps over the dense run's {DENSE_STEPS}; the dense run itself
(with the search, for bingo) is shared by every sparsity of the curve. GMP: the curve benchmark's rows.

```sh
{shown}
```

{chr(10).join(lines)}
"""
    atomic_write(REPORT, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
