"""Application: putting keep-masks on a model, and the one-shot prune.

Masks go on through ``torch.nn.utils.prune.custom_from_mask``, so a pruned
model looks exactly like one pruned with PyTorch's own utilities: the module
holds ``weight_orig`` and a ``weight_mask`` buffer, ``prune.remove`` (or
:func:`make_permanent`) bakes the zeros in, the masks travel in
``state_dict``, and masked weights stay zero through further training.

Two granularities, told apart by the shape of the scores:
- weight: scores shaped like the weight, one mask entry per weight;
- neuron: scores of shape ``(out_units,)``; pruning a unit zeroes its whole
  row / filter and its bias entry.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .errors import CheckpointError, ConfigError, check_choice
from .distributed import unwrap
from .layers import ATTENTION_PROJECTIONS, parameter_name, weight_of, weight_parameter_name
from .selection import SCOPES, select_masks

__all__ = [
    "AccuracyFloorResult",
    "apply_masks",
    "current_masks",
    "load_pruned_state_dict",
    "pruned_parameters",
    "make_permanent",
    "masked_value",
    "model_sparsity",
    "prune",
    "prune_to_accuracy",
    "refresh_masked",
]


def _module(model: nn.Module, key: str) -> nn.Module:
    model = unwrap(model)  # keys name the inner module's parameters
    module_name, _, attr = key.rpartition(".")
    if attr not in ("weight", *ATTENTION_PROJECTIONS):
        raise ConfigError(
            f"score key {key!r} does not name a weight (expected '<module>.weight' or a MultiheadAttention's "
            f"'<module>.{{{','.join(ATTENTION_PROJECTIONS)}}}')"
        )
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        raise ConfigError(f"score key {key!r} names no module of {type(model).__name__}") from None
    if not isinstance(getattr(module, weight_parameter_name(module, attr), None), torch.Tensor):
        raise ConfigError(f"score key {key!r} names {module_name or 'the model'} ({type(module).__name__}), which has no {attr}")
    return module


def _is_neuron(module: nn.Module, mask_or_scores: torch.Tensor, key: str) -> bool:
    weight = weight_of(module, key)
    if mask_or_scores.shape == weight.shape:
        return False
    if mask_or_scores.shape == weight.shape[:1]:
        if parameter_name(key) != "weight":
            raise ConfigError(f"scores for {key!r} are per unit; attention q/k/v projections take one score per weight, shaped {tuple(weight.shape)}")
        return True
    raise ConfigError(
        f"scores for {key!r} have shape {tuple(mask_or_scores.shape)}; expected the weight's "
        f"{tuple(weight.shape)} (weight granularity) or ({weight.shape[0]},) (neuron granularity)"
    )


def _mask_of(module: nn.Module, key: str) -> torch.Tensor | None:
    return getattr(module, f"{parameter_name(key)}_mask", None)


def _unit_mask_of(module: nn.Module, key: str) -> torch.Tensor:
    """Units still alive: a unit is pruned when its whole weight row is masked."""
    mask = _mask_of(module, key)
    if mask is None:
        return torch.ones(weight_of(module, key).shape[0], dtype=torch.bool)
    return mask.reshape(mask.shape[0], -1).bool().any(dim=1).cpu()


def current_masks(model: nn.Module, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keep-masks already on ``model`` for the keys (and granularity) of ``like``."""
    masks = {}
    for key, ref in like.items():
        module = _module(model, key)
        if _is_neuron(module, ref, key):
            masks[key] = _unit_mask_of(module, key)
        else:
            mask = _mask_of(module, key)
            masks[key] = torch.ones(ref.shape, dtype=torch.bool) if mask is None else mask.bool().cpu()
    return masks


def masked_value(module: nn.Module, name: str) -> torch.Tensor:
    """``<name>_orig * <name>_mask``: the value of a masked tensor that the forward pass uses.

    The same product (mask cast to the parameter's dtype) that
    ``torch.nn.utils.prune`` computes before every forward; with autograd
    history unless called under ``torch.no_grad()``. ``AttributeError`` if
    ``name`` is not masked on ``module``.
    """
    orig = getattr(module, f"{name}_orig")
    return getattr(module, f"{name}_mask").to(dtype=orig.dtype) * orig


