"""Compensation: after a one-shot prune, re-fit the surviving weights so each layer does what the dense one did.

Removing weights without touching the survivors is what makes a one-shot
prune lose accuracy without retraining; every method that prunes well
without retraining updates the survivors (Optimal Brain Surgeon, Hassibi &
Stork 1993; OBC / Optimal Brain Compression, Frantar & Alistarh 2022;
SparseGPT, Frantar & Alistarh 2023). :func:`compensate` does it as a least-
squares problem per layer, in network order:

- the **input** of layer ``l`` is what the *pruned* network (with the layers
  before ``l`` already compensated) feeds it on calibration data, ``X``
  (``N × d``; a Conv2d's input unfolded into its patches, ``N·P × C·kh·kw``),
  with a column of ones when the layer has a bias;
- the **target** is the *dense* network's output of that layer on the dense
  inputs, ``Y``: so every layer also corrects the error the pruning of the
  layers before it introduced (SparseGPT's own target, the current weights
  on the pruned inputs, corrects only the layer's own pruning);
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
it) is left as it is.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import broadcast_buffers, sum_over_ranks, unwrap, world_size
from .errors import ConfigError, check_choice
from .estimators.fake_pass import Batch, first_tensor
from .layers import ATTENTION_PROJECTIONS, attention_inputs
from .pruning import masked_names, apply_masks, make_permanent, masked_value, refresh_masked

__all__ = ["BATCHNORM_CHOICES", "CompensationResult", "compensate", "reestimate_batchnorm"]

#: calibration inputs as the model takes them: a tensor ``(N, ...)``, or a tuple / dict of tensors whose first dimension is N
Calibration = torch.Tensor | tuple | Mapping

#: what :func:`compensate` does with BatchNorm statistics afterwards
BATCHNORM_CHOICES = ("keep", "reestimate")


@dataclass(frozen=True)
class CompensationResult:
    """What :func:`compensate` did."""

    layers: tuple[str, ...]  #: weight keys re-fitted, in network order (not those that already matched the dense output)
    skipped: tuple[str, ...]  #: masked layers left as they were (unsupported kind), with the reason
    error_before: dict[str, float]  #: per layer, mean squared error vs the dense output before the re-fit
    error_after: dict[str, float]  #: the same after it
    seconds: float
    forward_passes: int  #: forward calls of the model (pruned and dense) on calibration batches


def _masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    layers = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(module, "weight_mask") and isinstance(module, (nn.Linear, nn.Conv2d)):
            layers[f"{prefix}weight"] = module
        elif isinstance(module, nn.MultiheadAttention) and hasattr(module, "in_proj_weight_mask"):
            layers[f"{prefix}in_proj_weight"] = module
    return layers


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


@contextmanager
def _out_proj_calls(attention: nn.MultiheadAttention) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Collect (input, output) of ``attention``'s out_proj while the block runs.

    ``nn.MultiheadAttention`` applies its out_proj with
    ``torch.nn.functional.linear`` inside ``F.multi_head_attention_forward``,
    never through the module: that call is recorded (recognised by its
    weight), with PyTorch's fused attention fast path, which computes it
    inside one kernel, switched off for the block. Empty if this PyTorch
    computes it some other way.
    """
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = F.linear

    def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        output = original(input, weight, bias)
        if weight is attention.out_proj.weight:
            seen.append((input.detach().reshape(-1, input.shape[-1]), output.detach().reshape(-1, output.shape[-1])))
        return output

    fast = torch.backends.mha.get_fastpath_enabled()
    F.linear = linear
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield seen
    finally:
        F.linear = original
        torch.backends.mha.set_fastpath_enabled(fast)


@contextmanager
def _attention_inputs(attention: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Collect an ``nn.MultiheadAttention``'s (query, key, value) while the block runs, as ``(tokens, embed)`` rows."""
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(tuple(t.detach().reshape(-1, t.shape[-1]) for t in attention_inputs(args, kwargs)))

    handle = attention.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _projection_blocks(attention: nn.MultiheadAttention, weight: torch.Tensor, bias: torch.Tensor | None):
    """(weight, bias) of the q, k and v blocks of a packed ``in_proj``: three ``(E, E)`` slices."""
    e = attention.embed_dim
    return [(weight[i * e : (i + 1) * e], None if bias is None else bias[i * e : (i + 1) * e]) for i in range(3)]


def _with_ones(rows: torch.Tensor, bias: bool) -> torch.Tensor:
    rows = rows.float()
    if bias:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], dim=1)
    return rows


