"""TicketSearch estimators: taylor, hybrid, the contrast rule, every-k; hand-computed where possible.

test_search.py covers the probe estimator with the mean and paper rules; this file covers
the estimators that read the training gradient (taylor, hybrid), the contrast rule with its
standard error, and searching on every k-th step only.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bingo
from bingo.errors import CheckpointError, ConfigError
from conftest import make_cnn, make_mlp, on_tiny_models, train_tiny

LN3 = math.log(3.0)


def _backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """A training step without an optimizer step: sets ``.grad``, leaves the weights."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _taylor(search: bingo.TicketSearch, key: str) -> torch.Tensor:
    """The search's bias-corrected running average of (gΔ)², before any rescaling."""
    return search._taylor_estimate(search.state[key])


# -- taylor on a 2x2 layer, by hand ------------------------------------------------------
#
# x = I (two samples), y = [0, 1]: sample n's logits are column n of W.
# W = [[2 ln3, ln3], [ln3, 2 ln3]]: both columns differ by ln3 in favour of the right class,
# so p = (3/4, 1/4) for sample 1 and (1/4, 3/4) for sample 2, and
# dL/dW = (p - onehot)^T x / 2 = 1/8 [[-1, 1], [1, -1]].
#   mode "zero":  (g w)^2       = (ln3 / 8)^2 [[4, 1], [1, 4]]
#   mode "reset": (g (θ0 - w))^2 with θ0 - w = [[1, 2], [3, 4]] gives 1/64 [[1, 4], [9, 16]]
TAYLOR_W = torch.tensor([[2 * LN3, LN3], [LN3, 2 * LN3]])
TAYLOR_DELTA = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X2 = torch.eye(2)
Y2 = torch.tensor([0, 1])
HAND_GRAD = torch.tensor([[-1.0, 1.0], [1.0, -1.0]]) / 8
HAND_TAYLOR = {
    "zero": (LN3 / 8) ** 2 * torch.tensor([[4.0, 1.0], [1.0, 4.0]], dtype=torch.float64),
    "reset": torch.tensor([[1.0, 4.0], [9.0, 16.0]], dtype=torch.float64) / 64,
}
# the global affine map to [0, 1]: (v - min) / (max - min)
HAND_TAYLOR_SIGNIFICANCE = {
    "zero": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
    "reset": torch.tensor([[0.0, 3 / 15], [8 / 15, 1.0]]),
}


def _taylor_hand_search(mode: str, decay: float) -> tuple[nn.Module, bingo.TicketSearch]:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(TAYLOR_W + TAYLOR_DELTA)  # θ0
    search = bingo.TicketSearch(layer, estimator="taylor", mode=mode, decay=decay)
    with torch.no_grad():
        layer.weight.copy_(TAYLOR_W)  # "trained"
    return layer, search


def test_hand_gradient_of_the_2x2_case():
    # The premise of the hand values below, checked once against autograd.
    layer, _ = _taylor_hand_search("zero", 0.9)
    _backward(layer, X2, Y2)
    assert torch.allclose(layer.weight.grad, HAND_GRAD, atol=1e-7)


@pytest.mark.parametrize("mode", ["zero", "reset"])
@pytest.mark.parametrize("decay", [0.9, 0.99, 1.0])
def test_taylor_hand_computed_and_bias_corrected(mode, decay):
    # Identical (gΔ)² every step: a correctly bias-corrected average equals it after any
    # number of steps (uncorrected, decay 0.9 would give 0.1x, 0.19x, 0.41x of it).
    layer, search = _taylor_hand_search(mode, decay)
    for step in range(1, 6):
        _backward(layer, X2, Y2)
        search.step(X2, Y2)
        if step in (1, 2, 5):
            assert torch.allclose(_taylor(search, "weight"), HAND_TAYLOR[mode], rtol=1e-5, atol=0), step
    assert torch.allclose(search.significance()["weight"], HAND_TAYLOR_SIGNIFICANCE[mode], atol=1e-5)
    assert torch.equal(search.probe_counts()["weight"], torch.full((2, 2), 5))
    assert search.steps == 5


def _varying_batches(steps: int, seed: int = 7, features: int = 16, classes: int = 4, size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, features, generator=generator), torch.randint(0, classes, (size,), generator=generator))
        for _ in range(steps)
    ]


