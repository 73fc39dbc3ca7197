"""Attention heads as units: score them, mask them, remove them.

A head ``h`` of an ``nn.MultiheadAttention`` with ``E = embed_dim`` and
``d = E / num_heads`` owns rows ``h·d … (h+1)·d - 1`` of each of the q, k and
v blocks of ``in_proj_weight`` (and of ``in_proj_bias``), and the same
columns of ``out_proj.weight``. Its output is ``softmax(q kᵀ / √d) v``
through its ``out_proj`` columns, so zeroing its **v rows and v bias** makes
that output exactly zero whatever q and k are: the masked model then
computes exactly what the model without the head computes.

- :func:`head_scores`: one score per head from weight-level scores of
  ``in_proj_weight`` (the search's or magnitude's): the mean over the head's
  q, k and v rows (and its ``out_proj`` columns when those are scored).
- :func:`prune_heads`: the selection, and masks through
  ``torch.nn.utils.prune`` on the head's q/k/v rows and biases and its
  ``out_proj`` columns (so fine-tuning keeps it removed).
- :func:`shrink_heads`: a copy in which every attention with removed heads
  is a :class:`PrunedMultiheadAttention`: separate q/k/v/out ``nn.Linear``
  layers with ``num_heads`` reduced and ``head_dim`` kept. Physically
  removing a head cannot be done inside ``nn.MultiheadAttention``, which
  ties its inner width to ``embed_dim``; and Torch-Pruning's head pruning
  expects separate q/k/v Linears, so the slicing is done here, directly.

Supported: self- or cross-attention with ``in_proj_weight`` (``kdim`` and
``vdim`` equal to ``embed_dim``), with or without biases, no ``bias_k`` /
``add_zero_attn``, ``batch_first`` either way.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from .checks import check_model, check_scores
from .distributed import unwrap
from .errors import ConfigError, check_choice
from .masks import keep_copyable, make_permanent, mask_attention_outputs
from .selection import select_masks
from .shrink import mark_shrunk

__all__ = ["PrunedMultiheadAttention", "head_scores", "prune_heads", "shrink_heads"]

#: the scopes of a head prune: LAMP's per-weight normalisation and weight blocks have no meaning for whole heads
HEAD_SCOPES = ("global", "layer")


def _attentions(model: nn.Module) -> dict[str, nn.MultiheadAttention]:
    return {name: module for name, module in unwrap(model).named_modules() if isinstance(module, nn.MultiheadAttention)}


def _check_supported(name: str, attention: nn.MultiheadAttention) -> None:
    if not attention._qkv_same_embed_dim:
        raise ConfigError(f"{name!r} has separate q/k/v projections (kdim/vdim differ from embed_dim); heads are pruned on in_proj_weight only")
    if attention.bias_k is not None or attention.add_zero_attn:
        raise ConfigError(f"{name!r} uses bias_k/bias_v or add_zero_attn; head pruning does not support them")


def _head_rows(attention: nn.MultiheadAttention, block: int) -> torch.Tensor:
    """``(num_heads, head_dim)`` row indices of block ``block`` (0 = q, 1 = k, 2 = v) of ``in_proj_weight``."""
    e, d = attention.embed_dim, attention.head_dim
    return block * e + torch.arange(e).reshape(attention.num_heads, d)


def head_scores(model: nn.Module, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{attention module name: (num_heads,)}``: the mean score of each head's q, k, v rows (and out_proj columns).

    ``scores`` are weight-level, higher = more significant, keyed as
    everywhere (``"<attention>.in_proj_weight"``, ``"<attention>.out_proj.weight"``);
    attentions whose ``in_proj_weight`` has no score are left out.
    """
    check_model("head_scores", model)
    scores = check_scores("head_scores", scores)
    result = {}
    for name, attention in _attentions(model).items():
        key = f"{name}.in_proj_weight" if name else "in_proj_weight"
        if key not in scores:
            prefix = f"{name}." if name else ""
            if any(f"{prefix}{p}_proj_weight" in scores for p in "qkv"):  # scored, as separate projections
                _check_supported(name, attention)
            continue
        _check_supported(name, attention)
        values = scores[key].detach().double().cpu()
        if tuple(values.shape) != (3 * attention.embed_dim, attention.embed_dim):
            raise ConfigError(f"scores for {key!r} have shape {tuple(values.shape)}; head scores need weight-level ones, "
                              f"{(3 * attention.embed_dim, attention.embed_dim)}")
        d = attention.head_dim
        per_head = values.reshape(3, attention.num_heads, d, attention.embed_dim).mean(dim=(0, 2, 3))
        out_key = f"{name}.out_proj.weight" if name else "out_proj.weight"
        if out_key in scores:
            columns = scores[out_key].detach().double().cpu().reshape(attention.embed_dim, attention.num_heads, d)
            per_head = (per_head * 3 * d * attention.embed_dim + columns.sum(dim=(0, 2))) / (4 * d * attention.embed_dim)
        result[name] = per_head
    if not result:
        raise ConfigError(f"{type(unwrap(model)).__name__} has no nn.MultiheadAttention whose in_proj_weight is scored")
    return result