def _network_order(model: nn.Module, layers: dict[str, nn.Module], sample: Batch) -> list[str]:
    """Keys of ``layers`` in the order the forward pass calls them (one sample)."""
    order: list[str] = []
    by_module = {id(m): k for k, m in layers.items()}
    handles = [m.register_forward_pre_hook(lambda m, a: order.append(by_module[id(m)])) for m in layers.values()]
    # An attention never calls its out_proj: its place is the attention's call, after the q/k/v projections.
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and id(module.out_proj) in by_module:
            handles.append(module.register_forward_hook(lambda m, a, o: order.append(by_module[id(m.out_proj)])))
    try:
        with torch.no_grad():
            sample.outputs(model)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(order))


def _design(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The least-squares design matrix of a layer's input: rows = output positions, columns = weights (+ bias)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N·P, C·kh·kw), the weight's flattened order
    else:
        rows = inputs.reshape(-1, inputs.shape[-1])
    rows = rows.float()
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype, device=rows.device)], dim=1)
    return rows


def _targets(module: nn.Module, outputs: torch.Tensor) -> torch.Tensor:
    """A layer's outputs as rows matching :func:`_design`: ``(N·P, out)``."""
    if isinstance(module, nn.Conv2d):
        return outputs.permute(0, 2, 3, 1).reshape(-1, outputs.shape[1]).double()
    return outputs.reshape(-1, outputs.shape[-1]).double()


def _unsupported(module: nn.Module) -> str | None:
    if isinstance(module, nn.MultiheadAttention) and (not module._qkv_same_embed_dim or module.bias_k is not None):
        return "attention with separate q/k/v weights or bias_k is not supported"
    if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str)):
        return "grouped, non-zero-padded or 'same'-padded convolutions are not supported"
    return None


