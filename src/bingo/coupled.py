"""Structured pruning of coupled channels: residual networks, with Torch-Pruning's dependency graph.

A residual add ties channels together: in ``relu(bn2(conv2(x)) + x)`` channel
``i`` of ``conv2`` and channel ``i`` of whatever wrote ``x`` (the stem, the
previous blocks' ``conv2``, a projection shortcut) are one channel of the
residual stream. It can only be removed from all of them at once, and the
layers that read the stream lose that input channel too. Which channels are
tied is read from the model by Torch-Pruning's ``DependencyGraph`` (Fang et
al., "DepGraph: Towards Any Structural Pruning", CVPR 2023; ``torch-pruning``
on PyPI), which traces one forward pass; bingo uses it for the graph and the
physical removal, and keeps scoring and selection its own.

- :func:`channel_groups`: the groups, one per set of tied channels: the
  Conv/Linear layers that write them (``members``, weight keys) and the
  BatchNorms on them (``norms``). A plain conv -> BatchNorm -> conv chain is
  a group of one member. The output layer is never in a group (its units
  are the model's outputs), nor is a group whose channels meet the model's
  input or a buffer at an add (the graph has no node for those), nor one
  whose channels also pass through anything but Conv/Linear layers and
  BatchNorms (a LayerNorm normalises across channels, so removing one is
  not exact; an attention's width is tied to its heads): in a transformer
  the residual stream stays whole and its feed-forward layers are groups.
- :func:`prune_coupled`: one joint score per channel, the **mean of its
  members' unit scores**; channels selected per group (``scope="layer"``,
  the same fraction of each group) or over all groups (``"global"``, with
  the floors of :func:`bingo.selection.select_masks`); each selected
  channel is masked in every member (row and bias, as neuron masks do) and
  in every BatchNorm on it (weight *and* bias), so the channel is exactly
  zero after its BatchNorm, in training and in eval mode.
- :func:`shrink_coupled`: removes the channels that are exactly zero in the
  whole group, with the layers that read them.

Exactness: removal equals the masked computation exactly when the removed
channel is zero where the group's members meet, which is what
:func:`prune_coupled` masks guarantee. A channel whose weights are zero but
whose BatchNorm is not masked outputs the constant ``beta - gamma * mean /
sqrt(var + eps)`` (``beta`` in training mode); removing it would drop that
constant, so :func:`shrink_coupled` keeps such channels and says how many
(the chain shrink of :func:`bingo.shrink` folds such constants into the next
layer; across a residual add there is no single next layer to fold into).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .distributed import unwrap
from .errors import ConfigError, check_choice
from .inputs import SHAPE_BATCH, ExampleInputs, check_runs
from .inputs import example_inputs as example_inputs_of
from .layer_types import unit_matrix
from .layers import PRUNABLE_TYPES, output_layer_name, unit_axis
from .masks import apply_masks, keep_copyable, permanent_copy
from .selection import SCOPES, select_masks
from .shrink import mark_shrunk

__all__ = ["ChannelGroup", "channel_groups", "check_groups", "is_coupled", "prune_coupled", "shrink_coupled"]

_NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class ChannelGroup:
    """One set of tied channels: channel ``i`` of every member is the same channel."""

    members: tuple[str, ...]  #: weight keys (``"stages.0.0.conv2.weight"``) of the Conv/Linear layers writing the channels
    norms: tuple[str, ...]  #: module names of the BatchNorms on the channels
    channels: int  #: how many channels

    @property
    def key(self) -> str:
        """The group's name in joint scores and reports: its first member."""
        return self.members[0]


def _tp():
    try:
        import torch_pruning
    except ImportError as exc:  # a dependency of bingo; absent only in a broken install
        raise ConfigError(f"structured pruning of coupled layers needs torch-pruning: pip install torch-pruning ({exc})") from None
    return torch_pruning


