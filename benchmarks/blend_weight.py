"""The blend of the search's significance with magnitude, over five tasks: which weight, and can held-out data choose it? (issue 21)

    python benchmarks/blend_weight.py     # ~15 minutes; writes benchmarks/results/blend_weight.md

bingo prunes by ``combine_ranks([significance, magnitude], [1 - m, m])``
(:func:`bingo.bingo_scores`) with ``m = MAGNITUDE_WEIGHT`` = 0.5, a value
first chosen on Fashion-MNIST. Here one training run per task and seed (with
bingo's default search) is pruned one-shot and compensated, exactly as the
``bingo`` method does, at every ``m`` in ``WEIGHTS``: ``m = 1`` is
compensated magnitude, ``m = 0`` the significance alone. Beside the fixed
weights, a rule: ``m`` chosen per sparsity by the accuracy on the
validation split (carved from the training data; the test split is not
seen), ties to the larger ``m``. Test accuracy, mean over seeds, no
retraining. The tasks: Fashion-MNIST LeNet-300-100, digits, and the three
generated tasks (``bingo.bench.generated``).
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import bingo  # noqa: E402
from bingo.bench.strategies.oneshot import BINGO  # noqa: E402
from bingo.bench.training import TrainConfig, evaluate  # noqa: E402
from bingo.io import atomic_write  # noqa: E402
from bingo.scoring import MAGNITUDE_WEIGHT, bingo_scores  # noqa: E402
from search_budget import TASKS, trained  # noqa: E402  (the same five tasks and recipes)

OUT = ROOT / "benchmarks/results/blend_weight"
REPORT = ROOT / "benchmarks/results/blend_weight.md"
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1, 2)
SPARSITIES = (0.8, 0.9, 0.95)
def measure(data_name: str, model_name: str, recipe: TrainConfig, seed: int) -> dict:
    """Test and validation accuracy at every blend weight and sparsity, for one training run (cached as JSON)."""
    path = OUT / f"{data_name}-{model_name}-seed-{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    experiment, model, search, calibration = trained(
        data_name, model_name, recipe, seed, lambda net: bingo.TicketSearch(net, config=BINGO.search, seed=seed))
    significance = search.significance()
    rows = []
    for weight in WEIGHTS:
        scores = bingo_scores(significance, model, weight, granularity="weight")
        for sparsity in SPARSITIES:
            pruned = copy.deepcopy(model)
            masks = bingo.prune(pruned, scores, sparsity, seed=seed)
            bingo.compensate(pruned, masks, calibration, reference=model)
            rows.append({"weight": weight, "sparsity": sparsity, "test": experiment.evaluate(pruned),
                         "validation": evaluate(pruned, experiment.data.x_val, experiment.data.y_val)})
            print(f"{data_name} seed {seed} m={weight:g} {sparsity:g}: {rows[-1]['test']:.4f}", file=sys.stderr)
    record = {"data": data_name, "model": model_name, "seed": seed, "dense": experiment.evaluate(model), "rows": rows}
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1)))
    return record


def chosen_by_validation(record: dict, sparsity: float) -> dict:
    """The row whose blend weight has the best validation accuracy at ``sparsity`` (ties: the larger weight)."""
    rows = [row for row in record["rows"] if row["sparsity"] == sparsity]
    return max(rows, key=lambda row: (row["validation"], row["weight"]))


def main() -> str:
    sections, margins = [], {weight: [] for weight in (*WEIGHTS, "validation")}
    for data_name, model_name, recipe in TASKS:
        records = [measure(data_name, model_name, recipe, seed) for seed in SEEDS]
        dense = statistics.mean(r["dense"] for r in records)
        lines = ["| magnitude weight m | " + " | ".join(f"{s:g}" for s in SPARSITIES) + " |", "|:---|" + "---:|" * len(SPARSITIES)]

        def test(weight, sparsity):
            return statistics.mean(row["test"] for r in records for row in r["rows"] if row["weight"] == weight and row["sparsity"] == sparsity)

        for weight in WEIGHTS:
            label = {0.0: "0 (significance alone)", 1.0: "1 (= compensated magnitude)", MAGNITUDE_WEIGHT: f"{weight:g} (default)"}.get(weight, f"{weight:g}")
            lines.append(f"| {label} | " + " | ".join(f"{test(weight, s):.3f}" for s in SPARSITIES) + " |")
            for s in SPARSITIES:
                margins[weight].append(test(weight, s) - test(1.0, s))
        cells = []
        for s in SPARSITIES:
            picks = [chosen_by_validation(r, s) for r in records]
            value = statistics.mean(p["test"] for p in picks)
            margins["validation"].append(value - test(1.0, s))
            chosen = ", ".join(f"{p['weight']:g}" for p in picks)
            cells.append(f"{value:.3f} (m = {chosen})")
        lines.append("| chosen by validation accuracy | " + " | ".join(cells) + " |")
        sections.append(f"## {data_name} / {model_name}: {recipe.epochs} epochs, seeds {', '.join(map(str, SEEDS))}; dense {dense:.3f}\n\n"
                        + "\n".join(lines))
    summary = ["| m | mean margin over compensated magnitude (points) | worst margin | cells ≥ compensated magnitude |", "|:---|---:|---:|---:|"]
    for weight, values in margins.items():
        label = "chosen by validation" if weight == "validation" else f"{weight:g}"
        summary.append(f"| {label} | {100 * statistics.mean(values):+.2f} | {100 * min(values):+.2f} | "
                       f"{sum(v >= -1e-9 for v in values)} of {len(values)} |")
    text = ("# The magnitude blend weight over five tasks, and a rule that picks it on held-out data\n\n"
            "`python benchmarks/blend_weight.py`: one training run per task and seed with bingo's default search, pruned "
            "one-shot and compensated at every blend weight; test accuracy, mean over seeds, no retraining. The validation "
            "rule sees only the validation split.\n\n"
            "Over all tasks and sparsities (80, 90, 95%), against compensated magnitude (m = 1):\n\n" + "\n".join(summary)
            + "\n\n" + "\n\n".join(sections) + "\n")
    atomic_write(REPORT, lambda tmp: Path(tmp).write_text(text))
    return text


if __name__ == "__main__":
    print(main())
