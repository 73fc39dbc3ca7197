"""Ticket searching: BINGO's significance scores, learned during one training run.

After each real training step, :meth:`TicketSearch.step` runs one "fake"
forward pass per layer on the same batch: a random subset of that layer's
weights (``fraction`` of them) is set back to its initial value θ0
(``mode="reset"``) or to zero (``mode="zero"``), and the change of a metric
against the unmodified network is recorded for every weight of the subset
(Panangat, "BINGO: A Novel Pruning Mechanism to Reduce the Size of Neural
Networks", arXiv 2505.09864, Sec. "Ticket searching").

The fake passes go through ``torch.func.functional_call`` with substitute
tensors, so the model's own parameters are never written: the model is left
exactly as it was. The search observes and never perturbs training: it draws
random numbers only from its own ``torch.Generator``, runs under
``torch.no_grad()`` in eval mode (so BatchNorm statistics are read, not
updated, and dropout draws nothing), restores every module's train/eval flag,
and adds nothing to the model's ``state_dict``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .errors import CheckpointError, ConfigError, check_choice
from .layers import find_layers, output_layer_name, weight_of, weight_parameter_name

__all__ = [
    "GRANULARITIES",
    "METRICS",
    "MODES",
    "ESTIMATORS",
    "RULES",
    "UNPROBED",
    "SearchConfig",
    "TicketSearch",
]

MODES = ("reset", "zero")
METRICS = ("accuracy", "loss")
GRANULARITIES = ("weight", "neuron")
RULES = ("mean", "paper", "contrast")
ESTIMATORS = ("probe", "taylor", "hybrid")
UNPROBED = ("keep", "mean", "nan")

Metric = Callable[[torch.Tensor, torch.Tensor], float]


@dataclass(frozen=True)
class SearchConfig:
    """Settings of a ticket search. Field ``help`` texts become CLI help."""

    fraction: float = field(default=0.01, metadata={"help": "fraction of a layer's weights (or units) reset per fake pass, in (0, 1]"})
    mode: str = field(default="reset", metadata={"help": "what a probed weight is set to: reset (its initial value) or zero"})
    metric: str | Metric = field(default="accuracy", metadata={"help": "what a fake pass measures: accuracy or loss (or a callable, higher = better)"})
    granularity: str = field(default="weight", metadata={"help": "score single weights, or whole neurons / output channels"})
    rule: str = field(default="mean", metadata={"help": "how probes add up: mean (relative drop, averaged), paper (the author's s <- (s + |dA|) / 2) or contrast (mean drop when probed minus when not)"})
    estimator: str = field(default="probe", metadata={"help": "probe (fake forward passes, the paper), taylor (estimate from the training gradients, no extra passes) or hybrid (taylor, with each layer's scale calibrated by real probes)"})
    every: int = field(default=1, metadata={"help": "fake passes on every k-th training step only"})
    decay: float = field(default=0.99, metadata={"help": "taylor: weight of the past in the running average over steps (1 = plain mean over all steps)"})
    target: float = field(default=0.0, metadata={"help": "targeted ticket searching: concentrate probes on the weights whose fate at this global sparsity is still uncertain (0 = uniform probes)"})
    band: float = field(default=0.1, metadata={"help": "targeted: probe the weights ranked within this fraction either side of the target's threshold (contrast rule: within 2 standard errors of it)"})
    batched: bool = field(default=False, metadata={"help": "run one step's fake passes (one per layer) as a single batched forward with torch.func.vmap"})
    seed: int = field(default=0, metadata={"help": "seed of the search's own random generator"})
    include: tuple[str, ...] | None = field(default=None, metadata={"help": "glob patterns of weights to score (default: every Linear/Conv)"})
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "glob patterns of weights not to score"})

    def __post_init__(self) -> None:
        try:
            fraction = float(self.fraction)
        except (TypeError, ValueError):
            raise ConfigError(f"fraction must be a number in (0, 1], got {self.fraction!r}") from None
        if not (0.0 < fraction <= 1.0):
            raise ConfigError(f"fraction must be in (0, 1], got {self.fraction!r}")
        check_choice("mode", self.mode, MODES)
        if not callable(self.metric):
            check_choice("metric", self.metric, METRICS)
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("rule", self.rule, RULES)
        check_choice("estimator", self.estimator, ESTIMATORS)
        if self.estimator == "hybrid" and self.metric != "loss":
            raise ConfigError(f"estimator 'hybrid' calibrates loss estimates and needs metric='loss', got {self.metric!r}")
        if not (0.0 <= float(self.decay) <= 1.0):
            raise ConfigError(f"decay must be in [0, 1], got {self.decay!r}")
        if not (0.0 <= float(self.target) < 1.0):
            raise ConfigError(f"target must be a sparsity in [0, 1) (0 = untargeted), got {self.target!r}")
        if not (0.0 < float(self.band) <= 0.5):
            raise ConfigError(f"band must be in (0, 0.5], got {self.band!r}")
        if self.target and self.estimator == "taylor":
            raise ConfigError("target needs fake passes to concentrate; estimator 'taylor' runs none (use probe or hybrid)")
        if int(self.every) != self.every or self.every < 1:
            raise ConfigError(f"every must be a whole number >= 1, got {self.every!r}")
        object.__setattr__(self, "fraction", fraction)
        if self.include is not None:
            object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict:
        """JSON-friendly form; a callable metric is recorded by name only."""
        data = asdict(self)
        if callable(self.metric):
            data["metric"] = f"callable:{getattr(self.metric, '__name__', type(self.metric).__name__)}"
        data["include"] = None if self.include is None else list(self.include)
        data["exclude"] = list(self.exclude)
        return data


def _batch_accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(dim=1) == targets).float().mean().item()


def _negative_loss(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    # Higher is better everywhere in the search, so loss enters negated.
    return -F.cross_entropy(outputs, targets).item()


def probe_damage(before: float, after: float) -> float:
    """Damage of one probe under the ``mean`` rule, in [0, 1].

    ``(before - after) / |before|``, the relative drop of a higher-is-better
    metric, clipped to [0, 1]. For accuracy this is ``1 - S`` with the paper's
    ``S = 1 - |A_before - A_after| / A_before`` when accuracy fell, and 0 when
    the reset did not hurt (a reset that *helps* is no sign of significance).
    For ``metric="loss"`` it is the relative loss increase ``(L_after - L_before) / L_before``.
    With ``before == 0`` the plain drop is used.
    """
    drop = before - after
    if before != 0:
        drop /= abs(before)
    return min(max(drop, 0.0), 1.0)


def paper_change(before: float, after: float) -> float:
    """``|before - after|`` clipped to [0, 1]: the change the author's code accumulates."""
    return min(abs(before - after), 1.0)


