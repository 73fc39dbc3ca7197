"""``nn.MultiheadAttention``: its q/k/v projections, and its output projection.

The q/k/v projections are bare parameters the attention applies itself:
``in_proj_weight`` (``3E × E``, q, k and v blocks stacked), or
``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when keys and
values have their own sizes; their bias is ``in_proj_bias`` (``3E``). Each
block is an affine map of the query, key or value the attention is called
with, re-fitted as such. Their rows are not units (heads are, see
:mod:`bingo.heads`), so neuron granularity leaves them out.

``out_proj`` is an ``nn.Linear`` the attention never calls: it reads its
weight inside ``F.multi_head_attention_forward``. Its input (the heads'
concatenated outputs) is recovered by a forward hook on the attention that
replays the call with ``out_proj`` swapped for the identity
(``torch.func.functional_call``: no global function is patched, so it is
thread-safe and independent of PyTorch's fused fast path).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .base import LayerType, Refit, register_layer_type

#: the weights of ``nn.MultiheadAttention`` scored by default (whichever it has)
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def attention_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(query, key, value)`` of an ``nn.MultiheadAttention`` call, from a forward hook's ``args`` and ``kwargs``."""
    return tuple(args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key", "value")))


def _block_input(block: int):
    def design(attention: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor:
        x = attention_inputs(args, kwargs)[block]
        return x.reshape(-1, x.shape[-1])

    return design


@register_layer_type
class AttentionLayer(LayerType):
    name = "MultiheadAttention"
    module_type = nn.MultiheadAttention
    maps_to_outputs = False

    def weights(self, module: nn.Module) -> tuple[str, ...]:
        return tuple(name for name in ATTENTION_PROJECTIONS
                     if isinstance(getattr(module, name, None), torch.Tensor))

    def has_units(self, module: nn.Module, name: str) -> bool:
        return False

    def takes(self, module: nn.Module) -> str | None:
        return f"(N, L, {module.embed_dim})" if module.batch_first else f"(L, N, {module.embed_dim})"

    def bias_name(self, module: nn.Module, name: str) -> str | None:
        return "in_proj_bias" if module.in_proj_bias is not None else None

    def refits(self, module: nn.Module, name: str) -> list[Refit] | str:
        e = module.embed_dim
        if name == "in_proj_weight":
            return [Refit(rows=slice(i * e, (i + 1) * e), design=_block_input(i)) for i in range(3)]
        block = ATTENTION_PROJECTIONS.index(name) - 1  # q, k, v
        return [Refit(rows=slice(None), bias_rows=slice(block * e, (block + 1) * e), design=_block_input(block))]


def _heads_output(attention: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor:
    """The input ``out_proj`` gets inside ``attention``'s call: the call replayed with ``out_proj`` the identity."""
    projection = attention.out_proj
    e = projection.in_features
    weight = projection.weight
    identity = {"weight": torch.eye(e, dtype=weight.dtype, device=weight.device),
                "bias": torch.zeros(e, dtype=weight.dtype, device=weight.device)}
    swapped = {}
    for name, value in identity.items():
        if hasattr(projection, f"{name}_orig"):  # pruned: the attention's hook recomputes orig * mask
            swapped[f"out_proj.{name}_orig"] = value
            swapped[f"out_proj.{name}_mask"] = torch.ones_like(value)
        elif getattr(projection, name, None) is not None:
            swapped[f"out_proj.{name}"] = value
    kwargs = {**kwargs, "need_weights": False} if len(args) <= 4 else kwargs
    heads = functional_call(attention, swapped, args, kwargs)[0]
    return heads.reshape(-1, e)


@register_layer_type
class AttentionOutputLayer(LayerType):
    """The ``out_proj`` of an ``nn.MultiheadAttention`` (PyTorch's own subclass of ``nn.Linear`` for it)."""

    name = "MultiheadAttention.out_proj"
    module_type = NonDynamicallyQuantizableLinear

    def takes(self, module: nn.Module) -> str | None:
        return f"(N, ..., {module.in_features})"

    def refits(self, module: nn.Module, name: str) -> list[Refit] | str:
        return [Refit(rows=slice(None), design=_heads_output, hook_on="parent", when="post")]

    def linear_form(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
        return ("nn.MultiheadAttention reads its out_proj's weight itself and never calls out_proj, so a sparse "
                "module in its place would not be used")
