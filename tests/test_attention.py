"""Attention is scored and pruned like any layer: q/k/v (in_proj_weight) by default, and pruned attention keeps training.

nn.MultiheadAttention never calls its out_proj and reads in_proj_weight as a
bare parameter, so both masks need care: bingo's hook for out_proj, torch's
own prune hook on the attention module for in_proj_weight.
"""

from __future__ import annotations

import copy
import warnings

import pytest
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
    assert {"encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.self_attn.in_proj_weight"} <= set(masks)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    _fine_tune(model)
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, f"{name} got no gradient"
        key = name.removesuffix("_orig")
        changed = parameter.detach() != before[name]
        if key in masks:  # survivors move; what the mask removed contributes nothing
            kept = masks[key].bool()
            # a ReLU unit of linear1 that 50% pruning left dead has a zero gradient row: it cannot move
            live = kept & (parameter.grad != 0)
            assert live.sum() > 0.9 * kept.sum(), f"{name}: most kept weights got no gradient"
            assert bool(changed[live].all()), f"{name}: some kept weights with a gradient did not change"
        else:
            assert bool(changed.any()), f"{name} did not change"
    for key, mask in masks.items():
        module_name, _, name = key.rpartition(".")
        assert bool((getattr(model.get_submodule(module_name), name)[~mask.bool()] == 0).all())
    # the attention's effective weight is the masked one in the forward pass
    attention = model.encoder.layers[0].self_attn
    x = torch.randn(4, 5, 16)
    with torch.no_grad():
        got = attention(x, x, x, need_weights=False)[0]
        reference = copy.deepcopy(attention)
        bingo.make_permanent(reference)
        assert torch.allclose(got, reference(x, x, x, need_weights=False)[0], atol=1e-6)
        assert torch.equal(reference.out_proj.weight, attention.out_proj.weight_orig * attention.out_proj.weight_mask)
        assert torch.equal(reference.in_proj_weight, attention.in_proj_weight_orig * attention.in_proj_weight_mask)
        # the whole pruned model in eval mode (where torch may take its fused fast path) after a training step
        # computes what the permanent copy computes: no masked tensor is stale
        model.eval()
        tokens = torch.randn(4, 5, 8)
        permanent = copy.deepcopy(model)
        bingo.make_permanent(permanent)
        assert torch.allclose(model(tokens), permanent(tokens), atol=1e-5)


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
    # d = 16, 2 layers: per layer in_proj 48x16, out_proj 16x16, linear1 32x16, linear2 16x32;
    # embed 16x8 and head 3x16 scored too
    per_layer = 48 * 16 + 16 * 16 + 32 * 16 + 16 * 32
    assert (summary.tensors, summary.scored) == (10, 2 * per_layer + 16 * 8 + 3 * 16)
    assert summary.total == sum(p.numel() for p in model.parameters())
    # in_proj, out_proj, linear1, linear2 and two norms' biases per layer, embed's and head's
    assert summary.unscored["biases"] == 2 * (48 + 16 + 32 + 16 + 2 * 16) + 16 + 3
    assert summary.unscored["normalisation"] == 2 * 2 * 16  # norm1, norm2 weights (their biases count as biases)
    assert set(summary.unscored) == {"biases", "normalisation"}
    assert sum(summary.unscored.values()) == summary.total - summary.scored
    assert str(summary).startswith(f"scoring 10 weight tensors: {summary.scored:,} of {summary.total:,} parameters (")
    # after pruning: entries removed over all parameters
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    assert bingo.pruned_parameters(model) == round(0.5 * summary.scored)


def test_attention_projections_can_be_left_out_and_are_named_when_they_are():
    model = TransformerClassifier(layers=1)
    search = bingo.TicketSearch(model, estimator="taylor", exclude=["*in_proj*"])
    assert "encoder.layers.0.self_attn.in_proj_weight" not in search.layers
    assert search.coverage().unscored["attention q/k/v projections (MultiheadAttention.in_proj_weight)"] == 48 * 16
    only = bingo.TicketSearch(model, estimator="taylor", include=["*in_proj*"])
    assert list(only.layers) == ["encoder.layers.0.self_attn.in_proj_weight"]


def test_neuron_granularity_leaves_attention_projections_out():
    model = TransformerClassifier(layers=1)
    search = bingo.TicketSearch(model, estimator="taylor", granularity="neuron")
    assert not any(key.endswith("in_proj_weight") for key in search.layers)
    assert "head.weight" not in search.layers
    with pytest.raises(bingo.ConfigError, match=r"^neuron granularity needs a hidden layer; .*attention q/k/v projections are not scored as neurons"):
        bingo.TicketSearch(model, estimator="taylor", granularity="neuron", include=["*in_proj*", "head"])
    with pytest.raises(bingo.ConfigError, match=r"^scores for 'encoder.layers.0.self_attn.in_proj_weight' are per unit"):
        bingo.prune(model, {"encoder.layers.0.self_attn.in_proj_weight": torch.rand(48)}, 0.5)


