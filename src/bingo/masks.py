"""Mask mechanics: putting keep-masks on a model, reading them back, baking them in.

Masks go on through ``torch.nn.utils.prune.custom_from_mask``, so a pruned
model looks exactly like one pruned with PyTorch's own utilities: the module
holds ``weight_orig`` and a ``weight_mask`` buffer, ``prune.remove`` (or
:func:`make_permanent`) bakes the zeros in, the masks travel in
``state_dict``, and masked weights stay zero through further training.

Two granularities, told apart by the shape of a mask (or of scores):
- weight: shaped like the weight, one entry per weight;
- neuron: ``(units,)``, units on the weight's unit axis (its layer type's:
  rows of a Linear, filters of a conv, columns of GPT-2's ``Conv1D``);
  masking a unit masks its whole row / filter and its bias entry.

Which weights to mask is decided elsewhere (:mod:`bingo.selection`,
:mod:`bingo.pruning`): nothing here ranks anything.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .checks import check_model, check_names, check_scores, check_state_dict
from .distributed import unwrap
from .errors import CheckpointError, ConfigError
from .layer_types import expand_units, layer_type_of, unit_matrix
from .layers import (ATTENTION_PROJECTIONS, bias_name_of, computed_weight, computed_weight_refusal, has_units, parameter_name,
                     tied_weights, unit_axis, weight_of, weight_parameter_name)

__all__ = [
    "apply_masks",
    "cached_masks",
    "check_units_left",
    "current_masks",
    "is_unit_mask",
    "keep_copyable",
    "load_pruned_state_dict",
    "make_permanent",
    "mask_attention_outputs",
    "masked_names",
    "masked_value",
    "model_sparsity",
    "permanent_copy",
    "pruned_parameters",
    "put_masks_from_state",
    "refresh_masked",
    "weight_owner",
]


def weight_owner(model: nn.Module, key: str) -> nn.Module:
    """The module that owns weight ``key`` (``"fc1.weight"`` -> ``fc1``); :class:`ConfigError` if there is none."""
    model = unwrap(model)  # keys name the inner module's parameters
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name) if module_name else model
    except AttributeError:
        wrapper = next((p for p in ("_orig_mod.", "module.") if key.startswith(p)), None)
        if wrapper is not None:  # a key of the torch.compile / DDP wrapper's own parameter names
            raise ConfigError(f"score key {key!r} names the wrapper's parameter: keys name the inner module's "
                              f"({key[len(wrapper):]!r}, as bingo's scores and searches give them)") from None
        raise ConfigError(f"score key {key!r} names no module of {type(model).__name__}") from None
    layer_type = layer_type_of(module)
    names = layer_type.weights(module) if layer_type is not None else ("weight",)
    if attr not in names and attr not in ("weight", *ATTENTION_PROJECTIONS):
        raise ConfigError(
            f"score key {key!r} does not name a weight (expected '<module>.weight' or a MultiheadAttention's "
            f"'<module>.{{{','.join(ATTENTION_PROJECTIONS)}}}')"
        )
    computed = computed_weight(module, attr)
    if computed is not None:  # checked before reading it: a read may change it (a spectral norm's power iteration)
        raise computed_weight_refusal(key, attr, computed, "prune")
    if not isinstance(getattr(module, weight_parameter_name(module, attr), None), torch.Tensor):
        raise ConfigError(f"score key {key!r} names {module_name or 'the model'} ({type(module).__name__}), which has no {attr}")
    return module


def is_unit_mask(module: nn.Module, mask_or_scores: torch.Tensor, key: str) -> bool:
    """True if ``mask_or_scores`` is per unit ``(units,)``, False if per weight; :class:`ConfigError` for any other shape."""
    weight = weight_of(module, key)
    if mask_or_scores.shape == weight.shape:
        return False
    units = weight.shape[unit_axis(module, key)]
    if mask_or_scores.shape == (units,):
        if not has_units(module, key):
            raise ConfigError(f"scores for {key!r} are per unit; attention q/k/v projections take one score per weight, shaped {tuple(weight.shape)}")
        return True
    raise ConfigError(
        f"scores for {key!r} have shape {tuple(mask_or_scores.shape)}; expected the weight's "
        f"{tuple(weight.shape)} (weight granularity) or ({units},) (neuron granularity)"
    )


def _mask_of(module: nn.Module, key: str) -> torch.Tensor | None:
    return getattr(module, f"{parameter_name(key)}_mask", None)


def _unit_mask_of(module: nn.Module, key: str) -> torch.Tensor:
    """Units still alive: a unit is pruned when its whole weight row is masked."""
    mask = _mask_of(module, key)
    axis = unit_axis(module, key)
    if mask is None:
        return torch.ones(weight_of(module, key).shape[axis], dtype=torch.bool)
    return unit_matrix(mask, axis).bool().any(dim=1).cpu()


def current_masks(model: nn.Module, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keep-masks already on ``model`` for the keys (and granularity) of ``like``."""
    check_model("current_masks", model, meta=False)
    like = check_scores("current_masks", like, "like")
    masks = {}
    for key, ref in like.items():
        module = weight_owner(model, key)
        if is_unit_mask(module, ref, key):
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
            for name in masked_names(module):
                setattr(module, name, masked_value(module, name))


