"""What `bingo.compensate` costs as a layer grows: seconds and the Hessian's memory.

    python benchmarks/compensation_cost.py            # a table on stdout, in markdown

One Linear layer of `width` inputs and `width // 4` outputs (the shape of a
first fully connected layer), random weights, pruned to 90% by magnitude,
compensated on 1,024 random calibration inputs. Time is the wall clock of
`compensate` (median of 3 runs, same process); memory is that of the float64
Hessian `(width + 1)²` and cross term, which bound it whatever the number of
samples. The per-unit Cholesky solves are `k³/3` flops each (`k` = kept
inputs of the unit, 10% of `width` here), so time grows about as
`width · (width / 10)³ / 4` once the solves dominate.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import bingo


def measure(width: int, sparsity: float = 0.9, samples: int = 1024, repeats: int = 3) -> tuple[float, float]:
    torch.manual_seed(0)
    seconds = []
    for _ in range(repeats):
        model = nn.Sequential(nn.Linear(width, max(width // 4, 1)))
        bingo.prune(model, bingo.magnitude_scores(model), sparsity)
        x = torch.randn(samples, width)
        start = time.perf_counter()
        bingo.compensate(model, None, x)
        seconds.append(time.perf_counter() - start)
    memory = ((width + 1) ** 2 + (width + 1) * max(width // 4, 1)) * 8
    return statistics.median(seconds), memory / 2**20


def main() -> str:
    lines = ["| layer inputs × outputs | kept inputs per unit | seconds (median of 3) | H and XᵀY (MiB) |", "|---:|---:|---:|---:|"]
    for width in (256, 784, 1024, 2048, 4096):
        seconds, mebibytes = measure(width)
        lines.append(f"| {width} × {max(width // 4, 1)} | {round(width * 0.1)} | {seconds:.2f} | {mebibytes:.1f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
