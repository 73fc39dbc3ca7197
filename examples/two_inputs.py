"""A model with two inputs (features and a mask), searched through a closure: no wrapper module.

    python examples/two_inputs.py

``search.step(closure)`` is shaped like ``optimizer.step(closure)``: the
closure evaluates the batch just trained on with the model it is handed and
returns the loss. Fake passes hand it the model with the probed weights
swapped in, so the mask reaches every fake pass.
"""

import torch
import torch.nn.functional as F
from torch import nn

import bingo


class MaskedClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(20, 64)
        self.out = nn.Linear(64, 3)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.hidden(features * mask)))


torch.manual_seed(0)
features = torch.randn(512, 20)
mask = (torch.rand(512, 20) > 0.2).float()  # which features were observed
labels = ((features * mask)[:, :3].argmax(dim=1)).long()
model = MaskedClassifier()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=0)

for epoch in range(10):
    for batch in torch.randperm(512).split(64):
        f, m, y = features[batch], mask[batch], labels[batch]
        loss = F.cross_entropy(model(f, m), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        search.step(lambda net: F.cross_entropy(net(f, m), y))  # or search.step((f, m), y)

masks = bingo.prune(model, bingo.bingo_scores(search, model), sparsity=0.7)
with torch.no_grad():
    accuracy = float((model(features, mask).argmax(dim=1) == labels).float().mean())
print(f"pruned to {bingo.model_sparsity(model):.2f} sparsity; training accuracy {accuracy:.3f}")
