"""Selection: exact counts, hand-checked cases, reference checks against torch's pruning."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune as torch_prune

import bingo
from bingo.errors import ConfigError
from bingo.selection import block_of, pruning_order, select_masks
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
    with pytest.raises(ConfigError, match="unknown scope 'net'; valid choices: global, layer, lamp, block$"):
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


def test_block_scope_by_hand_each_block_to_the_sparsity_one_ranking_inside():
    scores = {
        "h.0.a.weight": torch.tensor([1.0, 5.0, 2.0, 6.0]),
        "h.0.b.weight": torch.tensor([3.0, 7.0, 4.0, 8.0]),
        "h.1.a.weight": torch.tensor([100.0, 200.0, 300.0, 400.0]),
        "h.1.b.weight": torch.tensor([0.5, 50.0, 150.0, 250.0]),
        "head.weight": torch.tensor([1.0, 2.0]),  # no numeric index: a block of its own
    }
    masks = select_masks(scores, 0.5, "block")
    assert list(masks) == list(scores)
    F, T = False, True
    assert masks["h.0.a.weight"].tolist() == [F, T, F, T] and masks["h.0.b.weight"].tolist() == [F, T, F, T]  # 1 2 3 4 go
    assert masks["h.1.a.weight"].tolist() == [F, T, T, T] and masks["h.1.b.weight"].tolist() == [F, F, F, T]  # 0.5 50 100 150
    assert masks["head.weight"].tolist() == [F, T]
    # one global ranking takes the 9 of 18 mostly from the small-scale block: h.1 loses 2 of its 8 (0.5, 50), h.0 6 of 8
    everything = select_masks(scores, 0.5, "global")
    assert everything["h.1.a.weight"].all() and everything["h.1.b.weight"].tolist() == [F, F, T, T]
    assert everything["h.0.a.weight"].tolist() == [F, F, F, T] and everything["h.0.b.weight"].tolist() == [F, F, F, T]
    # inside a block the global floor holds: each tensor keeps max(1, 1%) of its entries
    pair = {"h.0.a.weight": torch.tensor([1.0, 2.0]), "h.0.b.weight": torch.tensor([10.0, 20.0])}
    assert [m.tolist() for m in select_masks(pair, 0.5, "block").values()] == [[F, T], [F, T]]
    assert [m.tolist() for m in select_masks(pair, 0.5, "block", min_keep=0).values()] == [[F, F], [T, T]]


def test_what_a_block_is():
    assert block_of("transformer.h.0.attn.c_attn.weight") == "transformer.h.0."
    assert block_of("encoder.layers.11.self_attn.in_proj_weight") == "encoder.layers.11."
    assert block_of("stages.0.1.conv1.weight") == "stages.0."  # the first index: a ResNet stage
    assert block_of("0.weight") == "0."
    assert [block_of(k) for k in ("lm_head.weight", "h10.weight", "fc1.weight")] == ["lm_head.weight", "h10.weight", "fc1.weight"]
    assert block_of("stages.0.1.conv1.weight", r"stages\.\d+\.\d+\.") == "stages.0.1."
    assert block_of("h.3.mlp.weight", lambda key: "odd" if int(key.split(".")[1]) % 2 else "even") == "odd"
    scores = {f"h.{i}.w": torch.arange(4.0) + 10 * i for i in range(4)}
    halves = select_masks(scores, 0.5, "block", blocks=lambda key: "low" if key < "h.2" else "high", min_keep=0)
    assert [m.tolist() for m in halves.values()] == [[False] * 4, [True] * 4, [False] * 4, [True] * 4]


def test_block_scope_errors_are_one_line():
    one = {"h.0.w": torch.ones(3)}
    with pytest.raises(ConfigError, match=r"^blocks= says what a block is for scope='block'; scope is 'global'$"):
        select_masks(one, 0.5, "global", blocks=r"h\.\d+\.")
    with pytest.raises(ConfigError, match=r"^blocks '\(' is not a regular expression: "):
        select_masks(one, 0.5, "block", blocks="(")
    with pytest.raises(ConfigError, match=r"^blocks\('h\.0\.w'\) returned int; it must return the block's name, a str$"):
        select_masks(one, 0.5, "block", blocks=lambda key: 0)
    with pytest.raises(ConfigError, match=r"^blocks must be a regular expression or a function key -> block name, got list$"):
        select_masks(one, 0.5, "block", blocks=["h.0."])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6),
    sparsity=st.floats(0, 0.999),
    seed=st.integers(0, 10),
)
def test_block_scope_is_exact_per_block(sizes, sparsity, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = {f"blocks.{i % 3}.l{i}.weight": torch.randint(0, 4, (n,), generator=generator).float() for i, n in enumerate(sizes)}
    masks = select_masks(scores, sparsity, "block", min_keep=0)
    for block in {block_of(k) for k in scores}:
        keys = [k for k in scores if block_of(k) == block]
        assert sum(int((~masks[k]).sum()) for k in keys) == round(sparsity * sum(scores[k].numel() for k in keys))
        kept = torch.cat([scores[k][masks[k]] for k in keys])
        pruned = torch.cat([scores[k][~masks[k]] for k in keys])
        if len(kept) and len(pruned):
            assert pruned.max() <= kept.min()


class Encoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _pruned_per_block(masks: dict[str, torch.Tensor], blocks=None) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for key, mask in masks.items():
        pruned, total = counts.get(block_of(key, blocks), (0, 0))
        counts[block_of(key, blocks)] = (pruned + int((~mask).sum()), total + mask.numel())
    return counts


def test_prune_with_block_scope_gives_every_transformer_block_the_sparsity():
    model = Encoder()
    scores = bingo.magnitude_scores(model)
    for key in scores:
        if key.startswith("encoder.layers.1."):
            scores[key] = scores[key] * 100  # block 1 on a larger scale
    emptied, total = _pruned_per_block(select_masks(scores, 0.8, "global"))["encoder.layers.0."]
    assert emptied > 0.98 * total  # one global ranking all but empties block 0 (the 98-99%)
    masks = bingo.prune(model, scores, 0.8, scope="block")
    per_block = _pruned_per_block(masks)
    assert list(per_block) == ["encoder.layers.0.", "encoder.layers.1.", "head.weight"]
    assert all(pruned == round(0.8 * total) for pruned, total in per_block.values())
    assert bingo.model_sparsity(model, list(masks)) == pytest.approx(0.8, abs=1e-3)

    # a model whose first index is not the block's (a Sequential around the encoder) says what a block is
    wrapped = torch.nn.Sequential(Encoder().encoder, torch.nn.Linear(16, 3))
    scores = bingo.magnitude_scores(wrapped)
    assert set(_pruned_per_block(select_masks(scores, 0.8, "block"))) == {"0.", "1."}  # the default: the whole encoder is block 0.
    masks = bingo.prune(wrapped, scores, 0.8, scope="block", blocks=r"0\.layers\.\d+\.")
    per_block = _pruned_per_block(masks, r"0\.layers\.\d+\.")
    assert list(per_block) == ["0.layers.0.", "0.layers.1.", "1.weight"]
    assert all(pruned == round(0.8 * total) for pruned, total in per_block.values())
