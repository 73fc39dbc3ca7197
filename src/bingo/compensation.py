"""Compensation: after a one-shot prune, re-fit the surviving weights so each layer does what the dense one did.

Removing weights without touching the survivors is what makes a one-shot
prune lose accuracy without retraining; every method that prunes well
without retraining updates the survivors (Optimal Brain Surgeon, Hassibi &
Stork 1993; OBC / Optimal Brain Compression, Frantar & Alistarh 2022;
SparseGPT, Frantar & Alistarh 2023). :func:`compensate` does it as a least-
squares problem per layer, in network order:

- the **input** of layer ``l`` is what the *pruned* network (with the layers
  before ``l`` already compensated) feeds it on calibration data, ``X``
  (``N × d``; a conv's input unfolded into its patches, ``N·P × C·kh·kw``),
  with a column of ones when the layer has a bias. How a layer's input
  becomes ``X`` is its layer type's (:mod:`bingo.layer_types`: a forward
  hook on the module, never a patched function), and so is which rows of
  its weight one problem fits (an attention's q, k and v blocks are three);
- the **target** is the *dense* network's output of that layer on the dense
  inputs, ``Y = X_dense W_denseᵀ + b_dense``: so every layer also corrects
  the error the pruning of the layers before it introduced (SparseGPT's own
  target, the current weights on the pruned inputs, corrects only the
  layer's own pruning);
- each output unit ``r`` keeps the inputs its mask keeps, ``S_r``, and gets
  ``w_r = argmin ‖X[:, S_r] w − Y[:, r]‖² + λ‖w‖²``, from the Hessian
  ``H = XᵀX`` and ``XᵀY`` (each batch's products in float32, summed in
  float64), with damping ``λ = damping × mean(diag H)`` (SparseGPT's 1%),
  by a solver of :mod:`bingo.solvers` (``solver=``: exact per-row
  Cholesky, conjugate gradients to the same optimum, the SparseGPT sweep;
  ``"auto"`` by counted work).

``H`` and ``XᵀY`` are accumulated over calibration batches, so memory is
``O(d² + d·out)`` per layer, whatever the number of samples. Where torch.fx
can trace the model the calibration data go through it once, layer after
layer (:class:`bingo.graph_pass.LayerByLayer`: two forwards per batch,
whatever the depth); otherwise the model is run again for each layer (two
forwards per batch and layer; ``CompensationResult.mode`` says which). Pruned units
(neuron masks) stay zero, bias included. BatchNorm statistics are kept by
default: the fit aims at the dense layer outputs, which they describe.
``batchnorm="reestimate"`` recomputes them afterwards; measured both ways
(``benchmarks/compensation_batchnorm.py``, digits) it helped the ResNet at
80–90% sparsity and hurt it at 95%, and it hurt an under-trained tiny CNN;
after bingo's prune (``benchmarks/curve.py``) it changed ``conv`` on digits
by at most 0.2 points and cut the Fashion-MNIST ResNet from 0.572 to 0.363 at
90%, so ``"keep"`` stays the default.
The masks are never changed: it works for masks from any method. A layer
that already gives the dense output exactly (nothing pruned in it or before
it) is left as it is. A masked weight that cannot be re-fitted (a layer type
without a re-fit, such as an embedding; a tied weight, whose re-fit for one
use would change the other; a module no layer type handles) is listed in
``CompensationResult.skipped`` with the reason, and a warning says so: never
left silently. Masked vectors (biases, a BatchNorm's scale) follow their
units and are not reported.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_fraction, check_judgement, check_model, check_positive_int, describe
from .devices import model_device, to_device
from .distributed import broadcast_buffers, sum_over_ranks, unwrap, world_size
from .errors import ConfigError, check_choice
from .estimators.fake_pass import Batch, first_tensor
from .layer_types import Refit, from_unit_matrix, layer_type_of, unit_matrix
from .layers import tied_weights
from .graph_pass import LayerByLayer, NotTraceable, Stop
from .solvers import Solver, choose_solver, get_solver
from .masks import apply_masks, cached_masks, make_permanent, masked_names, masked_value, refresh_masked

__all__ = ["BATCHNORM_CHOICES", "MODES", "CompensationResult", "compensate", "reestimate_batchnorm", "suggested_calibration_samples"]

#: calibration inputs as the model takes them: a tensor ``(N, ...)``, or a tuple / dict of tensors whose first dimension is N
Calibration = torch.Tensor | tuple | Mapping

#: the fewest held-out calibration samples :func:`compensate` checks a re-fit on
MIN_HELD_OUT = 16

#: how much worse (relative squared error) on the held-out samples a re-fit may be and still stay: within it,
#: the re-fit neither helps nor hurts measurably (a first layer fed independent inputs), and is kept
HELD_OUT_TOLERANCE = 0.01

#: a re-fit that lowers the squared error on the samples fitted by less than this fraction is no gain (within
#: the float32 rounding of the sums), and the layer is left as it was
NO_GAIN = 1e-5

#: what :func:`compensate` does with BatchNorm statistics afterwards
BATCHNORM_CHOICES = ("keep", "reestimate")

#: how :func:`compensate` runs the calibration data: "graph" = one pass, layer after layer (models torch.fx can
#: trace); "per-layer" = the whole model again for every layer; "auto" = graph where it can, else per-layer
MODES = ("auto", "graph", "per-layer")


@dataclass(frozen=True)
class CompensationResult:
    """What :func:`compensate` did."""

    #: weight keys re-fitted, in network order: the pruned ones (not those that already matched the dense output)
    #: and the unmasked layers after them whose inputs the prune changed (the output layer of a neuron prune)
    layers: tuple[str, ...]
    skipped: tuple[str, ...]  #: masked layers left as they were (unsupported kind), with the reason
    error_before: dict[str, float]  #: per layer, mean squared error vs the dense output before the re-fit
    error_after: dict[str, float]  #: the same after it
    seconds: float
    forward_passes: int  #: forward calls of the model (pruned and dense) on calibration batches
    #: ``evaluate(model)`` before and after the re-fit, when it was given (higher = better)
    evaluation: tuple[float, float] | None = None
    #: True when ``evaluate`` said the re-fit made the model worse, so every layer was put back as pruned
    undone: bool = False
    #: masked weights left as they were because they already gave the dense output exactly (nothing pruned in or
    #: before them), or because their re-fit did no better on the samples fitted (nothing to gain)
    unchanged: tuple[str, ...] = ()
    #: "graph" (one pass of the calibration data, layer after layer) or "per-layer" (the model re-run for every
    #: layer; the reason follows when "graph" was not possible)
    mode: str = "per-layer"
    #: in graph mode, the extra calls of single re-fitted layers (to capture their inputs), over all batches
    layer_calls: int = 0
    #: the solver each re-fitted layer used (see :mod:`bingo.solvers`)
    solvers: dict[str, str] = field(default_factory=dict)
    #: floating-point operations of the solves (each solver's estimate), beside the forward passes
    solve_flops: float = 0.0


def _slice(value: Any, index: slice) -> Any:
    """``value`` (a tensor, or tuples and dicts of them) cut to ``index`` along the batch dimension; other values as they are."""
    if isinstance(value, torch.Tensor):
        return value[index]
    if isinstance(value, tuple):
        return tuple(_slice(v, index) for v in value)
    if isinstance(value, Mapping):
        return {k: _slice(v, index) for k, v in value.items()}
    return value


def _samples(calibration: Any) -> int:
    """How many calibration samples: the first dimension of its first tensor."""
    return len(first_tensor(calibration))


def _numbered_batches(calibration: Any, batch_size: int, split: int, device: torch.device) -> Iterator[tuple[int, Batch]]:
    """``(first sample, batch)`` over the calibration inputs, on ``device``, no batch straddling sample ``split``."""
    samples = _samples(calibration)
    for begin, end in ((0, split), (split, samples)):
        for start in range(begin, end, batch_size):
            yield start, Batch(inputs=to_device(_slice(calibration, slice(start, min(start + batch_size, end))), device))


def _batches(calibration: Any, batch_size: int, device: torch.device) -> Iterator[Batch]:
    """The calibration inputs in batches on ``device``, each called as the model takes it (``model(x)``, ``model(*x)``, ``model(**x)``)."""
    for start in range(0, _samples(calibration), batch_size):
        yield Batch(inputs=to_device(_slice(calibration, slice(start, start + batch_size)), device))


def _check_calibration(calibration: Any) -> None:
    first = first_tensor(calibration) if isinstance(calibration, (torch.Tensor, tuple, Mapping)) else None
    if first is None or first.dim() < (2 if isinstance(calibration, torch.Tensor) else 1) or len(first) == 0:
        raise ConfigError(
            "compensate needs calibration inputs: a non-empty tensor (N, ...) of training samples, "
            "or a tuple / dict of such tensors as the model takes them (model(*x), model(**x))"
        )
    lengths = dict(_sample_counts(calibration))
    for where, tensor in _tensors(calibration):
        # one pass over the inputs, small beside the fit: a NaN would make every design matrix NaN and every
        # layer "ill-conditioned", which points at the wrong cause
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ConfigError(f"the calibration inputs hold {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf)"
                              f"{' in ' + where if where else ''}; pass finite samples, as the model is trained on")
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{where or 'the tensor'} has {n}" for where, n in lengths.items())
        raise ConfigError(f"the calibration inputs disagree on the number of samples (their first dimension): {listed}; "
                          "every tensor in them needs the same N, as they are cut into batches together")


def _tensors(value: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """``(position, tensor)`` for every tensor :func:`_slice` cuts, e.g. ``("[0]", x)``, ``("['mask']", m)``."""
    if isinstance(value, torch.Tensor):
        yield where, value
    elif isinstance(value, tuple):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{where}[{i}]")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _tensors(item, f"{where}[{key!r}]")


def _sample_counts(value: Any) -> Iterator[tuple[str, int]]:
    """``(position, first dimension)`` of every tensor in the calibration inputs (:func:`_tensors`)."""
    for where, tensor in _tensors(value):
        yield where, len(tensor) if tensor.dim() else 0


def _input_check(where: str, name: str, module: nn.Module) -> Callable | None:
    """A forward pre-hook that refuses an input ``module`` cannot compute with: its dtype, or its width (its layer type's)."""
    weight = getattr(module, "weight", None)
    layer_type = layer_type_of(module)
    if ((layer_type is not None and layer_type.takes_indices) or not isinstance(weight, torch.Tensor)
            or not weight.is_floating_point() or weight.dim() < 2):
        return None
    label = f"layer {name!r} ({type(module).__name__})"

    def hook(m: nn.Module, args: tuple) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None:
            return
        if x.dtype != weight.dtype:
            raise ConfigError(f"{where}: the calibration inputs reach {label} as {x.dtype}; it computes in "
                              f"{weight.dtype}: pass inputs of that dtype (as the model is trained on)")
        width = layer_type.input_width(module, x) if layer_type is not None else None
        if width is not None and width[0] != width[1]:
            given, expected, what = width
            raise ConfigError(f"{where}: the calibration inputs give {label} {given} {what}; it takes {expected}")

    return hook


def _check_model_takes(where: str, model: nn.Module, calibration: Any) -> None:
    """Run one calibration sample through ``model`` (eval mode, no grad, RNG kept) and refuse what it cannot take.

    A layer fed the wrong dtype or width is named with what it takes; any
    other failure of the forward is one line with the sample's shape. Done
    before compensation changes anything, so the model is left as it was.
    """
    sample = _slice(calibration, slice(0, 1))
    handles = []
    for name, module in model.named_modules():
        hook = _input_check(where, name, module)
        if hook is not None:
            handles.append(module.register_forward_pre_hook(hook))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng():
            Batch(inputs=to_device(sample, model_device(model))).outputs(model)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the model raises on these inputs, one line
        shape = tuple(first_tensor(sample).shape)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{where}: the model cannot take the calibration inputs (one sample: shape {shape}): "
                          f"{type(exc).__name__}: {text}") from None
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training


