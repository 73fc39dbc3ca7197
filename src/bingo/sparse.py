"""Unstructured sparsity as speed: pruned ``nn.Linear`` weights stored as sparse matrices, where that measures faster.

A mask makes a model sparse, not fast: a 90%-masked Linear still multiplies
every zero. :func:`to_sparse` replaces each sufficiently sparse layer by a
:class:`SparseLinear`, whose weight is a CSR matrix (``torch.sparse_csr``,
32-bit indices: MKL's kernels on the CPU, cuSPARSE's on CUDA), or on CUDA,
for a 2:4 weight in float16 / bfloat16, by a semi-structured sparse weight
(:func:`bingo.semi_structured.semi_structured_weight`) — but only where it
measures faster than the layer as it is, on the model's own device and on
an input of that layer's width. Which layers have such a form is their
layer type's answer (:meth:`bingo.layer_types.LayerType.linear_form`):
``nn.Linear`` and GPT-2's ``Conv1D``; a conv or an ``nn.MultiheadAttention``
(which reads its ``out_proj.weight`` itself) has none.

Whether a sparse matrix pays depends on the sparsity, the layer's size and
the batch (how many rows of inputs a call multiplies). On a 2-core x86 CPU
at one thread (torch 2.13, MKL): a 4096² Linear is faster as CSR from about
50% sparsity at batch 1 (1.0× at 50%, 1.5× at 70%, 2.2× at 80%, about 5× at
90%: ``benchmarks/masked_speed.py``), but at batch 64 only above about 70%
(1.0× at 70%, 1.5× at 80%, about 2.6× at 90%); a 1024² one, which dense
BLAS keeps in cache, needs over 80% at batch 1. Below 50% no layer measured
faster, hence ``min_sparsity=0.5``: layers below it are not even timed.
The decision holds for the batch and thread count it was timed with: time
under the ones you serve with (``batch_size=``, ``torch.set_num_threads``).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checks import check_model
from .devices import model_device
from .distributed import unwrap
from .errors import ConfigError, check_choice
from .inputs import example_inputs as as_example_inputs
from .layer_types import layer_type_of
from .layers import tied_weights
from .masks import cached_masks, masked_names, masked_value
from .selection import is_n_m

__all__ = ["CHOICES", "SparseLayer", "SparseLinear", "SparseResult", "forward_seconds", "to_sparse"]

#: how :func:`to_sparse` decides: "faster" = where a layer's sparse form measures faster; "always" = every layer at or
#: above ``min_sparsity``, untimed (for memory, or a deterministic conversion)
CHOICES = ("faster", "always")

_CSR = ("weight_crow_indices", "weight_col_indices", "weight_values")

#: seconds each timing of one module aims to take (it repeats the call until then, at least once)
_TIMING_SECONDS = 0.005


class SparseLinear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` (``out_features × in_features``) held as a CSR sparse matrix: an inference-only ``nn.Linear``.

    Computes what the ``nn.Linear`` it replaces computed, to float rounding
    (the sums run in another order), on inputs of any shape
    ``(..., in_features)``, under ``torch.no_grad()``, inference mode or
    neither. ``weight`` is the CSR tensor, rebuilt on each access from
    three buffers (``weight_crow_indices``, ``weight_col_indices``,
    ``weight_values``: what ``state_dict`` holds, so a copy, a pickle,
    ``.to(device)`` and ``.double()`` behave as for any module; on the CPU,
    whose CSR kernels take no float16 / bfloat16, ``.half()`` layers compute
    in float32 and return their own dtype); ``bias`` is a parameter as in
    ``nn.Linear``. Nothing trains the weight: it is not a
    parameter and gets no gradient.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ConfigError(f"SparseLinear takes a 2-D weight (out_features × in_features), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        with warnings.catch_warnings():  # torch warns once per process that CSR support is in beta
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            csr = weight if weight.layout == torch.sparse_csr else weight.to_sparse_csr()
        # MKL converts 64-bit indices on every call: 32-bit ones make a batch-1 product about twice as fast
        small = max(csr.values().numel(), self.in_features, self.out_features) < 2**31
        index = torch.int32 if small else torch.int64
        self.register_buffer("weight_crow_indices", csr.crow_indices().to(index))
        self.register_buffer("weight_col_indices", csr.col_indices().to(index))
        self.register_buffer("weight_values", csr.values().clone())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The weight as a ``torch.sparse_csr`` tensor (``out_features × in_features``), sharing the buffers' memory."""
        # the buffers were built here or checked when loaded, so the invariants hold; checking costs a pass over them
        return torch.sparse_csr_tensor(self.weight_crow_indices, self.weight_col_indices, self.weight_values,
                                       (self.out_features, self.in_features), check_invariants=False)

    @property
    def sparsity(self) -> float:
        """Fraction of the weight's entries not stored."""
        return 1.0 - self.weight_values.numel() / max(1, self.out_features * self.in_features)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            raise RuntimeError(f"SparseLinear takes inputs shaped (..., {self.in_features}); got {tuple(input.shape)}")
        weight, bias = self.weight, self.bias
        rows = input.reshape(-1, self.in_features)
        dtype = None
        if weight.device.type == "cpu" and weight.dtype in (torch.float16, torch.bfloat16):
            # torch's CPU CSR products have no float16 / bfloat16 kernel: compute in float32, return the layer's dtype
            dtype, weight, rows = weight.dtype, weight.to(torch.float32), rows.to(torch.float32)
            bias = None if bias is None else bias.to(torch.float32)
        if rows.shape[0] == 1:  # a matrix-vector product: a kernel of its own
            out = (torch.mv(weight, rows[0]) if bias is None else torch.addmv(bias, weight, rows[0])).unsqueeze(0)
        else:  # W xᵀ: sparse × dense, the product the sparse kernels take
            out = (torch.mm(weight, rows.T) if bias is None else torch.addmm(bias.unsqueeze(1), weight, rows.T)).T
        out = out if dtype is None else out.to(dtype)
        return out.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layout=sparse_csr, nnz={self.weight_values.numel()}, sparsity={self.sparsity:.3f}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # another pruned weight has another number of stored entries: take its index and value buffers at their size
        crow = state_dict.get(prefix + "weight_crow_indices")
        if isinstance(crow, torch.Tensor) and crow.shape != (self.out_features + 1,):
            error_msgs.append(f"{prefix}weight_crow_indices has {crow.numel()} entries; a SparseLinear with "
                              f"{self.out_features} output features takes {self.out_features + 1}")
            return
        for name in _CSR[1:]:
            incoming, current = state_dict.get(prefix + name), getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.dim() == 1 and incoming.shape != current.shape:
                setattr(self, name, torch.empty(incoming.shape, device=current.device, dtype=current.dtype))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        try:  # what was loaded must be a CSR matrix of this shape: the forward does not check (see weight)
            torch._validate_sparse_csr_tensor_args(self.weight_crow_indices, self.weight_col_indices, self.weight_values,
                                                   (self.out_features, self.in_features))
        except RuntimeError as exc:
            error_msgs.append(f"{prefix}weight_* do not make a CSR matrix of shape ({self.out_features}, "
                              f"{self.in_features}): {_first_line(exc)}")


