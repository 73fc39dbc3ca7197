"""Compensation and BatchNorm re-estimation after a one-shot prune, on the BatchNorm models.

    python benchmarks/compensation_batchnorm.py      # a markdown table on stdout (a few minutes on 2 cores)

scikit-learn's digits, `conv` and `resnet`, 3 epochs of Adam 3e-3 (batch 64, seed 0), one-shot magnitude
pruning (scope global and lamp) at 80/90/95%, then: nothing; BatchNorm statistics re-estimated on 1,024
training images (`bingo.reestimate_batchnorm`); compensation keeping the statistics (`bingo.compensate`);
compensation then re-estimation (`batchnorm="reestimate"`). Test accuracy, no fine-tune, one seed.
"""

from __future__ import annotations

import copy

import bingo
from bingo.bench.data import load_dataset
from bingo.bench.models import build_model
from bingo.bench.training import TrainConfig, evaluate, train

VARIANTS = ("pruned", "+ BN re-estimated", "+ compensation", "+ compensation + BN re-estimated")


def main() -> str:
    data = load_dataset("digits", seed=0)
    calibration = data.x_train[:1024]
    lines = ["| model | dense | scope | sparsity | " + " | ".join(VARIANTS) + " |", "|:---|---:|:---|---:|" + "---:|" * len(VARIANTS)]
    for name in ("conv", "resnet"):
        model = build_model(name, data.input_shape, data.num_classes, seed=0)
        train(model, data, TrainConfig(epochs=3, batch_size=64, lr=3e-3, seed=0), progress=False)
        dense = evaluate(model, data.x_test, data.y_test)
        for scope in ("global", "lamp"):
            for sparsity in (0.8, 0.9, 0.95):
                cells = []
                for variant in VARIANTS:
                    pruned = copy.deepcopy(model)
                    bingo.prune(pruned, bingo.magnitude_scores(pruned), sparsity, scope)
                    if variant == "+ BN re-estimated":
                        bingo.reestimate_batchnorm(pruned, calibration)
                    elif variant.startswith("+ compensation"):
                        batchnorm = "reestimate" if variant.endswith("re-estimated") else "keep"
                        bingo.compensate(pruned, None, calibration, batchnorm=batchnorm)
                    cells.append(f"{evaluate(pruned, data.x_test, data.y_test):.3f}")
                lines.append(f"| {name} | {dense:.3f} | {scope} | {sparsity:g} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
