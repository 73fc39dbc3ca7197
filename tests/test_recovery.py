"""--recovery-steps: a short masked fine-tune after the prune and its re-fit, charged to the method (issue 21, item 2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bingo.bench.configs import config_record
from bingo.bench.data import load_dataset
from bingo.bench.strategies import CompensationConfig, Experiment, OneShotConfig, get_strategy
from bingo.bench.training import TrainConfig
from bingo.errors import ConfigError


def _outcome(steps: int):
    experiment = Experiment(load_dataset("digits"), "mlp", TrainConfig(epochs=2), 0, progress=False)
    config = dataclasses.replace(OneShotConfig(), compensation=CompensationConfig(compensate=True, recovery_steps=steps))
    strategy = get_strategy("magnitude", config)
    return experiment, strategy, next(iter(strategy.run(experiment, [0.9])))


def test_recovery_trains_exactly_n_masked_steps_and_charges_them():
    experiment, strategy, recovered = _outcome(7)  # 7 of the 11 steps of a digits epoch
    _, _, plain = _outcome(0)
    dense, _ = strategy.trained(experiment)
    assert recovered.train_steps == plain.train_steps + 7 == dense.cost.steps + 7
    assert recovered.forward_passes == plain.forward_passes + 7
    # wall seconds are not compared: two runs' times swing on a shared machine (CI saw the plain run 17x slower)
    # the masks stay on: pruned weights are still zero, and the kept ones moved
    assert recovered.masks.keys() == plain.masks.keys()
    assert all(torch.equal(recovered.masks[key], plain.masks[key]) for key in plain.masks)  # the same prune
    for key, mask in recovered.masks.items():
        module_name, _, name = key.rpartition(".")
        module = recovered.model.get_submodule(module_name)
        weight = getattr(module, name)
        assert (weight[~mask.bool()] == 0).all(), key
    moved = [not torch.equal(a, b) for a, b in zip(recovered.model.state_dict().values(), plain.model.state_dict().values())]
    assert any(moved)


def test_recovery_longer_than_an_epoch_runs_into_the_next():
    _, _, outcome = _outcome(15)
    _, _, plain = _outcome(0)
    assert outcome.train_steps == plain.train_steps + 15


def test_recovery_steps_are_recorded_only_when_given_and_checked():
    assert "recovery_steps" not in config_record(CompensationConfig())  # earlier records resume unchanged
    assert config_record(CompensationConfig(recovery_steps=50))["recovery_steps"] == 50
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="recovery"):
            CompensationConfig(recovery_steps=bad)
