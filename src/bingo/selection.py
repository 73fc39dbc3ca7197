"""Selection: from significance scores to keep-masks. Pure functions.

Nothing here touches a model. Input is ``{key: scores}`` (any shapes), higher
= more significant; output is ``{key: bool mask}`` of the same shapes, True =
keep. The number pruned is exact: ``round(sparsity * n)``, the same rounding
as ``torch.nn.utils.prune``, counted over all scores (``scope="global"`` and
``scope="lamp"``), per tensor (``scope="layer"``) or per block of tensors
(``scope="block"``: one ranking inside each block, see :func:`block_of`).

Which to use. ``"global"`` lets layers differ: on MLPs and CNNs it beats a
uniform allocation (the layers that matter keep more). On a transformer one
ranking over every block can leave single projections 98-99% sparse at 80%
overall (their scores sit on a different scale), and transformer pruning
(SparseGPT, Wanda) allocates uniformly instead: ``"layer"`` gives every
weight tensor the same sparsity; ``"block"`` gives every block (by default
the module path up to its first numeric index, ``transformer.h.0.``,
``encoder.layers.1.``) the same sparsity and ranks globally inside it, so
the tensors of one block still trade against each other.

A ranking over all layers can empty a layer when its weights are all small
next to another layer's (BatchNorm makes a layer's scale arbitrary), and an
emptied layer cuts the network. So the two global scopes keep a
floor per tensor, :func:`floor_count`: ``max(1, ceil(MIN_KEEP * n_l))`` of a
tensor's ``n_l`` entries (its most significant ones) are pruned only after
every other entry. The total stays exact; what a floored tensor cannot give is
taken from the next least significant entries elsewhere. The floor is set low
enough (1%) that it binds only where a layer is nearly emptied: trained
LeNet-300-100, the digits MLP and the conv net at 90-95% global magnitude
sparsity keep 3% or more of every layer, so their masks are unchanged.
``scope="lamp"`` spreads the budget instead (LAMP, Lee et al. 2021, see
:func:`lamp_scores`): each score is normalised by what its layer keeps above
it, so no layer's overall scale decides how much of it survives.

Ties are broken uniformly at random with a seeded generator, never by
position: with accuracy-based BINGO scores many weights tie (a small probe
often leaves the batch accuracy unchanged), and breaking those ties by index
would silently prune the first rows of every layer.

N:M semi-structured sparsity (:func:`select_n_m`, a ``sparsity`` of ``"2:4"``)
is a pattern instead of a fraction, in the convention of NVIDIA's sparse
tensor cores and ``torch.sparse.to_sparse_semi_structured``: at most N of
every M consecutive weights are kept, so the ``M - N`` least significant of
each group go (2:4 and 4:8 prune 50%, 1:4 prunes 75%). A group is M
consecutive entries along the input (fan-in) axis of one unit: a row of a
weight's unit matrix (:func:`bingo.layer_types.unit_matrix`), so GPT-2's
``Conv1D`` (units on axis 1) is grouped along its inputs too, and a conv's
filter along its flattened ``C·kh·kw`` fan-in.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Callable

import torch

from .checks import check_scores, describe
from .errors import ConfigError, check_choice
from .layer_types import from_unit_matrix, unit_matrix

__all__ = [
    "BLOCK_PATTERN",
    "MIN_KEEP",
    "SCOPES",
    "block_of",
    "check_sparsity",
    "floor_count",
    "is_n_m",
    "lamp_scores",
    "masks_from_order",
    "n_m_groups",
    "parse_n_m",
    "parse_sparsity",
    "prune_count",
    "pruning_order",
    "ranking_values",
    "select_masks",
    "select_n_m",
]

#: Where the sparsity budget is enforced: over all scored weights, per layer,
#: over all scored weights ranked by their LAMP scores (layer-normalised), or
#: per block of layers (a transformer block), ranked together inside each.
SCOPES = ("global", "layer", "lamp", "block")

#: The default block of a key: its module path up to its first numeric index
#: (``"transformer.h.0."`` of ``"transformer.h.0.attn.c_attn.weight"``).
BLOCK_PATTERN = r"^(?:[^.]+\.)*?\d+\."

#: How :func:`block_of` is told what a block is: a regex, or ``key -> block name``.
Blocks = str | Callable[[str], str]

#: Fraction of each tensor that the global scopes keep at least (see :func:`floor_count`).
MIN_KEEP = 0.01


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as float, or raise :class:`ConfigError` unless it is in [0, 1)."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return value


#: the pattern of an N:M sparsity: ``"2:4"``, whitespace allowed around the numbers
_N_M = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _bad_sparsity(value: object) -> ConfigError:
    return ConfigError(
        "sparsity must be a fraction in [0, 1) or a pattern N:M (keep at most N of every M consecutive weights, "
        f"0 < N < M) such as 2:4, got {value!r}"
    )


def parse_n_m(text: str) -> tuple[int, int]:
    """``(N, M)`` of an N:M pattern: ``"2:4"`` -> ``(2, 4)``, ``"1:4"`` -> ``(1, 4)``.

    N is how many of every M consecutive weights are *kept* (NVIDIA's and
    PyTorch's convention), so ``0 < N < M``. Anything else (``"2:"``,
    ``"5:4"``, ``"0:4"``, ``"a:b"``) is a one-line :class:`ConfigError`.
    """
    match = _N_M.match(text) if isinstance(text, str) else None
    if match is None:
        raise _bad_sparsity(text)
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise _bad_sparsity(text)
    return n, m


def parse_sparsity(value: float | str) -> float | tuple[int, int]:
    """A sparsity as given to :func:`bingo.prune`: a fraction in [0, 1) (a float), or ``(N, M)`` of a text ``"N:M"``."""
    if isinstance(value, str) and ":" in value:
        return parse_n_m(value)
    return check_sparsity(value)


def prune_count(sparsity: float, n: int) -> int:
    """How many of ``n`` entries a sparsity prunes: ``round(sparsity * n)`` (torch's rule)."""
    return int(round(sparsity * n))


def floor_count(n: int, min_keep: float = MIN_KEEP) -> int:
    """How many of a tensor's ``n`` entries a global ranking keeps at least.

    ``max(1, ceil(min_keep * n))`` (never more than ``n``); ``min_keep = 0`` means no floor.
    """
    if not 0.0 <= min_keep <= 1.0:
        raise ConfigError(f"min_keep must be a fraction in [0, 1], got {min_keep!r}")
    if min_keep == 0:
        return 0
    return min(n, max(1, math.ceil(min_keep * n)))


def block_of(key: str, blocks: Blocks | None = None) -> str:
    """The block that score ``key`` belongs to under ``scope="block"``.

    ``blocks`` is a regex (``re.match`` from the key's start; the block is
    the text it matches) or a function ``key -> block name``; ``None`` is
    :data:`BLOCK_PATTERN`, the module path up to the first numeric index:
    ``"transformer.h.0.mlp.c_fc.weight"`` -> ``"transformer.h.0."``,
    ``"encoder.layers.1.self_attn.in_proj_weight"`` -> ``"encoder.layers.1."``,
    ``"stages.0.1.conv1.weight"`` -> ``"stages.0."``, ``"0.weight"`` (a
    Sequential) -> ``"0."``. A key the regex does not match (``"lm_head.weight"``,
    an embedding, a plain model's ``"fc1.weight"``) is a block of its own.
    """
    if blocks is None or isinstance(blocks, str):
        try:
            match = re.match(BLOCK_PATTERN if blocks is None else blocks, key)
        except re.error as exc:
            raise ConfigError(f"blocks {blocks!r} is not a regular expression: {exc}") from None
        return match.group(0) if match and match.group(0) else key
    if callable(blocks):
        block = blocks(key)
        if not isinstance(block, str):
            raise ConfigError(f"blocks({key!r}) returned {type(block).__name__}; it must return the block's name, a str")
        return block
    raise ConfigError(f"blocks must be a regular expression or a function key -> block name, got {type(blocks).__name__}")


def _generator(seed_or_generator: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    if seed_or_generator is None:
        return torch.Generator().manual_seed(0)
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, (int, numbers.Integral)):
        raise ConfigError(f"seed must be an integer or a torch.Generator, got {describe(seed_or_generator)}")
    return torch.Generator().manual_seed(int(seed_or_generator))


#: what NaN in a score usually means, for the errors that refuse it
NAN_CAUSES = "never-scored weights (significance(unprobed='nan'); use 'keep' or 'mean') or a diverged training (non-finite weights; try a lower learning rate)"


def check_scores_finite(scores: dict[str, torch.Tensor]) -> None:
    """:class:`ConfigError` naming the first tensor with NaN scores and what usually causes it."""
    for key, values in scores.items():
        nans = int(torch.isnan(values.detach()).sum())
        if nans:
            raise ConfigError(f"scores of {key!r} contain NaN ({nans} of {values.numel()}): {NAN_CAUSES}")


def ranking_values(scores: torch.Tensor, like: object = None) -> torch.Tensor:
    """``scores`` on the CPU in a dtype that keeps their order: float64 when any of ``like`` (tensors; default:
    ``scores``) is float64 or an integer type, else float32 (float16 / bfloat16 widen exactly).

    Casting float64 scores to float32 would merge scores closer than float32's
    resolution, flush tiny ones (squared gradients) to 0 and huge ones to inf:
    a ranking by ties, decided at random.
    """
    tensors = [scores] if like is None else list(like)
    wide = any(t.dtype == torch.float64 or not t.dtype.is_floating_point for t in tensors)
    return scores.detach().cpu().to(torch.float64 if wide else torch.float32)


def pruning_order(scores: torch.Tensor, generator: int | torch.Generator | None = None) -> torch.Tensor:
    """Flat indices of ``scores``, least significant first, ties in random order.

    ``scores`` may have any shape; it is read flattened. NaN scores are refused.
    """
    flat = ranking_values(scores.detach().reshape(-1))
    if torch.isnan(flat).any():
        raise ConfigError(f"scores contain NaN: {NAN_CAUSES}")
    shuffle = torch.randperm(flat.numel(), generator=_generator(generator))
    return shuffle[torch.argsort(flat[shuffle], stable=True)]


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one tensor (Lee et al. 2021, "Layer-adaptive sparsity for the magnitude-based pruning").

    With the entries sorted by score ascending, entry ``u`` gets
    ``s_u² / Σ_{v ≥ u} s_v²``: its squared score over the squared scores of
    every entry of the same tensor at least as significant (ties count each
    other, so equal scores get equal LAMP scores). ``[1, 2, 3]`` gives
    ``[1/14, 4/13, 9/9]``. Scores must be >= 0 (magnitudes, or significance in
    [0, 1]); ``-inf`` marks an entry already pruned: it keeps ``-inf`` and
    counts for nothing. The largest entry of a tensor always gets 1, and
    within a tensor LAMP keeps the score order. Float64, shaped like ``scores``;
    an entry whose tensor has nothing above zero at or above it gets 0.
    """
    flat = scores.detach().reshape(-1).double().cpu()
    if torch.isnan(flat).any():
        raise ConfigError(f"scores contain NaN: {NAN_CAUSES}")
    alive = flat > -math.inf
    values = flat[alive]
    if (values < 0).any() or torch.isinf(values).any():
        raise ConfigError("scope 'lamp' needs finite scores >= 0 (magnitudes or significance in [0, 1]); got "
                          f"{'negative' if (values < 0).any() else 'infinite'} scores")
    ascending = torch.sort(values).values
    squares = ascending.square()
    above = squares.flip(0).cumsum(0).flip(0)  # above[i] = Σ_{j ≥ i} squares[j]
    first = torch.searchsorted(ascending, values)  # first sorted position of each value: ties share a denominator
    denominator = above[first] if len(values) else values
    lamp = torch.where(denominator > 0, values.square() / denominator.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    out = torch.full_like(flat, -math.inf)
    out[alive] = lamp
    return out.reshape(scores.shape)


def _pruned_first(order: torch.Tensor, pruned: torch.Tensor | None) -> torch.Tensor:
    """``order`` with the entries ``pruned`` (a flat bool tensor it indexes) moved to the front, each part in its order."""
    if pruned is None:
        return order
    gone = pruned[order]
    return torch.cat([order[gone], order[~gone]])


def _floor_last(order: torch.Tensor, flat: torch.Tensor, sizes: list[int], min_keep: float,
                pruned: torch.Tensor | None = None) -> torch.Tensor:
    """``order`` with each tensor's last ``floor_count`` entries moved to the end.

    ``order`` indexes ``flat``, the concatenation of tensors of ``sizes``. The
    entries moved are each tensor's latest in ``order`` (its most significant,
    ties already broken), never those already pruned (``pruned``, flat and
    True = pruned; without it, the ``-inf`` ones), which go first.
    Where no floor binds, the first ``round(sparsity * N)`` entries are those of
    ``order``: the masks are the same as without a floor.
    """
    tensor_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))[order]
    alive = flat[order] > -math.inf if pruned is None else ~pruned[order]
    protected = torch.zeros(len(order), dtype=torch.bool)
    for i, n in enumerate(sizes):
        k = floor_count(n, min_keep)
        if k:
            positions = torch.nonzero((tensor_of == i) & alive).reshape(-1)
            protected[positions[-k:]] = True
    return torch.cat([order[~protected], order[protected]])


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
    *,
    min_keep: float = MIN_KEEP,
    blocks: Blocks | None = None,
    pruned: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks pruning the ``sparsity`` least significant entries.

    Args:
        scores: ``{key: tensor}``, higher = more significant; any shapes.
        sparsity: fraction to prune, in [0, 1).
        scope: ``"global"`` ranks all entries together; ``"layer"`` prunes
            ``round(sparsity * n_l)`` from each tensor separately; ``"lamp"``
            ranks all entries together by their :func:`lamp_scores` (ties in
            LAMP score broken by the score itself, then at random);
            ``"block"`` prunes ``round(sparsity * n_b)`` from each block of
            tensors (:func:`block_of`), ranking the block's entries together
            as ``"global"`` does (with its floor).
        generator: seed or ``torch.Generator`` for tie-breaking (default seed 0).
        min_keep: the global scopes' floor: each tensor's
            :func:`floor_count` most significant entries (``max(1,
            ceil(min_keep * n_l))``) are pruned only after all others; 0
            turns it off. Unused with ``scope="layer"``.
        blocks: what a block is with ``scope="block"`` (see
            :func:`block_of`; default :data:`BLOCK_PATTERN`); only with that scope.
        pruned: ``{key: bool tensor}`` of the entries already pruned (True =
            pruned; keys and shapes of ``scores``): they are pruned first and
            count towards the sparsity, and no floor keeps them. ``None``: the
            ``-inf`` scores are the ones already pruned. Given it, a ``-inf``
            score is only the least significant: the floor still keeps the
            most significant entries of a tensor whose scores are all ``-inf``
            (:func:`bingo.prune` passes the model's masks here).

    Returns:
        ``{key: bool tensor}`` with the shapes of ``scores``; False = pruned.
        Exactly ``round(sparsity * N)`` entries are False (per tensor for
        ``scope="layer"``, per block for ``"block"``). In the global scopes
        every tensor keeps at least its floor whenever ``round(sparsity * N)
        <= N - Σ floors``; beyond that the floors go too, least significant first.

    Example: scores ``[1, 2, ..., 8]`` at 0.5 keep ``[F, F, F, F, T, T, T, T]``.
    """
    scores = check_scores("select_masks", scores)
    sparsity = check_sparsity(sparsity)
    check_choice("scope", scope, SCOPES)
    if blocks is not None and scope != "block":
        raise ConfigError(f"blocks= says what a block is for scope='block'; scope is {scope!r}")
    if not scores:
        raise ConfigError("no scores to select from")
    check_scores_finite(scores)
    floor_count(1, min_keep)  # checks min_keep
    pruned = _check_pruned(scores, pruned)
    gen = _generator(generator)
    if scope == "layer":
        masks = {}
        for key, s in scores.items():
            order = _pruned_first(pruning_order(s, gen), None if pruned is None else pruned[key].reshape(-1))
            masks.update(masks_from_order(order, {key: s.shape}, prune_count(sparsity, s.numel())))
        return masks
    if scope == "block":
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, s in scores.items():
            grouped.setdefault(block_of(key, blocks), {})[key] = s
        masks = {}
        for block in grouped.values():
            masks.update(_select_ranked(block, sparsity, False, gen, min_keep, pruned))
        return {key: masks[key] for key in scores}
    return _select_ranked(scores, sparsity, scope == "lamp", gen, min_keep, pruned)


