"""Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT): ``y = x W + b`` with ``W`` stored ``in × out``.

An affine map of the last axis like ``nn.Linear``, with the weight
transposed: its units (output features) are the *columns* of ``W``
(axis 1). Recognised without importing transformers: when transformers is
not loaded, no module can be one.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .base import LayerType, Refit, register_layer_type
from .linear import last_axis_rows


@register_layer_type
class HuggingFaceConv1DLayer(LayerType):
    name = "Conv1D"

    def matches(self, module: nn.Module) -> bool:
        utils = sys.modules.get("transformers.pytorch_utils")
        conv1d = getattr(utils, "Conv1D", None)
        return conv1d is not None and isinstance(module, conv1d)

    def unit_axis(self, module: nn.Module, name: str) -> int:
        return 1

    shrinkable = True

    def refits(self, module: nn.Module, name: str) -> list[Refit] | str:
        return [Refit(rows=slice(None), design=last_axis_rows)]

    def input_width(self, module: nn.Module, x: torch.Tensor) -> tuple[int, int, str] | None:
        return (x.shape[-1], module.weight.shape[0], "input features") if x.dim() else None  # weight stored in × out

    def takes(self, module: nn.Module) -> str | None:
        return f"(N, ..., {module.weight.shape[0]})"

    def linear_form(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight.T, bias  # stored in × out

    def resized(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        new = type(module)(weight.shape[0], weight.shape[1]).to(device=weight.device, dtype=weight.dtype)  # Conv1D(nf, nx)
        with torch.no_grad():
            new.weight.copy_(weight.T)  # stored in × out
            if bias is None:
                new.bias.zero_()
            else:
                new.bias.copy_(bias)
        return new