@pytest.mark.parametrize("mode", ["zero", "reset"])
@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_taylor_average_over_varying_batches(mode, decay):
    # Real SGD steps, so both g and w change; the search pairs this step's gradient with the
    # weights after optimizer.step(), and averages (g Δ)² plainly (decay 1) or exponentially
    # with Adam's bias correction (decay 0.9).
    model = make_mlp()
    theta0 = {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}
    search = bingo.TicketSearch(model, estimator="taylor", mode=mode, decay=decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weights = {name: p for name, p in model.named_parameters() if name in theta0}
    values: dict[str, list[torch.Tensor]] = {name: [] for name in weights}
    for x, y in _varying_batches(5):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        grads = dict(zip(weights, torch.autograd.grad(loss, list(weights.values()), retain_graph=True)))
        loss.backward()
        optimizer.step()
        search.step(x, y)
        for name, w in weights.items():
            delta = theta0[name] - w.detach() if mode == "reset" else -w.detach()
            values[name].append((grads[name] * delta).double().square())
    expected = {}
    for name, vs in values.items():
        if decay == 1.0:
            expected[name] = torch.stack(vs).mean(dim=0)
        else:
            t = len(vs)
            ema = sum((1 - decay) * decay ** (t - 1 - s) * v for s, v in enumerate(vs))
            expected[name] = ema / (1 - decay**t)
        assert torch.allclose(_taylor(search, name), expected[name], rtol=1e-4, atol=1e-12), name
    # One affine map over all layers, not one per layer.
    low = min(float(v.min()) for v in expected.values())
    high = max(float(v.max()) for v in expected.values())
    for name, score in search.significance().items():
        assert torch.allclose(score.double(), (expected[name] - low) / (high - low), atol=1e-5), name


def test_taylor_decay_zero_keeps_only_the_latest_step():
    model = make_mlp()
    search = bingo.TicketSearch(model, estimator="taylor", mode="zero", decay=0.0)
    for x, y in _varying_batches(3):
        _backward(model, x, y)
        search.step(x, y)
    w = model[3].weight
    assert torch.allclose(_taylor(search, "3.weight"), (w.grad * w).detach().double().square(), rtol=1e-6, atol=0)


def _neuron_model(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    if kind == "mlp":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(10, 5, generator=generator)
        return model, x, torch.randint(0, 3, (10,), generator=generator)
    model = make_cnn()
    model.eval()  # no dropout: the same gradient on every call
    x = torch.randn(16, 1, 4, 4, generator=generator)
    return model, x, torch.randint(0, 3, (16,), generator=generator)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_taylor_neuron_granularity_squares_the_sum_over_the_unit(kind):
    model, x, y = _neuron_model(kind)
    theta0 = {k: v.clone() for k, v in model.state_dict().items()}
    search = bingo.TicketSearch(model, estimator="taylor", granularity="neuron", decay=1.0)
    output = list(bingo.find_layers(model))[-1]
    assert output not in search.layers and len(search.layers) >= 1
    with torch.no_grad():  # move away from θ0 so Δ is nonzero and of mixed sign
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    _backward(model, x, y)
    search.step(x, y)
    scores = search.significance()
    assert set(scores) == set(search.layers)
    for key, module in search.layers.items():
        w = module.weight
        per_weight = (w.grad * (theta0[key] - w)).detach().double().reshape(w.shape[0], -1)
        expected = per_weight.sum(dim=1).square()  # group Taylor: sum over the unit, then square
        estimate = _taylor(search, key)
        assert estimate.shape == (w.shape[0],)
        assert scores[key].shape == (w.shape[0],)
        assert torch.allclose(estimate, expected, rtol=1e-4, atol=1e-12), key
        # squaring before summing would give something else here
        assert not torch.allclose(per_weight.square().sum(dim=1), expected, rtol=1e-2)


# -- a weight whose reset provably changes nothing scores lowest ------------------------


@pytest.mark.parametrize("mode", ["zero", "reset"])
def test_taylor_scores_weights_reading_a_dead_input_zero(mode):
    # Input feature 5 is always 0: the weights reading it get gradient exactly 0, so their
    # Taylor score is 0, the minimum, whatever Δ is. Exactly the weights whose gradient was 0
    # on every step score 0 (ReLUs can silence a few more in the hidden layers); all others
    # score above it.
    model = make_mlp()
    search = bingo.TicketSearch(model, estimator="taylor", mode=mode)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    ever_moved = {key: torch.zeros_like(m.weight, dtype=torch.bool) for key, m in search.layers.items()}
    for x, y in _varying_batches(6):
        x[:, 5] = 0
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        search.step(x, y)
        for key, m in search.layers.items():
            ever_moved[key] |= m.weight.grad != 0
    scores = search.significance()
    assert not ever_moved["1.weight"][:, 5].any()
    assert (scores["1.weight"][:, 5] == 0).all()
    for key, score in scores.items():
        assert torch.equal(score == 0, ~ever_moved[key]), key
        assert (score >= 0).all()
    assert ever_moved["1.weight"][:, :5].all()  # the dead input is what makes the zeros
    assert max(float(s.max()) for s in scores.values()) == 1.0


# The 2x2 hand case of test_search.py, with θ0 chosen so that every single-weight reset
# changes the loss by a known amount. x = I, y = [0, 1]; sample n's logits are column n.
TRAINED = [[2.0, 0.0], [0.0, 2.0]]


def _cross_entropy(logits_1, logits_2):
    def ce(logits, label):
        return -logits[label] + math.log(sum(math.exp(v) for v in logits))

    return (ce(logits_1, 0) + ce(logits_2, 1)) / 2


def _reset_loss_changes(theta0) -> torch.Tensor:
    """d[i, j]: loss increase when W[i, j] alone goes back to θ0, from the formula above."""
    before = _cross_entropy([2, 0], [0, 2])
    d = torch.zeros(2, 2, dtype=torch.float64)
    for i in range(2):
        for j in range(2):
            w = [row[:] for row in TRAINED]
            w[i][j] = theta0[i][j]
            d[i, j] = _cross_entropy([w[0][0], w[1][0]], [w[0][1], w[1][1]]) - before
    return d


def _contrast_search(theta0, steps: int, **kwargs) -> bingo.TicketSearch:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(theta0))
    # fraction 0.25 of 4 weights: every probe resets exactly one weight.
    search = bingo.TicketSearch(layer, fraction=0.25, metric="loss", rule="contrast", **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(TRAINED))
    for _ in range(steps):
        search.step(X2, Y2)
    return search


def test_contrast_scores_a_weight_equal_to_theta0_lowest():
    # W[1, 0] is 0 both trained and at θ0: resetting it changes nothing (d = 0), every other
    # reset raises the loss, so its contrast (0 minus the mean of the others) is the lowest.
    theta0 = [[-1.0, 1.5], [0.0, 1.0]]
    d = _reset_loss_changes(theta0)
    assert d[1, 0] == 0 and (d.view(-1)[[0, 1, 3]] > 0).all()
    scores = _contrast_search(theta0, 60).significance()["weight"]
    assert scores[1, 0] == 0
    assert (scores.view(-1)[[0, 1, 3]] > 0).all()


# θ0 for which all four resets raise the loss by different amounts:
# d = [[0.593, 0.174], [0.037, 0.093]] (about).
CONTRAST_THETA0 = [[-1.0, 1.5], [0.5, 1.0]]


def _expected_contrast(d: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contrast and its standard error when weight i's reset always changes the loss by d_i."""
    d, n = d.view(-1), counts.view(-1).double()
    probes = n.sum()
    contrast, stderr = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for i in range(4):
        others = [j for j in range(4) if j != i]
        n_out = probes - n[i]
        mean_out = sum(n[j] * d[j] for j in others) / n_out
        var_out = sum(n[j] * d[j] ** 2 for j in others) / n_out - mean_out**2
        contrast[i] = d[i] - mean_out  # mean when probed: d_i exactly
        stderr[i] = (var_out / n_out).sqrt()  # no spread when probed
    return contrast.view(2, 2), stderr.view(2, 2)


def test_contrast_rule_hand_computed():
    d = _reset_loss_changes(CONTRAST_THETA0)
    assert len(set(d.view(-1).tolist())) == 4 and (d > 0).all()
    search = _contrast_search(CONTRAST_THETA0, 200)
    counts = search.probe_counts()["weight"]
    assert counts.sum() == 200 and (counts > 0).all()
    contrast, stderr = _expected_contrast(d, counts)
    raw, known = search._contrast(search.state["weight"])[0], search._contrast(search.state["weight"])[2]
    assert known.all()
    assert torch.allclose(raw, contrast, atol=1e-6)
    # significance: the affine map of contrasts with min -> 0, max -> 1
    expected = (contrast - contrast.min()) / (contrast.max() - contrast.min())
    scores = search.significance()["weight"]
    assert torch.allclose(scores.double(), expected, atol=1e-5)
    assert scores[0, 0] == 1 and scores[1, 0] == 0
    assert torch.allclose(search.uncertainty()["weight"].double(), stderr, rtol=1e-4, atol=1e-6)


def test_contrast_uncertainty_shrinks_like_one_over_sqrt_probes():
    # Varying batches: both sides of every contrast are noisy. 10x the probes -> about
    # sqrt(10) = 3.16x smaller standard error (1/n would give 10x, no division 1x).
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.5, mode="zero", metric="loss", rule="contrast", seed=1)
    batches = _varying_batches(400, seed=11, size=32)
    for x, y in batches[:40]:
        search.step(x, y)
    early = search.uncertainty()
    for x, y in batches[40:]:
        search.step(x, y)
    late = search.uncertainty()
    ratios = []
    for key in early:
        finite = early[key].isfinite()
        assert finite.any() and late[key].isfinite().all() and (late[key] > 0).all()
        ratios.append(early[key][finite] / late[key][finite])
    median = float(torch.cat(ratios).median())
    assert 2.3 < median < 4.3, median


def test_uncertainty_is_inf_where_there_is_no_contrast():
    # Never probed: no "probed" side.
    layer = nn.Linear(10, 10, bias=False)
    search = bingo.TicketSearch(layer, fraction=0.01, metric="loss", rule="contrast")
    x, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    for _ in range(3):
        search.step(x, y)
    counts, stderr = search.probe_counts()["weight"], search.uncertainty()["weight"]
    assert counts.sum() == 3
    assert torch.equal(stderr.isinf(), counts == 0)
    assert (stderr[counts > 0] >= 0).all()
    # fraction 1: every probe has every weight, so there is no "not probed" side either.
    everything = bingo.TicketSearch(layer, fraction=1.0, metric="loss", rule="contrast")
    everything.step(x, y)
    assert everything.uncertainty()["weight"].isinf().all()
    assert (everything.significance()["weight"] == 1).all()  # unprobed="keep"
    assert everything.significance(unprobed="nan")["weight"].isnan().all()


@pytest.mark.parametrize("estimator", ["taylor", "hybrid"])
def test_uncertainty_needs_the_probe_estimator(estimator):
    search = bingo.TicketSearch(make_mlp(), estimator=estimator, metric="loss")
    with pytest.raises(ConfigError, match=r"^uncertainty\(\) needs estimator='probe'$"):
        search.uncertainty()


# -- hybrid -------------------------------------------------------------------------------


def _hybrid_case():
    """Two fixed layers; input 2 is always 0, so the weights reading it have gradient 0."""
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Tanh(), nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [0.7, 1.2, -1.5]]))
        model[2].weight.copy_(torch.tensor([[1.5, -0.4], [-1.0, 0.8], [0.3, 1.1]]))
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(6, 3, generator=generator)
    x[:, 2] = 0
    with torch.no_grad():  # labels the model gets right, so zeroing a weight tends to hurt
        y = model(x).argmax(dim=1)
    return model, x, y


