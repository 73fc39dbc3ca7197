"""Taylor BINGO: the loss change of resetting each weight, from the gradients training computed anyway."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import BingoError, ConfigError
from ..layers import weight_of
from ..layer_types import unit_matrix
from .base import Estimator, register_estimator
from .fake_pass import Batch

if TYPE_CHECKING:
    from ..search import SearchConfig, TicketSearch

__all__ = ["TaylorEstimator"]


#: a non-finite gradient (the overflowed gradients of a step a ``torch.amp.GradScaler`` skipped) adds nothing to the
#: average, as a zero gradient would: one such step must not make the whole estimate infinite for good. A non-finite
#: weight still makes it non-finite: that is a diverged training, and significance() says so.
_SKIPPED = {"nan": 0.0, "posinf": 0.0, "neginf": 0.0}


@register_estimator
class TaylorEstimator(Estimator):
    """Every weight scored at every step by a second-order Taylor estimate; no forward passes.

    Resetting weight i from w_i to θ0_i changes the loss by about
    ``g_i Δ_i + ½ H_ii Δ_i²`` with ``Δ = θ0 - w`` (``mode="reset"``) or
    ``Δ = -w`` (``mode="zero"``, what pruning does). Near a minimum the
    first-order term averages out over batches (and measured, it only adds
    noise), while ``E[g_i²]``, the empirical Fisher, stands in for the
    curvature (Optimal Brain Damage, LeCun et al. 1990, with the Fisher of
    Theis et al. 2018). So ``(g_i Δ_i)²`` is averaged over steps, per unit
    summed over the unit before squaring (the group Taylor criterion of
    Molchanov et al. 2019). The average is exponential with weight ``decay``
    on the past, bias-corrected like Adam's moments, so the score reflects the
    trained network rather than its early steps; ``decay=1`` is the plain mean.

    Reads ``.grad``: call ``search.step`` after ``optimizer.step()`` (after
    ``scaler.step(optimizer)`` with a ``GradScaler``, which unscales the
    gradients; the non-finite ones of a step it skipped count as zero) and
    before the next ``zero_grad()``. Scores are in loss units (higher = more
    significant), mapped to [0, 1] by the search.
    """

    name = "taylor"
    default_metric = "loss"  # its scores are loss changes; hybrid's fake passes calibrate them in loss

    def __init__(self, decay: float = 0.99, update_every: int = 1) -> None:
        super().__init__()
        if not 0.0 <= float(decay) <= 1.0:
            raise ConfigError(f"decay must be in [0, 1], got {decay!r}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"update_every must be a whole number >= 1, got {update_every!r}")
        self.decay = float(decay)
        #: the running average takes the gradients of every ``update_every``-th step only (the 1st, then every
        #: k-th): 1/k of the per-step cost. ``decay`` weighs the past per update, so the average holds as many
        #: samples as with k = 1 and spans k times the steps. (Compounding the decay to span the same steps
        #: instead cost up to 6 points on digits, where a run is 230 steps: ``benchmarks/search_budget.py``.)
        self.update_every = update_every
        self._update_decay = self.decay

    @classmethod
    def from_config(cls, config: SearchConfig) -> TaylorEstimator:
        if config.target:
            raise ConfigError(f"target needs fake passes to concentrate; estimator {cls.name!r} runs none (use probe or hybrid)")
        return cls(decay=config.decay, update_every=config.taylor_every)

    def attach(self, search: TicketSearch) -> None:
        super().attach(search)
        for key in search.layers:
            device = search.theta0[key].device
            # float32 is plenty for an average of squares and keeps the per-step cost low.
            self.state[key] = {
                "taylor_average": torch.zeros(search.unit_shape(key), dtype=torch.float32, device=device),
                "taylor_steps": torch.zeros((), dtype=torch.int64, device=device),
                "taylor_scale": torch.ones((), dtype=torch.float64, device=device),
            }
        # The step count and the scale as Python numbers too, so that no step reads them back from the device.
        self.steps_seen = {key: 0 for key in search.layers}
        self.scales = {key: 1.0 for key in search.layers}

    #: elements per piece of the CPU update (512 KB of float32 scratch: stays in cache, and no fresh allocation
    #: per step, whose page faults made the update cost 2-3x its arithmetic)
    CPU_CHUNK = 131072

    #: the scale below which the stored average is multiplied out (one pass over it every ~1,400 updates at
    #: decay 0.99), so that the stored values stay within ~10^6 of the average's and float32 cannot overflow
    FOLD_BELOW = 2.0**-20

    def records_at(self, step: int) -> bool:
        """The 1st step, then every ``update_every``-th: the steps whose gradients the average takes."""
        return (step - 1) % self.update_every == 0

    def observe(self, batch: Batch) -> dict[str, float]:
        search = self.search
        if not TaylorEstimator.records_at(self, search.steps):
            return {}
        neuron = search.config.granularity == "neuron"
        reset_mode = search.config.mode == "reset"
        for key, module in search.layers.items():
            weight = weight_of(module, key)
            if weight.grad is None:
                if not weight.requires_grad:
                    raise ConfigError(
                        f"estimator {self.name!r} reads the gradient of {key!r}, which is frozen (requires_grad=False): "
                        f"leave it out of the search (exclude=[{key!r}]) or let it train"
                    )
                if any(weight_of(other, name).grad is not None for name, other in search.layers.items()):
                    # others have theirs: this layer took no part in the loss, not a call made out of order
                    raise ConfigError(
                        f"estimator {self.name!r} reads the gradient of {key!r}, which is None while other layers' are "
                        f"not: the layer took no part in the loss (unused in forward?); leave it out (exclude=[{key!r}])"
                    )
                raise ConfigError(
                    f"estimator {self.name!r} reads the gradient of {key!r}, which is None: call search.step(x, y) "
                    "after optimizer.step() and before the next zero_grad()"
                )
            self.steps_seen[key] += 1  # into the state's "taylor_steps" at state_dict(): no tensor op per step
            new_weight = 1.0 / self.steps_seen[key] if self.decay == 1.0 else 1.0 - self._update_decay
            average = self.state[key]["taylor_average"]
            step_weight = self._rescale(key, average, 1.0 - new_weight) * new_weight
            grad, value = weight.grad.detach(), weight.detach()
            reset = search.theta0[key] if reset_mode else None
            if not neuron and average.device.type == "cpu" and grad.is_contiguous() and value.is_contiguous():
                self._update_in_pieces(average.view(-1), grad.view(-1), value.view(-1), None if reset is None else reset.view(-1), step_weight)
                continue
            grad = grad.nan_to_num(**_SKIPPED)
            change = grad * (reset - value) if reset is not None else grad * value  # the sign of Δ = -w does not matter once squared
            if neuron:
                change = unit_matrix(change, search.unit_axis(key)).sum(dim=1)
            average.addcmul_(change, change, value=step_weight)  # one kernel per op; on a GPU the temporary comes from the caching allocator
        return {}

    def _rescale(self, key: str, average: torch.Tensor, keep: float) -> float:
        """The factor ``1 / c`` of this update's term, having set the scale ``c ← c · keep``.

        The running average is stored as ``S`` with ``average = c · S``
        (``scales[key]``, a Python number): ``average ← keep · average + a·x``
        is then ``S ← S + (a / c)·x`` with the new ``c``, one pass over the
        weights fewer than scaling the stored average at every update. When
        ``c`` falls below :data:`FOLD_BELOW` (at once for ``keep = 0``: the
        first update of a plain mean, or ``decay = 0``) it is multiplied into
        ``S`` and starts again at 1.
        """
        scale = self.scales[key] * keep
        if scale < self.FOLD_BELOW:
            average.mul_(scale)
            scale = 1.0
        self.scales[key] = scale
        return 1.0 / scale

    def _update_in_pieces(self, average: torch.Tensor, grad: torch.Tensor, value: torch.Tensor,
                          reset: torch.Tensor | None, step_weight: float) -> None:
        """``S ← S + w·(g Δ)²`` over flat CPU tensors, a cache-sized piece at a time.

        The same operations element by element as the whole-tensor update, so
        the result is bit-identical; only the temporaries (``g`` with
        non-finite entries zeroed, ``g Δ``) live in reused scratch buffers
        instead of a fresh allocation per layer and step.
        """
        n = average.numel()
        size = min(max(n, 1), self.CPU_CHUNK)
        scratch = self._scratch_buffer("_scratch", size, grad.dtype)  # the gradient's own dtype: nan_to_num's out must match
        delta = None if reset is None else self._scratch_buffer("_delta", size, value.dtype)
        for start in range(0, n, self.CPU_CHUNK):
            stop = min(start + self.CPU_CHUNK, n)
            change = scratch[: stop - start]
            torch.nan_to_num(grad[start:stop], out=change, **_SKIPPED)  # in cache: nearly free
            if delta is None:
                change.mul_(value[start:stop])
            else:
                change.mul_(torch.sub(reset[start:stop], value[start:stop], out=delta[: stop - start]))
            average[start:stop].addcmul_(change, change, value=step_weight)

    def _scratch_buffer(self, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
        """The reused CPU buffer ``name`` with room for ``size`` elements of ``dtype`` (made anew only when it has not)."""
        buffer = getattr(self, name, None)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype:
            buffer = torch.empty(size, dtype=dtype)
            setattr(self, name, buffer)
        return buffer

    def bias_correction(self, key: str) -> float:
        """``1 - decay^steps`` (Adam's bias correction of a zero-started average); 1 for the plain mean."""
        steps = self.steps_seen[key]
        return max(1.0 if self.decay == 1.0 else 1.0 - self._update_decay**steps, 1e-300)

    def estimate(self, key: str) -> torch.Tensor:
        """Bias-corrected running average of ``(g Δ)²`` for layer ``key``, float64."""
        return self.state[key]["taylor_average"].double() * (self.scales[key] / self.bias_correction(key))

    def notes(self) -> list[str]:
        """A warning when every term ``g·Δ`` the running average read was zero, so every score is zero.

        The usual cause is the order of calls: gradients zeroed in place
        (``zero_grad(set_to_none=False)``) before ``search.step`` leave zeros,
        not None, so nothing stopped the step. With ``mode="reset"`` (where
        ``Δ = θ0 − w``) it is also what a search sees before the weights have
        moved from where it started.
        """
        updates = max(self.steps_seen.values(), default=0)
        if not updates or any(bool(entry["taylor_average"].any()) for entry in self.state.values()):
            return []
        reset = self.search is not None and self.search.config.mode == "reset"
        cause = ("the gradients were zero when search.step ran (call it after loss.backward() and before "
                 "optimizer.zero_grad())")
        if reset:
            cause += " or the weights had not moved from where the search started (mode='reset' scores g·(θ0 − w))"
        return [f"estimator {self.name!r}: every term g·Δ it read over {updates} update{'s' if updates != 1 else ''} "
                f"was zero, so every score is zero and the ranking is arbitrary: {cause}"]

    def raw_scores(self, rule: str | None) -> dict[str, torch.Tensor]:
        self.resolve_rule(rule)
        scores = {key: self._known(key, self.estimate(key)) for key in self.state}
        # Checked here rather than at every step: a per-step check costs a pass over every weight.
        for key, score in scores.items():
            if bool(torch.isinf(score).any()) or (self.steps_seen[key] > 0 and bool(score.isnan().any())):
                raise BingoError(
                    f"estimator {self.name!r}: the running estimate of {key!r} is not finite: a gradient or weight "
                    "was, so training diverged (try a lower learning rate)"
                )
        return scores

    def _known(self, key: str, score: torch.Tensor) -> torch.Tensor:
        return score if self.steps_seen[key] > 0 else torch.full_like(score, math.nan)

    def counts(self) -> dict[str, torch.Tensor]:
        """Every unit is informed at every step."""
        return {
            key: torch.full(entry["taylor_average"].shape, self.steps_seen[key], dtype=torch.int64)
            for key, entry in self.state.items()
        }

    def state_dict(self) -> dict:
        """The state; a layer's running average is its ``taylor_average × taylor_scale`` (see :meth:`_rescale`)."""
        for key, entry in self.state.items():
            entry["taylor_steps"].fill_(self.steps_seen[key])
            entry["taylor_scale"].fill_(self.scales[key])
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        # A state saved before the scale existed holds the average itself: scale 1.
        state = {key: {**entry, "taylor_scale": torch.ones((), dtype=torch.float64)}
                 if isinstance(entry, dict) and "taylor_average" in entry and "taylor_scale" not in entry else entry
                 for key, entry in state.items()}
        super().load_state_dict(state)
        self.steps_seen = {key: int(entry["taylor_steps"]) for key, entry in self.state.items()}
        self.scales = {key: float(entry["taylor_scale"]) for key, entry in self.state.items()}
