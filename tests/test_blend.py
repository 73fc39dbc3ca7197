"""bingo.choose_magnitude_weight: the blend weight chosen by a judge on held-out data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import bingo
from bingo.errors import ConfigError


def model_and_significance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    generator = torch.Generator().manual_seed(1)
    significance = {key: torch.rand(p.shape, generator=generator) for key, p in model.named_parameters() if key.endswith("weight")}
    return model, significance


def judge_by(values: dict[float, float], seen: list):
    """A judge that recognises each candidate by its masks (bingo_scores at each weight) and returns ``values[weight]``."""
    def judge(candidate):
        seen.append(candidate)
        masks = bingo.current_masks(candidate, expected[0.5])
        for weight, value in values.items():
            if all(torch.equal(masks[k], expected[weight][k]) for k in masks):
                return value
        raise AssertionError("a candidate no weight prunes to")
    return judge


@pytest.fixture
def case():
    model, significance = model_and_significance()
    global expected
    expected = {}
    for weight in bingo.BLEND_WEIGHTS:
        copy = model_and_significance()[0]
        expected[weight] = bingo.prune(copy, bingo.bingo_scores(significance, copy, weight), 0.5)
    return model, significance


def test_the_best_judged_weight_wins_and_the_model_is_left_alone(case):
    model, significance = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    values = {0.0: 0.70, 0.25: 0.81, 0.5: 0.80, 0.75: 0.79, 1.0: 0.60}
    choice = bingo.choose_magnitude_weight(model, significance, 0.5, judge_by(values, seen))
    assert choice.magnitude_weight == 0.25
    assert choice.judged == values
    assert len(seen) == 5 and choice.model is seen[3]  # the larger weights are tried first
    for key, mask in choice.masks.items():
        assert torch.equal(mask, expected[0.25][key])
        assert torch.equal(bingo.current_masks(choice.model, choice.masks)[key], mask)
    assert model.state_dict().keys() == before.keys()  # no masks attached
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ties_go_to_the_larger_weight_and_nan_never_wins(case):
    model, significance = case
    tie = {0.0: 0.8, 0.25: 0.8, 0.5: 0.8, 0.75: 0.8, 1.0: 0.7}
    assert bingo.choose_magnitude_weight(model, significance, 0.5, judge_by(tie, [])).magnitude_weight == 0.75
    nan = {0.0: 0.1, 0.25: math.nan, 0.5: 0.2, 0.75: math.nan, 1.0: math.nan}
    assert bingo.choose_magnitude_weight(model, significance, 0.5, judge_by(nan, [])).magnitude_weight == 0.5
    some = bingo.choose_magnitude_weight(model, significance, 0.5, judge_by(tie, []), weights=(0.0, 1.0))
    assert some.magnitude_weight == 0.0 and set(some.judged) == {0.0, 1.0}


def test_a_judge_may_change_the_candidate_and_the_chosen_one_comes_back_as_judged(case):
    model, significance = case

    def judge(candidate):
        with torch.no_grad():
            candidate[0].bias.fill_(7.0)  # as compensation would change it
        return 1.0

    choice = bingo.choose_magnitude_weight(model, significance, 0.5, judge, weights=(0.5,))
    assert bool((choice.model[0].bias == 7).all()) and not bool((model[0].bias == 7).any())


def test_bad_arguments_are_one_line_config_errors(case):
    model, significance = case
    with pytest.raises(ConfigError, match=r"^choose_magnitude_weight: judge must be a function model -> number \(higher = better\), got int$"):
        bingo.choose_magnitude_weight(model, significance, 0.5, 3)
    with pytest.raises(ConfigError, match=r"^choose_magnitude_weight: weights must be a non-empty tuple"):
        bingo.choose_magnitude_weight(model, significance, 0.5, lambda m: 1.0, weights=())
    with pytest.raises(ConfigError, match=r"^magnitude weight must be in \[0, 1\], got 1.5$"):
        bingo.choose_magnitude_weight(model, significance, 0.5, lambda m: 1.0, weights=(0.5, 1.5))
    with pytest.raises(ConfigError, match=r"^unknown scope 'all'"):
        bingo.choose_magnitude_weight(model, significance, 0.5, lambda m: 1.0, scope="all")


def test_prune_with_prunes_each_candidate_its_own_way_and_can_rescore_the_changed_weights(case):
    model, significance = case
    calls = []

    def in_two_steps(candidate, scores):
        bingo.prune(candidate, scores(candidate), 0.25)
        with torch.no_grad():  # as a re-fit would: the second step's magnitude sees the changed weights
            candidate[2].weight_orig.mul_(3.0)
        masks = bingo.prune(candidate, scores(candidate), 0.5)
        calls.append(candidate)
        return masks

    values = {0.0: 0.1, 0.25: 0.2, 0.5: 0.3, 0.75: 0.9, 1.0: 0.4}
    judged_by_weight = {}

    def judge(candidate):
        weight = sorted(bingo.BLEND_WEIGHTS, reverse=True)[len(judged_by_weight)]
        judged_by_weight[weight] = candidate
        return values[weight]

    choice = bingo.choose_magnitude_weight(model, significance, 0.5, judge, prune_with=in_two_steps)
    assert choice.magnitude_weight == 0.75 and len(calls) == 5 and choice.model is judged_by_weight[0.75]
    by_hand = model_and_significance()[0]
    bingo.prune(by_hand, bingo.bingo_scores(significance, by_hand, 0.75), 0.25)
    with torch.no_grad():
        by_hand[2].weight_orig.mul_(3.0)
    expected_masks = bingo.prune(by_hand, bingo.bingo_scores(significance, by_hand, 0.75), 0.5)
    assert all(torch.equal(choice.masks[key], expected_masks[key]) for key in expected_masks)
    with pytest.raises(ConfigError, match=r"^choose_magnitude_weight: prune_with must be a function \(model, scores\) -> masks, got int$"):
        bingo.choose_magnitude_weight(model, significance, 0.5, judge, prune_with=3)
