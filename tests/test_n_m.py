"""N:M semi-structured sparsity: selection, prune, compensation, the CLI, the conversion to sparse kernels.

"N:M" keeps at most N of every M consecutive input weights of a unit
(NVIDIA's and PyTorch's convention). The pattern is checked on every group
by reshaping the weight by hand (not through the library's own grouping):
a Linear's rows, a conv filter's flattened ``C·kh·kw``, GPT-2's ``Conv1D``
columns (its weight is stored ``in × out``).
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import bingo
import bingo.bench.strategies.base
from bingo.errors import ConfigError
from bingo.selection import parse_n_m, parse_sparsity, select_n_m
from conftest import assert_user_error, call

BAD_PATTERN = r"sparsity must be a fraction in \[0, 1\) or a pattern N:M \(keep at most N of every M consecutive weights, 0 < N < M\) such as 2:4, got "


def kept_per_group(mask: torch.Tensor, m: int, units_axis: int = 0) -> torch.Tensor:
    """``(units, groups)`` counts of kept entries, grouping by hand: units first, fan-in flattened in order."""
    rows = mask.transpose(0, 1) if units_axis == 1 else mask
    return rows.reshape(rows.shape[0], -1, m).bool().sum(-1)


def top_n_reference(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M keep-mask of a ``(units, fan-in)`` score matrix with distinct scores: each group's top ``n`` by ``topk``."""
    groups = scores.reshape(scores.shape[0], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(n, dim=-1).indices, True)
    return keep.reshape(scores.shape)


# --------------------------------------------------------------------------
# selection: a pure function
# --------------------------------------------------------------------------

F, T = False, True


@pytest.mark.parametrize(("pattern", "expected"), [
    ((2, 4), [F, F, T, T, F, F, T, T]),
    ((1, 4), [F, F, F, T, F, F, F, T]),
    ((4, 8), [F, F, F, F, T, T, T, T]),
    ((3, 4), [F, T, T, T, F, T, T, T]),
])
def test_row_one_to_eight_hand_computed(pattern, expected):
    masks = select_n_m({"w": torch.arange(1.0, 9.0).reshape(1, 8)}, *pattern)
    assert masks["w"].tolist() == [expected]


def test_groups_follow_the_unit_axis_and_a_conv_filters_flattened_fan_in():
    scores = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])
    # GPT-2's Conv1D stores in × out: units on axis 1, groups run down a column
    assert select_n_m({"c": scores.T}, 2, 4, axes={"c": 1})["c"].T.tolist() == [[T, T, F, F, T, T, F, F]]
    # a conv filter (1 unit, 2 channels, 2 × 2 kernel): groups are consecutive entries of C·kh·kw
    conv = torch.arange(1.0, 9.0).reshape(1, 2, 2, 2)
    assert select_n_m({"k": conv}, 2, 4)["k"].tolist() == [[[[F, F], [T, T]], [[F, F], [T, T]]]]


def test_ties_are_broken_at_random_by_the_seed_not_by_position():
    flat = {"w": torch.zeros(400, 4)}  # 400 groups of equal scores
    first = select_n_m(flat, 2, 4, generator=0)["w"]
    assert torch.equal(first, select_n_m(flat, 2, 4, generator=0)["w"])
    assert not torch.equal(first, select_n_m(flat, 2, 4, generator=1)["w"])
    assert (first.sum(1) == 2).all()
    share = first.float().mean(0)  # each position kept in about half of the groups, none always pruned
    assert ((share > 0.4) & (share < 0.6)).all(), share


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    units=st.integers(1, 6), groups=st.integers(1, 4), m=st.sampled_from([2, 4, 8]), data=st.data(),
    distinct=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_shapes_keep_exactly_n_of_the_most_significant_in_every_group(units, groups, m, data, distinct, seed):
    n = data.draw(st.integers(1, m - 1))
    generator = torch.Generator().manual_seed(seed)
    fan_in = groups * m
    if distinct:
        scores = torch.randperm(units * fan_in, generator=generator).float().reshape(units, fan_in)
    else:  # many ties
        scores = torch.randint(0, 3, (units, fan_in), generator=generator).float()
    mask = select_n_m({"w": scores}, n, m, generator=seed)["w"]
    assert mask.shape == scores.shape and mask.dtype == torch.bool
    assert (kept_per_group(mask, m) == n).all()
    assert int((~mask).sum()) == (m - n) * units * groups  # exact count
    grouped, kept = scores.reshape(units, groups, m), mask.reshape(units, groups, m)
    lowest_kept = torch.where(kept, grouped, torch.inf).amin(-1)
    highest_pruned = torch.where(kept, -torch.inf, grouped).amax(-1)
    assert (lowest_kept >= highest_pruned).all()  # never a less significant weight kept over a more significant one
    if distinct:
        assert torch.equal(mask, top_n_reference(scores, n, m))