def _comparable(net: nn.Module) -> dict[str, tuple[torch.Size, str]]:
    """``{state key: (shape, module type)}`` of ``net`` as its dense self: masks dropped, ``_orig`` names as the weights."""
    entries = {}
    for module_name, module in net.named_modules():
        own = [(name[:-5] if name.endswith("_orig") else name, value)
               for name, value in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
               if not (name.endswith("_mask") and hasattr(module, name[:-5] + "_orig"))]
        for name, value in sorted(own, key=lambda item: item[0] != "weight"):  # the weight first: what names a layer
            key = f"{module_name}.{name}" if module_name else name
            entries[key] = (value.shape, type(module).__name__)
    return entries


def _check_reference(model: nn.Module, reference: nn.Module) -> None:
    """:class:`ConfigError` unless ``reference`` has every parameter and buffer of ``model``, of the same shape."""
    mine, theirs = _comparable(model), _comparable(reference)
    for key, (shape, kind) in mine.items():
        if key not in theirs:
            raise ConfigError(f"compensate: reference has no {key!r} (the model's {kind}); it must be the dense model "
                              "of the same architecture")
        if theirs[key][0] != shape:
            raise ConfigError(f"compensate: reference's {key!r} has shape {tuple(theirs[key][0])}, the model's "
                              f"{tuple(shape)}; it must be the dense model of the same architecture")


