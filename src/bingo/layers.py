"""Which weights BINGO scores, and how to reach them by name.

A *layer* here is a module that owns a prunable weight matrix, as the layer
types of :mod:`bingo.layer_types` define it: by default the ``weight`` of
every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and Hugging Face
``Conv1D`` (GPT-2), and the q/k/v projections of every
``nn.MultiheadAttention`` (``in_proj_weight``, or
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when keys and values
have their own sizes). Layers are keyed by the name of the weight in
``model.named_parameters()`` (``"fc1.weight"``,
``"encoder.layers.0.self_attn.in_proj_weight"``), the key used by scores and
masks everywhere in the package; :func:`parameter_name` is its last part. A
weight that ``torch.nn.utils.prune`` has already reparametrised
(``weight_orig`` plus ``weight_mask``) keeps its logical key.

A *tied* parameter, one tensor that two modules use (GPT-2's ``lm_head`` and
``transformer.wte``), is one weight with one key: the first name
``named_parameters()`` gives it. It is left out by default (pruning it
prunes both uses, and its role in each differs); an ``include`` that names
any of its names chooses it, under that one key.

A *computed* weight, one that ``torch.nn.utils.parametrize`` (orthogonal,
spectral or weight normalisation) or a hook-based
``torch.nn.utils.weight_norm`` rebuilds from other parameters on each read,
is not scored: a fake pass's substitute would be overwritten by the rebuild
(the layer would look harmless to reset) and a mask cannot sit on it. It is
left out by default and reported by :func:`coverage`; an ``include`` that
names it raises :class:`ConfigError` saying how to remove the
parametrisation first. Its weight is never read while looking (reading a
spectral-normalised weight runs a power iteration, which would change
training).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils import prune as torch_prune

from .checks import check_names
from .distributed import unwrap
from .errors import ConfigError
from .layer_types import ATTENTION_PROJECTIONS, LayerType, attention_inputs, layer_type_of

__all__ = [
    "ATTENTION_PROJECTIONS",
    "attention_inputs",
    "bias_name_of",
    "computed_weight",
    "Coverage",
    "GRANULARITIES",
    "PRUNABLE_TYPES",
    "coverage",
    "find_layers",
    "has_units",
    "output_layer_name",
    "parameter_name",
    "tied_weights",
    "unit_axis",
    "unit_count",
    "weight_of",
    "weight_parameter_name",
]

#: The module types Torch-Pruning's dependency graph treats as channel roots (structured pruning).
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)

#: What one score stands for: a single weight, or a whole unit (a row of a
#: Linear weight, a filter of a Conv) with its bias entry.
GRANULARITIES = ("weight", "neuron")


def _matches(name: str, patterns: Iterable[str]) -> bool:
    # A pattern matches the weight key ("fc1.weight") or the module name ("fc1").
    module_name = name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in patterns)


def computed_weight(module: nn.Module, name: str = "weight") -> str | None:
    """What rebuilds ``module``'s weight ``name`` from other parameters on every read, or None for a stored weight.

    Found without reading the weight: ``torch.nn.utils.parametrize``'s
    parametrisations (``"torch.nn.utils.parametrize (_SpectralNorm)"``) and
    forward pre-hooks that own a tensor of that name, such as
    ``torch.nn.utils.weight_norm``'s (``"a forward pre-hook (WeightNorm)"``).
    ``torch.nn.utils.prune``'s own reparametrisation does not count: its
    weight is stored (``weight_orig``) and masked, which bingo handles.
    """
    name = parameter_name(name)
    if parametrize.is_parametrized(module, name):
        return f"torch.nn.utils.parametrize ({', '.join(type(p).__name__ for p in module.parametrizations[name])})"
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) == name and not isinstance(hook, torch_prune.BasePruningMethod):
            return f"a forward pre-hook ({type(hook).__name__})"
    return None


def _weight_names(module: nn.Module, layer_type: LayerType | None) -> list[str]:
    """Names of ``module``'s own weights of two or more dimensions that can be scored (computed ones included)."""
    candidates = layer_type.weights(module) if layer_type is not None else ("weight",)
    names = []
    for name in candidates:
        if computed_weight(module, name) is not None:
            names.append(name)  # not read: reading may change it (spectral normalisation's power iteration)
            continue
        weight = getattr(module, name, None)
        if isinstance(weight, nn.parameter.UninitializedParameter):
            raise ConfigError(
                f"{type(module).__name__}.{name} is not materialised yet (a lazy module): run one forward with an "
                "example batch (model(example)) before searching, scoring or pruning, so that its shape is known"
            )
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
            names.append(name)
    return names


