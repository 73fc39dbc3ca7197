"""Rank blending of score sets (bingo.scoring) and the default bingo's final score."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bingo
from bingo.errors import ConfigError
from bingo.scoring import combine_ranks, normalised_ranks
from bingo.search import TicketSearch
from bingo.strategies.oneshot import BingoConfig, BingoPaperConfig
from conftest import make_mlp, train_tiny


def test_normalised_ranks_by_hand():
    # sorted: 1 (position 0), 2 and 2 (positions 1, 2: average 1.5), 3 (position 3); divided by n - 1 = 3
    got = normalised_ranks(torch.tensor([[3.0, 1.0], [2.0, 2.0]]))
    assert got.shape == (2, 2) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    assert normalised_ranks(torch.tensor([7.0])).tolist() == [0.0]


def test_normalised_ranks_refuse_nan():
    with pytest.raises(ConfigError, match=r"cannot rank scores that contain NaN; decide how to score never-probed weights"):
        normalised_ranks(torch.tensor([1.0, float("nan")]))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=40))
def test_normalised_ranks_preserve_order_and_ties(values):
    x = torch.tensor(values, dtype=torch.float32)
    r = normalised_ranks(x)
    assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0
    for i in range(len(values)):
        for j in range(len(values)):
            assert (values[i] < values[j]) == bool(r[i] < r[j])
            assert (values[i] == values[j]) == bool(r[i] == r[j])


def test_combine_ranks_by_hand():
    # One ranking over both layers: a = [4, 1 | 3, 2] -> ranks [3, 0 | 2, 1] / 3;  b = [10, 40 | 20, 30] -> [0, 3 | 1, 2] / 3
    a = {"x": torch.tensor([4.0, 1.0]), "y": torch.tensor([[3.0], [2.0]])}
    b = {"x": torch.tensor([10.0, 40.0]), "y": torch.tensor([[20.0], [30.0]])}
    equal = combine_ranks([a, b])
    assert list(equal) == ["x", "y"] and equal["y"].shape == (2, 1)
    torch.testing.assert_close(equal["x"], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(equal["y"], torch.tensor([[0.5], [0.5]]))
    weighted = combine_ranks([a, b], weights=[3.0, 1.0])  # 0.75 * rank_a + 0.25 * rank_b
    torch.testing.assert_close(weighted["x"], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(weighted["y"], torch.tensor([[0.5 + 1 / 12], [0.25 + 1 / 6]]))


def test_combine_ranks_of_one_set_prunes_like_the_set(mlp):
    scores = bingo.magnitude_scores(mlp)
    alone = bingo.combine_ranks([scores, bingo.random_scores(mlp)], weights=[1.0, 0.0])  # public API
    first, second = make_mlp(), make_mlp()
    assert all(torch.equal(bingo.prune(first, scores, 0.7)[k], m) for k, m in bingo.prune(second, alone, 0.7).items())


@pytest.mark.parametrize(
    ("weights", "pattern"),
    [([1.0], r"combine_ranks got 2 sets of scores but 1 weights"), ([-1.0, 2.0], r"weights must be >= 0 with a positive sum"), ([0.0, 0.0], r"positive sum")],
)
def test_combine_ranks_bad_weights(weights, pattern):
    a = {"x": torch.tensor([1.0, 2.0])}
    with pytest.raises(ConfigError, match=pattern):
        combine_ranks([a, a], weights=weights)


def test_combine_ranks_needs_matching_sets():
    with pytest.raises(ConfigError, match=r"same keys and shapes"):
        combine_ranks([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}])
    with pytest.raises(ConfigError, match=r"same keys and shapes"):
        combine_ranks([{"x": torch.zeros(2)}, {"z": torch.zeros(2)}])
    with pytest.raises(ConfigError, match=r"at least one set"):
        combine_ranks([])


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_bingo_final_scores_blend_significance_with_magnitude(granularity):
    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(5)), torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(6))
    config = BingoConfig(granularity=granularity)
    model, search = train_tiny(make_mlp, data, lambda m: TicketSearch(m, config=config.search_config(0)))
    significance = search.significance()
    final = config.final_scores(search, model)
    magnitude = bingo.magnitude_scores(model, granularity)
    assert list(final) == list(significance)  # neurons: the output layer stays out
    torch.testing.assert_close(final, combine_ranks([significance, magnitude]))
    # the search's own significance, untouched, when the magnitude weight is 0 (and in the paper's preset)
    assert BingoPaperConfig().magnitude_weight == 0.0
    plain = BingoConfig(granularity=granularity, magnitude_weight=0.0).final_scores(search, model)
    assert all(torch.equal(plain[k], significance[k]) for k in significance)


def test_bingo_config_refuses_bad_magnitude_weight():
    with pytest.raises(ConfigError, match=r"magnitude weight must be in \[0, 1\], got -0\.5"):
        BingoConfig(magnitude_weight=-0.5)