def test_hybrid_calibration_is_measured_over_predicted_of_the_drawn_probes():
    model, x, y = _hybrid_case()
    keys = ["0.weight", "2.weight"]
    layers = {"0.weight": model[0], "2.weight": model[2]}
    # Fixed weights and batch: the same g every step, so the bias-corrected Taylor value
    # is v = (g w)^2 and a probe of weight i predicts ½ v_i.
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [layers[k].weight for k in keys])
    v = {k: (g * layers[k].weight).detach().double().square() for k, g in zip(keys, grads)}
    assert (v["0.weight"][:, 2] == 0).all() and (v["0.weight"][:, :2] > 0).all() and (v["2.weight"] > 0).all()

    def loss_increase(key, index):  # zeroing one weight, measured by a real forward pass
        with torch.no_grad():
            probe = layers[key].weight.detach().clone()
            probe.view(-1)[index] = 0
            zeroed = F.cross_entropy(functional_call(model, {key: probe}, (x,)), y).item()
            return zeroed - F.cross_entropy(model(x), y).item()

    # fraction 1/6 of 6 weights: every probe zeroes exactly one weight of each layer.
    search = bingo.TicketSearch(model, fraction=1 / 6, mode="zero", metric="loss", estimator="hybrid", decay=0.9)
    seen = {k: [] for k in keys}
    for k in keys:
        layers[k].register_forward_pre_hook(lambda m, a, k=k: seen[k].append(m.weight.detach().clone()))
    measured = {k: 0.0 for k in keys}
    predicted = {k: 0.0 for k in keys}
    drawn = {k: set() for k in keys}
    for _ in range(40):
        _backward(model, x, y)
        for k in keys:
            seen[k].clear()
        search.step(x, y)
        # passes: unmodified, probe of layer 0, probe of layer 2
        for k, probe_pass in zip(keys, (1, 2)):
            current = layers[k].weight.detach()
            changed = (seen[k][probe_pass] != current).view(-1).nonzero().view(-1)
            assert len(changed) == 1
            i = int(changed)
            drawn[k].add(i)
            measured[k] += loss_increase(k, i)
            predicted[k] += 0.5 * float(v[k].view(-1)[i])
    assert all(len(drawn[k]) > 1 for k in keys)
    calibration = search.calibration()
    expected = {k: measured[k] / predicted[k] for k in keys}
    assert all(measured[k] > 0 and predicted[k] > 0 for k in keys)
    for k in keys:
        assert calibration[k] == pytest.approx(expected[k], rel=1e-4), k
    # The two layers need different factors, or the checks below could not tell.
    assert abs(math.log(expected["0.weight"] / expected["2.weight"])) > 0.1

    # Hybrid significance = Taylor value x layer factor, mapped to [0, 1]; the dead input's
    # weights score 0, so the map is a division by the largest calibrated value.
    raw = {k: v[k] * expected[k] for k in keys}
    top = max(float(r.max()) for r in raw.values())
    scores = search.significance()
    for k in keys:
        assert torch.allclose(scores[k].double(), raw[k] / top, atol=1e-4), k
    # ... which is not the plain Taylor ranking: cross-layer ratios move by the factor ratio.
    taylor_top = max(float(t.max()) for t in v.values())
    assert not all(torch.allclose(scores[k].double(), v[k] / taylor_top, atol=1e-3) for k in keys)
    a, b = (0, 0), (0, 0)
    assert float(scores["0.weight"][a] / scores["2.weight"][b]) == pytest.approx(
        float(v["0.weight"][a] / v["2.weight"][b]) * expected["0.weight"] / expected["2.weight"], rel=1e-4
    )


