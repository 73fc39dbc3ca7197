"""The training loop: resumable per epoch with identical model and scores."""

from __future__ import annotations

import pytest
import torch

import bingo
from bingo.data import load_dataset
from bingo.errors import CheckpointError, ConfigError
from bingo.models import MODELS, build_model
from bingo.training import TrainConfig, evaluate, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _run(digits, epochs, checkpoint=None, model_name="mlp"):
    model = build_model(model_name, digits.input_shape, digits.num_classes, seed=0)
    search = bingo.TicketSearch(model, fraction=0.05, seed=0)
    result = train(model, digits, TrainConfig(epochs=epochs, batch_size=64, seed=0), search=search, checkpoint=checkpoint, progress=False)
    return model, search, result


def test_resume_gives_identical_model_and_scores(digits, tmp_path):
    straight_model, straight_search, straight = _run(digits, 3)
    checkpoint = tmp_path / "train.pt"
    _run(digits, 2, checkpoint)  # "interrupted" after two epochs
    resumed_model, resumed_search, resumed = _run(digits, 3, checkpoint)
    assert resumed.steps == straight.steps == resumed_search.steps
    for key, value in straight_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    for key, value in straight_search.significance().items():
        assert torch.equal(resumed_search.significance()[key], value)
        assert torch.equal(resumed_search.probe_counts()[key], straight_search.probe_counts()[key])


def test_checkpoint_of_another_model_is_refused(digits, tmp_path):
    checkpoint = tmp_path / "train.pt"
    _run(digits, 1, checkpoint)
    with pytest.raises(CheckpointError, match=r"checkpoint .*train.pt does not fit the model"):
        _run(digits, 2, checkpoint, model_name="lenet300")


def test_checkpoint_with_other_settings_is_refused(digits, tmp_path):
    checkpoint = tmp_path / "train.pt"
    _run(digits, 1, checkpoint)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    with pytest.raises(CheckpointError, match=r"different training settings: batch_size=64 \(now 32\)"):
        train(model, digits, TrainConfig(epochs=2, batch_size=32), checkpoint=checkpoint, progress=False)
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        train(model, digits, TrainConfig(epochs=2, batch_size=64), checkpoint=checkpoint, progress=False)


def test_training_learns_digits(digits):
    model, search, result = _run(digits, 3)
    assert evaluate(model, digits.x_test, digits.y_test) > 0.85
    assert 0 < result.search_seconds < result.train_seconds


@pytest.mark.parametrize("name", list(MODELS))
def test_models_fit_images_and_flat_features(name):
    model = build_model(name, (1, 8, 8), 10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    if name != "conv":
        assert build_model(name, (20,), 3)(torch.zeros(2, 20)).shape == (2, 3)


def test_conv_refuses_flat_features_and_unknown_models():
    with pytest.raises(ConfigError, match="model 'conv' needs image input"):
        build_model("conv", (20,), 3)
    with pytest.raises(ConfigError, match="unknown model 'resnet'; valid choices: lenet300, mlp, conv"):
        build_model("resnet", (20,), 3)


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_model("lenet300", (1, 28, 28), 10, seed=3), build_model("lenet300", (1, 28, 28), 10, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.fc1.weight, b.fc1.weight)


@pytest.mark.parametrize("kwargs,message", [({"epochs": -1}, "epochs must be"), ({"batch_size": 0}, "batch size must be"), ({"optimizer": "lion"}, "valid choices: adam, sgd")])
def test_bad_training_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_checkpoint_of_other_data_or_further_along_is_refused(digits, tmp_path):
    checkpoint = tmp_path / "train.pt"
    _run(digits, 2, checkpoint)
    with pytest.raises(CheckpointError, match="has 2 epochs done, more than the 1 asked for"):
        _run(digits, 1, checkpoint)
    other = load_dataset("digits", validation_fraction=0.2)
    with pytest.raises(CheckpointError, match=r"was trained on digits \(1293 training examples"):
        _run(other, 3, checkpoint)
