"""``nn.Linear``: ``y = x Wᵀ + b``, units are the rows of ``W``."""

from __future__ import annotations

import torch
from torch import nn

from .base import LayerType, Refit, register_layer_type


def last_axis_rows(module: nn.Module, args: tuple, kwargs: dict, output: object):
    """The input's feature vectors, ``(…, fan-in) -> (rows, fan-in)``: the design of any affine map of the last axis."""
    x = args[0] if args else next(iter(kwargs.values()))
    return x.reshape(-1, x.shape[-1])


@register_layer_type
class LinearLayer(LayerType):
    name = "Linear"
    module_type = nn.Linear

    shrinkable = True

    def refits(self, module: nn.Module, name: str) -> list[Refit] | str:
        return [Refit(rows=slice(None), design=last_axis_rows)]

    def input_width(self, module: nn.Module, x: torch.Tensor) -> tuple[int, int, str] | None:
        return (x.shape[-1], module.in_features, "input features") if x.dim() else None

    def takes(self, module: nn.Module) -> str | None:
        return f"(N, ..., {module.in_features})"

    def linear_form(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None):
        return weight, bias

    def resized(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
        return new