def masked_names(module: nn.Module) -> list[str]:
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
    for name in masked_names(module):
        tensor = module.__dict__.get(name)
        if tensor is not None and tensor.grad_fn is not None:
            setattr(module, name, tensor.detach())


#: per thread: ``depth``, how many :func:`cached_masks` blocks are open (0: torch's behaviour, the product
#: recomputed every forward), and ``block``, which one (a product cached in an earlier block is never reused)
_CACHING = threading.local()
_CACHING_BLOCKS = itertools.count(1)


@contextlib.contextmanager
def cached_masks() -> Iterator[None]:
    """Inside this block, masked forwards outside training reuse ``weight_orig * weight_mask`` while neither changed.

    ``torch.nn.utils.prune`` recomputes the product into a fresh full-size
    tensor before every forward, which makes a masked model slower than the
    dense one (a 90%-pruned 4096² Linear ran at 0.12× dense speed at batch 1:
    ``benchmarks/masked_speed.py``). Inside the block (like
    ``torch.nn.utils.parametrize.cached()``), a forward with no autograd
    recording for the weight (evaluation, ``torch.no_grad``, a frozen weight)
    computes the product once and reuses it while ``weight_orig`` and the mask
    are the same tensors with the same storage and version counter: an
    optimizer step, ``copy_``, ``load_state_dict`` or any in-place write bumps
    it, and the next forward sees the change. A write through ``.data``
    (``p.data.copy_(...)``) bumps nothing, so it is invisible to the check:
    write weights that way only outside the block. Training forwards are
    unaffected. Outside the block, masked modules behave exactly as
    ``torch.nn.utils.prune``'s. Nests; per thread (a block in one thread
    leaves the others' forwards as torch's).

    bingo's own repeated forwards (fake passes, compensation's calibration
    passes, evaluation in the benchmark harness) run inside it.
    """
    depth = getattr(_CACHING, "depth", 0)
    if depth == 0:
        _CACHING.block = next(_CACHING_BLOCKS)
    _CACHING.depth = depth + 1
    try:
        yield
    finally:
        _CACHING.depth -= 1


class _CachedProduct:
    """Mixin for ``torch.nn.utils.prune``'s hooks: inside :func:`cached_masks`, reuse ``orig * mask`` while neither changed.

    Outside the block, or with autograd recording for ``orig`` (training),
    torch's hook runs as it is, so the product is in the graph; otherwise the
    last product is reused as long as ``orig`` and the mask are the same
    tensors with the same storage and version counter (every in-place write
    but one through ``.data`` bumps it), it was computed in the same block,
    and the module still holds it.
    """

    _cache: tuple | None = None

    def __call__(self, module: nn.Module, inputs: object) -> None:
        name = self._tensor_name
        orig, mask = getattr(module, f"{name}_orig"), getattr(module, f"{name}_mask")
        if not getattr(_CACHING, "depth", 0) or (torch.is_grad_enabled() and orig.requires_grad):
            self._cache = None
            return super().__call__(module, inputs)
        key = (_CACHING.block, orig, orig._version, orig.data_ptr(), mask, mask._version, mask.data_ptr())
        cached = self._cache
        held = module.__dict__.get(name)
        if (cached is not None and held is cached[-1] and all(a is b if isinstance(a, torch.Tensor) else a == b
                                                              for a, b in zip(cached[:-1], key))
                and not (torch.is_grad_enabled() and held.is_inference())):
            return None
        with torch.no_grad():
            value = self.apply_mask(module)
        setattr(module, name, value)
        self._cache = (*key, value)
        return None

    def __getstate__(self) -> dict:  # copies and pickles start without a cache
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state


class _CachedCustomFromMask(_CachedProduct, torch_prune.CustomFromMask):
    pass


