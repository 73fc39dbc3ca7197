"""TicketSearch estimators: taylor, hybrid, contrast, targeting, every-k, your own; hand-computed where possible.

test_search.py covers the search shell and the probe estimator with the mean and paper rules;
this file covers the estimators that read the training gradient (taylor, hybrid), the contrast
rule with its standard error, targeted searching, searching on every k-th step only, and an
estimator written by a user as a subclass of ``bingo.Estimator``.
"""

from __future__ import annotations

import io
import math
import warnings

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
    return search.estimator.estimate(key)


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


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_taylor_average_over_many_updates_and_a_resume_between_them(granularity):
    # decay 0.5 over 60 updates: the stored scale falls below its floor (2^-20) twice and is
    # multiplied out; the average still matches the closed-form EMA, and a search saved and
    # loaded half-way continues bit for bit like the one that never stopped.
    torch.manual_seed(0)
    model = make_mlp()
    batches = _varying_batches(60, seed=3)
    search = bingo.TicketSearch(model, estimator="taylor", mode="zero", decay=0.5, granularity=granularity)
    weights = {name: p for name, p in model.named_parameters() if name in search.layers}
    assert len(weights) >= 2
    values = {name: [] for name in weights}
    resumed = None
    for step, (x, y) in enumerate(batches):
        _backward(model, x, y)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.05)
        search.step(x, y)
        if resumed is not None:
            resumed.step(x, y)
        for name, w in weights.items():
            change = w.grad * w.detach()
            if granularity == "neuron":
                change = change.sum(dim=1)
            values[name].append(change.double().square())
        if step == 29:
            resumed = bingo.TicketSearch(model, estimator="taylor", mode="zero", decay=0.5, granularity=granularity)
            buffer = io.BytesIO()
            torch.save(search.state_dict(), buffer)
            buffer.seek(0)
            resumed.load_state_dict(torch.load(buffer))
    for name, vs in values.items():
        t = len(vs)
        expected = sum(0.5 * 0.5 ** (t - 1 - s) * v for s, v in enumerate(vs)) / (1 - 0.5**t)
        torch.testing.assert_close(_taylor(search, name), expected, rtol=1e-5, atol=1e-12)
        assert torch.equal(_taylor(resumed, name), _taylor(search, name)), name


def test_a_taylor_state_saved_without_a_scale_loads_as_the_average_itself():
    # States saved before the stored average had a scale hold the average: they load with scale 1.
    model = make_mlp()
    search = bingo.TicketSearch(model, estimator="taylor", mode="zero", decay=0.9)
    for x, y in _varying_batches(3):
        _backward(model, x, y)
        search.step(x, y)
    state = search.state_dict()
    for entry in state["estimator"].values():
        entry["taylor_average"] = entry["taylor_average"] * entry.pop("taylor_scale")  # the old layout
    loaded = bingo.TicketSearch(model, estimator="taylor", mode="zero", decay=0.9)
    loaded.load_state_dict(state)
    for key in search.layers:
        torch.testing.assert_close(_taylor(loaded, key), _taylor(search, key), rtol=1e-6, atol=0)


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
    raw = search.estimator.raw_scores("contrast")["weight"]
    assert not raw.isnan().any()  # every weight has both a probed and an unprobed side
    assert torch.allclose(raw, contrast, atol=1e-6)
    # significance: the affine map of contrasts with min -> 0, max -> 1
    expected = (contrast - contrast.min()) / (contrast.max() - contrast.min())
    scores = search.significance()["weight"]
    assert torch.allclose(scores.double(), expected, atol=1e-5)
    assert scores[0, 0] == 1 and scores[1, 0] == 0
    assert torch.allclose(search.estimator.uncertainty()["weight"].double(), stderr, rtol=1e-4, atol=1e-6)


def test_contrast_uncertainty_shrinks_like_one_over_sqrt_probes():
    # Varying batches: both sides of every contrast are noisy. 10x the probes -> about
    # sqrt(10) = 3.16x smaller standard error (1/n would give 10x, no division 1x).
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.5, mode="zero", metric="loss", rule="contrast", seed=1)
    batches = _varying_batches(400, seed=11, size=32)
    for x, y in batches[:40]:
        search.step(x, y)
    early = search.estimator.uncertainty()
    for x, y in batches[40:]:
        search.step(x, y)
    late = search.estimator.uncertainty()
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
    counts, stderr = search.probe_counts()["weight"], search.estimator.uncertainty()["weight"]
    assert counts.sum() == 3
    assert torch.equal(stderr.isinf(), counts == 0)
    assert (stderr[counts > 0] >= 0).all()
    # fraction 1: every probe has every weight, so there is no "not probed" side either.
    everything = bingo.TicketSearch(layer, fraction=1.0, metric="loss", rule="contrast")
    everything.step(x, y)
    assert everything.estimator.uncertainty()["weight"].isinf().all()
    assert (everything.significance()["weight"] == 1).all()  # unprobed="keep"
    assert everything.significance(unprobed="nan")["weight"].isnan().all()


