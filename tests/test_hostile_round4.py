"""Defects a fourth hostile round found on models not in the repo, each pinned by the behaviour a user sees."""

from __future__ import annotations

import torch
from torch import nn

import bingo


class _CausalBlock(nn.Module):
    """Attention-like block with an ordinary buffer named ``causal_mask``: not a pruning mask."""

    def __init__(self, tokens: int = 8, width: int = 16) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.register_buffer("causal_mask", torch.tril(torch.ones(tokens, tokens, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, -1)
        t = x.shape[1]
        attention = (q @ k.transpose(-1, -2)).masked_fill(~self.causal_mask[:t, :t], float("-inf")).softmax(-1)
        return self.proj(attention @ v)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(_CausalBlock(), nn.Linear(16, 4))


def test_a_buffer_that_merely_ends_in_mask_is_not_a_pruning_mask(tmp_path):
    model = _model()
    assert bingo.pruned_parameters(model) == 0  # the causal mask's 28 zeros are not pruned weights
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    removed = sum(int((m.weight_mask == 0).sum()) for m in model.modules() if hasattr(m, "weight_mask"))
    assert bingo.pruned_parameters(model) == removed
    x = torch.randn(3, 8, 16)
    # the pruned model's own state loads back, through both loaders
    loaded = _model()
    bingo.load_pruned_state_dict(loaded, model.state_dict())
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    path = tmp_path / "compact.safetensors"
    bingo.save_compact(model, path)
    torch.testing.assert_close(bingo.load_compact(_model(), path)(x), model(x), rtol=0, atol=0)
    # a dense model with such a buffer is not "already pruned"
    dense = _model()
    bingo.prune_in_steps(dense, bingo.magnitude_scores(dense), 0.5, torch.randn(32, 8, 16), steps=2)
    assert bingo.pruned_parameters(dense) > 0