def test_calibration_needs_the_hybrid_estimator():
    for estimator in ("probe", "taylor"):
        search = bingo.TicketSearch(make_mlp(), estimator=estimator)
        with pytest.raises(ConfigError, match=r"^calibration\(\) needs estimator='hybrid'$"):
            search.calibration()


def test_calibration_is_one_before_any_probe():
    search = bingo.TicketSearch(make_mlp(), estimator="hybrid", metric="loss")
    assert search.calibration() == {"1.weight": 1.0, "3.weight": 1.0, "5.weight": 1.0}


def test_hybrid_needs_the_loss_metric():
    with pytest.raises(
        ConfigError, match=r"^estimator 'hybrid' calibrates loss estimates and needs metric='loss', got 'accuracy'$"
    ):
        bingo.TicketSearch(make_mlp(), estimator="hybrid")
    with pytest.raises(ConfigError, match="needs metric='loss', got <function"):
        bingo.TicketSearch(make_mlp(), estimator="hybrid", metric=lambda outputs, targets: 0.0)
    with pytest.raises(ConfigError, match="unknown estimator 'fisher'; valid choices: probe, taylor, hybrid"):
        bingo.TicketSearch(make_mlp(), estimator="fisher")


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_decay_out_of_range_is_refused(decay):
    with pytest.raises(ConfigError, match=rf"^decay must be in \[0, 1\], got {decay}$"):
        bingo.TicketSearch(make_mlp(), estimator="taylor", decay=decay)


