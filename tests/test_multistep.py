"""bingo.multistep: several prune-and-refit steps up the cubic schedule, no training between them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bingo
from bingo.errors import ConfigError
from bingo.masks import current_masks
from bingo import prune_in_steps, step_sparsities


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))


def _inputs(n: int = 2000, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(seed))


def _magnitude(model: nn.Module) -> dict[str, torch.Tensor]:
    return bingo.magnitude_scores(model)


def _pruned_fraction(masks: dict[str, torch.Tensor]) -> float:
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def test_step_sparsities_follow_the_cubic_schedule():
    assert step_sparsities(0.9, 1) == (0.9,)
    assert step_sparsities(0.9, 2) == pytest.approx((0.9 * 0.875, 0.9))
    four = step_sparsities(0.9, 4)
    assert four == pytest.approx((0.9 * (1 - 0.75 ** 3), 0.9 * (1 - 0.5 ** 3), 0.9 * (1 - 0.25 ** 3), 0.9))
    assert four[-1] == 0.9  # exactly the target, not a float near it
    assert all(a < b for a, b in zip(four, four[1:]))


def test_one_step_is_exactly_one_shot_prune_and_compensate():
    x = _inputs()
    oneshot = _net()
    dense = copy.deepcopy(oneshot)
    masks = bingo.prune(oneshot, _magnitude(oneshot), 0.8)
    bingo.compensate(oneshot, None, x, reference=dense)
    plain = _net()  # compensate's own default reference: the model with its masks lifted
    bingo.prune(plain, _magnitude(plain), 0.8)
    bingo.compensate(plain, None, x)

    stepped = _net()
    result = prune_in_steps(stepped, _magnitude, 0.8, x, steps=1)
    assert result.sparsities == (0.8,)
    for other in (oneshot, plain):
        for (name, a), (_, b) in zip(stepped.state_dict().items(), other.state_dict().items()):
            assert torch.equal(a, b), name
    assert all(torch.equal(result.masks[k], masks[k]) for k in masks)


def test_masks_only_shrink_and_every_step_is_exact():
    """Scores drawn afresh at every step would revive pruned weights; the masks must still nest."""
    model, x, seen = _net(), _inputs(), []

    def reshuffled(m: nn.Module) -> dict[str, torch.Tensor]:
        scores = bingo.random_scores(m, seed=len(seen))
        seen.append(current_masks(m, scores))
        return scores

    result = prune_in_steps(model, reshuffled, 0.9, x, steps=4)
    seen.append(result.masks)
    n = sum(m.numel() for m in result.masks.values())
    assert _pruned_fraction(seen[0]) == 0.0
    for before, after, target in zip(seen, seen[1:], result.sparsities):
        for key in after:
            assert not (after[key] & ~before[key]).any(), key  # nothing pruned comes back
        assert sum(int((~m).sum()) for m in after.values()) == round(target * n)
    assert _pruned_fraction(result.masks) == pytest.approx(round(0.9 * n) / n, abs=0)
    # the masks on the model are the ones returned (its zeros may be more: a re-fit gives a dead unit's outputs weight 0)
    assert all(torch.equal(m, result.masks[k]) for k, m in current_masks(model, result.masks).items())


def test_fixed_scores_give_the_one_shot_masks_rescoring_changes_them():
    x = _inputs()
    oneshot = _net()
    fixed = _magnitude(oneshot)
    masks = bingo.prune(oneshot, fixed, 0.85)
    stepped = _net()
    kept = prune_in_steps(stepped, fixed, 0.85, x, steps=4).masks
    assert all(torch.equal(kept[k], masks[k]) for k in masks)
    rescored = prune_in_steps(_net(), _magnitude, 0.85, x, steps=4).masks
    assert any(not torch.equal(rescored[k], masks[k]) for k in masks)


def test_every_refit_aims_at_the_dense_network():
    """The loop by hand, each re-fit aimed at the dense model, gives the same weights; compensate's own default would not."""
    x, dense = _inputs(), _net()
    stepped = _net()
    prune_in_steps(stepped, _magnitude, 0.8, x, steps=3)
    by_hand, lifted = _net(), _net()
    for target in step_sparsities(0.8, 3):
        bingo.prune(by_hand, _magnitude(by_hand), target)
        bingo.compensate(by_hand, None, x, reference=dense)
        bingo.prune(lifted, _magnitude(lifted), target)
        bingo.compensate(lifted, None, x)  # aims at the previous step's re-fit with its masks lifted
    for (name, p), (_, q) in zip(stepped.state_dict().items(), by_hand.state_dict().items()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, q) for p, q in zip(stepped.state_dict().values(), lifted.state_dict().values()))
    explicit = _net()
    prune_in_steps(explicit, _magnitude, 0.8, x, steps=3, reference=dense)
    assert all(torch.equal(p, q) for p, q in zip(stepped.state_dict().values(), explicit.state_dict().values()))