@pytest.mark.parametrize("estimator", ["taylor", "hybrid"])
def test_gradient_estimators_have_a_single_read_out(estimator):
    search = bingo.TicketSearch(make_mlp(), estimator=estimator, metric="loss")
    message = rf"^unknown rule 'contrast' for estimator '{estimator}'; valid choices: none \(it has a single read-out\)"
    with pytest.raises(ConfigError, match=message):
        search.significance(rule="contrast")
    with pytest.raises(ConfigError, match=message):
        bingo.TicketSearch(make_mlp(), estimator=estimator, metric="loss", rule="contrast")


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
    calibration = search.estimator.calibration()
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


def test_calibration_is_one_before_any_probe():
    search = bingo.TicketSearch(make_mlp(), estimator="hybrid", metric="loss")
    assert search.estimator.calibration() == {"1.weight": 1.0, "3.weight": 1.0, "5.weight": 1.0}


def test_hybrid_needs_the_loss_metric_and_takes_it_by_default():
    assert bingo.TicketSearch(make_mlp(), estimator="hybrid").config.metric == "loss"  # the estimator's own default
    assert bingo.TicketSearch(make_mlp(), estimator="taylor").config.metric == "loss"
    assert bingo.TicketSearch(make_mlp()).config.metric == "accuracy"  # the paper's probe
    with pytest.raises(
        ConfigError, match=r"^estimator 'hybrid' calibrates loss estimates and needs metric='loss', got 'accuracy'$"
    ):
        bingo.TicketSearch(make_mlp(), estimator="hybrid", metric="accuracy")
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
    with pytest.raises(ConfigError, match=rf"^every must be a whole number >= 1 \(or None: chosen from the number of layers\), got {every}$"):
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

    def sums():  # the calibration sums, as checkpointed
        state = search.state_dict()["estimator"]
        return [(float(e["calibration_measured"]), float(e["calibration_predicted"])) for e in state.values()]

    added, calibration_sums = [], [sums()]
    for _ in range(7):
        _backward(model, *batch)
        calls.clear()
        search.step(*batch)
        added.append(len(calls))
        calibration_sums.append(sums())
    # probing steps: one unmodified pass plus one fake pass per layer (3 layers); the first probing
    # step runs the 3 fake passes once more without reusing earlier layers' outputs, to compare
    assert added == [7, 0, 0, 4, 0, 0, 4]
    # the calibration sums move on probing steps only
    moved = [after != before for before, after in zip(calibration_sums, calibration_sums[1:])]
    assert moved == [True, False, False, True, False, False, True]
    # Taylor accumulates on every step
    for key, counts in search.probe_counts().items():
        assert torch.equal(counts, torch.full_like(counts, 7)), key


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
        assert len(calls) == ((7 if step == 1 else 4) if searched else 0)  # step 1 checks the reuse: 3 passes more
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
        rf"^estimator '{estimator}' reads the gradient of '1\.weight', which is None: "
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
    saved, resumed_state = straight.state_dict()["estimator"], resumed.state_dict()["estimator"]
    assert saved.keys() == resumed_state.keys() == straight.theta0.keys()
    for key, entry in saved.items():
        assert entry.keys() == resumed_state[key].keys()
        for name, tensor in entry.items():
            assert torch.equal(resumed_state[key][name], tensor), (key, name)
    if estimator == "hybrid":
        assert resumed.estimator.calibration() == straight.estimator.calibration()
        assert resumed.estimator.calibration() != {key: 1.0 for key in straight.theta0}


def test_state_dict_of_another_estimator_is_refused():
    taylor = bingo.TicketSearch(make_mlp(), estimator="taylor", metric="loss")
    hybrid = bingo.TicketSearch(make_mlp(), estimator="hybrid", metric="loss")
    with pytest.raises(CheckpointError, match=r"different settings: estimator='taylor' \(now 'hybrid'\)$"):
        hybrid.load_state_dict(taylor.state_dict())
    other_decay = bingo.TicketSearch(make_mlp(), estimator="taylor", metric="loss", decay=0.5)
    with pytest.raises(CheckpointError, match=r"different settings: decay=0\.99 \(now 0\.5\)$"):
        other_decay.load_state_dict(taylor.state_dict())