class _CachedPruningContainer(_CachedProduct, torch_prune.PruningContainer):
    pass


_CACHED = {torch_prune.CustomFromMask: _CachedCustomFromMask, torch_prune.PruningContainer: _CachedPruningContainer}


def keep_copyable(module: nn.Module) -> None:
    """Make a masked ``module`` ``deepcopy``-able now and after every forward (see :func:`_detach_masked`), and its
    masked forwards outside training, inside :func:`cached_masks`, reuse the masked weights while unchanged; idempotent."""
    if not any(hook is _detach_masked for hook in module._forward_hooks.values()):
        module.register_forward_hook(_detach_masked)
    for handle, hook in list(module._forward_pre_hooks.items()):
        cached = _CACHED.get(type(hook))
        if cached is not None:  # the same pruning method, as its caching subclass (prune.remove still finds it)
            replacement = cached.__new__(cached)
            replacement.__dict__.update(hook.__dict__)
            module._forward_pre_hooks[handle] = replacement
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
    for name in masked_names(projection):
        setattr(projection, name, masked_value(projection, name))


def _detach_out_proj(attention: nn.Module, inputs: object, output: object) -> None:
    _detach_masked(attention.out_proj, inputs, output)


def mask_attention_outputs(model: nn.Module) -> None:
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
    may carry several masks. A tied parameter (one tensor two modules use)
    gets the same mask on every module that uses it, so it stays one
    parameter with one mask.
    """
    check_model("apply_masks", model)
    masks = check_scores("apply_masks", masks, "masks")
    for key, mask in masks.items():  # a score passed by mistake would rescale the weights, not mask them
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise ConfigError(f"apply_masks: masks[{key!r}] is not a keep-mask (bool, or 0 / 1 values; got {mask.dtype} "
                              f"values such as {float(mask[(mask != 0) & (mask != 1)][0]):g}): pass scores to bingo.prune, "
                              "masks from it (or bingo.select_masks) here")
    tied = tied_weights(model)
    canonical = {alias: key for key, aliases in tied.items() for alias in aliases}
    merged: dict[str, torch.Tensor] = {}
    for key, mask in masks.items():  # a tied weight named by another of its names is still one weight, one mask
        key = canonical.get(key, key)
        merged[key] = merged[key].bool() & mask.bool() if key in merged else mask
    for key, mask in merged.items():
        module = weight_owner(model, key)
        weight = weight_of(module, key)
        mask = mask.to(device=weight.device, dtype=weight.dtype)
        bias_mask = None
        if is_unit_mask(module, mask, key):
            bias_mask = mask
            mask = expand_units(mask, weight, unit_axis(module, key))
        for alias in (key, *tied.get(key, ())):
            owner = weight_owner(model, alias) if alias != key else module
            if bias_mask is not None and bias_name_of(owner, alias) is not None:
                _mask_keeping_order(owner, bias_name_of(owner, alias), bias_mask)
            _mask_keeping_order(owner, parameter_name(alias), mask)
    mask_attention_outputs(model)


def make_permanent(model: nn.Module) -> None:
    """Bake every mask into its parameter (``prune.remove``) and drop the masks and hooks.

    A tied parameter stays tied: every module that uses it carries the same
    mask (:func:`apply_masks`), ``prune.remove`` writes the masked values into
    the shared ``_orig`` parameter and hands it back to each module; the
    modules are made to share the first one's parameter again all the same,
    so the tie holds whatever ``prune.remove`` does.
    """
    check_model("make_permanent", model)
    shared: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name in masked_names(module):
            shared.setdefault(id(getattr(module, f"{name}_orig")), []).append((module, name))
    for module in model.modules():
        order = list(module._parameters)
        for name in masked_names(module):
            torch_prune.remove(module, name)
        _restore_order(module, order)
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for handle_id, hook in list(hooks.items()):
                if hook in (_detach_masked, _mask_out_proj, _detach_out_proj):
                    del hooks[handle_id]
    for users in shared.values():
        first, first_name = users[0]
        for module, name in users[1:]:
            setattr(module, name, getattr(first, first_name))


def permanent_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every mask baked in: what ``make_permanent(copy.deepcopy(model))`` returns, cheaper.

    A masked tensor holds three full-size tensors (``<name>_orig``, the
    ``<name>_mask`` buffer and the masked value the forward pass uses);
    deep-copying them all and then baking the masks in writes each weight
    four times. Here each masked tensor is copied once, as its masked value
    (:func:`masked_value`, which ``prune.remove`` would compute), and its mask,
    cached product and pruning hook (which keeps a mask of its own) are not
    copied at all. Tied parameters stay tied,
    ``requires_grad`` is kept, no pruning hooks remain; ``model`` is not changed.
    """
    memo: dict[int, object] = {}
    masked = False
    with torch.no_grad():
        for module in model.modules():
            names = masked_names(module)
            for name in names:
                orig, mask = getattr(module, f"{name}_orig"), getattr(module, f"{name}_mask")
                if id(orig) not in memo:  # a tied parameter: one copy for all its users
                    memo[id(orig)] = nn.Parameter(masked_value(module, name), requires_grad=orig.requires_grad)
                memo[id(mask)] = mask  # not copied: the copy drops it below
                held = module.__dict__.get(name)
                if isinstance(held, torch.Tensor):
                    memo[id(held)] = held  # the product the forward pass last used: dropped too
                masked = True
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name in names:
                    memo[id(hook)] = hook  # not copied either (it holds its own copy of the mask): dropped below
    if not masked:
        return copy.deepcopy(model)
    net = copy.deepcopy(model, memo)
    for module in net.modules():
        order = list(module._parameters)
        for name in masked_names(module):
            for handle, hook in list(module._forward_pre_hooks.items()):
                if isinstance(hook, torch_prune.BasePruningMethod) and hook._tensor_name == name:
                    del module._forward_pre_hooks[handle]
            module.__dict__.pop(name, None)
            baked = module._parameters.pop(f"{name}_orig")
            del module._buffers[f"{name}_mask"]
            module.register_parameter(name, baked)
        _restore_order(module, order)
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for handle_id, hook in list(hooks.items()):
                if hook in (_detach_masked, _mask_out_proj, _detach_out_proj):
                    del hooks[handle_id]
    return net


