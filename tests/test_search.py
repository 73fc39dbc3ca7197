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


def _batches(steps: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        x = torch.randn(16, 16, generator=generator)
        batches.append((x, torch.randint(0, 4, (16,), generator=generator)))
    return batches


def _probe_search(steps: int, **settings) -> bingo.TicketSearch:
    # mode "zero": the search starts at θ0 and nothing trains, so resets would change nothing
    search = bingo.TicketSearch(make_mlp(), fraction=0.3, mode="zero", metric="loss", seed=3, **settings)
    for x, y in _batches(steps):
        search.step(x, y)
    return search


def test_rule_is_a_read_out_of_the_same_sums():
    # One search read three ways gives what three searches configured with each rule give,
    # and a checkpoint saved under one rule loads under another.
    one = _probe_search(8)
    read = {rule: one.significance(rule=rule) for rule in ("mean", "paper", "contrast")}
    for rule, scores in read.items():
        alone = _probe_search(8, rule=rule)
        for key, score in alone.significance().items():
            assert torch.equal(scores[key], score), (rule, key)
    for a, b in (("mean", "paper"), ("mean", "contrast"), ("paper", "contrast")):
        assert not all(torch.equal(read[a][key], read[b][key]) for key in read[a]), (a, b)  # three read-outs
    assert all(torch.equal(one.significance()[key], score) for key, score in read["mean"].items())  # the default

    contrast = bingo.TicketSearch(make_mlp(), fraction=0.3, mode="zero", metric="loss", seed=3, rule="contrast")
    contrast.load_state_dict(one.state_dict())  # a search that kept every rule's sums loads under any rule
    for key, score in contrast.significance().items():
        assert torch.equal(score, read["contrast"][key]), key

    # A search built with a rule keeps only that rule's sums: a quarter of the memory of keeping all.
    mean_only = _probe_search(8, rule="mean")
    with pytest.raises(ConfigError, match=r"^this search keeps the sums of rule 'mean' only .*with rule='contrast'$"):
        mean_only.significance(rule="contrast")
    with pytest.raises(CheckpointError, match="has entries"):
        contrast.load_state_dict(mean_only.state_dict())
    assert all(torch.equal(contrast.significance()[key], score) for key, score in read["contrast"].items())  # unchanged
    message = "^unknown rule 'max' for estimator 'probe'; valid choices: mean, paper, contrast$"
    with pytest.raises(ConfigError, match=message):
        one.significance(rule="max")


def test_mean_rule_sums_the_damage_of_every_probe_across_steps():
    # The anchors' bug was an accumulator that overwrote instead of summing. Each step
    # returns its probes' damage per layer, and the growth of the counts says which units
    # that step probed: the mean read-out must be their sum over the count, unit by unit.
    search = bingo.TicketSearch(make_mlp(), fraction=0.3, mode="zero", metric="loss", seed=1)
    total = {key: torch.zeros(search.unit_shape(key), dtype=torch.float64) for key in search.layers}
    counts = search.probe_counts()
    seen = set()
    for x, y in _batches(8, seed=4):
        damages = search.step(x, y)
        now = search.probe_counts()
        for key, count in now.items():
            probed = count - counts[key]
            assert probed.sum() == max(1, round(0.3 * count.numel())) and probed.max() == 1
            total[key] += probed * damages[key]
            seen.add(damages[key])
        counts = now
    assert len(seen) > 12  # damages vary from step to step, so overwriting would show
    for key, score in search.significance(unprobed="nan").items():
        count = counts[key]
        assert count.max() > 1  # some units were probed on several steps
        assert torch.allclose(score[count > 0].double(), total[key][count > 0] / count[count > 0], atol=1e-6), key
        assert score[count == 0].isnan().all()


def test_callable_metric_higher_is_better():
    calls = []

    def margin(outputs, targets):
        calls.append(1)
        return outputs.gather(1, targets[:, None]).mean().item()

    search = trained({"metric": margin}, steps=20)
    scores = search.significance()["weight"]
    assert len(calls) == 41  # one unmodified pass and one fake pass per step, the first fake pass twice (the reuse check)
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
    # passes: unmodified, probe of layer 1, probe of layer 3, probe of layer 5, then (the first step's
    # check of the reuse of earlier layers' outputs) the three probes again, in full
    assert len(seen) == 7
    assert torch.equal(seen[0], current) and torch.equal(seen[2], current) and torch.equal(seen[3], current)
    assert torch.equal(seen[4], seen[1]) and torch.equal(seen[5], current) and torch.equal(seen[6], current)
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
    for key, theta0 in straight.theta0.items():
        assert torch.equal(resumed.theta0[key], theta0)


def test_theta0_is_the_weights_at_attach_time(batch):
    model = make_mlp()
    initial = model[1].weight.detach().clone()
    search = bingo.TicketSearch(model)
    with torch.no_grad():
        model[1].weight.mul_(3)
    assert torch.equal(search.theta0["1.weight"], initial)
    assert torch.equal(search.state_dict()["theta0"]["1.weight"], initial)


def test_load_state_dict_rejects_other_model(batch):
    search = bingo.TicketSearch(make_mlp())
    other = bingo.TicketSearch(nn.Sequential(nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 4)))
    with pytest.raises(CheckpointError, match="covers layers"):
        other.load_state_dict(search.state_dict())
    bigger = bingo.TicketSearch(nn.Sequential(nn.Flatten(), nn.Linear(16, 13), nn.ReLU(), nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 4)))
    with pytest.raises(CheckpointError, match=r"θ0 of '1\.weight' does not match the layer's shape \(13, 16\)"):
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
        ({"rule": "max"}, "unknown rule 'max' for estimator 'probe'; valid choices: mean, paper, contrast"),
        ({"estimator": "taylor", "rule": "mean"}, "unknown rule 'mean' for estimator 'taylor'; valid choices: none"),
        ({"fractoin": 0.1}, r"unknown search setting 'fractoin'; valid choices: estimator, fraction, mode, metric, "),
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
    # On a pruned layer the fake pass must substitute weight_orig, so that the mask
    # still applies: pruned weights stay 0 in the probe and only the kept weights of the
    # subset go back to θ0. Substituting "weight" instead is overwritten by the pruning
    # pre-hook (the probe changes nothing, every damage is 0); substituting the unmasked
    # probe would bring pruned weights back.
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    layer = model[1]
    mask = layer.weight_mask.bool().clone()
    theta0 = layer.weight_orig.detach().clone()
    search = bingo.TicketSearch(model, fraction=0.5)
    with torch.no_grad():  # "training" moved every weight away from θ0
        for module in search.layers.values():
            module.weight_orig.add_(1.0)
    current = (layer.weight_orig * layer.weight_mask).detach().clone()
    seen = []  # what the forward computed with, after the pruning pre-hook
    layer.register_forward_hook(lambda module, args, output: seen.append(module.weight.detach().clone()))
    before = _snapshot(model)
    search.step(*batch)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # passes: unmodified, probe of layer 1, probe of layer 3, probe of layer 5, the three probes again (the reuse check)
    assert len(seen) == 7 and torch.equal(seen[0], current) and torch.equal(seen[4], seen[1])
    probe = seen[1]
    assert (probe[~mask] == 0).all()  # the mask still applies in the fake pass
    probed = search.probe_counts()["1.weight"] == 1
    assert probed.sum() == round(0.5 * mask.numel())
    changed = probe != current
    assert torch.equal(changed, probed & mask)  # exactly the kept weights of the subset ...
    assert changed.any() and torch.equal(probe[changed], theta0[changed])  # ... went back to θ0