@pytest.mark.parametrize("every", [0, 1.5])
def test_every_must_be_a_positive_whole_number(every):
    with pytest.raises(ConfigError, match=rf"^every must be a whole number >= 1, got {every}$"):
        bingo.TicketSearch(make_mlp(), every=every)


# -- every k-th step ----------------------------------------------------------------------


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls


def test_hybrid_every_k_probes_on_steps_1_4_7_and_accumulates_taylor_every_step(batch):
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.2, mode="zero", metric="loss", estimator="hybrid", every=3)
    calls = _count_forwards(model)

    def sums():
        return [(float(e["calibration_measured"]), float(e["calibration_predicted"])) for e in search.state.values()]

    added, calibration_sums = [], [sums()]
    for _ in range(7):
        _backward(model, *batch)
        calls.clear()
        search.step(*batch)
        added.append(len(calls))
        calibration_sums.append(sums())
    # probing steps: one unmodified pass plus one fake pass per layer (3 layers)
    assert added == [4, 0, 0, 4, 0, 0, 4]
    # the calibration sums move on probing steps only
    moved = [after != before for before, after in zip(calibration_sums, calibration_sums[1:])]
    assert moved == [True, False, False, True, False, False, True]
    # Taylor accumulates on every step
    for key, counts in search.probe_counts().items():
        assert torch.equal(counts, torch.full_like(counts, 7)), key
        assert int(search.state[key]["taylor_steps"]) == 7


