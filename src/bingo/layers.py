"""Which weights BINGO scores, and how to reach them by name.

A *layer* here is a module that owns a prunable weight matrix: by default the
``weight`` of every ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``, and the
q/k/v projections of every ``nn.MultiheadAttention`` (``in_proj_weight``, or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when keys and values
have their own sizes: bare parameters that attention uses without calling a
layer). Layers are keyed by the name of the weight in
``model.named_parameters()`` (``"fc1.weight"``,
``"encoder.layers.0.self_attn.in_proj_weight"``), the key used by scores and
masks everywhere in the package; :func:`parameter_name` is its last part. A
weight that ``torch.nn.utils.prune`` has already reparametrised
(``weight_orig`` plus ``weight_mask``) keeps its logical key.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import unwrap
from .errors import ConfigError

__all__ = [
    "ATTENTION_PROJECTIONS",
    "attention_inputs",
    "Coverage",
    "GRANULARITIES",
    "PRUNABLE_TYPES",
    "coverage",
    "find_layers",
    "output_layer_name",
    "parameter_name",
    "unit_count",
    "weight_of",
    "weight_parameter_name",
]

#: Module types whose ``weight`` is scored and pruned by default.
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

#: The weights of ``nn.MultiheadAttention`` scored by default (whichever it has).
ATTENTION_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

#: What one score stands for: a single weight, or a whole unit (a row of a
#: Linear weight, a filter of a Conv) with its bias entry.
GRANULARITIES = ("weight", "neuron")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    # A pattern matches the weight key ("fc1.weight") or the module name ("fc1").
    module_name = name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in patterns)


def _weight_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own weights of two or more dimensions that can be scored."""
    names = []
    for name in ("weight", *ATTENTION_PROJECTIONS):
        weight = getattr(module, name, None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            names.append(name)
    return names


def _default_layer(module: nn.Module, name: str) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return name in ATTENTION_PROJECTIONS
    return isinstance(module, PRUNABLE_TYPES) and name == "weight"


def find_layers(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    granularity: str = "weight",
) -> dict[str, nn.Module]:
    """Return ``{weight key: module}`` for the weights to score, in model order.

    ``include`` and ``exclude`` are glob patterns (``fnmatch``) matched against
    the weight key (``"features.0.weight"``) or the module name
    (``"features.0"``). ``include=None`` means the ``weight`` of every module
    of :data:`PRUNABLE_TYPES` and the :data:`ATTENTION_PROJECTIONS` of every
    ``nn.MultiheadAttention``; an explicit ``include`` may also name other
    modules that have a weight of two or more dimensions (an embedding).

    ``granularity="neuron"`` scores units, a row with its bias entry, so it
    takes only weights named ``weight`` (attention's packed q/k/v rows are
    not units; heads are) and leaves out the output layer
    (:func:`output_layer_name`), whose units are the model's outputs. A
    module may own several keys. Raises :class:`ConfigError` when nothing is
    left to score.
    """
    model = unwrap(model)  # a DDP wrapper's keys are its inner module's
    include = None if include is None else list(include)
    exclude = list(exclude)
    layers: dict[str, nn.Module] = {}
    for module_name, module in model.named_modules():
        for name in _weight_names(module):
            key = f"{module_name}.{name}" if module_name else name
            if include is None:
                wanted = _default_layer(module, name)
            else:
                wanted = _matches(key, include)
            if wanted and not _matches(key, exclude):
                layers[key] = module
    if granularity == "neuron":
        output = output_layer_name(model)
        layers = {key: module for key, module in layers.items() if parameter_name(key) == "weight" and key != output}
        if not layers:
            raise ConfigError(
                f"neuron granularity needs a hidden layer; the only layer selected is the output layer {output!r}, "
                "whose units are the model's outputs (attention q/k/v projections are not scored as neurons)"
            )
    if not layers:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise ConfigError(
            f"{type(model).__name__} has no weights to score (looked for {kinds}, MultiheadAttention"
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
    for module_name, module in unwrap(model).named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            output = f"{module_name}.weight" if module_name else "weight"
    if output is None:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_TYPES)
        raise ConfigError(f"cannot tell the output layer of {type(model).__name__}: it has no {kinds}")
    return output


def attention_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(query, key, value)`` of an ``nn.MultiheadAttention`` call, from a forward hook's ``args`` and ``kwargs``."""
    return tuple(args[i] if len(args) > i else kwargs[name] for i, name in enumerate(("query", "key", "value")))


def parameter_name(key: str) -> str:
    """The parameter a weight key names: ``"weight"`` of ``"fc1.weight"``, ``"in_proj_weight"`` of ``"attn.in_proj_weight"``."""
    return key.rpartition(".")[2]


def weight_parameter_name(module: nn.Module, key: str = "weight") -> str:
    """The trainable parameter behind weight ``key`` (a key or a bare name) of ``module``.

    ``"<name>_orig"`` when ``torch.nn.utils.prune`` reparametrised it, else ``"<name>"``.
    """
    name = parameter_name(key)
    return f"{name}_orig" if hasattr(module, f"{name}_orig") else name


def weight_of(module: nn.Module, key: str = "weight") -> torch.Tensor:
    """The trainable weight parameter ``key`` names on ``module`` (``weight_orig`` on a pruned module)."""
    return getattr(module, weight_parameter_name(module, key))


def unit_count(module: nn.Module, key: str = "weight") -> int:
    """Number of output units: rows of a Linear weight, filters of a Conv."""
    return weight_of(module, key).shape[0]


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
    for module_name, module in unwrap(model).named_modules():
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
