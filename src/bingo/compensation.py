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
  ``w_r = argmin ‖X[:, S_r] w − Y[:, r]‖² + λ‖w‖²``, solved from the
  Hessian ``H = XᵀX`` (each batch's product in float32, summed and solved
  in float64) by batched Cholesky, ``H[S_r, S_r] w = (XᵀY)[S_r, r]``,
  with damping ``λ = damping × mean(diag H[S_r, S_r])`` (SparseGPT's 1%).

``H`` and ``XᵀY`` are accumulated over calibration batches, so memory is
``O(d² + d·out)`` per layer, whatever the number of samples; time is two
forwards of the calibration set per layer plus one ``k×k`` Cholesky per
distinct kept set (``k`` = kept inputs of an output unit). Pruned units
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

import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import broadcast_buffers, sum_over_ranks, unwrap, world_size
from .errors import ConfigError, check_choice
from .estimators.fake_pass import Batch, first_tensor
from .layer_types import Refit, from_unit_matrix, layer_type_of, unit_matrix
from .layers import tied_weights
from .masks import apply_masks, make_permanent, masked_names, masked_value, refresh_masked

__all__ = ["BATCHNORM_CHOICES", "CompensationResult", "compensate", "reestimate_batchnorm"]

#: calibration inputs as the model takes them: a tensor ``(N, ...)``, or a tuple / dict of tensors whose first dimension is N
Calibration = torch.Tensor | tuple | Mapping

#: the fewest held-out calibration samples :func:`compensate` checks a re-fit on
MIN_HELD_OUT = 16

#: how much worse (relative squared error) on the held-out samples a re-fit may be and still stay: within it,
#: the re-fit neither helps nor hurts measurably (a first layer fed independent inputs), and is kept
HELD_OUT_TOLERANCE = 0.01

#: what :func:`compensate` does with BatchNorm statistics afterwards
BATCHNORM_CHOICES = ("keep", "reestimate")


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
    #: masked weights left as they were because they already gave the dense output exactly (nothing pruned in or before them)
    unchanged: tuple[str, ...] = ()


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


def _numbered_batches(calibration: Any, batch_size: int, split: int) -> Iterator[tuple[int, Batch]]:
    """``(first sample, batch)`` over the calibration inputs, no batch straddling sample ``split``."""
    samples = _samples(calibration)
    for begin, end in ((0, split), (split, samples)):
        for start in range(begin, end, batch_size):
            yield start, Batch(inputs=_slice(calibration, slice(start, min(start + batch_size, end))))


def _batches(calibration: Any, batch_size: int) -> Iterator[Batch]:
    """The calibration inputs in batches, each called as the model takes it (``model(x)``, ``model(*x)``, ``model(**x)``)."""
    for start in range(0, _samples(calibration), batch_size):
        yield Batch(inputs=_slice(calibration, slice(start, start + batch_size)))


def _check_calibration(calibration: Any) -> None:
    first = first_tensor(calibration) if isinstance(calibration, (torch.Tensor, tuple, Mapping)) else None
    if first is None or first.dim() < (2 if isinstance(calibration, torch.Tensor) else 1) or len(first) == 0:
        raise ConfigError(
            "compensate needs calibration inputs: a non-empty tensor (N, ...) of training samples, "
            "or a tuple / dict of such tensors as the model takes them (model(*x), model(**x))"
        )


def _with_ones(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    rows = rows.float()
    if bias:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], dim=1)
    return rows


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