@dataclass(frozen=True)
class SparseLayer:
    """What :func:`to_sparse` found and decided for one layer."""

    name: str  #: module name
    kind: str  #: its layer type's name (``"Linear"``, ``"Conv1D"``, ...)
    converted: bool
    #: why: "faster as CSR", "slower as CSR (0.8× the dense)", "sparsity 0.30 below min_sparsity 0.5", ...
    reason: str
    #: fraction of zero weights in the forward's weight (masks applied); None where the layer has no sparse form
    sparsity: float | None = None
    #: the sparse form chosen or tried fastest: "csr" or "2:4"; None where none was built
    form: str | None = None
    #: median over the interleaved rounds of (the layer's time ÷ its sparse form's time); None where not timed
    speedup: float | None = None
    #: (lowest, highest) of those ratios
    speedup_range: tuple[float, float] | None = None
    #: shape of the input it was timed on
    input_shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SparseResult:
    """What :func:`to_sparse` did, layer by layer (every module with a layer type, in model order)."""

    layers: tuple[SparseLayer, ...]
    device: str  #: the model's device, where everything was timed
    choose: str
    min_sparsity: float
    seconds: float  #: wall time of the whole conversion, timing included

    @property
    def converted(self) -> tuple[str, ...]:
        """Names of the modules replaced, in model order."""
        return tuple(layer.name for layer in self.layers if layer.converted)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus ``converted``."""
        return {**dataclasses.asdict(self), "converted": list(self.converted)}


def _seconds(measure: Callable[[nn.Module, torch.Tensor], float], module: nn.Module, x: torch.Tensor) -> float:
    """``measure(module, x)`` checked to be seconds per call: a finite number > 0 (one-line :class:`ConfigError` else)."""
    seconds = measure(module, x)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"to_sparse: measure(module, x) must return the seconds one call takes (a finite number > 0), "
                          f"got {seconds!r}")
    return float(seconds)


def forward_seconds(module: nn.Module, x: torch.Tensor) -> float:
    """Seconds per call of ``module(x)``: the call repeated for about 5 ms (at least twice), the device synchronised.

    The default ``measure`` of :func:`to_sparse`; its first call is not counted (a warm-up that also sets the count).
    """
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda device=None: None)
    sync(x.device)
    start = time.perf_counter()
    module(x)
    sync(x.device)
    calls = max(2, min(1000, math.ceil(_TIMING_SECONDS / max(time.perf_counter() - start, 1e-7))))
    start = time.perf_counter()
    for _ in range(calls):
        module(x)
    sync(x.device)
    return (time.perf_counter() - start) / calls


def _current(module: nn.Module, name: str) -> torch.Tensor | None:
    """The value of ``module.<name>`` the forward uses (the mask applied), detached; None when it has none."""
    if name in masked_names(module):
        return masked_value(module, name).detach()
    value = getattr(module, name, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def _semi_structured_form(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module | None:
    """An ``nn.Linear`` with a 2:4 semi-structured weight, where the device and dtype allow one; else None."""
    if weight.device.type != "cuda" or weight.dtype not in (torch.float16, torch.bfloat16) or not is_n_m(weight != 0, 2, 4):
        return None
    from .semi_structured import semi_structured_weight

    try:
        sparse_weight = semi_structured_weight(name, weight)
    except ConfigError:
        return None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    linear.weight = nn.Parameter(sparse_weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return linear


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def _check(min_sparsity: float, batch_size: int, choose: str, repeats: int, measure: object) -> None:
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0 <= min_sparsity < 1:
        raise ConfigError(f"min_sparsity must be a number in [0, 1) (the fraction of zero weights from which a layer "
                          f"is tried), got {min_sparsity!r}")
    for what, value in (("batch_size", batch_size), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    check_choice("choose", choose, CHOICES)
    if measure is not None and not callable(measure):
        raise ConfigError(f"measure must be a function (module, input) -> seconds per call, or None; got {type(measure).__name__}")


def _captured_inputs(model: nn.Module, value: Any, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The first input each of ``modules`` receives when ``model`` runs on ``value`` (eval mode, no gradients)."""
    example = as_example_inputs(model, value, "to_sparse")
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if name not in captured and args and isinstance(args[0], torch.Tensor):
                captured[name] = args[0].detach().clone()
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    flags = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            example(model)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
    return captured


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child (a module registered twice is replaced at both places)."""
    for parent in model.modules():
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


def to_sparse(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    min_sparsity: float = 0.5,
    batch_size: int = 1,
    choose: str = "faster",
    repeats: int = 5,
    measure: Callable[[nn.Module, torch.Tensor], float] | None = None,
) -> SparseResult:
    """Replace, in place, every sparse enough ``nn.Linear`` of ``model`` by a sparse form, where that measures faster.

    **For inference only**: a replaced layer's weight is no parameter and
    gets no gradient (its bias still is one). Convert a copy
    (``copy.deepcopy(model)``) to keep training the original.

    In place, like :func:`bingo.to_semi_structured` and
    :func:`bingo.make_permanent`: the model keeps its class and ``forward``;
    each replaced module (its mask with it) is gone, a
    :class:`SparseLinear` (or, on CUDA, an ``nn.Linear`` with a 2:4
    semi-structured weight) in its place, computing the same outputs to
    float rounding. Forward hooks the user put on a replaced module do not
    carry over. Modules kept are not touched, masks and all.

    Per layer, in model order. Layers are those whose layer type has a
    :meth:`~bingo.layer_types.LayerType.linear_form` (``nn.Linear``, GPT-2's
    ``Conv1D``; not convs, nor an ``nn.MultiheadAttention``'s
    ``out_proj``). The weight the forward uses (masked or plain; zeros are
    zeros either way) is left as it is when its fraction of zeros is below
    ``min_sparsity``, or when it is shared with another module (a tied
    ``lm_head``). Otherwise its sparse forms are built (CSR; on CUDA, for a
    2:4 float16 / bfloat16 weight, also semi-structured) and, with
    ``choose="faster"``, timed against the layer as it is: ``repeats``
    interleaved rounds (the layer, then each form), each a call of
    ``measure(module, x) -> seconds``, on the device of the layer's weight.
    A form replaces the layer only if the median over rounds of (layer time
    ÷ form time) is above 1; the fastest one wins. ``choose="always"``
    converts to CSR without timing.

    Args:
        model: the model (a DDP wrapper is unwrapped), on any device; its device is taken from its weights.
        example_inputs: inputs as the model takes them (a tensor, a tuple or a dict of tensors, with a batch
            dimension), or one sample's shape (:mod:`bingo.inputs`). Each layer is then timed on the input it
            receives in that call (a transformer's ``(batch, tokens, width)``), and a layer the call does not
            reach is left alone. Without them, each layer is timed on seeded normal inputs ``(batch_size, in)``.
        min_sparsity: fraction of zero weights, in ``[0, 1)``, from which a layer is tried.
        batch_size: rows of the timing input when no ``example_inputs`` are given.
        choose: ``"faster"`` or ``"always"`` (:data:`CHOICES`).
        repeats: interleaved timing rounds per layer.
        measure: ``(module, input) -> seconds per call``; default :func:`forward_seconds`. A test passes a
            function of the module's type to decide without a clock.

    Returns:
        A :class:`SparseResult`: every module with a layer type, converted or not and why, with its sparsity
        and measured speed-up (``.converted`` names the replaced ones; ``.as_dict()`` for JSON).

    Raises:
        ConfigError: ``min_sparsity`` outside ``[0, 1)``, ``batch_size`` or ``repeats`` not a positive integer,
            an unknown ``choose``, a ``measure`` that is not callable, ``example_inputs`` the model does not take,
            or a model with no layer that has a sparse form (no ``nn.Linear``).
    """
    _check(min_sparsity, batch_size, choose, repeats, measure)
    measure = measure or forward_seconds
    started = time.perf_counter()
    model = unwrap(check_model("to_sparse", model))
    typed = {name: (module, layer_type) for name, module in model.named_modules()
             if (layer_type := layer_type_of(module)) is not None}
    forms: dict[str, tuple[torch.Tensor, torch.Tensor | None] | str] = {}
    with torch.no_grad():
        for name, (module, layer_type) in typed.items():
            weight = _current(module, "weight")
            forms[name] = (layer_type.linear_form(module, weight, _current(module, "bias")) if weight is not None
                           else f"no sparse form is defined for {type(module).__name__} ({layer_type.name}): it has no 'weight'")
    if not any(isinstance(form, tuple) for form in forms.values()):
        raise ConfigError(f"{type(model).__name__} has no nn.Linear (nor other layer with a sparse form: Linear, "
                          "Conv1D) to convert")
    inputs = {}
    if example_inputs is not None:
        inputs = _captured_inputs(model, example_inputs, {n: typed[n][0] for n, f in forms.items() if isinstance(f, tuple)})
    tied = {alias for key, aliases in tied_weights(model).items() for alias in (key, *aliases)}
    device = model_device(model)

    layers, replacements = [], {}
    for name, (module, layer_type) in typed.items():
        form = forms[name]
        if isinstance(form, str):
            layers.append(SparseLayer(name, layer_type.name, False, form))
            continue
        weight, bias = form
        sparsity = float((weight == 0).sum()) / max(1, weight.numel())
        row = dict(name=name, kind=layer_type.name, sparsity=sparsity)
        key = f"{name}.weight" if name else "weight"
        if key in tied:
            layers.append(SparseLayer(**row, converted=False, reason="its weight is shared with another module (tied); "
                                      "a sparse copy would untie it"))
            continue
        if sparsity < min_sparsity:
            layers.append(SparseLayer(**row, converted=False, reason=f"sparsity {sparsity:.2f} below min_sparsity {min_sparsity:g}"))
            continue
        if example_inputs is not None and name not in inputs:
            layers.append(SparseLayer(**row, converted=False, reason="not called on the example inputs"))
            continue
        csr = SparseLinear(weight, bias)
        candidates = {"csr": csr}
        semi = _semi_structured_form(name, weight, bias) if choose == "faster" else None
        if semi is not None:
            candidates["2:4"] = semi
        for candidate in candidates.values():
            candidate.train(module.training)
        if name in inputs:
            x = inputs[name]
        else:
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(batch_size, weight.shape[1], generator=generator).to(device=weight.device, dtype=weight.dtype)
        ratios: dict[str, list[float]] = {form_name: [] for form_name in candidates}
        failed: dict[str, str] = {}
        with torch.no_grad(), cached_masks():  # the masked layer at its best: its product multiplied out once
            for form_name, candidate in candidates.items():  # a kernel that does not take this dtype / device fails here
                try:
                    candidate(x)
                except (RuntimeError, NotImplementedError, TypeError) as exc:
                    failed[form_name] = _first_line(exc)
            for form_name in failed:
                del candidates[form_name], ratios[form_name]
            for _ in range(repeats if candidates and choose == "faster" else 0):
                base = _seconds(measure, module, x)
                for form_name, candidate in candidates.items():
                    ratios[form_name].append(base / _seconds(measure, candidate, x))
        shape = tuple(x.shape)
        if not candidates:
            why = "; ".join(f"{form_name}: {message}" for form_name, message in failed.items())
            layers.append(SparseLayer(**row, converted=False, reason=f"no sparse kernel takes it here ({why})", input_shape=shape))
            continue
        if choose == "always":
            replacements[name] = csr
            layers.append(SparseLayer(**row, converted=True, reason="choose='always'", form="csr", input_shape=shape))
            continue
        speedups = {form_name: statistics.median(values) for form_name, values in ratios.items()}
        best = max(speedups, key=speedups.get)
        spread = (min(ratios[best]), max(ratios[best]))
        faster = speedups[best] > 1.0
        label = "CSR" if best == "csr" else "2:4 semi-structured"
        reason = (f"faster as {label}" if faster else
                  f"slower as {label} ({speedups[best]:.2f}× the layer as it is)")
        if faster:
            replacements[name] = candidates[best]
        layers.append(SparseLayer(**row, converted=faster, reason=reason, form=best, speedup=speedups[best],
                                  speedup_range=spread, input_shape=shape))
    for name, new in replacements.items():
        _replace(model, typed[name][0], new)
    return SparseResult(layers=tuple(layers), device=str(device), choose=choose, min_sparsity=float(min_sparsity),
                        seconds=time.perf_counter() - started)
