"""Which weights BINGO scores, and how to reach them by name.

A *layer* here is a module that owns a prunable ``weight``: by default every
``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``. Layers are keyed by the name of
their weight in ``model.named_parameters()`` (``"fc1.weight"``), the key used
by scores and masks everywhere in the package. A weight that
``torch.nn.utils.prune`` has already reparametrised (``weight_orig`` plus
``weight_mask``) keeps its logical key ``"fc1.weight"``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "PRUNABLE_TYPES",
    "find_layers",
    "output_layer_name",
    "unit_count",
    "weight_of",
    "weight_parameter_name",
]

#: Module types whose ``weight`` is scored and pruned by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    # A pattern matches the weight key ("fc1.weight") or the module name ("fc1").
    module_name = name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in patterns)


def find_layers(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> dict[str, nn.Module]:
    """Return ``{weight key: module}`` for the layers to score, in model order.

    ``include`` and ``exclude`` are glob patterns (``fnmatch``) matched against
    the weight key (``"features.0.weight"``) or the module name
    (``"features.0"``). ``include=None`` means every module of
    :data:`PRUNABLE_TYPES`; an explicit ``include`` may also name other modules
    that have a weight of two or more dimensions. Raises :class:`ConfigError`
    when nothing is left to score.
    """
    include = None if include is None else list(include)
    exclude = list(exclude)
    layers: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            continue
        key = f"{module_name}.weight" if module_name else "weight"
        if include is None:
            wanted = isinstance(module, PRUNABLE_TYPES)
        else:
            wanted = _matches(key, include)
        if wanted and not _matches(key, exclude):
            layers[key] = module
    if not layers:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise ConfigError(
            f"{type(model).__name__} has no weights to score (looked for {kinds}"
            f"{'' if include is None else ' matching ' + repr(include)}"
            f"{'' if not exclude else ' not matching ' + repr(exclude)})"
        )
    return layers


def output_layer_name(layers: dict[str, nn.Module]) -> str:
    """The key of the last layer in model order: the network's output layer.

    Neuron granularity never probes or prunes its units (they are the classes).
    """
    return next(reversed(layers))


def weight_parameter_name(module: nn.Module) -> str:
    """``"weight_orig"`` when ``torch.nn.utils.prune`` reparametrised the weight, else ``"weight"``."""
    return "weight_orig" if hasattr(module, "weight_orig") else "weight"


def weight_of(module: nn.Module) -> torch.Tensor:
    """The trainable weight parameter (``weight_orig`` on a pruned module)."""
    return getattr(module, weight_parameter_name(module))


def unit_count(module: nn.Module) -> int:
    """Number of output units: rows of a Linear weight, filters of a Conv."""
    return weight_of(module).shape[0]
