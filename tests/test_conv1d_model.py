"""A ``nn.Conv1d`` sequence classifier end to end, through the public API: search, prune, compensate, shrink.

The task: 4-channel noisy sequences with one of 4 fixed motifs added at a
random place; the class is the motif. The model:
``Conv1d -> ReLU -> Conv1d -> ReLU -> max over time -> Linear``.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st
from torch import nn

import bingo

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CHANNELS, LENGTH, CLASSES, MOTIF = 4, 32, 4, 5
KEYS = ["conv1.weight", "conv2.weight", "head.weight"]


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    motifs = torch.randn(CLASSES, CHANNELS, MOTIF, generator=torch.Generator().manual_seed(99)).sign()
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(CLASSES, (n,), generator=generator)
    x = torch.randn(n, CHANNELS, LENGTH, generator=generator)
    start = torch.randint(LENGTH - MOTIF + 1, (n,), generator=generator)
    positions = (start[:, None] + torch.arange(MOTIF))[:, None, :].expand(n, CHANNELS, MOTIF)
    x.scatter_add_(2, positions, 0.9 * motifs[y])
    return x, y


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(CHANNELS, width, 5, padding=2)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1)
        self.pool = nn.AdaptiveMaxPool1d(1)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(F.relu(self.conv2(F.relu(self.conv1(x))))).flatten(1))


def _train(model, x, y, steps, searches=()):
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(x), (64,), generator=generator)
        loss = F.cross_entropy(model(x[rows]), y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for search in searches:
            search.step(x[rows], y[rows])
    model.eval()
    return model


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


@torch.no_grad()
def _output_error(model, dense, x, module: str = "") -> float:
    """Mean squared difference to the dense model's output of ``module`` (default: the model's own output) on ``x``."""
    outputs = []
    for net in (model, dense):
        net.eval()
        if module:
            handle = net.get_submodule(module).register_forward_hook(lambda m, a, out: outputs.append(out))
            net(x)
            handle.remove()
        else:
            outputs.append(net(x))
    return float((outputs[0] - outputs[1]).square().mean())


def _compensate(model, masks, calibration, **kwargs):
    """``bingo.compensate`` and the warnings it gave that name compensation."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bingo.compensate(model, masks, calibration, **kwargs)
    return result, [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "compensat" in str(w.message)]


def _skipped(result, key: str) -> list[str]:
    """The reasons ``result.skipped`` gives for ``key`` (entries are ``"<key>: <reason>"``)."""
    return [entry[len(key) + 1 :].strip() for entry in result.skipped if entry.startswith(key + ":")]


@pytest.fixture(scope="module")
def data():
    return {"train": _data(2048, seed=1), "held_out": _data(512, seed=2)}


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = Net()
    search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=0)
    neurons = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=0, granularity="neuron")
    _train(model, *data["train"], 300, searches=(search, neurons))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = bingo.combine_ranks([search.significance(), bingo.magnitude_scores(model)])
        unit_scores = bingo.combine_ranks([neurons.significance(), bingo.magnitude_scores(model, "neuron")])
    return model, search, scores, unit_scores


def test_the_model_learns_the_task(trained, data):
    model, _, _, _ = trained
    assert _accuracy(model, *data["held_out"]) > 0.8  # chance is 0.25


def test_default_search_scores_the_conv1d_weights(trained):
    model, search, _, _ = trained
    assert list(search.layers) == KEYS
    significance = search.significance()
    for key in KEYS:
        assert significance[key].shape == model.get_parameter(key).shape  # (out, in, kernel) for a Conv1d
        assert float(significance[key].std()) > 0.0
    assert search.coverage().scored == sum(model.get_parameter(k).numel() for k in KEYS)


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_compensate_refits_every_pruned_conv1d_and_does_not_make_held_out_outputs_worse(trained, data, sparsity):
    model, _, scores, _ = trained
    pruned = copy.deepcopy(model)
    masks = bingo.prune(pruned, scores, sparsity=sparsity)
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * sum(m.numel() for m in masks.values()))
    x_test, y_test = data["held_out"]
    uncompensated = copy.deepcopy(pruned)
    result, warned = _compensate(pruned, masks, data["train"][0][:512])
    assert list(result.skipped) == [] and warned == []
    assert set(result.layers) == set(KEYS)  # the two Conv1d layers as well as the Linear head
    for key in KEYS:
        assert result.error_after[key] <= result.error_before[key] * (1 + 1e-6), key
    # held out: the first layer sees the same inputs either way, so this is the fit generalising
    assert _output_error(pruned, model, x_test, "conv1") < _output_error(uncompensated, model, x_test, "conv1")
    assert _output_error(pruned, model, x_test) < _output_error(uncompensated, model, x_test)
    assert _accuracy(pruned, x_test, y_test) >= _accuracy(uncompensated, x_test, y_test)
    with torch.no_grad():
        assert F.cross_entropy(pruned(x_test), y_test) <= F.cross_entropy(uncompensated(x_test), y_test)
    pruned(x_test[:1])
    for key, mask in masks.items():
        assert bool((pruned.get_submodule(key.rpartition(".")[0]).weight[~mask] == 0).all())  # masks hold