# -- targeted ticket searching ------------------------------------------------------------


def _hand_hybrid(target: float, band: float) -> tuple[nn.Module, bingo.TicketSearch]:
    """A hybrid search on one 10x10 layer whose Taylor scores are set by hand to 1..100.

    The scores go in through the checkpoint: the state a search saved after one step.
    """
    layer = nn.Linear(10, 10, bias=False)
    search = bingo.TicketSearch(
        layer, fraction=0.01, estimator="hybrid", metric="loss", decay=1.0, target=target, band=band
    )
    state = search.state_dict()
    state["estimator"]["weight"]["taylor_average"] = torch.arange(1, 101, dtype=torch.float32).view(10, 10)
    state["estimator"]["weight"]["taylor_steps"] = torch.tensor(1)
    search.load_state_dict(state)
    return layer, search


def test_focus_is_everything_until_there_are_estimates():
    search = bingo.TicketSearch(make_mlp(), fraction=0.1, metric="loss", rule="contrast", target=0.5)
    assert all(f.all() for f in search.estimator.focus_masks().values())
    search.estimator.refocus()  # nothing probed yet: nothing known, nothing leaves
    assert all(f.all() for f in search.estimator.focus_masks().values())


@pytest.mark.parametrize("target, band, low, high", [(0.5, 0.1, 40, 60), (0.9, 0.05, 85, 95), (0.05, 0.1, 1, 15)])
def test_focus_band_hand_computed(target, band, low, high):
    # Scores 1..100: the threshold at sparsity s is the score ranked round(s·100); the band
    # keeps the scores ranked within band·100 of it (clipped at the ends).
    focus = {"weight": bingo.estimators.Focus.initial(torch.Size([10, 10]))}
    scores = torch.arange(1, 101).view(10, 10)
    bingo.estimators.Focus(target, band).refocus(focus, {"weight": scores.double()})
    assert torch.equal(focus["weight"], (scores >= low) & (scores <= high))


def test_hybrid_refocuses_on_its_taylor_scores_and_probes_the_focus():
    # End to end through the hybrid estimator: its first probing step re-decides the focus
    # from the Taylor scores (here 1..100 by hand) before drawing. A zero gradient keeps the
    # ranking (decay 1: the average halves to 1/2..50).
    layer, search = _hand_hybrid(0.5, 0.1)
    layer.weight.grad = torch.zeros_like(layer.weight)
    search.step(torch.randn(4, 10), torch.randint(0, 10, (4,)))
    scores = torch.arange(1, 101).view(10, 10)
    assert torch.equal(search.estimator.focus_masks()["weight"], (scores >= 40) & (scores <= 60))
    assert torch.allclose(search.estimator.estimate("weight"), scores.double() / 2)
    # The probe (1 weight of 100) predicted ½ · its average, so its score is 4x that: in the band.
    predicted = float(search.state_dict()["estimator"]["weight"]["calibration_predicted"])
    assert 40 <= 4 * predicted <= 60


def test_targeted_probes_draw_only_from_the_focus(batch):
    x, y = batch
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.1, metric="loss", rule="mean", target=0.5, seed=4)
    search.step(x, y)  # round 0 refocuses (nothing known yet); rounds 1..9 keep the focus set below
    generator = torch.Generator().manual_seed(0)
    chosen = {key: torch.rand(f.shape, generator=generator) < 0.3 for key, f in search.estimator.focus_masks().items()}
    # A focus set by hand: written into the checkpoint, which is the estimator's public state.
    state = search.state_dict()
    for key, focus in chosen.items():
        state["estimator"][key]["focus"] = focus
    search.load_state_dict(state)
    assert all(torch.equal(search.estimator.focus_masks()[key], focus) for key, focus in chosen.items())
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
    from bingo.estimators.targeted import draw_subset, focus_candidates

    search = bingo.TicketSearch(nn.Linear(10, 10, bias=False), fraction=0.05)  # a probe holds 5 of 100
    focus = torch.zeros(10, 10, dtype=torch.bool)

    def candidates():
        return focus_candidates({"weight": {"focus": focus}})["weight"]

    focus.view(-1)[[3, 7]] = True
    assert sorted(draw_subset(search, "weight", candidates()).tolist()) == [3, 7]  # both go
    focus.view(-1)[:20] = True
    drawn = draw_subset(search, "weight", candidates())
    assert drawn.numel() == 5 and (drawn < 20).all() and len(set(drawn.tolist())) == 5
    focus.zero_()  # an empty focus falls back to the whole layer
    assert draw_subset(search, "weight", candidates()).numel() == 5
    focus.fill_(True)  # everything in focus: no index list kept at all
    assert candidates() is None
    assert draw_subset(search, "weight").numel() == 5  # no focus: untargeted


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
    focus = torch.cat([f.flatten() for f in search.estimator.focus_masks().values()])
    assert 0 < focus.sum() < 0.5 * focus.numel()
    assert counts[focus].mean() > 2 * counts[~focus].mean()
    assert sum(int(c.sum()) for c in search.probe_counts().values()) >= 0.8 * 200 * sum(
        max(1, round(0.05 * theta0.numel())) for theta0 in search.theta0.values()
    )


