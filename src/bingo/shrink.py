"""Application, the physical kind: remove pruned units so the network really is smaller.

Masks (``torch.nn.utils.prune``) keep every tensor at full size: a model with
half its units pruned is exactly as large and as slow as the dense one.
:func:`shrink` rebuilds the network without those units: smaller layers
(every type :mod:`bingo.layer_types` can rebuild: ``nn.Linear``,
``nn.Conv1d``, ``nn.Conv2d``, GPT-2's ``Conv1D``), the next layer's input
cut to match, ``BatchNorm`` parameters and running statistics sliced with them.

Which units go. A *dead* unit is a hidden unit whose incoming weights are all
exactly zero (after the masks are applied): what :func:`bingo.prune` leaves
with neuron-granularity scores, but also a unit whose every weight was pruned
one by one, or a plain model whose rows happen to be zero. A dead unit outputs
a constant, its bias (0 when the bias was masked too). That constant flows
through what follows the layer and reaches the next layer as another constant
``c``: ``act(0) = 0`` for ReLU, but ``0.5`` for a sigmoid, and after a
BatchNorm in eval mode ``beta - gamma * mean / sqrt(var + eps)``. Removing the
unit is exact only if ``c`` is accounted for:

- next layer ``nn.Linear``: ``bias += W[:, removed] @ c`` (after a Flatten of a
  conv output, each channel is a block of ``H * W`` columns, summed first);
- next layer a conv without zero padding (``padding=0``, or ``padding_mode``
  reflect / replicate / circular, which pad a constant with itself):
  ``bias += W[:, removed].sum(kernel) @ c``;
- next layer a conv *with zero padding*: a constant channel is not constant
  once padded (it is ``c`` inside, 0 at the border), so no bias can replace
  it. Every such channel contributes ``c_j * (W_j * valid)``, with the same
  border pattern ``valid`` for all of them, so all of them together are
  exactly one channel: the *carrier*. The dead channel with the largest
  ``|c|`` is kept (its zero filter, bias and BatchNorm entry stay), and its
  column of the next conv becomes ``sum_j (c_j / c_carrier) W[:, j]``; the
  others are removed. So at most one dead channel per layer stays, and the
  result is exact at the borders too.
- a step between the layers that does not keep a constant constant (an
  ``AvgPool`` with zero padding counted in the average, or a divisor
  override): dead units whose constant is nonzero there are kept, with a
  warning; zeros stay zeros and are removed.

Output units are never removed (the last layer's units are the model's
outputs, whatever their weights), and a layer keeps at least one unit.

Exactness is for inference: BatchNorm constants come from the running
statistics, and dropout is the identity. The shrunk model's eval-mode outputs
equal the masked model's to float rounding (folded biases are computed in
float64).

What can be shrunk. The model's ``forward`` is followed with ``torch.fx``
(``symbolic_trace``; for Python control flow on shapes, such as ``if
x.dim() == 3``, pass ``input_shape`` and it is traced on meta tensors). The
path from input to output must be a single chain. Between two layers only
these may appear: BatchNorm1d/2d (with running statistics), parameter-free
activations (modules, ``torch.relu``/``F.relu``-style functions and
``x.relu()``-style methods), dropout, max / average / adaptive pooling, and a
flatten (``nn.Flatten()``, ``torch.flatten(x, 1)``, ``x.flatten(1)``,
``x.view(x.size(0), -1)``). Before the first and after the last layer any
single-input operation is fine, since the input and the output keep their
sizes. Anything else (residual adds, concatenations, a layer or BatchNorm used
twice, grouped convs, an unknown op between layers) raises a
:class:`~bingo.errors.ConfigError` that names the node (and, where branches
join, the layers whose outputs meet there): never a silently wrong model.

The result is a deep copy of the model (same class, same ``forward``) whose
layers are replaced by plain, smaller modules: no ``weight_orig`` / mask, no
hooks. The input model is not touched.
"""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .checks import check_model
from .errors import BingoError, ConfigError
from .distributed import unwrap
from .inputs import ExampleInputs, as_shape, check_runs, example_inputs
from .layer_types import layer_type_of, unit_matrix
from .layers import attention_inputs, unit_axis
from .masks import masked_names, masked_value, permanent_copy

__all__ = ["count_flops", "count_parameters", "is_shrunk", "mark_shrunk", "shrink"]

