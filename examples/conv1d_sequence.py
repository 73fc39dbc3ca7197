"""BINGO on a ``nn.Conv1d`` sequence classifier: search while training, prune, compensate, shrink.

    python examples/conv1d_sequence.py                 # about 10 s on 2 CPU cores

The task is synthetic and learnable: each sample is a 4-channel sequence of
64 steps of Gaussian noise with one of 4 fixed motifs (6 steps long) added
at a random position; the class is the motif. The classifier is
``Conv1d -> ReLU -> Conv1d -> ReLU -> global max pool -> Linear``.

It trains with two ticket searches attached (``bingo``'s hybrid search
scoring single weights, and the same at neuron granularity, scoring whole
filters), then:

- prunes copies to 50% and 80% of the scored weights, re-fits the survivors
  (``bingo.compensate``) and reports held-out accuracy dense / pruned /
  compensated, with what compensation re-fitted and what it skipped;
- removes half of the hidden filters (neuron granularity: the output layer's
  units are the classes and stay), compensates, and rebuilds the network
  without them (``bingo.shrink``): fewer parameters, the same outputs.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bingo

CHANNELS, LENGTH, CLASSES, MOTIF = 4, 64, 4, 6
SPARSITIES = (0.5, 0.8)


def motif_data(n: int, seed: int, noise: float = 1.0, strength: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``(n, CHANNELS, LENGTH)`` and their classes: noise plus the class's motif at a random place.

    The motifs are the same for every ``seed`` (drawn from seed 1234); the
    noise, the classes and the positions follow ``seed``.
    """
    motifs = torch.randn(CLASSES, CHANNELS, MOTIF, generator=torch.Generator().manual_seed(1234)).sign()
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=generator)
    x = noise * torch.randn(n, CHANNELS, LENGTH, generator=generator)
    start = torch.randint(LENGTH - MOTIF + 1, (n,), generator=generator)
    positions = start[:, None] + torch.arange(MOTIF)  # (n, MOTIF)
    x.scatter_add_(2, positions[:, None, :].expand(n, CHANNELS, MOTIF), strength * motifs[y])
    return x, y


class MotifNet(nn.Module):
    """``Conv1d -> ReLU -> Conv1d -> ReLU -> max over time -> Linear``, input ``(N, channels, length)``."""

    def __init__(self, width: int = 16, kernel: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(CHANNELS, width, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv1d(width, width, kernel, padding=kernel // 2)
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(self.pool(x).flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, lr: float, seed: int) -> tuple[dict, float]:
    """Adam on random batches with two searches attached: single weights and whole filters."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    searches = {
        "weight": bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=seed),
        "neuron": bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=seed, granularity="neuron"),
    }
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(len(x), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for search in searches.values():  # after optimizer.step(), before the next zero_grad()
            search.step(x[rows], y[rows])
    return searches, time.perf_counter() - start


def run(steps: int = 400, seed: int = 0, width: int = 16, batch_size: int = 64, lr: float = 3e-3, train_samples: int = 4096,
        held_out_samples: int = 1024, calibration_samples: int = 512, sparsities: tuple[float, ...] = SPARSITIES) -> dict:
    """Train, search, prune, compensate and shrink one classifier; everything the example prints, as a dict."""
    x_train, y_train = motif_data(train_samples, seed=seed + 1)
    x_test, y_test = motif_data(held_out_samples, seed=seed + 2)
    torch.manual_seed(seed)
    model = MotifNet(width)
    searches, train_seconds = train(model, x_train, y_train, steps, batch_size, lr, seed)
    calibration = x_train[:calibration_samples]
    scores = bingo.bingo_scores(searches["weight"], model)
    results = []
    for sparsity in sparsities:
        pruned = copy.deepcopy(model)
        masks = bingo.prune(pruned, scores, sparsity=sparsity)
        before = accuracy(pruned, x_test, y_test)
        result = bingo.compensate(pruned, masks, calibration)
        results.append({"sparsity": sparsity, "pruned": before, "compensated": accuracy(pruned, x_test, y_test),
                        "layers": list(result.layers), "skipped": list(result.skipped), "unchanged": list(result.unchanged),
                        "calibration_forwards": result.forward_passes})

    # Whole filters: half of the hidden units go (the head's units are the classes), then the network is rebuilt smaller.
    unit_scores = bingo.bingo_scores(searches["neuron"], model)
    masked = copy.deepcopy(model)
    masks = bingo.prune(masked, unit_scores, sparsity=0.5, scope="layer")  # half of every hidden layer
    neuron_pruned = accuracy(masked, x_test, y_test)
    result = bingo.compensate(masked, masks, calibration)
    shrunk = bingo.shrink(masked, (CHANNELS, LENGTH))  # one sample's shape
    with torch.no_grad():
        masked.eval(), shrunk.eval()
        difference = float((shrunk(x_test) - masked(x_test)).abs().max())
    neuron = {"units": {key: [int(m.sum()), m.numel()] for key, m in masks.items()}, "pruned": neuron_pruned,
              "compensated": accuracy(masked, x_test, y_test), "shrunk": accuracy(shrunk, x_test, y_test),
              "layers": list(result.layers), "skipped": list(result.skipped), "unchanged": list(result.unchanged),
              "parameters": [bingo.count_parameters(model), bingo.count_parameters(shrunk)], "max_difference": difference}
    return {
        "settings": {"steps": steps, "seed": seed, "width": width, "batch_size": batch_size, "lr": lr,
                     "train_samples": train_samples, "held_out_samples": held_out_samples, "calibration_samples": calibration_samples},
        "coverage": str(searches["weight"].coverage()),
        "scored": list(searches["weight"].layers),
        "train_steps": searches["weight"].steps,
        "train_seconds": train_seconds,
        "dense": accuracy(model, x_test, y_test),
        "results": results,
        "neuron": neuron,
    }


def report(summary: dict) -> str:
    n = summary["neuron"]
    lines = [f"{summary['train_steps']} training steps in {summary['train_seconds']:.1f} s (two searches attached)",
             summary["coverage"],
             f"held-out accuracy: dense {summary['dense']:.3f}",
             "sparsity  pruned  compensated  re-fitted  skipped"]
    for r in summary["results"]:
        lines.append(f"{r['sparsity']:8.2f}  {r['pruned']:6.3f}  {r['compensated']:11.3f}  {len(r['layers']):9d}  {len(r['skipped']):7d}")
    for r in summary["results"]:
        lines.append(f"at {r['sparsity']:.0%}: re-fitted {', '.join(r['layers']) or 'nothing'}; skipped {'; '.join(r['skipped']) or 'nothing'}")
    units = ", ".join(f"{key} {kept}/{total}" for key, (kept, total) in n["units"].items())
    lines.append(f"half of the hidden filters removed (kept {units}): pruned {n['pruned']:.3f}, compensated {n['compensated']:.3f}, "
                 f"shrunk {n['shrunk']:.3f} with {n['parameters'][1]:,} of {n['parameters'][0]:,} parameters "
                 f"(outputs within {n['max_difference']:.1e} of the masked model's)")
    lines.append(f"accuracy dense {summary['dense']:.3f}; " + "; ".join(
        f"{r['sparsity']:.0%} pruned {r['pruned']:.3f}, compensated {r['compensated']:.3f}" for r in summary["results"])
        + f"; filters halved and shrunk {n['shrunk']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=16, help="filters per Conv1d (default 16)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    summary = run(steps=args.steps, seed=args.seed, width=args.width)
    print(report(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