def _mask(module: nn.Module, name: str, keep: torch.Tensor) -> None:
    torch_prune.custom_from_mask(module, name, keep.to(getattr(module, name).device))
    keep_copyable(module)


def prune_heads(
    model: nn.Module,
    scores: dict[str, torch.Tensor],
    sparsity: float,
    scope: str = "global",
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Mask the ``sparsity`` least significant heads; return ``{attention name: bool (num_heads,)}``, False = removed.

    ``scores`` are :func:`head_scores` (``{name: (num_heads,)}``). ``scope``:
    ``"global"`` (one ranking over every attention's heads; each keeps its
    floor of :func:`bingo.selection.select_masks`) or ``"layer"`` (the same
    fraction of each). A removed head's q/k/v rows and biases and its
    ``out_proj`` columns are masked through ``torch.nn.utils.prune``, so it
    outputs exactly zero and stays removed in further training. Every
    attention keeps at least one head.
    """
    check_model("prune_heads", model)
    scores = check_scores("prune_heads", scores)
    check_choice("scope", scope, HEAD_SCOPES)
    attentions = _attentions(model)
    unknown = sorted(set(scores) - set(attentions))
    if unknown:
        raise ConfigError(f"head scores for {unknown[0]!r}, which is not an nn.MultiheadAttention of {type(unwrap(model)).__name__}")
    for name in scores:
        _check_supported(name, attentions[name])
        if tuple(scores[name].shape) != (attentions[name].num_heads,):
            raise ConfigError(f"head scores for {name!r} have shape {tuple(scores[name].shape)}; expected ({attentions[name].num_heads},)")
    flat = {name: s.detach().float().cpu() for name, s in scores.items()}
    # a -inf head score is the least significant, not a head already removed: the floor still holds
    keep = select_masks(flat, sparsity, scope, seed, pruned={name: torch.zeros(s.shape, dtype=torch.bool) for name, s in flat.items()})
    for name, heads in keep.items():
        if not heads.any():
            raise ConfigError(f"this sparsity would remove every head of {name!r}; lower it or use scope='layer'")
        attention = attentions[name]
        rows = torch.ones(3 * attention.embed_dim, dtype=torch.bool)
        for block in range(3):
            rows[_head_rows(attention, block)[~heads].flatten()] = False
        _mask(attention, "in_proj_weight", rows[:, None].expand(-1, attention.embed_dim).contiguous())
        if attention.in_proj_bias is not None:
            _mask(attention, "in_proj_bias", rows)
        columns = heads.repeat_interleave(attention.head_dim)
        _mask(attention.out_proj, "weight", columns[None, :].expand(attention.embed_dim, -1).contiguous())
    mask_attention_outputs(unwrap(model))
    return keep


class PrunedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` without some of its heads: q/k/v/out as separate ``nn.Linear`` layers.

    Same call as ``nn.MultiheadAttention`` (``query, key, value,
    key_padding_mask, need_weights, attn_mask, average_attn_weights,
    is_causal``) and the same outputs, to float rounding, as the original
    with the removed heads' outputs zero. ``q_proj``/``k_proj``/``v_proj``
    map ``embed_dim`` to ``num_heads·head_dim``, ``out_proj`` maps it back.
    ``TransformerEncoderLayer`` takes it as its ``self_attn`` (its fused
    fast path, which needs ``in_proj_weight``, is skipped).
    """

    _qkv_same_embed_dim = False  # TransformerEncoderLayer's fast path reads in_proj_weight: not for this module
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.k_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.v_proj = nn.Linear(embed_dim, inner, bias=bias)
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, target, source = query.shape[0], query.shape[1], key.shape[1]
        q, k, v = (projection(tensor).reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)
                   for projection, tensor in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() != 2:  # a (batch·heads, L, S) mask names the original heads
                raise ConfigError("PrunedMultiheadAttention takes a 2-D attn_mask (L, S)")
            mask = _additive(attn_mask, q.dtype)
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).reshape(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        causal = bool(is_causal and mask is None)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            logits = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if causal:
                logits = logits + _additive(torch.ones(target, source, dtype=torch.bool, device=q.device).triu(1), q.dtype)
            if mask is not None:
                logits = logits + mask
            weights = torch.softmax(logits, dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, target, -1))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = not allowed) as an additive float mask; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)