def test_step_leaves_the_masked_weight_of_a_pruned_model_as_it_was(batch):
    # torch.nn.utils.prune recomputes module.weight = weight_orig * mask in a pre-hook and
    # leaves it on the module, so a fake pass leaves the probe's value there unless the
    # search refreshes it (model_sparsity reads module.weight).
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    model(batch[0])
    weights = {key: module.weight.clone() for key, module in bingo.find_layers(model).items()}
    sparsity = bingo.model_sparsity(model)
    bingo.TicketSearch(model, fraction=0.5, mode="zero").step(*batch)
    for key, module in bingo.find_layers(model).items():
        assert torch.equal(module.weight, weights[key]), key
    assert bingo.model_sparsity(model) == sparsity


@pytest.mark.parametrize("n,size", [(20, 3), (1000, 10), (10, 8)])
def test_random_subsets_are_distinct_and_uniform(n, size):
    from bingo.estimators.fake_pass import random_subset

    generator = torch.Generator().manual_seed(0)
    hits = torch.zeros(n)
    draws = 4000
    for _ in range(draws):
        subset = random_subset(n, size, generator)
        assert len(subset) == size and len(torch.unique(subset)) == size
        assert subset.min() >= 0 and subset.max() < n
        hits[subset] += 1
    expected = draws * size / n
    # every index drawn about equally often (5 standard deviations of a binomial count)
    assert (hits - expected).abs().max() < 5 * (expected * (1 - size / n)) ** 0.5 + 1


