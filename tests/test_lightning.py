"""The Lightning callback on the real package: bit-identical training, one search step per optimizer step, checkpoints, the prune."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import bingo  # noqa: E402
from bingo.integrations.lightning import BingoCallback  # noqa: E402


class Classifier(pl.LightningModule):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 16, generator=generator)
    y = (x[:, :4].argmax(dim=1)).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def _fit(callbacks, epochs=2, accumulate=1, dropout=0.1, **kwargs) -> tuple[Classifier, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    module = Classifier(dropout)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                         callbacks=callbacks, **kwargs)
    trainer.fit(module, _loader())
    return module, trainer


def test_training_is_bit_identical_and_the_search_steps_once_per_optimizer_step():
    plain, plain_trainer = _fit([], accumulate=2)
    callback = BingoCallback()  # no target: search only
    searched, trainer = _fit([callback], accumulate=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), searched.state_dict().values()))
    assert trainer.global_step == 6  # 2 epochs x 6 batches / 2 accumulated
    assert callback.session.search.steps == 6
    assert float(trainer.callback_metrics["train_loss"]) == float(plain_trainer.callback_metrics["train_loss"])


def test_prunes_to_the_sparsity_when_fit_ends_with_compensation():
    calibration = next(iter(_loader()))[0]
    callback = BingoCallback(sparsity=0.75, calibration=calibration)
    module, _ = _fit([callback])
    masks = callback.session.masks
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.75 * total)
    assert all(bool((module.net[i].weight[~masks[f"net.{i}.weight"]] == 0).all()) for i in (0, 3))
    assert callback.session.compensation is not None and set(callback.session.compensation.layers) == {"net.0.weight", "net.3.weight"}


def test_the_prune_ranks_by_bingo_scores():
    """The callback prunes by the core recipe, bingo.bingo_scores of its search, at its magnitude weight."""
    callback = BingoCallback(sparsity=0.5, magnitude_weight=0.25, search=bingo.BINGO_SEARCH)
    ranked = []
    real = bingo.integrations.session.bingo_scores

    def spy(search, model, magnitude_weight, **kwargs):
        ranked.append((search, magnitude_weight))
        return real(search, model, magnitude_weight, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bingo.integrations.session, "bingo_scores", spy)
        _fit([callback])
    assert ranked == [(callback.session.search, 0.25)] and callback.session.search.config.estimator == "hybrid"


def test_search_state_travels_in_lightning_checkpoints(tmp_path):
    # No dropout here: Lightning does not restore the global RNG on resume, so dropout masks would differ.
    full = BingoCallback()
    full_module, _ = _fit([full], epochs=2, dropout=0.0)
    first = BingoCallback()
    _, trainer = _fit([first], epochs=1, dropout=0.0)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    resumed = BingoCallback()
    pl.seed_everything(0, verbose=False)
    module = Classifier(dropout=0.0)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[resumed])
    trainer.fit(module, _loader(), ckpt_path=tmp_path / "one.ckpt")
    assert resumed.session.search.steps == full.session.search.steps == 12
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), full_module.state_dict().values()))
    for key, value in full.session.search.significance().items():
        torch.testing.assert_close(resumed.session.search.significance()[key], value)


def test_accuracy_floor_and_bad_settings():
    x, y = next(iter(_loader()))

    def accuracy(model):
        with torch.no_grad():
            return float((model(x).argmax(dim=1) == y).float().mean())

    callback = BingoCallback(max_accuracy_drop=0.05, evaluate=accuracy)
    _fit([callback])
    floor = callback.session.floor
    assert floor.accuracy >= floor.floor and 0 < floor.sparsity < 1
    with pytest.raises(bingo.ConfigError, match=r"^give one of sparsity, min_accuracy, max_accuracy_drop; got sparsity, min_accuracy$"):
        BingoCallback(sparsity=0.5, min_accuracy=0.9, evaluate=accuracy)
    with pytest.raises(bingo.ConfigError, match=r"^an accuracy floor needs evaluate="):
        BingoCallback(min_accuracy=0.9)
    with pytest.raises(bingo.ConfigError, match=r"^magnitude weight must be in \[0, 1\], got 1\.5$"):
        BingoCallback(sparsity=0.5, magnitude_weight=1.5)
    with pytest.raises(bingo.ConfigError, match=r"^search must be a SearchConfig, got dict$"):
        BingoCallback(sparsity=0.5, search={"estimator": "taylor"})


def test_gradual_pruning_during_fit_reaches_the_target_on_the_schedule():
    callback = BingoCallback(sparsity=0.8, gradual=(2, 8), frequency=2)
    module, trainer = _fit([callback])  # 12 optimizer steps; the schedule ends at step 8
    scheduler = callback.session.scheduler
    assert scheduler.last_step == trainer.global_step == 12
    assert [round(scheduler.sparsity_at(t), 4) for t in (0, 2, 4, 8, 12)] == [0.0, 0.0, round(0.8 * (1 - (1 - 2 / 6) ** 3), 4), 0.8, 0.8]
    masks = callback.session.masks
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.8 * total)
    assert bool((module.net[0].weight[~masks["net.0.weight"]] == 0).all())
    with pytest.raises(bingo.ConfigError, match=r"^gradual pruning needs the target: give sparsity="):
        BingoCallback(gradual=(2, 8))


def test_a_2_4_pattern_at_the_end_of_fit_with_compensation():
    calibration = next(iter(_loader()))[0]
    callback = BingoCallback(sparsity="2:4", calibration=calibration)
    module, _ = _fit([callback])
    for i in (0, 3):  # every group of 4 consecutive inputs of every unit keeps at most 2, compensated or not
        groups = (module.net[i].weight != 0).reshape(module.net[i].out_features, -1, 4)
        assert bool((groups.sum(-1) <= 2).all())
        assert bingo.is_n_m(callback.session.masks[f"net.{i}.weight"], 2, 4)
    assert set(callback.session.compensation.layers) == {"net.0.weight", "net.3.weight"}
    with pytest.raises(bingo.ConfigError, match="gradual pruning needs a fraction to reach, not the pattern '2:4'"):
        BingoCallback(sparsity="2:4", gradual=(0, 10))


class ManualClassifier(Classifier):
    """Manual optimization: its training_step zeroes, backpropagates and steps the optimizer itself."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_manual_optimization_needs_a_closure_and_works_with_one():
    def fit(callback):
        pl.seed_everything(0, verbose=False)
        module = ManualClassifier()
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
        trainer.fit(module, _loader())
        return module

    with pytest.raises(bingo.ConfigError, match=r"^BingoCallback: ManualClassifier uses manual optimization "
                                                r"\(automatic_optimization = False\), so its training_step steps the "
                                                r"optimizer .*pass closure=\(module, batch, batch_idx\) -> loss"):
        fit(BingoCallback(sparsity=0.5))
    callback = BingoCallback(sparsity=0.5, closure=lambda module, batch, i: F.cross_entropy(module(batch[0]), batch[1]))
    module = fit(callback)
    assert callback.session.search.steps == 6  # 96 samples in batches of 16, one optimizer step each
    weights = [module.net[0].weight, module.net[3].weight]
    assert sum(int((w == 0).sum()) for w in weights) == sum(w.numel() for w in weights) // 2
