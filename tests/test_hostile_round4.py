"""Defects a fourth hostile round found on models not in the repo, each pinned by the behaviour a user sees."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import bingo
from bingo.layers import tied_weights


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


def _chain(wrap=None) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    if wrap is not None:
        with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated, still used
            warnings.simplefilter("ignore", FutureWarning)
            wrap(model[2])
    return model


_COMPUTED = {
    "weight_norm (hook)": (torch.nn.utils.weight_norm, "a forward pre-hook (WeightNorm)", "WeightNorm"),
    "spectral_norm (hook)": (torch.nn.utils.spectral_norm, "a forward pre-hook (SpectralNorm)", "SpectralNorm"),
    "parametrizations.weight_norm": (parametrizations.weight_norm, "torch.nn.utils.parametrize (_WeightNorm)",
                                     "torch.nn.utils.parametrize"),
    "parametrizations.spectral_norm": (parametrizations.spectral_norm, "torch.nn.utils.parametrize (_SpectralNorm)",
                                       "torch.nn.utils.parametrize"),
    "parametrizations.orthogonal": (parametrizations.orthogonal, "torch.nn.utils.parametrize (_Orthogonal)",
                                    "torch.nn.utils.parametrize"),
}


@pytest.mark.parametrize("kind", list(_COMPUTED))
def test_a_computed_weight_is_left_out_reported_and_refused_by_name(kind):
    wrap, what, coverage_kind = _COMPUTED[kind]
    for _ in range(5):  # the old tie detection by id() of a fresh tensor per read dropped layers at random
        model = _chain(wrap)
        assert list(bingo.find_layers(model)) == ["0.weight", "4.weight"]
        assert tied_weights(model) == {}
    report = bingo.coverage(model, bingo.find_layers(model))
    assert any(k == f"computed weights ({coverage_kind})" for k in report.unscored), report
    assert report.scored + sum(report.unscored.values()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(bingo.ConfigError, match=re.escape(f"cannot score '2.weight': its weight is rebuilt on every "
                                                          f"read by {what}")):
        bingo.find_layers(model, include=["2"])


def _trained(search: bool) -> tuple[torch.Tensor, object]:
    model = _chain(parametrizations.spectral_norm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ticket = bingo.TicketSearch(model, every=1) if search else None
    generator = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if ticket is not None:
            ticket.step(x, y)
    return torch.cat([t.detach().flatten() for t in model.state_dict().values()]), ticket


def test_a_search_beside_a_spectral_norm_layer_leaves_training_bit_identical():
    # Reading a spectral-normalised weight in training mode runs a power iteration: building the search must not.
    plain, _ = _trained(search=False)
    searched, ticket = _trained(search=True)
    assert torch.equal(plain, searched)
    assert set(ticket.significance()) == {"0.weight", "4.weight"}


def test_an_unmaterialised_lazy_module_gets_a_config_error():
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    for call in (bingo.TicketSearch, bingo.find_layers, bingo.magnitude_scores):
        with pytest.raises(bingo.ConfigError, match=re.escape("LazyLinear.weight is not materialised yet (a lazy "
                                                              "module): run one forward with an example batch")):
            call(model)
    model(torch.randn(2, 5))
    assert list(bingo.find_layers(model)) == ["0.weight", "2.weight"]


@pytest.mark.parametrize("estimator", ["probe", "hybrid"])
def test_reset_mode_follows_a_dtype_change_made_after_the_search_was_built(estimator):
    def scores(build_first: bool) -> dict[str, torch.Tensor]:
        model = _chain()
        search = bingo.TicketSearch(model, mode="reset", estimator=estimator, every=1, seed=3) if build_first else None
        model.double()  # float32 -> float64 is exact, so θ0 is the same numbers either way
        search = search or bingo.TicketSearch(model, mode="reset", estimator=estimator, every=1, seed=3)
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(32, 8, generator=generator, dtype=torch.float64)
            y = torch.randint(0, 3, (32,), generator=generator)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            search.step(x, y)
        return search.significance()

    before, after = scores(build_first=True), scores(build_first=False)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(before[key], after[key], rtol=1e-6, atol=1e-6)