#: Attribute set to True on a network from which :func:`shrink`, :func:`bingo.shrink_coupled` or
#: :func:`bingo.shrink_heads` removed units or heads; it travels with the module (deepcopy, pickling).
SHRUNK_ATTRIBUTE = "bingo_shrunk"


def mark_shrunk(model: nn.Module) -> None:
    """Record on ``model`` that units were physically removed from it (see :func:`is_shrunk`)."""
    setattr(model, SHRUNK_ATTRIBUTE, True)


def is_shrunk(model: nn.Module) -> bool:
    """True if ``model`` (or the model it was copied from) lost units or heads to a bingo shrink: it is smaller than it was built."""
    return bool(getattr(model, SHRUNK_ATTRIBUTE, False))

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d)
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.Identity,
)
_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
#: Pools that map a spatially constant channel to the same constant (max pools pad with -inf).
_CONSTANT_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
)
_AVG_POOLS: tuple[type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d)
_POINTWISE_FUNCTIONS = {
    torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.mish,
    F.leaky_relu, F.elu, F.selu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus,
}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout, F.feature_alpha_dropout}
_CONSTANT_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
}


# --------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------


def count_parameters(model: nn.Module, *, nonzero: bool = False) -> int:
    """Number of parameter entries of ``model``.

    ``nonzero=False`` counts what is stored: a masked weight counts at full
    size (its ``weight_orig``). ``nonzero=True`` counts the entries that are
    nonzero in the weights the forward pass uses (``weight_orig * mask`` on a
    masked module), i.e. what a sparse format would have to keep.
    """
    check_model("count_parameters", model, meta=False)  # a meta model has shapes: its stored count is known
    total = 0
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not nonzero:
                total += param.numel()
                continue
            if name.endswith("_orig") and hasattr(module, name[: -len("_orig")] + "_mask"):
                param = masked_value(module, name[: -len("_orig")])
            total += int(torch.count_nonzero(param.detach()))
    return total


@torch.no_grad()
def _maps_inputs(module: nn.Module) -> bool:
    """A layer that computes its outputs from its inputs with its ``weight`` (a Linear, a conv, a ``Conv1D``; not a lookup)."""
    layer_type = layer_type_of(module)
    return layer_type is not None and layer_type.maps_to_outputs and isinstance(getattr(module, "weight", None), torch.Tensor)


def _shrinkable(module: nn.Module) -> bool:
    """A layer whose type can rebuild it with fewer units and inputs (:meth:`bingo.layer_types.LayerType.resized`)."""
    layer_type = layer_type_of(module)
    return layer_type is not None and layer_type.shrinkable


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one sample through every Linear and Conv layer.

    ``input_shape`` is the shape of one sample (no batch dimension). A Linear
    producing ``m`` outputs from ``n`` inputs costs ``m * n`` MACs per output
    row; a conv costs ``out.numel() * in_channels / groups * prod(kernel)``.
    An ``nn.MultiheadAttention`` counts its projections, which it computes
    without calling a layer: q from each query token, k and v from each key
    and value token, and ``out_proj`` per query token, ``embed_dim`` outputs
    each (its ``out_proj`` is not counted twice). The attention products
    themselves (``q kᵀ``, ``· v``) are not counted, here or in
    :class:`bingo.PrunedMultiheadAttention`, whose projections are layers.
    Bias additions, normalisation, activations and pooling are not counted,
    and masked weights count like any other (the dense kernels compute them).
    Runs one forward pass on zeros in eval mode; train/eval flags are restored.
    """
    check_model("count_flops", model)
    shape = as_shape(input_shape, "count_flops")  # a one-line error for what is not one sample's shape
    macs = 0
    inside_attention = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        if id(module) in inside_attention:
            return
        weight = module.weight  # every output entry costs one MAC per weight of its unit (fan-in)
        macs += output.numel() * (weight.numel() // weight.shape[unit_axis(module)])

    def attention_hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: object) -> None:
        nonlocal macs
        query, key, value = (t.numel() // t.shape[-1] for t in attention_inputs(args, kwargs))  # tokens of each
        e = module.embed_dim
        macs += query * e * e + key * e * module.kdim + value * e * module.vdim + query * e * e

    modes = {m: m.training for m in model.modules()}
    handles = [m.register_forward_hook(hook) for m in model.modules() if _maps_inputs(m)]
    handles += [m.register_forward_hook(attention_hook, with_kwargs=True) for m in model.modules()
                if isinstance(m, nn.MultiheadAttention)]
    try:
        model.eval()
        param = next(iter(model.parameters()), None)
        factory = {} if param is None else {"device": param.device, "dtype": param.dtype}
        try:
            with torch.no_grad():
                model(torch.zeros((1, *shape), **factory))
        except Exception:  # the shape does not fit: the same one-line error as shrink's
            check_runs(model, example_inputs(model, shape, "count_flops", check=False), "count_flops")
            raise
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    return int(macs)


# --------------------------------------------------------------------------
# following the graph
# --------------------------------------------------------------------------


@dataclass
class _Step:
    """One operation on the model's input-to-output chain."""

    node: fx.Node
    kind: str  # layer | norm | pointwise | dropout | pool | flatten | other
    module_name: str | None = None
    module: nn.Module | None = None
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None  # pointwise: constants -> constants
    keeps_constant: bool = True  # pool: a constant channel stays constant

    @property
    def label(self) -> str:
        if self.module is not None:
            return f"{self.module_name!r} ({type(self.module).__name__})"
        return f"node {self.node.name!r} ({_target_name(self.node)}){_inside(self.node)}"


