"""The training loop: resumable per epoch with identical model and scores."""

from __future__ import annotations

import pytest
import torch

import bingo
from bingo.bench.data import load_dataset
from bingo.errors import CheckpointError, ConfigError
from bingo.bench.models import MODELS, build_model
from bingo.bench.training import TrainConfig, evaluate, train


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
    with pytest.raises(CheckpointError, match=r"train\.pt is not a bingo checkpoint \(corrupt or from another program\)$"):
        train(model, digits, TrainConfig(epochs=2, batch_size=64), checkpoint=checkpoint, progress=False)


def test_training_learns_digits(digits):
    model, search, result = _run(digits, 3)
    assert evaluate(model, digits.x_test, digits.y_test) > 0.85
    assert 0 < result.search_seconds < result.train_seconds


@pytest.mark.parametrize("name", list(MODELS))
def test_models_fit_images_and_flat_features(name):
    model = build_model(name, (1, 8, 8), 10)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    if name not in ("conv", "resnet", "transformer", "conv1d"):  # these need images or 2-D sequences
        assert build_model(name, (20,), 3)(torch.zeros(2, 20)).shape == (2, 3)


def test_conv_refuses_flat_features_and_unknown_models():
    with pytest.raises(ConfigError, match="model 'conv' needs image input"):
        build_model("conv", (20,), 3)
    with pytest.raises(ConfigError, match="unknown model 'vgg'; valid choices: lenet300, mlp, conv, resnet, transformer, conv1d$"):
        build_model("vgg", (20,), 3)


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


# --------------------------------------------------------------------------
# divergence: stopped with one line naming where, never trained on into NaN
# --------------------------------------------------------------------------


def _diverged(caught) -> str:
    text = str(caught.value)
    assert type(caught.value).__name__ == "TrainingError" and isinstance(caught.value, bingo.BingoError)
    assert "\n" not in text
    return text


def test_nan_loss_stops_training_naming_epoch_and_step(digits, tmp_path):
    """SGD at lr 1e6 gives a NaN loss at the third step: stopped there, before the step is taken."""
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    checkpoint = tmp_path / "train.pt"
    with pytest.raises(bingo.BingoError, match=r"^training diverged at epoch 1, step \d+ of 21: the loss is (nan|inf); "
                       r"try a lower learning rate \(--lr, now 1000000\.0\)$") as caught:
        train(model, digits, TrainConfig(epochs=2, batch_size=64, lr=1e6, optimizer="sgd"), checkpoint=checkpoint, progress=False)
    _diverged(caught)
    assert not checkpoint.exists()  # no epoch finished: nothing saved


def test_exploded_but_finite_loss_stops_training(digits):
    """Adam at lr 1e6 keeps every number finite (weights ~1e7, loss ~1e17) and learns nothing: also divergence."""
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    with pytest.raises(bingo.BingoError, match=r"^training diverged in epoch 1: its mean loss [0-9.e+]+ is over 100 times "
                       r"that of guessing \(2\.30\); try a lower learning rate \(--lr, now 1000000\.0\)$") as caught:
        train(model, digits, TrainConfig(epochs=1, batch_size=64, lr=1e6), progress=False)
    _diverged(caught)


def test_non_finite_weights_at_epoch_end_stop_before_the_checkpoint(digits, tmp_path):
    """A weight that turns NaN on an epoch's last step (loss still finite) is caught before the epoch is saved."""
    checkpoint = tmp_path / "train.pt"
    _run(digits, 1, checkpoint)
    before = checkpoint.read_bytes()
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    search = bingo.TicketSearch(model, fraction=0.05, seed=0)

    def poison(step):
        if step == 42:  # the last step of epoch 2 (21 per epoch)
            with torch.no_grad():
                model.fc2.weight[0, 0] = float("inf")

    with pytest.raises(bingo.BingoError, match=r"^training diverged in epoch 2: fc2\.weight is not finite; "
                       r"try a lower learning rate \(--lr, now 0\.0012\)$") as caught:
        train(model, digits, TrainConfig(epochs=3, batch_size=64, seed=0), search=search, checkpoint=checkpoint,
              callback=poison, progress=False)
    _diverged(caught)
    assert checkpoint.read_bytes() == before  # the last good epoch is still there to resume from


def test_cli_reports_divergence_instead_of_chance_accuracy(tmp_path, capsys):
    from bingo.bench.cli import main

    out = tmp_path / "r.json"
    code = main(["run", "--data", "digits", "--model", "mlp", "--method", "bingo-paper", "--lr", "1e6", "--epochs", "1",
                 "--sparsity", "0.5", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("bingo: error: training diverged in epoch 1: ") and err.count("\n") == 1
    assert "try a lower learning rate (--lr, now 1000000.0)" in err
    assert not out.exists()