@dataclass(frozen=True)
class _Target:
    """One masked weight to re-fit: where it is, its unit axis and bias, and its layer type's problems."""

    key: str
    module_name: str
    name: str
    axis: int
    bias: str | None
    refits: tuple[Refit, ...]


def _followers(model: nn.Module) -> list[_Target]:
    """Every unmasked weight a layer type can re-fit (not tied): downstream of a prune, its input changes too.

    At neuron granularity the kept units of a pruned layer compute what they
    did; what changes is the input of the layer after it, often the output
    layer, which is never masked. These are re-fitted with every input kept.
    """
    tied = tied_weights(model)
    shared = set(tied) | {alias for aliases in tied.values() for alias in aliases}
    followers = []
    for module_name, module in model.named_modules():
        layer_type = layer_type_of(module)
        if layer_type is None:
            continue
        for name in layer_type.weights(module):
            key = f"{module_name}.{name}" if module_name else name
            weight = getattr(module, name, None)
            if (key in shared or hasattr(module, f"{name}_mask") or not isinstance(weight, torch.Tensor)
                    or weight.dim() < 2):
                continue
            refits = layer_type.refits(module, name)
            if isinstance(refits, (list, tuple)) and refits and all(isinstance(r, Refit) for r in refits):
                followers.append(_Target(key, module_name, name, layer_type.unit_axis(module, name),
                                         layer_type.bias_name(module, name), tuple(refits)))
    return followers


def _targets_and_skipped(model: nn.Module) -> tuple[list[_Target], list[str]]:
    """Every masked weight of ``model``: those its layer type can re-fit, and why each other one cannot."""
    tied = tied_weights(model)
    second_users = {alias for aliases in tied.values() for alias in aliases}
    targets, skipped = [], []
    for module_name, module in model.named_modules():
        names = masked_names(module)
        layer_type = layer_type_of(module)
        for name in names:
            key = f"{module_name}.{name}" if module_name else name
            if key in second_users or getattr(module, f"{name}_orig").dim() < 2:
                continue  # reported under the tied weight's first name; vectors follow their units
            if layer_type is None:
                skipped.append(f"{key}: no layer type is registered for {type(module).__name__} "
                               "(bingo.layer_types.register_layer_type)")
                continue
            if key in tied:
                skipped.append(f"{key}: tied to {', '.join(tied[key])}; a re-fit for one use would change the other")
                continue
            refits = layer_type.refits(module, name)
            if isinstance(refits, str):
                skipped.append(f"{key}: {refits}")
                continue
            if not isinstance(refits, (list, tuple)) or not refits or not all(isinstance(r, Refit) for r in refits):
                raise ConfigError(f"layer type {layer_type.name!r}: refits({key!r}) must return a reason (str) or a "
                                  f"non-empty list of Refit, got {refits!r}")
            targets.append(_Target(key, module_name, name, layer_type.unit_axis(module, name),
                                   layer_type.bias_name(module, name), tuple(refits)))
    return targets, skipped


class _Hooks:
    """Forward hooks that hand each refit's design rows to a sink, on one network.

    While one design is computed, other hooks stay quiet: a design may call
    the module again (an attention's out_proj input is a replay of its call).
    """

    def __init__(self) -> None:
        self.handles: list = []
        self.busy = False

    def add(self, net: nn.Module, target: _Target, refit: Refit, sink: Callable[[torch.Tensor], None]) -> None:
        name = target.module_name if refit.hook_on == "self" else target.module_name.rpartition(".")[0]
        module = net.get_submodule(name) if name else net

        def call(m: nn.Module, args: tuple, kwargs: dict, output: object = None) -> None:
            if self.busy:
                return
            self.busy = True
            try:
                sink(refit.design(m, args, kwargs, output).detach())
            finally:
                self.busy = False

        if refit.when == "pre":
            handle = module.register_forward_pre_hook(lambda m, a, k: call(m, a, k), with_kwargs=True)
        else:
            handle = module.register_forward_hook(lambda m, a, k, o: call(m, a, k, o), with_kwargs=True)
        self.handles.append(handle)

    def __enter__(self) -> "_Hooks":
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _network_order(model: nn.Module, targets: list[_Target], sample: Batch) -> list[_Target]:
    """``targets`` in the order the forward pass first reaches them (one sample); those it never reaches are left out."""
    order: list[str] = []
    with _Hooks() as hooks:
        for target in targets:
            for refit in target.refits:
                hooks.add(model, target, refit, lambda x, key=target.key: order.append(key))
        with torch.no_grad():
            sample.outputs(model)
    by_key = {t.key: t for t in targets}
    return [by_key[key] for key in dict.fromkeys(order)]


