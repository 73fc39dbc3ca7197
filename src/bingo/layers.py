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
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

__all__ = [
    "Coverage",
    "GRANULARITIES",
    "PRUNABLE_TYPES",
    "coverage",
    "find_layers",
    "output_layer_name",
    "unit_count",
    "weight_of",
    "weight_parameter_name",
]

#: Module types whose ``weight`` is scored and pruned by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

#: What one score stands for: a single weight, or a whole unit (a row of a
#: Linear weight, a filter of a Conv) with its bias entry.
GRANULARITIES = ("weight", "neuron")


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


def output_layer_name(model: nn.Module) -> str:
    """The key (``"<module>.weight"``) of ``model``'s output layer.

    Assumed to be the last module of :data:`PRUNABLE_TYPES` in
    ``model.named_modules()`` order, i.e. the last layer that
    :func:`find_layers` finds by default. That is registration order, not the
    order of ``forward``: a model that registers its head before its body
    must leave the head out of the scored layers by hand (``exclude``).

    Found from the whole model, never from the layers a caller included:
    neuron granularity never probes or prunes the output layer's units (they
    are the model's outputs), and a selection that does not include the
    output layer simply has nothing dropped. Raises :class:`ConfigError` when
    ``model`` has no such layer.
    """
    output = None
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            output = f"{module_name}.weight" if module_name else "weight"
    if output is None:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise ConfigError(f"cannot tell the output layer of {type(model).__name__}: it has no {kinds}")
    return output


def weight_parameter_name(module: nn.Module) -> str:
    """``"weight_orig"`` when ``torch.nn.utils.prune`` reparametrised the weight, else ``"weight"``."""
    return "weight_orig" if hasattr(module, "weight_orig") else "weight"


def weight_of(module: nn.Module) -> torch.Tensor:
    """The trainable weight parameter (``weight_orig`` on a pruned module)."""
    return getattr(module, weight_parameter_name(module))


def unit_count(module: nn.Module) -> int:
    """Number of output units: rows of a Linear weight, filters of a Conv."""
    return weight_of(module).shape[0]


@dataclass(frozen=True)
class Coverage:
    """How much of a model the scored weights are: what a search can rank, and so what pruning can remove."""

    tensors: int  #: scored weight tensors
    scored: int  #: parameters in them
    total: int  #: all parameters of the model
    unscored: dict[str, int]  #: kind of parameter -> how many parameters of that kind are not scored

    def __str__(self) -> str:
        share = self.scored / self.total if self.total else 0.0
        rest = ", ".join(f"{kind} {count:,}" for kind, count in self.unscored.items())
        return (f"scoring {self.tensors} weight tensor{'s' if self.tensors != 1 else ''}: {self.scored:,} of {self.total:,} "
                f"parameters ({share:.1%}); not scored: {rest or 'nothing'}")


_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _kind(module: nn.Module, name: str) -> str:
    if name in ("bias", "in_proj_bias") or name.startswith("bias_"):
        return "biases"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embeddings"
    if isinstance(module, nn.MultiheadAttention) and name in _PROJECTIONS:
        return "attention q/k/v projections (MultiheadAttention.in_proj_weight)"
    if isinstance(module, _NORMS):
        return "normalisation"
    if isinstance(module, PRUNABLE_TYPES) and name == "weight":
        return f"{type(module).__name__} weights left out"
    return f"{type(module).__name__}.{name}"


def coverage(model: nn.Module, keys: Iterable[str]) -> Coverage:
    """Parameters in the weights named by ``keys`` vs all of ``model``'s, and what kinds the rest are."""
    keys = set(keys)
    scored = total = tensors = 0
    unscored: dict[str, int] = {}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            logical = name.removesuffix("_orig")  # a pruned weight keeps its logical name
            key = f"{module_name}.{logical}" if module_name else logical
            total += parameter.numel()
            if key in keys:
                scored += parameter.numel()
                tensors += 1
            else:
                kind = _kind(module, logical)
                unscored[kind] = unscored.get(kind, 0) + parameter.numel()
    return Coverage(tensors, scored, total, dict(sorted(unscored.items(), key=lambda item: -item[1])))
