"""Strategies: the registry, IMP, GMP and SNIP schedules by hand, exact sparsity, costs, rewinding."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from bingo import magnitude_scores, prune
from bingo.bench.data import load_dataset
from bingo.errors import ConfigError
from bingo.selection import prune_count
from bingo.bench.strategies import (
    STRATEGIES,
    Experiment,
    GmpConfig,
    ImpConfig,
    OneShotConfig,
    SnipConfig,
    get_strategy,
    gmp_sparsity,
    imp_schedule,
    rewind,
    snip_scores,
)
from bingo.bench.strategies.imp import _layer_rounds
from bingo.bench.training import TrainConfig
from conftest import make_cnn

RECIPE = TrainConfig(epochs=1, batch_size=64)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def experiment(digits):
    return Experiment(digits, "mlp", RECIPE, seed=0, progress=False)


def _steps_per_epoch(experiment: Experiment) -> int:
    return math.ceil(len(experiment.data.x_train) / RECIPE.batch_size)


def _pruned(masks: dict[str, torch.Tensor]) -> int:
    return sum(int((~mask).sum()) for mask in masks.values())


def _total(masks: dict[str, torch.Tensor]) -> int:
    return sum(mask.numel() for mask in masks.values())


def _record_retraining(monkeypatch, experiment: Experiment) -> list[dict[str, torch.Tensor]]:
    """Wrap ``experiment.train``: the state of every already-pruned model as its training starts."""
    states, train = [], experiment.train

    def recording(model, **kwargs):
        if any(hasattr(module, "weight_mask") for module in model.modules()):
            states.append({key: value.clone() for key, value in model.state_dict().items()})
        return train(model, **kwargs)

    monkeypatch.setattr(experiment, "train", recording)
    return states


# --- registry and configs -------------------------------------------------------------------------


def test_every_method_is_registered():
    assert {"bingo", "magnitude", "random", "imp", "gmp", "snip"} <= set(STRATEGIES)
    assert list(STRATEGIES)[:4] == ["bingo", "bingo-paper", "magnitude", "random"]
    for name in ("imp", "gmp", "snip"):
        strategy = get_strategy(name)
        assert strategy.name == name
        assert strategy.config is type(strategy).default_config


def test_unknown_method_lists_the_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown method 'foo'; valid choices: bingo, bingo-paper, magnitude, random, .*imp.*"):
        get_strategy("foo")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: ImpConfig(rate=0.0), r"IMP pruning rate must be in \(0, 1\)"),
        (lambda: ImpConfig(rate=1.0), r"IMP pruning rate must be in \(0, 1\)"),
        (lambda: ImpConfig(rewind_step=-1), r"rewind step must be a whole number >= 0, got -1"),
        (lambda: ImpConfig(rewind_step=1.5), r"rewind step must be a whole number >= 0, got 1.5"),
        (lambda: ImpConfig(scope="row"), r"unknown scope 'row'; valid choices: global, layer"),
        (lambda: ImpConfig(output_rate_factor=0.0), r"output rate factor must be in \(0, 1\], got 0.0"),
        (lambda: GmpConfig(start_fraction=0.7, end_fraction=0.7), r"0 <= start fraction < end fraction <= 1"),
        (lambda: GmpConfig(end_fraction=1.5), r"0 <= start fraction < end fraction <= 1"),
        (lambda: GmpConfig(initial_sparsity=1.0), r"GMP initial sparsity must be in \[0, 1\)"),
        (lambda: GmpConfig(frequency=0), r"GMP frequency must be a whole number of steps >= 1, got 0"),
        (lambda: SnipConfig(batches=0), r"SNIP batches must be a whole number >= 1, got 0"),
    ],
)
def test_bad_config_values_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_configs_are_frozen_and_documented():
    for config_type in (ImpConfig, GmpConfig, SnipConfig):
        config = config_type()
        first = dataclasses.fields(config)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(config, first, 1)
        assert all(f.metadata.get("help") for f in dataclasses.fields(config))


# --- IMP ----------------------------------------------------------------------------------------


def test_imp_schedule_by_hand():
    expected = [0.2, 0.36, 0.488, 0.5904, 0.67232, 0.737856, 0.7902848, 0.83222784, 0.865782272, 0.8926258176, 0.9]
    schedule = imp_schedule(0.9, 0.2)
    assert schedule == pytest.approx(expected)
    assert schedule[-1] == 0.9  # exactly the target
    assert imp_schedule(0.5, 0.2) == pytest.approx([0.2, 0.36, 0.488, 0.5])
    assert imp_schedule(0.36, 0.2) == pytest.approx([0.2, 0.36])  # a whole number of rounds costs no extra one
    assert imp_schedule(0.75, 0.5) == pytest.approx([0.5, 0.75])
    # Continuing a trajectory: from 0.5, ceil(log(0.2 / 0.5) / log(0.8)) = 5 rounds toward 0.8.
    assert imp_schedule(0.8, 0.2, start=0.5) == pytest.approx([0.6, 0.68, 0.744, 0.7952, 0.8])
    assert imp_schedule(0.5, 0.2, start=0.5) == []
    assert imp_schedule(0.0, 0.2) == []


def test_imp_schedule_refuses_bad_input():
    with pytest.raises(ConfigError, match=r"IMP cannot go from sparsity 0.5 down to 0.3; sparsities must ascend"):
        imp_schedule(0.3, 0.2, start=0.5)
    with pytest.raises(ConfigError, match=r"IMP pruning rate must be in \(0, 1\)"):
        imp_schedule(0.5, 1.2)
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\), got 1.0"):
        imp_schedule(1.0, 0.2)


def test_layer_rounds_by_hand():
    sizes, rates = {"fc1.weight": 1000, "fc2.weight": 100}, {"fc1.weight": 0.2, "fc2.weight": 0.1}
    rounds, position = _layer_rounds(0.3, sizes, rates, 0.0, {"fc1.weight": 0, "fc2.weight": 0})
    # Round 1: 20% of fc1, 10% of the output layer; round 2 lands on 330 of 1100 pruned overall.
    assert rounds[0] == {"fc1.weight": 200, "fc2.weight": 10}
    assert len(rounds) == 2 and sum(rounds[-1].values()) == 330
    assert 1.0 < position < 2.0
    assert rounds[-1]["fc1.weight"] / 1000 > rounds[-1]["fc2.weight"] / 100
    # Continuing from there only adds: counts never fall.
    more, _ = _layer_rounds(0.6, sizes, rates, position, rounds[-1])
    assert sum(more[-1].values()) == 660
    for before, after in zip([rounds[-1], *more], more):
        assert all(after[key] >= before[key] for key in sizes)


def test_layer_rounds_refuse_to_empty_a_layer():
    with pytest.raises(ConfigError, match=r"would empty a layer .*use scope='global'"):
        _layer_rounds(0.99, {"a": 10, "b": 10}, {"a": 0.2, "b": 0.1}, 0.0, {"a": 0, "b": 0})


def test_one_round_rewinds_survivors_to_theta0(experiment):
    """Prune the trained model, rewind: every weight_orig is θ0 and the masked weights are zero."""
    model = copy.deepcopy(experiment.dense().model)
    theta0 = experiment.initial_state()
    prune(model, magnitude_scores(model), 0.2)
    rewind(model, theta0)
    model(experiment.data.x_test[:2])  # the masked product is recomputed on the next forward
    for name in ("fc1", "fc2", "fc3"):
        module = getattr(model, name)
        assert torch.equal(module.weight_orig, theta0[f"{name}.weight"])
        assert torch.equal(module.bias, theta0[f"{name}.bias"])
        mask = module.weight_mask.bool()
        assert not mask.all()
        assert torch.equal(module.weight[~mask], torch.zeros(int((~mask).sum())))
        assert torch.equal(module.weight[mask], theta0[f"{name}.weight"][mask])


def test_imp_end_to_end(experiment, monkeypatch):
    states = _record_retraining(monkeypatch, experiment)
    outcomes = list(get_strategy("imp").run(experiment, [0.5, 0.8]))
    dense = experiment.dense()
    per_epoch = _steps_per_epoch(experiment)

    assert [o.sparsity for o in outcomes] == [0.5, 0.8]
    for outcome in outcomes:
        assert _pruned(outcome.masks) == prune_count(outcome.sparsity, _total(outcome.masks))
        assert 0.0 <= outcome.accuracy <= 1.0
    # One trajectory: 4 rounds to 0.5, then 5 more from 0.5 to 0.8; the 0.8 masks lie inside the 0.5 ones.
    assert [o.train_steps for o in outcomes] == [dense.cost.steps + 4 * per_epoch, dense.cost.steps + 9 * per_epoch]
    assert [o.forward_passes for o in outcomes] == [o.train_steps for o in outcomes]
    assert all(not (later & ~earlier).any() for later, earlier in zip(outcomes[1].masks.values(), outcomes[0].masks.values()))
    assert dense.cost.seconds < outcomes[0].seconds <= outcomes[1].seconds
    # Every retraining started from θ0 (masked entries of weight_orig included: rewind resets all).
    theta0 = experiment.initial_state()
    assert len(states) == 9
    for state in states:
        for key, value in theta0.items():
            stored = state.get(key.replace(".weight", ".weight_orig"), state.get(key))
            assert torch.equal(stored, value), key


def test_imp_rewinds_to_the_snapshot_of_step_k(experiment, monkeypatch):
    states = _record_retraining(monkeypatch, experiment)
    outcomes = list(get_strategy("imp", ImpConfig(rewind_step=3)).run(experiment, [0.36]))
    snapshot = experiment.dense(snapshot_steps=(3,)).snapshots[3]
    theta0 = experiment.initial_state()
    assert len(states) == 2
    for state in states:
        assert torch.equal(state["fc1.weight_orig"], snapshot["fc1.weight"])
        assert torch.equal(state["fc3.bias"], snapshot["fc3.bias"])
        assert not torch.equal(state["fc1.weight_orig"], theta0["fc1.weight"])
    assert _pruned(outcomes[0].masks) == prune_count(0.36, _total(outcomes[0].masks))


def test_imp_rewind_step_beyond_training_is_refused(experiment):
    with pytest.raises(ConfigError, match=r"rewind step 1000 is beyond the \d+ steps of training"):
        list(get_strategy("imp", ImpConfig(rewind_step=1000)).run(experiment, [0.5]))


def test_imp_layer_scope_is_exact_and_spares_the_output_layer(experiment):
    outcomes = list(get_strategy("imp", ImpConfig(scope="layer")).run(experiment, [0.5, 0.9]))
    for outcome in outcomes:
        assert _pruned(outcome.masks) == prune_count(outcome.sparsity, _total(outcome.masks))
        layer = {key: float((~mask).float().mean()) for key, mask in outcome.masks.items()}
        assert layer["fc3.weight"] < layer["fc2.weight"] and layer["fc3.weight"] < layer["fc1.weight"]
        assert layer["fc1.weight"] == pytest.approx(layer["fc2.weight"], abs=0.01)
    assert all(not (later & ~earlier).any() for later, earlier in zip(outcomes[1].masks.values(), outcomes[0].masks.values()))


# --- GMP ----------------------------------------------------------------------------------------


def test_gmp_sparsity_follows_the_cubic_schedule():
    final, initial, start, end, every = 0.9, 0.1, 10, 40, 10
    for step in (0, 5, 10):
        assert gmp_sparsity(step, final, initial, start, end, every) == initial
    for step in (40, 41, 1000):
        assert gmp_sparsity(step, final, initial, start, end, every) == final
    for update in (20, 30):
        expected = final + (initial - final) * (1 - (update - start) / (end - start)) ** 3
        assert gmp_sparsity(update, final, initial, start, end, every) == pytest.approx(expected)
        # Between updates the last update's value holds.
        assert gmp_sparsity(update + 7, final, initial, start, end, every) == pytest.approx(expected)
    assert gmp_sparsity(20, 0.9, 0.0, 10, 40, 10) == pytest.approx(0.9 * (1 - (2 / 3) ** 3))
    schedule = [gmp_sparsity(step, final, initial, start, end, every) for step in range(60)]
    assert schedule == sorted(schedule)


def test_gmp_last_update_lands_on_the_final_sparsity_off_the_grid():
    # Updates at 5, 12, 19 and at the end step 23, which is not on the 7-step grid.
    assert gmp_sparsity(22, 0.8, 0.0, 5, 23, 7) == pytest.approx(0.8 * (1 - (1 - 14 / 18) ** 3))
    assert gmp_sparsity(23, 0.8, 0.0, 5, 23, 7) == 0.8


def test_gmp_sparsity_refuses_bad_steps():
    with pytest.raises(ConfigError, match=r"the sparsity schedule needs 0 <= start step <= end step, got 30 and 20"):
        gmp_sparsity(5, 0.5, 0.0, 30, 20, 5)
    with pytest.raises(ConfigError, match=r"the sparsity schedule's frequency must be a whole number of steps >= 1, got 0"):
        gmp_sparsity(5, 0.5, 0.0, 0, 20, 0)


def test_gmp_end_to_end(experiment, monkeypatch):
    """Masks follow the schedule at every step, only grow, and end exactly at the target."""
    every = 7
    config = GmpConfig(start_fraction=0.1, end_fraction=0.7, frequency=every)
    total_steps = 2 * _steps_per_epoch(experiment)
    start, end = round(0.1 * total_steps), round(0.7 * total_steps)
    last_on_grid = start + (end - start) // every * every
    assert last_on_grid < end  # the last update is off the grid
    experiment.train_config = TrainConfig(epochs=2, batch_size=64, seed=0)
    n = sum(scores.numel() for scores in magnitude_scores(experiment.new_model()).values())
    pruned_after: dict[int, int] = {}
    train = experiment.train

    def watching(model, *, callback=None, **kwargs):
        def watch(step):
            callback(step)
            pruned_after[step] = sum(int((m.weight == 0).sum()) for m in (model.fc1, model.fc2, model.fc3))

        return train(model, callback=watch, **kwargs)

    monkeypatch.setattr(experiment, "train", watching)
    (outcome,) = get_strategy("gmp", config).run(experiment, [0.8])
    assert _pruned(outcome.masks) == prune_count(0.8, n)
    assert outcome.train_steps == outcome.forward_passes == total_steps
    assert [pruned_after[step] for step in range(1, start)] == [0] * (start - 1)
    counts = [pruned_after[step] for step in range(1, total_steps + 1)]
    assert counts == sorted(counts)
    for step in range(start, total_steps + 1):
        assert pruned_after[step] == prune_count(gmp_sparsity(step, 0.8, 0.0, start, end, every), n), step
    assert pruned_after[end - 1] < pruned_after[end] == prune_count(0.8, n)


def test_gmp_finetune_adds_masked_epochs_and_their_cost(experiment):
    experiment.train_config = TrainConfig(epochs=1, batch_size=64, seed=0)
    (plain,) = get_strategy("gmp").run(experiment, [0.7])
    (tuned,) = get_strategy("gmp", GmpConfig(finetune_epochs=2)).run(experiment, [0.7])
    steps = _steps_per_epoch(experiment)
    assert plain.train_steps == steps and tuned.train_steps == tuned.forward_passes == 3 * steps
    assert {k: torch.equal(m, tuned.masks[k]) for k, m in plain.masks.items()} == {k: True for k in plain.masks}
    assert tuned.seconds > 0 and plain.seconds > 0  # wall time is reported; its size is noise here (counted work above)
    with pytest.raises(ConfigError, match=r"^finetune epochs must be a whole number >= 0, got -1$"):
        GmpConfig(finetune_epochs=-1)


def test_gmp_refuses_a_target_below_its_initial_sparsity(experiment):
    with pytest.raises(ConfigError, match=r"GMP target sparsity 0.3 is below its initial sparsity 0.5"):
        list(get_strategy("gmp", GmpConfig(initial_sparsity=0.5)).run(experiment, [0.3]))


def test_gmp_without_training_still_delivers_the_target(digits):
    experiment = Experiment(digits, "mlp", TrainConfig(epochs=0, batch_size=64), seed=0, progress=False)
    (outcome,) = get_strategy("gmp").run(experiment, [0.6])
    assert _pruned(outcome.masks) == prune_count(0.6, _total(outcome.masks))
    assert outcome.train_steps == 0


# --- SNIP ---------------------------------------------------------------------------------------


def test_snip_scores_by_hand():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]))
        layer.bias.zero_()
    x1, y1 = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([0])
    x2, y2 = torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([1])

    def grad_by_hand(x, y):
        # d CE / d logits = softmax(z) - onehot(y); d logits / d W = x, so dL/dW = (p - e_y) x^T.
        logits = x[0] @ layer.weight.detach().T
        p = torch.exp(logits) / torch.exp(logits).sum()
        return torch.outer(p - F.one_hot(y[0], 2).float(), x[0])

    w = layer.weight.detach().clone()
    # z = W x1 = [2, -2]: p = [e^4 / (1 + e^4), 1 / (1 + e^4)]; dL/dW row 0 = (p0 - 1) x1, row 1 = p1 x1.
    p1 = 1 / (1 + math.exp(4))
    expected_one = (w * torch.tensor([[-p1, 0.0, -2 * p1], [p1, 0.0, 2 * p1]])).abs()
    assert torch.allclose(snip_scores(layer, [x1], [y1])["weight"], expected_one)
    g1, g2 = grad_by_hand(x1, y1), grad_by_hand(x2, y2)
    assert (g1[:, 2] * g2[:, 2] < 0).all()  # the batches disagree there: summing |g| per batch would differ
    expected_two = (w * (g1 + g2)).abs()
    assert torch.allclose(snip_scores(layer, [x1, x2], [y1, y2])["weight"], expected_two)
    assert layer.weight.grad is None


def test_snip_scores_leave_nothing_behind(image_batch):
    model = make_cnn().eval()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    x, y = image_batch
    scores = snip_scores(model, [x, x], [y, y])
    assert set(scores) == {"0.weight", "5.weight", "9.weight"}
    assert all(scores[key].shape == model.get_submodule(key[:-7]).weight.shape for key in scores)
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_snip_end_to_end(experiment):
    outcomes = list(get_strategy("snip", SnipConfig(batches=2)).run(experiment, [0.5, 0.9]))
    per_epoch = _steps_per_epoch(experiment)
    for outcome, sparsity in zip(outcomes, [0.5, 0.9]):
        assert outcome.sparsity == sparsity
        assert _pruned(outcome.masks) == prune_count(sparsity, _total(outcome.masks))
        assert outcome.train_steps == per_epoch
        assert outcome.forward_passes == per_epoch + 2  # the two scoring batches are charged
    assert outcomes[0].masks["fc1.weight"].shape == (64, 64)


# --- one-shot magnitude against PyTorch ---------------------------------------------------------


def test_magnitude_masks_match_torch_global_unstructured(experiment):
    sparsity = 0.7
    (outcome,) = get_strategy("magnitude", OneShotConfig()).run(experiment, [sparsity])
    reference = copy.deepcopy(experiment.dense().model)
    modules = [reference.fc1, reference.fc2, reference.fc3]
    torch_prune.global_unstructured(
        [(module, "weight") for module in modules], pruning_method=torch_prune.L1Unstructured, amount=sparsity
    )
    for name, module in zip(("fc1", "fc2", "fc3"), modules):
        assert torch.equal(outcome.masks[f"{name}.weight"], module.weight_mask.bool()), name