def test_contrast_focus_keeps_weights_within_two_standard_errors():
    search = _contrast_search(CONTRAST_THETA0, 200, target=0.5)
    search.estimator.refocus()
    contrast = search.estimator.raw_scores("contrast")["weight"]
    stderr = search.estimator.uncertainty()["weight"].double()
    threshold = contrast.flatten().sort().values[1]  # rank round(0.5 · 4) = 2
    expected = (contrast - threshold).abs() <= 2 * stderr
    assert torch.equal(search.estimator.focus_masks()["weight"], expected)
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
        assert torch.equal(resumed.estimator.focus_masks()[key], straight.estimator.focus_masks()[key]), key


def test_target_settings_are_checked():
    with pytest.raises(ConfigError, match=r"^target must be a sparsity in \[0, 1\) \(0 = untargeted\), got 1\.0$"):
        bingo.TicketSearch(make_mlp(), target=1.0)
    with pytest.raises(ConfigError, match=r"^band must be in \(0, 0\.5\], got 0\.0$"):
        bingo.TicketSearch(make_mlp(), target=0.5, band=0.0)
    with pytest.raises(ConfigError, match=r"^target needs fake passes to concentrate; estimator 'taylor' runs none"):
        bingo.TicketSearch(make_mlp(), estimator="taylor", metric="loss", target=0.5)
    with pytest.raises(ConfigError, match=r"^focus needs a targeted search \(target > 0\)$"):
        bingo.TicketSearch(make_mlp()).estimator.focus_masks()


# -- a user's own estimator ------------------------------------------------------------------


class MeanGradWeight(bingo.Estimator):
    """Mean |g · w| per weight over the steps observed: an estimator as a user writes one."""

    name = "mean-grad-weight"

    def attach(self, search):
        super().attach(search)
        for key, theta0 in search.theta0.items():  # in self.state, so checkpoints need no code
            self.state[key] = {"sum": torch.zeros_like(theta0, dtype=torch.float64), "steps": torch.tensor(0)}

    def observe(self, batch):
        for key, module in self.search.layers.items():
            self.state[key]["sum"] += (module.weight.grad * module.weight).abs()
            self.state[key]["steps"] += 1
        return {}

    def raw_scores(self, rule):
        scores = {}
        for key, entry in self.state.items():  # NaN: nothing observed yet
            steps = entry["steps"]
            scores[key] = entry["sum"] / steps if steps else torch.full_like(entry["sum"], math.nan)
        return scores


def _train_with(search_factory, batches) -> tuple[nn.Module, bingo.TicketSearch, dict[str, torch.Tensor]]:
    """SGD on make_mlp() with a search; also returns the sum of |g · w| each step showed the search."""
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    search = search_factory(model)
    sums = {key: torch.zeros_like(m.weight, dtype=torch.float64) for key, m in search.layers.items()}
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        search.step(x, y)
        for key, m in search.layers.items():
            sums[key] += (m.weight.grad * m.weight).detach().abs()
    return model, search, sums