def _solve_rows(hessian: torch.Tensor, cross: torch.Tensor, keep: torch.Tensor, damping: float, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
    """Per output row r, ``w_r`` on its kept columns from ``(H[S,S] + λI) w = cross[S, r]``; zeros elsewhere.

    ``hessian`` is ``(d, d)``, ``cross`` ``(d, out)``, ``keep`` bool ``(out, d)``. Rows are solved in
    batches: each row's kept columns are gathered into a ``k_max × k_max`` block, padded with identity
    rows (zero right-hand side, so padding solves to 0), and factored by one batched Cholesky. A block
    that is not positive definite is retried with 10× the damping, up to 5 times; rows still failing
    come back as NaN.
    """
    out, d = keep.shape
    weights = torch.zeros(out, d, dtype=torch.float64)
    counts = keep.sum(dim=1)
    order = torch.argsort(counts, stable=True)  # similar sizes together: little padding
    start = 0
    while start < out:
        # Rows ascend in kept count, so a chunk's block is as wide as its last row's: take the longest run of
        # rows whose (rows × k_last²) block fits in chunk_bytes (at least one row). Sizing it by the first
        # row instead let one chunk take every row at the width of the widest (tens of GB on a 6,272-input layer).
        widths = counts[order[start:]].clamp(min=1).double()
        blocks = torch.arange(1, len(widths) + 1, dtype=torch.float64) * widths.square() * 8
        size = max(1, int((blocks <= chunk_bytes).sum()))
        rows = order[start : start + size]
        k_max = max(int(counts[rows].max()), 1)
        start += len(rows)
        if int(counts[rows].max()) == 0:
            continue
        # kept column indices first, in column order; padding marked invalid
        columns = torch.argsort((~keep[rows]).to(torch.int8), dim=1, stable=True)[:, :k_max]
        valid = torch.arange(k_max)[None, :] < counts[rows][:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        block = hessian[columns[:, :, None], columns[:, None, :]] * pair
        diagonal = block.diagonal(dim1=1, dim2=2)
        scale = (diagonal.sum(dim=1) / counts[rows].clamp(min=1)).clamp(min=1e-12)
        rhs = cross[columns, rows[:, None]] * valid
        pending = torch.arange(len(rows))
        solution = torch.full((len(rows), k_max), float("nan"), dtype=torch.float64)
        for attempt in range(6):
            lam = damping * 10**attempt * scale[pending]
            regularised = block[pending] + torch.diag_embed(torch.where(valid[pending], lam[:, None], torch.ones(1, dtype=torch.float64)))
            factor, info = torch.linalg.cholesky_ex(regularised)
            good = info == 0
            solution[pending[good]] = torch.cholesky_solve(rhs[pending[good]].unsqueeze(-1), factor[good]).squeeze(-1)
            pending = pending[~good]
            if not len(pending):
                break
        solution = torch.where(valid, solution, torch.zeros(1, dtype=torch.float64))
        solution[pending] = float("nan")  # numerically hopeless: the caller keeps these rows as they were
        target = weights[rows]
        target.scatter_(1, columns, solution)
        target[pending] = float("nan")
        weights[rows] = target
    return weights


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
    model = unwrap(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
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
            for batch in _batches(calibration, batch_size):
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
    check_choice("batchnorm", batchnorm, BATCHNORM_CHOICES)
    _check_calibration(calibration)
    if not 0.0 <= float(damping) < 1.0:
        raise ConfigError(f"damping must be in [0, 1), got {damping!r}")
    if not 0.0 <= float(validation) < 1.0:
        raise ConfigError(f"validation must be a fraction in [0, 1), got {validation!r}")
    start_time = time.perf_counter()
    model = unwrap(model)  # the inner module of a DDP wrapper: its forwards need no collectives
    reference = None if reference is None else unwrap(reference)
    broadcast_buffers(model, process_group)  # BatchNorm statistics: rank 0's on every rank, as DDP's next forward would make them
    if masks:
        apply_masks(model, masks)
    targets, skipped = _targets_and_skipped(model)
    if not targets and not skipped:
        raise ConfigError(f"{type(model).__name__} has no pruned layer to compensate; prune it first")
    score_before, pruned_state = None, None
    if evaluate is not None:
        score_before = _score(evaluate, model, "before")
        pruned_state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    if reference is None:
        reference = _lifted(model)
    modes = [(m, m.training) for m in model.modules()] + [(m, m.training) for m in reference.modules()]
    calls = 0
    fitted, before, unchanged = [], {}, []
    try:
        model.eval()
        reference.eval()
        masked = {t.key for t in targets}
        order = _network_order(model, targets + _followers(model), Batch(inputs=_slice(calibration, slice(0, 1))))
        reached = {t.key for t in order}
        skipped += [f"{t.key}: never called as a module in the forward pass" for t in targets if t.key not in reached]
        # an unmasked layer before the first pruned one sees the dense inputs: nothing to correct there
        first = next((i for i, t in enumerate(order) if t.key in masked), len(order))
        order = order[first:]
        by_key = {t.key: t for t in order}
        for target in order:
            fit = _fit(model, reference, target, calibration, batch_size, float(damping), float(validation), process_group)
            calls += fit["calls"]
            if fit["worse"]:
                skipped.append(f"{target.key}: {fit['worse']}")
                continue
            if fit["error"] == 0.0:
                # Nothing pruned in or before this layer: it already gives the dense output exactly,
                # and a re-fit could only move it by the damping (at sparsity 0, every layer).
                if target.key in masked:
                    unchanged.append(target.key)
                continue
            refresh_masked(model)
            fitted.append(target.key)
            before[target.key] = fit["error"] / max(fit["rows"], 1)
            if fit["failed"]:
                skipped.append(f"{target.key}: {fit['failed']} output unit(s) kept their weights (ill-conditioned)")
        if batchnorm == "reestimate":
            calls += reestimate_batchnorm(model, calibration, batch_size, process_group=process_group)
    finally:
        for module, training in modes:
            module.training = training
    after = _errors(model, reference, [by_key[k] for k in fitted], calibration, batch_size, process_group)
    calls += 2 * ((_samples(calibration) + batch_size - 1) // batch_size)
    evaluation, undone = None, False
    if evaluate is not None:
        score_after = float(evaluate(model))
        evaluation = (score_before, score_after)
        # under torch.distributed: undone on every rank if evaluate() said worse on any (each may see its own data);
        # NaN after the re-fit counts as worse
        worse = sum_over_ranks(torch.tensor([float(not score_after >= score_before)], dtype=torch.float64), process_group)
        if float(worse) > 0:
            with torch.no_grad():
                for name, value in model.state_dict().items():
                    value.copy_(pruned_state[name])
            refresh_masked(model)
            undone = True
            skipped.append(f"every layer: evaluate() gave {score_after:.6g} after the re-fit, {score_before:.6g} before, "
                           "so the pruned weights were put back (the re-fit aims at the dense outputs, and this pruned "
                           "model does better than that on the data evaluate() sees)")
            after = dict(before)
    if skipped:
        warnings.warn("compensate left some weights as they were: " + "; ".join(skipped), stacklevel=2)
    return CompensationResult(tuple(fitted), tuple(skipped), before, after, time.perf_counter() - start_time, calls,
                              evaluation, undone, tuple(unchanged))


def _score(evaluate: Callable[[nn.Module], float], model: nn.Module, when: str) -> float:
    """``evaluate(model)`` as a finite float, or a :class:`ConfigError` that says what it returned."""
    value = evaluate(model)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"compensate: evaluate(model) must return a number (higher = better), got {value!r}") from None
    if not math.isfinite(score):
        raise ConfigError(f"compensate: evaluate(model) returned {score} {when} the re-fit; it must be a finite number")
    return score


def _fit(model: nn.Module, reference: nn.Module, target: _Target, calibration: Calibration, batch_size: int,
         damping: float, validation: float, process_group: object | None) -> dict:
    """Re-fit the kept entries of one masked weight to the dense layer's outputs, in place.

    Each of the layer type's refits is a least-squares problem of its own
    (its rows, its design): ``H = XᵀX`` and ``XᵀY`` accumulated over the
    calibration batches, then solved row by row on each row's kept inputs.
    The held-out samples (``validation``) are summarised the same way, which
    gives the squared error of any weights on them without keeping them:
    ``‖X w − y‖² = wᵀHw − 2 wᵀXᵀy + ‖y‖²``. If the re-fit's is larger than
    the pruned weights', nothing is written and ``worse`` says why.
    """
    weight, bias = _parameters(model, target, masked=True)
    dense_weight, dense_bias = _parameters(reference, target, masked=False)
    has_bias = bias is not None
    problems = []
    for refit in target.refits:
        d = weight.shape[1] + (1 if has_bias else 0)
        out = weight[refit.rows].shape[0]
        problems.append({"hessian": torch.zeros(d, d, dtype=torch.float64),
                         "cross": torch.zeros(d, out, dtype=torch.float64)})
    error, rows, calls = 0.0, 0, 0
    samples = _samples(calibration)
    held_out = int(samples * validation)
    if held_out < MIN_HELD_OUT:  # too few to tell a better fit from noise: fit them all, unchecked
        held_out = 0
    fit_samples = samples - held_out
    for problem in problems:
        d, out = problem["cross"].shape
        problem["check"] = {"hessian": torch.zeros(d, d, dtype=torch.float64), "cross": torch.zeros(d, out, dtype=torch.float64),
                            "targets": torch.zeros((), dtype=torch.float64)}
    with torch.no_grad(), torch.random.fork_rng():
        for start, batch in _numbered_batches(calibration, batch_size, fit_samples):
            mine = [[] for _ in target.refits]
            theirs = [[] for _ in target.refits]
            with _Hooks() as hooks:
                for refit, sink in zip(target.refits, mine):
                    hooks.add(model, target, refit, sink.append)
                batch.outputs(model)
            with _Hooks() as hooks:
                for refit, sink in zip(target.refits, theirs):
                    hooks.add(reference, target, refit, sink.append)
                batch.outputs(reference)
            calls += 2
            for refit, problem, x, x_dense in zip(target.refits, problems, mine, theirs):
                if not x:
                    continue
                x, x_dense = torch.cat(x), torch.cat(x_dense)
                if x.dim() != 2 or x.shape[1] != weight.shape[1] or x.shape != x_dense.shape:
                    raise ConfigError(
                        f"compensate: the design rows of {target.key!r} have shape {tuple(x.shape)} (dense network: "
                        f"{tuple(x_dense.shape)}); its layer type's Refit.design must give (rows, {weight.shape[1]}), "
                        "the fan-in of the weight's unit matrix, the same in both networks"
                    )
                wanted = _affine(x_dense, dense_weight, dense_bias, refit).float().cpu()
                design = _with_ones(x, has_bias).cpu()
                sums = problem if start < fit_samples else problem["check"]
                # float32 products of one batch (4x faster than float64 here), summed in float64
                sums["hessian"] += (design.T @ design).double()
                sums["cross"] += (design.T @ wanted).double()
                if start < fit_samples:
                    error += float((_affine(x, weight, bias, refit).cpu().double() - wanted.double()).square().sum())
                    rows += wanted.numel()
                else:
                    sums["targets"] += wanted.double().square().sum()
    for problem in problems:
        # Under torch.distributed: the fit on every rank's calibration inputs together, the same on every rank.
        for sums in (problem, problem["check"]):
            sum_over_ranks(sums["hessian"], process_group)
            sum_over_ranks(sums["cross"], process_group)
        sum_over_ranks(problem["check"]["targets"], process_group)
    # held_out is summed too, so that every rank takes the same decision on the same totals
    totals = sum_over_ranks(torch.tensor([error, float(rows), float(held_out)], dtype=torch.float64), process_group)
    error, rows, held_out = float(totals[0]), int(totals[1]), int(totals[2])
    failed = 0
    if error == 0.0:
        return {"error": error, "rows": rows, "calls": calls, "failed": failed, "worse": None}
    module = model.get_submodule(target.module_name) if target.module_name else model
    mask = getattr(module, f"{target.name}_mask", None)  # None: a layer downstream of the prune, every input kept
    keep_all = (torch.ones(weight.shape, dtype=torch.bool) if mask is None else unit_matrix(mask, target.axis).bool().cpu())
    bias_keep_all = None
    if has_bias:
        bias_mask = getattr(module, f"{target.bias}_mask", None)
        bias_keep_all = torch.ones(len(bias), dtype=torch.bool) if bias_mask is None else bias_mask.bool().cpu()
    parameter = getattr(module, f"{target.name}_orig", None)
    parameter = getattr(module, target.name) if parameter is None else parameter
    new_weight = unit_matrix(parameter.detach(), target.axis).clone()
    bias_parameter = None
    if has_bias:
        bias_parameter = getattr(module, f"{target.bias}_orig", None)
        bias_parameter = getattr(module, target.bias) if bias_parameter is None else bias_parameter
    new_bias = None if bias_parameter is None else bias_parameter.detach().clone()
    held_out_before = held_out_after = 0.0
    for refit, problem in zip(target.refits, problems):
        keep = keep_all[refit.rows]
        if has_bias:
            keep = torch.cat([keep, bias_keep_all[refit.bias_rows][:, None]], dim=1)
        solution = _solve_rows(problem["hessian"], problem["cross"], keep, damping)
        ok = ~solution.isnan().any(dim=1)
        failed += int((~ok).sum())
        units = torch.arange(len(new_weight))[refit.rows][ok]
        columns = new_weight.shape[1]
        new_weight[units.to(new_weight.device)] = solution[ok, :columns].to(new_weight.dtype).to(new_weight.device)
        if has_bias:
            entries = torch.arange(len(new_bias))[refit.bias_rows][ok]
            new_bias[entries.to(new_bias.device)] = solution[ok, columns].to(new_bias.dtype).to(new_bias.device)
        if held_out:
            before_rows = torch.cat([weight[refit.rows], bias[refit.bias_rows][:, None]], 1) if has_bias else weight[refit.rows]
            after_rows = torch.cat([new_weight[refit.rows], new_bias[refit.bias_rows][:, None]], 1) if has_bias else new_weight[refit.rows]
            held_out_before += _held_out_error(problem["check"], before_rows)
            held_out_after += _held_out_error(problem["check"], after_rows)
    if held_out and held_out_after > held_out_before * (1 + HELD_OUT_TOLERANCE):
        return {"error": error, "rows": rows, "calls": calls, "failed": 0,
                "worse": (f"the re-fit reproduced the dense outputs worse on the {held_out} held-out calibration samples "
                          f"({held_out_after:.4g} vs {held_out_before:.4g} squared error), so it was undone: the fit to "
                          f"the {fit_samples} samples fitted does not generalise (more calibration samples may help)")}
    with torch.no_grad():
        parameter.copy_(from_unit_matrix(new_weight, parameter, target.axis))
        if has_bias:
            bias_parameter.copy_(new_bias)
    return {"error": error, "rows": rows, "calls": calls, "failed": failed, "worse": None}


def _held_out_error(check: dict, rows: torch.Tensor) -> float:
    """``Σ_r ‖X w_r − y_r‖²`` over held-out samples summarised by ``H = XᵀX``, ``XᵀY`` and ``‖Y‖²``; rows ``(out, d)``."""
    w = rows.detach().double().cpu()
    return float((w @ check["hessian"] * w).sum() - 2 * (w * check["cross"].T).sum() + check["targets"])


def _lifted(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every mask lifted: the weights as they were before pruning zeroed them."""
    import copy

    dense = copy.deepcopy(model)
    for module in dense.modules():
        for name in masked_names(module):  # weight, bias, in_proj_weight, in_proj_bias...
            getattr(module, f"{name}_mask").fill_(1)
    make_permanent(dense)
    return dense


def _errors(model: nn.Module, reference: nn.Module, targets: list[_Target], calibration: Calibration, batch_size: int,
            process_group: object | None = None) -> dict[str, float]:
    """Mean squared error of each layer's output against the dense one's, on the calibration data.

    A layer's output is computed in its hook from its design rows, so only
    outputs, not inputs, are held for all layers at once.
    """
    if not targets:
        return {}
    sums = dict.fromkeys((t.key for t in targets), 0.0)
    counts = dict.fromkeys((t.key for t in targets), 0)
    modes = [(m, m.training) for m in model.modules()] + [(m, m.training) for m in reference.modules()]
    parameters = {(id(net), t.key): _parameters(net, t, masked=True) for net in (model, reference) for t in targets}
    try:
        model.eval()
        reference.eval()
        with torch.no_grad(), torch.random.fork_rng():
            for batch in _batches(calibration, batch_size):
                outputs: dict[int, dict[tuple[str, int], list[torch.Tensor]]] = {id(model): {}, id(reference): {}}
                for net in (model, reference):
                    with _Hooks() as hooks:
                        for t in targets:
                            weight, bias = parameters[(id(net), t.key)]
                            for i, refit in enumerate(t.refits):
                                store = outputs[id(net)].setdefault((t.key, i), [])
                                hooks.add(net, t, refit, lambda x, w=weight, b=bias, r=refit, s=store: s.append(_affine(x, w, b, r)))
                        batch.outputs(net)
                for (key, i), got in outputs[id(model)].items():
                    want = outputs[id(reference)].get((key, i), [])
                    for g, w in zip(got, want):
                        sums[key] += float((g.double() - w.double()).square().sum())
                        counts[key] += g.numel()
    finally:
        for module, training in modes:
            module.training = training
    keys = [t.key for t in targets]
    totals = sum_over_ranks(torch.tensor([[sums[k], float(counts[k])] for k in keys], dtype=torch.float64), process_group)
    return {k: float(total) / max(float(count), 1.0) for k, (total, count) in zip(keys, totals)}