def _parameters(net: nn.Module, target: _Target, masked: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight's unit matrix ``(units, fan-in)`` and its bias as ``net`` computes with them (masked if asked)."""
    module = net.get_submodule(target.module_name) if target.module_name else net

    def value(name: str) -> torch.Tensor:
        if masked and hasattr(module, f"{name}_mask"):
            return masked_value(module, name)
        return getattr(module, f"{name}_orig") if hasattr(module, f"{name}_orig") else getattr(module, name)

    bias = None if target.bias is None or getattr(module, target.bias, None) is None else value(target.bias).detach()
    return unit_matrix(value(target.name).detach(), target.axis), bias


def _affine(design: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, refit: Refit) -> torch.Tensor:
    """``X W[rows]ᵀ + b[bias_rows]``: one refit's output from its design rows."""
    return F.linear(design.to(weight.dtype), weight[refit.rows], None if bias is None else bias[refit.bias_rows])


#: design rows per kept input that :func:`suggested_calibration_samples` asks for: an exact fit on fewer rows than
#: inputs interpolates the calibration data (the held-out check then undoes it); 4 leaves it well determined
ROWS_PER_INPUT = 4


def suggested_calibration_samples(model: nn.Module, example: Calibration, minimum: int = 1024) -> int:
    """How many calibration samples :func:`compensate` needs for ``model``: ``ROWS_PER_INPUT`` design rows per input.

    One forward of ``example`` (one sample, as the model takes it) counts
    the design rows each re-fittable layer gets per sample (1 for a Linear
    on a vector, the output positions of a conv, the tokens of a sequence);
    the answer is the most any layer needs, ``ceil(4 · (fan-in + 1) / rows
    per sample)``, and at least ``minimum``. A 784-input first layer needs
    3,140 samples; a 3×3 conv of 512 channels on 4×4 maps, 1,153.
    """
    model = unwrap(check_model("suggested_calibration_samples", model))
    _check_calibration(example)
    minimum = check_positive_int("suggested_calibration_samples", "minimum", minimum)
    _check_model_takes("suggested_calibration_samples", model, example)
    targets, _ = _targets_and_skipped(model)
    targets += _followers(model)
    rows: dict[str, int] = {}
    fan_in: dict[str, int] = {}
    with _Hooks() as hooks:
        for target in targets:
            fan_in[target.key] = _parameters(model, target, masked=False)[0].shape[1] + (target.bias is not None)
            for refit in target.refits:
                hooks.add(model, target, refit, lambda x, key=target.key: rows.__setitem__(key, max(rows.get(key, 0), len(x))))
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            with torch.no_grad(), torch.random.fork_rng():
                Batch(inputs=to_device(_slice(example, slice(0, 1)), model_device(model))).outputs(model)
        finally:
            for module, training in modes:
                module.training = training
    needed = [math.ceil(ROWS_PER_INPUT * fan_in[key] / max(count, 1)) for key, count in rows.items()]
    return max([int(minimum), *needed])


def reestimate_batchnorm(model: nn.Module, calibration: Calibration, batch_size: int = 256, *,
                         process_group: object | None = None) -> int:
    """Recompute every BatchNorm's running mean and variance on ``calibration`` (cumulative average).

    Pruning and compensation change the statistics each BatchNorm sees; its
    stored ones are the dense network's. Returns the number of forward calls.
    Train/eval flags and the global RNG are restored; no parameter changes.
    Under ``torch.distributed`` each statistic is then the mean over ranks of
    every rank's own (the same on every rank; with equal calibration sizes the
    mean is the global mean, the variance leaves out the spread between the
    ranks' means).
    """
    model = unwrap(check_model("reestimate_batchnorm", model))
    batch_size = check_positive_int("reestimate_batchnorm", "batch_size", batch_size)
    _check_calibration(calibration)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    _check_model_takes("reestimate_batchnorm", model, calibration)
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    calls = 0
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative moving average: every calibration batch counts equally
            norm.train()
        with torch.no_grad(), torch.random.fork_rng():
            for batch in _batches(calibration, batch_size, model_device(model)):
                batch.outputs(model)
                calls += 1
            for norm in norms:
                for statistic in (norm.running_mean, norm.running_var):
                    sum_over_ranks(statistic, process_group).div_(world_size(process_group))
    finally:
        for norm, momentum in momenta:
            norm.momentum = momentum
        for module, training in modes:
            module.training = training
    return calls


@contextlib.contextmanager
def _dense_attention() -> Iterator[None]:
    """Inside this block, ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers take their plain path.

    In eval mode with a padding mask their fast path turns activations into
    nested tensors, which have no ``.shape`` for the re-fit's hooks to read;
    the plain path computes the same outputs (to float rounding) as dense
    tensors. The global flag (``torch.backends.mha``) is restored on exit.
    """
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


#: set on a module whose weight a compensate re-fitted: its ``weight_orig`` no longer holds the dense weights
_REFITTED = "_bingo_refitted"


def check_compensate_arguments(model: nn.Module, calibration: Calibration, *, reference: nn.Module | None = None,
                               damping: float = 0.01, batch_size: int = 256, batchnorm: str = "keep",
                               validation: float = 0.1, evaluate: Callable[[nn.Module], float] | None = None,
                               solver: str | Solver = "auto", mode: str = "auto"):
    """Every check :func:`compensate` makes of its arguments before it changes anything, one :class:`ConfigError` each.

    Runs one calibration sample through ``model``. Returns ``(model,
    reference, batch_size, damping, validation)``, the models unwrapped (the
    inner module of a DDP wrapper: its forwards need no collectives). Callers
    that change the model before compensating (:func:`bingo.prune_in_steps`)
    call it first, so that a bad argument leaves the model as it was.
    """
    check_choice("batchnorm", batchnorm, BATCHNORM_CHOICES)
    check_choice("mode", mode, MODES)
    get_solver(solver)
    model = unwrap(check_model("compensate", model))
    reference = None if reference is None else unwrap(check_model("compensate", reference, "reference"))
    if evaluate is not None and not callable(evaluate):
        raise ConfigError(f"compensate: evaluate must be a function model -> float (higher = better), got {describe(evaluate)}")
    _check_calibration(calibration)
    batch_size = check_positive_int("compensate", "batch_size", batch_size)
    damping = check_fraction("", "damping", damping)
    validation = check_fraction("", "validation", validation)
    if reference is not None:
        _check_reference(model, reference)
    _check_model_takes("compensate", model, calibration)  # before anything changes: a failure leaves the model as it was
    return model, reference, batch_size, damping, validation


@cached_masks()  # the calibration passes multiply each masked weight out once, not once per batch
@_dense_attention()  # the hooks read each layer's inputs as dense tensors
def compensate(
    model: nn.Module,
    masks: dict[str, torch.Tensor] | None,
    calibration: Calibration,
    *,
    reference: nn.Module | None = None,
    damping: float = 0.01,
    batch_size: int = 256,
    batchnorm: str = "keep",
    validation: float = 0.1,
    evaluate: Callable[[nn.Module], float] | None = None,
    solver: str | Solver = "auto",
    mode: str = "auto",
    process_group: object | None = None,
) -> CompensationResult:
    """Re-fit the surviving weights (and biases) of every pruned layer of ``model``, in place.

    Every masked weight whose layer type (:mod:`bingo.layer_types`) defines
    a re-fit is re-fitted: ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d``,
    Hugging Face ``Conv1D`` (GPT-2), and an ``nn.MultiheadAttention``'s q,
    k and v blocks (each as a Linear of the query, key and value the
    attention is called with, packed or separate) and ``out_proj`` (on the
    heads' output, recovered by replaying the call with ``out_proj`` the
    identity). Every other masked weight is listed in ``skipped`` with the
    reason, with a warning.

    Args:
        model: the pruned model. ``masks`` (keep-masks as :func:`bingo.prune`
            returns them; None = the masks already on the model) are applied
            first if they are not on it yet.
        calibration: input samples from the training set, as the model
            takes them (a few hundred to a few thousand): a tensor ``(N, ...)``
            (``model(x)``), a tuple of tensors (``model(*x)``) or a dict
            (``model(**x)``), every tensor with the N samples first.
        reference: the dense network whose layer outputs are the targets.
            Default: the model itself with its masks lifted (right after a
            prune, ``weight_orig`` still holds the dense weights; after a
            fine-tune it does not, so pass the dense model).
        damping: relative Tikhonov damping ``λ / mean(diag H)``.
        batch_size: calibration batch size (memory only).
        validation: the fraction of the calibration samples (the last ones)
            held out of the fit to check it: a layer whose re-fit reproduces
            the dense outputs on them worse than the pruned layer as it was
            (by more than :data:`HELD_OUT_TOLERANCE`, 1%)
            (an exact fit on too few samples for its kept inputs overfits) is
            put back as it was and listed in ``skipped``. 0 turns the check
            off; with fewer than :data:`MIN_HELD_OUT` (16) samples held out
            there is none, and every sample is fitted.
        evaluate: ``evaluate(model) -> float``, higher = better, on held-out
            data with labels (minus a validation loss, an accuracy): the guard
            compensation cannot have alone. Each layer's re-fit aims at the
            dense network's outputs, so where the pruned model happens to be
            better than the dense one on held-out data (a light prune can
            regularise), a faithful re-fit makes it worse. Given
            ``evaluate``, it is called before and after; if after is lower,
            every weight (and BatchNorm statistic) is put back as pruned,
            ``undone`` is True and ``skipped`` says why. Both values are in
            ``evaluation``.
        batchnorm: ``"keep"`` the BatchNorm statistics (the fit targets the
            dense layer outputs, which those statistics describe), or
            ``"reestimate"`` them on the calibration data afterwards
            (:func:`reestimate_batchnorm`; what an uncompensated prune needs).
        process_group: under ``torch.distributed``, the ranks whose
            calibration statistics are pooled (default: all); see
            :mod:`bingo.distributed`.

    Returns:
        A :class:`CompensationResult`; per-layer errors let you check it helped.
        Masks are unchanged.
    """
    chosen = get_solver(solver)
    model, reference, batch_size, damping, validation = check_compensate_arguments(
        model, calibration, reference=reference, damping=damping, batch_size=batch_size, batchnorm=batchnorm,
        validation=validation, evaluate=evaluate, solver=solver, mode=mode)
    if masks is not None and not isinstance(masks, Mapping):
        raise ConfigError(f"compensate: masks must be a dict {{key: bool tensor}} as bingo.prune returns, or None (the "
                          f"masks on the model), got {describe(masks)}")
    start_time = time.perf_counter()
    broadcast_buffers(model, process_group)  # BatchNorm statistics: rank 0's on every rank, as DDP's next forward would make them
    if masks:
        apply_masks(model, masks)
    targets, skipped = _targets_and_skipped(model)
    if not targets and not skipped:
        raise ConfigError(f"{type(model).__name__} has no pruned layer to compensate; prune it first")
    if reference is None:
        refitted = [name for name, module in model.named_modules() if getattr(module, _REFITTED, False)]
        if refitted:  # weight_orig holds that re-fit (its pruned entries zeroed), so the targets are not the dense outputs
            warnings.warn(f"compensate: {', '.join(map(repr, refitted))} {'was' if len(refitted) == 1 else 'were'} "
                          "re-fitted by an earlier compensate, so the default reference (the model with its masks "
                          "lifted) is that re-fit, not the dense network; pass reference=<the dense model> "
                          "(bingo.prune_in_steps keeps one for you)", stacklevel=3)
    score_before, pruned_state = None, None
    if evaluate is not None:
        score_before = _score(evaluate, model, "before")
        pruned_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    samples = _samples(calibration)
    held_out = int(samples * float(validation))
    if held_out < MIN_HELD_OUT:  # too few to tell a better fit from noise: fit them all, unchecked
        held_out = 0
    fit_samples = samples - held_out
    # the calibration data go to the model's device (each batch once), wherever the caller keeps them
    numbered = list(_numbered_batches(calibration, batch_size, fit_samples, model_device(model)))
    starts, batches = [start for start, _ in numbered], [batch for _, batch in numbered]
    calls, layer_calls, flops = 0, 0, 0.0
    fitted, before, after, unchanged, used, underdetermined = [], {}, {}, [], {}, []
    refitted_modules: list[str] = []
    nets = [model] if reference is None else [model, reference]
    modes = [(m, m.training) for net in nets for m in net.modules()]
    mode_used = "per-layer"
    try:
        for net in nets:
            net.eval()
        masked = {t.key for t in targets}
        order = _network_order(model, targets + _followers(model),
                               Batch(inputs=to_device(_slice(calibration, slice(0, 1)), model_device(model))))
        reached = {t.key for t in order}
        skipped += [f"{t.key}: never called as a module in the forward pass" for t in targets if t.key not in reached]
        # an unmasked layer before the first pruned one sees the dense inputs: nothing to correct there
        first = next((i for i, t in enumerate(order) if t.key in masked), len(order))
        order = order[first:]

        def refit(target: _Target, wanted: list, designs: Designs) -> None:
            nonlocal flops
            fit = _fit(model, target, wanted, designs, starts, fit_samples, held_out, float(damping), process_group, chosen)
            flops += fit["flops"]
            if fit["worse"]:
                skipped.append(f"{target.key}: {fit['worse']}")
                return
            if fit["error"] == 0.0 or fit["no_gain"]:
                # Nothing pruned in or before this layer: it already gives the dense output exactly, and a
                # re-fit could only move it by the damping (at sparsity 0, every layer); or no re-fit does better.
                if target.key in masked:
                    unchanged.append(target.key)
                return
            refresh_masked(model)
            fitted.append(target.key)
            refitted_modules.append(target.module_name)
            if not held_out and fit["design_rows"] < fit["inputs"]:  # fewer equations than unknowns, and no check
                underdetermined.append(f"{target.key} ({fit['design_rows']} rows for {fit['inputs']} inputs)")
            before[target.key] = fit["error"] / max(fit["rows"], 1)
            after[target.key] = fit["after"] / max(fit["rows"], 1)
            used[target.key] = "+".join(dict.fromkeys(fit["solvers"]))
            if fit["failed"]:
                skipped.append(f"{target.key}: {fit['failed']} output unit(s) kept their weights (ill-conditioned)")

        runner, why = None, ""
        if mode != "per-layer" and order:
            stops = list(dict.fromkeys(_hook_module(t, r) for t in order for r in t.refits))
            try:
                runner = LayerByLayer(model, reference, [b.inputs for b in batches], stops)
            except NotTraceable as exc:
                if mode == "graph":
                    raise ConfigError(f"compensate(mode='graph'): {exc}; mode='auto' falls back to one pass per layer") from None
                why = str(exc)
        with torch.no_grad(), torch.random.fork_rng():
            if runner is not None:
                mode_used = "graph"
                at: dict[str, list[_Target]] = {}
                for target in order:
                    at.setdefault(_hook_module(target, target.refits[0]), []).append(target)
                dense_net = model if reference is None else reference

                def at_stop(name: str, stop: Stop) -> None:
                    here = at.get(name, [])
                    # every target's dense targets first: the re-fits below overwrite weights the dense side reads
                    wanted = [_wanted(dense_net, t, _stop_designs(stop, "dense", t)) for t in here]
                    for target, targets in zip(here, wanted):
                        refit(target, targets, _stop_designs(stop, "pruned", target))

                runner.run(at_stop)
                calls, layer_calls = runner.forwards, runner.layer_runs
            elif order:
                mode_used = "per-layer" + (f" ({why})" if why else "")
                dense_net = _lifted(model) if reference is None else reference
                modes += [(m, m.training) for m in dense_net.modules()]
                dense_net.eval()
                counter = [0]
                for target in order:
                    wanted = _wanted(dense_net, target, _forward_designs(dense_net, target, batches, counter))
                    refit(target, wanted, _forward_designs(model, target, batches, counter))
                calls = counter[0]
        if batchnorm == "reestimate":
            calls += reestimate_batchnorm(model, calibration, batch_size, process_group=process_group)
    finally:
        for module, training in modes:
            module.training = training
    evaluation, undone = None, False
    if evaluate is not None:
        try:
            score_after = evaluate(model)
            try:
                score_after = float(score_after)  # NaN after the re-fit counts as worse, below
            except (TypeError, ValueError):
                check_judgement("compensate", score_after, "after the re-fit")
        except BaseException:  # an evaluate that fails (or Ctrl-C) judged nothing: the model goes back as pruned
            _put_back(model, pruned_state)
            raise
        evaluation = (score_before, score_after)
        # under torch.distributed: undone on every rank if evaluate() said worse on any (each may see its own data);
        # NaN after the re-fit counts as worse
        worse = sum_over_ranks(torch.tensor([float(not score_after >= score_before)], dtype=torch.float64), process_group)
        if float(worse) > 0:
            _put_back(model, pruned_state)
            undone = True
            skipped.append(f"every layer: evaluate() gave {score_after:.6g} after the re-fit, {score_before:.6g} before, "
                           "so the pruned weights were put back (the re-fit aims at the dense outputs, and this pruned "
                           "model does better than that on the data evaluate() sees)")
            after = dict(before)
    if not undone:
        for name in refitted_modules:  # remembered for the next compensate's default reference (above)
            setattr(model.get_submodule(name), _REFITTED, True)
    if skipped:
        warnings.warn("compensate left some weights as they were: " + "; ".join(skipped), stacklevel=2)
    if underdetermined:  # the held-out check that would undo an overfit was off: say what it could not catch
        warnings.warn(f"compensate re-fitted on fewer design rows than inputs, so each fit interpolates its {samples} "
                      f"calibration samples and may reproduce the dense outputs worse elsewhere, unchecked (fewer than "
                      f"{MIN_HELD_OUT} samples held out): {', '.join(underdetermined)}; pass more calibration samples "
                      "(bingo.suggested_calibration_samples) or evaluate=", stacklevel=2)
    return CompensationResult(tuple(fitted), tuple(skipped), before, after, time.perf_counter() - start_time, calls,
                              evaluation, undone, tuple(unchanged), mode_used, layer_calls, used, flops)


def _put_back(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Every entry of ``model.state_dict()`` (weights, BatchNorm statistics) back to ``state``, the masked weights too."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            value.copy_(state[name])
    refresh_masked(model)


def _score(evaluate: Callable[[nn.Module], float], model: nn.Module, when: str) -> float:
    """``evaluate(model)`` as a finite float, or a :class:`ConfigError` that says what it returned."""
    return check_judgement("compensate", evaluate(model), f"{when} the re-fit")


def _hook_module(target: _Target, refit: Refit) -> str:
    """The name of the module whose call a refit's hook reads: the layer's own, or its parent's."""
    return target.module_name if refit.hook_on == "self" else target.module_name.rpartition(".")[0]


#: design rows of calibration batches: ``(batch index, [design per refit, None where the hook did not fire])``
Designs = Iterator[tuple[int, list]]


def _forward_designs(net: nn.Module, target: _Target, batches: list[Batch], counter: list[int]) -> Designs:
    """Per-layer mode: the whole ``net`` called on each batch, the refits' hooks collecting its design rows."""
    with _Hooks() as hooks:
        captured: list[list[torch.Tensor]] = [[] for _ in target.refits]
        for refit, sink in zip(target.refits, captured):
            hooks.add(net, target, refit, sink.append)
        for b, batch in enumerate(batches):
            batch.outputs(net)
            counter[0] += 1
            yield b, [torch.cat(c) if c else None for c in captured]
            for c in captured:
                c.clear()


def _stop_designs(stop: Stop, side: str, target: _Target) -> Designs:
    """Graph mode: the design rows at one stop, from the module's inputs where every refit reads them before
    the call (no extra call), else from calling the module alone with the refits' hooks on."""
    if all(r.when == "pre" for r in target.refits):
        module = stop.module(side)
        for b in range(stop.batches):
            args, kwargs = stop.inputs(side, b)
            yield b, [r.design(module, args, kwargs, None).detach() for r in target.refits]
        return
    net = stop.runner.model if side == "pruned" or stop.runner.reference is None else stop.runner.reference
    with _Hooks() as hooks:
        captured: list[list[torch.Tensor]] = [[] for _ in target.refits]
        for refit, sink in zip(target.refits, captured):
            hooks.add(net, target, refit, sink.append)
        for b in stop.run(side):
            yield b, [torch.cat(c) if c else None for c in captured]
            for c in captured:
                c.clear()


def _wanted(dense: nn.Module, target: _Target, designs: Designs) -> list[list[torch.Tensor | None]]:
    """The dense layer's outputs on the dense inputs, per batch and refit (float32): the targets of the fit."""
    dense_weight, dense_bias = _parameters(dense, target, masked=False)
    wanted = []
    for _, xs in designs:
        for x, refit in zip(xs, target.refits):  # a layer type's own design hook, checked where a wrong one would fail
            if x is not None and (x.dim() != 2 or x.shape[1] != dense_weight.shape[1]):
                module = dense.get_submodule(target.module_name) if target.module_name else dense
                kind = layer_type_of(module)
                raise ConfigError(f"compensate: the design of {target.key!r} (layer type "
                                  f"{kind.name if kind else type(module).__name__!r}) has shape {tuple(x.shape)}; a "
                                  f"Refit's design must be (rows, {dense_weight.shape[1]}), one column per input of "
                                  "the weight's unit matrix")
        wanted.append([None if x is None else _affine(x.float(), dense_weight.float(), None if dense_bias is None else dense_bias.float(), r)
                       for x, r in zip(xs, target.refits)])
    return wanted


def _fit(model: nn.Module, target: _Target, wanted: list[list[torch.Tensor | None]], designs: Designs, starts: list[int],
         fit_samples: int, held_out: int, damping: float, process_group: object | None, solver: Solver | None) -> dict:
    """Re-fit the kept entries of one masked weight to the dense layer's outputs ``wanted``, in place.

    ``designs`` gives the layer's design rows in ``model`` (the pruned
    network, the layers before it already re-fitted) per calibration batch.
    Each of the layer type's refits is a least-squares problem of its own
    (its rows, its design): ``H = XᵀX`` and ``XᵀY`` accumulated over the
    batches whose first sample ``starts[b]`` is below ``fit_samples``, then
    handed to the solver. The held-out samples are summarised the same way,
    which gives the squared error of any weights on them without keeping
    them: ``‖X w − y‖² = wᵀHw − 2 wᵀXᵀy + ‖y‖²``. If the re-fit's is larger
    than the pruned weights', nothing is written and ``worse`` says why.
    """
    weight, bias = _parameters(model, target, masked=True)
    has_bias = bias is not None
    device = weight.device
    d = weight.shape[1] + (1 if has_bias else 0)

    def sums(out: int) -> dict:
        return {"hessian": torch.zeros(d, d, dtype=torch.float64, device=device),
                "cross": torch.zeros(d, out, dtype=torch.float64, device=device),
                "targets": torch.zeros((), dtype=torch.float64, device=device)}

    problems = [{"fit": sums(len(weight[r.rows])), "check": sums(len(weight[r.rows]))} for r in target.refits]
    error, rows, design_rows = 0.0, 0, 0
    for b, xs in designs:
        for refit, problem, x, y in zip(target.refits, problems, xs, wanted[b]):
            if x is None:
                continue
            if x.dim() != 2 or x.shape[1] != weight.shape[1] or y is None or len(x) != len(y):
                raise ConfigError(
                    f"compensate: the design rows of {target.key!r} have shape {tuple(x.shape)}; its layer "
                    f"type's Refit.design must give (rows, {weight.shape[1]}), the fan-in of the weight's unit "
                    "matrix, the same number of rows in the pruned and the dense network"
                )
            x = x.float()
            fitted = starts[b] < fit_samples
            part = problem["fit" if fitted else "check"]
            # float32 products of one batch (4x faster than float64 on a CPU), summed in float64; the column of
            # ones a bias adds is kept implicit: its blocks of H are X's column sums and the row count
            k = x.shape[1]
            part["hessian"][:k, :k] += (x.T @ x).double()
            part["cross"][:k] += (x.T @ y).double()
            if has_bias:
                sums = x.sum(dim=0, dtype=torch.float64)
                part["hessian"][k, :k] += sums
                part["hessian"][:k, k] += sums
                part["hessian"][k, k] += len(x)
                part["cross"][k] += y.sum(dim=0, dtype=torch.float64)
            part["targets"] += y.square().sum(dtype=torch.float64)
            if fitted:
                error += float((_affine(x, weight, bias, refit) - y).square().sum(dtype=torch.float64))
                rows += y.numel()
                if refit is target.refits[0]:  # the equations of one problem (each refit sees the same samples)
                    design_rows += len(x)
        wanted[b] = [None] * len(target.refits)  # used: free it
    for problem in problems:
        # Under torch.distributed: the fit on every rank's calibration inputs together, the same on every rank.
        for part in problem.values():
            for value in part.values():
                sum_over_ranks(value, process_group)
    totals = sum_over_ranks(torch.tensor([error, float(rows), float(design_rows)], dtype=torch.float64), process_group)
    error, rows, design_rows = float(totals[0]), int(totals[1]), int(totals[2])
    result = {"error": error, "rows": rows, "failed": 0, "worse": None, "after": error, "solvers": (), "flops": 0.0,
              "no_gain": False, "design_rows": design_rows, "inputs": d}
    if error == 0.0:
        return result
    module = model.get_submodule(target.module_name) if target.module_name else model
    mask = getattr(module, f"{target.name}_mask", None)  # None: a layer downstream of the prune, every input kept
    keep_all = (torch.ones(weight.shape, dtype=torch.bool, device=device) if mask is None
                else unit_matrix(mask, target.axis).bool())
    bias_keep_all = None
    if has_bias:
        bias_mask = getattr(module, f"{target.bias}_mask", None)
        bias_keep_all = torch.ones(len(bias), dtype=torch.bool, device=device) if bias_mask is None else bias_mask.bool()
    parameter = getattr(module, f"{target.name}_orig", None)
    parameter = getattr(module, target.name) if parameter is None else parameter
    new_weight = unit_matrix(parameter.detach(), target.axis).clone()
    bias_parameter = None
    if has_bias:
        bias_parameter = getattr(module, f"{target.bias}_orig", None)
        bias_parameter = getattr(module, target.bias) if bias_parameter is None else bias_parameter
    new_bias = None if bias_parameter is None else bias_parameter.detach().clone()
    held_out_before = held_out_after = after = 0.0
    solvers, flops, failed = [], 0.0, 0
    for refit, problem in zip(target.refits, problems):
        keep = keep_all[refit.rows]
        if has_bias:
            keep = torch.cat([keep, bias_keep_all[refit.bias_rows][:, None]], dim=1)
        chosen = solver or choose_solver(keep.shape[1], keep)
        solution = chosen.solve(problem["fit"]["hessian"], problem["fit"]["cross"], keep, damping)
        solvers.append(chosen.name)
        flops += chosen.flops(keep.shape[1], keep)
        ok = ~solution.isnan().any(dim=1)
        failed += int((~ok).sum())
        units = torch.arange(len(new_weight), device=device)[refit.rows][ok]
        columns = new_weight.shape[1]
        new_weight[units] = solution[ok, :columns].to(new_weight.dtype)
        if has_bias:
            entries = torch.arange(len(new_bias), device=device)[refit.bias_rows][ok]
            new_bias[entries] = solution[ok, columns].to(new_bias.dtype)
        before_rows = torch.cat([weight[refit.rows], bias[refit.bias_rows][:, None]], 1) if has_bias else weight[refit.rows]
        after_rows = (torch.cat([new_weight[refit.rows], new_bias[refit.bias_rows][:, None]], 1) if has_bias
                      else new_weight[refit.rows])
        after += _squared_error(problem["fit"], after_rows)
        if held_out:
            held_out_before += _squared_error(problem["check"], before_rows)
            held_out_after += _squared_error(problem["check"], after_rows)
    result.update(failed=failed, solvers=tuple(solvers), flops=flops, after=max(after, 0.0))
    if after >= error * (1 - NO_GAIN):
        # No better on the very samples fitted: nothing to gain (the kept filters of a first layer pruned by
        # filters already compute the dense ones), or the damping's shrinkage costs more than the prune did.
        result.update(failed=0, no_gain=True)
        return result
    if held_out and held_out_after > held_out_before * (1 + HELD_OUT_TOLERANCE):
        result.update(failed=0, worse=(
            f"the re-fit reproduced the dense outputs worse on the {held_out} held-out calibration samples "
            f"({held_out_after:.4g} vs {held_out_before:.4g} squared error), so it was undone: the fit to "
            f"the {fit_samples} samples fitted does not generalise (more calibration samples may help)"))
        return result
    with torch.no_grad():
        parameter.copy_(from_unit_matrix(new_weight, parameter, target.axis))
        if has_bias:
            bias_parameter.copy_(new_bias)
    return result


def _squared_error(part: dict, rows: torch.Tensor) -> float:
    """``Σ_r ‖X w_r − y_r‖²`` over samples summarised by ``H = XᵀX``, ``XᵀY`` and ``‖Y‖²``; rows ``(out, d)``."""
    w = rows.detach().double()
    return float((w @ part["hessian"] * w).sum() - 2 * (w * part["cross"].T).sum() + part["targets"])


def _lifted(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every mask lifted: the weights as they were before pruning zeroed them."""
    import copy

    dense = copy.deepcopy(model)
    for module in dense.modules():
        for name in masked_names(module):  # weight, bias, in_proj_weight, in_proj_bias...
            getattr(module, f"{name}_mask").fill_(1)
    make_permanent(dense)
    return dense
