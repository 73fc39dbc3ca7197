"""The cubic sparsity schedule and its scheduler: by hand, invariants, resuming, GMP pinned, bingo-gradual end to end."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

import bingo
from bingo import SparsityScheduler, gmp_sparsity, load_pruned_state_dict, magnitude_scores
from bingo.bench.data import load_dataset
from bingo.errors import CheckpointError, ConfigError
from bingo.schedule import is_update_step
from bingo.selection import prune_count
from bingo.bench.strategies import (
    BINGO,
    STRATEGIES,
    BingoConfig,
    Experiment,
    GmpConfig,
    GradualBingoConfig,
    ScheduleConfig,
    get_strategy,
)
from bingo.bench.strategies import gmp as gmp_module
from bingo.bench.training import TrainConfig
from conftest import make_mlp, tiny_data


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _pruned(masks: dict[str, torch.Tensor]) -> int:
    return sum(int((~mask).sum()) for mask in masks.values())


def _model_pruned(model) -> int:
    return sum(int((~m.weight_mask.bool()).sum()) for m in model.modules() if hasattr(m, "weight_mask"))


def _digest(masks: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(masks):
        h.update(key.encode())
        h.update(masks[key].to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# --- the pure schedule --------------------------------------------------------------------------


def test_cubic_schedule_at_every_step_by_hand():
    # s_f = 0.9, s_i = 0.1, t0 = 2, end = 8, Δt = 2: updates at 2, 4, 6, 8;
    # s_4 = 0.9 − 0.8 (1 − 2/6)³ = 0.9 − 0.8 · 8/27, s_6 = 0.9 − 0.8 · 1/27.
    s4, s6 = 0.9 - 0.8 * 8 / 27, 0.9 - 0.8 / 27
    expected = [0.1, 0.1, 0.1, 0.1, s4, s4, s6, s6, 0.9, 0.9, 0.9]
    assert [gmp_sparsity(t, 0.9, 0.1, 2, 8, 2) for t in range(11)] == pytest.approx(expected, abs=1e-15)
    assert [t for t in range(11) if is_update_step(t, 2, 8, 2)] == [2, 4, 6, 8]
    # Off the grid (end 7, Δt 2): the end step is an update too, and lands exactly on s_f.
    s4, s6 = 0.9 - 0.8 * (1 - 2 / 5) ** 3, 0.9 - 0.8 * (1 - 4 / 5) ** 3
    expected = [0.1, 0.1, 0.1, 0.1, s4, s4, s6, 0.9, 0.9]
    assert [gmp_sparsity(t, 0.9, 0.1, 2, 7, 2) for t in range(9)] == pytest.approx(expected, abs=1e-15)
    assert [t for t in range(9) if is_update_step(t, 2, 7, 2)] == [2, 4, 6, 7]
    assert gmp_sparsity(7, 0.9, 0.1, 2, 7, 2) == 0.9
    # The schedule is re-exported where it used to live.
    assert gmp_module.gmp_sparsity is gmp_sparsity is bingo.schedule.gmp_sparsity


def test_cubic_schedule_refuses_bad_steps():
    with pytest.raises(ConfigError, match=r"^the sparsity schedule needs 0 <= start step <= end step, got 30 and 20$"):
        gmp_sparsity(5, 0.5, 0.0, 30, 20, 5)
    with pytest.raises(ConfigError, match=r"^the sparsity schedule's frequency must be a whole number of steps >= 1, got 0$"):
        is_update_step(5, 0, 20, 0)


# --- the scheduler ------------------------------------------------------------------------------


def test_scheduler_prunes_exactly_round_st_n_at_each_update_and_never_unprunes():
    model = make_mlp()
    n = sum(p.numel() for p in magnitude_scores(model).values())
    generator = torch.Generator().manual_seed(0)
    calls = []

    def scores():
        # Fresh random scores every time: they would revive pruned weights if masks could shrink.
        calls.append(scheduler.last_step)
        return {key: torch.rand(w.shape, generator=generator) for key, w in magnitude_scores(model).items()}

    scheduler = SparsityScheduler(model, scores, 0.8, initial_sparsity=0.2, start_step=3, end_step=14, frequency=4)
    assert scheduler.last_step == 0 and scheduler.last_sparsity == 0.0 and calls == []
    like = magnitude_scores(model)
    before = bingo.current_masks(model, like)
    for step in range(1, 21):
        masks = scheduler.step()
        assert scheduler.last_step == step
        if step in (3, 7, 11, 14):
            expected = scheduler.sparsity_at(step)
            assert masks is not None and _pruned(masks) == prune_count(expected, n) == _model_pruned(model), step
            assert scheduler.last_sparsity == expected
        else:
            assert masks is None
        pruned = prune_count(scheduler.sparsity_at(step), n) if step >= 3 else 0
        assert _model_pruned(model) == pruned, step
        now = bingo.current_masks(model, like)
        assert all(not (now[key] & ~before[key]).any() for key in like), step  # nothing pruned comes back
        before = now
    assert calls == [3, 7, 11, 14]  # scored only at the update steps
    assert _model_pruned(model) == prune_count(0.8, n) and scheduler.last_sparsity == 0.8
    assert scheduler.finish() is not None and calls[-1] == 20 and _model_pruned(model) == prune_count(0.8, n)


def test_scheduler_prunes_at_construction_when_the_schedule_starts_at_zero():
    model = make_mlp()
    n = sum(p.numel() for p in magnitude_scores(model).values())
    scheduler = SparsityScheduler(model, lambda: magnitude_scores(model), 0.5, initial_sparsity=0.25, end_step=4, frequency=2)
    assert _model_pruned(model) == prune_count(0.25, n) and scheduler.last_sparsity == 0.25
    # Training stopped before the end step: finish() brings it to the final sparsity.
    scheduler.step()
    masks = scheduler.finish()
    assert all(torch.equal(mask, bingo.current_masks(model, masks)[key]) for key, mask in masks.items())
    assert _model_pruned(model) == prune_count(0.5, n) and scheduler.last_sparsity == 0.5


def _train(model, optimizer, scheduler, data, steps: range) -> None:
    x_all, y_all = data
    for step in steps:
        x, y = x_all[step % 4 :: 4], y_all[step % 4 :: 4]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _setup():
    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = SparsityScheduler(model, lambda: magnitude_scores(model), 0.7, start_step=2, end_step=16, frequency=3, seed=4)
    return model, optimizer, scheduler


def test_state_dict_round_trip_resumes_identically():
    data = tiny_data((64, 16), 4)
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, data, range(24))

    interrupted, opt, sched = _setup()
    _train(interrupted, opt, sched, data, range(9))
    saved = copy.deepcopy({"model": interrupted.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    json.dumps(saved["scheduler"])  # plain data
    assert saved["scheduler"]["last_step"] == 9

    resumed, opt, sched = _setup()  # the usual order: build everything, then load
    load_pruned_state_dict(resumed, saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    assert (sched.last_step, sched.last_sparsity) == (9, scheduler.sparsity_at(9))
    _train(resumed, opt, sched, data, range(9, 24))

    assert sched.state_dict() == scheduler.state_dict()
    reference = model.state_dict()
    assert resumed.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in resumed.state_dict().items())


def test_load_state_dict_refuses_other_settings_or_no_state():
    _, _, scheduler = _setup()
    other = SparsityScheduler(make_mlp(), dict, 0.8, start_step=2, end_step=16, frequency=3, seed=4)
    with pytest.raises(CheckpointError, match=r"^scheduler state was saved with different settings: final_sparsity=0.8 \(now 0.7\)$"):
        scheduler.load_state_dict(other.state_dict())
    with pytest.raises(CheckpointError, match=r"not a SparsityScheduler state dict \(missing or bad 'last_step'\)"):
        scheduler.load_state_dict({})
    assert scheduler.last_step == 0


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"scores": {}}, r"^scores must be a callable returning \{weight key: tensor\}, got dict$"),
        ({"final_sparsity": 1.0}, r"^sparsity must be in \[0, 1\), got 1.0$"),
        ({"initial_sparsity": 0.9}, r"^final sparsity 0.5 is below the initial sparsity 0.9$"),
        ({"start_step": 5, "end_step": 3}, r"^the sparsity schedule needs 0 <= start step <= end step, got 5 and 3$"),
        ({"frequency": 1.5}, r"^the sparsity schedule's frequency must be a whole number of steps >= 1, got 1.5$"),
        ({"scope": "row"}, r"^unknown scope 'row'; valid choices: global, layer"),
    ],
)
def test_scheduler_refuses_bad_arguments(settings, message):
    model = make_mlp()
    arguments = {"scores": lambda: magnitude_scores(model), "final_sparsity": 0.5, "end_step": 10} | settings
    with pytest.raises(ConfigError, match=message):
        SparsityScheduler(model, arguments.pop("scores"), arguments.pop("final_sparsity"), **arguments)
    assert _model_pruned(model) == 0


# --- GMP on the scheduler: unchanged ------------------------------------------------------------

#: Captured from GMP before it moved onto SparsityScheduler (digits, mlp, seed 0, batch 64):
#: (recipe epochs, config, target) -> (correct of 360 test images, train_steps, forward_passes, mask digest).
GMP_PINNED = [
    (1, GmpConfig(), 0.5, (196, 21, 21, "30ea42e3106c19e9")),
    (1, GmpConfig(), 0.8, (135, 21, 21, "a18423ed203ce0f0")),
    (2, GmpConfig(initial_sparsity=0.2, start_fraction=0.2, end_fraction=0.6, frequency=7, finetune_epochs=1), 0.6, (234, 63, 63, "9be49912ff6c1182")),
    (2, GmpConfig(initial_sparsity=0.2, start_fraction=0.2, end_fraction=0.6, frequency=7, finetune_epochs=1), 0.9, (148, 63, 63, "ad48eafb865b06c2")),
    (0, GmpConfig(), 0.6, (42, 0, 0, "520d85a1366df627")),
]


@pytest.mark.parametrize(("epochs", "config", "target", "pinned"), GMP_PINNED)
def test_gmp_outcomes_are_unchanged_by_the_scheduler(digits, epochs, config, target, pinned):
    experiment = Experiment(digits, "mlp", TrainConfig(epochs=epochs, batch_size=64), seed=0, progress=False)
    (outcome,) = get_strategy("gmp", config).run(experiment, [target])
    correct = round(outcome.accuracy * len(digits.x_test))
    assert outcome.accuracy == correct / len(digits.x_test)
    assert (correct, outcome.train_steps, outcome.forward_passes, _digest(outcome.masks)) == pinned


def test_gmp_config_keeps_its_fields_and_record():
    assert [f.name for f in dataclasses.fields(GmpConfig)] == [f.name for f in dataclasses.fields(ScheduleConfig)] == [
        "initial_sparsity", "start_fraction", "end_fraction", "frequency", "finetune_epochs",
    ]
    assert isinstance(GmpConfig(), ScheduleConfig) and isinstance(GradualBingoConfig(), ScheduleConfig)
    assert GmpConfig().steps(100) == (10, 70)
    with pytest.raises(ConfigError, match=r"^GMP frequency must be a whole number of steps >= 1, got 0$"):
        GmpConfig(frequency=0)


# --- bingo-gradual ------------------------------------------------------------------------------


def test_gradual_config_defaults_to_bingo_and_checks_its_fields():
    config = GradualBingoConfig()
    # the same search and the equal blend bingo falls back to (a gradual run has no per-sparsity choice)
    assert config.search == BINGO.search and config.magnitude_weight == BINGO.fixed_magnitude_weight
    assert config.scoring == BingoConfig(search=BINGO.search, magnitude_weight=BINGO.fixed_magnitude_weight)
    assert {f.name: f.default for f in dataclasses.fields(ScheduleConfig)} == {
        f.name: getattr(config, f.name) for f in dataclasses.fields(ScheduleConfig)
    }  # the same schedule as GMP's
    assert all(f.metadata.get("help") for f in dataclasses.fields(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.frequency = 1
    with pytest.raises(ConfigError, match=r"^magnitude weight must be in \[0, 1\], got 2.0$"):
        GradualBingoConfig(magnitude_weight=2.0)
    with pytest.raises(ConfigError, match=r"^bingo-gradual frequency must be a whole number of steps >= 1, got 0$"):
        GradualBingoConfig(frequency=0)
    assert STRATEGIES["bingo-gradual"].default_config == config


def test_bingo_gradual_end_to_end(digits, monkeypatch):
    """One searched run per target, ranked by BingoConfig.final_scores at each update, exact sparsity, masks only grow."""
    experiment = Experiment(digits, "mlp", TrainConfig(epochs=1, batch_size=64), seed=3, progress=False)
    total_steps = 21
    start, end = GmpConfig().steps(total_steps)
    config = GradualBingoConfig(frequency=4)
    updates = [t for t in range(total_steps + 1) if is_update_step(t, start, end, 4)]
    scored, final_scores = [], BingoConfig.final_scores

    def spy(self, search, model):
        scored.append((search.steps, search.config.seed, self.magnitude_weight))
        return final_scores(self, search, model)

    monkeypatch.setattr(BingoConfig, "final_scores", spy)
    pruned_after: list[int] = []
    train = experiment.train

    def watching(model, *, callback=None, search=None, **kwargs):
        assert search is not None

        def watch(step):
            callback(step)
            pruned_after.append(sum(int((m.weight == 0).sum()) for m in (model.fc1, model.fc2, model.fc3)))

        return train(model, callback=watch, search=search, **kwargs)

    monkeypatch.setattr(experiment, "train", watching)
    outcomes = list(get_strategy("bingo-gradual", config).run(experiment, [0.5, 0.9]))
    n = sum(m.numel() for m in outcomes[0].masks.values())
    for outcome, target in zip(outcomes, (0.5, 0.9)):
        assert outcome.method == "bingo-gradual" and outcome.sparsity == target
        assert _pruned(outcome.masks) == prune_count(target, n)
        assert outcome.train_steps == total_steps
        assert outcome.forward_passes > total_steps  # the search's fake passes are charged
        assert outcome.model is not None and 0.0 <= outcome.accuracy <= 1.0
    # The search, seeded by the experiment, scored at each update step of each run and once at the end.
    assert scored == 2 * [(t, 3, 0.5) for t in [*updates, total_steps]]
    for run in (pruned_after[:total_steps], pruned_after[total_steps:]):
        # s_i = 0: the first update (step t0) prunes nothing, the next one (t0 + 4) does.
        assert run == sorted(run) and run[: start + 3] == [0] * (start + 3) and run[start + 3] > 0
    assert pruned_after[end - 1] == prune_count(0.5, n) and pruned_after[total_steps + end - 1] == prune_count(0.9, n)


def test_bingo_gradual_ranked_by_magnitude_alone_is_gmp(digits):
    """One scheduler, two score sources: with the search's weight at 0, bingo-gradual delivers GMP's network.

    The ranks of |w| order the weights as |w| does, and the search never perturbs training.
    """
    experiment = Experiment(digits, "mlp", TrainConfig(epochs=1, batch_size=64), seed=0, progress=False)
    (outcome,) = get_strategy("bingo-gradual", GradualBingoConfig(magnitude_weight=1.0)).run(experiment, [0.5])
    correct, steps, forwards, digest = GMP_PINNED[0][-1]
    assert (round(outcome.accuracy * len(digits.x_test)), outcome.train_steps, _digest(outcome.masks)) == (correct, steps, digest)
    assert outcome.forward_passes > forwards  # but it paid for the search's fake passes


def test_bingo_gradual_without_training_delivers_the_target(digits):
    experiment = Experiment(digits, "mlp", TrainConfig(epochs=0, batch_size=64), seed=0, progress=False)
    (outcome,) = get_strategy("bingo-gradual").run(experiment, [0.6])
    assert _pruned(outcome.masks) == prune_count(0.6, sum(m.numel() for m in outcome.masks.values()))
    assert outcome.train_steps == 0


def test_cli_compare_gmp_and_bingo_gradual(tmp_path, capsys):
    from bingo.bench.cli import main

    out = tmp_path / "cmp"
    code = main(
        ["compare", "--data", "digits", "--model", "mlp", "--epochs", "1", "--batch-size", "64",
         "--methods", "gmp,bingo-gradual", "--sparsities", "0.8", "--gmp-frequency", "5",
         "--bingo-gradual-frequency", "5", "--bingo-gradual-magnitude-weight", "0.25", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["sparsity"]) for r in results["runs"]] == [("gmp", 0.8), ("bingo-gradual", 0.8)]
    configs = results["settings"]["method_configs"]
    assert configs["gmp"] == {"initial_sparsity": 0.0, "start_fraction": 0.1, "end_fraction": 0.7, "frequency": 5, "finetune_epochs": 0}
    assert configs["bingo-gradual"]["frequency"] == 5 and configs["bingo-gradual"]["magnitude_weight"] == 0.25
    assert configs["bingo-gradual"]["search"]["estimator"] == BINGO.search.estimator
    gmp, gradual = results["runs"]
    assert gmp["train_steps"] == gradual["train_steps"] and gradual["forward_passes"] > gmp["forward_passes"]
    assert "bingo-gradual" in capsys.readouterr().out
