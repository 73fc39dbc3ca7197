"""Rank blending of score sets (bingo.scoring) and the default bingo's final score (bingo.bingo_scores, and the harness's BingoConfig that calls it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bingo
from bingo.errors import ConfigError
from bingo.scoring import MAGNITUDE_WEIGHT, bingo_scores, combine_ranks, normalised_ranks
from bingo.search import BINGO_SEARCH, SearchConfig, TicketSearch
from bingo.bench.strategies.oneshot import BINGO, BINGO_PAPER, BingoConfig
from conftest import make_mlp, train_tiny


def test_normalised_ranks_by_hand():
    # sorted: 1 (position 0), 2 and 2 (positions 1, 2: average 1.5), 3 (position 3); divided by n - 1 = 3
    got = normalised_ranks(torch.tensor([[3.0, 1.0], [2.0, 2.0]]))
    assert got.shape == (2, 2) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    assert normalised_ranks(torch.tensor([7.0])).tolist() == [0.0]


def test_normalised_ranks_refuse_nan():
    with pytest.raises(ConfigError, match=r"cannot rank scores that contain NaN: never-scored weights .* or a diverged training"):
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
    # the key order of later sets does not matter; the result follows the first set's
    swapped = combine_ranks([a, {"y": b["y"], "x": b["x"]}], weights=[3.0, 1.0])
    assert list(swapped) == ["x", "y"]
    torch.testing.assert_close(swapped, weighted)


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
    with pytest.raises(ConfigError, match=r"^combine_ranks needs score sets with the same shapes: 'x' is \(2,\) in set 0 and \(3,\) in set 1$"):
        combine_ranks([{"x": torch.zeros(2)}, {"x": torch.zeros(3)}])
    with pytest.raises(ConfigError, match=r"^combine_ranks needs score sets with the same keys: set 2 lacks 'y' and has extra 'z' compared with set 0; "
                       r"score every set over the same layers: magnitude_scores\(model, like=<set 0>\) and random_scores\(model, like=<set 0>\) "
                       r"score exactly its keys \(or pass the same include/exclude\)$"):
        combine_ranks([{"x": torch.zeros(2), "y": torch.zeros(1)}, {"y": torch.zeros(1), "x": torch.zeros(2)}, {"x": torch.zeros(2), "z": torch.zeros(1)}])
    with pytest.raises(ConfigError, match=r"^combine_ranks needs score sets with the same keys: set 1 lacks 'y' compared with set 0"):
        combine_ranks([{"x": torch.zeros(2), "y": torch.zeros(1)}, {"x": torch.zeros(2)}])
    with pytest.raises(ConfigError, match=r"at least one set"):
        combine_ranks([])


def test_combine_ranks_names_a_granularity_mismatch_and_the_fix(mlp):
    # A neuron-granularity significance (one score per unit, no output layer) blended with
    # weight-level magnitude: the keys differ too, but the granularity is what to fix.
    per_unit = bingo.magnitude_scores(mlp, "neuron")
    per_weight = bingo.magnitude_scores(mlp)
    fix = r"; pass granularity 'neuron' to magnitude_scores/random_scores \(and the same include\), or like=<set 0>, so every set scores the same units$"
    with pytest.raises(ConfigError, match=r"^combine_ranks: score sets mix granularities: '1\.weight' is per neuron \(12,\) in set 0 and per weight \(12, 16\) in set 1" + fix):
        combine_ranks([per_unit, per_weight])
    with pytest.raises(ConfigError, match=r"'1\.weight' is per neuron \(12,\) in set 1 and per weight \(12, 16\) in set 0" + fix):
        combine_ranks([per_weight, per_unit])
    # the fix works
    assert list(combine_ranks([per_unit, bingo.magnitude_scores(mlp, "neuron")])) == ["1.weight", "3.weight"]


class FinishedSearch:
    """Stands in for a trained search: ``final_scores`` reads only ``significance()``."""

    def __init__(self, significance: dict[str, torch.Tensor]) -> None:
        self._significance = significance

    def significance(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._significance.items()}


def two_linear(first: list[list[float]], second: list[list[float]]) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(2, len(first), bias=False), torch.nn.ReLU(), torch.nn.Linear(len(first), 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(first))
        model[2].weight.copy_(torch.tensor(second))
    return model


@pytest.mark.parametrize(
    ("magnitude_weight", "expected_first", "expected_second"),
    [
        # significance [.1 .4 .3 .6 | .2 .5] ranks [0 3 2 5 | 1 4] / 5; |w| [6 1 2 5 | 3 4] ranks [5 0 1 4 | 2 3] / 5
        (0.5, [[0.5, 0.3], [0.3, 0.9]], [[0.3, 0.7]]),  # (rank_s + rank_m) / 2
        (0.25, [[0.25, 0.45], [0.35, 0.95]], [[0.25, 0.75]]),  # 0.75 rank_s + 0.25 rank_m
    ],
)
def test_bingo_final_scores_by_hand_per_weight(magnitude_weight, expected_first, expected_second):
    model = two_linear([[-6.0, 1.0], [2.0, -5.0]], [[3.0, -4.0]])
    search = FinishedSearch({"0.weight": torch.tensor([[0.1, 0.4], [0.3, 0.6]]), "2.weight": torch.tensor([[0.2, 0.5]])})
    final = BingoConfig(search=SearchConfig(granularity="weight"), magnitude_weight=magnitude_weight).final_scores(search, model)
    assert list(final) == ["0.weight", "2.weight"]
    torch.testing.assert_close(final["0.weight"], torch.tensor(expected_first))
    torch.testing.assert_close(final["2.weight"], torch.tensor(expected_second))


@pytest.mark.parametrize(("magnitude_weight", "expected"), [(0.5, [0.25, 1.0, 0.25]), (0.25, [0.125, 1.0, 0.375])])
def test_bingo_final_scores_by_hand_per_neuron(magnitude_weight, expected):
    # significance [.2 .9 .5] ranks [0 2 1] / 2; row L2 norms [5 6 1.41] rank [1 2 0] / 2 (L1 norms or
    # signed sums [7 6 2], [1 6 2] would rank differently); the output layer is not scored
    model = two_linear([[-3.0, 4.0], [0.0, 6.0], [1.0, 1.0]], [[1.0, 1.0, 1.0]])
    search = FinishedSearch({"0.weight": torch.tensor([0.2, 0.9, 0.5])})
    final = BingoConfig(search=SearchConfig(granularity="neuron"), magnitude_weight=magnitude_weight).final_scores(search, model)
    assert list(final) == ["0.weight"]
    torch.testing.assert_close(final["0.weight"], torch.tensor(expected))


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_bingo_final_scores_of_a_real_search(granularity):
    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(5)), torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(6))
    config = dataclasses.replace(BINGO, search=dataclasses.replace(BINGO.search, granularity=granularity))
    model, search = train_tiny(make_mlp, data, lambda m: TicketSearch(m, config=config.search))
    significance = search.significance()
    final = config.final_scores(search, model)
    assert list(final) == list(significance)  # neurons: the output layer stays out
    assert all(final[k].shape == significance[k].shape and bool(((final[k] >= 0) & (final[k] <= 1)).all()) for k in final)
    # the search's own significance, untouched, when the magnitude weight is 0 (and in the paper's preset)
    assert BINGO_PAPER.magnitude_weight == 0.0
    plain = dataclasses.replace(config, magnitude_weight=0.0).final_scores(search, model)
    assert all(torch.equal(plain[k], significance[k]) for k in significance)


def test_bingo_config_refuses_bad_magnitude_weight():
    with pytest.raises(ConfigError, match=r"magnitude weight must be in \[0, 1\], got -0\.5"):
        BingoConfig(magnitude_weight=-0.5)


# --------------------------------------------------------------------------- bingo_scores, the core recipe


def test_bingo_scores_by_hand_from_a_significance_dict():
    """The by-hand cases above, through the core function: per weight and per neuron (told or read off the shapes)."""
    model = two_linear([[-6.0, 1.0], [2.0, -5.0]], [[3.0, -4.0]])
    significance = {"0.weight": torch.tensor([[0.1, 0.4], [0.3, 0.6]]), "2.weight": torch.tensor([[0.2, 0.5]])}
    final = bingo_scores(significance, model, 0.25)
    torch.testing.assert_close(final["0.weight"], torch.tensor([[0.25, 0.45], [0.35, 0.95]]))
    torch.testing.assert_close(final["2.weight"], torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(bingo_scores(significance, model)["0.weight"], torch.tensor([[0.5, 0.3], [0.3, 0.9]]))

    model = two_linear([[-3.0, 4.0], [0.0, 6.0], [1.0, 1.0]], [[1.0, 1.0, 1.0]])
    per_unit = {"0.weight": torch.tensor([0.2, 0.9, 0.5])}
    for granularity in (None, "neuron"):
        torch.testing.assert_close(bingo_scores(per_unit, model, granularity=granularity)["0.weight"], torch.tensor([0.25, 1.0, 0.25]))
    with pytest.raises(ConfigError, match="score sets mix granularities"):
        bingo_scores(per_unit, model, granularity="weight")


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_bingo_scores_of_a_search_is_the_documented_blend(granularity):
    data = torch.randn(64, 16, generator=torch.Generator().manual_seed(5)), torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(6))
    model, search = train_tiny(make_mlp, data, lambda m: TicketSearch(m, config=BINGO_SEARCH, granularity=granularity))
    significance = search.significance()
    final = bingo_scores(search, model)  # the search's granularity, the default weight
    assert MAGNITUDE_WEIGHT == 0.5 and list(final) == list(significance)
    expected = combine_ranks([significance, bingo.magnitude_scores(model, granularity, include=list(significance))], [0.5, 0.5])
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    # the harness's bingo method ranks by exactly this
    config = dataclasses.replace(BINGO, search=dataclasses.replace(BINGO.search, granularity=granularity))
    assert all(torch.equal(config.final_scores(search, model)[k], final[k]) for k in final)
    # weight 0: the significance itself; weight 1: the magnitude ranks over the searched keys
    assert all(torch.equal(bingo_scores(search, model, 0.0)[k], significance[k]) for k in significance)
    alone = combine_ranks([bingo.magnitude_scores(model, granularity, include=list(significance))])
    assert all(torch.equal(bingo_scores(search, model, 1.0)[k], alone[k]) for k in alone)


def test_bingo_presets_live_in_the_core():
    assert bingo.BINGO_SEARCH is BINGO_SEARCH and bingo.bingo_scores is bingo_scores
    assert BINGO.search == BINGO_SEARCH and BINGO.magnitude_weight is None  # chosen per sparsity on validation data
    assert BINGO.fixed_magnitude_weight == MAGNITUDE_WEIGHT  # where it cannot be chosen
    assert (BINGO_SEARCH.estimator, BINGO_SEARCH.metric, BINGO_SEARCH.mode, BINGO_SEARCH.every) == ("hybrid", "loss", "zero", None)


@pytest.mark.parametrize("weight", [-0.5, 1.5, float("nan"), "heavy"])
def test_bingo_scores_refuse_a_bad_magnitude_weight(weight):
    model = two_linear([[1.0, 2.0]], [[1.0]])
    with pytest.raises(ConfigError, match=r"^magnitude weight must be in \[0, 1\], got "):
        bingo_scores({"0.weight": torch.ones(1, 2)}, model, weight)


def _embedding_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def test_reference_scores_like_a_search_with_include_star_blend_with_it():
    tokens = torch.randint(0, 10, (64, 3), generator=torch.Generator().manual_seed(1))
    data = tokens, torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    model, search = train_tiny(_embedding_mlp, data, lambda m: TicketSearch(m, include=["*"]), steps=8)
    significance = search.significance()
    assert list(significance) == ["0.weight", "2.weight", "4.weight"]  # the embedding too
    with pytest.raises(ConfigError, match=r"set 1 lacks '0\.weight' compared with set 0; .*magnitude_scores\(model, like=<set 0>\)"):
        combine_ranks([significance, bingo.magnitude_scores(model)])  # the user's first try: the default scope

    magnitude = bingo.magnitude_scores(model, like=significance)
    assert list(magnitude) == list(significance)
    for key, module in (("0.weight", model[0]), ("2.weight", model[2]), ("4.weight", model[4])):
        assert torch.equal(magnitude[key], module.weight.detach().abs())
    randoms = bingo.random_scores(model, seed=3, like=significance)
    assert [tuple(v.shape) for v in randoms.values()] == [tuple(v.shape) for v in significance.values()]
    assert all(torch.equal(a, b) for a, b in zip(randoms.values(), bingo.random_scores(model, seed=3, include=["*"]).values()))
    blended = combine_ranks([significance, magnitude])
    assert list(blended) == list(significance)


def test_like_takes_each_keys_granularity_from_its_shape(mlp):
    like = {"3.weight": torch.zeros(8), "1.weight": torch.zeros(12, 16)}  # per neuron, per weight; in this order
    got = bingo.magnitude_scores(mlp, like=like)
    assert list(got) == ["3.weight", "1.weight"]
    torch.testing.assert_close(got["3.weight"], mlp[3].weight.detach().norm(dim=1))
    assert torch.equal(got["1.weight"], mlp[1].weight.detach().abs())
    assert tuple(bingo.random_scores(mlp, like=like)["3.weight"].shape) == (8,)
    assert list(bingo.magnitude_scores(mlp, "neuron", like={"3.weight": torch.zeros(8)})) == ["3.weight"]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"include": ["1"]}, r"^give like= or include=/exclude=, not both: like= scores exactly the keys of the scores it is given$"),
        ({"exclude": ["5"]}, r"^give like= or include=/exclude=, not both"),
        ({"like_keys": {"1.bias": (12,)}}, r"^like= names '1\.bias', which is not a weight of Sequential \(its weights: '1\.weight', '3\.weight', '5\.weight'\)$"),
        ({"like_keys": {"fc.weight": (3,)}}, r"^like= names 'fc\.weight', which is not a weight of Sequential"),
        ({"like_keys": {"1.weight": (16,)}}, r"^like= scores '1\.weight' with shape \(16,\); expected \(12, 16\) \(per weight\) or \(12,\) \(per neuron\)$"),
        ({"like_keys": {"1.weight": (12,)}, "granularity": "weight"}, r"^like= scores '1\.weight' with shape \(12,\); expected \(12, 16\) \(per weight\)$"),
        ({"like_keys": {"1.weight": (12,)}, "granularity": "pixel"}, r"^unknown granularity 'pixel'; valid choices: weight, neuron$"),
    ],
)
def test_like_errors(mlp, kwargs, pattern):
    kwargs = dict(kwargs)
    like = {key: torch.zeros(shape) for key, shape in kwargs.pop("like_keys", {"1.weight": (12,)}).items()}
    for scores in (bingo.magnitude_scores, bingo.random_scores):
        with pytest.raises(ConfigError, match=pattern):
            scores(mlp, like=like, **kwargs)
