"""BINGO in a plain PyTorch training loop: search while training, prune once, compensate.

    python examples/plain_loop.py

Trains a small MLP on scikit-learn's digits (bundled, no download) with the
ticket search attached, prunes 80% of the weights by the search's
significance blended with magnitude, re-fits the survivors, and reports test
accuracy before and after.
"""

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import bingo

torch.manual_seed(0)
x, y = load_digits(return_X_y=True)
x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=0)  # bingo's search
for epoch in range(15):
    for batch in torch.randperm(len(x_train)).split(64):
        loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        search.step(x_train[batch], y_train[batch])  # after optimizer.step(), before the next zero_grad()


def accuracy(net: nn.Module) -> float:
    with torch.no_grad():
        return float((net(x_test).argmax(dim=1) == y_test).float().mean())


dense = accuracy(model)
scores = bingo.bingo_scores(search, model)
masks = bingo.prune(model, scores, sparsity=0.8)
pruned = accuracy(model)
bingo.compensate(model, masks, x_train[:1024])
print(f"dense {dense:.3f}; 80% pruned {pruned:.3f}; compensated {accuracy(model):.3f}; sparsity {bingo.model_sparsity(model):.3f}")
