"""Inside bingo.cached_masks(), masked forwards outside training reuse orig * mask while neither changed; outside it, torch's behaviour."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import bingo


def _masked(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(seed)
    layer = nn.Linear(6, 4)
    keep = torch.rand(4, 6) > 0.5
    bingo.apply_masks(layer, {"weight": keep})
    return layer, keep


@pytest.fixture
def products(monkeypatch) -> list:
    """Grows by one entry each time a masked weight is multiplied out (torch's ``apply_mask``)."""
    calls = []
    real = torch_prune.BasePruningMethod.apply_mask
    monkeypatch.setattr(torch_prune.BasePruningMethod, "apply_mask", lambda self, m: calls.append(1) or real(self, m))
    return calls


def test_eval_forwards_compute_the_masked_weight_once_until_something_changes(products):
    layer, keep = _masked()
    calls = products
    calls.clear()  # the product torch computes as the mask goes on
    x = torch.randn(3, 6)
    with torch.no_grad(), bingo.cached_masks():
        first = layer(x)
        second = layer(x)
        assert len(calls) == 1 and torch.equal(first, second)
        layer.weight_orig.mul_(2)  # an in-place write: the next forward sees it
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight_orig * keep, layer.bias))
        layer.weight_mask.zero_()  # so does a write into the mask
        torch.testing.assert_close(layer(x), layer.bias.expand(3, -1))
    assert len(calls) == 3


def test_training_is_identical_to_torch_prune():
    ours, keep = _masked()
    theirs = nn.Linear(6, 4)
    theirs.load_state_dict({"weight": ours.weight_orig.detach().clone(), "bias": ours.bias.detach().clone()})
    torch_prune.custom_from_mask(theirs, "weight", keep)
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    for step in range(3):
        for model, optimiser in zip((ours, theirs), optimisers):
            with torch.no_grad(), bingo.cached_masks():
                model(x)  # an evaluation between steps fills the cache; training must not use a stale one
            loss = F.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        torch.testing.assert_close(ours.weight_orig, theirs.weight_orig, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_copies_and_pickles_compute_the_same_and_own_their_cache():
    layer, _ = _masked()
    x = torch.randn(2, 6)
    with torch.no_grad(), bingo.cached_masks():
        layer(x)
        twin = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        twin.weight_orig.add_(1)  # the copy's weights are its own
        torch.testing.assert_close(twin(x), F.linear(x, twin.weight_orig * twin.weight_mask, twin.bias))
        torch.testing.assert_close(layer(x), loaded(x))
        assert not torch.equal(twin(x), layer(x))
    bingo.make_permanent(layer)
    assert not hasattr(layer, "weight_orig") and not layer._forward_pre_hooks


def test_outside_the_block_every_forward_recomputes_like_torch_prune(products):
    layer, keep = _masked()
    calls = products
    calls.clear()  # the product torch computes as the mask goes on
    x = torch.randn(3, 6)
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(calls) == 2
    with torch.no_grad(), bingo.cached_masks():
        layer(x)
        with bingo.cached_masks():  # nests
            layer(x)
        layer(x)
    assert len(calls) == 3
    with torch.no_grad(), bingo.cached_masks():  # a later block never reuses an earlier block's product
        layer(x)
    assert len(calls) == 4


def test_a_write_through_data_between_blocks_is_seen():
    # the rewind / hand-written-optimizer idiom: p.data.copy_(...) bumps no version counter
    layer, keep = _masked()
    x = torch.randn(2, 6)
    new = torch.randn(4, 6)
    with torch.no_grad():
        with bingo.cached_masks():
            layer(x)
        layer.weight_orig.data.copy_(new)
        torch.testing.assert_close(layer(x), F.linear(x, new * keep, layer.bias), rtol=0, atol=0)
        with bingo.cached_masks():
            torch.testing.assert_close(layer(x), F.linear(x, new * keep, layer.bias), rtol=0, atol=0)


def test_a_frozen_masked_weight_follows_data_writes_outside_the_block():
    layer, keep = _masked()
    layer.weight_orig.requires_grad_(False)
    x = torch.randn(2, 6)
    layer(x)
    layer.weight_orig.data.mul_(3)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight_orig * keep, layer.bias), rtol=0, atol=0)
