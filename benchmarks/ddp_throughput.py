"""Training throughput of `bingo run` in one process vs two (torchrun, gloo, CPU), same global batch.

    python benchmarks/ddp_throughput.py          # a few minutes on 2 CPU cores

For each model (``lenet300``, ``conv``) and global batch (128, 512), runs

    torchrun --standalone --nproc_per_node P -m bingo run --data fashion-mnist --model M --method bingo
             --epochs 1 --batch-size B --train-samples... (a seeded 12,000-image subset) --sparsity 0.9

with P = 1 (``OMP_NUM_THREADS=2``: the one process gets both cores) and
P = 2 (``OMP_NUM_THREADS=1`` each: one core per process), and reads the
report's ``train_seconds`` (the training loop with the search, not start-up,
data loading or pruning) and ``train_steps``. Images/s = steps x global
batch / train_seconds. Counted work is the same in both (same steps, same
global batches); the wall time is this machine's, shared and noisy: the two
settings of one row are run back to back. Written atomically to
``benchmarks/results/ddp_throughput.md``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "ddp_throughput.md"
MODELS = ("lenet300", "conv")
BATCHES = (128, 512)
SUBSET = 12_000
#: glibc malloc keeps freed memory: without it, a batch-512 conv forward's activations are unmapped after every
#: call and page-faulted back in on the next, which made one process at batch 512 ~1.8x slower per image than at
#: 128 here (1,037 vs 1,862 images/s measured with and without these) and flattered the 2-process run.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def run(model: str, batch: int, processes: int, folder: Path) -> dict:
    out = folder / f"{model}-{batch}-{processes}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // processes), **ALLOCATOR,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "bingo", "run", "--data", "fashion-mnist", "--model", model, "--method", "bingo", "--epochs", "1",
               "--batch-size", str(batch), "--train-samples", str(SUBSET), "--sparsity", "0.9", "--no-progress",
               "--out", str(out)]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    report = json.loads(out.read_text())
    return {"steps": report["train_steps"], "seconds": report["train_seconds"], "search": report["search_seconds"],
            "accuracy": report["dense_accuracy"]}


def main() -> int:
    from bingo.io import atomic_write

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            for batch in BATCHES:
                one, two = (run(model, batch, p, Path(tmp)) for p in (1, 2))
                assert one["steps"] == two["steps"]
                rate = [r["steps"] * batch / r["seconds"] for r in (one, two)]
                rows.append(f"| {model} | {batch} | {one['steps']} | {rate[0]:,.0f} | {rate[1]:,.0f} | {rate[1] / rate[0]:.2f}x "
                            f"| {one['search'] / one['seconds']:.0%} / {two['search'] / two['seconds']:.0%} "
                            f"| {one['accuracy']:.4f} / {two['accuracy']:.4f} |")
                print(rows[-1], flush=True)
    table = "\n".join([
        "# DDP throughput: one process vs two (torchrun, gloo, CPU)",
        "",
        f"`python benchmarks/ddp_throughput.py`: `bingo run --method bingo --epochs 1` on a seeded {SUBSET:,}-image "
        "Fashion-MNIST subset, the same global batch in both settings (two processes: half each). 1 process: "
        "OMP_NUM_THREADS=2; 2 processes: 1 thread each, on this machine's 2 cores. Throughput = steps x global "
        "batch / training-loop seconds (search included). glibc malloc keeps freed memory in both settings "
        "(MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ = 1 GiB), so large activations cost no fresh page faults per call.",
        "",
        "| model | global batch | steps | 1 process, images/s | 2 processes, images/s | speed-up | search share (1 / 2) | dense accuracy (1 / 2) |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])
    atomic_write(OUT, lambda tmp: Path(tmp).write_text(table))
    print(f"written {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