def refresh_masked(model: nn.Module) -> None:
    """Set every masked tensor of ``model`` to :func:`masked_value` now.

    ``torch.nn.utils.prune`` refreshes ``module.weight`` only in a forward
    pre-hook, so after writing into ``weight_orig`` or the mask (loading a
    state dict, rewinding to θ0) ``module.weight`` holds the old values until
    the next forward. Stored without autograd history, as bingo keeps it: a
    tensor with a grad_fn on the module makes ``copy.deepcopy`` fail.
    """
    with torch.no_grad():
        for module in model.modules():
            for name in _masked_names(module):
                setattr(module, name, masked_value(module, name))


def _masked_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s tensors that ``torch.nn.utils.prune`` masks (``"weight"``, ``"bias"``, ``"in_proj_weight"``...)."""
    return [
        buffer_name[: -len("_mask")]
        for buffer_name, _ in module.named_buffers(recurse=False)
        if buffer_name.endswith("_mask") and hasattr(module, buffer_name[: -len("_mask")] + "_orig")
    ]


def _detach_masked(module: nn.Module, inputs: object, output: object) -> None:
    """Forward hook: after the forward, hold the masked tensors detached.

    ``torch.nn.utils.prune`` recomputes ``weight = weight_orig * weight_mask``
    before every forward and leaves that non-leaf tensor on the module, which
    makes ``copy.deepcopy`` of a pruned model fail. The autograd graph of this
    forward already holds the product, so swapping in a detached copy of the
    same values changes no gradient and makes the model copyable again.
    """
    for name in _masked_names(module):
        tensor = module.__dict__.get(name)
        if tensor is not None and tensor.grad_fn is not None:
            setattr(module, name, tensor.detach())


def _ensure_copyable(module: nn.Module) -> None:
    if not any(hook is _detach_masked for hook in module._forward_hooks.values()):
        module.register_forward_hook(_detach_masked)
    _detach_masked(module, None, None)


def _mask_out_proj(attention: nn.Module, inputs: object) -> None:
    """Forward pre-hook of an ``nn.MultiheadAttention``: recompute its pruned ``out_proj``'s masked tensors.

    ``MultiheadAttention.forward`` reads ``out_proj.weight`` and ``.bias``
    directly and never calls ``out_proj``, so the pre-hook
    ``torch.nn.utils.prune`` puts on ``out_proj`` never runs: the weight would
    stay the tensor of the moment of pruning, and ``weight_orig`` would get no
    gradient (frozen, silently). Recomputed here with autograd history, as
    torch's own hook would; :func:`_detach_out_proj` detaches it afterwards.
    """
    projection = attention.out_proj
    for name in _masked_names(projection):
        setattr(projection, name, masked_value(projection, name))


def _detach_out_proj(attention: nn.Module, inputs: object, output: object) -> None:
    _detach_masked(attention.out_proj, inputs, output)


def _ensure_attention_masked(model: nn.Module) -> None:
    """Hooks on every ``nn.MultiheadAttention`` whose ``out_proj`` is pruned (once), so its mask applies in training."""
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and hasattr(module.out_proj, "weight_mask"):
            if not any(hook is _mask_out_proj for hook in module._forward_pre_hooks.values()):
                module.register_forward_pre_hook(_mask_out_proj)
                module.register_forward_hook(_detach_out_proj)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Put keep-masks on ``model`` through ``torch.nn.utils.prune.custom_from_mask``.

    A mask shaped like the weight masks weights; a mask of shape ``(out_units,)``
    masks whole units (rows/filters and their bias entries). Masks combine with
    any already on the module (an entry once pruned stays pruned). Keys name
    the weight (``"fc1.weight"``, ``"attn.in_proj_weight"``), so one module
    may carry several masks.
    """
    for key, mask in masks.items():
        module = _module(model, key)
        weight = weight_of(module, key)
        mask = mask.to(device=weight.device, dtype=weight.dtype)
        if _is_neuron(module, mask, key):
            unit_mask = mask
            mask = unit_mask.reshape(-1, *([1] * (weight.dim() - 1))).expand_as(weight).contiguous()
            if getattr(module, "bias", None) is not None:
                torch_prune.custom_from_mask(module, "bias", unit_mask)
        torch_prune.custom_from_mask(module, parameter_name(key), mask)
        _ensure_copyable(module)
    _ensure_attention_masked(model)