def _target_name(node: fx.Node) -> str:
    target = node.target
    if node.op == "call_method":
        return f"method .{target}()"
    name = getattr(target, "__name__", str(target))
    module = getattr(target, "__module__", None)
    return f"{module}.{name}" if module and module not in ("builtins", "_operator") else name


def _inside(node: fx.Node) -> str:
    """`` in 'block' (Block)`` when the node comes from a submodule's forward, else ``""``."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, kind = list(stack.values())[-1]
    return f" in {path!r} ({getattr(kind, '__name__', kind)})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_shape_query(node: fx.Node) -> bool:
    """True for nodes that read a tensor's shape (``x.size(0)``, ``x.shape[0]``, ``x.dim()``), not its values."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim"):
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "_operator":
        inputs = node.all_input_nodes
        return bool(inputs) and all(_is_shape_query(n) for n in inputs)
    return False


class _LayerTracer(fx.Tracer):
    """torch.fx's tracer, keeping every layer a layer type can shrink as one call (not only ``torch.nn``'s own)."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return _shrinkable(module) or super().is_leaf_module(module, qualified_name)


def _trace(model: nn.Module, example: ExampleInputs | None) -> fx.Graph:
    try:
        return _LayerTracer().trace(model)
    except Exception as exc:  # TraceError on control flow, or any error inside forward
        if example is None:
            raise ConfigError(
                f"cannot follow {type(model).__name__}.forward with torch.fx ({_first_line(exc)}); "
                "pass input_shape=(per-sample shape) so shape-dependent control flow can be resolved"
            ) from None
    from torch.fx.experimental import meta_tracer

    meta = copy.deepcopy(model).to("meta")
    meta_args = {name: value.to("meta") for name, value in example.named(model).items() if isinstance(value, torch.Tensor)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return meta_tracer.symbolic_trace(meta, meta_args=meta_args).graph
    except Exception as exc:
        raise ConfigError(
            f"cannot follow {type(model).__name__}.forward with torch.fx, even on meta tensors of {example.describe()} "
            f"({_first_line(exc)})"
        ) from None


def _sources(node: fx.Node, model: nn.Module) -> list[fx.Node]:
    """The nearest layers (submodules with parameters) or model input upstream of each of ``node``'s inputs, in graph order."""
    found: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        here = stack.pop()
        if here in seen or here.op == "get_attr" or _is_shape_query(here):
            continue
        seen.add(here)
        # Past parameter-free modules (nn.ReLU, nn.Dropout): the layer before them is the one to name.
        if here.op == "placeholder" or here.op == "call_module" and any(True for _ in model.get_submodule(here.target).parameters()):
            found.add(here)
        else:
            stack.extend(here.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _meeting(node: fx.Node, inputs: list[fx.Node], model: nn.Module) -> str:
    """``the outputs of 'fc1' and 'fc2' meet at node 'add' (add)``: what joins at ``node``, for refusals."""
    where = f"node {node.name!r} ({_target_name(node)}){_inside(node)}"
    sources = _sources(node, model)
    layers = [repr(n.target) for n in sources if n.op == "call_module"]
    if not sources:
        return f"{where} takes {len(inputs)} tensor inputs"
    if len(sources) == 1:  # the branches split after one layer (or at the input)
        start = f"the output of {layers[0]}" if layers else "the input"
        return f"{where} takes {len(inputs)} tensor inputs, all branching from {start}"
    parts = ["the input"] if len(layers) < len(sources) else []
    if layers:
        listed = layers[0] if len(layers) == 1 else f"{', '.join(layers[:-1])} and {layers[-1]}"
        parts.append(f"the output{'s' if len(layers) > 1 else ''} of {listed}")
    return f"{' and '.join(parts)} meet at {where}"


def _chain(graph: fx.Graph, model: nn.Module) -> list[fx.Node]:
    """The nodes from the input to the output, checked to form a single path."""
    name = type(model).__name__
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ConfigError(f"cannot shrink {name}: forward takes {len(placeholders)} inputs; shrink needs exactly one")
    output = next(n for n in graph.nodes if n.op == "output")
    node = output.args[0]
    if not isinstance(node, fx.Node):
        raise ConfigError(f"cannot shrink {name}: forward returns a {type(node).__name__}; shrink needs a single tensor")
    chain: list[fx.Node] = []
    while node.op != "placeholder":
        if node.op == "get_attr":
            raise ConfigError(f"cannot shrink {name}: the output depends on attribute {node.target!r}, not on the input alone")
        inputs = [n for n in node.all_input_nodes if not _is_shape_query(n) and n.op != "get_attr"]
        if len(inputs) != 1:
            raise ConfigError(
                f"cannot shrink {name}: {_meeting(node, inputs, model)}; "
                "shrink follows a single chain of layers (no residual adds, concatenations or branches)"
            )
        chain.append(node)
        node = inputs[0]
    chain.reverse()
    path = [placeholders[0], *chain]
    for here, after in zip(path, [*chain, output]):
        others = [u for u in here.users if u is not after and not _is_shape_query(u)]
        if others:
            users = ", ".join(repr(u.name) for u in [after, *others])
            raise ConfigError(
                f"cannot shrink {name}: the output of {here.name!r} feeds {len(others) + 1} operations ({users}); "
                "shrink follows a single chain of layers (no residual or skip connections)"
            )
    return chain


def _flatten_start(node: fx.Node) -> bool:
    """True if ``node`` is a flatten from dim 1 to the end."""
    if node.op == "call_function" and node.target is torch.flatten or node.op == "call_method" and node.target == "flatten":
        bound = {"start_dim": 0, "end_dim": -1}
        for key, value in zip(("start_dim", "end_dim"), node.args[1:]):
            bound[key] = value
        bound.update(node.kwargs)
        return bound["start_dim"] == 1 and bound["end_dim"] == -1
    if node.op == "call_method" and node.target in ("view", "reshape") and len(node.args) == 3 and not node.kwargs:
        source, first, rest = node.args
        if rest != -1 or not isinstance(first, fx.Node):
            return False
        if first.op == "call_method" and first.target == "size" and first.args[:1] == (source,):
            return first.args[1:] == (0,) or first.kwargs.get("dim") == 0
        if first.op == "call_function" and first.target is operator.getitem and first.args[1] == 0:
            shape = first.args[0]
            return (isinstance(shape, fx.Node) and shape.op == "call_function" and shape.target is getattr
                    and shape.args == (source, "shape"))
    return False


def _function_apply(node: fx.Node) -> Callable[[torch.Tensor], torch.Tensor]:
    rest, kwargs = node.args[1:], dict(node.kwargs)
    if any(isinstance(a, fx.Node) for a in (*rest, *kwargs.values())):
        raise ConfigError(f"node {node.name!r} ({_target_name(node)}) takes tensor-valued arguments; shrink cannot fold through it")
    if node.op == "call_method":
        return lambda c: getattr(c, node.target)(*rest, **kwargs)
    return lambda c: node.target(c, *rest, **kwargs)


def _warn_unshrinkable(model: nn.Module) -> None:
    """Warn about masked weights with whole units pruned whose layer type cannot be rebuilt smaller: they stay as they are."""
    kept = []
    for module_name, module in model.named_modules():
        layer_type = layer_type_of(module)
        if layer_type is None or layer_type.shrinkable:
            continue
        for name in masked_names(module):
            mask = getattr(module, f"{name}_mask")
            if mask.dim() >= 2 and not bool(unit_matrix(mask, unit_axis(module, name)).any(dim=1).all()):
                kept.append(f"{module_name}.{name}" if module_name else name)
    if kept:
        warnings.warn(f"shrink: {', '.join(map(repr, kept))} {'has' if len(kept) == 1 else 'have'} whole units pruned, "
                      "but no layer type rebuilds such a layer smaller (LayerType.shrinkable is False): it stays its "
                      "size, masked", stacklevel=3)


def _classify(node: fx.Node, model: nn.Module) -> _Step:
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        kind = type(module)
        if _shrinkable(module):
            return _Step(node, "layer", node.target, module)
        if kind in _NORM_TYPES:
            return _Step(node, "norm", node.target, module)
        if kind in _POINTWISE_MODULES:
            return _Step(node, "pointwise", node.target, module, apply=lambda c, m=module: m(c.view(1, -1)).view(-1))
        if kind in _DROPOUT_MODULES:
            return _Step(node, "dropout", node.target, module)
        if kind in _CONSTANT_POOLS:
            return _Step(node, "pool", node.target, module)
        if kind in _AVG_POOLS:
            padded = any(p > 0 for p in _pair(module.padding)) and module.count_include_pad
            override = getattr(module, "divisor_override", None) is not None
            return _Step(node, "pool", node.target, module, keeps_constant=not (padded or override))
        if kind is nn.Flatten:
            return _Step(node, "flatten" if (module.start_dim, module.end_dim) == (1, -1) else "other", node.target, module)
        return _Step(node, "other", node.target, module)
    if node.op == "call_function" and node.target in _POINTWISE_FUNCTIONS:
        return _Step(node, "pointwise", apply=_function_apply(node))
    if node.op == "call_method" and node.target in _POINTWISE_METHODS:
        return _Step(node, "pointwise", apply=_function_apply(node))
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        return _Step(node, "dropout")
    if node.op == "call_function" and node.target in _CONSTANT_POOL_FUNCTIONS:
        return _Step(node, "pool")
    if _flatten_start(node):
        return _Step(node, "flatten")
    return _Step(node, "other")


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _zero_pads(conv: nn.Module) -> bool:
    """True if ``conv`` pads its input with zeros (so a constant channel is not constant after padding)."""
    if conv.padding_mode != "zeros":
        return False
    if conv.padding == "valid":
        return False
    if conv.padding == "same":
        return any(d * (k - 1) > 0 for k, d in zip(conv.kernel_size, conv.dilation))
    return any(p > 0 for p in _pair(conv.padding))


# --------------------------------------------------------------------------
# shrink
# --------------------------------------------------------------------------


@dataclass
class _Layer:
    """One layer's tensors and what survives of it, in the original indexing."""

    name: str
    module: nn.Module
    weight: torch.Tensor  # units first: (out, in) for an affine map, (out, in, *kernel) for a conv
    bias: torch.Tensor | None
    dead: torch.Tensor  # (out,) bool: incoming weights all zero
    keep_out: torch.Tensor  # (out,) bool
    keep_in: torch.Tensor  # (in,) bool: input features (Linear) or channels (conv)
    bias_shift: torch.Tensor  # (out,) float64, added to the bias
    norms: list[_Step] = field(default_factory=list)  # BatchNorms between this layer and the next


def _bn_eval(norm: nn.Module, c: torch.Tensor, label: str) -> torch.Tensor:
    if norm.running_mean is None or norm.running_var is None:
        raise ConfigError(
            f"cannot shrink through {label}: it has no running statistics (track_running_stats=False), "
            "so its eval-mode output is not a fixed function of the unit"
        )
    mean, var = norm.running_mean.double().cpu(), norm.running_var.double().cpu()
    c = (c - mean) / torch.sqrt(var + norm.eps)
    if norm.weight is not None:
        c = c * norm.weight.detach().double().cpu() + norm.bias.detach().double().cpu()
    return c


def _fold_pair(producer: _Layer, consumer: _Layer, between: list[_Step], model_name: str) -> None:
    """Decide which dead units of ``producer`` go, and fold their constant outputs into ``consumer``."""
    p, q = producer.module, consumer.module
    p_conv = producer.weight.dim() > 2  # a conv's filter bank; an affine map is (out, in)
    units = producer.weight.shape[0]
    where = f"between {producer.name!r} and {consumer.name!r}"
    c = producer.bias.detach().double().clone() if producer.bias is not None else torch.zeros(units, dtype=torch.float64)
    c = c.to("cpu")
    foldable = torch.ones(units, dtype=torch.bool)
    flattened = False
    uneven: _Step | None = None
    for step in between:
        if step.kind == "norm":
            if flattened or step.module.num_features != units:
                raise ConfigError(
                    f"cannot shrink {model_name}: {step.label} {where} normalises {step.module.num_features} features, "
                    f"not the {units} units of {producer.name!r}"
                )
            if step.module.running_mean is not None or producer.dead.any():
                c = _bn_eval(step.module, c, step.label)  # without running stats: refused only if needed
            producer.norms.append(step)
        elif step.kind == "pointwise":
            with torch.no_grad():
                c = step.apply(c.clone()).double().cpu()
        elif step.kind == "dropout":
            pass  # the identity in eval mode
        elif step.kind == "pool":
            if not p_conv or flattened:
                raise ConfigError(
                    f"cannot shrink {model_name}: {step.label} {where} pools over "
                    f"{'features' if flattened else 'the units of a Linear layer'}, not over space"
                )
            if not step.keeps_constant:
                uneven = uneven or step
                foldable &= c == 0
        elif step.kind == "flatten":
            flattened = True
        else:
            raise ConfigError(
                f"cannot shrink {model_name}: {step.label} {where} is not supported; between two layers shrink "
                "follows BatchNorm, parameter-free activations, dropout, pooling and flatten only"
            )

    q_affine = consumer.weight.dim() == 2
    if q_affine:
        if p_conv and not flattened:
            raise ConfigError(f"cannot shrink {model_name}: Linear {consumer.name!r} takes the output of conv {producer.name!r} without a flatten")
        block, rest = divmod(consumer.weight.shape[1], units)
        if rest or (not p_conv and block != 1):
            raise ConfigError(
                f"cannot shrink {model_name}: {consumer.name!r} takes {consumer.weight.shape[1]} features, which do not split "
                f"into the {units} units of {producer.name!r}"
            )
        columns = consumer.weight.reshape(consumer.weight.shape[0], units, block)
        zero_padded = False
    else:
        if not p_conv or flattened or type(q) is not type(p) or q.in_channels != units:
            raise ConfigError(
                f"cannot shrink {model_name}: conv {consumer.name!r} does not take the {units} channels of "
                f"{producer.name!r} directly"
            )
        columns = consumer.weight.reshape(q.out_channels, units, -1)
        zero_padded = _zero_pads(q)

    remove = producer.dead & foldable
    if uneven is not None and (producer.dead & ~foldable).any():
        warnings.warn(
            f"shrink kept {int((producer.dead & ~foldable).sum())} pruned unit(s) of {producer.name!r}: their constant "
            f"output is not spatially uniform after {uneven.label}, so it cannot be folded into {consumer.name!r}",
            stacklevel=3,
        )
    if zero_padded:
        constant = remove & (c != 0)
        if constant.any():
            # One carrier channel stands in for all constant channels (see the module docstring).
            carrier = int(torch.argmax(torch.where(constant, c.abs(), torch.zeros_like(c))))
            ratio = torch.where(constant, c / c[carrier], torch.zeros_like(c)).to(columns.device)
            merged = torch.einsum("ojk,j->ok", columns.detach().double(), ratio)
            columns = columns.clone()
            columns[:, carrier] = merged.to(columns.dtype)
            consumer.weight = columns.reshape(consumer.weight.shape)
            remove[carrier] = False
    if remove.all():
        remove[0] = False  # a layer keeps at least one unit
    if not remove.any():
        return
    if not zero_padded:
        per_unit = columns.detach().double().sum(-1)[:, remove.to(columns.device)]  # (out_q, removed)
        consumer.bias_shift += (per_unit.cpu() @ c[remove])
    producer.keep_out = ~remove
    consumer.keep_in = (~remove).repeat_interleave(columns.shape[-1]) if q_affine else ~remove


def _rebuilt_layer(layer: _Layer) -> nn.Module:
    old = layer.module
    keep_out = layer.keep_out.to(layer.weight.device)
    keep_in = layer.keep_in.to(layer.weight.device)
    weight = layer.weight.detach()[keep_out][:, keep_in]
    shift = layer.bias_shift[layer.keep_out]
    bias = None
    if layer.bias is not None or bool((shift != 0).any()):
        bias = layer.bias.detach()[keep_out].double() if layer.bias is not None else torch.zeros(len(shift), dtype=torch.float64)
        bias = (bias.cpu() + shift).to(weight.dtype).to(weight.device)
    new = layer_type_of(old).resized(old, weight, bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if bias is not None and old.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    new.train(old.training)
    return new


def _rebuilt_norm(norm: nn.Module, keep: torch.Tensor) -> nn.Module:
    keep = keep.to(norm.running_mean.device)
    new = type(norm)(int(keep.sum()), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                     track_running_stats=norm.track_running_stats, device=norm.running_mean.device,
                     dtype=norm.running_mean.dtype)
    with torch.no_grad():
        if norm.affine:
            new.weight.copy_(norm.weight[keep])
            new.bias.copy_(norm.bias[keep])
            new.weight.requires_grad_(norm.weight.requires_grad)
            new.bias.requires_grad_(norm.bias.requires_grad)
        new.running_mean.copy_(norm.running_mean[keep])
        new.running_var.copy_(norm.running_var[keep])
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    new.train(norm.training)
    return new


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered in ``model`` (every alias)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


def shrink(
    model: nn.Module,
    input_shape: tuple[int, ...] | torch.Tensor | tuple | dict | None = None,
    *,
    groups: list | None = None,
) -> nn.Module:
    """A new, physically smaller model without the dead hidden units of ``model``.

    Args:
        model: a model with a single chain of layers a layer type can rebuild (Linear, Conv1d, Conv2d, GPT-2 Conv1D)
            (see the module docstring for what may come between them),
            typically after :func:`bingo.prune` with neuron-granularity scores
            (shape ``(out_units,)``). Masked or plain. Not modified.
        input_shape: the shape of one input sample without the batch
            dimension, e.g. ``(1, 28, 28)``, or example inputs with a batch
            dimension as the model takes them (``torch.randn(1, 1, 28, 28)``,
            a tuple or a dict of tensors; :mod:`bingo.inputs`); needed when
            ``forward`` has Python control flow that ``torch.fx`` cannot
            trace symbolically (the project's ``conv`` model has one),
            and for residual networks: given it, a model whose channels are
            tied by residual adds, or any model that is not a single chain
            but whose channel groups can be traced, is shrunk by
            :func:`bingo.coupled.shrink_coupled` (Torch-Pruning's dependency
            graph: coupled channels removed from every layer at once).
        groups: what :func:`bingo.channel_groups` returned for ``model``, if
            the caller has it: shrink then takes from it whether the
            channels are coupled instead of tracing the model to find out
            (for a chain, no dependency graph is built at all). They are
            checked, never trusted: layers the model does not have, other
            channel counts, or (coupled) ties other than the trace finds are
            a one-line :class:`ConfigError` (groups of another model, or of
            this one before it changed). The result is the same with and
            without them.

    Returns:
        A deep copy of ``model`` (same class and ``forward``) in which every
        layer with dead units, and the layer after it, is replaced by a plain
        smaller module; BatchNorms in between are sliced (parameters and
        running statistics). In eval mode its outputs equal ``model``'s to
        float rounding. Masks are made permanent and no pruning hooks remain.

    Cost: one copy of the model, each masked weight copied once as its
    masked value (:func:`bingo.masks.permanent_copy`). With ``input_shape``:
    one forward of that copy (the dependency graph's trace, or, for a chain
    with ``groups`` given, the check that the inputs fit), and for a coupled
    model one forward of the shrunk model, checked against the traced one.

    Raises:
        ConfigError: ``input_shape`` does not fit the model (the message
            says which convention is expected and what the first layer
            takes), or the graph is not a single supported chain (residual
            connections, concatenation, a layer used twice, an unsupported
            op between layers, grouped convs, BatchNorm without running
            stats), or ``groups`` are not the model's.
    """
    from .coupled import check_groups, _groups, _remove_zero_channels, _traced_or_explained, is_coupled
    from .sparse import SparseLinear

    converted = [name for name, module in unwrap(check_model("shrink", model)).named_modules() if isinstance(module, SparseLinear)]
    if converted:  # their CSR weights have no rows to slice, and their forward is not one torch.fx follows
        raise ConfigError(f"shrink: {', '.join(map(repr, converted))} {'is' if len(converted) == 1 else 'are'} "
                          "bingo.to_sparse layers; shrink the masked model first, then call bingo.to_sparse on the result")
    _warn_unshrinkable(unwrap(model))
    if input_shape is None:
        if groups is not None and is_coupled(check_groups(unwrap(model), groups, "shrink")):
            raise ConfigError("shrink: these groups tie channels of several layers (a residual add); removing them "
                              "needs Torch-Pruning's dependency graph, traced on example inputs: pass input_shape")
        try:
            return _shrink_chain(model, None)
        except ConfigError as exc:
            if "shrink follows a single chain" not in str(exc):
                raise
            # without example inputs only a chain can be shrunk: a residual network can, given them
            raise ConfigError(f"{exc}; given input_shape (one sample's shape, e.g. shrink(model, (1, 28, 28))), "
                              "shrink follows channels tied by residual adds and branches too") from None
    model = unwrap(model)
    example = example_inputs(model, input_shape, "shrink", check=False)  # checked by the trace below, or on its failure
    if groups is not None:
        groups = check_groups(model, groups, "shrink")
    net = permanent_copy(model)
    traced = None
    if groups is None:
        try:
            traced = _groups(net, example)
        except ConfigError:  # not traceable as coupled channels: the chain path says what it cannot follow
            check_runs(net, example, "shrink")  # unless the inputs do not fit: that first
        infos = [] if traced is None else [info for _, info in traced.found]
    else:
        infos = groups
        if not is_coupled(infos):
            check_runs(net, example, "shrink")  # no trace on this path: the inputs are checked on their own
    def removed(reason: str) -> nn.Module:
        # Torch-Pruning's removal can leave a model that no longer runs (a layer used twice in forward):
        # that is a model shrink cannot handle, said in one line, not a shape error from inside torch.
        try:
            return _remove_zero_channels(net, traced or _traced_or_explained(net, example, "shrink"), groups, "shrink")
        except BingoError:
            raise
        except (RuntimeError, IndexError, ValueError) as exc:
            raise ConfigError(f"{reason}; removing its channel groups by dependency graph fails too ({_first_line(exc)})") from exc

    if is_coupled(infos):  # a residual network: removal by dependency graph
        return removed(f"cannot shrink {type(model).__name__}")
    try:
        return _shrink_chain(model, example, net)
    except ConfigError as chain_error:
        if not infos:
            raise
        # not a chain (a transformer block, a branch), but its groups are known
        return removed(str(chain_error))


def _shrink_chain(model: nn.Module, example: ExampleInputs | None, net: nn.Module | None = None) -> nn.Module:
    """Shrink a chain; ``net``, a :func:`permanent_copy` of ``model``, is the copy to work on (made here if not given)."""
    net = permanent_copy(model) if net is None else net
    name = type(model).__name__
    chain = _chain(_trace(net, example), net)
    steps = [_classify(node, net) for node in chain]

    seen: dict[int, str] = {}
    for step in steps:
        if step.kind in ("layer", "norm"):
            if id(step.module) in seen:
                raise ConfigError(
                    f"cannot shrink {name}: {step.label} is used more than once in forward; "
                    "shrink needs every layer and BatchNorm used once"
                )
            seen[id(step.module)] = step.module_name
    positions = [i for i, step in enumerate(steps) if step.kind == "layer"]
    for step in steps:
        if step.kind == "layer" and getattr(step.module, "groups", 1) != 1:
            raise ConfigError(f"cannot shrink {name}: {step.label} is a grouped conv (groups={step.module.groups}); only groups=1 is supported")

    layers = []
    for i in positions:
        module = steps[i].module
        weight = module.weight.detach().movedim(unit_axis(module), 0)  # units first, whatever the layer's storage
        bias = module.bias.detach() if module.bias is not None else None
        units = weight.shape[0]
        layers.append(_Layer(
            name=steps[i].module_name, module=module, weight=weight.clone(), bias=None if bias is None else bias.clone(),
            dead=(weight.reshape(units, -1) == 0).all(dim=1).cpu(),
            keep_out=torch.ones(units, dtype=torch.bool), keep_in=torch.ones(weight.shape[1], dtype=torch.bool),
            bias_shift=torch.zeros(units, dtype=torch.float64),
        ))
    for k in range(len(layers) - 1):
        between = steps[positions[k] + 1 : positions[k + 1]]
        _fold_pair(layers[k], layers[k + 1], between, name)

    for layer in layers:
        changed = not layer.keep_out.all() or not layer.keep_in.all() or bool((layer.bias_shift != 0).any())
        if changed:
            _replace(net, layer.module, _rebuilt_layer(layer))
        if not layer.keep_out.all():
            for step in layer.norms:
                _replace(net, step.module, _rebuilt_norm(step.module, layer.keep_out))
            mark_shrunk(net)
    return net
