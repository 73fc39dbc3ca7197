"""TicketSearch: hand-computed scores, exact restoration, no perturbation, resume."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import bingo
from bingo.errors import CheckpointError, ConfigError
from conftest import make_cnn, make_mlp, on_tiny_models, train_tiny


# -- a 2x2 layer whose every single-weight reset can be worked out by hand --------------
#
# x = [[1, 0], [0, 1]], y = [0, 1]; logits = W @ x, so sample 1 reads column 0 of W and
# sample 2 reads column 1. Trained W = [[2, 0], [0, 2]] classifies both (accuracy 1).
# theta0 = [[-1, 0], [0, 1]].
#   reset W[0,0] to -1: sample 1 logits (-1, 0) -> class 1, wrong: accuracy 0.5, damage 0.5
#   reset W[0,1] / W[1,0]: theta0 equals the trained value, nothing changes: damage 0
#   reset W[1,1] to 1: sample 2 logits (0, 1) still right: damage 0 by accuracy
THETA0 = [[-1.0, 0.0], [0.0, 1.0]]
TRAINED = [[2.0, 0.0], [0.0, 2.0]]
X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
Y = torch.tensor([0, 1])


def hand_model() -> nn.Module:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(THETA0))
    return layer


def trained(search_kwargs: dict, steps: int = 60) -> bingo.TicketSearch:
    model = hand_model()
    # fraction 0.25 of 4 weights: every probe resets exactly one weight.
    search = bingo.TicketSearch(model, fraction=0.25, **search_kwargs)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(TRAINED))
    for _ in range(steps):
        search.step(X, Y)
    return search


def test_hand_computed_accuracy_significance():
    search = trained({})
    counts = search.probe_counts()["weight"]
    assert counts.sum() == 60 and (counts > 0).all()
    assert torch.equal(search.significance()["weight"], torch.tensor([[0.5, 0.0], [0.0, 0.0]]))


def _cross_entropy(logits_1, logits_2):
    def ce(logits, label):
        return -logits[label] + math.log(sum(math.exp(v) for v in logits))

    return (ce(logits_1, 0) + ce(logits_2, 1)) / 2


def test_hand_computed_loss_significance():
    search = trained({"metric": "loss"})
    before = _cross_entropy([2, 0], [0, 2])
    after_00 = _cross_entropy([-1, 0], [0, 2])
    after_11 = _cross_entropy([2, 0], [0, 1])
    expected = torch.tensor(
        [[min((after_00 - before) / before, 1.0), 0.0], [0.0, (after_11 - before) / before]]
    )
    assert torch.allclose(search.significance()["weight"], expected, atol=1e-6)
    assert expected[1, 1] > 0  # the loss sees what accuracy cannot


def test_zero_mode_hand_computed():
    # Zeroing W[1,1] makes sample 2's logits (0, 0); argmax takes the first: class 0, wrong.
    # Zeroing W[0,0] gives (0, 0) for sample 1: class 0, still right.
    search = trained({"mode": "zero"})
    assert torch.equal(search.significance()["weight"], torch.tensor([[0.0, 0.0], [0.0, 0.5]]))


def test_paper_rule_is_the_authors_running_average():
    search = trained({"rule": "paper"})
    counts = search.probe_counts()["weight"]
    # s <- (s + |dA|) / 2 from 0, n times with |dA| = 0.5: s = 0.5 * (1 - 2**-n)
    expected = torch.zeros(2, 2)
    expected[0, 0] = 0.5 * (1 - 0.5 ** counts[0, 0].item())
    assert torch.allclose(search.significance()["weight"], expected)


def test_callable_metric_higher_is_better():
    calls = []

    def margin(outputs, targets):
        calls.append(1)
        return outputs.gather(1, targets[:, None]).mean().item()

    search = trained({"metric": margin}, steps=20)
    scores = search.significance()["weight"]
    assert len(calls) == 40  # one unmodified pass and one fake pass per step
    # Margin before = 2; resetting W[0,0] gives mean(-1, 2) = 0.5 -> drop 0.75; W[1,1] -> 0.25.
    assert scores[0, 0] == pytest.approx(0.75) and scores[1, 1] == pytest.approx(0.25)
    assert search.config.to_dict()["metric"] == "callable:margin"


def test_unprobed_weights_are_explicit():
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.01)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    search.step(x, y)
    counts = search.probe_counts()["1.weight"]
    unprobed = counts == 0
    assert unprobed.any() and (~unprobed).any()
    assert (search.significance()["1.weight"][unprobed] == 1).all()
    assert search.significance(unprobed="nan")["1.weight"][unprobed].isnan().all()
    layer_mean = search.significance(unprobed="nan")["1.weight"][~unprobed].mean()
    assert torch.allclose(search.significance(unprobed="mean")["1.weight"][unprobed], layer_mean)
    with pytest.raises(ConfigError, match="unknown unprobed 'zero'; valid choices: keep, mean, nan"):
        search.significance(unprobed="zero")


def test_subset_size_and_counts_accumulate(batch):
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.1)
    for step in range(1, 6):
        search.step(*batch)
        for key, counts in search.probe_counts().items():
            n = counts.numel()
            assert counts.sum() == step * max(1, round(0.1 * n))
            assert counts.max() <= step
    assert search.steps == 5


def test_fake_pass_resets_exactly_the_subset_to_theta0(batch):
    model = make_mlp()
    theta0 = model[1].weight.detach().clone()
    search = bingo.TicketSearch(model, fraction=0.1)
    with torch.no_grad():  # "training" moved every weight away from theta0
        model[1].weight.add_(1.0)
    current = model[1].weight.detach().clone()
    seen = []
    handle = model[1].register_forward_pre_hook(lambda module, args: seen.append(module.weight.detach().clone()))
    search.step(*batch)
    handle.remove()
    # passes: unmodified, probe of layer 1, probe of layer 3, probe of layer 5
    assert len(seen) == 4
    assert torch.equal(seen[0], current) and torch.equal(seen[2], current) and torch.equal(seen[3], current)
    probe = seen[1]
    changed = probe != current
    assert changed.sum() == round(0.1 * current.numel())
    assert torch.equal(probe[changed], theta0[changed])
    assert torch.equal(probe[~changed], current[~changed])
    # the counted weights are exactly the reset ones
    assert torch.equal(search.probe_counts()["1.weight"] == 1, changed)


def test_zero_mode_zeroes_exactly_the_subset(batch):
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.2, mode="zero")
    seen = []
    model[3].register_forward_pre_hook(lambda module, args: seen.append(module.weight.detach().clone()))
    search.step(*batch)
    current = model[3].weight.detach()
    probe = seen[2]
    changed = probe != current
    assert changed.sum() == round(0.2 * current.numel())
    assert (probe[changed] == 0).all()


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factory,input_shape", [(make_mlp, (32, 16)), (make_cnn, (16, 1, 4, 4))])
def test_step_leaves_model_exactly_as_it_was(factory, input_shape):
    model = factory()
    outputs = model(torch.randn(*input_shape)).shape[1]
    model.train()
    model[1].eval()  # a mix of flags must come back as it was
    flags = [m.training for m in model.modules()]
    before = _snapshot(model)
    keys = list(model.state_dict())
    search = bingo.TicketSearch(model, fraction=0.3)
    for _ in range(3):
        search.step(torch.randn(*input_shape), torch.randint(0, outputs, (input_shape[0],)))
    after = model.state_dict()
    assert list(after) == keys  # nothing added to the model's state_dict
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert [m.training for m in model.modules()] == flags


def test_step_consumes_no_global_rng(image_batch):
    model = make_cnn()
    model.train()  # dropout active in training mode: the search must not draw from it
    search = bingo.TicketSearch(model, fraction=0.3)
    state = torch.get_rng_state()
    search.step(*image_batch)
    assert torch.equal(torch.get_rng_state(), state)


@on_tiny_models
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_training_is_bit_identical_with_and_without_search(factory, data, granularity):
    plain, _ = train_tiny(factory, data)
    searched, search = train_tiny(factory, data, lambda m: bingo.TicketSearch(m, fraction=0.2, granularity=granularity))
    assert search.steps == 12
    plain_state, searched_state = plain.state_dict(), searched.state_dict()
    assert list(plain_state) == list(searched_state)
    for key in plain_state:
        assert torch.equal(plain_state[key], searched_state[key]), key


def test_neuron_granularity_scores_units_and_skips_output_layer(batch):
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.25, granularity="neuron")
    assert list(search.layers) == ["1.weight", "3.weight"]
    w0, b0 = model[1].weight.detach().clone(), model[1].bias.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    seen = []
    model[1].register_forward_pre_hook(lambda m, a: seen.append((m.weight.detach().clone(), m.bias.detach().clone())))
    search.step(*batch)
    (w_now, b_now), (w_probe, b_probe) = seen[0], seen[1]
    rows = (w_probe != w_now).any(dim=1)
    assert rows.sum() == 3  # round(0.25 * 12) whole units
    assert (w_probe[rows] != w_now[rows]).all()  # every weight of a probed unit reset
    assert torch.equal(w_probe[rows], w0[rows]) and torch.equal(w_probe[~rows], w_now[~rows])
    assert torch.equal(b_probe[rows], b0[rows]) and torch.equal(b_probe[~rows], b_now[~rows])
    scores = search.significance()
    assert scores["1.weight"].shape == (12,) and scores["3.weight"].shape == (8,)


def test_significance_is_in_unit_interval_and_higher_means_more_harmful_reset():
    torch.manual_seed(0)
    # Two inputs; the label depends only on input 0. Resetting the weights that read
    # input 0 must hurt more than resetting those that read input 1.
    x = torch.randn(256, 2)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    search = bingo.TicketSearch(model, fraction=0.5, metric="loss")
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[-3.0, 0.1], [3.0, -0.1]]))
    for _ in range(50):
        search.step(x, y)
    scores = search.significance()["weight"]
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores[:, 0].min() > scores[:, 1].max()


def test_state_dict_round_trip_resumes_identically(batch):
    def run(steps, search=None, model=None):
        model = model or make_mlp()
        search = search or bingo.TicketSearch(model, fraction=0.1, seed=3)
        for _ in range(steps):
            search.step(*batch)
        return model, search

    _, straight = run(10)
    model, first = run(4)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = bingo.TicketSearch(model, fraction=0.1, seed=99)
    with pytest.raises(CheckpointError, match=r"different settings: seed=3 \(now 99\)"):
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
    buffer.seek(0)
    resumed = bingo.TicketSearch(model, fraction=0.1, seed=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.steps == 4
    _, resumed = run(6, search=resumed, model=model)
    for key, value in straight.significance().items():
        assert torch.equal(resumed.significance()[key], value)
        assert torch.equal(resumed.probe_counts()[key], straight.probe_counts()[key])
    for key in straight.state:
        assert torch.equal(resumed.state[key]["theta0"], straight.state[key]["theta0"])


def test_theta0_is_the_weights_at_attach_time(batch):
    model = make_mlp()
    initial = model[1].weight.detach().clone()
    search = bingo.TicketSearch(model)
    with torch.no_grad():
        model[1].weight.mul_(3)
    assert torch.equal(search.state_dict()["layers"]["1.weight"]["theta0"], initial)


def test_load_state_dict_rejects_other_model(batch):
    search = bingo.TicketSearch(make_mlp())
    other = bingo.TicketSearch(nn.Sequential(nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 4)))
    with pytest.raises(CheckpointError, match="covers layers"):
        other.load_state_dict(search.state_dict())
    bigger = bingo.TicketSearch(nn.Sequential(nn.Flatten(), nn.Linear(16, 13), nn.ReLU(), nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 4)))
    with pytest.raises(CheckpointError, match=r"1\.weight\.theta0 has shape \(12, 16\), expected \(13, 16\)"):
        bigger.load_state_dict(search.state_dict())
    with pytest.raises(CheckpointError, match="not a TicketSearch state dict"):
        search.load_state_dict({"steps": 1})


def test_scores_survive_safetensors(tmp_path, batch):
    search = bingo.TicketSearch(make_mlp(), fraction=0.2)
    search.step(*batch)
    path = bingo.save_scores(search.significance(), tmp_path / "scores.safetensors")
    loaded = bingo.load_scores(path)
    for key, value in search.significance().items():
        assert torch.equal(loaded[key], value)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"fraction": 0}, r"fraction must be in \(0, 1\], got 0"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\], got 1.5"),
        ({"mode": "noise"}, "unknown mode 'noise'; valid choices: reset, zero"),
        ({"metric": "f1"}, "unknown metric 'f1'; valid choices: accuracy, loss"),
        ({"granularity": "layer"}, "unknown granularity 'layer'; valid choices: weight, neuron"),
        ({"rule": "max"}, "unknown rule 'max'; valid choices: mean, paper, contrast"),
    ],
)
def test_bad_settings_name_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        bingo.TicketSearch(make_mlp(), **kwargs)


def test_model_without_weights_to_score():
    with pytest.raises(ConfigError, match="Sequential has no weights to score"):
        bingo.TicketSearch(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ConfigError, match="neuron granularity needs a hidden layer"):
        bingo.TicketSearch(nn.Linear(3, 2), granularity="neuron")


def test_include_and_exclude_by_name():
    model = make_mlp()
    assert list(bingo.TicketSearch(model, exclude=["5"]).layers) == ["1.weight", "3.weight"]
    assert list(bingo.TicketSearch(model, include=["3.weight"]).layers) == ["3.weight"]


def test_search_on_an_already_pruned_model_sees_the_mask(batch):
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    search = bingo.TicketSearch(model, fraction=0.5)
    before = _snapshot(model)
    search.step(*batch)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert (model[1].weight[model[1].weight_mask == 0] == 0).all()


@pytest.mark.parametrize("n,size", [(20, 3), (1000, 10), (10, 8)])
def test_random_subsets_are_distinct_and_uniform(n, size):
    from bingo.search import _random_subset

    generator = torch.Generator().manual_seed(0)
    hits = torch.zeros(n)
    draws = 4000
    for _ in range(draws):
        subset = _random_subset(n, size, generator)
        assert len(subset) == size and len(torch.unique(subset)) == size
        assert subset.min() >= 0 and subset.max() < n
        hits[subset] += 1
    expected = draws * size / n
    # every index drawn about equally often (5 standard deviations of a binomial count)
    assert (hits - expected).abs().max() < 5 * (expected * (1 - size / n)) ** 0.5 + 1