def _graph(model: nn.Module, example: ExampleInputs) -> tuple[object, Any]:
    """Torch-Pruning's dependency graph of ``model`` and the eval-mode outputs of the forward it traced (detached).

    The train/eval flags are restored (tracing sets eval).
    """
    tp = _tp()
    modes = [(m, m.training) for m in model.modules()]
    hooks = [(m._forward_hooks, set(m._forward_hooks)) for m in model.modules()]
    outputs = []

    def forward(module: nn.Module, _: object) -> Any:
        # called as the model takes its inputs (Torch-Pruning would first try model(*tensor), a batch split into samples)
        outputs.append(example(module))
        return outputs[-1]

    try:
        with torch.enable_grad():  # the graph follows autograd
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example.args or example.kwargs,
                                                          forward_fn=forward, verbose=False)
    except Exception as exc:  # noqa: BLE001 - tracing runs the user's forward: name what failed, in one line
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"cannot trace {type(model).__name__} for coupled channels: {reason}") from None
    finally:
        for module, training in modes:
            module.training = training
        for registered, before in hooks:  # Torch-Pruning removes its hooks, but not when the forward raised
            for handle in set(registered) - before:
                del registered[handle]
    return graph, _detached(outputs[-1])


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, Mapping):
        return {key: _detached(item) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return [_detached(item) for item in value]
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, or tuples / lists / dicts of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for item in value.values() for t in _tensors(item)]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


_JOINS = ("AddBackward", "SubBackward", "MulBackward", "DivBackward")


def _meets_untracked(group, tp) -> bool:
    """True if the group's channels meet, at an elementwise join, a tensor the graph has no node for (the input, a buffer)."""
    for item in group:
        node = item.dep.target
        function = getattr(node, "grad_fn", None)
        if node.type == tp.ops.OPTYPE.ELEMENTWISE and function is not None and type(function).__name__.startswith(_JOINS):
            if len(function.next_functions) >= 2 and any(f is None for f, _ in function.next_functions):
                return True
    return False


#: attributes by which an attention module tells its head count or size (Hugging Face, nn.MultiheadAttention, GPT-2)
_HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "head_dim", "attention_head_size")


def _inside_attention(key: str, model: nn.Module) -> bool:
    """True if the layer of weight ``key`` is a direct child of a module that declares heads (an int ``num_heads``, ...).

    Only the parent: a transformer block may keep a head count too (torchvision's ViT ``EncoderBlock``), and its
    MLP's hidden channels are free; an attention's projections (Hugging Face's q/k/v/o, GPT-2's ``c_attn``,
    Llama's ``*_proj``) are its direct children.
    """
    parent = key.rpartition(".")[0].rpartition(".")[0]
    if not parent:
        return False
    module = model.get_submodule(parent)
    return any(isinstance(getattr(module, name, None), int) for name in _HEAD_ATTRIBUTES)


def _is_grouped_conv(module: object) -> bool:
    """A conv with ``1 < groups`` that is not depthwise (depthwise: one group per input channel, which Torch-Pruning couples)."""
    groups = getattr(module, "groups", 1)
    return (isinstance(module, nn.modules.conv._ConvNd) and groups > 1
            and not (groups == module.in_channels and module.out_channels % groups == 0))


@dataclass
class _Traced:
    """One trace of a model's copy: its graph, its groups, and the eval outputs of the traced forward."""

    graph: object
    found: list[tuple[object, ChannelGroup]]  # (Torch-Pruning's group, bingo's description of it)
    inputs: ExampleInputs  # what the forward ran on
    outputs: Any  # what it returned, detached
    #: (layer name, the grouped conv) for the layers whose output channels a grouped conv reads or writes: never removed
    left_alone: list[tuple[str, str]] = field(default_factory=list)
    #: the layers whose output channels are cut and rejoined (``torch.split`` / ``cat``, then an add): never removed
    untied: list[str] = field(default_factory=list)


