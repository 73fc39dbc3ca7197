"""Hybrid BINGO: Taylor estimates for every weight, each layer's scale calibrated by real fake passes."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .base import register_estimator
from .fake_pass import Batch, due, measure, probe_damage
from .targeted import Focus, draw_subset, focus_candidates, focus_of
from .taylor import TaylorEstimator

if TYPE_CHECKING:
    from ..search import SearchConfig, TicketSearch

__all__ = ["HybridEstimator"]


@register_estimator
class HybridEstimator(TaylorEstimator):
    """The Taylor estimate of every weight, rescaled per layer by what fake passes measured.

    On every ``every``-th step one fake pass per layer zeroes (or resets) a
    random ``fraction`` of its units and measures the loss change
    (:mod:`bingo.estimators.fake_pass`); beside it the Taylor prediction of the
    same probe, ``½ Σ_S (gΔ)²``, is summed. A layer's score is its Taylor
    estimate times ``measured / predicted`` (:meth:`calibration`), so one global
    ranking compares layers by the damage resets actually did. Needs
    ``metric="loss"``. With ``target=s`` the probes are targeted
    (:class:`~bingo.estimators.targeted.Focus`, rank band around the threshold).
    """

    name = "hybrid"

    def __init__(self, decay: float = 0.99, target: float = 0.0, band: float = 0.1, update_every: int = 1) -> None:
        super().__init__(decay, update_every)
        self.focus = Focus(target, band) if target else None
        self._candidates: dict[str, torch.Tensor | None] | None = None  # the focus on the host, read once per refocus

    @classmethod
    def from_config(cls, config: SearchConfig) -> HybridEstimator:
        if config.metric != "loss":
            raise ConfigError(f"estimator {cls.name!r} calibrates loss estimates and needs metric='loss', got {config.metric!r}")
        return cls(decay=config.decay, target=config.target, band=config.band, update_every=config.taylor_every)

    def attach(self, search: TicketSearch) -> None:
        if search.config.metric != "loss":
            raise ConfigError(f"estimator {self.name!r} calibrates loss estimates and needs metric='loss', got {search.config.metric!r}")
        super().attach(search)
        for key, entry in self.state.items():
            device = entry["taylor_steps"].device
            # measured vs Taylor-predicted loss change of the same probes, summed per layer
            entry["calibration_measured"] = torch.zeros((), dtype=torch.float64, device=device)
            entry["calibration_predicted"] = torch.zeros((), dtype=torch.float64, device=device)
            if self.focus:
                entry["focus"] = Focus.initial(search.unit_shape(key), device)

    def records_at(self, step: int) -> bool:
        """A Taylor update's step, or a fake pass's (the 1st, then every ``search.every``-th)."""
        return super().records_at(step) or (step - 1) % self.search.every == 0

    def observe(self, batch: Batch) -> dict[str, float]:
        super().observe(batch)
        search = self.search
        if not due(search):
            return {}
        if self.focus and self.focus.due((search.steps - 1) // search.every):
            self.focus.refocus({key: entry["focus"] for key, entry in self.state.items()}, self.raw_scores(None))
            self._candidates = None
        # All draws first, so the generator is consumed in one fixed order.
        if self.focus and self._candidates is None:
            self._candidates = focus_candidates(self.state)
        candidates = self._candidates or {}
        subsets = {key: draw_subset(search, key, candidates.get(key)) for key in search.layers}
        before, after = measure(search, batch, subsets)
        for key, subset in subsets.items():
            self._calibrate(key, subset, before - after[key])
        return {key: probe_damage(before, value) for key, value in after.items()}

    def _calibrate(self, key: str, subset: torch.Tensor, measured_loss_increase: float) -> None:
        """Add one probe's measured loss change and its Taylor prediction ``½ Σ_S (gΔ)²``."""
        entry = self.state[key]
        if self.steps_seen[key] == 0:
            return
        average = entry["taylor_average"]
        chosen = average.view(-1)[subset.to(average.device, non_blocking=True)]
        entry["calibration_measured"] += measured_loss_increase
        entry["calibration_predicted"] += chosen.double().sum() * (0.5 * self.scales[key] / self.bias_correction(key))  # stays on the device

    def calibration(self) -> dict[str, float]:
        """Per layer, measured / Taylor-predicted loss change of its probes.

        A layer whose probes measured no loss increase in total
        (:meth:`uncalibrated`), or that has not been probed, takes the median
        factor of the calibrated layers: its probes said nothing about its
        scale, and the typical layer's scale is the neutral guess. (A fixed
        fallback of 1, where the other layers' factors were ~900 as on an
        MLP's output layer after 10 digit epochs, ranked the layer 900x too
        low, and a 95% global prune emptied it to the floor:
        ``benchmarks/finetune_ranking.py``.) With no layer calibrated every
        factor is 1: the Taylor estimate alone.
        """
        factors: dict[str, float | None] = {}
        for key, entry in self.state.items():
            measured, predicted = float(entry["calibration_measured"]), float(entry["calibration_predicted"])
            factors[key] = measured / predicted if measured > 0 and predicted > 0 else None
        calibrated = sorted(f for f in factors.values() if f is not None)
        fallback = statistics.median(calibrated) if calibrated else 1.0
        return {key: fallback if factor is None else factor for key, factor in factors.items()}

    def uncalibrated(self) -> list[str]:
        """Layers whose probes ran but measured no loss increase in total; they take the calibrated layers' median factor.

        Early in training, eval-mode BatchNorm statistics can make resets *lower* the
        measured loss, and a layer where 1% of the weights hardly matter measures
        noise around zero.
        """
        return [
            key for key, entry in self.state.items()
            if float(entry["calibration_predicted"]) > 0 and float(entry["calibration_measured"]) <= 0
        ]

    def notes(self) -> list[str]:
        """A warning when every Taylor term read was zero (:meth:`TaylorEstimator.notes`), else when no layer's
        calibration engaged, so the scores are the Taylor estimate alone.

        Some layers without a factor of their own is common; they take the
        median of the others (:meth:`calibration`), and which they were is
        :meth:`uncalibrated`, recorded by ``bingo run`` in its JSON
        (``uncalibrated_layers``).
        """
        zero = super().notes()  # every term zero: the cause to fix first
        if zero:
            return zero
        missing = self.uncalibrated()
        if missing and len(missing) == len(self.state):
            advice = "train longer, or probe more often (a smaller every) or more weights per probe (a larger fraction)"
            return [f"hybrid calibration did not engage for any of the {len(self.state)} layers: their probes measured no loss "
                    f"increase in total, so the scores are the Taylor estimate alone ({advice})"]
        return []

    def raw_scores(self, rule: str | None) -> dict[str, torch.Tensor]:
        factors = self.calibration()
        return {key: score * factors[key] if factors[key] != 1.0 else score for key, score in super().raw_scores(rule).items()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._candidates = None

    def focus_masks(self) -> dict[str, torch.Tensor]:
        """Targeted search: ``{key: bool tensor}``, the units the next probes may draw from."""
        return focus_of(self.state)
