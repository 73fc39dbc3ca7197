"""A token classifier on nn.TransformerEncoder: searched, pruned (attention q/k/v included) and fine-tuned.

    python examples/transformer_encoder.py

Padded sequences of token ids, a padding mask passed by keyword, and a
closure for the search: the model is used as it is, no wrapper module.
"""

import torch
import torch.nn.functional as F
from torch import nn

import bingo


class TokenClassifier(nn.Module):
    def __init__(self, vocabulary: int = 20, width: int = 32, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width, padding_idx=0)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embed(tokens), src_key_padding_mask=padding)
        return self.head(hidden.masked_fill(padding[..., None], 0).sum(1) / (~padding).sum(1, keepdim=True))


def train(model, steps, search=None):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = torch.arange(step * 32, step * 32 + 32) % len(tokens)
        x, pad, y = tokens[batch], padding[batch], labels[batch]
        loss = F.cross_entropy(model(x, pad), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if search is not None:
            search.step(lambda net: F.cross_entropy(net(x, padding=pad), y))


torch.manual_seed(0)
tokens = torch.randint(1, 20, (1024, 12))
padding = torch.arange(12) >= torch.randint(4, 13, (1024, 1))  # True = padding
tokens[padding] = 0
labels = ((tokens == 3).sum(1) > (tokens == 5).sum(1)).long()  # more 3s than 5s among the real tokens
model = TokenClassifier()
search = bingo.TicketSearch(model, estimator="hybrid", metric="loss", mode="zero", every=None, seed=0)
print(search.coverage())
train(model, 300, search)


def accuracy(model):
    with torch.no_grad():
        return float((model(tokens, padding).argmax(1) == labels).float().mean())


dense = accuracy(model)
masks = bingo.prune(model, bingo.bingo_scores(search, model), sparsity=0.7)
pruned = accuracy(model)
train(model, 100)  # fine-tune: pruned weights stay zero, every kept one (q/k/v and out_proj included) trains
qkv = masks["encoder.layers.0.self_attn.in_proj_weight"]
print(f"q/k/v of layer 0 kept {float(qkv.float().mean()):.2f}; pruned to {bingo.model_sparsity(model):.2f} of scored weights; "
      f"training accuracy dense {dense:.3f}, pruned {pruned:.3f}, fine-tuned {accuracy(model):.3f}")
