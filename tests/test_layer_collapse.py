"""Layer collapse: the global scopes' per-layer floor, and LAMP allocation (issue 10, item 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bingo
from bingo.bench.cli import main
from bingo.bench.data import FASHION_MNIST_DIR, load_dataset
from bingo.errors import ConfigError
from bingo.bench.models import build_model
from bingo.selection import MIN_KEEP, SCOPES, floor_count, lamp_scores, select_masks
from bingo.bench.strategies.oneshot import OneShotConfig
from bingo.bench.training import TrainConfig, train
from conftest import make_mlp

INF = math.inf


def pruned(masks: dict[str, torch.Tensor]) -> int:
    return sum(int((~m).sum()) for m in masks.values())


# --- the floor -------------------------------------------------------------------------------


def test_floor_count_rule():
    assert MIN_KEEP == 0.01
    assert [floor_count(n) for n in (1, 4, 100, 101, 235200)] == [1, 1, 1, 2, 2352]
    assert floor_count(10, 0.5) == 5 and floor_count(3, 1.0) == 3 and floor_count(50, 0) == 0
    with pytest.raises(ConfigError, match=r"min_keep must be a fraction in \[0, 1\], got 1\.5"):
        select_masks({"w": torch.ones(3)}, 0.5, min_keep=1.5)


def test_floor_keeps_a_tiny_layer_and_the_total_stays_exact():
    # a layer of 4 tiny scores beside a layer of 100 big ones, at 0.5 global: 52 of 104 pruned
    scores = {"small": torch.tensor([0.1, 0.2, 0.3, 0.4]), "big": torch.arange(1.0, 101.0)}
    without = select_masks(scores, 0.5, min_keep=0)
    assert not without["small"].any()  # a plain global ranking empties the small layer
    masks = select_masks(scores, 0.5)
    assert masks["small"].tolist() == [False, False, False, True]  # floor: max(1, ceil(0.01 * 4)) = 1, its best entry
    assert pruned(masks) == 52
    assert masks["big"].tolist() == [False] * 49 + [True] * 51  # the entry the floor saved came from big's next smallest
    masks = select_masks(scores, 0.5, min_keep=0.5)
    assert masks["small"].tolist() == [False, False, True, True] and pruned(masks) == 52


def test_already_pruned_entries_go_first_and_are_never_floored():
    # -inf is how bingo.prune marks entries already pruned: they must stay pruned and count first
    scores = {"a": torch.full((4,), -INF), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    for scope in ("global", "lamp"):
        masks = select_masks(scores, 0.5, scope)
        assert masks["a"].tolist() == [False] * 4 and masks["b"].tolist() == [True] * 4


def test_beyond_the_floors_they_go_too_least_significant_first():
    # N = 8, floors 1 + 1: at 7/8 only one entry can stay, the most significant
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    masks = select_masks(scores, 0.875)
    assert pruned(masks) == 7 and masks["b"].tolist() == [False, False, False, True] and not masks["a"].any()
    masks = select_masks(scores, 0.75)
    assert masks["a"].tolist() == [False, False, False, True] and masks["b"].tolist() == [False, False, False, True]


def test_floor_is_deterministic_and_breaks_ties_at_random():
    scores = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    masks = select_masks(scores, 0.99, generator=3)  # 20 stay: exactly the floors, ceil(0.01 * 1000) each
    assert [int(m.sum()) for m in masks.values()] == [10, 10]
    again = select_masks(scores, 0.99, generator=3)
    assert all(torch.equal(masks[k], again[k]) for k in masks)
    assert not torch.equal(masks["a"], select_masks(scores, 0.99, generator=4)["a"])
    kept = torch.nonzero(masks["a"]).reshape(-1)
    assert kept.max() - kept.min() > 100  # the floor is not the first or last entries by position
    # past the floors, the less significant layer's floor goes first
    masks = select_masks({"a": torch.zeros(500), "b": torch.ones(500)}, 0.995)
    assert [int(m.sum()) for m in masks.values()] == [0, 5]


# --- LAMP ------------------------------------------------------------------------------------


def test_lamp_scores_by_hand():
    # [1, 2, 3]: 1 / (1 + 4 + 9), 4 / (4 + 9), 9 / 9
    assert torch.allclose(lamp_scores(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([1 / 14, 4 / 13, 1.0], dtype=torch.float64))
    # any order and shape; ties share a denominator (so equal scores get equal LAMP); zero scores get 0; -inf stays
    values = lamp_scores(torch.tensor([[3.0, 1.0, 2.0], [2.0, -INF, 0.0]]))
    expected = torch.tensor([[9 / 9, 1 / 18, 4 / 17], [4 / 17, -INF, 0.0]], dtype=torch.float64)
    assert values.shape == (2, 3) and torch.allclose(values, expected)
    assert lamp_scores(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    # LAMP does not care about a layer's overall scale
    assert torch.allclose(lamp_scores(torch.tensor([1.0, 2.0, 3.0]) * 1e-4), lamp_scores(torch.tensor([1.0, 2.0, 3.0])))


@pytest.mark.parametrize("bad,word", [(torch.tensor([1.0, -0.5]), "negative"), (torch.tensor([1.0, INF]), "infinite")])
def test_lamp_refuses_negative_and_infinite_scores(bad, word):
    with pytest.raises(ConfigError, match=rf"scope 'lamp' needs finite scores >= 0 .*; got {word} scores"):
        select_masks({"w": bad}, 0.5, "lamp")


def test_lamp_selection_by_hand():
    # small's LAMP: 0.0333, 0.138, 0.36, 1; big's k-th smallest: k² / Σ_{j≥k} j², 0.0092 at k = 52
    scores = {"small": torch.tensor([0.1, 0.2, 0.3, 0.4]), "big": torch.arange(1.0, 101.0)}
    masks = select_masks(scores, 0.5, "lamp")
    assert masks["small"].all() and masks["big"].tolist() == [False] * 52 + [True] * 48
    # scaling a layer changes nothing (unlike global)
    scaled = select_masks({"small": scores["small"] * 1e3, "big": scores["big"]}, 0.5, "lamp")
    assert all(torch.equal(masks[k], scaled[k]) for k in masks)


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    scales=st.lists(st.sampled_from([1e-3, 1.0, 50.0]), min_size=4, max_size=4),
    sparsity=st.floats(0, 0.999),
    scope=st.sampled_from(["global", "lamp"]),
    min_keep=st.sampled_from([MIN_KEEP, 0.1, 0.3]),
    seed=st.integers(0, 10),
)
def test_global_scopes_exact_total_floor_and_order(sizes, scales, sparsity, scope, min_keep, seed):
    generator = torch.Generator().manual_seed(seed)
    # few distinct values (ties are common) on very different scales per layer (floors bind often)
    scores = {f"l{i}": torch.randint(0, 4, (n,), generator=generator).float() * scales[i] for i, n in enumerate(sizes)}
    masks = select_masks(scores, sparsity, scope, seed, min_keep=min_keep)
    assert list(masks) == list(scores)
    assert all(m.dtype == torch.bool and m.shape == scores[k].shape for k, m in masks.items())
    total = sum(sizes)
    assert pruned(masks) == round(sparsity * total)
    floors = {k: floor_count(s.numel(), min_keep) for k, s in scores.items()}
    kept = {k: int(m.sum()) for k, m in masks.items()}
    if round(sparsity * total) <= total - sum(floors.values()):
        assert all(kept[k] >= floors[k] for k in masks)
    else:
        assert all(kept[k] <= floors[k] for k in masks)  # every entry outside the floors is gone
    # the ranking key: within a tensor, nothing kept ranks below anything pruned
    key = {k: lamp_scores(s) if scope == "lamp" else s.double() for k, s in scores.items()}
    for k in masks:
        if masks[k].any() and (~masks[k]).any():
            assert key[k][~masks[k]].max() <= key[k][masks[k]].min()
    # what a floored layer cannot give comes from the next least significant entries: a layer
    # keeping more than its floor keeps nothing that ranks below anything pruned anywhere
    everything_pruned = torch.cat([key[k][~masks[k]] for k in masks])
    for k in masks:
        if kept[k] > floors[k] and len(everything_pruned):
            assert everything_pruned.max() <= key[k][masks[k]].min()
    # where no floor binds, the masks are exactly those without a floor
    plain = select_masks(scores, sparsity, scope, seed, min_keep=0)
    if all(int(plain[k].sum()) >= floors[k] for k in plain):
        assert all(torch.equal(masks[k], plain[k]) for k in masks)


# --- today's results are unchanged where no layer is nearly emptied --------------------------


CASES = [("digits", "mlp"), ("digits", "conv"), ("fashion-mnist", "lenet300")]


@pytest.mark.parametrize("data_name,model_name", CASES, ids=[m for _, m in CASES])
def test_no_floor_binds_on_trained_models_up_to_95_percent(data_name, model_name):
    if data_name == "fashion-mnist" and not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    data = load_dataset(data_name)
    model = build_model(model_name, data.input_shape, data.num_classes)
    train(model, data, TrainConfig(epochs=3), progress=False)
    scores = bingo.magnitude_scores(model)
    for sparsity in (0.9, 0.95):
        masks = select_masks(scores, sparsity)
        plain = select_masks(scores, sparsity, min_keep=0)
        assert all(torch.equal(masks[k], plain[k]) for k in masks)
        # and not by a hair: every layer keeps at least twice its floor
        assert all(int(m.sum()) >= 2 * floor_count(m.numel()) for m in plain.values()), {
            k: float(m.float().mean()) for k, m in plain.items()
        }


# --- the scope flows to prune, prune_to_accuracy, the strategies and the CLI ------------------


def test_lamp_is_a_scope_everywhere():
    assert SCOPES == ("global", "layer", "lamp", "block")
    assert OneShotConfig(scope="lamp").scope == "lamp"
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    masks = bingo.prune(model, scores, 0.9, scope="lamp")
    expected = select_masks(scores, 0.9, "lamp")
    assert all(torch.equal(masks[k].bool(), expected[k]) for k in expected)
    assert all(m.any() for m in masks.values())


def test_prune_to_accuracy_bisects_lamp_entry_by_entry_like_global():
    scores = bingo.magnitude_scores(make_mlp())
    n = sum(s.numel() for s in scores.values())

    def zeros(model) -> int:
        return sum(int((model[i].weight == 0).sum()) for i in (1, 3, 5))

    for scope in ("global", "lamp"):
        model = make_mlp()
        result = bingo.prune_to_accuracy(model, scores, lambda m: 1.0 if zeros(m) <= 137 else 0.0, min_accuracy=0.5, scope=scope)
        assert round(result.sparsity * n) == 137 and zeros(model) == 137  # one entry resolution, as globally
        expected = select_masks(scores, 137 / n, scope)
        assert all(torch.equal(result.masks[k], expected[k]) for k in expected)
        assert result.evaluations <= math.ceil(math.log2(n)) + 2


def test_cli_takes_scope_lamp(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--method", "magnitude", "--scope", "lamp",
                 "--sparsity", "0.9", "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["scope"] == "lamp"