def _groups(model: nn.Module, example: ExampleInputs) -> _Traced:
    """Trace ``model`` (a plain copy: the graph holds its modules, and pruning it changes them) on ``example``.

    Given one sample's shape, the trace runs on seeded random samples of it rather than zeros: its outputs are
    the reference the shrunk model is checked against, and zeros can hide a constant output.
    """
    tp = _tp()
    example = example.random(batch=SHAPE_BATCH, seed=0)
    graph, outputs = _graph(model, example)
    names = {module: name for name, module in model.named_modules()}
    order = {name: position for position, (name, _) in enumerate(model.named_modules())}
    output = model.get_submodule(output_layer_name(model).rpartition(".")[0])
    try:
        all_groups = list(graph.get_all_groups(ignored_layers=[output], root_module_types=list(PRUNABLE_TYPES)))
    except Exception as exc:  # noqa: BLE001 - the graph library's own failure on an unusual model, in one line
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ConfigError(f"cannot find the coupled channels of {type(model).__name__}: {reason}") from None
    found, left_alone, untied = [], [], []
    for group in all_groups:
        if _meets_untracked(group, tp):
            continue
        grouped = next((item.dep.target.module for item in group if _is_grouped_conv(item.dep.target.module)), None)
        if grouped is not None:  # its channels must leave evenly from every group of the conv: not supported, left alone
            writers = {names[item.dep.target.module] for item in group if item.dep.target.module in names
                       and isinstance(item.dep.target.module, PRUNABLE_TYPES)
                       and graph.is_out_channel_pruning_fn(item.dep.handler)}
            left_alone.extend((name, f"{names.get(grouped, '?')!r} ({type(grouped).__name__}, groups={grouped.groups})")
                              for name in sorted(writers))
            continue
        if len({len(item.idxs) for item in group}) > 1:
            # Channels cut and rejoined (torch.split / chunk / cat, then an add): channel i meets channel i + k,
            # which the graph does not tie, so its items disagree on the group's width. Not one to one: left alone.
            untied.extend(sorted({names[item.dep.target.module] for item in group if item.dep.target.module in names
                                  and isinstance(item.dep.target.module, PRUNABLE_TYPES)
                                  and graph.is_out_channel_pruning_fn(item.dep.handler)}))
            continue
        members, norms, others = [], [], []
        for item in group:
            module = item.dep.target.module
            if module not in names or not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue
            if list(item.idxs) != list(item.root_idxs):
                raise ConfigError(f"channels of {names[module]!r} are tied to {names[group[0].dep.target.module]!r} "
                                  "in another order; coupled pruning supports channels tied one to one")
            if isinstance(module, PRUNABLE_TYPES):
                members.append(f"{names[module]}.weight")
            elif isinstance(module, _NORMS):
                norms.append(names[module])
            else:  # a LayerNorm (normalises across the channels), an attention, an embedding...
                others.append(module)
        # Removing a channel that such a module also sees is not exact (a LayerNorm's mean and variance would
        # change) or not supported: the group is left alone, never pruned. So is a group with a layer inside an
        # attention written as plain matmuls (Hugging Face's): its width is tied to the heads, which the graph
        # does not see, so single channels would leave across head boundaries.
        if any(_inside_attention(key, model) for key in members):
            continue
        if members and not others:
            members = sorted(set(members), key=lambda key: order[key.rpartition(".")[0]])
            norms = sorted(set(norms), key=order.__getitem__)
            found.append((group, ChannelGroup(tuple(members), tuple(norms), len(group[0].idxs))))
    # in model order (of each group's first member), as the layers are everywhere else
    found.sort(key=lambda entry: order[entry[1].key.rpartition(".")[0]])
    return _Traced(graph, found, example, outputs, left_alone, sorted(set(untied), key=order.__getitem__))


def _traced_or_explained(net: nn.Module, example: ExampleInputs, what: str) -> _Traced:
    """:func:`_groups`; when the trace fails, inputs that do not fit are said so first (:func:`bingo.inputs.check_runs`)."""
    try:
        return _groups(net, example)
    except ConfigError:
        check_runs(net, example, what)
        raise


