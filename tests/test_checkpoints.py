"""Checkpoint files: a versioned format with a checksum, and resuming that refuses bad state in one line.

Every file ``save_checkpoint`` writes (training checkpoints of ``bingo run
--checkpoint``, model files of ``--save``) carries ``format``,
``format_version`` and a sha256 of its content; ``load_checkpoint`` checks
all three, so a corrupt file or one from another program is refused with
one message instead of PyTorch's (which advises the unsafe
``weights_only=False``), and a flipped byte in tensor data is not accepted.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch

import bingo
from bingo.bench.cli import main
from bingo.bench.data import load_dataset
from bingo.errors import CheckpointError
from bingo.io import load_checkpoint, save_checkpoint
from bingo.bench.models import build_model
from bingo.bench.training import TrainConfig, train

NOT_OURS = "is not a bingo checkpoint (corrupt or from another program)"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _payload() -> dict:
    return {
        "kind": "test",
        "weights": torch.arange(256, dtype=torch.float32) + 0.5,
        "flags": torch.tensor([True, False]),
        "half": torch.ones(2, 3, dtype=torch.bfloat16),
        "nested": OrderedDict(a=[1, 2.5, "x", None], b=(torch.Size([2, 3]), torch.float16)),
        3: {"step": torch.tensor(7.0)},
    }


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_round_trip_keeps_every_value(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(_payload(), path)
    assert _same(load_checkpoint(path), _payload())


def test_file_carries_format_version_and_checksum_and_stays_a_torch_file(tmp_path):
    """Readable by plain ``torch.load(weights_only=True)``: the payload's keys plus three header keys."""
    path = tmp_path / "c.pt"
    save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "bingo-checkpoint"
    assert raw["format_version"] == 1
    assert re.fullmatch(r"[0-9a-f]{64}", raw["sha256"])
    assert torch.equal(raw["state_dict"]["w"], torch.ones(3))


def _assert_not_ours(path, *, extra: str = "") -> None:
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path} {NOT_OURS}"), message
    assert extra in message
    assert "weights_only" not in message and "\n" not in message


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint", os.urandom(4096), b"PK\x03\x04" + os.urandom(200)],
    ids=["empty", "text", "random", "zip-magic-then-random"],
)
def test_garbage_is_not_a_bingo_checkpoint(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    _assert_not_ours(path)


def test_plain_torch_save_file_is_not_a_bingo_checkpoint(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"kind": "bingo-train", "model": {"w": torch.ones(3)}}, path)  # looks like ours, no header
    _assert_not_ours(path)
    torch.save([1, 2, 3], path)
    _assert_not_ours(path)


def test_pickled_object_gets_our_message_not_weights_only_advice(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"obj": np.dtype("float32"), "fn": os.path.join}, path)  # refused by the weights_only unpickler
    _assert_not_ours(path)


def test_flipped_byte_inside_tensor_data_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(_payload(), path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find((torch.arange(256, dtype=torch.float32) + 0.5).numpy().tobytes())
    assert at > 0
    data[at + 401] ^= 0x10  # a mantissa bit of weights[100]: still a perfectly readable float
    path.write_bytes(bytes(data))
    changed = torch.load(path, weights_only=True)["weights"]
    assert not torch.equal(changed, _payload()["weights"])  # torch.load alone does not notice
    _assert_not_ours(path, extra="does not match its sha256")


def test_edited_value_with_stale_checksum_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(2)}, path)
    raw = torch.load(path, weights_only=True)
    raw["epoch"] = 2
    torch.save(raw, path)
    _assert_not_ours(path, extra="does not match its sha256")


def test_newer_format_version_says_so(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"w": torch.ones(2)}, path)
    raw = torch.load(path, weights_only=True)
    raw["format_version"] = 2
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} has checkpoint format version 2; this bingo reads version 1: upgrade bingo$"):
        load_checkpoint(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match=rf"^no such checkpoint: {re.escape(str(tmp_path / 'nope.pt'))}$"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match=rf"^checkpoint {re.escape(str(tmp_path))} is a folder, not a file$"):
        load_checkpoint(tmp_path)


def test_save_refuses_what_load_could_not_read_back(tmp_path):
    with pytest.raises(TypeError, match=r"cannot store .*ndarray"):
        save_checkpoint({"x": np.zeros(2)}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"'sha256' is reserved"):
        save_checkpoint({"sha256": "mine"}, tmp_path / "c.pt")
    with pytest.raises(TypeError, match=r"a dict"):
        save_checkpoint([torch.ones(1)], tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_cli_gets_the_message_for_checkpoint_and_model_file(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(1000))
    for argv in (
        ["run", "--data", "digits", "--model", "mlp", "--epochs", "1", "--no-progress", "--sparsity", "0.5",
         "--out", str(tmp_path / "r.json"), "--checkpoint", str(garbage)],
        ["export", str(garbage), str(tmp_path / "exported")],
    ):
        assert main(argv) == 2
        err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True) if not line.startswith("bingo: warning: "))
        assert err == f"bingo: error: {garbage} {NOT_OURS}\n"  # (a 1-epoch digits run is warned to be short)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "exported").exists()


