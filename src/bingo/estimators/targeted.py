"""Targeted ticket searching: fake passes concentrate where the pruning decision is uncertain.

The proposal's "more targeted ticket searching ... slowly focusing on
finding truly unproductive subsets" (Panangat, arXiv 2505.09864, future
work), as successive elimination: every :attr:`Focus.REFRESH` rounds of fake
passes, the weights whose fate at global sparsity ``target`` is already
clear leave the pool the next probes draw from. Used by the estimators that
probe (``probe``, ``hybrid``) when ``target > 0``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from .fake_pass import random_subset, subset_size

if TYPE_CHECKING:
    from ..search import TicketSearch

__all__ = ["Focus", "draw_subset", "focus_candidates", "focus_of"]


class Focus:
    """Which units the next probes may draw from, one bool tensor per layer (True = in focus).

    The threshold is the score below which a fraction ``target`` of all
    scored units lies. A unit stays in focus while its score ranks within
    ``band`` (a fraction of all scored units) either side of the threshold
    or, when standard errors are given, while the threshold lies within
    :attr:`Z` standard errors of its estimate (or it has fewer than 2
    probes). Units with no estimate yet stay in focus.
    """

    #: the focus is re-decided every this many rounds of fake passes
    REFRESH = 10
    #: with standard errors: a unit leaves once its estimate is this many of them from the threshold
    Z = 2.0

    def __init__(self, target: float, band: float = 0.1) -> None:
        if not 0.0 < float(target) < 1.0:
            raise ConfigError(f"target must be a sparsity in (0, 1) for a targeted search, got {target!r}")
        if not 0.0 < float(band) <= 0.5:
            raise ConfigError(f"band must be in (0, 0.5], got {band!r}")
        self.target, self.band = float(target), float(band)

    @staticmethod
    def initial(unit_shape: torch.Size, device: torch.device | None = None) -> torch.Tensor:
        """Everything in focus: the state of a layer before any estimate exists."""
        return torch.ones(unit_shape, dtype=torch.bool, device=device)

    def due(self, fake_pass_round: int) -> bool:
        """True on the rounds (0, REFRESH, 2·REFRESH, ...) that re-decide the focus."""
        return fake_pass_round % self.REFRESH == 0

    def refocus(
        self,
        focus: dict[str, torch.Tensor],
        raw: dict[str, torch.Tensor],
        stderr: dict[str, torch.Tensor] | None = None,
        probes: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Update ``focus`` in place from unscaled scores ``raw`` (NaN = unknown).

        With ``stderr`` and ``probes`` (per-unit standard errors and probe
        counts), the standard-error rule decides; otherwise the rank band.
        """
        known = torch.cat([score[~score.isnan()].flatten() for score in raw.values()])
        if known.numel() == 0:
            return
        n = known.numel()

        def quantile(q: float) -> float:
            return float(known.kthvalue(min(max(int(round(q * n)), 1), n)).values)

        threshold = quantile(self.target)
        low, high = quantile(self.target - self.band), quantile(self.target + self.band)
        for key, score in raw.items():
            if stderr is not None and probes is not None:
                uncertain = ((score - threshold).abs() <= self.Z * stderr[key]) | (probes[key] < 2)
            else:
                uncertain = (score >= low) & (score <= high)
            focus[key].copy_(uncertain | score.isnan())



def draw_subset(search: TicketSearch, key: str, candidates: torch.Tensor | None = None) -> torch.Tensor:
    """The next probe's unit indices (into the flattened unit tensor) in layer ``key``, on the host.

    :func:`~bingo.estimators.fake_pass.subset_size` of them, uniform over the
    layer; with ``candidates`` (the indices of the units in focus, on the
    host: :func:`focus_candidates`), uniform over those (all of them if no
    more than a probe's size remain; the whole layer if none does). Draws
    from ``search.generator`` only.
    """
    n, size = search.unit_shape(key).numel(), subset_size(search, key)
    if candidates is not None:
        if 0 < len(candidates) <= size:
            return candidates.long()
        if len(candidates) > size:
            return candidates[random_subset(len(candidates), size, search.generator)].long()
    return random_subset(n, size, search.generator)


def focus_candidates(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor | None]:
    """Per layer, the host-side int32 indices of the units in ``state[key]["focus"]`` (None: every unit is).

    Read back from the device once per refocus, not on every probe: the
    draws in between need no host sync.
    """
    candidates = {}
    for key, entry in state.items():
        indices = entry["focus"].view(-1).nonzero().squeeze(1).to(torch.int32).cpu()
        candidates[key] = None if len(indices) == entry["focus"].numel() else indices
    return candidates


def focus_of(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Copies of the per-layer ``"focus"`` tensors of an estimator's state; :class:`ConfigError` if untargeted."""
    if not all("focus" in entry for entry in state.values()):
        raise ConfigError("focus needs a targeted search (target > 0)")
    return {key: entry["focus"].clone() for key, entry in state.items()}
