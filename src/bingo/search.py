"""Ticket searching: BINGO's significance scores, learned during one training run.

:class:`TicketSearch` is the shell every estimator plugs into (Panangat,
"BINGO: A Novel Pruning Mechanism to Reduce the Size of Neural Networks",
arXiv 2505.09864, Sec. "Ticket searching"). It owns the model, the scored
layers, their initial values θ0, its random generator, the step count and
its timing; what is recorded after each step and how it becomes a score is
the estimator's (:mod:`bingo.estimators`: ``probe``, ``taylor``, ``hybrid``
or your own :class:`~bingo.Estimator`).

The search observes and never perturbs training: estimators draw random
numbers only from the search's own ``torch.Generator``, fake passes run
through ``torch.func.functional_call`` in eval mode under ``fork_rng`` with
every module's train/eval flag restored (:mod:`bingo.estimators.fake_pass`),
and nothing is added to the model's ``state_dict``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checks import META_DEVICE, check_field_types, check_model, check_names, check_seed, describe
from .errors import CheckpointError, ConfigError, check_choice
from .estimators import ESTIMATORS, Estimator, get_estimator
from .estimators.fake_pass import METRICS as METRIC_FUNCTIONS
from .estimators.fake_pass import Batch, Metric, first_tensor, auto_every, resolve_metric
from .devices import model_device
from .distributed import broadcast_tensors, unwrap
from .masks import cached_masks
from .layers import GRANULARITIES, Coverage, bias_name_of, coverage, find_layers, unit_axis, weight_of

__all__ = ["BINGO_SEARCH", "GRANULARITIES", "METRICS", "MODES", "RULES", "UNPROBED", "SearchConfig", "TicketSearch"]

MODES = ("reset", "zero")
METRICS = tuple(METRIC_FUNCTIONS)
UNPROBED = ("keep", "mean", "nan")


def _rules() -> tuple[str, ...]:
    """Every read-out rule some registered estimator offers."""
    return tuple(dict.fromkeys(rule for cls in ESTIMATORS.values() for rule in cls.rules))


RULES = _rules()


@dataclass(frozen=True)
class SearchConfig:
    """Settings of a ticket search. ``help`` and ``choices`` in field metadata become CLI flags."""

    estimator: str | Estimator = field(default="probe", metadata={"help": "what scores the weights: probe (fake passes, the paper), taylor (from the training gradients, no extra passes), hybrid (taylor, each layer calibrated by fake passes), or any registered estimator", "choices": lambda: tuple(ESTIMATORS)})
    fraction: float = field(default=0.01, metadata={"help": "fraction of a layer's weights (or units) reset per fake pass, in (0, 1]"})
    mode: str = field(default="reset", metadata={"help": "what a probed weight is set to: its initial value, or zero", "choices": MODES})
    metric: str | Metric | None = field(default=None, metadata={"help": "what a fake pass measures (higher = better; a callable in the library); default: the estimator's own (accuracy for probe, as in the paper; loss for taylor and hybrid)", "choices": METRICS})
    granularity: str = field(default="weight", metadata={"help": "score single weights, or whole neurons / output channels", "choices": GRANULARITIES})
    rule: str | None = field(default=None, metadata={"help": "probe: default read-out of the probes' sums: mean (relative drop, averaged), paper (the author's s <- (s + |dA|) / 2), contrast (mean drop when probed minus when not); with --target it also decides the focus; default: the estimator's own", "choices": RULES})
    every: int | None = field(default=1, metadata={"help": "fake passes on every k-th training step only; none given (bingo's preset): chosen from the number of layers so that fake passes cost about 5% of training (bingo.estimators.fake_pass.auto_every)"})
    decay: float = field(default=0.99, metadata={"help": "taylor/hybrid: weight of the past in the running average, per update (1 = plain mean)"})
    taylor_every: int = field(default=1, metadata={"help": "taylor/hybrid: the running average takes the gradients of every k-th training step (bingo's preset: 4, a quarter of the per-step cost; the average then spans k / (1 - decay) steps)"})
    target: float = field(default=0.0, metadata={"help": "targeted ticket searching: concentrate fake passes on the weights whose fate at this global sparsity is uncertain (0 = uniform)"})
    band: float = field(default=0.1, metadata={"help": "targeted: keep in focus the weights ranked within this fraction either side of the threshold"})
    seed: int = field(default=0, metadata={"help": "seed of the search's own random generator", "cli": False})
    include: tuple[str, ...] | None = field(default=None, metadata={"help": "glob patterns of the weights to score (default: every Linear/Conv)"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "glob patterns of weights not to score"})

    def __post_init__(self) -> None:
        check_field_types(self)
        try:
            fraction = float(self.fraction)
        except (TypeError, ValueError):
            raise ConfigError(f"fraction must be a number in (0, 1], got {self.fraction!r}") from None
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction!r}")
        check_choice("mode", self.mode, MODES)
        if self.metric is None:  # the estimator's own: hybrid calibrates in loss, the paper's probe measures accuracy
            estimator = self.estimator if isinstance(self.estimator, Estimator) else ESTIMATORS.get(self.estimator)
            object.__setattr__(self, "metric", getattr(estimator, "default_metric", "accuracy"))
        if not callable(self.metric):
            check_choice("metric", self.metric, METRICS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        if not 0.0 <= float(self.target) < 1.0:
            raise ConfigError(f"target must be a sparsity in [0, 1) (0 = untargeted), got {self.target!r}")
        if isinstance(self.taylor_every, bool) or int(self.taylor_every) != self.taylor_every or self.taylor_every < 1:
            raise ConfigError(f"taylor_every must be a whole number >= 1, got {self.taylor_every!r}")
        if self.every is not None and (isinstance(self.every, bool) or int(self.every) != self.every or self.every < 1):
            raise ConfigError(f"every must be a whole number >= 1 (or None: chosen from the number of layers), got {self.every!r}")
        object.__setattr__(self, "fraction", fraction)
        object.__setattr__(self, "seed", check_seed("SearchConfig", "seed", self.seed))
        object.__setattr__(self, "include", None if self.include is None else tuple(check_names("SearchConfig", "include", self.include)))
        object.__setattr__(self, "exclude", tuple(check_names("SearchConfig", "exclude", self.exclude)))
        if isinstance(self.estimator, Estimator):
            self.estimator.resolve_rule(self.rule)
        else:
            get_estimator(self.estimator, self).resolve_rule(self.rule)  # validates the estimator's own settings

    @property
    def estimator_name(self) -> str:
        """The registered name, or the class name of an estimator instance."""
        est = self.estimator
        return est if isinstance(est, str) else (est.name or type(est).__name__)

    def to_dict(self) -> dict:
        """JSON-friendly form; a callable metric and an estimator instance are recorded by name only."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["estimator"] = self.estimator_name
        if callable(self.metric):
            data["metric"] = f"callable:{getattr(self.metric, '__name__', type(self.metric).__name__)}"
        data["include"] = None if self.include is None else list(self.include)
        data["exclude"] = list(self.exclude)
        return data