def test_custom_estimator_scores_and_prunes():
    batches = _varying_batches(4, seed=3)
    model, search, sums = _train_with(lambda m: bingo.TicketSearch(m, estimator=MeanGradWeight()), batches)
    raw = search.estimator.raw_scores(None)
    for key, total in sums.items():
        assert torch.allclose(raw[key], total / 4, rtol=1e-6, atol=0), key
    # significance: one affine map of all layers' raw scores onto [0, 1]
    low = min(float(r.min()) for r in raw.values())
    high = max(float(r.max()) for r in raw.values())
    scores = search.significance()
    for key, score in scores.items():
        assert torch.allclose(score.double(), (raw[key] - low) / (high - low), atol=1e-6), key
    assert search.config.to_dict()["estimator"] == "mean-grad-weight"
    with pytest.raises(ConfigError, match="^unknown rule 'mean' for estimator 'mean-grad-weight'; valid choices: none"):
        search.significance(rule="mean")
    with pytest.raises(ConfigError, match="^estimator 'mean-grad-weight' does not count observations per weight$"):
        search.probe_counts()

    masks = bingo.prune(model, scores, 0.5)
    total = sum(mask.numel() for mask in masks.values())
    assert sum(int((~mask).sum()) for mask in masks.values()) == round(0.5 * total)  # exact sparsity
    assert bingo.model_sparsity(model) == round(0.5 * total) / total
    pruned = torch.cat([score[~masks[key]] for key, score in scores.items()])
    kept = torch.cat([score[masks[key]] for key, score in scores.items()])
    assert pruned.max() <= kept.min()  # the least significant went


def test_custom_estimator_checkpoint_resumes_identically():
    batches = _varying_batches(6, seed=5)
    _, straight, _ = _train_with(lambda m: bingo.TicketSearch(m, estimator=MeanGradWeight()), batches)

    def resume(model):
        first_model, first, _ = _train_with(lambda m: bingo.TicketSearch(m, estimator=MeanGradWeight()), batches[:3])
        model.load_state_dict(first_model.state_dict())
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        search = bingo.TicketSearch(model, estimator=MeanGradWeight())
        search.load_state_dict(torch.load(buffer, weights_only=True))
        assert search.steps == 3
        return search

    _, resumed, _ = _train_with(resume, batches[3:])  # the SGD optimizer has no state to carry over
    assert resumed.steps == straight.steps == 6
    for key, score in straight.significance().items():
        assert torch.equal(resumed.significance()[key], score), key


@on_tiny_models
def test_training_is_bit_identical_with_a_custom_estimator(factory, data):
    plain, _ = train_tiny(factory, data)
    searched, search = train_tiny(factory, data, lambda m: bingo.TicketSearch(m, estimator=MeanGradWeight()))
    assert search.steps == 12
    plain_state, searched_state = plain.state_dict(), searched.state_dict()
    assert list(plain_state) == list(searched_state)
    for key in plain_state:
        assert torch.equal(plain_state[key], searched_state[key]), key


def test_registered_estimator_is_available_by_name(estimator_registry, batch):
    assert "mean-grad-weight" not in estimator_registry
    assert bingo.register_estimator(MeanGradWeight) is MeanGradWeight
    assert estimator_registry["mean-grad-weight"] is MeanGradWeight
    model = make_mlp()
    search = bingo.TicketSearch(model, estimator="mean-grad-weight")
    assert type(search.estimator) is MeanGradWeight and search.estimator.search is search
    _backward(model, *batch)
    search.step(*batch)
    # by name or by instance, it is the same estimator to a checkpoint
    by_instance = bingo.TicketSearch(model, estimator=MeanGradWeight())
    by_instance.load_state_dict(search.state_dict())
    assert all(torch.equal(by_instance.significance()[key], s) for key, s in search.significance().items())
    message = "^unknown estimator 'fisher'; valid choices: probe, taylor, hybrid, mean-grad-weight, or an Estimator"
    with pytest.raises(ConfigError, match=message):
        bingo.TicketSearch(model, estimator="fisher")

    class Nameless(MeanGradWeight):
        name = ""

    with pytest.raises(ConfigError, match="^Nameless needs a class attribute 'name' to be registered$"):
        bingo.register_estimator(Nameless)


def test_an_estimator_instance_serves_one_search():
    estimator = MeanGradWeight()
    first = bingo.TicketSearch(make_mlp(), estimator=estimator)
    message = "^this MeanGradWeight already serves another TicketSearch; give each search its own instance$"
    with pytest.raises(ConfigError, match=message):
        bingo.TicketSearch(make_mlp(), estimator=estimator)
    assert estimator.search is first