def test_cost_adds_up_over_steps():
    x = _inputs()
    one = prune_in_steps(_net(), _magnitude, 0.8, x, steps=1)
    four = prune_in_steps(_net(), _magnitude, 0.8, x, steps=4)
    assert len(four.compensations) == 4
    assert four.forward_passes == sum(c.forward_passes for c in four.compensations) > one.forward_passes > 0
    assert four.solve_flops == sum(c.solve_flops for c in four.compensations) > one.solve_flops > 0


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "4"])
def test_bad_steps(steps):
    with pytest.raises(ConfigError, match=r"^steps must be a whole number >= 1, got "):
        prune_in_steps(_net(), _magnitude, 0.8, _inputs(), steps=steps)


def test_bad_arguments_are_one_line_errors():
    x = _inputs()
    with pytest.raises(ConfigError, match=r"takes a fraction, not the N:M pattern '2:4'"):
        prune_in_steps(_net(), _magnitude, "2:4", x)
    with pytest.raises(ConfigError, match=r"sparsity"):
        prune_in_steps(_net(), _magnitude, 1.0, x)
    with pytest.raises(ConfigError, match=r"unknown scope 'local'; valid choices: global, layer"):
        prune_in_steps(_net(), _magnitude, 0.5, x, scope="local")
    with pytest.raises(ConfigError, match=r"scores must be a \{key: tensor\} dict or a function model -> scores, got list"):
        prune_in_steps(_net(), [1, 2], 0.5, x)
    pruned = _net()
    bingo.prune(pruned, _magnitude(pruned), 0.5)
    with pytest.raises(ConfigError, match=r"already pruned; pass reference="):
        prune_in_steps(pruned, _magnitude, 0.8, x)


# --------------------------------------------------------------------------
# the harness option: compensation_steps (--compensation-steps, --bingo-compensation-steps, ...)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["magnitude", "bingo"])
def test_harness_steps_are_prune_in_steps_with_the_method_s_rescoring(method):
    import dataclasses

    from bingo.bench.data import load_dataset
    from bingo.bench.strategies import BINGO, CompensationConfig, Experiment, OneShotConfig, get_strategy
    from bingo.bench.training import TrainConfig

    experiment = Experiment(load_dataset("digits"), "mlp", TrainConfig(epochs=1), 0, progress=False)
    preset = dataclasses.replace(BINGO, magnitude_weight=0.5) if method == "bingo" else OneShotConfig()
    config = dataclasses.replace(preset, compensation=CompensationConfig(compensate=True, compensation_steps=3))
    strategy = get_strategy(method, config)
    outcome = next(iter(strategy.run(experiment, [0.9])))

    dense, _ = strategy.trained(experiment)
    if method == "bingo":
        significance = dense.search.significance()
        scores = lambda m: bingo.bingo_scores(significance, m)  # noqa: E731
    else:
        scores = lambda m: bingo.magnitude_scores(m, "weight")  # noqa: E731
    by_hand = copy.deepcopy(dense.model)
    samples = bingo.suggested_calibration_samples(by_hand, experiment.calibration(1), minimum=1024)
    result = prune_in_steps(by_hand, scores, 0.9, experiment.calibration(samples), steps=3, seed=0, reference=dense.model)
    for (name, p), (_, q) in zip(outcome.model.state_dict().items(), by_hand.state_dict().items()):
        assert torch.equal(p, q), name
    assert outcome.accuracy == experiment.evaluate(by_hand)
    assert outcome.forward_passes == dense.cost.forward_passes + result.forward_passes


