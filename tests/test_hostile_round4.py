"""Defects a fourth hostile round found on models not in the repo, each pinned by the behaviour a user sees."""

from __future__ import annotations

import contextlib
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
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # weights that move: the Taylor term g·(θ0 − w) is not 0
        generator = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(32, 8, generator=generator, dtype=torch.float64)
            y = torch.randint(0, 3, (32,), generator=generator)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            search.step(x, y)
        return search.significance()

    before, after = scores(build_first=True), scores(build_first=False)
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(before[key], after[key], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("estimator", ["taylor", "hybrid"])
def test_gradients_zeroed_before_every_search_step_give_a_warning_not_silent_zero_scores(estimator):
    def run(zero_first: bool) -> list[str]:
        model = _chain()
        search = bingo.TicketSearch(model, estimator=estimator, every=1, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(4)
        for _ in range(3):
            x, y = torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator)
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if zero_first:
                optimizer.zero_grad(set_to_none=False)  # zeros, not None: nothing stops the step
            search.step(x, y)
            optimizer.zero_grad(set_to_none=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            search.significance()
        return [str(w.message) for w in caught]

    assert not any("was zero" in m for m in run(zero_first=False))
    messages = run(zero_first=True)
    assert "the gradients were zero when search.step ran" in " ".join(messages)
    assert f"estimator {estimator!r}: every term g·Δ it read over 3 updates was zero, so every score is zero" in " ".join(messages)


def test_a_reset_mode_search_that_read_only_unmoved_weights_says_so():
    # mode='reset' scores g·(θ0 − w): zero until the weights move, whatever the gradients.
    model = _chain()
    search = bingo.TicketSearch(model, mode="reset", estimator="taylor", seed=0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    search.step(x, y)
    with pytest.warns(UserWarning, match=re.escape("or the weights had not moved from where the search started")):
        search.significance()


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(z)


@pytest.mark.parametrize("make, listed", [
    (lambda: (torch.randn(64, 4), torch.randn(32, 4)), "[0] has 64, [1] has 32"),
    (lambda: {"x": torch.randn(64, 4), "z": torch.randn(63, 4)}, "['x'] has 64, ['z'] has 63"),
])
def test_calibration_tensors_of_different_lengths_get_a_config_error_naming_them(make, listed):
    torch.manual_seed(0)
    model = _TwoInputs()
    bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: bingo.compensate(model, None, make()), lambda: bingo.reestimate_batchnorm(model, make())):
        with pytest.raises(bingo.ConfigError, match=re.escape(f"disagree on the number of samples (their first "
                                                              f"dimension): {listed}; every tensor")):
            call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = make()
    same = tuple(t[:32] for t in x) if isinstance(x, tuple) else {k: t[:32] for k, t in x.items()}
    assert bingo.compensate(model, None, same).forward_passes > 0


class _SplitAdd(nn.Module):
    """Channel i of ``stem`` meets channel i + 4: Torch-Pruning's group of ``stem`` does not tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(6, 8), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = torch.split(torch.relu(self.stem(x)), 4, dim=1)
        return self.head(p + q)


class _CatAdd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(6, 3), nn.Linear(6, 5), nn.Linear(6, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], dim=1) + self.c(x))


@pytest.mark.parametrize("make, pruned", [(_SplitAdd, "stem"), (_CatAdd, "c")])
def test_channels_cut_and_rejoined_are_left_out_of_the_groups_and_shrink_says_what_it_kept(make, pruned):
    torch.manual_seed(0)
    model = make()
    assert bingo.channel_groups(model, (6,)) == []  # no group whose layers disagree on its width
    scores = bingo.magnitude_scores(model, granularity="neuron")
    bingo.prune(model, {f"{pruned}.weight": scores[f"{pruned}.weight"]}, sparsity=0.5, scope="layer")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shrunk = bingo.shrink_coupled(model, (6,))
    assert [str(w.message) for w in caught] == [
        "shrink_coupled kept zero channels that are cut and rejoined (torch.split, chunk or cat, then an add), so not "
        f"tied one to one, which it cannot remove: 4 of {pruned!r}"]
    x = torch.randn(5, 6)
    torch.testing.assert_close(shrunk(x), model(x), atol=1e-5, rtol=1e-5)


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare, self.head = nn.Linear(8, 6), nn.Linear(8, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.used(x)))  # self.spare takes no part


@pytest.mark.parametrize("estimator", ["taylor", "hybrid"])
def test_a_scored_layer_unused_in_forward_is_named_with_the_advice_to_exclude_it(estimator):
    model = _WithUnused()
    search = bingo.TicketSearch(model, estimator=estimator)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(bingo.ConfigError, match=re.escape(
            f"estimator {estimator!r} reads the gradient of 'spare.weight', which is None while other layers' are "
            "not: the layer took no part in the loss (unused in forward?); leave it out (exclude=['spare.weight'])")):
        search.step(x, y)
    search = bingo.TicketSearch(model, estimator=estimator, exclude=["spare.weight"])
    search.step(x, y)
    assert set(search.significance()) == {"used.weight", "head.weight"}


def test_pruning_a_computed_weight_by_its_score_key_gets_a_config_error_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), parametrizations.orthogonal(nn.Linear(6, 6)), nn.ReLU(),
                          nn.Linear(6, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = {"0.weight": torch.rand(6, 8), "2.weight": torch.rand(6, 6)}
    for call in (lambda: bingo.prune(model, scores, sparsity=0.5),
                 lambda: bingo.apply_masks(model, {"2.weight": torch.ones(6, 6, dtype=torch.bool)})):
        with pytest.raises(bingo.ConfigError, match=re.escape(
                "cannot prune '2.weight': its weight is rebuilt on every read by torch.nn.utils.parametrize "
                "(_Orthogonal), which would overwrite a pruning mask; remove it first "
                "(torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')) or leave its key out of the scores")):
            call()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("estimator", ["probe", "hybrid"])
def test_search_step_inside_inference_mode_records_what_it_records_outside(estimator):
    def scores(inference: bool) -> dict[str, torch.Tensor]:
        model = _chain()
        search = bingo.TicketSearch(model, estimator=estimator, metric="loss", every=1, seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        generator = torch.Generator().manual_seed(5)
        for _ in range(3):
            x, y = torch.randn(16, 8, generator=generator), torch.randint(0, 3, (16,), generator=generator)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            with torch.inference_mode() if inference else contextlib.nullcontext():
                search.step(x, y)
        return search.significance()

    inside, outside = scores(True), scores(False)
    for key in outside:
        assert torch.equal(inside[key], outside[key]), key


def test_significance_before_any_step_warns_that_nothing_was_measured():
    search = bingo.TicketSearch(_chain())
    with pytest.warns(UserWarning, match=re.escape("significance() before any search.step: nothing was measured, so every "
                                                   "score is the unprobed value ('keep')")):
        scores = search.significance()
    assert all(bool((score == 1).all()) for score in scores.values())


@pytest.mark.parametrize("make, where", [
    (lambda x: x, ""),
    (lambda x: (x, torch.ones_like(x)), " in [0]"),
    (lambda x: {"x": torch.ones_like(x), "z": x}, " in ['z']"),
])
def test_non_finite_calibration_inputs_get_a_config_error_not_ill_conditioned_layers(make, where):
    torch.manual_seed(0)
    model = _TwoInputs() if where else _chain()
    bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = torch.randn(64, 4 if where else 8)
    calibration[3, 2], calibration[9, 0] = float("nan"), float("inf")
    with pytest.raises(bingo.ConfigError, match=re.escape(
            f"the calibration inputs hold 2 non-finite values (NaN or inf){where}; pass finite samples")):
        bingo.compensate(model, None, make(calibration))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