def test_taylor_runs_no_forward_pass(batch):
    model = make_mlp()
    search = bingo.TicketSearch(model, estimator="taylor")
    calls = _count_forwards(model)
    for _ in range(3):
        _backward(model, *batch)
        calls.clear()
        assert search.step(*batch) == {}
        assert calls == []


@pytest.mark.parametrize("every", [2, 3])
def test_probe_every_k_counts_grow_only_on_searched_steps(batch, every):
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.1, every=every)
    calls = _count_forwards(model)
    previous = search.probe_counts()
    for step in range(1, 8):
        calls.clear()
        damages = search.step(*batch)
        searched = (step - 1) % every == 0
        assert len(calls) == (4 if searched else 0)
        assert set(damages) == (set(search.layers) if searched else set())
        counts = search.probe_counts()
        for key, c in counts.items():
            size = max(1, round(0.1 * c.numel()))
            assert c.sum() == math.ceil(step / every) * size
            if searched:
                assert c.sum() == previous[key].sum() + size
            else:
                assert torch.equal(c, previous[key])
        previous = counts
    assert search.steps == 7


# -- taylor needs the gradient ------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["taylor", "hybrid"])
def test_taylor_without_gradient_says_when_to_call_step(batch, estimator):
    model = make_mlp()
    search = bingo.TicketSearch(model, estimator=estimator, metric="loss")
    message = (
        r"^estimator 'taylor' reads the gradient of '1\.weight', which is None: "
        r"call search\.step\(x, y\) after optimizer\.step\(\) and before the next zero_grad\(\)$"
    )
    with pytest.raises(ConfigError, match=message):
        search.step(*batch)
    _backward(model, *batch)
    model.zero_grad(set_to_none=True)  # too late: the gradient is gone
    with pytest.raises(ConfigError, match=r"call search\.step\(x, y\) after optimizer\.step\(\)"):
        search.step(*batch)


# -- training is untouched ----------------------------------------------------------------


@on_tiny_models
@pytest.mark.parametrize("estimator", ["taylor", "hybrid"])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_training_is_bit_identical_with_and_without_gradient_search(factory, data, estimator, granularity):
    plain, _ = train_tiny(factory, data)
    searched, search = train_tiny(
        factory,
        data,
        lambda m: bingo.TicketSearch(m, fraction=0.2, estimator=estimator, metric="loss", granularity=granularity, every=2),
    )
    assert search.steps == 12
    plain_state, searched_state = plain.state_dict(), searched.state_dict()
    assert list(plain_state) == list(searched_state)
    for key in plain_state:
        assert torch.equal(plain_state[key], searched_state[key]), key
    assert all(((s >= 0) & (s <= 1)).all() for s in search.significance().values())


# -- checkpointing ------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["taylor", "hybrid"])
def test_state_dict_round_trip_resumes_identically(estimator):
    batches = _varying_batches(10, seed=9, size=32)
    settings = dict(fraction=0.1, estimator=estimator, metric="loss", decay=0.9, every=2, seed=3)

    def run(model, optimizer, search, steps):
        for x, y in steps:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            search.step(x, y)

    def start():
        model = make_mlp()
        return model, torch.optim.SGD(model.parameters(), lr=0.1), bingo.TicketSearch(model, **settings)

    model, optimizer, straight = start()
    run(model, optimizer, straight, batches)

    model, optimizer, first = start()
    run(model, optimizer, first, batches[:5])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    # θ0 of a search made mid-training would be wrong: it must come from the checkpoint
    resumed = bingo.TicketSearch(model, **settings)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps == 5
    run(model, optimizer, resumed, batches[5:])

    assert resumed.steps == straight.steps == 10
    for key, value in straight.significance().items():
        assert torch.equal(resumed.significance()[key], value), key
        assert torch.equal(resumed.probe_counts()[key], straight.probe_counts()[key]), key
        for name, tensor in straight.state[key].items():
            assert torch.equal(resumed.state[key][name], tensor), (key, name)
    if estimator == "hybrid":
        assert resumed.calibration() == straight.calibration()
        assert resumed.calibration() != {key: 1.0 for key in straight.state}