def _random_subset(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct indices in ``range(n)``, every subset equally likely.

    ``randperm(n)`` costs O(n) per probe (1.6 ms for LeNet's 235k first-layer
    weights, more than the fake pass itself), so small subsets are drawn with
    replacement and deduplicated: the distinct values of i.i.d. draws form a
    uniformly random subset of their count, and a uniform choice of ``size``
    of them is again uniform.
    """
    if size * 4 > n:
        return torch.randperm(n, generator=generator)[:size]
    while True:
        distinct = torch.unique(torch.randint(n, (size + size // 4 + 8,), generator=generator))
        if len(distinct) >= size:
            return distinct[torch.randperm(len(distinct), generator=generator)[:size]]


class TicketSearch:
    """BINGO's ticket search: significance of each weight from fake passes.

    Shaped like a PyTorch optimizer: construct it with the model (before
    training, so θ0 is the initialisation), call :meth:`step` after every
    ``optimizer.step()``, checkpoint it with :meth:`state_dict`, read
    :meth:`significance` at the end.

    Significance, per weight (or unit), in [0, 1], higher = more significant:

    - ``rule="mean"`` (default): the mean over the probes that included the
      weight of :func:`probe_damage`, the relative drop of the metric when the
      probe's subset was reset. The paper's formula
      ``S = 1 - |A_before - A_after| / A_before`` read literally gives a *high*
      score when resetting changes nothing, contradicting its own text (higher
      = more significant); we keep its normalisation by ``A_before`` and flip
      the sense, so the score is ``1 - S`` for harmful resets and 0 otherwise.
    - ``rule="paper"``: the author's code, literally: on every probe that
      includes the weight, ``s <- (s + |A_before - A_after|) / 2`` from
      ``s = 0`` (an exponential average that weighs recent probes most).

    Weights that were never probed have no estimate; :meth:`significance`
    decides what they get with ``unprobed`` (default ``"keep"``: score 1, so
    they are pruned only after every probed weight, because nothing says they
    are safe to remove).

    Targeted ticket searching (``target=s``): every ``FOCUS_REFRESH`` rounds
    of fake passes, the weights whose pruning decision at global sparsity
    ``s`` is already clear leave the probes' pool, so the probes concentrate
    where the decision is uncertain (:meth:`_refocus`, :meth:`focus`).

    Granularity ``"neuron"`` probes whole units (a row of a Linear weight, a
    Conv filter, with its bias entry) and scores one value per unit; the
    output layer is then left out, since its units are the classes.
    """

    def __init__(
        self,
        model: nn.Module,
        fraction: float = 0.01,
        mode: str = "reset",
        metric: str | Metric = "accuracy",
        granularity: str = "weight",
        seed: int = 0,
        *,
        rule: str = "mean",
        estimator: str = "probe",
        every: int = 1,
        decay: float = 0.99,
        target: float = 0.0,
        band: float = 0.1,
        batched: bool = False,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        config: SearchConfig | None = None,
    ) -> None:
        if config is None:
            config = SearchConfig(
                fraction=fraction,
                mode=mode,
                metric=metric,
                granularity=granularity,
                rule=rule,
                estimator=estimator,
                every=every,
                decay=decay,
                target=target,
                band=band,
                batched=batched,
                seed=seed,
                include=None if include is None else tuple(include),
                exclude=tuple(exclude),
            )
        self.config = config
        self.model = model
        layers = find_layers(model, config.include, config.exclude)
        if config.granularity == "neuron":
            output = output_layer_name(layers)
            layers = {k: m for k, m in layers.items() if k != output}
            if not layers:
                raise ConfigError(f"neuron granularity needs a hidden layer; {type(model).__name__} has only its output layer {output!r}")
        self.layers: dict[str, nn.Module] = layers
        if callable(config.metric):
            self._metric: Metric = config.metric
        else:
            self._metric = _batch_accuracy if config.metric == "accuracy" else _negative_loss
        self.generator = torch.Generator().manual_seed(config.seed)
        self.steps = 0
        self.seconds = 0.0  # wall time spent inside step(): the search's overhead
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        for key, module in layers.items():
            weight = weight_of(module).detach()
            unit_shape = weight.shape if config.granularity == "weight" else weight.shape[:1]
            def zeros(shape=unit_shape, dtype=torch.float64):
                return torch.zeros(shape, dtype=dtype, device=weight.device)

            entry = {"theta0": weight.clone()}
            if config.estimator == "probe":
                entry.update(
                    count=zeros(dtype=torch.int64),
                    damage_sum=zeros(),  # clipped relative drops: rule "mean"
                    damage_sq_sum=zeros(),
                    running=zeros(),  # the author's running rule: rule "paper"
                    drop_sum=zeros(),  # signed metric drops: rule "contrast"
                    drop_sq_sum=zeros(),
                    layer_probes=zeros((), torch.int64),  # per-layer totals, for the "not probed" side
                    layer_drop_sum=zeros(()),
                    layer_drop_sq_sum=zeros(()),
                )
            if config.estimator in ("taylor", "hybrid"):
                # float32 is plenty for an average of squares and keeps the per-step cost low.
                entry.update(taylor_average=zeros(dtype=torch.float32), taylor_steps=zeros((), torch.int64))
            if config.estimator == "hybrid":
                # measured vs Taylor-predicted loss change of the same probes, summed per layer
                entry.update(calibration_measured=zeros(()), calibration_predicted=zeros(()))
            if config.target:
                # targeted search: which units the next probes may draw from (all, until estimates exist)
                entry["focus"] = torch.ones(unit_shape, dtype=torch.bool, device=weight.device)
            bias = getattr(module, "bias", None)
            if config.granularity == "neuron" and isinstance(bias, torch.Tensor):
                entry["theta0_bias"] = bias.detach().clone()
            self.state[key] = entry

    # -- the fake passes ---------------------------------------------------

    def _units(self, key: str) -> int:
        weight = self.state[key]["theta0"]
        return weight.numel() if self.config.granularity == "weight" else weight.shape[0]

    def _draw_subset(self, key: str) -> torch.Tensor:
        """Indices (into the flattened unit tensor) of the next probe's subset.

        Uniform over the layer; with a ``target``, uniform over the layer's
        units in focus (all of them if fewer than a probe's size remain; the
        whole layer if none does).
        """
        n = self._units(key)
        size = max(1, int(round(self.config.fraction * n)))
        focus = self.state[key].get("focus")
        if focus is not None:
            candidates = focus.view(-1).nonzero().squeeze(1).cpu()
            if 0 < len(candidates) <= size:
                return candidates
            if len(candidates) > size:
                return candidates[_random_subset(len(candidates), size, self.generator)]
        return _random_subset(n, size, self.generator)

    #: targeted search re-decides its focus every this many fake-pass rounds
    FOCUS_REFRESH = 10
    #: contrast rule: a weight leaves the focus once its estimate is this many standard errors from the threshold
    FOCUS_Z = 2.0

    def _refocus(self) -> None:
        """Targeted ticket searching: keep probing only where the pruning decision is uncertain.

        The proposal's "more targeted ticket searching ... slowly focusing on
        finding truly unproductive subsets" as successive elimination: the
        global threshold is the score below which a fraction ``target`` of the
        scored weights lies. With the ``contrast`` rule a weight stays in focus
        while the threshold lies within ``FOCUS_Z`` standard errors of its
        estimate (or it has fewer than 2 probes); otherwise while its score
        ranks within ``band`` (a fraction of all scored weights) either side of
        the threshold. Weights without an estimate stay in focus.
        """
        raw = {key: self._raw(entry) for key, entry in self.state.items()}
        known = torch.cat([score[mask].flatten() for score, mask in raw.values()])
        if known.numel() == 0:
            return
        n = known.numel()

        def quantile(q: float) -> float:
            return float(known.kthvalue(min(max(int(round(q * n)), 1), n)).values)

        target, band = self.config.target, self.config.band
        contrast = self.config.estimator == "probe" and self.config.rule == "contrast"
        threshold, low, high = quantile(target), quantile(target - band), quantile(target + band)
        for key, entry in self.state.items():
            score, mask = raw[key]
            if contrast:
                _, stderr, _ = self._contrast(entry)
                uncertain = ((score - threshold).abs() <= self.FOCUS_Z * stderr) | (entry["count"] < 2)
            else:
                uncertain = (score >= low) & (score <= high)
            entry["focus"].copy_(uncertain | ~mask)

    def _probe_tensors(self, key: str, subset: torch.Tensor) -> dict[str, torch.Tensor]:
        """Substitute tensors for the layer: the subset set to θ0 (or zero), the rest as now."""
        module = self.layers[key]
        module_name = key.rpartition(".")[0]
        prefix = module_name + "." if module_name else ""
        entry = self.state[key]
        weight = weight_of(module).detach()
        subset = subset.to(weight.device)
        probe = weight.clone()
        rows = probe.view(weight.shape[0], -1) if self.config.granularity == "neuron" else probe.view(-1)
        if self.config.mode == "reset":
            source = entry["theta0"].view_as(rows)
            rows[subset] = source[subset]
        else:
            rows[subset] = 0
        tensors = {prefix + weight_parameter_name(module): probe}
        if "theta0_bias" in entry:
            bias = module.bias.detach().clone() if not hasattr(module, "bias_orig") else module.bias_orig.detach().clone()
            bias[subset] = entry["theta0_bias"][subset] if self.config.mode == "reset" else 0
            tensors[prefix + ("bias_orig" if hasattr(module, "bias_orig") else "bias")] = bias
        return tensors

    def _record(self, key: str, subset: torch.Tensor, before: float, after: float) -> None:
        entry = self.state[key]
        subset = subset.to(entry["count"].device)
        damage = probe_damage(before, after)
        entry["count"].view(-1)[subset] += 1
        entry["damage_sum"].view(-1)[subset] += damage
        entry["damage_sq_sum"].view(-1)[subset] += damage * damage
        running = entry["running"].view(-1)
        running[subset] = (running[subset] + paper_change(before, after)) / 2
        drop = before - after
        entry["drop_sum"].view(-1)[subset] += drop
        entry["drop_sq_sum"].view(-1)[subset] += drop * drop
        entry["layer_probes"] += 1
        entry["layer_drop_sum"] += drop
        entry["layer_drop_sq_sum"] += drop * drop

    def _taylor_estimate(self, entry: dict[str, torch.Tensor]) -> torch.Tensor:
        """Bias-corrected running average of ``(g Δ)²`` per weight (unit), float64."""
        steps = int(entry["taylor_steps"])
        decay = self.config.decay
        correction = 1.0 if decay == 1.0 else 1.0 - decay**steps  # Adam-style bias correction
        return entry["taylor_average"].double() / max(correction, 1e-300)

    def _calibrate(self, key: str, subset: torch.Tensor, measured_loss_increase: float) -> None:
        """Hybrid: add one probe's measured loss change and its Taylor prediction ``½ Σ_S (gΔ)²``."""
        entry = self.state[key]
        if int(entry["taylor_steps"]) == 0:
            return
        steps, decay = int(entry["taylor_steps"]), self.config.decay
        correction = 1.0 if decay == 1.0 else 1.0 - decay**steps
        chosen = entry["taylor_average"].view(-1)[subset.to(entry["taylor_average"].device)]
        predicted = 0.5 * float(chosen.double().sum()) / max(correction, 1e-300)
        entry["calibration_measured"] += measured_loss_increase
        entry["calibration_predicted"] += predicted

    def calibration(self) -> dict[str, float]:
        """Hybrid: per layer, measured / Taylor-predicted loss change of the probes (1 where unknown).

        The factor that puts every layer's Taylor scores on the scale of the
        loss changes real fake passes measured, so a global ranking compares
        layers by what resetting their weights actually did.
        """
        if self.config.estimator != "hybrid":
            raise ConfigError("calibration() needs estimator='hybrid'")
        factors = {}
        for key, entry in self.state.items():
            measured, predicted = float(entry["calibration_measured"]), float(entry["calibration_predicted"])
            factors[key] = measured / predicted if measured > 0 and predicted > 0 else 1.0
        return factors

    def _accumulate_taylor(self) -> None:
        """Taylor BINGO: the loss change of resetting each weight, from the training gradient.

        Resetting weight i from w_i to θ0_i changes the loss by about
        ``g_i Δ_i + ½ H_ii Δ_i²`` with ``Δ = θ0 - w`` (``mode="reset"``) or
        ``Δ = -w`` (``mode="zero"``, what pruning does). Near a minimum the
        first-order term averages out over batches (and measured, it only adds
        noise), while ``E[g_i²]``, the empirical Fisher, stands in for the
        curvature (Optimal Brain Damage, LeCun et al. 1990, with the Fisher of
        Theis et al. 2018). So ``(g_i Δ_i)²`` is averaged over searched steps,
        per unit summed over the unit before squaring (the group Taylor
        criterion of Molchanov et al. 2019). The average is exponential with
        weight ``decay`` on the past (bias-corrected like Adam's moments), so
        the score reflects the trained network rather than its early steps;
        ``decay=1`` is the plain mean over all steps. No forward pass is needed.
        """
        decay = self.config.decay
        for key, module in self.layers.items():
            weight = weight_of(module)
            if weight.grad is None:
                raise ConfigError(
                    f"estimator 'taylor' reads the gradient of {key!r}, which is None: call search.step(x, y) "
                    "after optimizer.step() and before the next zero_grad()"
                )
            entry = self.state[key]
            if self.config.mode == "reset":
                change = weight.grad.detach() * (entry["theta0"] - weight.detach())
            else:  # the sign of Δ = -w does not matter once squared
                change = weight.grad.detach() * weight.detach()
            if self.config.granularity == "neuron":
                change = change.reshape(change.shape[0], -1).sum(dim=1)
            entry["taylor_steps"] += 1
            average = entry["taylor_average"]
            weight_new = 1.0 / float(entry["taylor_steps"]) if decay == 1.0 else 1.0 - decay
            average.mul_(1.0 - weight_new).addcmul_(change, change, value=weight_new)

    @torch.no_grad()
    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Run one fake pass per layer on this batch and accumulate scores.

        Call it right after ``optimizer.step()`` with the batch just trained
        on. Returns ``{layer key: damage}`` of this step's probes (for logging).
        The model's parameters, buffers, train/eval flags and the global RNG
        are exactly as before the call.
        """
        start = time.perf_counter()
        self.steps += 1
        damages: dict[str, float] = {}
        if self.config.estimator in ("taylor", "hybrid"):
            self._accumulate_taylor()
        if self.config.estimator in ("probe", "hybrid") and (self.steps - 1) % self.config.every == 0:
            damages = self._fake_passes(inputs, targets)
        self.seconds += time.perf_counter() - start
        return damages

    def _fake_passes(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        modes = [(m, m.training) for m in self.model.modules()]
        devices = [inputs.device.index or 0] if inputs.device.type == "cuda" else []
        damages = {}
        try:
            self.model.eval()
            # Belt and braces: eval mode draws no random numbers in standard
            # layers, but a custom module might, and training must not notice.
            with torch.random.fork_rng(devices=devices):
                before = float(self._metric(self.model(inputs), targets))
                if self.config.target and ((self.steps - 1) // self.config.every) % self.FOCUS_REFRESH == 0:
                    self._refocus()
                # All subsets first: the generator is consumed in the same order either way.
                subsets = {key: self._draw_subset(key) for key in self.layers}
                probes = {key: self._probe_tensors(key, subset) for key, subset in subsets.items()}
                if self.config.batched:
                    outputs_of = self._batched_outputs(probes, inputs)
                else:
                    outputs_of = {key: functional_call(self.model, tensors, (inputs,)) for key, tensors in probes.items()}
                for key, subset in subsets.items():
                    after = float(self._metric(outputs_of[key], targets))
                    if self.config.estimator == "hybrid":
                        self._calibrate(key, subset, before - after)
                    else:
                        self._record(key, subset, before, after)
                    damages[key] = probe_damage(before, after)
        finally:
            for module, training in modes:
                module.training = training
        return damages

    def _batched_outputs(self, probes: dict[str, dict[str, torch.Tensor]], inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs of every layer's fake pass from one ``vmap``-ed forward.

        Probe ``k`` substitutes its own layer's tensors and the current values
        everywhere else, so stacking one full set of substituted tensors per
        probe and mapping ``functional_call`` over the stack computes exactly
        the separate fake passes (up to float rounding of batched kernels), with
        one Python-level forward instead of one per layer.
        """
        current = dict(self.model.named_parameters())
        names = sorted({name for tensors in probes.values() for name in tensors})
        stacked = {
            name: torch.stack([tensors.get(name, current[name].detach()) for tensors in probes.values()])
            for name in names
        }
        outputs = torch.func.vmap(lambda params: functional_call(self.model, params, (inputs,)))(stacked)
        return dict(zip(probes, outputs.unbind(0)))

    # -- results -----------------------------------------------------------

    def focus(self) -> dict[str, torch.Tensor]:
        """Targeted search: ``{key: bool tensor}``, the units the next probes may draw from."""
        if not self.config.target:
            raise ConfigError("focus() needs a targeted search (target > 0)")
        return {key: entry["focus"].clone() for key, entry in self.state.items()}

    def probe_counts(self) -> dict[str, torch.Tensor]:
        """``{key: int64 tensor}``: how many searched steps informed each weight (unit).

        For the probe estimator, the number of probes that included it; for
        ``taylor``, every weight is informed at every searched step.
        """
        counts = {}
        for key, entry in self.state.items():
            if "count" in entry and self.config.estimator == "probe":
                counts[key] = entry["count"].clone()
            else:
                counts[key] = torch.full(entry["taylor_average"].shape, int(entry["taylor_steps"]), dtype=torch.int64)
        return counts

    def _contrast(self, entry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean drop when probed minus mean drop when not, its standard error, and where both sides exist."""
        n_in = entry["count"].double()
        n_out = entry["layer_probes"].double() - n_in
        known = (n_in > 0) & (n_out > 0)
        mean_in = entry["drop_sum"] / n_in.clamp(min=1)
        mean_out = (entry["layer_drop_sum"] - entry["drop_sum"]) / n_out.clamp(min=1)
        var_in = (entry["drop_sq_sum"] / n_in.clamp(min=1) - mean_in.square()).clamp(min=0)
        var_out = ((entry["layer_drop_sq_sum"] - entry["drop_sq_sum"]) / n_out.clamp(min=1) - mean_out.square()).clamp(min=0)
        stderr = (var_in / n_in.clamp(min=1) + var_out / n_out.clamp(min=1)).sqrt()
        return mean_in - mean_out, stderr, known

    def _raw(self, entry: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled scores and where they are known."""
        if self.config.estimator in ("taylor", "hybrid"):
            average = self._taylor_estimate(entry)
            if self.config.estimator == "hybrid":
                measured, predicted = float(entry["calibration_measured"]), float(entry["calibration_predicted"])
                if measured > 0 and predicted > 0:
                    average = average * (measured / predicted)
            return average, torch.full(average.shape, int(entry["taylor_steps"]) > 0)
        if self.config.rule == "contrast":
            contrast, _, known = self._contrast(entry)
            return contrast, known
        probed = entry["count"] > 0
        if self.config.rule == "mean":
            return entry["damage_sum"] / entry["count"].clamp(min=1), probed
        return entry["running"].clone(), probed

    def uncertainty(self) -> dict[str, torch.Tensor]:
        """Standard error of the ``contrast`` estimate per weight (unit), in metric units; inf where unknown.

        Shrinks like ``1 / sqrt(probes)``. Only the probe estimator has it.
        """
        if self.config.estimator != "probe":
            raise ConfigError("uncertainty() needs estimator='probe'")
        out = {}
        for key, entry in self.state.items():
            _, stderr, known = self._contrast(entry)
            out[key] = torch.where(known, stderr, torch.full_like(stderr, math.inf)).float()
        return out

    def significance(self, unprobed: str = "keep") -> dict[str, torch.Tensor]:
        """Scores per weight (or unit), float32 in [0, 1], higher = more significant.

        ``rule="mean"`` and ``"paper"`` are in [0, 1] by construction. The
        ``contrast`` rule and the ``taylor`` estimator measure in metric (loss)
        units, comparable across layers; they are mapped to [0, 1] by one affine
        map over all layers, which keeps their order.

        ``unprobed`` decides the score of a weight with no estimate:
        ``"keep"`` gives 1 (pruned last: no evidence it is safe to remove),
        ``"mean"`` gives the mean score of the known weights of its layer,
        ``"nan"`` gives NaN (for callers that handle it; selection refuses NaN).
        Keys are the weight names of ``model.named_parameters()``; shapes are the
        weight's (``granularity="weight"``) or ``(out_units,)`` (``"neuron"``).
        """
        check_choice("unprobed", unprobed, UNPROBED)
        raw = {key: self._raw(entry) for key, entry in self.state.items()}
        if self.config.estimator != "probe" or self.config.rule == "contrast":
            known_values = [score[known] for score, known in raw.values() if known.any()]
            if known_values:
                values = torch.cat(known_values)
                low, high = float(values.min()), float(values.max())
                span = high - low if high > low else 1.0
                raw = {key: ((score - low) / span, known) for key, (score, known) in raw.items()}
        scores = {}
        for key, (score, known) in raw.items():
            if unprobed == "keep":
                fill = 1.0
            elif unprobed == "mean":
                fill = float(score[known].mean()) if known.any() else 1.0
            else:
                fill = math.nan
            scores[key] = torch.where(known, score, torch.full_like(score, fill)).float()
        return scores

    # -- checkpointing -----------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to resume: config, θ0, accumulators, step count and RNG state."""
        return {
            "config": self.config.to_dict(),
            "steps": self.steps,
            "seconds": self.seconds,
            "generator": self.generator.get_state(),
            "layers": {key: {name: t.clone() for name, t in entry.items()} for key, entry in self.state.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. Raises :class:`CheckpointError` if it does not fit."""
        try:
            config, layers = state["config"], state["layers"]
            steps, generator = int(state["steps"]), state["generator"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"not a TicketSearch state dict (missing {exc})") from None
        mine = self.config.to_dict()
        differing = sorted(
            k for k in mine if config.get(k) != mine[k] and not (k == "metric" and callable(self.config.metric))
        )
        if differing:
            raise CheckpointError(
                "search state was saved with different settings: "
                + ", ".join(f"{k}={config.get(k)!r} (now {mine[k]!r})" for k in differing)
            )
        if set(layers) != set(self.state):
            raise CheckpointError(
                f"search state covers layers {sorted(layers)}, this search scores {sorted(self.state)}"
            )
        for key, entry in self.state.items():
            saved = layers[key]
            if set(saved) != set(entry):
                raise CheckpointError(f"search state for {key!r} has entries {sorted(saved)}, expected {sorted(entry)}")
            for name, tensor in entry.items():
                if saved[name].shape != tensor.shape:
                    raise CheckpointError(
                        f"search state {key}.{name} has shape {tuple(saved[name].shape)}, expected {tuple(tensor.shape)}"
                    )
        for key, entry in self.state.items():
            for name, tensor in entry.items():
                tensor.copy_(layers[key][name])
        self.steps = steps
        self.seconds = float(state.get("seconds", 0.0))
        self.generator.set_state(generator)