def test_separate_q_k_v_projections_are_scored_and_pruned():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2, kdim=8, vdim=12, batch_first=True)
    model = nn.ModuleDict({"attention": attention, "head": nn.Linear(16, 3)})
    assert [key for key in bingo.find_layers(model)] == [
        "attention.q_proj_weight", "attention.k_proj_weight", "attention.v_proj_weight",
        "attention.out_proj.weight", "head.weight"]
    masks = bingo.prune(model, bingo.magnitude_scores(model), 0.75)
    assert bingo.model_sparsity(model) == 0.75  # 660 of 880 weights, exact
    assert sum(int((~m).sum()) for m in masks.values()) == 660
    q, k, v = torch.randn(2, 4, 16), torch.randn(2, 6, 8), torch.randn(2, 6, 12)
    out = attention(q, k, v, need_weights=False)[0]
    out.sum().backward()
    for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
        mask = masks[f"attention.{name}"]
        assert bool((getattr(attention, name)[~mask] == 0).all())
        assert getattr(attention, f"{name}_orig").grad is not None
    reference = copy.deepcopy(attention)
    bingo.make_permanent(reference)
    assert torch.allclose(out, reference(q, k, v, need_weights=False)[0], atol=1e-6)


def test_embeddings_are_scored_and_pruned_on_request():
    model = TransformerClassifier(layers=1, tokens=True)
    assert "embed.weight" not in bingo.TicketSearch(model, estimator="taylor").layers  # not by default
    search = bingo.TicketSearch(model, estimator="taylor", include=["*"])  # every weight of two or more dimensions
    assert list(search.layers) == ["embed.weight", "encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.out_proj.weight",
                                   "encoder.layers.0.linear1.weight", "encoder.layers.0.linear2.weight", "head.weight"]
    _fine_tune(model, tokens=True, search=search)
    masks = bingo.prune(model, search.significance(), 0.5)
    before = model.embed.weight_orig.detach().clone()
    _fine_tune(model, steps=2, tokens=True)
    assert bool((model.embed.weight[~masks["embed.weight"]] == 0).all())
    assert not torch.equal(model.embed.weight_orig.detach(), before)


@pytest.mark.parametrize("pruned_first", [False, True], ids=["dense", "pruned"])
def test_a_transformer_is_searched_without_being_perturbed_and_probes_reach_q_k_v(pruned_first):
    """Training with the search is bit-identical to training without; fake passes that zero in_proj weights change the loss.

    On a pruned model the probe substitutes in_proj_weight_orig, and torch's prune hook on the attention
    module applies the mask inside the fake pass.
    """
    def train(search_settings=None):
        model = TransformerClassifier(layers=1)
        if pruned_first:
            bingo.prune(model, bingo.magnitude_scores(model), 0.3)
        search = None if search_settings is None else bingo.TicketSearch(model, seed=0, **search_settings)
        torch.manual_seed(3)
        _fine_tune(model, steps=6, search=search)
        return model, search

    reference, _ = train()
    for settings in (dict(estimator="hybrid", metric="loss", every=2), dict(estimator="probe", metric="loss", mode="zero", fraction=0.3)):
        model, search = train(settings)
        assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), reference.state_dict().values()))
    damage = search.estimator.raw_scores("mean")["encoder.layers.0.self_attn.in_proj_weight"].nan_to_num(0.0)
    assert float(damage.abs().max()) > 0.0
    masks = bingo.prune(model, search.significance(), 0.6)
    assert "encoder.layers.0.self_attn.in_proj_weight" in masks
    _fine_tune(model, steps=2)
    assert bool((model.encoder.layers[0].self_attn.in_proj_weight[~masks["encoder.layers.0.self_attn.in_proj_weight"]] == 0).all())