def test_hybrid_says_when_its_calibration_did_not_engage(batch):
    # Probes that lower the loss (measured <= 0 in total) give a layer no factor of its own: say so, do not hide it.
    x, y = batch
    model = make_mlp()
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", fraction=0.5)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # weights that moved: mode='reset' scores g·(θ0 − w)
    search.step(x, y)
    state = search.state_dict()
    for key in state["estimator"]:
        state["estimator"][key]["calibration_measured"] = torch.tensor(-1.0, dtype=torch.float64)
        state["estimator"][key]["calibration_predicted"] = torch.tensor(2.0, dtype=torch.float64)
    search.load_state_dict(state)
    assert search.estimator.uncalibrated() == ["1.weight", "3.weight", "5.weight"]
    assert search.estimator.calibration() == {"1.weight": 1.0, "3.weight": 1.0, "5.weight": 1.0}
    with pytest.warns(UserWarning, match=r"^hybrid calibration did not engage for any of the 3 layers: .* the Taylor estimate alone "):
        search.significance()
    # Some layers without a factor is common: no warning, the layers are listed (and recorded by `bingo run`) ...
    state["estimator"]["1.weight"]["calibration_measured"] = torch.tensor(1800.0, dtype=torch.float64)
    search.load_state_dict(state)
    assert search.estimator.uncalibrated() == ["3.weight", "5.weight"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search.significance()
    # ... and they take the calibrated layers' median factor, not 1, which would rank them 900x too low.
    assert search.estimator.calibration() == {"1.weight": 900.0, "3.weight": 900.0, "5.weight": 900.0}
    state["estimator"]["3.weight"]["calibration_measured"] = torch.tensor(200.0, dtype=torch.float64)
    search.load_state_dict(state)
    assert search.estimator.calibration() == {"1.weight": 900.0, "3.weight": 100.0, "5.weight": 500.0}


def test_an_uncalibrated_layer_ranks_by_its_taylor_estimate_at_the_typical_scale(batch):
    # Public behaviour: with every factor equal, the hybrid's ranking is the Taylor ranking, across layers too.
    x, y = batch
    model = make_mlp()
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", fraction=0.5, mode="zero")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    search.step(x, y)
    state = search.state_dict()
    for key, measured in zip(state["estimator"], (900.0, 900.0, -1.0)):
        state["estimator"][key]["calibration_measured"] = torch.tensor(measured, dtype=torch.float64)
        state["estimator"][key]["calibration_predicted"] = torch.tensor(1.0, dtype=torch.float64)
    search.load_state_dict(state)
    hybrid = search.significance()
    taylor = {key: search.estimator.estimate(key) for key in hybrid}
    low = min(float(t.min()) for t in taylor.values())
    high = max(float(t.max()) for t in taylor.values())
    for key in hybrid:
        assert torch.allclose(hybrid[key].double(), (taylor[key] - low) / (high - low), atol=1e-6), key
    assert high > low


def test_taylor_update_every_k_steps_averages_those_steps_with_the_decay_per_update():
    from bingo.estimators.taylor import TaylorEstimator

    layer = nn.Linear(3, 2, bias=False)
    decay, k = 0.9, 2
    search = bingo.TicketSearch(layer, estimator=TaylorEstimator(decay=decay, update_every=k), metric="loss", mode="zero")
    w = layer.weight.detach().clone()
    grads = [torch.full((2, 3), float(t + 1)) for t in range(4)]
    for g in grads:
        layer.weight.grad = g.clone()
        search.step(torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
    c1, c3 = (grads[0] * w) ** 2, (grads[2] * w) ** 2  # steps 1 and 3 are used; 2 and 4 are not
    average = decay * (1 - decay) * c1 + (1 - decay) * c3  # two updates, the decay applied once between them
    expected = average.double() / (1 - decay**2)
    torch.testing.assert_close(search.estimator.estimate("weight"), expected)
    assert {key: int(c.unique()) for key, c in search.probe_counts().items()} == {"weight": 2}


def test_the_default_search_takes_the_taylor_average_from_every_4th_step_and_the_config_drives_it():
    from bingo.estimators.taylor import TaylorEstimator
    from bingo.search import BINGO_SEARCH

    model = make_mlp()
    default = bingo.TicketSearch(model, config=BINGO_SEARCH)
    assert default.config.taylor_every == 4 and default.estimator.update_every == 4
    assert bingo.TicketSearch(model, estimator="taylor", taylor_every=3).estimator.update_every == 3
    assert bingo.TicketSearch(model, estimator="hybrid").estimator.update_every == 1  # SearchConfig's own default
    with pytest.raises(ConfigError, match="^taylor_every must be a whole number >= 1, got 0$"):
        bingo.SearchConfig(estimator="taylor", taylor_every=0)
    with pytest.raises(ConfigError, match="^update_every must be a whole number >= 1, got 0$"):
        TaylorEstimator(update_every=0)
