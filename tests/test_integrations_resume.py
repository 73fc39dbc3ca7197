"""Resuming the trainer callbacks from their checkpoints ends where the uninterrupted run ends; gradual pruning reaches its target.

Each resume test trains once without a break, saving checkpoints, then resumes
a fresh model from a checkpoint of the middle and compares the end: weights,
masks and significance, exactly. No dropout: Lightning does not restore the
global RNG on resume. Adam(W) throughout, so the optimizer state resumed
must be matched to the right parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bingo

STEPS_PER_EPOCH = 6  # 96 samples, batches of 16


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 16, generator=generator)
    return x, x[:, :4].argmax(dim=1)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def _same_significance(a: bingo.TicketSearch, b: bingo.TicketSearch) -> bool:
    first, second = a.significance(), b.significance()
    return first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)


def _pruned_fraction(masks: dict[str, torch.Tensor]) -> tuple[int, int]:
    return sum(int((~mask).sum()) for mask in masks.values()), sum(mask.numel() for mask in masks.values())


# ---------------------------------------------------------------- Lightning

pl = pytest.importorskip("lightning.pytorch")

from bingo.integrations.lightning import BingoCallback  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(callbacks, ckpt_path=None, checkpoints=None, **settings) -> tuple[Classifier, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    module = Classifier()
    if checkpoints is not None:  # one checkpoint per epoch, as Lightning writes them during fit
        callbacks = [*callbacks, pl.callbacks.ModelCheckpoint(dirpath=checkpoints, filename="{epoch}", save_top_k=-1)]
    settings = {"max_epochs": 2, **settings}
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=checkpoints is not None,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **settings)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=16, shuffle=False)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, trainer


def test_lightning_gradual_resumes_the_pruned_module_from_its_checkpoint(tmp_path):
    full = BingoCallback(sparsity=0.8, gradual=(2, 8), frequency=2)
    full_module, _ = _fit([full], checkpoints=tmp_path)  # masks at steps 2, 4, 6 | 8; checkpoint after step 6
    resumed = BingoCallback(sparsity=0.8, gradual=(2, 8), frequency=2)
    module, trainer = _fit([resumed], ckpt_path=tmp_path / "epoch=0.ckpt")
    assert trainer.global_step == 12 and resumed.session.scheduler.last_step == 12
    assert _same_state(module, full_module)  # weight_orig and weight_mask of every layer, bit for bit
    assert resumed.session.masks.keys() == full.session.masks.keys()
    assert all(torch.equal(resumed.session.masks[key], mask) for key, mask in full.session.masks.items())
    assert _same_significance(resumed.session.search, full.session.search)
    _assert_loads_like_plain_torch(module)  # nothing left behind


def test_lightning_resume_with_accumulation_takes_one_search_step_per_optimizer_step(tmp_path):
    full = BingoCallback()  # search only
    _fit([full], accumulate_grad_batches=2, checkpoints=tmp_path)
    resumed = BingoCallback()
    _, trainer = _fit([resumed], accumulate_grad_batches=2, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert trainer.global_step == full.session.search.steps == resumed.session.search.steps == 6
    assert _same_significance(resumed.session.search, full.session.search)


def test_lightning_gradual_stopped_before_the_end_step_still_ends_at_the_sparsity():
    callback = BingoCallback(sparsity=0.8, gradual=(2, 50), frequency=2)
    module, trainer = _fit([callback], max_steps=4)
    assert trainer.global_step == 4 and callback.session.scheduler.sparsity_at(4) < 0.8
    pruned, total = _pruned_fraction(callback.session.masks)
    assert pruned == round(0.8 * total)
    assert bingo.masks.current_masks(module, callback.session.masks).keys() == callback.session.masks.keys()
    assert all(bool((module.net[i].weight[~callback.session.masks[f"net.{i}.weight"]] == 0).all()) for i in (0, 2, 4))


# ---------------------------------------------------------------- Hugging Face Trainer

transformers = pytest.importorskip("transformers")

from bingo.integrations.transformers import STATE_FILE, BingoTrainerCallback  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x, labels=None):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "labels": self.y[i]}


def _train(output_dir, callbacks, resume=None, save_steps=None, learning_rate=1e-2, **settings) -> tuple[Net, transformers.Trainer]:
    settings = {"num_train_epochs": 2, **settings}
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=16, learning_rate=learning_rate, report_to=[], use_cpu=True,
        seed=0, logging_strategy="no", save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant", **settings,
    )
    model = Net()
    trainer = transformers.Trainer(model=model, args=arguments, train_dataset=Data(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model, trainer


def test_trainer_gradual_resumes_the_pruned_model_from_its_checkpoint(tmp_path):
    full = BingoTrainerCallback(sparsity=0.8, gradual=(2, 8), frequency=2)
    full_model, _ = _train(tmp_path / "run", [full], save_steps=STEPS_PER_EPOCH)
    resumed = BingoTrainerCallback(sparsity=0.8, gradual=(2, 8), frequency=2)
    model, trainer = _train(tmp_path / "run", [resumed], resume=tmp_path / "run" / "checkpoint-6")
    assert trainer.state.global_step == 12 and resumed.session.scheduler.last_step == 12
    assert _same_state(model, full_model)  # weight_orig and weight_mask of every layer, bit for bit
    assert all(torch.equal(resumed.session.masks[key], mask) for key, mask in full.session.masks.items())
    assert _same_significance(resumed.session.search, full.session.search)
    _assert_loads_like_plain_torch(model)  # nothing left behind


def test_trainer_reads_the_search_from_the_checkpoint_it_resumes(tmp_path):
    full = BingoTrainerCallback()  # search only
    _train(tmp_path / "a", [full], save_steps=3)
    _train(tmp_path / "b", [BingoTrainerCallback()], save_steps=3, learning_rate=0.5)  # another run's checkpoint-3
    assert (tmp_path / "b" / "checkpoint-3" / STATE_FILE).exists()
    for output_dir in (tmp_path / "b", tmp_path / "elsewhere"):  # holding another checkpoint-3; holding none
        resumed = BingoTrainerCallback()
        _train(output_dir, [resumed], resume=tmp_path / "a" / "checkpoint-3")
        assert resumed.session.search.steps == full.session.search.steps == 12
        assert _same_significance(resumed.session.search, full.session.search)


def test_trainer_gradual_stopped_before_the_end_step_still_ends_at_the_sparsity(tmp_path):
    callback = BingoTrainerCallback(sparsity=0.8, gradual=(2, 50), frequency=2)
    model, trainer = _train(tmp_path, [callback], max_steps=4)
    assert trainer.state.global_step == 4 and callback.session.scheduler.sparsity_at(4) < 0.8
    pruned, total = _pruned_fraction(callback.session.masks)
    assert pruned == round(0.8 * total)
    assert all(bool((model.net[i].weight[~callback.session.masks[f"net.{i}.weight"]] == 0).all()) for i in (0, 2, 4))


def _assert_loads_like_plain_torch(model: torch.nn.Module) -> None:
    """No mask-loading hook stays on ``model``: a dense copy refuses its pruned state, as plain torch does."""
    import copy

    dense = copy.deepcopy(model)  # (a copy carries the model's hooks)
    bingo.make_permanent(dense)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        dense.load_state_dict(model.state_dict())