def test_random_subsets_are_the_draws_torch_unique_would_keep():
    # Deduplicating with NumPy must keep exactly torch.unique's values, so that the same seed draws
    # the same probes (and gives the same scores) as when torch.unique did it.
    from bingo.estimators.fake_pass import random_subset

    def reference(n, size, generator):
        while True:
            distinct = torch.unique(torch.randint(n, (size + size // 4 + 8,), generator=generator))
            if len(distinct) >= size:
                return distinct[torch.randperm(len(distinct), generator=generator)[:size]]

    for n, size in [(235200, 2352), (30000, 300), (400, 90), (100, 2)]:
        mine, theirs = torch.Generator().manual_seed(n), torch.Generator().manual_seed(n)
        for _ in range(5):
            assert torch.equal(random_subset(n, size, mine), reference(n, size, theirs)), (n, size)


def _held_bytes_per_weight_byte(search: bingo.TicketSearch) -> float:
    def walk(tree):
        if isinstance(tree, torch.Tensor):
            return tree.numel() * tree.element_size()
        return sum(walk(v) for v in tree.values()) if isinstance(tree, dict) else 0

    state = search.state_dict()
    held = walk(state["theta0"]) + walk(state["theta0_bias"]) + walk(state["estimator"])
    return held / sum(t.numel() * t.element_size() for t in search.theta0.values())


@pytest.mark.parametrize("settings, most", [
    (dict(config=bingo.BINGO_SEARCH), 2.0),  # θ0 and the running Taylor average
    (dict(estimator="probe", metric="accuracy", mode="reset", rule="mean"), 4.0),  # the paper's search (bingo-paper)
    (dict(estimator="probe", rule="paper"), 4.0),
    (dict(estimator="probe", metric="loss", rule="contrast"), 6.0),
    (dict(estimator="probe"), 10.0),  # no rule given: every read-out's sums
])
def test_memory_the_search_holds_per_scored_weight(settings, most):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    held = _held_bytes_per_weight_byte(bingo.TicketSearch(model, **settings))
    assert most - 0.01 <= held <= most + 0.01, held  # the layers' totals are a few scalars


@pytest.mark.parametrize("estimator", ["probe", "taylor", "hybrid"])
def test_steps_the_estimator_says_record_nothing_are_only_counted_and_change_no_score(estimator):
    # search.step skips observe where records_at says it records nothing: the scores must be what calling it gives
    def run(skip: bool) -> tuple[dict[str, torch.Tensor], list[int]]:
        model = make_mlp()
        search = bingo.TicketSearch(model, estimator=estimator, metric="loss", every=3, taylor_every=2, seed=0)
        if not skip:
            search.estimator.records_at = lambda step: True
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        probed = []
        for step, (x, y) in enumerate(_batches(11), start=1):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if search.step(x, y):
                probed.append(step)
        assert search.steps == 11
        return search.significance(), probed

    skipped, probed = run(skip=True)
    called, probed_called = run(skip=False)
    assert probed == probed_called == ([] if estimator == "taylor" else [1, 4, 7, 10])
    for key in called:
        assert torch.equal(skipped[key], called[key]), key
