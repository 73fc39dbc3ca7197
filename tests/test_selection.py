"""Selection: exact counts, hand-checked cases, reference checks against torch's pruning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune as torch_prune

import bingo
from bingo.errors import ConfigError
from bingo.selection import pruning_order, select_masks
from conftest import make_mlp


def test_one_to_eight_at_half():
    scores = {"w": torch.arange(1.0, 9.0)}
    assert select_masks(scores, 0.5)["w"].tolist() == [False] * 4 + [True] * 4


def test_global_ranks_across_layers_and_layer_scope_per_tensor():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    masks = select_masks(scores, 0.5, "global", min_keep=0)
    assert masks["a"].tolist() == [False] * 4 and masks["b"].tolist() == [True] * 4
    # by default each tensor keeps its floor (1 entry here); the next least significant entry goes instead
    masks = select_masks(scores, 0.5, "global")
    assert masks["a"].tolist() == [False, False, False, True] and masks["b"].tolist() == [False, True, True, True]
    masks = select_masks(scores, 0.5, "layer")
    assert masks["a"].tolist() == [False, False, True, True] and masks["b"].tolist() == [False, False, True, True]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=4),
    sparsity=st.floats(0, 0.999),
    scope=st.sampled_from(["global", "layer"]),
    seed=st.integers(0, 10),
)
def test_exact_sparsity(sizes, sparsity, scope, seed):
    generator = torch.Generator().manual_seed(seed)
    # few distinct values, so ties are common
    scores = {f"l{i}": torch.randint(0, 4, (n,), generator=generator).float() for i, n in enumerate(sizes)}
    masks = select_masks(scores, sparsity, scope, min_keep=0)  # the floor has its own tests (test_layer_collapse.py)
    if scope == "global":
        assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * sum(sizes))
    else:
        for key, m in masks.items():
            assert int((~m).sum()) == round(sparsity * scores[key].numel())
    # nothing kept scores lower than anything pruned (within a ranking)
    groups = [list(masks)] if scope == "global" else [[k] for k in masks]
    for keys in groups:
        kept = torch.cat([scores[k][masks[k]] for k in keys])
        pruned = torch.cat([scores[k][~masks[k]] for k in keys])
        if len(kept) and len(pruned):
            assert pruned.max() <= kept.min()


def test_ties_are_broken_at_random_not_by_position():
    masks = select_masks({"w": torch.zeros(1000)}, 0.5)["w"]
    assert 200 < int((~masks[:500]).sum()) < 300  # the first half is not pruned wholesale
    assert torch.equal(masks, select_masks({"w": torch.zeros(1000)}, 0.5, generator=0)["w"])  # seeded
    assert not torch.equal(masks, select_masks({"w": torch.zeros(1000)}, 0.5, generator=1)["w"])


def test_pruning_order_refuses_nan():
    with pytest.raises(ConfigError, match="scores contain NaN"):
        pruning_order(torch.tensor([0.1, float("nan")]))


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan"), "lots"])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(ConfigError, match=r"sparsity must be (a number )?in \[0, 1\)"):
        select_masks({"w": torch.ones(3)}, sparsity)


def test_unknown_scope():
    with pytest.raises(ConfigError, match="unknown scope 'net'; valid choices: global, layer, lamp$"):
        select_masks({"w": torch.ones(3)}, 0.5, "net")


@pytest.mark.parametrize("amount", [0.3, 0.5, 0.9])
def test_magnitude_equals_torch_global_unstructured(amount):
    ours, theirs = make_mlp(), make_mlp()
    bingo.prune(ours, bingo.magnitude_scores(ours), amount)
    torch_prune.global_unstructured(
        [(theirs[i], "weight") for i in (1, 3, 5)], pruning_method=torch_prune.L1Unstructured, amount=amount
    )
    for i in (1, 3, 5):
        assert torch.equal(ours[i].weight_mask, theirs[i].weight_mask)
        assert torch.equal(ours[i].weight, theirs[i].weight)


def test_where_torch_global_unstructured_empties_a_layer_ours_keeps_the_floor():
    ours, theirs = make_mlp(), make_mlp()
    bingo.prune(ours, bingo.magnitude_scores(ours), 0.97)
    torch_prune.global_unstructured(
        [(theirs[i], "weight") for i in (1, 3, 5)], pruning_method=torch_prune.L1Unstructured, amount=0.97
    )
    assert [int(theirs[i].weight_mask.sum()) for i in (1, 3, 5)] == [0, 3, 7]  # fc1 (192 weights) emptied
    assert [int(ours[i].weight_mask.sum()) for i in (1, 3, 5)] == [2, 1, 7]  # floors: ceil(1% of 192), 1, 1
    # what the floored fc1 could not give came from the next smallest weights of fc2
    assert torch.equal(ours[5].weight_mask, theirs[5].weight_mask)


def test_layer_scope_equals_torch_l1_unstructured():
    ours, theirs = make_mlp(), make_mlp()
    bingo.prune(ours, bingo.magnitude_scores(ours), 0.6, scope="layer")
    for i in (1, 3, 5):
        torch_prune.l1_unstructured(theirs[i], "weight", amount=0.6)
        assert torch.equal(ours[i].weight_mask, theirs[i].weight_mask)


def test_neuron_magnitude_equals_torch_ln_structured():
    ours, theirs = make_mlp(), make_mlp()
    bingo.prune(ours, bingo.magnitude_scores(ours, "neuron"), 0.5, scope="layer")
    for i in (1, 3):
        torch_prune.ln_structured(theirs[i], "weight", amount=0.5, n=2, dim=0)
        assert torch.equal(ours[i].weight_mask, theirs[i].weight_mask)
    assert not hasattr(ours[5], "weight_mask")  # the output layer keeps its units
