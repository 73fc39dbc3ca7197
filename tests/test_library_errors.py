"""Issue 9, item 8 and the NaN half of item 5: the library's own boundaries give one-line BingoErrors.

Each case was a raw torch error, a silent wrong answer or a misleading message before.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import bingo
from bingo import BingoError, ConfigError
from conftest import make_mlp


def _trained_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def test_score_key_of_a_module_without_weight_is_a_config_error():
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    scores["2.weight"] = torch.ones(3)  # module 2 is a ReLU
    with pytest.raises(ConfigError, match=r"^score key '2.weight' names 2 \(ReLU\), which has no weight$"):
        bingo.prune(model, scores, 0.5)


@pytest.mark.parametrize("estimator", ["probe", "hybrid"])
def test_step_with_mismatched_batch_names_both_sizes(batch, estimator):
    x, y = batch
    model = make_mlp()
    _trained_grads(model, x, y)
    search = bingo.TicketSearch(model, estimator=estimator, metric="loss")
    with pytest.raises(ConfigError, match=r"^search.step got 32 inputs but 31 targets \(the first dimension of each\); "
                       r"pass the batch just trained on, or, where the inputs' first dimension is not the batch \(a sequence-first RNN\), a closure: "
                       r"search\.step\(lambda model: loss_fn\(model\(x\), y\)\)$"):
        search.step(x, y[:-1])
    assert search.steps == 0  # refused before anything was recorded


def test_step_with_an_empty_batch_is_refused_and_leaves_no_nan(batch):
    x, y = batch
    model = make_mlp()
    search = bingo.TicketSearch(model, fraction=0.5, metric="loss")
    with pytest.raises(ConfigError, match=r"^search.step got an empty batch"):
        search.step(x[:0], y[:0])
    search.step(x, y)
    assert not any(s.isnan().any() for s in search.significance().values())


def test_step_with_a_wrong_input_shape_names_the_shape(batch):
    x, y = batch
    search = bingo.TicketSearch(make_mlp(), metric="accuracy")
    with pytest.raises(ConfigError, match=r"^search.step: the model cannot take these inputs \(shape \(32, 15\)\): "):
        search.step(x[:, :15], y)


@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_step_with_out_of_range_labels_is_refused(batch, metric):
    x, y = batch
    search = bingo.TicketSearch(make_mlp(), metric=metric)
    bad = y.clone()
    bad[0] = 4  # the MLP has 4 outputs: labels 0..3
    with pytest.raises(ConfigError, match=r"targets must be class labels in \[0, 4\) for this model's 4 outputs, got labels from 0 to 4$"):
        search.step(x, bad)
    with pytest.raises(ConfigError, match=r"need targets that are integer class labels"):
        search.step(x, y.float())


def test_step_on_a_diverged_model_says_so(batch):
    x, y = batch
    model = make_mlp()
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(BingoError, match=r"training diverged \(try a lower learning rate\)$"):
        bingo.TicketSearch(model, metric="loss").step(x, y)
    _trained_grads(model, x, y)
    search = bingo.TicketSearch(model, estimator="taylor")
    search.step(x, y)
    with pytest.raises(BingoError, match=r"^estimator 'taylor': the running estimate of '1.weight' is not finite: a gradient or weight was, so training diverged"):
        search.significance()


def test_nan_scores_name_the_layer_and_the_causes():
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    scores["3.weight"][0, 0] = float("nan")
    causes = r"never-scored weights \(significance\(unprobed='nan'\); use 'keep' or 'mean'\) or a diverged training"
    with pytest.raises(ConfigError, match=rf"^scores of '3.weight' contain NaN \(1 of 96\): {causes}"):
        bingo.prune(model, scores, 0.5)
    with pytest.raises(ConfigError, match=rf"^scores of '3.weight' contain NaN \(1 of 96\): {causes}"):
        bingo.combine_ranks([scores, bingo.magnitude_scores(model)])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_drop": -0.5}, r"^max_drop must be an accuracy in \[0, 1\], got -0.5$"),
    ({"min_accuracy": 1.5}, r"^min_accuracy must be an accuracy in \[0, 1\], got 1.5$"),
])
def test_prune_to_accuracy_refuses_floors_outside_0_1(kwargs, message):
    model = make_mlp()
    with pytest.raises(ConfigError, match=message):
        bingo.prune_to_accuracy(model, bingo.magnitude_scores(model), lambda m: 1.0, **kwargs)


def test_prune_returns_the_masks_the_model_has():
    model = make_mlp()
    scores = bingo.magnitude_scores(model)
    bingo.prune(model, scores, 0.7)
    with pytest.warns(UserWarning, match=r"already had 0.7 of these entries pruned, more than the requested 0.3; masks only shrink"):
        masks = bingo.prune(model, scores, 0.3)
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.7 * total)
    assert torch.equal(masks["1.weight"], model[1].weight_mask.bool())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bingo.prune(model, scores, 0.8)  # growing: no warning