def _restore_order(module: nn.Module, order: list[str]) -> None:
    """Put ``module``'s parameters back in ``order`` (its names before the masks were baked in), ``<name>`` where
    ``<name>_orig`` was: ``prune.remove`` registers the baked parameter last, and an optimizer's state saved from the
    masked model (kept by position) must still fit the model made permanent."""
    wanted = [entry[: -len("_orig")] if entry.endswith("_orig") and entry not in module._parameters else entry
              for entry in order]
    wanted += [entry for entry in module._parameters if entry not in wanted]
    parameters = {entry: module._parameters[entry] for entry in wanted if entry in module._parameters}
    module._parameters.clear()
    module._parameters.update(parameters)


def _mask_keeping_order(module: nn.Module, name: str, mask: torch.Tensor) -> None:
    """``custom_from_mask(module, name, mask)``, with ``<name>_orig`` in ``<name>``'s place among the parameters.

    ``torch.nn.utils.prune`` registers ``<name>_orig`` last, so the order of
    ``model.parameters()`` would depend on when and how the masks went on; an
    optimizer's state, saved by position, then lands on the wrong tensors
    after a resume. Every masked model bingo makes keeps the dense order.
    """
    order = list(module._parameters)
    torch_prune.custom_from_mask(module, name, mask)
    renamed = [f"{name}_orig" if entry == name else entry for entry in order]
    parameters = {entry: module._parameters[entry] for entry in renamed}
    module._parameters.clear()
    module._parameters.update(parameters)
    keep_copyable(module)


def put_masks_from_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "", *,
                         strict: bool = True) -> list[str]:
    """Put on ``model`` every mask a pruned model's ``state_dict`` holds, so that the state then loads into it.

    A mask is a ``<module>.<name>_mask`` entry with its ``<name>_orig``
    beside it (under ``prefix``; a buffer that merely ends in ``_mask``, such
    as a causal mask, is not one), for a
    ``<name>`` the model has unmasked; it goes
    on through ``torch.nn.utils.prune`` as :func:`apply_masks` would, with
    ``<name>_orig`` in ``<name>``'s place among the module's parameters (so an
    optimizer's saved state still lines up). Returns the keys masked.
    ``strict``: a mask of a parameter the model lacks, or of another shape, is
    a :class:`CheckpointError`; otherwise it is left for the load to report.
    """
    masked = []
    for key, value in state_dict.items():
        if not (key.startswith(prefix) and key.endswith("_mask")):
            continue
        if f"{key[: -len('_mask')]}_orig" not in state_dict:
            continue  # a buffer that merely ends in _mask (a causal mask) is not a pruning mask
        module_name, _, attr = key[len(prefix):].rpartition(".")
        name = attr[: -len("_mask")]
        try:
            module = model.get_submodule(module_name) if module_name else model
            target = getattr(module, name)
        except AttributeError:
            if strict:
                raise CheckpointError(f"state dict masks {key!r}, which this model does not have") from None
            continue
        if hasattr(module, f"{name}_mask"):
            continue
        if not isinstance(target, nn.Parameter) or target.shape != value.shape:
            if strict:
                raise CheckpointError(
                    f"state dict mask {key!r} has shape {tuple(value.shape)}, the model's {name} has "
                    f"{tuple(getattr(target, 'shape', ()))}"
                )
            continue
        _mask_keeping_order(module, name, value.to(target.device, dtype=torch.bool))
        masked.append(key[len(prefix):-len("_mask")])
    if masked:
        mask_attention_outputs(model)
    return masked


