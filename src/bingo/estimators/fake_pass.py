"""Fake passes: forwards with part of one layer reset, that leave the model exactly as it was.

BINGO's ticket searching (Panangat, arXiv 2505.09864, Sec. "Ticket
searching"): after a real training step, a forward on the same batch with a
random subset of one layer's weights set back to θ0 (``mode="reset"``) or to
zero (``mode="zero"``), and the change of a metric against the unmodified
network. Every estimator that probes goes through :func:`measure`, the one
place that guarantees the search observes and never perturbs: substitute
tensors through ``torch.func.functional_call`` (the model's parameters are
never written), eval mode (BatchNorm statistics read, not updated; dropout
draws nothing) with every module's train/eval flag restored, and
``torch.random.fork_rng`` so the global RNG is untouched.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..checks import describe
from ..errors import BingoError, ConfigError
from ..distributed import average_over_ranks
from ..layers import bias_name_of, weight_of, weight_parameter_name
from ..masks import masked_names, refresh_masked
from .reuse import PrefixReuse, shared_tensors

if TYPE_CHECKING:
    from ..search import TicketSearch

__all__ = ["METRICS", "PROBE_BUDGET", "Batch", "Closure", "Metric", "auto_every", "check_class_targets", "due", "measure", "probe_damage", "paper_change", "random_subset", "resolve_metric", "subset_size"]

Metric = Callable[[torch.Tensor, torch.Tensor], float]
#: ``closure(model) -> loss``: evaluates the batch just trained on with the model it is handed; lower = better
Closure = Callable[[Any], torch.Tensor]


class _ClosureCall(torch.nn.Module):
    """``closure(model)`` as a module's forward, so ``functional_call`` can run it with substituted tensors.

    The model is this module's submodule ``model``: ``functional_call`` swaps
    the tensors named ``model.<name>`` in for the call and restores the
    originals after it, so the closure sees the probed weights wherever it
    reaches into the model (``forward``, ``training_step``, a submodule), and
    the model's parameters are never written.
    """

    def __init__(self, model: torch.nn.Module, closure: Closure) -> None:
        super().__init__()
        self.model = model
        self.closure = closure

    def forward(self) -> Any:
        return self.closure(self.model)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in ``value`` (a tensor, or tuples, lists and dicts of them), else None."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    return next((t for t in map(first_tensor, items) if t is not None), None)


@dataclass(frozen=True)
class Batch:
    """One training step's data as ``search.step`` received it: inputs and targets, or a closure.

    ``inputs`` is what the model takes: a tensor (``model(x)``), a tuple of
    positional inputs (``model(*x)``) or a dict of keyword inputs
    (``model(**x)``). A ``closure(model) -> loss`` replaces both and lets any
    inputs, outputs and loss be measured.
    """

    inputs: Any = None
    targets: Any = None
    closure: Closure | None = None

    def arguments(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` the model is called with."""
        if isinstance(self.inputs, tuple):
            return self.inputs, {}
        if isinstance(self.inputs, Mapping):
            return (), dict(self.inputs)
        return (self.inputs,), {}

    def outputs(self, model: Any) -> Any:
        """The model's outputs on ``inputs``."""
        args, kwargs = self.arguments()
        return model(*args, **kwargs)

    def score(self, model: torch.nn.Module, metric: Metric, tensors: dict[str, torch.Tensor] | None = None) -> float:
        """How well ``model`` does on this batch, higher = better: ``metric(outputs, targets)``, or ``-closure(model)``.

        ``tensors`` (``{parameter name: tensor}``) are substituted for the
        model's own during the evaluation (``torch.func.functional_call``).
        A Python number: one host sync on a GPU (:meth:`score_tensor` has none).
        """
        return float(self.score_tensor(model, metric, tensors))

    def score_tensor(self, model: torch.nn.Module, metric: Metric, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """:meth:`score` as a 0-dim float64 tensor on the computation's device, read back by nobody.

        The built-in metrics (:data:`METRICS`) and a closure's loss stay on the
        device; a callable metric that returns a Python number is wrapped.
        """
        if self.closure is None:
            outputs = self.outputs(model) if tensors is None else functional_call(model, tensors, *self.arguments())
            return _as_score(_ON_DEVICE.get(metric, metric)(outputs, self.targets), outputs)
        if tensors is None:
            loss = self.closure(model)
        else:
            loss = functional_call(_ClosureCall(model, self.closure), {f"model.{name}": t for name, t in tensors.items()}, ())
        if isinstance(loss, Mapping) and "loss" in loss:  # e.g. a LightningModule's training_step
            loss = loss["loss"]
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            return -loss.detach().reshape(()).double()
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.tensor(-float(loss), dtype=torch.float64)
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ConfigError(f"search.step(closure): the closure must return the batch's loss as one number (a scalar tensor), got {what}")

    def device(self, model: torch.nn.Module) -> torch.device:
        """Where the computation runs: the inputs' device, else the model's."""
        tensor = first_tensor(self.inputs)
        if tensor is None:
            tensor = next(iter(model.parameters()), torch.empty(0))
        return tensor.device


def check_class_shapes(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """:class:`ConfigError` unless ``outputs`` are ``(batch, classes)`` logits and ``targets`` integer labels ``(batch,)``.

    Reads shapes and dtypes only: no host sync. The labels' range is
    :func:`check_class_targets`'s (or, inside :func:`measure`, read back
    with the measurements).
    """
    if not isinstance(outputs, torch.Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
        raise ConfigError(f"metrics 'accuracy' and 'loss' need model outputs of shape (batch, classes), got {shape}; pass a callable metric")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        what = f"{targets.dtype} of shape {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ConfigError(f"metrics 'accuracy' and 'loss' need targets that are integer class labels of shape (batch,), got {what}")
    if len(targets) != len(outputs):
        raise ConfigError(f"the model gave {len(outputs)} outputs for {len(targets)} targets")


def _label_range_error(targets: torch.Tensor, classes: int) -> ConfigError:
    low, high = int(targets.min()), int(targets.max())
    return ConfigError(f"targets must be class labels in [0, {classes}) for this model's {classes} outputs, got labels from {low} to {high}")


def check_class_targets(outputs: torch.Tensor, targets: torch.Tensor) -> None:
    """:class:`ConfigError` unless ``outputs`` are ``(batch, classes)`` logits and ``targets`` their class labels.

    Out-of-range labels would otherwise make every accuracy probe measure
    nothing (damage 0) without a word. Reads the labels' range back (one
    host sync).
    """
    check_class_shapes(outputs, targets)
    classes = outputs.shape[1]
    if bool(((targets < 0) | (targets >= classes)).any()):
        raise _label_range_error(targets, classes)


def batch_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of the batch classified right."""
    check_class_targets(outputs, targets)
    return _accuracy_tensor(outputs, targets).item()


def negative_loss(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """``-cross_entropy``: higher is better everywhere in the search, so loss enters negated."""
    check_class_targets(outputs, targets)
    return _negative_loss_tensor(outputs, targets).item()


def _accuracy_tensor(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    check_class_shapes(outputs, targets)
    return (outputs.argmax(dim=1) == targets).float().mean().double()  # float32 mean, as the float metric gives


def _negative_loss_tensor(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    check_class_shapes(outputs, targets)
    # Clamped so that out-of-range labels cannot raise (or assert on a GPU) before
    # measure() reads their flag back with the measurements and reports them.
    # .long(): int32 / int16 labels are labels too, and cross_entropy takes only int64 (or uint8)
    return -F.cross_entropy(outputs, targets.clamp(0, outputs.shape[1] - 1).long()).double()


#: the built-in metrics as device tensors, for :meth:`Batch.score_tensor`
_ON_DEVICE: dict[Metric, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    batch_accuracy: _accuracy_tensor,
    negative_loss: _negative_loss_tensor,
}


def _as_score(value: Any, outputs: Any) -> torch.Tensor:
    """A metric's value as a 0-dim float64 tensor, on the outputs' device when it is a Python number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.detach().reshape(()).double()
    try:
        number = float(value)
    except (TypeError, ValueError):
        what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else describe(value)
        raise ConfigError(f"a metric must return one number per batch (higher = better), got {what}") from None
    device = outputs.device if isinstance(outputs, torch.Tensor) else None
    return torch.tensor(number, dtype=torch.float64, device=device)


#: metric name -> ``metric(outputs, targets) -> float``, higher = better
METRICS: dict[str, Metric] = {"accuracy": batch_accuracy, "loss": negative_loss}


def resolve_metric(metric: str | Metric) -> Metric:
    """The callable for a metric name (:data:`METRICS`), or the callable itself."""
    return metric if callable(metric) else METRICS[metric]


def probe_damage(before: float, after: float) -> float:
    """Damage of one probe, in [0, 1]: the relative drop of a higher-is-better metric.

    ``(before - after) / |before|`` clipped to [0, 1]. For accuracy this is
    ``1 - S`` with the paper's ``S = 1 - |A_before - A_after| / A_before`` when
    accuracy fell, and 0 when the reset did not hurt (a reset that *helps* is
    no sign of significance). For ``metric="loss"`` it is the relative loss
    increase ``(L_after - L_before) / L_before``. With ``before == 0`` the
    plain drop is used.
    """
    drop = before - after
    if before != 0:
        drop /= abs(before)
    return min(max(drop, 0.0), 1.0)


def paper_change(before: float, after: float) -> float:
    """``|before - after|`` clipped to [0, 1]: the change the author's code accumulates."""
    return min(abs(before - after), 1.0)


def random_subset(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct indices in ``range(n)``, every subset equally likely.

    ``randperm(n)`` costs O(n) per probe (1.6 ms for LeNet's 235k first-layer
    weights, more than the fake pass itself), so small subsets are drawn with
    replacement and deduplicated: the distinct values of i.i.d. draws form a
    uniformly random subset of their count, and a uniform choice of ``size``
    of them is again uniform. (The draws land in a NumPy buffer and are
    deduplicated by NumPy's sort: the same values as ``torch.unique``, in a
    fifth of its time; host memory throughout, nothing read from a device.)
    """
    if size * 4 > n:
        return torch.randperm(n, generator=generator)[:size]
    while True:
        draws = np.empty(size + size // 4 + 8, dtype=np.int64)
        torch.randint(n, draws.shape, generator=generator, out=torch.from_numpy(draws))
        ordered = np.sort(draws)
        distinct = torch.from_numpy(ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))])
        if len(distinct) >= size:
            return distinct[torch.randperm(len(distinct), generator=generator)[:size]]


def subset_size(search: TicketSearch, key: str) -> int:
    """Units per probe of layer ``key``: ``round(fraction × units)``, at least 1."""
    return max(1, int(round(search.config.fraction * search.unit_shape(key).numel())))


#: the share of training compute that fake passes take when the search chooses ``every`` itself
PROBE_BUDGET = 0.05


def auto_every(layers: int, budget: float = PROBE_BUDGET) -> int:
    """The probe interval that keeps fake passes at about ``budget`` (:data:`PROBE_BUDGET`) of training compute.

    A step with fake passes runs ``1 + layers`` forwards (the intact model,
    then one per probed layer); a training step costs about three forwards
    (the backward about two). So ``every = ceil((1 + layers) / (3 × budget))``:
    27 for LeNet-300-100's three layers, 114 for a 16-layer ResNet, where
    probing every 10th step made the search cost more than half of training.
    """
    return max(1, math.ceil((1 + layers) / (3 * budget)))


def due(search: TicketSearch) -> bool:
    """True on the steps that run fake passes: the 1st, then every ``search.every``-th."""
    return (search.steps - 1) % search.every == 0


def _substitutes(search: TicketSearch, key: str, subset: torch.Tensor) -> dict[str, torch.Tensor]:
    """Substitute tensors for layer ``key``: the subset's units set to θ0 (or zero), the rest as now.

    Units are weights (``granularity="weight"``, indices into the flattened
    weight) or whole rows / filters with their bias entry (``"neuron"``). On a
    pruned module the substitute replaces ``weight_orig``, so the mask still
    applies.
    """
    module = search.layers[key]
    module_name = key.rpartition(".")[0]
    prefix = module_name + "." if module_name else ""
    reset = search.config.mode == "reset"
    weight = weight_of(module, key).detach()
    subset = subset.to(weight.device, non_blocking=True)  # drawn on the host: no sync for the copy
    # Row-major whatever the weight's layout (a channels_last conv's is not), so that flat index i is the
    # score's entry i and the flat view below is a view: the write must land in probe.
    probe = weight.clone(memory_format=torch.contiguous_format)
    if search.config.granularity == "neuron":  # whole units: index the unit axis (a view, so the write lands in probe)
        axis = search.unit_axis(key)
        rows, initial = probe.movedim(axis, 0), search.theta0[key].movedim(axis, 0)
    else:
        rows, initial = probe.view(-1), search.theta0[key].reshape(-1)
    if reset and initial.device != weight.device:
        raise ConfigError(
            f"search.step: {key!r} is on {weight.device} but the search was built with it on {initial.device} "
            "(its θ0 lives there): build the TicketSearch after moving the model (model.to(device))"
        )
    # .to: a no-op unless the model changed dtype after the search was built (model.half()); θ0 follows it
    rows[subset] = initial[subset].to(rows.dtype) if reset else 0
    if not weight.is_contiguous():  # back in the weight's own layout: the forward runs the kernels it runs
        probe = torch.empty_like(weight).copy_(probe)
    tensors = {prefix + weight_parameter_name(module, key): probe}
    if key in search.theta0_bias:
        name = weight_parameter_name(module, bias_name_of(module, key))
        bias = getattr(module, name).detach().clone()
        bias[subset] = search.theta0_bias[key][subset].to(bias.dtype) if reset else 0
        tensors[prefix + name] = bias
    return tensors


def _check_reuse(search: TicketSearch, read: list[float], probes: int) -> list[float]:
    """``[before, *probes]`` from ``read`` = ``[before, *reused, *recomputed]``; switches the reuse off if they differ."""
    before, reused, recomputed = read[0], read[1 : 1 + probes], read[1 + probes : 1 + 2 * probes]
    search.reuse_checked = True
    # the same kernels on the same inputs give the same bits; a tolerance for devices whose kernels do not
    if not all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b)) for a, b in zip(reused, recomputed)):
        search.reuse_activations = False
        warnings.warn(
            "search: fake passes that reuse the intact pass's outputs of earlier layers measured differently from full "
            "passes (does the model read a layer's weights outside that layer's call?): reuse turned off, every fake pass "
            "runs the whole model",
            stacklevel=4,
        )
    return [before, *recomputed]


class _BufferSnapshot:
    """Every buffer of ``model`` as it is now; :meth:`restore` puts them all back.

    Eval mode stops BatchNorm from updating its statistics, but not a module
    that writes its buffers in any mode: a quantization observer
    (``torch.ao``'s fake-quantize modules keep a running min / max, scale and
    zero point) would otherwise learn from the probed networks, and training
    with the search would no longer be bit-identical to training without it.
    Every buffer is copied back, not only those whose version counter moved:
    the fused fake-quantize kernel writes its buffers without moving it.
    Costs a copy of the buffers (usually a small fraction of the weights)
    there and back per step with fake passes, and no host sync. The pruning
    masks (``<name>_mask``, as large as their weights) are left out: only
    their pruning hook reads them, and it never writes them.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.kept = []
        for module in model.modules():
            masks = {f"{name}_mask" for name in masked_names(module)}
            self.kept += [(module, name, buffer, buffer.detach().clone())
                          for name, buffer in module._buffers.items() if buffer is not None and name not in masks]

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, buffer, saved in self.kept:
                if module._buffers.get(name) is not buffer:  # rebound to a new tensor: put the original back
                    module._buffers[name] = buffer
                if buffer.shape != saved.shape:
                    buffer.resize_(saved.shape)  # an observer that resized its scale (per-channel) in place
                buffer.copy_(saved)


def measure(search: TicketSearch, batch: Batch, subsets: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """The score on this batch before any reset, and after resetting each layer's subset alone (higher = better).

    ``subsets`` maps layer keys to unit indices (see :func:`_substitutes`).
    One evaluation of the intact model, then one fake pass per layer (a
    closure is handed the model with the probe's tensors swapped in for the
    call, see :class:`_ClosureCall`). The model's parameters,
    buffers (also those a module writes in eval mode, see
    :class:`_BufferSnapshot`), train/eval flags and the global RNG are
    exactly as before the call.

    Costs one host sync: the L + 1 measurements stay on the model's device
    (averaged there over ranks) and are read back together at the end. One
    layer's probe tensors exist at a time, never a copy of every scored weight.
    A fake pass takes the intact pass's outputs of the modules that ran
    before the probed layer (:class:`~bingo.estimators.reuse.PrefixReuse`)
    unless ``search.reuse_activations`` is False; on the search's first call
    every probe is also run without, and where the two differ the reuse is
    turned off for good, with a warning (the values returned are the ones
    computed without it).
    """
    if batch.closure is not None and search.config.metric != "loss":
        raise ConfigError(
            f"search.step(closure): a closure returns a loss, so fake passes need metric='loss', not {search.config.metric!r}; "
            "or call search.step(inputs, targets)"
        )
    model, metric = search.model, search.metric
    modes = [(m, m.training) for m in model.modules()]
    device = batch.device(model)
    devices = [device.index or 0] if device.type == "cuda" else []
    buffers = _BufferSnapshot(model)
    try:
        model.eval()
        reuse = PrefixReuse(model) if search.reuse_activations else None
        shared = shared_tensors(model) if reuse else set()  # tied weights: never served from the record
        checking = reuse is not None and not search.reuse_checked
        # Belt and braces: eval mode draws no random numbers in standard
        # layers, but a custom module might, and training must not notice.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            try:
                with reuse.recording() if reuse and batch.closure is None else contextlib.nullcontext():
                    outputs = None if batch.closure is not None else batch.outputs(model)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                inputs = batch.inputs
                shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"search.step: the model cannot take these inputs (shape {shape}): {reason}") from exc
            checks_labels = outputs is not None and metric in _ON_DEVICE
            if outputs is None:
                with reuse.recording() if reuse else contextlib.nullcontext():
                    before = batch.score_tensor(model, metric)
            else:
                before = _as_score(_ON_DEVICE.get(metric, metric)(outputs, batch.targets), outputs)
            values = [before]
            for key, subset in subsets.items():  # one probe's tensors at a time
                layer = search.layers[key]
                tied = any(id(parameter) in shared for parameter in layer.parameters())
                with reuse.serving(layer, shared=tied) if reuse else contextlib.nullcontext():
                    values.append(batch.score_tensor(model, metric, _substitutes(search, key, subset)))
            if checking:  # once per search: the same probes with nothing reused, to compare
                values += [batch.score_tensor(model, metric, _substitutes(search, key, subset)) for key, subset in subsets.items()]
            if checks_labels:  # read back with the measurements: no sync of its own
                values.append(((batch.targets < 0) | (batch.targets >= outputs.shape[1])).any())
            stacked = torch.stack([value.to(device, torch.float64, non_blocking=True) for value in values])
        # Under torch.distributed every rank measured its own batch on the same subsets:
        # the mean over ranks is what every rank's estimator records (bingo.distributed).
        # Checked after the average, so that a rank with a non-finite batch makes every rank stop, not wait.
        read = average_over_ranks(stacked, search.process_group).tolist()  # the one host sync
        if checks_labels and read.pop() > 0:
            local = batch.targets
            raise _label_range_error(local, outputs.shape[1])
        if checking:
            read = _check_reuse(search, read, len(subsets))
        before, *changed = read
        after = dict(zip(subsets, changed))
        if not math.isfinite(before):
            raise BingoError(
                f"search.step: the metric is {before} on this batch before any reset, so the model's outputs are not "
                "finite: training diverged (try a lower learning rate)"
            )
    finally:
        for module, training in modes:
            module.training = training
        buffers.restore()
        # torch's prune recomputes ``weight = weight_orig * mask`` in a forward
        # pre-hook and leaves it on the module: after a fake pass that is the
        # probe's value, until the next real forward. Put the real one back.
        refresh_masked(model)
    return before, after