def test_compensation_fits_every_pruned_layer_of_a_transformer_attention_included():
    model = TransformerClassifier(layers=1)
    dense = copy.deepcopy(model).eval()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    uncompensated = copy.deepcopy(model).eval()
    calibration = torch.randn(256, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out
        # every layer re-fitted (random inputs: the first layer's re-fit is no better held out, and would be undone)
        result = bingo.compensate(model, None, calibration, validation=0.0)
    assert result.layers == ("embed.weight", "encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.out_proj.weight",
                             "encoder.layers.0.linear1.weight", "encoder.layers.0.linear2.weight", "head.weight")  # network order
    assert result.skipped == ()
    assert all(result.error_after[key] < result.error_before[key] for key in result.layers)
    attention = model.encoder.layers[0].self_attn
    assert bool((attention.in_proj_weight[~attention.in_proj_weight_mask.bool()] == 0).all())  # masks kept
    # and the model as a whole is closer to the dense one than without the re-fit
    x = torch.randn(64, 5, 8)
    with torch.no_grad():
        gap = (model.eval()(x) - dense(x)).square().mean()
        assert gap < (uncompensated(x) - dense(x)).square().mean()


def test_the_q_k_v_refit_is_the_least_squares_solution_on_the_kept_inputs():
    """Only in_proj pruned, so the attention's inputs are the dense ones: each kept row is a plain least-squares fit."""
    model = TransformerClassifier(layers=1, tokens=True)  # 30 token vectors of 16 dimensions: a design of full rank
    dense = copy.deepcopy(model).eval()
    key = "encoder.layers.0.self_attn.in_proj_weight"
    bingo.prune(model, bingo.magnitude_scores(model, include=["*in_proj*"]), 0.5)
    calibration = torch.randint(0, 30, (256, 5))
    result = bingo.compensate(model, None, calibration, damping=0.0, validation=0.0)
    # in_proj first; then the layers after it, whose inputs its prune changed (out_proj, the feed-forward, the head)
    assert result.layers[0] == key and result.error_after[key] < result.error_before[key]
    assert result.layers[1:] == ("encoder.layers.0.self_attn.out_proj.weight", "encoder.layers.0.linear1.weight",
                                 "encoder.layers.0.linear2.weight", "head.weight")
    with torch.no_grad():
        x = dense.embed(calibration)  # what the attention sees, pruned or not
        attention, dense_attention = model.encoder.layers[0].self_attn, dense.encoder.layers[0].self_attn
        _assert_rows_are_least_squares(x, attention.in_proj_weight_orig, attention.in_proj_bias, attention.in_proj_weight_mask,
                                       dense_attention.in_proj_weight, dense_attention.in_proj_bias, rows=(0, 17, 40))  # q, k, v


def _assert_rows_are_least_squares(x, weight, bias, mask, dense_weight, dense_bias, rows) -> None:
    """Each of ``rows`` (weights on the kept inputs, and the bias) is the least-squares fit of the dense row's outputs on ``x``."""
    x = x.reshape(-1, x.shape[-1]).double()
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    for row in rows:
        kept = torch.cat([mask[row].bool(), torch.tensor([True])])
        target = x @ dense_weight[row].double() + float(dense_bias[row])
        solution = torch.linalg.lstsq(design[:, kept], target[:, None]).solution.flatten()
        got = torch.cat([weight[row], bias[row : row + 1]]).double()[kept]
        torch.testing.assert_close(got, solution, atol=1e-4, rtol=1e-4)


def test_the_out_proj_refit_is_the_least_squares_solution_on_the_attention_output():
    """Only out_proj pruned: its input is the dense attention's output before out_proj, computed here with out_proj = I."""
    model = TransformerClassifier(layers=1, tokens=True)
    dense = copy.deepcopy(model).eval()
    key = "encoder.layers.0.self_attn.out_proj.weight"
    bingo.prune(model, bingo.magnitude_scores(model, include=["*out_proj*"]), 0.5)
    calibration = torch.randint(0, 30, (256, 5))
    result = bingo.compensate(model, None, calibration, damping=0.0, validation=0.0)
    assert result.layers[0] == key and result.error_after[key] < 0.5 * result.error_before[key]
    with torch.no_grad():
        identity = copy.deepcopy(dense.encoder.layers[0].self_attn)
        identity.out_proj.weight.copy_(torch.eye(16))
        identity.out_proj.bias.zero_()
        tokens = dense.embed(calibration)
        x = identity(tokens, tokens, tokens, need_weights=False)[0]
        out_proj, dense_out_proj = model.encoder.layers[0].self_attn.out_proj, dense.encoder.layers[0].self_attn.out_proj
        _assert_rows_are_least_squares(x, out_proj.weight_orig, out_proj.bias, out_proj.weight_mask,
                                       dense_out_proj.weight, dense_out_proj.bias, rows=(0, 7, 15))


def test_a_two_input_transformer_is_compensated_from_a_tuple_of_calibration_inputs():
    class Padded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = TransformerClassifier(layers=1, tokens=True)

        def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
            h = self.inner.encoder(self.inner.embed(tokens), src_key_padding_mask=padding)
            return self.inner.head(h.masked_fill(padding[..., None], 0).sum(1) / (~padding).sum(1, keepdim=True))

    model = Padded()
    dense = copy.deepcopy(model).eval()
    bingo.prune(model, bingo.magnitude_scores(model), 0.6)
    uncompensated = copy.deepcopy(model).eval()
    tokens = torch.randint(0, 30, (128, 5))
    padding = torch.arange(5) >= torch.randint(2, 6, (128, 1))
    result = bingo.compensate(model, None, (tokens, padding))
    assert "inner.encoder.layers.0.self_attn.out_proj.weight" in result.layers and result.skipped == ()
    with torch.no_grad():
        gap = (model.eval()(tokens, padding) - dense(tokens, padding)).square().mean()
        assert gap < (uncompensated(tokens, padding) - dense(tokens, padding)).square().mean()
    with pytest.raises(bingo.ConfigError, match=r"^compensate needs calibration inputs: a non-empty tensor \(N, \.\.\.\) "):
        bingo.compensate(model, None, [tokens, padding])