def test_entries_already_pruned_stay_pruned_even_beyond_the_pattern():
    scores = torch.tensor([[1.0, 2, 3, 4, -torch.inf, -torch.inf, -torch.inf, 5]])
    assert select_n_m({"w": scores}, 2, 4)["w"].tolist() == [[F, F, T, T, F, F, F, T]]


@pytest.mark.parametrize("text", ["2:", "5:4", "0:4", "a:b", "4:4", "2:4:8", ":4", "-1:4"])
def test_bad_patterns_are_one_line_errors(text):
    with pytest.raises(ConfigError, match=BAD_PATTERN + repr(text).replace("\\", "\\\\") + "$"):
        parse_n_m(text)


def test_parse_sparsity_tells_fractions_from_patterns():
    assert parse_n_m("2:4") == (2, 4) and parse_n_m(" 1 : 4 ") == (1, 4)
    assert parse_sparsity("4:8") == (4, 8) and parse_sparsity(0.5) == 0.5 and parse_sparsity("0.5") == 0.5
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\), got 1\.5$"):
        parse_sparsity(1.5)


def test_is_n_m_checks_every_group():
    mask = torch.tensor([[1, 1, 0, 0, 0, 1, 0, 1], [0, 0, 0, 1, 1, 0, 1, 0]])
    assert bingo.is_n_m(mask, 2, 4) and bingo.is_n_m(mask.bool(), 2, 4) and not bingo.is_n_m(mask, 1, 4)
    one_too_many = mask.clone()
    one_too_many[1, 5] = 1  # the last group of the second row keeps 3 of 4
    assert not bingo.is_n_m(one_too_many, 2, 4)
    assert bingo.is_n_m(mask.T, 2, 4, axis=1) and not bingo.is_n_m(one_too_many.T, 2, 4, axis=1)
    assert not bingo.is_n_m(torch.zeros(2, 6), 2, 4)  # a fan-in of 6 has no whole groups of 4


def test_a_fan_in_that_is_not_a_multiple_of_m_names_the_layer_its_fan_in_and_m():
    with pytest.raises(ConfigError, match=r"'fc\.weight' has fan-in 10, not a multiple of 4 \(the semi-structured kernels take whole groups only\)"):
        select_n_m({"fc.weight": torch.rand(3, 10)}, 2, 4)


# --------------------------------------------------------------------------
# bingo.prune(model, scores, sparsity="N:M") on every layer type that groups differently
# --------------------------------------------------------------------------

def _gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _conv_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, (2, 2)))  # fan-ins 8·3·3 = 72 and 6·2·2 = 24


MODELS = {"linear": _linear_model, "conv": _conv_model, "gpt2-conv1d": _gpt2}


def _units_axis(model, key):
    return bingo.layers.unit_axis(bingo.masks.weight_owner(model, key), key)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_prune_holds_the_pattern_on_every_group_of_every_layer(name, pattern):
    model = MODELS[name]()
    n, m = parse_n_m(pattern)
    scores = bingo.magnitude_scores(model)
    masks = bingo.prune(model, scores, pattern)
    assert set(masks) == set(scores)
    for key, mask in masks.items():
        axis = _units_axis(model, key)
        assert (name == "gpt2-conv1d") == (axis == 1)
        weight = model.get_submodule(key.rsplit(".", 1)[0]).weight
        assert (kept_per_group(mask, m, axis) == n).all(), key
        assert (kept_per_group(weight != 0, m, axis) <= n).all(), key  # the weight the forward uses
        assert int((~mask).sum()) == mask.numel() * (m - n) // m  # exact
        units_first = scores[key].transpose(0, 1) if axis == 1 else scores[key]
        reference = top_n_reference(units_first.reshape(units_first.shape[0], -1), n, m).reshape(units_first.shape)
        assert torch.equal(mask, reference.transpose(0, 1) if axis == 1 else reference), key  # the most significant kept


def test_scope_does_not_change_an_n_m_prune():
    model = _linear_model()
    scores = bingo.magnitude_scores(model)
    masks = {scope: bingo.prune(copy.deepcopy(model), scores, "2:4", scope) for scope in ("global", "layer", "lamp", "block")}
    for scope, mask in masks.items():
        assert all(torch.equal(mask[key], masks["global"][key]) for key in mask), scope