def test_state_dict_of_another_estimator_is_refused():
    taylor = bingo.TicketSearch(make_mlp(), estimator="taylor", metric="loss")
    hybrid = bingo.TicketSearch(make_mlp(), estimator="hybrid", metric="loss")
    with pytest.raises(CheckpointError, match=r"different settings: estimator='taylor' \(now 'hybrid'\)$"):
        hybrid.load_state_dict(taylor.state_dict())
    other_decay = bingo.TicketSearch(make_mlp(), estimator="taylor", metric="loss", decay=0.5)
    with pytest.raises(CheckpointError, match=r"different settings: decay=0\.99 \(now 0\.5\)$"):
        other_decay.load_state_dict(taylor.state_dict())


# -- targeted ticket searching ------------------------------------------------------------


def _hand_hybrid(target: float, band: float, fraction: float = 0.01) -> bingo.TicketSearch:
    """A hybrid search on one 10x10 layer whose Taylor scores are set by hand to 1..100."""
    layer = nn.Linear(10, 10, bias=False)
    search = bingo.TicketSearch(
        layer, fraction=fraction, estimator="hybrid", metric="loss", decay=1.0, target=target, band=band
    )
    entry = search.state["weight"]
    entry["taylor_average"].copy_(torch.arange(1, 101, dtype=torch.float32).view(10, 10))
    entry["taylor_steps"].fill_(1)
    return search


def test_focus_is_everything_until_there_are_estimates():
    search = bingo.TicketSearch(make_mlp(), fraction=0.1, metric="loss", rule="contrast", target=0.5)
    assert all(f.all() for f in search.focus().values())
    search._refocus()  # nothing probed yet: nothing known, nothing leaves
    assert all(f.all() for f in search.focus().values())


@pytest.mark.parametrize("target, band, low, high", [(0.5, 0.1, 40, 60), (0.9, 0.05, 85, 95), (0.05, 0.1, 1, 15)])
def test_focus_band_hand_computed(target, band, low, high):
    # Scores 1..100: the threshold at sparsity s is the score ranked round(s·100); the band
    # keeps the scores ranked within band·100 of it (clipped at the ends).
    search = _hand_hybrid(target, band)
    search._refocus()
    scores = torch.arange(1, 101).view(10, 10)
    assert torch.equal(search.focus()["weight"], (scores >= low) & (scores <= high))


def test_targeted_probes_draw_only_from_the_focus(batch):
    x, y = batch
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.1, metric="loss", rule="mean", target=0.5, seed=4)
    search.step(x, y)  # round 0 refocuses (nothing known yet); rounds 1..9 keep the focus set below
    generator = torch.Generator().manual_seed(0)
    chosen = {}
    for key, entry in search.state.items():
        chosen[key] = torch.rand(entry["focus"].shape, generator=generator) < 0.3
        entry["focus"].copy_(chosen[key])
    before = search.probe_counts()
    for _ in range(9):
        search.step(x, y)
    for key, counts in search.probe_counts().items():
        grown = counts - before[key]
        assert grown.sum() > 0
        assert (grown[~chosen[key]] == 0).all(), key  # never outside the focus
        size = max(1, round(0.1 * counts.numel()))
        assert grown.sum() == 9 * size  # full-sized probes while the focus is large enough


def test_a_focus_smaller_than_a_probe_is_probed_whole():
    search = _hand_hybrid(0.5, 0.1, fraction=0.05)
    entry = search.state["weight"]
    entry["focus"].zero_()
    entry["focus"].view(-1)[[3, 7]] = True
    assert sorted(search._draw_subset("weight").tolist()) == [3, 7]  # a probe holds 5 of 100: both go
    entry["focus"].view(-1)[:20] = True
    drawn = search._draw_subset("weight")
    assert drawn.numel() == 5 and (drawn < 20).all() and len(set(drawn.tolist())) == 5
    entry["focus"].zero_()  # an empty focus falls back to the whole layer
    assert search._draw_subset("weight").numel() == 5


def test_targeted_search_concentrates_probes_near_the_threshold():
    # End to end: after training with a targeted probe search, the weights in the final
    # focus (near the threshold at 70% sparsity) have been probed more than the others.
    model = make_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    search = bingo.TicketSearch(model, fraction=0.05, metric="loss", rule="mean", target=0.7, band=0.1, seed=2)
    for x, y in _varying_batches(200, seed=5, size=32):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        search.step(x, y)
    counts = torch.cat([c.flatten() for c in search.probe_counts().values()]).double()
    focus = torch.cat([f.flatten() for f in search.focus().values()])
    assert 0 < focus.sum() < 0.5 * focus.numel()
    assert counts[focus].mean() > 2 * counts[~focus].mean()
    uniform = bingo.TicketSearch(make_mlp(), fraction=0.05, metric="loss", rule="mean", seed=2)
    assert sum(int(c.sum()) for c in search.probe_counts().values()) >= 0.8 * 200 * sum(
        max(1, round(0.05 * e["theta0"].numel())) for e in uniform.state.values()
    )