# --------------------------------------------------------------------------
# resuming: every bad field is one CheckpointError, and nothing is changed
# --------------------------------------------------------------------------


def _search(model):
    return bingo.TicketSearch(model, fraction=0.05, seed=0)


def _first_epoch(digits, path):
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    train(model, digits, TrainConfig(epochs=1, batch_size=64), search=_search(model), checkpoint=path, progress=False)


def _bad_optimizer_shape(state):
    exp_avg = state["optimizer"]["state"][0]["exp_avg"]
    state["optimizer"]["state"][0]["exp_avg"] = exp_avg[:1]


BAD_STATES = {
    "missing config": (lambda s: s.pop("config"), r"lacks config; not a complete training checkpoint"),
    "missing order": (lambda s: s.pop("order"), r"lacks order; not a complete training checkpoint"),
    "config not a dict": (lambda s: s.update(config=[1]), r"config must be a dict of training settings, got list"),
    "epoch a string": (lambda s: s.update(epoch="1"), r"epoch must be a whole number >= 0, got '1'"),
    "epoch negative": (lambda s: s.update(epoch=-1), r"epoch must be a whole number >= 0, got -1"),
    "steps a float": (lambda s: s.update(steps=3.5), r"steps must be a whole number >= 0, got 3.5"),
    "seconds a string": (lambda s: s.update(train_seconds="fast"), r"train_seconds must be a number >= 0, got 'fast'"),
    "bad rng": (lambda s: s.update(rng=torch.zeros(5, dtype=torch.uint8)), r"rng is not a random generator state"),
    "rng not a tensor": (lambda s: s.update(rng=[1, 2]), r"rng is not a random generator state"),
    "bad order": (lambda s: s.update(order=torch.ones(3)), r"order is not a random generator state"),
    "optimizer empty": (lambda s: s.update(optimizer={}), r"optimizer state does not fit this model and optimizer"),
    "optimizer other groups": (
        lambda s: s["optimizer"]["param_groups"][0].update(params=[0]),
        r"optimizer state does not fit this model and optimizer",
    ),
    "optimizer wrong shape": (_bad_optimizer_shape, r"optimizer state does not fit this model and optimizer: exp_avg of parameter 0 has shape \(1, 64\), the parameter \(64, 64\)"),
    "optimizer not a dict": (lambda s: s.update(optimizer="adam"), r"optimizer state does not fit this model and optimizer"),
    "model not a dict": (lambda s: s.update(model=[1]), r"does not fit the model"),
    "search bad": (lambda s: s.update(search=[{"config": {}}]), r"not a TicketSearch state dict"),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_bad_training_checkpoint_is_one_checkpoint_error_and_changes_nothing(digits, tmp_path, name):
    path = tmp_path / "train.pt"
    _first_epoch(digits, path)
    state = load_checkpoint(path)
    damage, message = BAD_STATES[name]
    damage(state)
    save_checkpoint(state, path)  # a well-formed file with bad content: what a buggy tool or a hand edit gives
    before = path.read_bytes()

    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=1)
    search = _search(model)
    model_before = {k: v.clone() for k, v in model.state_dict().items()}
    search_before = search.state_dict()
    rng_before = torch.get_rng_state()
    with pytest.raises(CheckpointError) as caught:
        train(model, digits, TrainConfig(epochs=2, batch_size=64), search=search, checkpoint=path, progress=False)
    text = str(caught.value)
    assert "\n" not in text
    assert re.search(rf"checkpoint {re.escape(str(path))}\b.*{message}", text), text
    # Nothing already written was damaged, and nothing in memory was half-loaded.
    assert path.read_bytes() == before
    assert all(torch.equal(model.state_dict()[k], v) for k, v in model_before.items())
    assert search.steps == 0 and all(torch.equal(search.state_dict()["theta0"][k], v) for k, v in search_before["theta0"].items())
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_good_checkpoint_still_resumes_after_the_checks(digits, tmp_path):
    path = tmp_path / "train.pt"
    _first_epoch(digits, path)
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    result = train(model, digits, TrainConfig(epochs=2, batch_size=64), search=_search(model), checkpoint=path, progress=False)
    assert result.epochs == 2 and load_checkpoint(path)["epoch"] == 2