def _reference_fit(conv: nn.Conv1d, dense_weight, dense_bias, keep, x) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output unit, ``torch.linalg.lstsq`` of the dense conv's output on the unit's kept input patches (and a bias)."""
    (k,), (stride,), (dilation,) = conv.kernel_size, conv.stride, conv.dilation
    if conv.padding == "same":
        total = dilation * (k - 1)
        pads = (total // 2, total - total // 2)
    else:
        pads = (conv.padding[0],) * 2
    mode = {"zeros": "constant"}.get(conv.padding_mode, conv.padding_mode)
    padded = F.pad(x.double(), pads, mode=mode)
    span = dilation * (k - 1) + 1
    patches = padded.unfold(2, span, stride)[..., ::dilation]  # (N, C, P, k)
    dense = F.conv1d(padded, dense_weight.double(), None if dense_bias is None else dense_bias.double(), stride, 0, dilation, conv.groups)
    per_group_in, per_group_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    weight = torch.zeros_like(dense_weight, dtype=torch.float64)
    bias = None if dense_bias is None else torch.zeros(conv.out_channels, dtype=torch.float64)
    for unit in range(conv.out_channels):
        group = unit // per_group_out
        rows = patches[:, group * per_group_in : (group + 1) * per_group_in].permute(0, 2, 1, 3).reshape(-1, per_group_in * k)
        kept = keep[unit].reshape(-1)
        design = rows[:, kept]
        if bias is not None:
            design = torch.cat([design, torch.ones(len(design), 1, dtype=torch.float64)], dim=1)
        if design.shape[1] == 0:
            continue  # every weight of the unit pruned, and no bias: it stays zero
        target = dense[:, unit].reshape(-1, 1)
        solution = torch.linalg.lstsq(design, target).solution[:, 0]
        weight[unit].view(-1)[kept] = solution[: int(kept.sum())]
        if bias is not None:
            bias[unit] = solution[-1]
    return weight, bias


@settings(max_examples=30, deadline=None)
@given(
    kernel=st.integers(1, 4), stride=st.integers(1, 2), dilation=st.integers(1, 2), padding=st.sampled_from([0, 1, 2, "same"]),
    padding_mode=st.sampled_from(["zeros", "zeros", "reflect", "circular"]), groups=st.sampled_from([1, 1, 2]),
    bias=st.booleans(), seed=st.integers(0, 2**16),
)
@example(kernel=3, stride=2, dilation=2, padding=2, padding_mode="zeros", groups=1, bias=True, seed=0)  # fitted by any core
@example(kernel=3, stride=1, dilation=1, padding=1, padding_mode="zeros", groups=2, bias=False, seed=1)
def test_a_pruned_conv1d_is_the_least_squares_fit_or_skipped_with_a_warning(kernel, stride, dilation, padding, padding_mode, groups, bias, seed):
    """Whatever its settings, a masked Conv1d is re-fitted exactly as lstsq would, or listed in ``skipped``, warned: never silent."""
    if padding == "same" and stride != 1:
        stride = 1  # PyTorch refuses 'same' with a stride
    torch.manual_seed(seed)
    conv = nn.Conv1d(4, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode)
    model = nn.Sequential(conv)
    dense_weight = conv.weight.detach().clone()
    dense_bias = None if conv.bias is None else conv.bias.detach().clone()
    x = torch.randn(24, 4, 10)
    masks = bingo.prune(model, bingo.magnitude_scores(model), sparsity=0.5)
    assert list(masks) == ["0.weight"]
    result, warned = _compensate(model, masks, x, damping=0.0)
    reasons = _skipped(result, "0.weight")
    if "0.weight" in result.layers:
        assert reasons == [] and warned == []
        expected_weight, expected_bias = _reference_fit(conv, dense_weight, dense_bias, masks["0.weight"], x)
        model(x[:1])
        torch.testing.assert_close(conv.weight.detach().double(), expected_weight, atol=1e-4, rtol=1e-4)
        if bias:
            torch.testing.assert_close(conv.bias.detach().double(), expected_bias, atol=1e-4, rtol=1e-4)
    else:
        assert reasons and all(reasons), f"a masked Conv1d neither re-fitted nor skipped with a reason: {result}"
        assert any("0.weight" in message for message in warned), f"skipped without a warning: {warned}"
    assert bool((conv.weight.detach()[~masks["0.weight"]] == 0).all())


class TokenNet(nn.Module):
    """Tokens -> Embedding -> Conv1d -> ReLU -> max over time -> Linear."""

    def __init__(self, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(self.embed(tokens).transpose(1, 2)))
        return self.head(x.amax(dim=2))


def test_a_masked_embedding_is_listed_in_skipped_with_a_reason_and_warned():
    torch.manual_seed(0)
    model = TokenNet()
    tokens = torch.randint(20, (64, 12))
    scores = bingo.magnitude_scores(model, include=["*"])  # the embedding too, chosen explicitly
    assert set(scores) == {"embed.weight", "conv.weight", "head.weight"}
    masks = bingo.prune(model, scores, sparsity=0.5)
    result, warned = _compensate(model, masks, tokens)
    reasons = _skipped(result, "embed.weight")
    assert reasons and all(reasons), f"the masked embedding is not in skipped with a reason: {result.skipped}"
    assert "embed.weight" not in result.layers
    assert any("embed.weight" in message for message in warned), warned
    assert set(result.layers) == {"conv.weight", "head.weight"}  # the rest is re-fitted all the same


def test_neuron_granularity_compensates_the_conv1d_filters_and_shrinks_them(trained, data):
    model, _, _, unit_scores = trained
    assert set(unit_scores) == {"conv1.weight", "conv2.weight"}  # the head's units are the classes: never pruned
    masked = copy.deepcopy(model)
    masks = bingo.prune(masked, unit_scores, sparsity=0.5, scope="layer")
    assert [int(m.sum()) for m in masks.values()] == [8, 8]
    uncompensated = copy.deepcopy(masked)
    result, warned = _compensate(masked, masks, data["train"][0][:512])
    # the head too: never masked, but its inputs changed
    # conv1 sees the dense inputs: its kept filters already compute the dense ones, nothing to re-fit
    assert set(result.layers) == {"conv2.weight", "head.weight"} and result.unchanged == ("conv1.weight",)
    assert list(result.skipped) == [] and warned == []
    x_test, y_test = data["held_out"]
    assert _output_error(masked, model, x_test) < _output_error(uncompensated, model, x_test)
    masked(x_test[:1])
    for key, keep in masks.items():  # pruned filters stay pruned, bias included
        module = masked.get_submodule(key.rpartition(".")[0])
        assert bool((module.weight[~keep] == 0).all()) and bool((module.bias[~keep] == 0).all())
    shrunk = bingo.shrink(masked, (CHANNELS, LENGTH))  # one sample's shape
    assert (shrunk.conv1.out_channels, shrunk.conv2.in_channels, shrunk.conv2.out_channels, shrunk.head.in_features) == (8, 8, 8, 8)
    assert bingo.count_parameters(shrunk) < bingo.count_parameters(model)
    with torch.no_grad():
        torch.testing.assert_close(shrunk.eval()(x_test), masked.eval()(x_test), atol=1e-5, rtol=1e-5)


def test_conv1d_example_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    example = importlib.import_module("conv1d_sequence")
    out = tmp_path / "conv1d.json"
    summary = example.main(["--steps", "40", "--width", "8", "--json", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.match(r"^accuracy dense \d\.\d{3}; 50% pruned \d\.\d{3}, compensated \d\.\d{3}; 80% pruned \d\.\d{3}, "
                    r"compensated \d\.\d{3}; filters halved and shrunk \d\.\d{3}$", last), last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv1d.json"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    assert summary["scored"] == ["conv1.weight", "conv2.weight", "head.weight"]
    for r in summary["results"]:  # every scored layer re-fitted, or left as it was where no re-fit did better
        assert set(r["layers"]) | set(r.get("unchanged", [])) == set(summary["scored"]) and r["skipped"] == []
    neuron = summary["neuron"]
    assert set(neuron["layers"]) == {"conv2.weight", "head.weight"} and neuron["unchanged"] == ["conv1.weight"] and neuron["skipped"] == []
    assert abs(neuron["shrunk"] - neuron["compensated"]) <= 1 / 1024 and neuron["max_difference"] < 1e-4
    assert neuron["parameters"][1] < neuron["parameters"][0]
