"""Selection: from significance scores to keep-masks. Pure functions.

Nothing here touches a model. Input is ``{key: scores}`` (any shapes), higher
= more significant; output is ``{key: bool mask}`` of the same shapes, True =
keep. The number pruned is exact: ``round(sparsity * n)``, the same rounding
as ``torch.nn.utils.prune``, counted over all scores (``scope="global"``) or
per tensor (``scope="layer"``).

Ties are broken uniformly at random with a seeded generator, never by
position: with accuracy-based BINGO scores many weights tie (a small probe
often leaves the batch accuracy unchanged), and breaking those ties by index
would silently prune the first rows of every layer.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError, check_choice

__all__ = ["SCOPES", "check_sparsity", "prune_count", "pruning_order", "select_masks", "masks_from_order"]

#: Where the sparsity budget is enforced: over all scored weights, or per layer.
SCOPES = ("global", "layer")


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as float, or raise :class:`ConfigError` unless it is in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return value


def prune_count(sparsity: float, n: int) -> int:
    """How many of ``n`` entries a sparsity prunes: ``round(sparsity * n)`` (torch's rule)."""
    return int(round(sparsity * n))


def _generator(seed_or_generator: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    return torch.Generator().manual_seed(0 if seed_or_generator is None else int(seed_or_generator))


#: what NaN in a score usually means, for the errors that refuse it
NAN_CAUSES = "never-scored weights (significance(unprobed='nan'); use 'keep' or 'mean') or a diverged training (non-finite weights; try a lower learning rate)"


def check_scores_finite(scores: dict[str, torch.Tensor]) -> None:
    """:class:`ConfigError` naming the first tensor with NaN scores and what usually causes it."""
    for key, values in scores.items():
        nans = int(torch.isnan(values.detach()).sum())
        if nans:
            raise ConfigError(f"scores of {key!r} contain NaN ({nans} of {values.numel()}): {NAN_CAUSES}")


def pruning_order(scores: torch.Tensor, generator: int | torch.Generator | None = None) -> torch.Tensor:
    """Flat indices of ``scores``, least significant first, ties in random order.

    ``scores`` may have any shape; it is read flattened. NaN scores are refused.
    """
    flat = scores.detach().reshape(-1).float().cpu()
    if torch.isnan(flat).any():
        raise ConfigError(f"scores contain NaN: {NAN_CAUSES}")
    shuffle = torch.randperm(flat.numel(), generator=_generator(generator))
    return shuffle[torch.argsort(flat[shuffle], stable=True)]


def masks_from_order(order: torch.Tensor, shapes: dict[str, torch.Size], n_pruned: int) -> dict[str, torch.Tensor]:
    """Keep-masks that prune the first ``n_pruned`` entries of ``order``.

    ``order`` indexes the concatenation of the flattened tensors in ``shapes``
    (in dict order).
    """
    total = sum(math.prod(s) for s in shapes.values())
    keep = torch.ones(total, dtype=torch.bool)
    keep[order[:n_pruned]] = False
    masks, start = {}, 0
    for key, shape in shapes.items():
        n = math.prod(shape)
        masks[key] = keep[start : start + n].reshape(shape)
        start += n
    return masks


def select_masks(
    scores: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    generator: int | torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning the ``sparsity`` least significant entries.

    Args:
        scores: ``{key: tensor}``, higher = more significant; any shapes.
        sparsity: fraction to prune, in [0, 1).
        scope: ``"global"`` ranks all entries together; ``"layer"`` prunes
            ``round(sparsity * n_l)`` from each tensor separately.
        generator: seed or ``torch.Generator`` for tie-breaking (default seed 0).

    Returns:
        ``{key: bool tensor}`` with the shapes of ``scores``; False = pruned.
        Exactly ``round(sparsity * N)`` entries are False (per tensor for
        ``scope="layer"``).

    Example: scores ``[1, 2, ..., 8]`` at 0.5 keep ``[F, F, F, F, T, T, T, T]``.
    """
    sparsity = check_sparsity(sparsity)
    check_choice("scope", scope, SCOPES)
    if not scores:
        raise ConfigError("no scores to select from")
    check_scores_finite(scores)
    gen = _generator(generator)
    if scope == "layer":
        masks = {}
        for key, s in scores.items():
            order = pruning_order(s, gen)
            masks.update(masks_from_order(order, {key: s.shape}, prune_count(sparsity, s.numel())))
        return masks
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores.values()])
    order = pruning_order(flat, gen)
    shapes = {key: s.shape for key, s in scores.items()}
    return masks_from_order(order, shapes, prune_count(sparsity, flat.numel()))