def test_bingo_s_chosen_blend_judges_each_weight_after_its_own_multi_step_prune():
    import dataclasses

    from bingo.bench.data import load_dataset
    from bingo.bench.strategies import BINGO, CompensationConfig, Experiment, get_strategy
    from bingo.bench.strategies.oneshot import EVALUATION_BATCH
    from bingo.bench.training import TrainConfig, evaluate

    experiment = Experiment(load_dataset("digits"), "mlp", TrainConfig(epochs=1), 0, progress=False)
    config = dataclasses.replace(BINGO, compensation=CompensationConfig(compensate=True, compensation_steps=2))
    strategy = get_strategy("bingo", config)
    outcome = next(iter(strategy.run(experiment, [0.9])))

    dense, _ = strategy.trained(experiment)
    significance = dense.search.significance()
    data = experiment.data
    samples = bingo.suggested_calibration_samples(dense.model, experiment.calibration(1), minimum=1024)
    judged, passes = {}, 0
    for weight in sorted(bingo.BLEND_WEIGHTS, reverse=True):
        by_hand = copy.deepcopy(dense.model)
        result = prune_in_steps(by_hand, lambda m, w=weight: bingo.bingo_scores(significance, m, w), 0.9,
                                experiment.calibration(samples), steps=2, seed=0, reference=dense.model)
        judged[weight] = (evaluate(by_hand, data.x_val, data.y_val, batch_size=EVALUATION_BATCH), by_hand)
        passes += result.forward_passes + -(-len(data.x_val) // EVALUATION_BATCH)
    best = max(judged, key=lambda w: (judged[w][0], w))  # ties to the larger weight
    assert outcome.magnitude_weight == best
    for (name, p), (_, q) in zip(outcome.model.state_dict().items(), judged[best][1].state_dict().items()):
        assert torch.equal(p, q), name
    assert outcome.forward_passes == dense.cost.forward_passes + passes  # every candidate's steps and judgement charged


def test_compensation_steps_is_recorded_only_when_not_one():
    from bingo.bench.configs import config_record
    from bingo.bench.strategies import CompensationConfig

    assert "compensation_steps" not in config_record(CompensationConfig(compensate=True))  # earlier records resume unchanged
    assert config_record(CompensationConfig(compensate=True, compensation_steps=4))["compensation_steps"] == 4
    with pytest.raises(ConfigError, match=r"^compensation steps must be a whole number >= 1, got 0$"):
        CompensationConfig(compensation_steps=0)


def test_cli_compensation_steps(tmp_path, capsys):
    import json

    from conftest import assert_user_error, call

    out = tmp_path / "run.json"
    code, _, err = call(capsys, "run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.9",
                        "--compensation-steps", "2", "--out", out, "--no-progress")
    assert code == 0, err
    assert json.loads(out.read_text())["config"]["compensation"]["compensation_steps"] == 2
    code, _, err = call(capsys, "run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--sparsity", "0.9",
                        "--compensation-steps", "0", "--out", out, "--no-progress")
    assert_user_error(code, err, r"compensation steps must be a whole number >= 1, got 0")
    code, _, err = call(capsys, "run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--max-accuracy-drop", "0.01",
                        "--compensation-steps", "2", "--out", out, "--no-progress")
    assert_user_error(code, err, r"--compensation-steps applies to --sparsity, not to an accuracy floor")
