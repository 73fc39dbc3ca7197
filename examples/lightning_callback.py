"""BINGO in a Lightning fit: the callback searches during training and prunes when fit ends.

    pip install "bingo-prune[lightning]"
    python examples/lightning_callback.py
"""

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from bingo.integrations.lightning import BingoCallback


class DigitClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


pl.seed_everything(0, verbose=False)
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:1400], y[:1400]), batch_size=64, shuffle=True)
callback = BingoCallback(sparsity=0.8, calibration=x[:1024])  # prune 80% at the end, survivors re-fitted
trainer = pl.Trainer(max_epochs=10, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
module = DigitClassifier()
trainer.fit(module, loader)
with torch.no_grad():
    accuracy = float((module(x[1400:]).argmax(dim=1) == y[1400:]).float().mean())
print(f"search steps {callback.session.search.steps} (= optimizer steps {trainer.global_step}); "
      f"pruned test accuracy {accuracy:.3f}")
