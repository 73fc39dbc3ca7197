"""Application: masks on a model behave like torch.nn.utils.prune's, survive copies and training."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import prune as torch_prune

import bingo
from bingo.errors import CheckpointError, ConfigError
from conftest import make_cnn, make_mlp

WEIGHTS = ("1.weight", "3.weight", "5.weight")


def _train_steps(model, batch, steps=5):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.8, 0.99])
def test_exact_sparsity_on_the_model(sparsity):
    model = make_mlp()
    scores = bingo.random_scores(model, seed=4)
    masks = bingo.prune(model, scores, sparsity)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(sparsity * total)
    zeros = sum(int((model.get_submodule(k[:-7]).weight == 0).sum()) for k in WEIGHTS)
    assert zeros == round(sparsity * total)
    assert bingo.model_sparsity(model, list(WEIGHTS)) == pytest.approx(round(sparsity * total) / total)


def test_masks_only_shrink_and_count_earlier_pruning():
    model = make_mlp()
    first = bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    # scores that would favour the weights pruned before: they must stay pruned
    inverted = {k: -s for k, s in bingo.magnitude_scores(make_mlp()).items()}
    second = bingo.prune(model, inverted, 0.8)
    for key in WEIGHTS:
        assert not (second[key] & ~first[key]).any()
    total = sum(m.numel() for m in second.values())
    assert sum(int((~m).sum()) for m in second.values()) == round(0.8 * total)
    assert torch.equal(model[1].weight_mask.bool(), second["1.weight"])


def test_pruned_model_survives_deepcopy_after_training(batch):
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.7)
    _train_steps(model, batch)
    clone = copy.deepcopy(model)
    assert torch.equal(clone(batch[0]), model(batch[0]))
    assert torch_prune.is_pruned(clone)


def test_further_training_keeps_pruned_weights_zero(batch):
    model = make_mlp()
    masks = bingo.prune(model, bingo.magnitude_scores(model), 0.7)
    _train_steps(model, batch, steps=10)
    for key in WEIGHTS:
        weight = model.get_submodule(key[:-7]).weight
        assert (weight[~masks[key]] == 0).all()
        assert (weight[masks[key]] != 0).all()


def test_state_dict_into_a_fresh_model(batch):
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.6)
    _train_steps(model, batch)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_mlp(seed=7)
    bingo.load_pruned_state_dict(fresh, torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(batch[0]), model(batch[0]))
    assert torch.equal(fresh[3].weight_mask, model[3].weight_mask)
    with pytest.raises(CheckpointError, match="state dict masks '9.weight_mask'"):
        bingo.load_pruned_state_dict(make_mlp(), {"9.weight_mask": torch.ones(2), "9.weight_orig": torch.ones(2)})
    # a lone *_mask entry (no *_orig beside it) is not a pruning mask: the load reports it as a key the model lacks
    with pytest.raises(CheckpointError, match='Unexpected key.*"9.weight_mask"'):
        bingo.load_pruned_state_dict(make_mlp(), {"9.weight_mask": torch.ones(2)})


def test_make_permanent_is_prune_remove(batch):
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.6)
    expected = model(batch[0])
    bingo.make_permanent(model)
    assert not torch_prune.is_pruned(model)
    assert sorted(model.state_dict()) == sorted(make_mlp().state_dict())
    assert torch.equal(model(batch[0]), expected)
    copy.deepcopy(model)


def test_neuron_pruning_removes_rows_and_bias(batch):
    model = make_mlp()
    scores = {"1.weight": torch.arange(12.0), "3.weight": torch.arange(8.0)}
    masks = bingo.prune(model, scores, 0.5, scope="layer")
    assert masks["1.weight"].tolist() == [False] * 6 + [True] * 6
    assert (model[1].weight[:6] == 0).all() and (model[1].bias[:6] == 0).all()
    assert (model[1].weight[6:] != 0).all() and (model[1].bias[6:] != 0).all()
    # a removed unit outputs exactly zero
    hidden = model[2](model[1](model[0](batch[0])))
    assert (hidden[:, :6] == 0).all()


def test_neuron_pruning_on_conv_filters(image_batch):
    model = make_cnn()
    scores = bingo.magnitude_scores(model, "neuron")
    assert scores["0.weight"].shape == (4,) and "9.weight" not in scores
    masks = bingo.prune(model, scores, 0.5, scope="layer")
    pruned = ~masks["0.weight"]
    assert (model[0].weight[pruned] == 0).all() and (model[0].bias[pruned] == 0).all()


def test_neuron_pruning_refuses_to_empty_a_layer():
    model = make_mlp()
    scores = {"1.weight": torch.zeros(12), "3.weight": torch.ones(8)}
    # at 0.95 the selection's per-layer floor (1% of a layer, at least one entry) cannot hold both layers
    with pytest.raises(ConfigError, match="would remove every unit of '1' \\(12 units\\)"):
        bingo.prune(model, scores, 0.95)
    assert not torch_prune.is_pruned(model)  # nothing half-applied


def test_scores_must_fit_the_model():
    model = make_mlp()
    with pytest.raises(ConfigError, match=r"scores for '1.weight' have shape \(3,\); expected the weight's \(12, 16\)"):
        bingo.prune(model, {"1.weight": torch.ones(3)}, 0.5)
    with pytest.raises(ConfigError, match="score key '7.weight' names no module"):
        bingo.prune(model, {"7.weight": torch.ones(3)}, 0.5)


def test_prune_to_accuracy_finds_the_floor_by_bisection():
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    total = sum(s.numel() for s in scores.values())

    # A stand-in accuracy that falls linearly with the fraction of weights pruned.
    def evaluate(m):
        return 1.0 - bingo.model_sparsity(m, list(WEIGHTS))

    result = bingo.prune_to_accuracy(model, scores, evaluate, min_accuracy=0.7)
    assert result.floor == 0.7 and result.dense_accuracy == 1.0
    assert result.accuracy >= 0.7
    assert result.sparsity == pytest.approx(0.3, abs=1.0 / total)
    assert result.evaluations <= total.bit_length() + 2
    assert bingo.model_sparsity(model, list(WEIGHTS)) == pytest.approx(result.sparsity)

    relative = bingo.prune_to_accuracy(make_mlp(), scores, evaluate, max_drop=0.1)
    assert relative.floor == pytest.approx(0.9) and relative.sparsity == pytest.approx(0.1, abs=1.0 / total)


def test_prune_to_accuracy_needs_exactly_one_floor():
    with pytest.raises(ConfigError, match="exactly one of min_accuracy"):
        bingo.prune_to_accuracy(make_mlp(), {}, lambda m: 1.0)


def test_prune_to_accuracy_never_empties_a_layer_of_units():
    model = make_mlp()
    scores = {"1.weight": torch.zeros(12), "3.weight": torch.ones(8)}
    result = bingo.prune_to_accuracy(model, scores, lambda m: 1.0, min_accuracy=0.0)
    # the bisection goes as far as the selection's floors allow: one unit kept in each layer
    assert result.masks["1.weight"].sum() == 1
    assert result.masks["3.weight"].sum() == 1


def test_loaded_pruned_weights_are_visible_before_any_forward():
    model = make_mlp()
    bingo.prune(model, bingo.magnitude_scores(model), 0.5)
    fresh = make_mlp(seed=3)
    bingo.load_pruned_state_dict(fresh, model.state_dict())
    assert torch.equal(fresh[1].weight, model[1].weight)