def test_contrast_focus_keeps_weights_within_two_standard_errors():
    search = _contrast_search(CONTRAST_THETA0, 200, target=0.5)
    search._refocus()
    contrast, stderr, _ = search._contrast(search.state["weight"])
    threshold = contrast.flatten().sort().values[1]  # rank round(0.5 · 4) = 2
    expected = (contrast - threshold).abs() <= 2 * stderr
    assert torch.equal(search.focus()["weight"], expected)
    assert expected.view(-1)[contrast.view(-1).argsort()[1]]  # the threshold weight itself stays


def test_targeted_state_dict_resumes_identically():
    batches = _varying_batches(30, seed=8, size=32)
    settings = dict(fraction=0.1, metric="loss", rule="contrast", target=0.6, seed=1)

    def run(search, steps):
        for x, y in steps:
            search.step(x, y)

    straight = bingo.TicketSearch(make_mlp(), **settings)
    run(straight, batches)
    first = bingo.TicketSearch(make_mlp(), **settings)
    run(first, batches[:15])  # stops between two refocusing rounds
    resumed = bingo.TicketSearch(make_mlp(), **settings)
    resumed.load_state_dict(first.state_dict())
    run(resumed, batches[15:])
    for key, value in straight.significance().items():
        assert torch.equal(resumed.significance()[key], value), key
        assert torch.equal(resumed.focus()[key], straight.focus()[key]), key


def test_target_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^target must be a sparsity in \[0, 1\) \(0 = untargeted\), got 1\.0$"):
        bingo.TicketSearch(make_mlp(), target=1.0)
    with pytest.raises(ConfigError, match=r"^band must be in \(0, 0\.5\], got 0\.0$"):
        bingo.TicketSearch(make_mlp(), target=0.5, band=0.0)
    with pytest.raises(ConfigError, match=r"^target needs fake passes to concentrate; estimator 'taylor' runs none"):
        bingo.TicketSearch(make_mlp(), estimator="taylor", metric="loss", target=0.5)
    with pytest.raises(ConfigError, match=r"^focus\(\) needs a targeted search"):
        bingo.TicketSearch(make_mlp()).focus()


# -- batched fake passes --------------------------------------------------------------------


@on_tiny_models
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_batched_fake_passes_measure_what_separate_ones_do(factory, data, granularity):
    # Same subsets (same generator order), same measurements up to float rounding of the
    # batched kernels, and training stays bit-identical to training without a search.
    settings = dict(fraction=0.2, metric="loss", rule="contrast", granularity=granularity, seed=3)
    plain, _ = train_tiny(factory, data)
    separate_model, separate = train_tiny(factory, data, lambda m: bingo.TicketSearch(m, **settings))
    batched_model, batched = train_tiny(factory, data, lambda m: bingo.TicketSearch(m, batched=True, **settings))
    for key, value in plain.state_dict().items():
        assert torch.equal(batched_model.state_dict()[key], value), key
    for key in separate.state:
        assert torch.equal(batched.state[key]["count"], separate.state[key]["count"]), key
        assert torch.allclose(batched.state[key]["drop_sum"], separate.state[key]["drop_sum"], atol=1e-5), key
    for key, score in separate.significance().items():
        assert torch.allclose(batched.significance()[key], score, atol=1e-4), key


def test_batched_fake_passes_on_a_pruned_model(batch):
    # Masked layers are probed through weight_orig; the batched path must see the masks too.
    x, y = batch
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    separate = bingo.TicketSearch(model, fraction=0.3, metric="loss", seed=1)
    batched = bingo.TicketSearch(model, fraction=0.3, metric="loss", seed=1, batched=True)
    for _ in range(3):
        assert separate.step(x, y) == pytest.approx(batched.step(x, y), abs=1e-6)


def test_forward_counter_counts_each_batched_fake_pass(batch):
    from bingo.strategies import ForwardCounter

    x, y = batch
    counts = {}
    for batched in (False, True):
        model = make_mlp()
        search = bingo.TicketSearch(model, fraction=0.3, metric="loss", batched=batched)
        with ForwardCounter(model) as counter:
            search.step(x, y)
        counts[batched] = counter.count
    assert counts == {False: 4, True: 4}  # the unmodified pass + one fake pass per layer (3)