def make_permanent(model: nn.Module) -> None:
    """Bake every mask into its parameter (``prune.remove``) and drop the masks and hooks."""
    for module in model.modules():
        for name in _masked_names(module):
            torch_prune.remove(module, name)
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for handle_id, hook in list(hooks.items()):
                if hook in (_detach_masked, _mask_out_proj, _detach_out_proj):
                    del hooks[handle_id]


def load_pruned_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load the ``state_dict`` of a pruned model into a fresh (unpruned) one.

    Every ``<module>.<name>_mask`` entry is first put on ``model`` as a mask,
    so the keys ``weight_orig`` / ``weight_mask`` exist; then the state is
    loaded strictly. Raises :class:`CheckpointError` if it does not fit.
    """
    for key, value in state_dict.items():
        if not key.endswith("_mask"):
            continue
        module_name, _, attr = key.rpartition(".")
        name = attr[: -len("_mask")]
        try:
            module = model.get_submodule(module_name) if module_name else model
            target = getattr(module, name)
        except AttributeError:
            raise CheckpointError(f"state dict masks {key!r}, which this model does not have") from None
        if hasattr(module, f"{name}_mask"):
            continue
        if not isinstance(target, torch.Tensor) or target.shape != value.shape:
            raise CheckpointError(
                f"state dict mask {key!r} has shape {tuple(value.shape)}, the model's {name} has "
                f"{tuple(getattr(target, 'shape', ()))}"
            )
        torch_prune.custom_from_mask(module, name, value.to(target.device, dtype=torch.bool))
        _ensure_copyable(module)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"state dict does not fit the model: {lines[-1] if lines else exc}") from None
    refresh_masked(model)  # so that module.weight right after loading holds the loaded values


def pruned_parameters(model: nn.Module) -> int:
    """How many parameter entries the masks on ``model`` remove (weights and, for pruned units, biases)."""
    return sum(int((buffer == 0).sum()) for name, buffer in model.named_buffers() if name.endswith("_mask"))


def model_sparsity(model: nn.Module, keys: list[str] | None = None) -> float:
    """Fraction of zero entries over the weights named by ``keys`` (default: all masked weights of two or more dimensions)."""
    zeros = total = 0
    for module_name, module in unwrap(model).named_modules():
        for name in ("weight", *ATTENTION_PROJECTIONS):
            key = f"{module_name}.{name}" if module_name else name
            weight = getattr(module, name, None)
            if not isinstance(weight, torch.Tensor) or (keys is not None and key not in keys):
                continue
            if keys is None and (not hasattr(module, f"{name}_mask") or weight.dim() < 2):
                continue  # by default: masked weight matrices and filters (not a BatchNorm's masked scale)
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return zeros / total if total else 0.0


def _effective_scores(model: nn.Module, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Entries already pruned go first, so masks only ever shrink and the
    # sparsity target counts them.
    existing = current_masks(model, scores)
    return {
        key: torch.where(existing[key], s.detach().float().cpu(), torch.tensor(-math.inf))
        for key, s in scores.items()
    }


def _check_units_left(masks: dict[str, torch.Tensor], model: nn.Module) -> None:
    for key, mask in masks.items():
        if _is_neuron(_module(model, key), mask, key) and not mask.any():
            raise ConfigError(
                f"this sparsity would remove every unit of {key.rsplit('.', 1)[0]!r} "
                f"({mask.numel()} units); lower the sparsity or use scope='layer'"
            )


def prune(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    *,
    seed: int = 0,
    blocks: str | Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``model`` one-shot: remove the ``sparsity`` least significant entries.

    Args:
        model: the trained model; modified in place (masks attached).
        scores: ``{"fc1.weight": tensor}``, higher = more significant, shaped
            like the weight (weight granularity) or ``(out_units,)`` (neuron).
        sparsity: fraction of the scored entries to prune, in [0, 1); exact
            to the entry (``round(sparsity * n)``).
        scope: ``"global"`` (one ranking over all scored entries, each layer
            keeping a floor: :data:`bingo.selection.MIN_KEEP`), ``"layer"``, or
            ``"lamp"`` (one ranking by layer-normalised LAMP scores), or
            ``"block"`` (each block, e.g. a transformer's ``h.0.``, pruned to
            ``sparsity`` with one ranking inside it); see
            :func:`bingo.selection.select_masks`.
        seed: tie-breaking seed (see :mod:`bingo.selection`).
        blocks: with ``scope="block"``, what a block is: a regex or ``key ->
            block name`` (default: the path up to the first numeric index;
            :func:`bingo.selection.block_of`).

    Returns:
        The keep-masks the model has now, keyed and shaped like ``scores``
        (True = kept). Masks only shrink: on a model already pruned beyond
        ``sparsity`` nothing more is removed, the masks returned are the
        model's (sparser than asked), and a warning says so.
    """
    check_choice("scope", scope, SCOPES)
    masks = select_masks(_effective_scores(model, scores), sparsity, scope, seed, blocks=blocks)
    _check_units_left(masks, model)
    apply_masks(model, masks)
    applied = current_masks(model, scores)
    pruned = sum(int((~m).sum()) for m in applied.values())
    total = sum(m.numel() for m in applied.values())
    if total and pruned > sum(int((~m.bool()).sum()) for m in masks.values()):
        warnings.warn(
            f"the model already had {pruned / total:.4g} of these entries pruned, more than the requested "
            f"{sparsity:g}; masks only shrink, so it stays at {pruned / total:.4g}",
            stacklevel=2,
        )
    return applied


