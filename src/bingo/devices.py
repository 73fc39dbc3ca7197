"""Where tensors live: the device named on the command line, and the device a model is on.

The device is taken from the model wherever bingo works on one (its first
parameter's, else its first buffer's, else the CPU), never assumed; data
given on another device are moved to it batch by batch (:func:`to_device`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["DEVICE_CHOICES", "model_device", "resolve_device", "to_device"]

#: what ``--device`` takes: ``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda``, ``cuda:N``
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(name: str | torch.device) -> torch.device:
    """The device ``name`` stands for, or a :class:`ConfigError` that says why it is not there.

    ``"auto"``: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.
    ``"cuda"`` and ``"cuda:N"`` need a CUDA GPU (the N-th: ``N`` below
    ``torch.cuda.device_count()``).
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        index = text.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"unknown device {name!r}; valid choices: {', '.join(DEVICE_CHOICES)}")
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} is not available: this machine has no CUDA GPU that torch "
                              f"{torch.__version__} can use (torch.cuda.is_available() is False); use --device cpu or auto")
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            raise ConfigError(f"device {name!r} is not available: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device(text)
    raise ConfigError(f"unknown device {name!r}; valid choices: {', '.join(DEVICE_CHOICES)}")


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else first buffer; a model with neither: the CPU)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or tuples, lists and dicts of them) on ``device``; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