def _check_pruned(scores: dict[str, torch.Tensor], pruned: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """``pruned`` as flat-able CPU bool tensors of the scores' keys and shapes, or a :class:`ConfigError`."""
    if pruned is None:
        return None
    out = {}
    for key, values in scores.items():
        mask = pruned.get(key) if isinstance(pruned, dict) else None
        if not isinstance(mask, torch.Tensor) or mask.shape != values.shape:
            raise ConfigError(f"pruned[{key!r}] must be a bool tensor of the scores' shape {tuple(values.shape)}, "
                              f"got {type(mask).__name__ if not isinstance(mask, torch.Tensor) else tuple(mask.shape)}")
        out[key] = mask.detach().bool().cpu()
    return out


def _select_ranked(
    scores: dict[str, torch.Tensor], sparsity: float, lamp: bool, gen: torch.Generator, min_keep: float,
    pruned: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One ranking over all of ``scores`` (by LAMP score with ``lamp``), each tensor's floor last."""
    flat = torch.cat([ranking_values(s.reshape(-1), scores.values()) for s in scores.values()])
    gone = None if pruned is None else torch.cat([pruned[key].reshape(-1) for key in scores])
    order = pruning_order(flat, gen)
    if lamp:
        lamp_flat = torch.cat([lamp_scores(s).reshape(-1) for s in scores.values()])
        order = order[torch.argsort(lamp_flat[order], stable=True)]  # ties in LAMP keep the score order
    order = _floor_last(_pruned_first(order, gone), flat, [s.numel() for s in scores.values()], min_keep, gone)
    shapes = {key: s.shape for key, s in scores.items()}
    return masks_from_order(order, shapes, prune_count(sparsity, flat.numel()))


def n_m_groups(tensor: torch.Tensor, m: int, axis: int = 0, *, key: str = "tensor") -> torch.Tensor:
    """``tensor`` as ``(units, groups, m)``: each unit's fan-in (:func:`~bingo.layer_types.unit_matrix`) cut in groups of ``m``.

    Consecutive entries of the flattened fan-in form a group: for a Linear
    ``(out, in)`` weight, ``in`` in runs of ``m``; for GPT-2's ``Conv1D``
    (``in × out``, ``axis=1``) the same along its inputs; for a conv filter
    ``(C, kh, kw)`` the flattened ``C·kh·kw`` (kernel positions innermost).
    :class:`ConfigError` naming ``key`` when the fan-in is not a multiple of
    ``m``: a short tail group would not be N:M, and the semi-structured
    kernels take whole groups only.
    """
    if tensor.dim() < 2:
        raise ConfigError(f"N:M sparsity groups the inputs of each unit; {key!r} has shape {tuple(tensor.shape)}, "
                          "not a weight with an input axis (per-unit scores: N:M needs one score per weight)")
    rows = unit_matrix(tensor, axis)
    if rows.shape[1] % m:
        raise ConfigError(f"N:M sparsity groups every {m} consecutive inputs of a unit; {key!r} has fan-in {rows.shape[1]}, "
                          f"not a multiple of {m} (the semi-structured kernels take whole groups only): leave it out "
                          "of the scores (exclude=) or choose an M that divides it")
    return rows.reshape(rows.shape[0], -1, m)


def is_n_m(mask: torch.Tensor, n: int, m: int, axis: int = 0) -> bool:
    """Whether ``mask`` (nonzero = kept) keeps at most ``n`` of every group of ``m`` (:func:`n_m_groups`).

    :class:`ConfigError` when ``mask`` is not a tensor or ``n``, ``m`` are not a pattern ``0 < n < m``.

    False, not an error, when the fan-in is not a multiple of ``m``.
    """
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(f"is_n_m: mask must be a torch.Tensor, got {describe(mask)}")
    n, m = _pattern(n, m)
    try:
        groups = n_m_groups(mask, m, axis)
    except ConfigError:
        return False
    return bool(((groups != 0).sum(-1) <= n).all())


def _pattern(n: object, m: object) -> tuple[int, int]:
    """``(n, m)`` as whole numbers with ``0 < n < m``, else the sparsity error that lists the valid forms."""
    try:
        n, m = operator.index(n), operator.index(m)
    except TypeError:
        raise _bad_sparsity(f"{n}:{m}") from None
    if not 0 < n < m:
        raise _bad_sparsity(f"{n}:{m}")
    return n, m


def select_n_m(
    scores: dict[str, torch.Tensor],
    n: int,
    m: int,
    generator: int | torch.Generator | None = None,
    *,
    axes: dict[str, int] | None = None,
    pruned: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks in the N:M pattern: in every group of ``m`` consecutive inputs of a unit, the ``n`` most significant kept.

    Args:
        scores: ``{key: tensor}`` shaped like the weights, higher = more
            significant. ``-inf`` marks an entry already pruned: it stays
            pruned (it is among a group's least significant), and a group
            with more than ``m - n`` of them keeps them all pruned (masks
            only shrink), so that group ends sparser than N:M.
        n: weights kept per group, ``0 < n < m``.
        m: group size, along the fan-in (see :func:`n_m_groups`).
        generator: seed or ``torch.Generator`` for tie-breaking (default
            seed 0): ties inside a group are broken uniformly at random,
            never by position, as everywhere in selection.
        axes: ``{key: unit axis}`` (the layer type's, e.g. 1 for GPT-2's
            ``Conv1D``); keys not in it have units on axis 0.
        pruned: ``{key: bool tensor}`` of the entries already pruned (True =
            pruned), which stay pruned; ``None``: the ``-inf`` scores are
            those. Given it, a ``-inf`` score is only the least significant
            of its group, and the group still keeps N.

    Returns:
        ``{key: bool tensor}`` shaped like ``scores``; exactly ``m - n``
        False in every group (more only where ``-inf`` entries were more).
        There is no scope: the pattern gives every group, tensor and block
        the same sparsity ``1 - n / m``.

    Example: a row ``[1, 2, ..., 8]`` at 2:4 keeps ``[F, F, T, T, F, F, T, T]``.
    """
    n, m = _pattern(n, m)
    scores = check_scores("select_n_m", scores)
    if not scores:
        raise ConfigError("no scores to select from")
    check_scores_finite(scores)
    pruned = _check_pruned(scores, pruned)
    gen = _generator(generator)
    axes = axes or {}
    masks = {}
    for key, values in scores.items():
        axis = axes.get(key, 0)
        groups = n_m_groups(ranking_values(values), m, axis, key=key)
        gone = groups == -math.inf if pruned is None else n_m_groups(pruned[key], m, axis, key=key)
        shuffle = torch.rand(groups.shape, generator=gen).argsort(dim=-1)  # a random order inside each group
        # least significant first (the pruned ones before all others); ties keep the random order (stable sort)
        ranked = torch.where(gone, -math.inf, groups)
        order = shuffle.gather(-1, ranked.gather(-1, shuffle).argsort(dim=-1, stable=True))
        order = order.gather(-1, gone.gather(-1, order).logical_not().long().argsort(dim=-1, stable=True))
        keep = torch.ones(groups.shape, dtype=torch.bool).scatter_(-1, order[..., : m - n], False)
        keep &= ~gone
        masks[key] = from_unit_matrix(keep.reshape(groups.shape[0], -1), values, axis).contiguous()
    return masks