@dataclass(frozen=True)
class AccuracyFloorResult:
    """Outcome of :func:`prune_to_accuracy`."""

    masks: dict[str, torch.Tensor]
    sparsity: float  #: fraction of scored entries pruned
    accuracy: float  #: evaluate() of the pruned model
    floor: float  #: the accuracy that had to be kept
    dense_accuracy: float
    evaluations: int  #: how many times evaluate() ran


def prune_to_accuracy(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    evaluate: Callable[[nn.Module], float],
    *,
    min_accuracy: float | None = None,
    max_drop: float | None = None,
    scope: str = "global",
    seed: int = 0,
    groups: list | None = None,
) -> AccuracyFloorResult:
    """Prune as far as possible while ``evaluate(model) >= floor`` (the paper's rule).

    With ``groups`` (:func:`bingo.channel_groups`; neuron scores), every
    probe prunes tied channels together with :func:`bingo.prune_coupled`,
    and the sparsity is the fraction of the groups' channels.

    The floor is ``min_accuracy`` (absolute) or ``dense - max_drop`` (relative to
    the unpruned model); give exactly one. Entries are removed in score order
    (least significant first); the largest count that keeps the floor is found
    by bisection, about ``log2(n)`` evaluations instead of one per weight. This
    assumes accuracy falls monotonically along the score order, which holds
    closely but not exactly; the returned accuracy is always measured, never
    interpolated. Use a held-out (validation) set in ``evaluate``, not the test set.
    """
    if (min_accuracy is None) == (max_drop is None):
        raise ConfigError("give exactly one of min_accuracy (absolute floor) or max_drop (drop from dense)")
    for name, value in (("min_accuracy", min_accuracy), ("max_drop", max_drop)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be an accuracy in [0, 1], got {value!r}")
    check_choice("scope", scope, SCOPES)
    if groups:
        return _coupled_to_accuracy(model, scores, evaluate, groups, min_accuracy, max_drop, scope, seed)
    effective = _effective_scores(model, scores)
    shapes = {key: s.shape for key, s in effective.items()}
    # Step j of the bisection is sparsity j / steps. In the global scopes (global, lamp)
    # steps is the number of entries, so select_masks prunes round(j / steps * steps) = j
    # of them; per layer it prunes round(j / steps * n_l) of each layer's n_l.
    if scope == "layer":
        steps = max(s.numel() for s in effective.values())
    else:
        steps = sum(s.numel() for s in effective.values())

    def masks_at(j: int) -> dict[str, torch.Tensor]:
        return select_masks(effective, j / steps, scope, seed)

    evaluations = 0

    def accuracy_at(j: int) -> float:
        nonlocal evaluations
        masks = masks_at(j)
        try:
            _check_units_left(masks, model)
        except ConfigError:
            return -math.inf  # a layer left with no units: never allowed, whatever the floor
        trial = copy.deepcopy(model)
        apply_masks(trial, masks)
        evaluations += 1
        return float(evaluate(trial))

    already = int(sum((~m).sum() for m in current_masks(model, scores).values()))
    dense = float(evaluate(model))
    evaluations += 1
    if min_accuracy is not None:
        floor = float(min_accuracy)
    else:
        floor = dense - float(max_drop)
    if not (0.0 <= floor <= 1.0) and min_accuracy is not None:
        raise ConfigError(f"min_accuracy must be in [0, 1], got {min_accuracy!r}")
    # Bisection for the largest j with accuracy >= floor; j = 0 prunes nothing new.
    lo, lo_acc = (0, dense) if scope in ("layer", "block") else (already, dense)
    hi = steps  # pruning everything is never allowed; treated as failing
    while hi - lo > 1:
        mid = (lo + hi) // 2
        acc = accuracy_at(mid)
        if acc >= floor:
            lo, lo_acc = mid, acc
        else:
            hi = mid
    masks = masks_at(lo)
    apply_masks(model, masks)
    total = sum(math.prod(s) for s in shapes.values())
    pruned = int(sum((~m).sum() for m in masks.values()))
    return AccuracyFloorResult(masks, pruned / total, lo_acc, floor, dense, evaluations)


def _coupled_to_accuracy(
    model: nn.Module, scores: dict[str, torch.Tensor], evaluate: Callable[[nn.Module], float], groups: list,
    min_accuracy: float | None, max_drop: float | None, scope: str, seed: int,
) -> AccuracyFloorResult:
    """:func:`prune_to_accuracy` over tied channels: the same bisection, each probe a :func:`bingo.prune_coupled`."""
    from .coupled import prune_coupled

    sizes = [group.channels for group in groups if any(key in scores for key in group.members)]
    if not sizes:
        raise ConfigError("none of the coupled channel groups has scores: pass neuron-granularity scores of their layers")
    steps = max(sizes) if scope == "layer" else sum(sizes)
    evaluations = 1
    dense = float(evaluate(model))
    floor = float(min_accuracy) if min_accuracy is not None else dense - float(max_drop)
    lo, lo_acc, hi = 0, dense, steps
    while hi - lo > 1:
        mid = (lo + hi) // 2
        trial = copy.deepcopy(model)
        try:
            prune_coupled(trial, scores, groups, mid / steps, scope, seed=seed)
        except ConfigError:  # a group left with no channels: never allowed
            hi = mid
            continue
        acc = float(evaluate(trial))
        evaluations += 1
        if acc >= floor:
            lo, lo_acc = mid, acc
        else:
            hi = mid
    masks = prune_coupled(model, scores, groups, lo / steps, scope, seed=seed)
    sparsity = sum(int((~masks[group.key]).sum()) for group in groups if group.key in masks) / sum(sizes)
    return AccuracyFloorResult(masks, sparsity, lo_acc, floor, dense, evaluations)
