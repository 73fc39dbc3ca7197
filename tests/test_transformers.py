"""The Hugging Face Trainer callback on the real package, with a tiny BERT built from a config (no download)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import bingo  # noqa: E402
from bingo.integrations.transformers import STATE_FILE, BingoTrainerCallback  # noqa: E402


def _model(dropout: float = 0.1):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return transformers.BertForSequenceClassification(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 40, (48, 8), generator=generator)
        self.mask = torch.ones(48, 8, dtype=torch.long)
        self.mask[::3, 6:] = 0
        self.labels = self.ids[:, 0] % 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _train(tmp_path, callbacks, accumulate=1, save_steps=None, resume=None, epochs=2, dropout=0.1):
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=epochs, learning_rate=1e-3,
        gradient_accumulation_steps=accumulate, report_to=[], use_cpu=True, seed=0, logging_strategy="no",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, dataloader_num_workers=0,
        disable_tqdm=True, lr_scheduler_type="constant",  # the same schedule however many epochs a run is given
    )
    model = _model(dropout)
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=_Data(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_trainer_training_is_bit_identical_and_the_search_steps_once_per_optimizer_step(tmp_path):
    plain, _ = _train(tmp_path / "plain", [], accumulate=2)
    callback = BingoTrainerCallback()
    searched, trainer = _train(tmp_path / "searched", [callback], accumulate=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), searched.state_dict().values()))
    assert trainer.state.global_step == 6 == callback.session.search.steps  # 2 epochs x 6 batches / 2
    scored = set(callback.session.search.layers)
    assert "bert.encoder.layer.0.attention.self.query.weight" in scored and "classifier.weight" in scored


def test_trainer_prunes_when_training_ends(tmp_path):
    callback = BingoTrainerCallback(sparsity=0.6)
    model, _ = _train(tmp_path, [callback])
    masks = callback.session.masks
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.6 * total)
    query = model.bert.encoder.layer[0].attention.self.query
    assert bool((query.weight[~masks["bert.encoder.layer.0.attention.self.query.weight"]] == 0).all())


def test_trainer_checkpoints_carry_the_search_and_resume_it(tmp_path):
    full = BingoTrainerCallback()
    full_model, _ = _train(tmp_path / "full", [full], dropout=0.0)
    first = BingoTrainerCallback()
    _train(tmp_path / "run", [first], save_steps=6, epochs=1, dropout=0.0)
    assert (tmp_path / "run" / "checkpoint-6" / STATE_FILE).exists()
    resumed = BingoTrainerCallback()
    model, _ = _train(tmp_path / "run", [resumed], resume=str(tmp_path / "run" / "checkpoint-6"), dropout=0.0)
    assert resumed.session.search.steps == full.session.search.steps == 12
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), full_model.state_dict().values()))
    for key, value in full.session.search.significance().items():
        torch.testing.assert_close(resumed.session.search.significance()[key], value)
    (tmp_path / "run" / "checkpoint-6" / STATE_FILE).unlink()
    with pytest.raises(bingo.ConfigError, match=r"^resuming at step 6 but .* is missing"):
        _train(tmp_path / "run", [BingoTrainerCallback()], resume=str(tmp_path / "run" / "checkpoint-6"))


def test_trainer_search_state_is_a_checksummed_checkpoint_and_a_corrupt_one_is_one_line(tmp_path):
    # issue 20: bingo_search.pt was a plain torch.save, loaded with a bare torch.load
    from bingo.io import load_checkpoint

    _train(tmp_path / "run", [BingoTrainerCallback()], save_steps=6, epochs=1, dropout=0.0)
    saved = tmp_path / "run" / "checkpoint-6" / STATE_FILE
    state = load_checkpoint(saved)  # checksummed, as every bingo checkpoint
    data = saved.read_bytes()
    for damaged in (b"not a checkpoint at all", data[: len(data) // 2]):  # foreign, truncated
        saved.write_bytes(damaged)
        with pytest.raises(bingo.CheckpointError, match=rf"^(cannot read checkpoint )?{saved}") as info:
            _train(tmp_path / "run", [BingoTrainerCallback()], resume=str(saved.parent), dropout=0.0)
        assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    saved.write_bytes(b"not a checkpoint at all")
    with pytest.raises(bingo.CheckpointError, match=r"is not a bingo checkpoint \(corrupt or from another program\)$"):
        _train(tmp_path / "run", [BingoTrainerCallback()], resume=str(saved.parent), dropout=0.0)
    # a file of an older bingo (plain torch.save, no checksum) still resumes, with a warning
    torch.save(state, saved)
    resumed = BingoTrainerCallback()
    with pytest.warns(UserWarning, match=r"written by an older bingo without a checksum"):
        _train(tmp_path / "run", [resumed], resume=str(saved.parent), dropout=0.0)
    assert resumed.session.search.steps == 12


def test_a_trainer_that_calls_the_model_without_labels_gets_a_config_error_naming_the_way_out(tmp_path):
    # label smoothing: the Trainer pops the labels and smooths the loss itself, so the model's output has no loss
    arguments = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, report_to=[], use_cpu=True, seed=0,
        logging_strategy="no", save_strategy="no", disable_tqdm=True, label_smoothing_factor=0.1)
    trainer = transformers.Trainer(model=_model(), args=arguments, train_dataset=_Data(), callbacks=[BingoTrainerCallback()])
    with pytest.raises(bingo.ConfigError, match=r"^BingoTrainerCallback: the Trainer called the model without labels "
                                                r"\(label_smoothing_factor > 0, or a compute_loss that pops them\).*"
                                                r"pass closure=\(model, args, kwargs\) -> loss$"):
        trainer.train()
    # the way out: a closure that computes the loss from labels it keeps
    labels = {}

    class Keeping(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            labels["last"] = inputs["labels"]
            return super().compute_loss(model, inputs, return_outputs, **kwargs)

    callback = BingoTrainerCallback(closure=lambda model, args, kwargs: torch.nn.functional.cross_entropy(
        model(*args, **kwargs).logits, labels["last"]))
    Keeping(model=_model(), args=arguments, train_dataset=_Data(), callbacks=[callback]).train()
    assert callback.session.search.steps == 2