@contextmanager
def _capture(module: nn.Module, kind: str) -> Iterator[list[torch.Tensor]]:
    """Collect a module's inputs (``kind="input"``) or outputs (``"output"``) while the block runs."""
    seen: list[torch.Tensor] = []
    if kind == "input":
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    else:
        handle = module.register_forward_hook(lambda m, args, out: seen.append(out.detach()))
    try:
        yield seen
    finally:
        handle.remove()


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
    process_group: object | None = None,
) -> CompensationResult:
    """Re-fit the surviving weights (and biases) of every pruned Linear/Conv2d of ``model``, in place.

    A pruned ``nn.MultiheadAttention`` is re-fitted too: the q, k and v
    blocks of its ``in_proj_weight`` each as a Linear of the query, key and
    value the attention is called with, and its ``out_proj`` (which the
    attention applies with ``F.linear``, never calling the module) on the
    input of that call (:func:`_out_proj_calls`). Separate q/k/v weights
    are left as they are and listed in ``skipped``, with a warning.

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
    start_time = time.perf_counter()
    model = unwrap(model)  # the inner module of a DDP wrapper: its forwards need no collectives
    reference = None if reference is None else unwrap(reference)
    broadcast_buffers(model, process_group)  # BatchNorm statistics: rank 0's on every rank, as DDP's next forward would make them
    if masks:
        apply_masks(model, masks)
    layers = _masked_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no pruned Linear or Conv2d layer to compensate; prune it first")
    if reference is None:
        reference = _lifted(model)
    reference_layers = dict(reference.named_modules())
    modes = [(m, m.training) for m in model.modules()] + [(m, m.training) for m in reference.modules()]
    calls = 0
    fitted, skipped, before, after = [], [], {}, {}
    try:
        model.eval()
        reference.eval()
        order = _network_order(model, layers, Batch(inputs=_slice(calibration, slice(0, 1))))
        for key in layers:
            if key not in order:  # its input cannot be captured: the owner reads the weight itself
                skipped.append(f"{key}: never called as a module in the forward pass")
        out_projections = {id(m.out_proj): m for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
        dense_attentions = {id(m.out_proj): m for m in reference.modules() if isinstance(m, nn.MultiheadAttention)}
        for name, module in model.named_modules():
            for projection in ATTENTION_PROJECTIONS[1:]:  # separate q/k/v weights: not fitted
                if isinstance(module, nn.MultiheadAttention) and hasattr(module, f"{projection}_mask"):
                    skipped.append(f"{name}.{projection}: separate q/k/v projections are not compensated")
        for key in order:
            module = layers[key]
            reason = _unsupported(module)
            if reason:
                skipped.append(f"{key}: {reason}")
                continue
            if isinstance(module, nn.MultiheadAttention):
                dense_attention = reference_layers[key.rpartition(".")[0]]
                fit = _fit_attention(model, reference, module, dense_attention, calibration, batch_size, float(damping), process_group)
                calls += fit["calls"]
                if fit["error"] == 0.0:
                    continue
                refresh_masked(model)
                fitted.append(key)
                before[key] = fit["error"] / max(fit["rows"], 1)
                if fit["failed"]:
                    skipped.append(f"{key}: {fit['failed']} output unit(s) kept their weights (ill-conditioned)")
                continue
            dense_module = reference_layers[key.rpartition(".")[0]]
            attention = out_projections.get(id(module))  # an attention's out_proj: its calls are F.linear's
            d = module.weight_orig[0].numel() + (1 if module.bias is not None else 0)
            hessian = torch.zeros(d, d, dtype=torch.float64)
            cross = torch.zeros(d, module.weight_orig.shape[0], dtype=torch.float64)
            error = 0.0
            rows_seen = 0
            with torch.no_grad(), torch.random.fork_rng():
                for batch in _batches(calibration, batch_size):
                    if attention is not None:
                        with _out_proj_calls(attention) as mine:
                            batch.outputs(model)
                        with _out_proj_calls(dense_attentions[id(dense_module)]) as theirs:
                            batch.outputs(reference)
                        if not mine or not theirs:
                            break  # this PyTorch applies out_proj some other way: left as it is (below)
                        inputs, outputs, targets = [mine[0][0]], [mine[0][1]], [theirs[0][1]]
                    else:
                        with _capture(module, "input") as inputs, _capture(module, "output") as outputs:
                            batch.outputs(model)
                        with _capture(dense_module, "output") as targets:
                            batch.outputs(reference)
                    calls += 2
                    design = _design(module, inputs[0]).cpu()
                    target = _targets(module, targets[0]).cpu()
                    # float32 products of one batch (4x faster than float64 here), summed in float64
                    hessian += (design.T @ design).double()
                    cross += (design.T @ target.float()).double()
                    error += float((_targets(module, outputs[0]).cpu() - target).square().sum())
                    rows_seen += target.numel()
            if attention is not None and rows_seen == 0:  # the same on every rank: the same PyTorch
                skipped.append(f"{key}: this PyTorch applies an attention's out_proj without F.linear; not compensated")
                continue
            # Under torch.distributed: the fit on every rank's calibration inputs together, the same on every rank.
            sum_over_ranks(hessian, process_group)
            sum_over_ranks(cross, process_group)
            totals = sum_over_ranks(torch.tensor([error, float(rows_seen)], dtype=torch.float64), process_group)
            error, rows_seen = float(totals[0]), int(totals[1])
            if error == 0.0:
                # Nothing pruned in or before this layer: it already gives the dense output exactly,
                # and a re-fit could only move it by the damping (at sparsity 0, every layer).
                continue
            keep = module.weight_mask.reshape(module.weight_mask.shape[0], -1).bool().cpu()
            if module.bias is not None:
                bias_keep = getattr(module, "bias_mask", torch.ones(keep.shape[0])).bool().cpu()
                keep = torch.cat([keep, bias_keep[:, None]], dim=1)
            solution = _solve_rows(hessian, cross, keep, float(damping))
            failed = solution.isnan().any(dim=1)
            with torch.no_grad():
                weight = module.weight_orig
                flat = weight.view(weight.shape[0], -1)
                columns = flat.shape[1]
                ok = ~failed
                flat[ok.to(weight.device)] = solution[ok, :columns].to(weight.dtype).to(weight.device)
                if module.bias is not None:
                    bias = module.bias_orig if hasattr(module, "bias_orig") else module.bias
                    bias[ok.to(bias.device)] = solution[ok, columns].to(bias.dtype).to(bias.device)
            refresh_masked(model)
            fitted.append(key)
            before[key] = error / max(rows_seen, 1)
            if failed.any():
                skipped.append(f"{key}: {int(failed.sum())} output unit(s) kept their weights (ill-conditioned)")
        if batchnorm == "reestimate":
            calls += reestimate_batchnorm(model, calibration, batch_size, process_group=process_group)
    finally:
        for module, training in modes:
            module.training = training
    after = _errors(model, reference, fitted, calibration, batch_size, process_group)
    calls += 2 * ((_samples(calibration) + batch_size - 1) // batch_size)
    if skipped:
        warnings.warn("compensate left some weights as they were: " + "; ".join(skipped), stacklevel=2)
    return CompensationResult(tuple(fitted), tuple(skipped), before, after, time.perf_counter() - start_time, calls)


def _fit_attention(
    model: nn.Module, reference: nn.Module, attention: nn.MultiheadAttention, dense: nn.MultiheadAttention,
    calibration: Calibration, batch_size: int, damping: float, process_group: object | None,
) -> dict:
    """Re-fit the kept q, k and v rows of a pruned ``in_proj`` to the dense attention's projections, in place.

    Each block (q, k, v) is a Linear of its own input (the query, key and
    value the attention is called with; all the same for self-attention),
    fitted like any layer: the pruned network's inputs, the dense network's
    projections as the target.
    """
    has_bias = attention.in_proj_bias is not None
    d = attention.embed_dim + (1 if has_bias else 0)
    hessians = [torch.zeros(d, d, dtype=torch.float64) for _ in range(3)]
    crosses = [torch.zeros(d, attention.embed_dim, dtype=torch.float64) for _ in range(3)]
    error, rows, calls = 0.0, 0, 0
    weight = attention.in_proj_weight_orig
    bias = getattr(attention, "in_proj_bias_orig", attention.in_proj_bias)
    masked = _projection_blocks(attention, attention.in_proj_weight_orig * attention.in_proj_weight_mask,
                                None if bias is None else bias * getattr(attention, "in_proj_bias_mask", torch.ones_like(bias)))
    targets_of = _projection_blocks(dense, dense.in_proj_weight, dense.in_proj_bias)
    with torch.no_grad(), torch.random.fork_rng():
        for batch in _batches(calibration, batch_size):
            with _attention_inputs(attention) as mine:
                batch.outputs(model)
            with _attention_inputs(dense) as theirs:
                batch.outputs(reference)
            calls += 2
            for block in range(3):
                x, x_dense = mine[0][block], theirs[0][block]
                target = F.linear(x_dense, *targets_of[block]).cpu()
                design = _with_ones(x, has_bias).cpu()
                hessians[block] += (design.T @ design).double()
                crosses[block] += (design.T @ target.float()).double()
                error += float((F.linear(x, *masked[block]).cpu().double() - target.double()).square().sum())
                rows += target.numel()
    for block in range(3):
        sum_over_ranks(hessians[block], process_group)
        sum_over_ranks(crosses[block], process_group)
    totals = sum_over_ranks(torch.tensor([error, float(rows)], dtype=torch.float64), process_group)
    error, rows = float(totals[0]), int(totals[1])
    failed = 0
    if error == 0.0:
        return {"error": error, "rows": rows, "calls": calls, "failed": failed}
    keep_all = attention.in_proj_weight_mask.bool().cpu()
    bias_keep_all = getattr(attention, "in_proj_bias_mask", torch.ones(keep_all.shape[0])).bool().cpu()
    e = attention.embed_dim
    with torch.no_grad():
        for block in range(3):
            keep = keep_all[block * e : (block + 1) * e]
            if has_bias:
                keep = torch.cat([keep, bias_keep_all[block * e : (block + 1) * e, None]], dim=1)
            solution = _solve_rows(hessians[block], crosses[block], keep, damping)
            ok = ~solution.isnan().any(dim=1)
            failed += int((~ok).sum())
            rows_of_block = torch.arange(block * e, (block + 1) * e)[ok]
            weight[rows_of_block.to(weight.device)] = solution[ok, :e].to(weight.dtype).to(weight.device)
            if has_bias:
                bias[rows_of_block.to(bias.device)] = solution[ok, e].to(bias.dtype).to(bias.device)
    return {"error": error, "rows": rows, "calls": calls, "failed": failed}


def _lifted(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every mask lifted: the weights as they were before pruning zeroed them."""
    import copy

    dense = copy.deepcopy(model)
    for module in dense.modules():
        for name in masked_names(module):  # weight, bias, in_proj_weight, in_proj_bias...
            getattr(module, f"{name}_mask").fill_(1)
    make_permanent(dense)
    return dense