def test_masks_only_shrink_and_groups_already_beyond_the_pattern_stay_so():
    model = _linear_model()
    scores = bingo.magnitude_scores(model)
    before = bingo.prune(model, bingo.random_scores(model, seed=3), 0.6, "layer")
    with pytest.warns(UserWarning, match=r"groups of 4 were already pruned beyond 2:4 \(more than 2 of 4 pruned\); masks only shrink"):
        after = bingo.prune(model, scores, "2:4")
    for key in scores:
        assert not (after[key] & ~before[key]).any()  # nothing pruned came back
        kept_before, kept_after = kept_per_group(before[key], 4), kept_per_group(after[key], 4)
        assert torch.equal(kept_after, kept_before.clamp(max=2))  # exactly 2:4 where it could be, sparser where it was


def test_neuron_scores_are_refused_in_one_line():
    model = _linear_model()
    with pytest.raises(ConfigError, match=r"^N:M sparsity prunes single weights; the scores of '0\.weight' are per unit \(neuron granularity, shape \(16,\)\): score per weight$"):
        bingo.prune(model, bingo.magnitude_scores(model, "neuron"), "2:4")
    assert not hasattr(model[0], "weight_mask")


def test_a_layer_whose_fan_in_does_not_fit_is_refused_before_any_mask_goes_on():
    model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(ConfigError, match=r"'2\.weight' has fan-in 6, not a multiple of 4"):
        bingo.prune(model, bingo.magnitude_scores(model), "2:4")
    assert not any(hasattr(module, "weight_mask") for module in model)


# --------------------------------------------------------------------------
# compensation keeps the pattern and re-fits under it
# --------------------------------------------------------------------------

def _correlated_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=torch.Generator().manual_seed(99))
    return torch.randn(n, width, generator=generator) @ mixing


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_compensation_keeps_the_pattern_and_lowers_the_layers_error(pattern):
    n, m = parse_n_m(pattern)
    dense = _linear_model()
    model = copy.deepcopy(dense)
    bingo.prune(model, bingo.magnitude_scores(model), pattern)
    calibration, held_out = _correlated_inputs(1024, 16, 0), _correlated_inputs(512, 16, 1)

    def error(layer) -> float:
        with torch.no_grad():
            return float((layer(held_out) - dense[0](held_out)).square().mean())

    uncompensated = error(model[0])
    result = bingo.compensate(model, None, calibration)
    assert "0.weight" in result.layers
    for index in (0, 2, 4):
        layer = model[index]
        assert (kept_per_group(layer.weight_mask, m) == n).all()
        assert (kept_per_group(layer.weight != 0, m) <= n).all()
    assert error(model[0]) < 0.8 * uncompensated, (error(model[0]), uncompensated)