@dataclass(frozen=True)
class _Candidate:
    key: str
    module: nn.Module
    name: str
    layer_type: LayerType | None
    computed: str | None  #: what rebuilds the weight on every read (computed_weight), None for a stored one


def _candidates(model: nn.Module) -> list[list[_Candidate]]:
    """Every scorable weight, grouped by parameter: a tied parameter's names together, first name first."""
    groups: dict[object, list[_Candidate]] = {}
    for module_name, module in model.named_modules():
        layer_type = layer_type_of(module)
        for name in _weight_names(module, layer_type):
            key = f"{module_name}.{name}" if module_name else name
            computed = computed_weight(module, name)
            # A computed weight is a fresh tensor per read, whose id() CPython may reuse: group it by its key alone.
            group = ("computed", key) if computed is not None else id(weight_of(module, name))
            groups.setdefault(group, []).append(_Candidate(key, module, name, layer_type, computed))
    return list(groups.values())


def tied_weights(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """``{key: (other names of the same parameter, ...)}`` for every scorable weight two or more modules share."""
    return {group[0].key: tuple(c.key for c in group[1:]) for group in _candidates(unwrap(model)) if len(group) > 1}


def computed_weight_refusal(key: str, name: str, computed: str, action: str = "score") -> ConfigError:
    """The error for ``action`` (score, prune) on weight ``key`` (attribute ``name``), rebuilt by ``computed``."""
    remove = (f"torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})"
              if computed.startswith("torch.nn.utils.parametrize")
              else "torch.nn.utils.remove_weight_norm(module) or remove_spectral_norm(module)")
    overwritten, leave_out = (("a pruning mask", "leave its key out of the scores") if action == "prune"
                              else ("a fake pass's reset and a pruning mask", "leave the layer out (exclude)"))
    return ConfigError(
        f"cannot {action} {key!r}: its weight is rebuilt on every read by {computed}, which would "
        f"overwrite {overwritten}; remove it first ({remove}) or {leave_out}"
    )


def _refuse_computed(candidate: _Candidate) -> None:
    raise computed_weight_refusal(candidate.key, candidate.name, candidate.computed)


def find_layers(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    granularity: str = "weight",
) -> dict[str, nn.Module]:
    """Return ``{weight key: module}`` for the weights to score, in model order.

    ``include`` and ``exclude`` are glob patterns (``fnmatch``) matched against
    the weight key (``"features.0.weight"``) or the module name
    (``"features.0"``). ``include=None`` means the weights every registered
    layer type scores by default (:mod:`bingo.layer_types`), less tied
    parameters; an explicit ``include`` may also name other modules that
    have a weight of two or more dimensions (an embedding), and a tied
    parameter by any of its names (it is keyed by its first).

    A computed weight (``torch.nn.utils.parametrize``, hook-based
    ``weight_norm``) is left out by default; an ``include`` naming it raises
    :class:`ConfigError`.

    ``granularity="neuron"`` scores units, a row with its bias entry, so it
    takes only weights whose layer type has units (attention's packed q/k/v
    rows are not units; heads are) and leaves out the output layer
    (:func:`output_layer_name`), whose units are the model's outputs. A
    module may own several keys. Raises :class:`ConfigError` when nothing is
    left to score.
    """
    model = unwrap(model)  # a DDP wrapper's keys are its inner module's
    include = check_names("find_layers", "include", include, optional=True)
    exclude = check_names("find_layers", "exclude", exclude)
    output = output_layer_name(model, required=False) if granularity == "neuron" else None
    layers: dict[str, nn.Module] = {}
    for group in _candidates(model):
        first = group[0]
        if include is None:
            wanted = (len(group) == 1 and first.layer_type is not None and first.layer_type.scored_by_default
                      and first.computed is None)
        else:
            wanted = any(_matches(c.key, include) for c in group)
        if not wanted or any(_matches(c.key, exclude) for c in group):
            continue
        if first.computed is not None:
            _refuse_computed(first)
        if granularity == "neuron":
            if output in (c.key for c in group):
                continue
            if first.layer_type is None:
                raise ConfigError(
                    f"neuron granularity cannot score {first.key!r}: no layer type is registered for "
                    f"{type(first.module).__name__}, so which axis holds its units is unknown "
                    "(register one with bingo.layer_types.register_layer_type, or score it per weight)"
                )
            if first.layer_type is not None and not first.layer_type.has_units(first.module, first.name):
                continue
        layers[first.key] = first.module
    if not layers and granularity == "neuron":
        raise ConfigError(
            f"neuron granularity needs a hidden layer; the only layer selected is the output layer {output!r}, "
            "whose units are the model's outputs (attention q/k/v projections are not scored as neurons)"
        )
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no weights to score (looked for the registered layer types: "
            f"{', '.join(_type_names())}"
            f"{'' if include is None else '; matching ' + repr(include)}"
            f"{'' if not exclude else '; not matching ' + repr(exclude)})"
        )
    return layers


def _type_names(outputs: bool = False) -> list[str]:
    """Names of the registered layer types scored by default (or that can be an output layer)."""
    from .layer_types import LAYER_TYPES

    return [t.name for t in LAYER_TYPES if (t.maps_to_outputs if outputs else t.scored_by_default)]


def output_layer_name(model: nn.Module, *, required: bool = True) -> str | None:
    """The key (``"<module>.weight"``) of ``model``'s output layer.

    Assumed to be the last module in ``model.named_modules()`` order whose
    layer type can map to outputs (a Linear, a conv, a ``Conv1D``; not an
    embedding or an attention). That is registration order, not the
    order of ``forward``: a model that registers its head before its body
    must leave the head out of the scored layers by hand (``exclude``).

    Found from the whole model, never from the layers a caller included:
    neuron granularity never probes or prunes the output layer's units (they
    are the model's outputs), and a selection that does not include the
    output layer simply has nothing dropped. Raises :class:`ConfigError` when
    ``model`` has no such layer (or returns None with ``required=False``).
    """
    output = None
    for module_name, module in unwrap(model).named_modules():
        layer_type = layer_type_of(module)
        names = _weight_names(module, layer_type) if layer_type is not None and layer_type.maps_to_outputs else []
        if names:
            output = f"{module_name}.{names[0]}" if module_name else names[0]
    if output is None and required:
        raise ConfigError(f"cannot tell the output layer of {type(model).__name__}: it has no layer of a type that "
                          f"maps inputs to outputs ({', '.join(_type_names(outputs=True))})")
    return output


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


def unit_axis(module: nn.Module, key: str = "weight") -> int:
    """The axis of weight ``key`` that indexes units (its layer type's; 0 for a module no type handles)."""
    layer_type = layer_type_of(module)
    if layer_type is None:
        return 0
    axis = layer_type.unit_axis(module, parameter_name(key))
    weight = getattr(module, parameter_name(key), None)
    dims = weight.dim() if isinstance(weight, torch.Tensor) else None
    if isinstance(axis, bool) or not isinstance(axis, int) or (dims is not None and not 0 <= axis < dims):
        raise ConfigError(f"layer type {layer_type.name!r}: unit_axis({type(module).__name__}, {parameter_name(key)!r}) "
                          f"must be an axis of the weight, 0 to {dims - 1 if dims else 0} (shape "
                          f"{tuple(weight.shape) if dims is not None else '?'}), got {axis!r}")
    return axis


def has_units(module: nn.Module, key: str = "weight") -> bool:
    """Whether weight ``key`` has units neuron granularity may score (not an attention's packed q/k/v rows)."""
    layer_type = layer_type_of(module)
    return True if layer_type is None else layer_type.has_units(module, parameter_name(key))


def bias_name_of(module: nn.Module, key: str = "weight") -> str | None:
    """The bias whose entries go with weight ``key``'s units, or None."""
    layer_type = layer_type_of(module)
    if layer_type is None:
        return "bias" if isinstance(getattr(module, "bias", None), torch.Tensor) else None
    return layer_type.bias_name(module, parameter_name(key))


def unit_count(module: nn.Module, key: str = "weight") -> int:
    """Number of output units: rows of a Linear weight, filters of a conv, columns of a ``Conv1D`` weight."""
    return weight_of(module, key).shape[unit_axis(module, key)]


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


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _computed_kind(module: nn.Module, name: str) -> str | None:
    """The coverage kind of a parameter a computed weight is rebuilt from, or None."""
    if isinstance(module, parametrize.ParametrizationList):
        return "computed weights (torch.nn.utils.parametrize)"
    for hook in module._forward_pre_hooks.values():
        owner = getattr(hook, "name", None)
        if (isinstance(owner, str) and not isinstance(hook, torch_prune.BasePruningMethod)
                and (name == owner or name.startswith(owner + "_"))):
            return f"computed weights ({type(hook).__name__})"
    return None


def _kind(module: nn.Module, name: str) -> str:
    computed = _computed_kind(module, name)
    if computed is not None:
        return computed
    layer_type = layer_type_of(module)
    biases = {layer_type.bias_name(module, w) for w in layer_type.weights(module)} if layer_type is not None else set()
    if name in ("bias", "in_proj_bias") or name.startswith("bias_") or name in biases:
        return "biases"
    if layer_type is not None and layer_type.takes_indices:  # looked-up rows (Embedding, EmbeddingBag, one's own)
        return "embeddings"
    if isinstance(module, nn.MultiheadAttention) and name in ATTENTION_PROJECTIONS:
        return "attention q/k/v projections (MultiheadAttention.in_proj_weight)"
    if isinstance(module, _NORMS):
        return "normalisation"
    layer_type = layer_type_of(module)
    if layer_type is not None and name in layer_type.weights(module):
        return f"{layer_type.name} weights left out"
    return f"{type(module).__name__}.{name}"


def coverage(model: nn.Module, keys: Iterable[str]) -> Coverage:
    """Parameters in the weights named by ``keys`` vs all of ``model``'s, and what kinds the rest are."""
    keys = set(check_names("coverage", "keys", keys))
    scored = total = tensors = 0
    unscored: dict[str, int] = {}
    tied = tied_weights(model)
    seen: set[int] = set()
    for module_name, module in unwrap(model).named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:  # a tied parameter counts once
                continue
            seen.add(id(parameter))
            logical = name.removesuffix("_orig")  # a pruned weight keeps its logical name
            key = f"{module_name}.{logical}" if module_name else logical
            total += parameter.numel()
            if key in keys:
                scored += parameter.numel()
                tensors += 1
            else:
                kind = f"tied weights ({' = '.join((key, *tied[key]))})" if key in tied else _kind(module, logical)
                unscored[kind] = unscored.get(kind, 0) + parameter.numel()
    return Coverage(tensors, scored, total, dict(sorted(unscored.items(), key=lambda item: -item[1])))