#: bingo's default search (the ``bingo`` method's, the CLI's and the trainer integrations'): hybrid Taylor
#: estimates calibrated by fake passes that zero the probed weights, measured in loss, every k-th step
#: chosen from the number of layers; the Taylor average from every 4th step (``benchmarks/search_budget.py``:
#: no loss on five tasks, a quarter of its cost, which was most of the search's overhead on an MLP). ``SearchConfig()`` itself is the paper's search.
BINGO_SEARCH = SearchConfig(estimator="hybrid", metric="loss", mode="zero", every=None, taylor_every=4)


def _batch(inputs_or_closure: Any, targets: Any) -> Batch:
    """The :class:`Batch` of one ``search.step`` call; :class:`ConfigError` for one no estimator can learn from."""
    if callable(inputs_or_closure) and not isinstance(inputs_or_closure, torch.Tensor):
        if targets is not None:
            raise ConfigError("search.step(closure) takes the closure alone: it evaluates the batch, targets included")
        return Batch(closure=inputs_or_closure)
    inputs = inputs_or_closure
    first = first_tensor(inputs)
    sizes = [len(t) if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in (first, targets)]
    if None in sizes:
        raise ConfigError(
            "search.step(inputs, targets) needs a batch: inputs (a tensor, a tuple or a dict of tensors) and targets whose "
            "first dimension is the batch; or pass a closure, search.step(lambda model: loss)"
        )
    if sizes[0] == 0:
        raise ConfigError("search.step got an empty batch; skip the call (an empty batch has no loss to measure; under "
                          "torch.distributed every rank must call it at every step: drop the empty batch on every rank, "
                          "e.g. drop_last=True)")
    if sizes[0] != sizes[1]:
        raise ConfigError(
            f"search.step got {sizes[0]} inputs but {sizes[1]} targets (the first dimension of each); pass the batch just "
            "trained on, or, where the inputs' first dimension is not the batch (a sequence-first RNN), a closure: "
            "search.step(lambda model: loss_fn(model(x), y))"
        )
    return Batch(inputs=inputs, targets=targets)