def test_compensation_keeps_the_pattern_on_gpt2_conv1d_columns():
    model = _gpt2()
    bingo.prune(model, bingo.magnitude_scores(model), "2:4")
    tokens = torch.randint(32, (256, 8), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = bingo.compensate(model, None, {"input_ids": tokens})
    assert result.layers
    for key in bingo.magnitude_scores(model):
        module = model.get_submodule(key.rsplit(".", 1)[0])
        assert (kept_per_group(module.weight_mask, 4, units_axis=1) == 2).all(), key
        assert (kept_per_group(module.weight != 0, 4, units_axis=1) <= 2).all(), key


# --------------------------------------------------------------------------
# bingo.to_semi_structured
# --------------------------------------------------------------------------

def test_to_semi_structured_without_a_gpu_names_the_layers_it_would_convert():
    model = _linear_model()
    bingo.prune(model, bingo.magnitude_scores(model), "2:4")
    cuda = "" if torch.cuda.is_available() else " and CUDA is not available"
    with pytest.raises(ConfigError, match=rf"^semi-structured sparse kernels need a CUDA GPU; the model is on cpu{cuda}; would have converted 3 nn\.Linear: 0, 2, 4$"):
        bingo.to_semi_structured(model)
    assert hasattr(model[0], "weight_mask")  # nothing changed


def test_to_semi_structured_refuses_a_layer_not_in_the_2_4_pattern_and_an_unpruned_model():
    model = _linear_model()
    with pytest.raises(ConfigError, match=r"^Sequential has no pruned nn\.Linear to convert; prune it with bingo\.prune\(model, scores, sparsity='2:4'\) first$"):
        bingo.to_semi_structured(model)
    scores = bingo.magnitude_scores(model)
    bingo.prune(model, {key: scores[key] for key in ("0.weight", "4.weight")}, "2:4")
    bingo.prune(model, {"2.weight": scores["2.weight"]}, 0.5, "layer")
    with pytest.raises(ConfigError, match=r"^'2' \(nn\.Linear \(8, 16\)\) is not pruned 2:4: some group of 4 consecutive inputs of a row keeps more than 2; "):
        bingo.to_semi_structured(model)
    one_to_four = _linear_model()
    bingo.prune(one_to_four, bingo.magnitude_scores(one_to_four), "1:4")  # at most 2 of 4: the kernels take it
    with pytest.raises(ConfigError, match=r"need a CUDA GPU"):
        bingo.to_semi_structured(one_to_four)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured sparse kernels need a CUDA GPU")
def test_to_semi_structured_converts_2_4_linears_and_computes_what_the_masked_model_did():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64)).half().cuda().eval()
    bingo.prune(model, bingo.magnitude_scores(model), "2:4")
    x = torch.randn(32, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = model(x)
    assert bingo.to_semi_structured(model) == ("0", "2")
    from torch.sparse import SparseSemiStructuredTensor

    assert isinstance(model[0].weight, SparseSemiStructuredTensor) and not hasattr(model[0], "weight_mask")
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------
# the CLI: bingo run --sparsity 2:4
# --------------------------------------------------------------------------

def test_cli_run_at_2_4_records_the_pattern_and_saves_a_2_4_model(capsys, tmp_path):
    out, saved = tmp_path / "out.json", tmp_path / "model.pt"
    code, stdout, err = call(capsys, "run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--no-progress",
                             "--sparsity", "0.5,2:4", "--out", out, "--save", saved)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert [row["sparsity"] for row in report["results"]] == [0.5, "2:4"]
    assert report["results"][1]["measured_sparsity"] == 0.5 and "measured_sparsity" not in report["results"][0]
    assert "2:4 (0.5000)" in stdout
    state = torch.load(saved, weights_only=True)
    assert state["sparsity"] == "2:4"
    masks = {key: value for key, value in state["state_dict"].items() if key.endswith("weight_mask")}
    assert len(masks) == 3
    for key, mask in masks.items():
        assert (kept_per_group(mask, 4) == 2).all(), key


@pytest.mark.parametrize("text", ["2:", "5:4", "0:4", "a:b", "0.5,2:"])
def test_cli_bad_patterns_exit_2_in_one_line(capsys, tmp_path, text):
    out = tmp_path / "out.json"
    code, stdout, err = call(capsys, "run", "--data", "digits", "--model", "mlp", "--sparsity", text, "--out", out)
    assert_user_error(code, err, r"argument --sparsity: " + BAD_PATTERN)
    assert stdout == "" and not out.exists()


@pytest.mark.parametrize(("model", "extra", "pattern"), [
    ("mlp", ("--method", "gmp"), r"--sparsity 2:4 \(an N:M pattern\) needs a method that prunes once after training \(bingo, bingo-paper, magnitude, random\); 'gmp' does not$"),
    ("mlp", ("--method", "magnitude", "--granularity", "neuron"), r"--sparsity 2:4 \(an N:M pattern\) prunes single weights; it needs --granularity weight$"),
    ("conv", (), r"'features\.0\.weight' has fan-in 9, not a multiple of 4"),  # the first conv: 1 channel, 3 × 3
])
def test_cli_n_m_that_cannot_run_is_refused_before_training(capsys, tmp_path, monkeypatch, model, extra, pattern):
    out = tmp_path / "out.json"

    def no_training(*args, **kwargs):
        raise AssertionError("trained before refusing the pattern")

    monkeypatch.setattr(bingo.bench.strategies.base.Experiment, "train", no_training)
    code, stdout, err = call(capsys, "run", "--data", "digits", "--model", model, "--epochs", "1", "--no-progress",
                             "--sparsity", "2:4", "--out", out, *extra)
    assert_user_error(code, err, pattern)
    assert stdout == "" and not out.exists()


def test_cli_compare_says_where_n_m_runs(capsys, tmp_path):
    code, _, err = call(capsys, "compare", "--data", "digits", "--model", "mlp", "--sparsities", "0.5,2:4", "--out", tmp_path / "c")
    assert_user_error(code, err, r"bingo compare takes fractions in \[0, 1\) only, got '0\.5,2:4'; an N:M pattern runs with 'bingo run --sparsity 2:4'$")