def channel_groups(model: nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """The groups of tied channels of ``model`` (see the module docstring), in the graph's order.

    ``example_inputs`` is the shape of one sample without the batch
    dimension (``(1, 28, 28)``; two seeded random samples of it are traced), or inputs
    with a batch dimension as the model takes them: a tensor
    (``torch.randn(1, 1, 28, 28)``), a tuple or a dict of tensors
    (:mod:`bingo.inputs`). Inputs the model cannot run on are a one-line
    :class:`ConfigError` saying so, not a tracing error (they are checked
    when the trace fails, so good inputs cost no forward of their own).
    ``model`` is not changed; the trace runs on a copy
    (:func:`bingo.masks.permanent_copy`).
    """
    model = unwrap(model)
    net = permanent_copy(model)  # the graph is traced on plain parameters
    example = example_inputs_of(net, example_inputs, "channel_groups", check=False)
    return [group for _, group in _traced_or_explained(net, example, "channel_groups").found]


def is_coupled(groups: list[ChannelGroup]) -> bool:
    """True if some channels are written by more than one layer (a residual add): chain pruning cannot remove them."""
    return any(len(group.members) > 1 for group in groups)


def _dead_units(module: nn.Module) -> torch.Tensor:
    """Output units of a Conv/Linear already pruned by its masks (row masked), as a bool ``(out,)``."""
    mask = getattr(module, "weight_mask", None)
    if mask is None:
        return torch.zeros(module.weight.shape[0], dtype=torch.bool)
    return ~unit_matrix(mask).bool().any(dim=1).cpu()


def prune_coupled(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    groups: list[ChannelGroup],
    sparsity: float,
    scope: str = "layer",
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Prune ``sparsity`` of the channels of ``groups`` by joint scores; return the members' unit keep-masks.

    Args:
        model: modified in place: neuron masks on every member (rows and
            bias entries) and masks on the weight and bias of every BatchNorm
            on a pruned channel, through ``torch.nn.utils.prune``.
        scores: neuron-granularity scores ``{"<layer>.weight": (out_units,)}``,
            higher = more significant; a group's joint score per channel is
            the mean over its members that have scores. Groups with no scored
            member are left alone.
        groups: from :func:`channel_groups`.
        sparsity: fraction of the channels to prune, each group's channels
            counted once however many layers write them; exact to the channel
            (``round(sparsity * n)`` per group with ``scope="layer"``, over
            all groups otherwise).
        scope: ``"layer"`` (every group alike), ``"global"`` or ``"lamp"``
            (see :func:`bingo.selection.select_masks`).
        seed: tie-breaking seed.

    Returns:
        ``{member key: bool (channels,)}`` for every member of a scored
        group; False = pruned. Channels already pruned in every member are
        pruned first and counted.
    """
    check_choice("scope", scope, SCOPES)
    model = unwrap(model)
    joint: dict[str, torch.Tensor] = {}
    scored = [group for group in groups if any(key in scores for key in group.members)]
    if not scored:
        raise ConfigError("none of the coupled channel groups has scores: pass neuron-granularity scores of their layers")
    for group in scored:
        values = []
        for key in group.members:
            if key not in scores:
                continue
            if tuple(scores[key].shape) != (group.channels,):
                raise ConfigError(f"scores for {key!r} have shape {tuple(scores[key].shape)}; coupled pruning takes "
                                  f"one score per channel, ({group.channels},)")
            values.append(scores[key].detach().double().cpu())
        mean = torch.stack(values).mean(dim=0)
        dead = torch.stack([_dead_units(model.get_submodule(key.rpartition(".")[0])) for key in group.members]).all(dim=0)
        joint[group.key] = torch.where(dead, torch.tensor(-math.inf, dtype=torch.float64), mean)
    keep = select_masks(joint, sparsity, scope, seed)
    masks: dict[str, torch.Tensor] = {}
    for group in scored:
        channels = keep[group.key]
        if not channels.any():
            raise ConfigError(f"this sparsity would remove every channel of the group of {group.key!r} "
                              f"({group.channels} channels); lower the sparsity or use scope='layer'")
        for key in group.members:
            masks[key] = channels.clone()
        for name in group.norms:
            norm = model.get_submodule(name)
            for tensor in ("weight", "bias"):
                if isinstance(getattr(norm, tensor, None), torch.Tensor):
                    torch_prune.custom_from_mask(norm, tensor, channels.to(getattr(norm, tensor).device))
            keep_copyable(norm)
    apply_masks(model, masks)
    return masks


def _zero_channels(model: nn.Module, group: ChannelGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """(channels exactly zero where the members meet, channels with zero weights that a BatchNorm still shifts)."""
    rows_zero = torch.ones(group.channels, dtype=torch.bool)
    for key in group.members:
        module = model.get_submodule(key.rpartition(".")[0])
        rows = module.weight.detach().reshape(module.weight.shape[0], -1)
        if rows.shape[1]:  # all exactly zero: two reductions, no temporary
            zero = ((rows.amax(dim=1) == 0) & (rows.amin(dim=1) == 0)).cpu()
        else:
            zero = torch.ones(rows.shape[0], dtype=torch.bool)
        if getattr(module, "bias", None) is not None:
            zero &= (module.bias.detach() == 0).cpu()
        rows_zero &= zero
    exact = rows_zero.clone()
    for name in group.norms:
        norm = model.get_submodule(name)
        if norm.weight is None or norm.bias is None:
            exact &= False  # no affine to zero: the channel is -mean/std after the norm, not zero
            continue
        exact &= ((norm.weight.detach() == 0) & (norm.bias.detach() == 0)).cpu()
    return exact, rows_zero & ~exact


def check_groups(model: nn.Module, groups: Any, what: str) -> list[ChannelGroup]:
    """``groups`` as a list, if they can be ``model``'s: every member a Conv/Linear and every norm a BatchNorm of it, with the group's channel count.

    Groups from :func:`channel_groups` of another model, or of this one
    before it changed (a shrunk model has fewer channels), are a one-line
    :class:`ConfigError` naming the first layer that does not fit. Whether
    the layers are tied as the groups say is known only from a trace, which
    the coupled shrink does anyway (:func:`_remove_zero_channels`).
    """
    if not isinstance(groups, (list, tuple)) or not all(isinstance(group, ChannelGroup) for group in groups):
        raise ConfigError(f"{what}: groups must be the list bingo.channel_groups(model, example_inputs) returns, "
                          f"got {type(groups).__name__}")
    name = type(model).__name__
    again = "groups from another model, or from this one before it changed? call bingo.channel_groups on it again"
    for group in groups:
        for key in (*group.members, *group.norms):
            module_name = key.rpartition(".")[0] if key in group.members else key
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                raise ConfigError(f"{what}: groups name {key!r}, which {name} does not have ({again})") from None
            if key in group.members:
                ok_type = isinstance(module, PRUNABLE_TYPES)
                units = module.weight.shape[unit_axis(module)] if ok_type else None
            else:
                ok_type = isinstance(module, _NORMS)
                units = module.num_features if ok_type else None
            if not ok_type:
                raise ConfigError(f"{what}: groups name {key!r}, which is a {type(module).__name__} in {name}, "
                                  f"not a {'Conv/Linear layer' if key in group.members else 'BatchNorm'} ({again})")
            if units != group.channels:
                raise ConfigError(f"{what}: groups give {key!r} {group.channels} channels; in {name} it has {units} ({again})")
    return list(groups)


def _check_same_outputs(want: Any, shrunk: nn.Module, inputs: ExampleInputs) -> None:
    """Refuse a shrunk model whose eval outputs on ``inputs`` differ from ``want``, the masked model's on the same inputs.

    A channel that is zero where its layers meet can still become a nonzero
    constant before it is read (a sigmoid, a softplus, an add of a buffer);
    removing it would drop that constant. The graph does not say what maps
    zero to zero, so the result is checked instead: one forward of the shrunk
    model, against the outputs of the forward the graph was traced with.
    """
    modes = [(m, m.training) for m in shrunk.modules()]
    try:
        shrunk.eval()
        with torch.no_grad():
            got = inputs(shrunk)
    finally:
        for module, training in modes:
            module.training = training
    gap, scale = 0.0, 0.0
    pairs = list(zip(_tensors(want), _tensors(got)))
    for a, b in pairs:
        if a.shape != b.shape:
            gap = math.inf
        elif a.numel():
            scale = max(scale, float(a.abs().max()))
            gap = max(gap, float((a.double() - b.double()).abs().max()))
    if len(pairs) != len(_tensors(want)) or len(pairs) != len(_tensors(got)):
        gap = math.inf
    if not gap <= 1e-4 * max(1.0, scale):
        raise ConfigError(
            f"cannot shrink {type(shrunk).__name__} exactly: removing its zero channels changes its output by {gap:.3g} "
            "(something between its layers turns a zero channel into a constant, e.g. a sigmoid); "
            "shrink keeps the masked model's outputs or refuses"
        )


def _remove_zero_channels(net: nn.Module, traced: _Traced, groups: list[ChannelGroup] | None, what: str) -> nn.Module:
    """Remove, in ``net`` itself (the plain copy ``traced`` was made of), the channels zero in their whole group."""
    if groups is not None:
        found = {info for _, info in traced.found}
        for group in groups:
            if group not in found:
                raise ConfigError(
                    f"{what}: the group of {group.key!r} ({group.channels} channels written by {', '.join(group.members)}) "
                    f"is not one of the channel groups {type(net).__name__} has now: groups from another model, or from "
                    "this one before it changed? call bingo.channel_groups on it again"
                )
    kept_shifted = 0
    plan = []
    for group, info in traced.found:
        exact, shifted = _zero_channels(net, info)
        kept_shifted += int(shifted.sum())
        remove = exact.nonzero().flatten().tolist()
        if len(remove) == info.channels:
            remove = remove[1:]  # a layer keeps one channel
        if remove:
            plan.append((group, remove))
    for group, remove in plan:
        root = group[0].dep.target.module
        pruning_group = traced.graph.get_pruning_group(root, group[0].dep.handler, remove)
        pruning_group.prune()
        mark_shrunk(net)
    if plan:  # nothing removed: net is the traced copy itself, computing what it computed
        _check_same_outputs(traced.outputs, net, traced.inputs)
    dead = {name: int((unit_matrix(net.get_submodule(name).weight.detach()) == 0).all(dim=1).sum())
            for name, _ in traced.left_alone}
    kept = [f"{dead[name]} of {name!r} (it meets {grouped})" for name, grouped in traced.left_alone if dead.get(name)]
    if kept:
        warnings.warn(f"{what} kept zero channels a grouped conv meets, which it cannot remove (only groups=1 and "
                      f"depthwise convs are supported): {'; '.join(kept)}", stacklevel=3)
    dead = {name: int((unit_matrix(net.get_submodule(name).weight.detach()) == 0).all(dim=1).sum()) for name in traced.untied}
    kept = [f"{dead[name]} of {name!r}" for name in traced.untied if dead[name]]
    if kept:
        warnings.warn(f"{what} kept zero channels that are cut and rejoined (torch.split, chunk or cat, then an add), "
                      f"so not tied one to one, which it cannot remove: {'; '.join(kept)}", stacklevel=3)
    if kept_shifted:
        warnings.warn(
            f"shrink kept {kept_shifted} channel(s) whose weights are zero but whose BatchNorm still adds a constant; "
            "prune with bingo.prune_coupled (which masks the BatchNorm too) to remove them exactly",
            stacklevel=3,
        )
    return net


def shrink_coupled(model: nn.Module, example_inputs: Any, *, groups: list[ChannelGroup] | None = None) -> nn.Module:
    """A physically smaller copy of ``model`` without its zero channels, coupled ones removed from every layer at once.

    A channel is removed when it is exactly zero in its whole group (every
    member's row and bias, every BatchNorm's weight and bias: what
    :func:`prune_coupled` leaves), together with the input channels of the
    layers that read it. Each group keeps at least one channel. Masks are
    made permanent first; ``model`` is not changed. In eval and training
    mode the result computes what the masked model does, to float rounding.
    Channels with zero weights whose BatchNorm is not masked are kept, with
    a warning (removing them would drop the constant the BatchNorm adds).
    The result is checked against the masked model on ``example_inputs``
    (inputs as the model takes them, or seeded random samples of one
    sample's shape, as for :func:`channel_groups`): if removal changed the
    output (an activation that maps zero to a constant, such as a sigmoid,
    between the layers), :class:`ConfigError`.

    Cost: one copy of the model (each masked weight copied once, as its
    masked value, masks not at all: :func:`bingo.masks.permanent_copy`), one
    traced forward (Torch-Pruning's graph must be built on that copy, whose
    modules it prunes; its outputs are the reference) and one forward of the
    shrunk model: the copy + graph + removal that Torch-Pruning itself does,
    plus that forward.

    ``groups``: the list :func:`channel_groups` returned for ``model`` (or
    part of it), as a check: a group whose layers ``model`` does not have,
    with other channel counts, or not tied as the trace finds them, is a
    :class:`ConfigError` (groups of another model, or of this one before it
    changed). They do not restrict what is removed: the result is the same
    with and without them.
    """
    model = unwrap(model)
    example = example_inputs_of(model, example_inputs, "shrink_coupled", check=False)
    if groups is not None:
        groups = check_groups(model, groups, "shrink_coupled")
    net = permanent_copy(model)
    return _remove_zero_channels(net, _traced_or_explained(net, example, "shrink_coupled"), groups, "shrink_coupled")