@torch.no_grad()
def _without_heads(attention: nn.MultiheadAttention, keep: torch.Tensor) -> PrunedMultiheadAttention:
    """The attention with only the heads ``keep`` marks, its weights copied."""
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    heads = keep.nonzero().flatten()
    new = PrunedMultiheadAttention(attention.embed_dim, len(heads), attention.head_dim, dropout=attention.dropout,
                                   bias=bias is not None, batch_first=attention.batch_first)
    new = new.to(device=weight.device, dtype=weight.dtype)
    for block, projection in enumerate((new.q_proj, new.k_proj, new.v_proj)):
        rows = _head_rows(attention, block)[heads].flatten()
        projection.weight.copy_(weight[rows])
        if bias is not None:
            projection.bias.copy_(bias[rows])
    columns = torch.arange(attention.embed_dim).reshape(attention.num_heads, attention.head_dim)[heads].flatten()
    new.out_proj.weight.copy_(attention.out_proj.weight[:, columns])
    if attention.out_proj.bias is not None:
        new.out_proj.bias.copy_(attention.out_proj.bias)
    for parameter_new, parameter_old in ((new.q_proj.weight, weight), (new.out_proj.weight, attention.out_proj.weight)):
        parameter_new.requires_grad_(parameter_old.requires_grad)
    return new.train(attention.training)


def _removed_heads(attention: nn.MultiheadAttention) -> torch.Tensor:
    """Heads whose output is exactly zero: v rows and v bias all zero (what :func:`prune_heads` leaves), or out_proj columns all zero."""
    d, e = attention.head_dim, attention.embed_dim
    v = attention.in_proj_weight[2 * e :].reshape(attention.num_heads, d, e)
    zero = (v == 0).flatten(1).all(dim=1)
    if attention.in_proj_bias is not None:
        zero &= (attention.in_proj_bias[2 * e :].reshape(attention.num_heads, d) == 0).all(dim=1)
    columns = (attention.out_proj.weight.reshape(e, attention.num_heads, d) == 0).all(dim=2).all(dim=0)
    return (zero | columns).cpu()


def shrink_heads(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every ``nn.MultiheadAttention`` with removed heads is a smaller :class:`PrunedMultiheadAttention`.

    A head is removed when its output is exactly zero: its v rows and v
    bias are all zero (what :func:`prune_heads` leaves) or its ``out_proj``
    columns are. Masks are made permanent first; ``model`` is not changed;
    each attention keeps at least one head. Attentions with ``bias_k`` /
    ``add_zero_attn`` are left as they are. Outputs equal the masked
    model's to float rounding, in eval and training mode (dropout aside).
    """
    net = copy.deepcopy(unwrap(model))
    make_permanent(net)
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.MultiheadAttention) or not child._qkv_same_embed_dim:
                continue
            if child.bias_k is not None or child.add_zero_attn:  # PrunedMultiheadAttention has neither: left whole
                continue
            removed = _removed_heads(child)
            if not removed.any():
                continue
            if removed.all():
                removed[0] = False  # an attention keeps one head
            setattr(parent, child_name, _without_heads(child, ~removed))
            mark_shrunk(net)
    return net