def _device_wait(tensors: dict[str, torch.Tensor]):
    """``torch.cuda.synchronize`` for the devices the search's tensors are on (None on CPU: nothing to wait for)."""
    devices = {t.device for t in tensors.values() if t.device.type == "cuda"}
    if not devices:
        return None
    return lambda: [torch.cuda.synchronize(device) for device in devices]


class TicketSearch:
    """BINGO's ticket search, shaped like a PyTorch optimizer.

    Construct it with the model before training (so θ0 is the
    initialisation), call :meth:`step` after every ``optimizer.step()``,
    checkpoint it with :meth:`state_dict`, read :meth:`significance` at the
    end. ``TicketSearch(model, estimator="hybrid", metric="loss")`` takes any
    :class:`SearchConfig` field as a keyword, or ``config=SearchConfig(...)``.

    ``self.estimator`` decides what each step records and what the scores
    are. Granularity ``"neuron"`` scores whole units (rows of a Linear weight,
    Conv filters, with their bias entry); the model's output layer is then
    left out, since its units are the classes.

    ``model`` may be a ``DistributedDataParallel`` wrapper or its inner
    module (keys are the inner module's). Under ``torch.distributed`` every
    rank's fake-pass measurements are averaged over ``process_group``
    (default: all processes), so every rank ends with the same scores; see
    :mod:`bingo.distributed`.

    Everything the search keeps lives on the device of the layer it scores.
    A step without fake passes never waits for the device; a step with them
    waits once, to read its measurements. ``search.seconds`` is the host
    time spent in :meth:`step`; on a GPU that is the time to *launch* the
    work, unless ``synchronize=True``, which waits for the device before and
    after every step so that ``seconds`` is the work itself (for measuring
    the overhead, not for production runs: it stalls the pipeline).
    """

    def __init__(self, model: nn.Module, *, config: SearchConfig | None = None, process_group: object | None = None,
                 synchronize: bool = False, **settings: object) -> None:
        # a model on the meta device may be searched's shape-only stand-in (its accumulators land there too);
        # step() refuses it, where its values would be read
        model = check_model("TicketSearch", model, meta=False)
        if config is not None and not isinstance(config, SearchConfig):
            raise ConfigError(f"TicketSearch: config must be a bingo.SearchConfig (or None: settings as keywords, "
                              f"TicketSearch(model, fraction=0.05)), got {describe(config)}")
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(SearchConfig)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(SearchConfig))
            raise ConfigError(f"unknown search setting {unknown[0]!r}; valid choices: {valid}")
        config = SearchConfig(**settings) if config is None else dataclasses.replace(config, **settings)
        self.config, self.model = config, unwrap(model)  # fake passes run the inner module: no DDP collectives
        #: under torch.distributed, the ranks whose fake-pass measurements are averaged (None: all; bingo.distributed)
        self.process_group = process_group
        layers = find_layers(model, config.include, config.exclude, config.granularity)
        self.layers: dict[str, nn.Module] = layers
        #: fake passes run on the 1st step and every ``every``-th after it
        self.every: int = int(config.every) if config.every is not None else auto_every(len(layers))
        self.metric: Metric = resolve_metric(config.metric)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps = 0
        self.seconds = 0.0  # wall time spent inside step(): the search's overhead
        self.synchronize = bool(synchronize)
        #: fake passes take the intact pass's outputs of the modules run before the probed layer (bingo.estimators.reuse);
        #: False runs the whole model every time. Checked on the first step with fake passes (``reuse_checked``).
        self.reuse_activations = True
        self.reuse_checked = False
        self._device_checked = False  # step() refuses a meta model (values are read); checked on the first call
        self.theta0 = {key: weight_of(module, key).detach().clone() for key, module in layers.items()}
        self.theta0_bias: dict[str, torch.Tensor] = {}  # neurons: a probed unit's bias is reset too
        if config.granularity == "neuron":
            for key, module in layers.items():
                bias = bias_name_of(module, key)
                if bias is not None:
                    self.theta0_bias[key] = weight_of(module, bias).detach().clone()
        # θ0 is rank 0's on every rank, as DDP makes the weights: a model initialised differently per rank
        # and searched before DDP's first broadcast would otherwise reset probes to different values.
        broadcast_tensors([*self.theta0.values(), *self.theta0_bias.values()], process_group)
        self.estimator = get_estimator(config.estimator, config)
        self.estimator.attach(self)

    def coverage(self) -> Coverage:
        """What this search scores: parameters in its layers vs the whole model, and the kinds it leaves out.

        ``str(search.coverage())`` is a one-line summary, e.g. ``scoring 3 weight
        tensors: 266,200 of 266,610 parameters (99.8%); not scored: biases 410``.
        """
        return coverage(self.model, self.layers)

    def unit_shape(self, key: str) -> torch.Size:
        """Shape of layer ``key``'s scores: the weight's, or ``(out_units,)`` for neurons."""
        shape = self.theta0[key].shape
        return shape if self.config.granularity == "weight" else shape[self.unit_axis(key) : self.unit_axis(key) + 1]

    def unit_axis(self, key: str) -> int:
        """The axis of layer ``key``'s weight that holds its units (its layer type's: 1 for GPT-2's ``Conv1D``)."""
        return unit_axis(self.layers[key], key)

    @torch.no_grad()
    def step(self, inputs_or_closure: Any, targets: torch.Tensor | None = None) -> dict[str, float]:
        """Record what the step just taken says about each weight (the estimator's :meth:`~bingo.Estimator.observe`).

        Call it right after ``optimizer.step()`` and before the next
        ``zero_grad()`` (taylor and hybrid read the gradients), in one of two
        forms, with the batch just trained on:

        - ``search.step(inputs, targets)``: ``inputs`` is what the model takes,
          a tensor, a tuple of positional inputs or a dict of keyword inputs;
          fake passes score ``metric(model(inputs), targets)``.
        - ``search.step(closure)``, shaped like ``optimizer.step(closure)``:
          ``closure(model)`` evaluates the batch on the model it is handed and
          returns the loss (lower = better), e.g. ``lambda m: m(**batch).loss``
          or ``lambda m: criterion(m(x, mask), y)`` (a dict with a ``"loss"``
          entry, as a LightningModule's ``training_step`` returns, works too).
          Fake passes hand it the model itself with the probed weights swapped
          in for the call (``torch.func.functional_call``; the parameters are
          never written), so any inputs, outputs and loss can be measured, and
          the closure may call ``forward`` or any other method; they need
          ``metric="loss"``.

        Returns ``{layer key: damage}`` of this step's fake passes (for
        logging; ``{}`` on steps without any). The model's parameters,
        gradients, buffers, train/eval flags and the global RNG are exactly as
        before the call.
        """
        if not self._device_checked:  # once: walking the parameters every step cost ~1% of a small model's training
            if any(t.is_meta for t in self.theta0.values()) or model_device(self.model).type == "meta":
                raise ConfigError(f"search.step: model {META_DEVICE}, then build the TicketSearch over it")
            self._device_checked = True
        batch = _batch(inputs_or_closure, targets)
        if not self.estimator.records_at(self.steps + 1):  # most steps: only the count moves
            self.steps += 1
            return {}
        wait = _device_wait(self.theta0) if self.synchronize else None
        if wait:
            wait()
        start = time.perf_counter()
        self.steps += 1
        # Inside torch.inference_mode() (a loop that evaluates and steps in one block), the fake passes' tensors
        # would be inference tensors, which keep no version counter and cannot update the state: run outside it.
        outside = torch.inference_mode(False) if torch.is_inference_mode_enabled() else contextlib.nullcontext()
        with outside, cached_masks():  # on a masked model (gradual pruning), each fake pass reuses the masked weights
            damages = self.estimator.observe(batch)
        if wait:
            wait()
        self.seconds += time.perf_counter() - start
        return damages

    def probe_counts(self) -> dict[str, torch.Tensor]:
        """``{key: int64 tensor}``: how many observations informed each weight (unit).

        For ``probe``, the fake passes that included it; for ``taylor`` and
        ``hybrid``, every step informs every weight.
        """
        return self.estimator.counts()

    def significance(self, unprobed: str = "keep", rule: str | None = None) -> dict[str, torch.Tensor]:
        """Scores per weight (or unit), float32 in [0, 1], higher = more significant.

        ``rule`` picks the estimator's read-out of the same sums (``probe``:
        ``"mean"``, ``"paper"``, ``"contrast"``; default: the config's
        ``rule``, else the estimator's first). Scores already in [0, 1] are
        returned as they are; others (contrast, taylor, hybrid: metric or loss
        units, comparable across layers) are mapped to [0, 1] by one affine map
        over all layers, which keeps their order.

        ``unprobed`` decides the score of a weight with no estimate yet:
        ``"keep"`` gives 1 (pruned last: no evidence it is safe to remove),
        ``"mean"`` the mean score of its layer's known weights, ``"nan"`` NaN
        (selection refuses NaN). Keys are the weight names of
        ``model.named_parameters()``; shapes are :meth:`unit_shape`.
        """
        check_choice("unprobed", unprobed, UNPROBED)
        rule = self.estimator.resolve_rule(self.config.rule if rule is None else rule)
        if self.steps == 0:
            warnings.warn(f"significance() before any search.step: nothing was measured, so every score is the unprobed "
                          f"value ({unprobed!r}); call search.step(x, y) after every optimizer.step()", stacklevel=2)
        for note in self.estimator.notes():
            warnings.warn(note, stacklevel=2)
        raw = self._checked_raw_scores(rule)
        if not self.estimator.in_unit_range(rule):
            known_values = [score[~score.isnan()] for score in raw.values()]
            values = torch.cat([v.reshape(-1).double() for v in known_values])
            if values.numel():
                low, high = float(values.min()), float(values.max())
                span = high - low if high > low else 1.0
                raw = {key: (score - low) / span for key, score in raw.items()}
        scores = {}
        for key, score in raw.items():
            known = ~score.isnan()
            if unprobed == "keep":
                fill = 1.0
            elif unprobed == "mean":
                fill = float(score[known].mean()) if known.any() else 1.0
            else:
                fill = math.nan
            scores[key] = torch.where(known, score, torch.full_like(score, fill)).float()
        return scores

    def _checked_raw_scores(self, rule: str) -> dict[str, torch.Tensor]:
        """The estimator's :meth:`~bingo.Estimator.raw_scores`, checked: one tensor of :meth:`unit_shape` per scored layer.

        An estimator (a user's own, typically) that leaves a layer out or
        shapes it wrongly gets a one-line :class:`ConfigError` here, rather
        than a prune that silently skips the layer or fails far from the cause.
        """
        raw = self.estimator.raw_scores(rule)
        name = f"estimator {self.estimator.name or type(self.estimator).__name__!r}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: raw_scores must return {{layer key: tensor}}, got {type(raw).__name__}")
        missing, extra = [k for k in self.layers if k not in raw], [k for k in raw if k not in self.layers]
        if missing or extra:
            wrong = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"not scored by the search {', '.join(extra)}"] if extra else [])
            raise ConfigError(f"{name}: raw_scores must score exactly the search's layers ({', '.join(self.layers)}); "
                              + "; ".join(wrong))
        for key, score in raw.items():
            if not isinstance(score, torch.Tensor) or score.shape != self.unit_shape(key):
                got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
                raise ConfigError(f"{name}: raw_scores[{key!r}] must have the layer's unit shape "
                                  f"{tuple(self.unit_shape(key))}, got {got}")
        return raw

    def state_dict(self) -> dict:
        """Everything needed to resume: config, θ0, step count, RNG state and the estimator's state."""
        return {
            "config": self.config.to_dict(),
            "steps": self.steps,
            "seconds": self.seconds,
            "generator": self.generator.get_state(),
            "theta0": {key: t.clone() for key, t in self.theta0.items()},
            "theta0_bias": {key: t.clone() for key, t in self.theta0_bias.items()},
            "estimator": self.estimator.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. Raises :class:`CheckpointError` if it does not fit.

        Settings must match, except ``rule``: it only chooses how the same
        sums are read (unless the search is targeted: then it also decides
        which weights stay in focus).
        """
        try:
            config, theta0, estimator = state["config"], state["theta0"], state["estimator"]
            steps, generator = int(state["steps"]), state["generator"]
            seconds, theta0_bias = float(state.get("seconds", 0.0)), state["theta0_bias"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"not a TicketSearch state dict of this version (missing or bad {exc})") from None
        mine = self.config.to_dict()
        differing = sorted(
            k for k in mine
            if (k != "rule" or self.config.target) and config.get(k) != mine[k] and not (k == "metric" and callable(self.config.metric))
        )
        if differing:
            raise CheckpointError(
                "search state was saved with different settings: "
                + ", ".join(f"{k}={config.get(k)!r} (now {mine[k]!r})" for k in differing)
            )
        if not isinstance(theta0, dict) or set(theta0) != set(self.theta0):
            found = sorted(theta0) if isinstance(theta0, dict) else theta0
            raise CheckpointError(f"search state covers layers {found}, this search scores {sorted(self.theta0)}")
        for mine_t, saved in ((self.theta0, theta0), (self.theta0_bias, theta0_bias)):
            for key, tensor in mine_t.items():
                if not isinstance(saved.get(key), torch.Tensor) or saved[key].shape != tensor.shape:
                    raise CheckpointError(f"search state θ0 of {key!r} does not match the layer's shape {tuple(tensor.shape)}")
        try:
            torch.Generator().set_state(generator)  # checked before anything is changed
        except (TypeError, RuntimeError):
            raise CheckpointError("search state holds no valid random generator state") from None
        self.estimator.load_state_dict(estimator)
        self.generator.set_state(generator)
        for mine_t, saved in ((self.theta0, theta0), (self.theta0_bias, theta0_bias)):
            for key, tensor in mine_t.items():
                tensor.copy_(saved[key])
        self.steps, self.seconds = steps, seconds
