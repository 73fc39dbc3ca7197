"""``judge_steps``: bingo's blend candidates judged after a few masked training steps (for runs that fine-tune)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import bingo
from bingo.errors import ConfigError


def test_each_candidate_is_judged_after_its_own_training_steps_and_they_are_charged():
    from bingo.bench.data import load_dataset
    from bingo.bench.strategies import BINGO, Experiment, get_strategy
    from bingo.bench.strategies.oneshot import EVALUATION_BATCH
    from bingo.bench.training import TrainConfig, evaluate

    experiment = Experiment(load_dataset("digits"), "mlp", TrainConfig(epochs=1), 0, progress=False)
    strategy = get_strategy("bingo", dataclasses.replace(BINGO, judge_steps=3))
    outcome = next(iter(strategy.run(experiment, [0.9])))

    dense, _ = strategy.trained(experiment)
    significance, data = dense.search.significance(), experiment.data
    samples = bingo.suggested_calibration_samples(dense.model, experiment.calibration(1), minimum=1024)
    judged, passes = {}, 0
    for weight in sorted(bingo.BLEND_WEIGHTS, reverse=True):
        candidate = copy.deepcopy(dense.model)
        bingo.prune(candidate, bingo.bingo_scores(significance, candidate, weight), 0.9, seed=0)
        fitted = bingo.compensate(candidate, None, experiment.calibration(samples), reference=dense.model)
        trial = copy.deepcopy(candidate)
        trained = experiment.train(trial, steps=3)
        judged[weight] = (evaluate(trial, data.x_val, data.y_val, batch_size=EVALUATION_BATCH), candidate)
        passes += fitted.forward_passes + trained.forward_passes + -(-len(data.x_val) // EVALUATION_BATCH)
    best = max(judged, key=lambda w: (judged[w][0], w))  # ties to the larger weight
    assert outcome.magnitude_weight == best
    # the delivered network is the compensated candidate itself, not the copy trained to judge it
    for (name, p), (_, q) in zip(outcome.model.state_dict().items(), judged[best][1].state_dict().items()):
        assert torch.equal(p, q), name
    assert outcome.train_steps == dense.cost.steps + 3 * len(bingo.BLEND_WEIGHTS)
    assert outcome.forward_passes == dense.cost.forward_passes + passes


def test_judge_steps_is_checked_and_recorded_only_when_set():
    from bingo.bench.configs import config_record
    from bingo.bench.strategies import BINGO

    assert "judge_steps" not in config_record(BINGO)  # earlier records resume unchanged
    assert config_record(dataclasses.replace(BINGO, judge_steps=4))["judge_steps"] == 4
    assert config_record(BINGO)["search"] == config_record(BINGO.search)  # nested configs still recorded as before
    with pytest.raises(ConfigError, match=r"^judge steps apply where the blend is chosen on validation \(magnitude_weight none\), "
                       r"not with magnitude_weight=0\.5$"):
        dataclasses.replace(BINGO, judge_steps=2, magnitude_weight=0.5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=r"judge steps must be a whole number >= 0, got|must be"):
            dataclasses.replace(BINGO, judge_steps=bad)


def test_cli_bingo_judge_steps(tmp_path, capsys):
    from conftest import call

    out = tmp_path / "compare"
    code, _, err = call(capsys, "compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--seeds", "1",
                        "--sparsities", "0.9", "--methods", "bingo", "--bingo-judge-steps", "2", "--no-progress", "--out", str(out))
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["method_configs"]["bingo"]["judge_steps"] == 2
    [run] = results["runs"]
    assert run["train_steps"] == results["dense"][0]["train_steps"] + 2 * len(bingo.BLEND_WEIGHTS)
