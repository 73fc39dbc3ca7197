"""The paper's estimator: significance from fake passes alone."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .base import Estimator, register_estimator
from .fake_pass import Batch, due, measure, paper_change, probe_damage
from .targeted import Focus, draw_subset, focus_candidates, focus_of

if TYPE_CHECKING:
    from ..search import SearchConfig, TicketSearch

__all__ = ["ProbeEstimator"]


@register_estimator
class ProbeEstimator(Estimator):
    """BINGO's ticket search as the paper describes it: every weight scored by the fake passes it took part in.

    On every ``every``-th step, one fake pass per layer resets a random
    ``fraction`` of its units (:mod:`bingo.estimators.fake_pass`); each unit
    of the subset records the metric's change. The sums support three
    read-outs (``significance(rule=...)``), higher = more significant:

    - ``"mean"`` (default): the mean over the probes that included the unit of
      :func:`~bingo.estimators.fake_pass.probe_damage`, the relative drop of the
      metric, in [0, 1]. The paper's ``S = 1 - |A_before - A_after| / A_before``
      read literally scores a weight whose reset changes nothing *highest*,
      contradicting its own text; this keeps its normalisation and flips the sense.
    - ``"paper"``: the author's code, literally: ``s <- (s + |A_before - A_after|) / 2``
      from ``s = 0`` on every probe that includes the unit, in [0, 1].
    - ``"contrast"``: the mean drop when the unit was probed minus the mean drop
      of the layer's probes that left it out, in metric units, with its
      standard error from :meth:`uncertainty`.

    With ``target=s`` the probes are targeted (:class:`~bingo.estimators.targeted.Focus`),
    deciding by ``rule``'s scores (and, for ``"contrast"``, standard errors).

    Memory: the sums of the read-outs in ``keep`` only (from a search built
    with ``rule=...``: that rule's; without one: all three). Per scored
    weight, θ0 (4 bytes, the search's) plus an int32 count plus float64 sums:
    one for ``"mean"`` or ``"paper"`` (4× the weights' float32 bytes in all),
    two for ``"contrast"`` (6×), four when every rule is kept (10×).
    """

    name = "probe"
    rules = ("mean", "paper", "contrast")

    #: the per-unit sums each read-out needs (beside the count)
    SUMS = {"mean": ("damage_sum",), "paper": ("running",), "contrast": ("drop_sum", "drop_sq_sum")}

    def __init__(self, rule: str = "mean", target: float = 0.0, band: float = 0.1, keep: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.rule = self.resolve_rule(rule)
        #: the read-outs whose sums this estimator keeps (default: every one)
        self.keep = tuple(self.resolve_rule(r) for r in (keep or self.rules))
        if self.rule not in self.keep:
            raise ConfigError(f"rule {self.rule!r} must be among the kept read-outs {list(self.keep)}")
        self.focus = Focus(target, band) if target else None
        self._candidates: dict[str, torch.Tensor | None] | None = None  # the focus on the host, read once per refocus

    @classmethod
    def from_config(cls, config: SearchConfig) -> ProbeEstimator:
        # A search built with a rule keeps only that rule's sums; without one it can be read every way.
        return cls(rule=config.rule or "mean", target=config.target, band=config.band, keep=(config.rule,) if config.rule else None)

    def attach(self, search: TicketSearch) -> None:
        super().attach(search)
        for key in search.layers:
            shape, device = search.unit_shape(key), search.theta0[key].device
            zeros = lambda shape=shape, dtype=torch.float64: torch.zeros(shape, dtype=dtype, device=device)  # noqa: E731
            # "damage_sum": clipped relative drops (rule "mean"); "running": the author's running average
            # ("paper"); "drop_sum", "drop_sq_sum": signed drops when probed ("contrast"). int32 counts:
            # exact up to 2^31 probes of one unit, half the bytes of int64.
            self.state[key] = {"count": zeros(dtype=torch.int32)}
            for name in dict.fromkeys(name for rule in self.keep for name in self.SUMS[rule]):
                self.state[key][name] = zeros()
            self.state[key].update({
                "layer_probes": zeros((), torch.int64),  # the layer's totals, for the "not probed" side
                "layer_drop_sum": zeros(()),
                "layer_drop_sq_sum": zeros(()),
            })
            if self.focus:
                self.state[key]["focus"] = Focus.initial(shape, device)

    def records_at(self, step: int) -> bool:
        """The steps with fake passes: the 1st, then every ``search.every``-th."""
        return (step - 1) % self.search.every == 0

    def observe(self, batch: Batch) -> dict[str, float]:
        search = self.search
        if not due(search):
            return {}
        if self.focus and self.focus.due((search.steps - 1) // search.every):
            self.refocus()
        # All draws first, so the generator is consumed in one fixed order.
        if self.focus and self._candidates is None:
            self._candidates = focus_candidates(self.state)
        candidates = self._candidates or {}
        subsets = {key: draw_subset(search, key, candidates.get(key)) for key in search.layers}
        before, after = measure(search, batch, subsets)
        for key, subset in subsets.items():
            self.record(key, subset, before, after[key])
        return {key: probe_damage(before, value) for key, value in after.items()}

    def record(self, key: str, subset: torch.Tensor, before: float, after: float) -> None:
        """Add one probe of ``subset`` that moved the metric from ``before`` to ``after``."""
        entry = self.state[key]
        subset = subset.to(entry["count"].device, non_blocking=True)
        entry["count"].view(-1)[subset] += 1
        drop = before - after
        if "damage_sum" in entry:
            entry["damage_sum"].view(-1)[subset] += probe_damage(before, after)
        if "running" in entry:
            running = entry["running"].view(-1)
            running[subset] = (running[subset] + paper_change(before, after)) / 2
        if "drop_sum" in entry:
            entry["drop_sum"].view(-1)[subset] += drop
            entry["drop_sq_sum"].view(-1)[subset] += drop * drop
        entry["layer_probes"] += 1
        entry["layer_drop_sum"] += drop
        entry["layer_drop_sq_sum"] += drop * drop

    def refocus(self) -> None:
        """Re-decide which units stay in the targeted search's focus."""
        raw = self.raw_scores(self.rule)
        live = {key: entry["focus"] for key, entry in self.state.items()}
        if self.rule == "contrast":
            stderr = {key: self._contrast(key)[1] for key in self.state}
            probes = {key: entry["count"] for key, entry in self.state.items()}
            self.focus.refocus(live, raw, stderr, probes)
        else:
            self.focus.refocus(live, raw)
        self._candidates = None

    def load_state_dict(self, state: dict) -> None:
        """A state that holds the sums this search keeps loads (sums it does not keep are left out)."""
        if isinstance(state, dict):
            state = {
                key: {name: value for name, value in saved.items() if name in self.state.get(key, {})} if isinstance(saved, dict) else saved
                for key, saved in state.items()
            }
        super().load_state_dict(state)
        self._candidates = None

    def focus_masks(self) -> dict[str, torch.Tensor]:
        """Targeted search: ``{key: bool tensor}``, the units the next probes may draw from."""
        return focus_of(self.state)

    def _contrast(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean drop when probed minus mean drop when not, its standard error, and where both sides exist."""
        entry = self.state[key]
        n_in = entry["count"].double()
        n_out = entry["layer_probes"].double() - n_in
        known = (n_in > 0) & (n_out > 0)
        mean_in = entry["drop_sum"] / n_in.clamp(min=1)
        mean_out = (entry["layer_drop_sum"] - entry["drop_sum"]) / n_out.clamp(min=1)
        var_in = (entry["drop_sq_sum"] / n_in.clamp(min=1) - mean_in.square()).clamp(min=0)
        var_out = ((entry["layer_drop_sq_sum"] - entry["drop_sq_sum"]) / n_out.clamp(min=1) - mean_out.square()).clamp(min=0)
        stderr = (var_in / n_in.clamp(min=1) + var_out / n_out.clamp(min=1)).sqrt()
        return mean_in - mean_out, stderr, known

    def kept_rule(self, rule: str | None) -> str:
        """``rule`` resolved, or :class:`ConfigError` if its sums were not kept."""
        rule = self.resolve_rule(rule)
        if rule not in self.keep:
            raise ConfigError(
                f"this search keeps the sums of rule {', '.join(map(repr, self.keep))} only (it was built with that rule); "
                f"build it without a rule to read every rule, or with rule={rule!r}"
            )
        return rule

    def raw_scores(self, rule: str | None) -> dict[str, torch.Tensor]:
        rule = self.kept_rule(rule)
        scores = {}
        for key, entry in self.state.items():
            if rule == "contrast":
                score, _, known = self._contrast(key)
            else:
                known = entry["count"] > 0
                score = entry["damage_sum"] / entry["count"].clamp(min=1) if rule == "mean" else entry["running"].clone()
            scores[key] = torch.where(known, score, torch.full_like(score, math.nan))
        return scores

    def in_unit_range(self, rule: str | None) -> bool:
        return self.resolve_rule(rule) != "contrast"

    def counts(self) -> dict[str, torch.Tensor]:
        """How many probes included each unit."""
        return {key: entry["count"].long() for key, entry in self.state.items()}

    def uncertainty(self) -> dict[str, torch.Tensor]:
        """Standard error of the ``contrast`` estimate per unit, in metric units; inf where unknown.

        Shrinks like ``1 / sqrt(probes)``.
        """
        out = {}
        self.kept_rule("contrast")
        for key in self.state:
            _, stderr, known = self._contrast(key)
            out[key] = torch.where(known, stderr, torch.full_like(stderr, math.inf)).float()
        return out