def load_pruned_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load the ``state_dict`` of a pruned model into a fresh (unpruned) one.

    Every ``<module>.<name>_mask`` entry is first put on ``model`` as a mask
    (:func:`put_masks_from_state`), so the keys ``weight_orig`` /
    ``weight_mask`` exist; then the state is loaded strictly. Raises
    :class:`CheckpointError` if it does not fit.
    """
    check_model("load_pruned_state_dict", model, meta=False)
    check_state_dict("load_pruned_state_dict", state_dict)
    for key, value in state_dict.items():  # a mask scales its weight: anything but 0 / 1 would change the weights
        if (key.endswith("_mask") and key[: -len("_mask")] + "_orig" in state_dict and isinstance(value, torch.Tensor)
                and not value.is_meta and not bool(((value == 0) | (value == 1)).all())):
            raise CheckpointError(f"state dict entry {key!r} is not a pruning mask: it holds values other than 0 and 1")
    put_masks_from_state(model, state_dict)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"state dict does not fit the model: {lines[-1] if lines else exc}") from None
    refresh_masked(model)  # so that module.weight right after loading holds the loaded values


def pruned_parameters(model: nn.Module) -> int:
    """How many parameter entries the masks on ``model`` remove (weights and, for pruned units, biases)."""
    check_model("pruned_parameters", model)
    return sum(int((getattr(module, f"{name}_mask") == 0).sum()) for module in model.modules() for name in masked_names(module))


def model_sparsity(model: nn.Module, keys: list[str] | None = None) -> float:
    """Fraction of zero entries over the weights named by ``keys``.

    Default: every masked weight of two or more dimensions and every sparse
    one (a :func:`bingo.to_sparse` layer's CSR weight: its entries not
    stored count as zeros); on a model with no mask (pruned, then
    :func:`make_permanent` or loaded plain), every weight of two or more
    dimensions of the registered layer types, so the zeros a prune left
    still count.
    """
    keys = check_names("model_sparsity", "keys", keys, optional=True)
    if keys is None and not any(masked_names(m) for m in unwrap(model).modules()):
        keys = [key for key, _, _, weight in _layer_weights(model) if weight.dim() >= 2]
    zeros = total = 0
    seen: set[int] = set()  # a tied weight counts once
    for key, module, name, weight in _layer_weights(model):
        if keys is not None and key not in keys:
            continue
        parameter = weight_of(module, name)
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        sparse = weight.layout != torch.strided
        if keys is None and not sparse and (not hasattr(module, f"{name}_mask") or weight.dim() < 2):
            continue  # by default: masked weight matrices and filters (not a BatchNorm's masked scale)
        stored = weight.values() if sparse else weight  # a sparse tensor's entries not stored are zeros
        zeros += weight.numel() - int(stored.count_nonzero())
        total += weight.numel()
    return zeros / total if total else 0.0


def _layer_weights(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor]]:
    """``(key, module, name, weight)`` of every weight the registered layer types name (``"weight"`` for other modules)."""
    for module_name, module in unwrap(model).named_modules():
        layer_type = layer_type_of(module)
        for name in layer_type.weights(module) if layer_type is not None else ("weight",):
            weight = getattr(module, name, None)
            if isinstance(weight, torch.Tensor):
                yield (f"{module_name}.{name}" if module_name else name), module, name, weight


def check_units_left(masks: dict[str, torch.Tensor], model: nn.Module) -> None:
    """:class:`ConfigError` if a unit mask would remove every unit of its layer."""
    for key, mask in masks.items():
        if is_unit_mask(weight_owner(model, key), mask, key) and not mask.any():
            raise ConfigError(
                f"this sparsity would remove every unit of {key.rsplit('.', 1)[0]!r} "
                f"({mask.numel()} units); lower the sparsity or use scope='layer'"
            )
