"""Attention heads as units: scored from in_proj_weight scores, masked exactly, removed physically."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo
from bingo import ConfigError


def _encoder(batch_first: bool = True, seed: int = 1) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def test_head_scores_are_the_mean_over_the_heads_rows_hand_computed():
    attention = nn.MultiheadAttention(4, 2)  # head_dim 2: head 0 owns rows 0-1, 4-5, 8-9; head 1 rows 2-3, 6-7, 10-11
    model = nn.ModuleDict({"attention": attention})
    rows = torch.tensor([1.0, 1, 3, 3, 2, 2, 5, 5, 0, 0, 4, 4])
    scores = {"attention.in_proj_weight": rows[:, None].expand(12, 4)}
    assert bingo.head_scores(model, scores)["attention"].tolist() == [1.0, 4.0]  # (1+2+0)/3, (3+5+4)/3
    # out_proj columns join the mean, weighted by how many weights they are: 8 columns of 4 vs 24 rows of 4
    scores["attention.out_proj.weight"] = torch.tensor([8.0, 8.0, 0.0, 0.0]).expand(4, 4)
    assert bingo.head_scores(model, scores)["attention"].tolist() == [(3 * 24 / 3 * 1 + 8 * 8) / 32, (4 * 24 + 0) / 32]


@pytest.mark.parametrize("batch_first", [True, False])
def test_removed_heads_output_zero_and_the_shrunk_model_computes_the_same(batch_first):
    dense = _encoder(batch_first)
    model = copy.deepcopy(dense)
    keep = bingo.prune_heads(model, {"layers.0.self_attn": torch.tensor([1.0, 2, 3, 4]),
                                     "layers.1.self_attn": torch.tensor([4.0, 3, 2, 1])}, 0.5, scope="layer")
    assert keep["layers.0.self_attn"].tolist() == [False, False, True, True]
    assert keep["layers.1.self_attn"].tolist() == [True, True, False, False]
    small = bingo.shrink_heads(model)
    attention = small.layers[0].self_attn
    assert isinstance(attention, bingo.PrunedMultiheadAttention) and attention.num_heads == 2 and attention.head_dim == 8
    assert attention.q_proj.weight.shape == (16, 32) and attention.out_proj.weight.shape == (32, 16)
    assert bingo.count_parameters(small) == bingo.count_parameters(dense) - 2 * (3 * 16 * 32 + 3 * 16 + 32 * 16)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[:, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():
        assert (dense.eval()(x) - model.eval()(x)).abs().max() > 1e-2  # the heads mattered
        for mode in ("eval", "train"):
            getattr(model, mode)()
            getattr(small, mode)()
            torch.testing.assert_close(small(x, src_key_padding_mask=padding), model(x, src_key_padding_mask=padding), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(small(x, mask=causal, is_causal=True), model(x, mask=causal, is_causal=True), atol=1e-5, rtol=1e-5)
    program = torch.export.export(small.eval(), (x,))
    torch.testing.assert_close(program.module()(x), small(x))


def test_attention_weights_of_the_kept_heads_are_returned_like_torchs():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=True)
    holder = nn.ModuleDict({"a": attention})
    bingo.prune_heads(holder, {"a": torch.tensor([1.0, 0.0, 2.0, 3.0])}, 0.25)
    small = bingo.shrink_heads(holder)["a"]
    q, k = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    with torch.no_grad():
        out, weights = attention(q, k, k)
        small_out, small_weights = small(q, k, k)
        torch.testing.assert_close(small_out, out, atol=1e-5, rtol=1e-5)
        per_head = attention(q, k, k, average_attn_weights=False)[1]
        torch.testing.assert_close(small(q, k, k, average_attn_weights=False)[1], per_head[:, [0, 2, 3]])
    assert small_weights.shape == weights.shape == (2, 5, 6)


def test_pruned_heads_stay_removed_while_the_rest_trains():
    model = _encoder()
    scores = bingo.head_scores(model, bingo.magnitude_scores(model))
    keep = bingo.prune_heads(model, scores, 0.5)
    assert sum(int((~k).sum()) for k in keep.values()) == 4  # of 8 heads, global
    copy.deepcopy(model)
    attention = model.layers[0].self_attn
    before = attention.in_proj_weight_orig.detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(4, 6, 32)
    for _ in range(2):
        loss = F.mse_loss(model(x), torch.zeros_like(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    removed = ~keep["layers.0.self_attn"]
    rows = torch.arange(96).reshape(3, 4, 8)[:, removed].flatten()
    assert bool((attention.in_proj_weight[rows] == 0).all())
    assert bool((attention.out_proj.weight.reshape(32, 4, 8)[:, removed] == 0).all())
    kept_rows = torch.arange(96).reshape(3, 4, 8)[:, ~removed].flatten()
    assert not torch.equal(attention.in_proj_weight_orig[kept_rows], before[kept_rows])


def test_head_errors_are_one_line():
    model = _encoder()
    with pytest.raises(ConfigError, match=r"^head scores for 'layers.0.self_attn' have shape \(3,\); expected \(4,\)$"):
        bingo.prune_heads(model, {"layers.0.self_attn": torch.rand(3)}, 0.5)
    with pytest.raises(ConfigError, match=r"^head scores for 'layers.0', which is not an nn.MultiheadAttention of TransformerEncoder$"):
        bingo.prune_heads(model, {"layers.0": torch.rand(4)}, 0.5)
    with pytest.raises(ConfigError, match=r"^this sparsity would remove every head of 'layers.0.self_attn'"):
        bingo.prune_heads(model, {"layers.0.self_attn": torch.rand(4)}, 0.9, scope="layer")
    with pytest.raises(ConfigError, match=r"^TransformerEncoder has no nn.MultiheadAttention whose in_proj_weight is scored$"):
        bingo.head_scores(model, {})
    separate = nn.ModuleDict({"a": nn.MultiheadAttention(16, 2, kdim=8, vdim=8)})
    with pytest.raises(ConfigError, match=r"^'a' has separate q/k/v projections"):
        bingo.prune_heads(separate, {"a": torch.rand(2)}, 0.5)


def test_macs_count_attention_projections_before_and_after_heads_are_removed():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1,
                                  enable_nested_tensor=False)
    # per token: q, k, v and out projections (4 x 32 x 32) and the feed-forward (2 x 32 x 64)
    assert bingo.count_flops(model, (7, 32)) == 7 * (4 * 32 * 32 + 2 * 32 * 64)
    bingo.prune_heads(model, {"layers.0.self_attn": torch.tensor([1.0, 2, 3, 4])}, 0.5, scope="layer")
    assert bingo.count_flops(bingo.shrink_heads(model), (7, 32)) == 7 * (4 * 32 * 16 + 2 * 32 * 64)


def test_a_head_pruned_transformer_exports_without_its_heads_and_runs_without_bingo(tmp_path):
    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = _encoder()
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.encoder(x.reshape(x.shape[0], 4, 32)).mean(dim=1))

    model = Classifier()
    bingo.prune_heads(model, bingo.head_scores(model, bingo.magnitude_scores(model)), 0.5)
    result = bingo.export_model(model, (0.0, 1.0), (128,), tmp_path / "out")
    record = json.loads(result.metadata.read_text())
    heads = record["attention_heads"]
    assert set(heads) == {"encoder.layers.0.self_attn", "encoder.layers.1.self_attn"} and sum(heads.values()) == 4  # 4 of 8 left
    assert record["parameters"] < bingo.count_parameters(model)
    x = torch.randn(5, 128)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(result.program)).module()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_attentions_with_extra_key_slots_are_left_whole_by_shrink_heads():
    torch.manual_seed(0)
    holder = nn.ModuleDict({"a": nn.MultiheadAttention(16, 4, batch_first=True, add_zero_attn=True)})
    with torch.no_grad():
        holder["a"].in_proj_weight[32:36] = 0  # head 0's v rows
        holder["a"].in_proj_bias[32:36] = 0
    assert isinstance(bingo.shrink_heads(holder)["a"], nn.MultiheadAttention)  # the zero-attention slot needs the original
