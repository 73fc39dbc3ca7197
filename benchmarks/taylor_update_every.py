"""Does updating the Taylor average on every k-th step only cost accuracy? (issue 19's overhead, issue 21's rule: several tasks)

    python benchmarks/taylor_update_every.py     # a few minutes; writes benchmarks/results/taylor_update_every.md

The per-step Taylor update is most of the default search's overhead on an
MLP (``benchmarks/search_overhead.py``). ``HybridEstimator(update_every=k)``
averages the gradients of every k-th step only, with the decay compounded so
the average spans the same steps. Here one training run per task and seed
carries three searches at once (k = 1, the default, 2 and 4: the search
never perturbs training, so all three see the same run); each is pruned
one-shot with bingo's blended score and compensated exactly as the ``bingo``
method does, and evaluated on the test split. No retraining.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import bingo  # noqa: E402
from bingo.bench.data import load_dataset  # noqa: E402
from bingo.bench.strategies import Experiment  # noqa: E402
from bingo.bench.strategies.oneshot import BINGO  # noqa: E402
from bingo.bench.training import TrainConfig, train  # noqa: E402
from bingo.compensation import suggested_calibration_samples  # noqa: E402
from bingo.estimators.hybrid import HybridEstimator  # noqa: E402
from bingo.io import atomic_write  # noqa: E402
from bingo.scoring import MAGNITUDE_WEIGHT, bingo_scores  # noqa: E402

OUT = ROOT / "benchmarks/results/taylor_update_every"
REPORT = ROOT / "benchmarks/results/taylor_update_every.md"
KS = (1, 2, 4)
SEEDS = (0, 1)
SPARSITIES = (0.8, 0.9, 0.95)
#: (data, model, recipe): the repo's LeNet benchmark recipe, digits, and a task with little redundancy
TASKS = (
    ("fashion-mnist", "lenet300", TrainConfig(epochs=3, batch_size=128, lr=1.2e-3, optimizer="adam")),
    ("digits", "mlp", TrainConfig(epochs=10, batch_size=64, lr=3e-3, optimizer="adam")),
    ("teacher-student", "mlp", TrainConfig(epochs=20, batch_size=128, lr=1.2e-3, optimizer="adam")),
)


def measure(data_name: str, model_name: str, recipe: TrainConfig, seed: int) -> dict:
    path = OUT / f"{data_name}-{model_name}-seed-{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    recipe = dataclasses.replace(recipe, seed=seed)
    experiment = Experiment(load_dataset(data_name, seed=seed), model_name, recipe, seed, progress=False)
    model = experiment.new_model()
    searches = {k: bingo.TicketSearch(model, config=dataclasses.replace(BINGO.search, estimator=HybridEstimator(update_every=k)), seed=seed)
                for k in KS}
    train(model, experiment.data, recipe, search=list(searches.values()), progress=False)
    samples = suggested_calibration_samples(model, experiment.calibration(1), minimum=1024)
    calibration = experiment.calibration(samples)
    rows = []
    for k, search in searches.items():
        scores = bingo_scores(search.significance(), model, MAGNITUDE_WEIGHT, granularity="weight")
        for sparsity in SPARSITIES:
            pruned = copy.deepcopy(model)
            masks = bingo.prune(pruned, scores, sparsity, seed=seed)
            bingo.compensate(pruned, masks, calibration, reference=model)
            rows.append({"k": k, "sparsity": sparsity, "accuracy": experiment.evaluate(pruned)})
            print(f"{data_name} seed {seed} k={k} {sparsity:g}: {rows[-1]['accuracy']:.4f}", file=sys.stderr)
    record = {"data": data_name, "model": model_name, "seed": seed, "dense": experiment.evaluate(model), "rows": rows}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def main() -> str:
    sections = []
    for data_name, model_name, recipe in TASKS:
        records = [measure(data_name, model_name, recipe, seed) for seed in SEEDS]
        dense = statistics.mean(r["dense"] for r in records)
        lines = ["| k (Taylor update every k-th step) | " + " | ".join(f"{s:g}" for s in SPARSITIES) + " |",
                 "|:---|" + "---:|" * len(SPARSITIES)]
        for k in KS:
            cells = []
            for s in SPARSITIES:
                values = [row["accuracy"] for r in records for row in r["rows"] if row["k"] == k and row["sparsity"] == s]
                cells.append(f"{statistics.mean(values):.3f}")
            lines.append(f"| {k}{' (default)' if k == 1 else ''} | " + " | ".join(cells) + " |")
        sections.append(f"## {data_name} / {model_name}: {recipe.epochs} epochs, seeds {', '.join(map(str, SEEDS))}; dense {dense:.3f}\n\n"
                        + "\n".join(lines))
    text = ("# Taylor average from every k-th step: accuracy after a compensated one-shot prune\n\n"
            "`python benchmarks/taylor_update_every.py`: one training run per task and seed carries the k = 1, 2, 4 searches "
            "together (identical training); test accuracy, mean over seeds, no retraining.\n\n" + "\n\n".join(sections) + "\n")
    atomic_write(REPORT, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
