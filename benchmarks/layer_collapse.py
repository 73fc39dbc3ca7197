"""Layer collapse: one-shot magnitude pruning by scope, on digits (issue 10, item 2).

    python benchmarks/layer_collapse.py [--epochs 3] [--seeds 1] [--sparsities 0.8,0.9,0.95]

A global ranking can empty a layer (with BatchNorm a layer's weights may all
be small next to another's). For each model (``conv``, and ``resnet`` where the
model registry has it), one dense training run per seed, then one-shot
magnitude pruning with no fine-tune at each sparsity and each allocation:

- ``global, no floor``: one ranking over all weights, as before the floor
  (``select_masks(..., min_keep=0)``);
- ``global``: the same with the default floor (each layer keeps at least
  ``max(1, ceil(MIN_KEEP * n_l))`` weights);
- ``layer``: every layer pruned to the sparsity;
- ``lamp``: one ranking by LAMP scores (Lee et al. 2021).

Each is measured with BatchNorm statistics as trained, and re-estimated on
the training inputs after pruning (both models have BatchNorm; the pruned
network's activations no longer match the statistics it was trained with).
Prints a markdown table of test accuracy (mean over seeds) and, in brackets,
the smallest fraction of weights any layer keeps (0% = a layer emptied).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import bingo
from bingo.bench.data import load_dataset
from bingo.bench.models import MODELS, build_model
from bingo.selection import MIN_KEEP, select_masks
from bingo.bench.training import TrainConfig, evaluate, train

ALLOCATIONS = ("global, no floor", "global", "layer", "lamp")


def pruned_copy(model: torch.nn.Module, sparsity: float, allocation: str, seed: int) -> tuple[torch.nn.Module, dict]:
    pruned = copy.deepcopy(model)
    scores = bingo.magnitude_scores(pruned)
    if allocation == "global, no floor":
        masks = select_masks(scores, sparsity, "global", seed, min_keep=0)
        bingo.apply_masks(pruned, masks)
    else:
        masks = bingo.prune(pruned, scores, sparsity, allocation, seed=seed)
    return pruned, masks


@torch.no_grad()
def reestimate_batchnorm(model: torch.nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are the plain average over ``inputs``."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches below
    model.train()
    for start in range(0, len(inputs), batch_size):
        model(inputs[start : start + batch_size])
    model.eval()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--sparsities", default="0.8,0.9,0.95")
    args = parser.parse_args()
    sparsities = [float(s) for s in args.sparsities.split(",")]
    models = [name for name in ("conv", "resnet") if name in MODELS]

    rows = []
    for model_name in models:
        variants = [(a, bn) for bn in ("as trained", "re-estimated") for a in ALLOCATIONS]
        accuracy = {(v, s): [] for v in variants for s in sparsities}
        least_kept = {(v, s): [] for v in variants for s in sparsities}
        dense_accuracy, seconds = [], 0.0
        for seed in range(args.seeds):
            data = load_dataset("digits", seed=seed)
            model = build_model(model_name, data.input_shape, data.num_classes, seed=seed)
            start = time.perf_counter()
            train(model, data, TrainConfig(epochs=args.epochs, seed=seed), progress=False)
            seconds += time.perf_counter() - start
            dense_accuracy.append(evaluate(model, data.x_test, data.y_test))
            for allocation in ALLOCATIONS:
                for sparsity in sparsities:
                    pruned, masks = pruned_copy(model, sparsity, allocation, seed)
                    kept = min(float(m.float().mean()) for m in masks.values())
                    recalibrated = reestimate_batchnorm(pruned, data.x_train)
                    for bn, net in (("as trained", pruned), ("re-estimated", recalibrated)):
                        accuracy[(allocation, bn), sparsity].append(evaluate(net, data.x_test, data.y_test))
                        least_kept[(allocation, bn), sparsity].append(kept)
        dense = sum(dense_accuracy) / len(dense_accuracy)
        for variant in variants:
            cells = []
            for s in sparsities:
                acc = accuracy[variant, s]
                cells.append(f"{sum(acc) / len(acc):.3f} ({100 * min(least_kept[variant, s]):.1f}%)")
            rows.append([model_name, f"{dense:.3f}", variant[0], variant[1], *cells])
        print(f"{model_name}: {args.seeds} seed(s), {args.epochs} epochs, {seconds:.0f} s of training", flush=True)

    header = ["model", "dense", "allocation", "BatchNorm statistics", *(f"{s:g}" for s in sparsities)]
    print()
    print(f"digits, one-shot magnitude, no fine-tune; test accuracy (smallest fraction kept by any layer); floor MIN_KEEP = {MIN_KEEP:g}")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
