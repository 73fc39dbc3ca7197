"""Pruned attention keeps training: nn.MultiheadAttention never calls its out_proj, so its mask needs bingo's hook."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import bingo


class TransformerClassifier(nn.Module):
    """Sequences of 8 features (or, with ``tokens``, of token ids below 30) -> 3 classes."""

    def __init__(self, layers: int = 2, tokens: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(30, 16) if tokens else nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(dim=1))


def _batch(tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randint(0, 30, (32, 5)) if tokens else torch.randn(32, 5, 8)
    return x, torch.randint(0, 3, (32,))


def _fine_tune(model: nn.Module, steps: int = 3, tokens: bool = False, search: bingo.TicketSearch | None = None) -> None:
    x, y = _batch(tokens)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if search is not None:
            search.step(x, y)


def test_every_unpruned_weight_of_a_pruned_transformer_trains_and_pruned_ones_stay_zero():
    model = TransformerClassifier()
    masks = bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    assert "encoder.layers.0.self_attn.out_proj.weight" in masks
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _fine_tune(model)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        key = name.replace("weight_orig", "weight")
        changed = parameter.detach() != before[name]
        if key in masks:  # survivors move; what the mask removed contributes nothing
            kept = masks[key].bool()
            assert bool(changed[kept].all()), f"{name}: some kept weights did not change"
        else:
            assert bool(changed.any()), f"{name} did not change"
    for key, mask in masks.items():
        module = model.get_submodule(key.rpartition(".")[0])
        assert bool((module.weight[~mask.bool()] == 0).all())
    # the attention's effective weight is the masked one in the forward pass
    attention = model.encoder.layers[0].self_attn
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        got = attention(x, x, x, need_weights=False)[0]
        reference = copy.deepcopy(attention)
        bingo.make_permanent(reference)
        assert torch.allclose(got, reference(x, x, x, need_weights=False)[0], atol=1e-6)
        assert torch.equal(reference.out_proj.weight, attention.out_proj.weight_orig * attention.out_proj.weight_mask)


def test_a_pruned_transformer_copies_and_loses_its_hooks_when_made_permanent():
    model = TransformerClassifier()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    _fine_tune(model, steps=1)
    copied = copy.deepcopy(model)  # no tensor with autograd history left on a module
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(copied(x), expected)
        bingo.make_permanent(model)
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_coverage_names_what_is_not_scored_on_a_transformer():
    model = TransformerClassifier()
    summary = bingo.TicketSearch(model, estimator="taylor").coverage()
    # d = 16, 2 layers: per layer out_proj 16x16, linear1 32x16, linear2 16x32 (scored), in_proj 48x16;
    # embed 16x8 and head 3x16 scored too
    per_layer = 16 * 16 + 32 * 16 + 16 * 32
    assert (summary.tensors, summary.scored) == (8, 2 * per_layer + 16 * 8 + 3 * 16)
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert summary.unscored["attention q/k/v projections (MultiheadAttention.in_proj_weight)"] == 2 * 48 * 16
    assert summary.unscored["normalisation"] == 2 * 2 * 16  # norm1, norm2 weights (their biases count as biases)
    assert sum(summary.unscored.values()) == summary.total - summary.scored
    assert str(summary).startswith(f"scoring 8 weight tensors: {summary.scored:,} of {summary.total:,} parameters (")
    # after pruning: entries removed over all parameters
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    assert bingo.pruned_parameters(model) == round(0.5 * summary.scored)


def test_embeddings_are_scored_and_pruned_on_request():
    model = TransformerClassifier(layers=1, tokens=True)
    assert "embed.weight" not in bingo.TicketSearch(model, estimator="taylor").layers  # not by default
    search = bingo.TicketSearch(model, estimator="taylor", include=["*"])  # every weight of two or more dimensions
    assert list(search.layers) == ["embed.weight", "encoder.layers.0.self_attn.out_proj.weight",
                                   "encoder.layers.0.linear1.weight", "encoder.layers.0.linear2.weight", "head.weight"]
    _fine_tune(model, tokens=True, search=search)
    masks = bingo.prune(model, search.significance(), 0.5)
    before = model.embed.weight_orig.detach().clone()
    _fine_tune(model, steps=2, tokens=True)
    assert bool((model.embed.weight[~masks["embed.weight"]] == 0).all())
    assert not torch.equal(model.embed.weight_orig.detach(), before)