def _output_hook(module: nn.Module, store: dict, key: str):
    """Record ``module``'s output under ``key``; for an attention, the output of its q/k/v projections."""
    if not isinstance(module, nn.MultiheadAttention):
        return module.register_forward_hook(lambda m, args, out: store.__setitem__(key, out))

    def projections(attention: nn.Module, args: tuple, kwargs: dict) -> None:
        weight = masked_value(attention, "in_proj_weight") if hasattr(attention, "in_proj_weight_mask") else attention.in_proj_weight
        bias = attention.in_proj_bias
        if bias is not None and hasattr(attention, "in_proj_bias_mask"):
            bias = masked_value(attention, "in_proj_bias")
        tensors = attention_inputs(args, kwargs)
        blocks = _projection_blocks(attention, weight, bias)
        store[key] = torch.cat([F.linear(t.reshape(-1, t.shape[-1]), *block) for t, block in zip(tensors, blocks)])

    return module.register_forward_pre_hook(projections, with_kwargs=True)


def _errors(model: nn.Module, reference: nn.Module, keys: list[str], calibration: Calibration, batch_size: int,
            process_group: object | None = None) -> dict[str, float]:
    """Mean squared error of each layer's output against the dense one's, on the calibration data."""
    if not keys:
        return {}
    mine, theirs = dict(model.named_modules()), dict(reference.named_modules())
    attention_of = {id(m.out_proj): m for net in (model, reference) for m in net.modules() if isinstance(m, nn.MultiheadAttention)}
    sums = dict.fromkeys(keys, 0.0)
    counts = dict.fromkeys(keys, 0)
    modes = [(m, m.training) for m in model.modules()] + [(m, m.training) for m in reference.modules()]
    try:
        model.eval()
        reference.eval()
        with torch.no_grad(), torch.random.fork_rng():
            for batch in _batches(calibration, batch_size):
                got, want = {}, {}
                for net, modules, store in ((model, mine, got), (reference, theirs, want)):
                    handles = []
                    with ExitStack() as stack:
                        calls = {}
                        for k in keys:
                            module = modules[k.rpartition(".")[0]]
                            if id(module) in attention_of:  # an attention's out_proj: seen through F.linear
                                calls[k] = stack.enter_context(_out_proj_calls(attention_of[id(module)]))
                            else:
                                handles.append(_output_hook(module, store, k))
                        try:
                            batch.outputs(net)
                        finally:
                            for handle in handles:
                                handle.remove()
                        for k, seen in calls.items():
                            store[k] = seen[0][1]
                for k in keys:
                    sums[k] += float((got[k].double() - want[k].double()).square().sum())
                    counts[k] += got[k].numel()
    finally:
        for module, training in modes:
            module.training = training
    totals = sum_over_ranks(torch.tensor([[sums[k], float(counts[k])] for k in keys], dtype=torch.float64), process_group)
    return {k: float(total) / max(float(count), 1.0) for k, (total, count) in zip(keys, totals)}
