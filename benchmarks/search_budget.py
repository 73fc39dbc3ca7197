"""What a cheaper search costs in accuracy: the Taylor average from every k-th step, fewer fake passes (issue 19, 21).

    python benchmarks/search_budget.py     # ~15 minutes; writes benchmarks/results/search_budget.md

The default search's overhead on an MLP is the per-step Taylor update and the
fake passes (``benchmarks/search_overhead.py``). Two knobs make it cheaper:
``taylor_every=k`` (the Taylor average takes every k-th step's gradients;
its decay per update either compounded, ``0.99 ** k``, to span the same
steps as k = 1, or kept at 0.99 to hold as many samples) and the fake-pass
budget (``every`` = ``auto_every`` for a budget of 5% or 2.5% of training
compute). One training run per task and seed carries every variant's search
at once (the search never perturbs training, so all see the same run); each
is pruned one-shot with bingo's blended score and compensated exactly as the
``bingo`` method does, and evaluated on the test split. No retraining. Five
tasks, three of them generated (``bingo.bench.generated``), so a default is
chosen on more than one dataset.
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
from bingo.estimators.fake_pass import auto_every  # noqa: E402
from bingo.estimators.hybrid import HybridEstimator  # noqa: E402
from bingo.io import atomic_write  # noqa: E402
from bingo.scoring import MAGNITUDE_WEIGHT, bingo_scores  # noqa: E402

OUT = ROOT / "benchmarks/results/search_budget"
REPORT = ROOT / "benchmarks/results/search_budget.md"
#: (name, Taylor update every k-th step, the decay per update, fake-pass budget as a share of training compute);
#: ``0.99 ** k`` per update spans the same steps as k = 1, 0.99 per update holds as many samples
VARIANTS = (
    ("k=1, probes 5%", 1, 0.99, 0.05),
    ("k=4, probes 5%", 4, 0.99**4, 0.05),
    ("k=8, probes 5%", 8, 0.99**8, 0.05),
    ("k=4, decay 0.99 per update, probes 5%", 4, 0.99, 0.05),
    ("k=8, decay 0.99 per update, probes 5%", 8, 0.99, 0.05),
    ("k=4, probes 2.5%", 4, 0.99**4, 0.025),
)
#: bingo's preset (``bingo.BINGO_SEARCH``: ``taylor_every=4``, ``decay=0.99``, ``every=None``)
DEFAULT = "k=4, decay 0.99 per update, probes 5%"
SEEDS = (0, 1, 2)
SPARSITIES = (0.8, 0.9, 0.95)
#: (data, model, recipe): the repo's LeNet benchmark recipe, digits, and a task with little redundancy
TASKS = (
    ("fashion-mnist", "lenet300", TrainConfig(epochs=3, batch_size=128, lr=1.2e-3, optimizer="adam")),
    ("digits", "mlp", TrainConfig(epochs=10, batch_size=64, lr=3e-3, optimizer="adam")),
    ("teacher-student", "mlp", TrainConfig(epochs=20, batch_size=128, lr=1.2e-3, optimizer="adam")),
    ("tokens", "transformer", TrainConfig(epochs=10, batch_size=128, lr=3e-3, optimizer="adam")),
    ("signals", "conv1d", TrainConfig(epochs=10, batch_size=128, lr=1.2e-3, optimizer="adam")),
)


def trained(data_name: str, model_name: str, recipe: TrainConfig, seed: int, make_searches):
    """One training run of a task and seed carrying ``make_searches(model)``'s searches (a dict or one search).

    Returns ``(experiment, model, searches, calibration inputs)``: the
    calibration set as the ``bingo`` method sizes it.
    """
    torch.set_num_threads(1)
    recipe = dataclasses.replace(recipe, seed=seed)
    experiment = Experiment(load_dataset(data_name, seed=seed), model_name, recipe, seed, progress=False)
    model = experiment.new_model()
    searches = make_searches(model)
    train(model, experiment.data, recipe, search=list(searches.values()) if isinstance(searches, dict) else searches, progress=False)
    calibration = experiment.calibration(suggested_calibration_samples(model, experiment.calibration(1), minimum=1024))
    return experiment, model, searches, calibration


def measure(data_name: str, model_name: str, recipe: TrainConfig, seed: int) -> dict:
    path = OUT / f"{data_name}-{model_name}-seed-{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    def make_searches(model):
        layers = len(bingo.TicketSearch(model, config=BINGO.search).layers)
        return {name: bingo.TicketSearch(model, config=dataclasses.replace(
                    BINGO.search, estimator=HybridEstimator(decay=decay, update_every=k), every=auto_every(layers, budget)), seed=seed)
                for name, k, decay, budget in VARIANTS}

    experiment, model, searches, calibration = trained(data_name, model_name, recipe, seed, make_searches)
    rows = []
    for name, search in searches.items():
        scores = bingo_scores(search.significance(), model, MAGNITUDE_WEIGHT, granularity="weight")
        for sparsity in SPARSITIES:
            pruned = copy.deepcopy(model)
            masks = bingo.prune(pruned, scores, sparsity, seed=seed)
            bingo.compensate(pruned, masks, calibration, reference=model)
            rows.append({"variant": name, "every": search.every, "sparsity": sparsity, "accuracy": experiment.evaluate(pruned)})
            print(f"{data_name} seed {seed} {name} {sparsity:g}: {rows[-1]['accuracy']:.4f}", file=sys.stderr)
    record = {"data": data_name, "model": model_name, "seed": seed, "dense": experiment.evaluate(model), "rows": rows}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def main() -> str:
    sections = []
    for data_name, model_name, recipe in TASKS:
        records = [measure(data_name, model_name, recipe, seed) for seed in SEEDS]
        dense = statistics.mean(r["dense"] for r in records)
        lines = ["| search (Taylor every k-th step, fake-pass budget) | every | " + " | ".join(f"{s:g}" for s in SPARSITIES) + " |",
                 "|:---|---:|" + "---:|" * len(SPARSITIES)]
        for name, *_ in VARIANTS:
            cells = []
            for s in SPARSITIES:
                values = [row["accuracy"] for r in records for row in r["rows"] if row["variant"] == name and row["sparsity"] == s]
                cells.append(f"{statistics.mean(values):.3f}")
            every = next(row["every"] for row in records[0]["rows"] if row["variant"] == name)
            default = " (default)" if name == DEFAULT else ""
            lines.append(f"| {name}{default} | {every} | " + " | ".join(cells) + " |")
        sections.append(f"## {data_name} / {model_name}: {recipe.epochs} epochs, seeds {', '.join(map(str, SEEDS))}; dense {dense:.3f}\n\n"
                        + "\n".join(lines))
    text = ("# A cheaper search: accuracy after a compensated one-shot prune\n\n"
            "`python benchmarks/search_budget.py`: one training run per task and seed carries every variant's search "
            "together (identical training); test accuracy, mean over seeds, no retraining.\n\n" + "\n\n".join(sections) + "\n")
    atomic_write(REPORT, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
