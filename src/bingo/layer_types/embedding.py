"""``nn.Embedding``: a table looked up by index, its units are rows (one per token).

Scored only when included (``include=["*embed*"]``): pruning an
embedding's entries is a choice, not a default. It cannot be re-fitted: a
lookup has no input to fit the rows to, so compensation lists it in
``skipped``.
"""

from __future__ import annotations

from torch import nn

from .base import LayerType, Refit, register_layer_type


@register_layer_type
class EmbeddingLayer(LayerType):
    name = "Embedding"
    module_type = (nn.Embedding, nn.EmbeddingBag)
    scored_by_default = False
    maps_to_outputs = False
    takes_indices = True

    def takes(self, module: nn.Module) -> str | None:
        return f"(N, ...) integer indices in [0, {module.num_embeddings})"

    def bias_name(self, module: nn.Module, name: str) -> str | None:
        return None

    def refits(self, module: nn.Module, name: str) -> list[Refit] | str:
        return "an embedding's rows are looked up, not applied to an input: there is nothing to fit them to"
