"""``nn.Conv1d`` and ``nn.Conv2d``: units are filters (axis 0); a re-fit sees the input unfolded into patches.

The unit matrix of a filter bank ``(out, C, k…)`` is ``(out, C·k…)`` in
``unfold``'s column order, so one output position is one row of the design
matrix ``X`` (``N·P × C·k…``) and ``X Wᵀ + b`` is the convolution. Grouped
convolutions, padding other than zeros, and ``padding="same"`` are not
re-fitted (the unfold would not be the convolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerType, Refit, register_layer_type


def _patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(conv, nn.Conv1d):  # a length-L signal is a 1 × L image
        patches = F.unfold(x.unsqueeze(2), (1, conv.kernel_size[0]), dilation=(1, conv.dilation[0]),
                           padding=(0, conv.padding[0]), stride=(1, conv.stride[0]))
    else:
        patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·P, C·k…)


def conv_patches(module: nn.Module, args: tuple, kwargs: dict, output: object) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    if x.dim() == module.weight.dim() - 1:
        x = x.unsqueeze(0)  # an unbatched input
    return _patches(module, x)


@register_layer_type
class ConvLayer(LayerType):
    name = "Conv"
    module_type = (nn.Conv1d, nn.Conv2d)

    shrinkable = True

    def input_width(self, module: nn.Module, x: torch.Tensor) -> tuple[int, int, str] | None:
        if x.dim() == 0:
            return None
        channel = 1 if x.dim() == len(module.kernel_size) + 2 else 0  # batched, or one unbatched sample
        return x.shape[channel], module.in_channels, "input channels"

    def takes(self, module: nn.Module) -> str | None:
        return f"(N, {module.in_channels}, " + ("H, W)" if len(module.kernel_size) == 2 else "L)")

    def sample_layout(self, module: nn.Module) -> tuple[int, int] | None:
        return module.in_channels, 1 + len(module.kernel_size)

    def resized(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        new = type(module)(
            weight.shape[1], weight.shape[0], module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=1, bias=bias is not None, padding_mode=module.padding_mode,
            device=weight.device, dtype=weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
        return new

    def refits(self, module: nn.Module, name: str) -> list[Refit] | str:
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "grouped, non-zero-padded or 'same'-padded convolutions are not re-fitted"
        return [Refit(rows=slice(None), design=conv_patches)]
