"""Depth routing (MoD) as tensor functions, for any layout of the token axis.

The native model calls them on ``(B, T, ...)`` tensors (``token_dim=1``), the Megatron layer on
its ``[s, b, ...]`` tensors (``token_dim=0``), generation on the rows of its cache. Every
function treats one axis as the tokens of a sequence and the other leading axis as the batch:

- ``topk_positions``: the ``k`` tokens of each sequence with the largest router logits, in
  position order (expert choice over the sequence);
- ``entering_first``: the tokens a causal decision lets in, first and in position order, then
  the others as padding, with a mask telling the two apart;
- ``router_weight``: what scales an entering token's block update;
- ``gather_tokens`` / ``scatter_tokens``: take the entering tokens out of a sequence and put
  their updated rows back, leaving every other row bit for bit;
- ``membership_bce``: the loss that teaches a causal decision to predict top-k membership;
- ``prefix_rank_enter``: a causal decision without parameters: the token enters when its logit
  ranks within the top ``capacity`` of its sequence so far, with a population prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def topk_positions(logits: Tensor, k: int, token_dim: int = 1) -> Tensor:
    """logits (B, T) or [s, b] -> positions of each sequence's top ``k``, increasing along ``token_dim``."""
    return logits.topk(k, dim=token_dim, sorted=False).indices.sort(dim=token_dim).values


def membership(positions: Tensor, num_tokens: int, token_dim: int = 1) -> Tensor:
    """Bool mask over the ``num_tokens`` tokens of each sequence, True at ``positions``."""
    shape = list(positions.shape)
    shape[token_dim] = num_tokens
    return torch.zeros(shape, dtype=torch.bool, device=positions.device).scatter_(token_dim, positions, True)


def entering_first(enter: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """enter: (B, T) bool -> ``index`` (B, W) long and ``valid`` (B, W) bool: each row's entering
    tokens first, in position order, then the others as padding. ``W`` is ``width`` when given,
    else the largest number of entering tokens in a row (at least 1, so shapes stay non-empty)."""
    T = enter.shape[1]
    positions = torch.arange(T, device=enter.device).expand_as(enter)
    ranked = torch.where(enter, positions, positions + T).sort(dim=1).values  # (B, T)
    if width is None:
        width = max(int(enter.sum(1).max()), 1) if enter.numel() else 1
    ranked = ranked[:, :width]
    return ranked % T, ranked < T


def router_weight(logits: Tensor, kind: str) -> Tensor:
    """What scales an entering token's block update: ``raw``, the logit itself (the paper);
    ``sigmoid``, its sigmoid; ``unit``, 1 in value with the sigmoid's gradient, so a pretrained
    block's update is kept exactly while the router still learns from it. The gradient is the
    sigmoid's, not the raw logit's: it fades as the logit grows either way, where the raw one
    never does, and the router's pull on the trunk then grew with its weight until training
    diverged (docs/research.md §4)."""
    if kind == "sigmoid":
        return logits.sigmoid()
    if kind == "unit":
        gate = logits.sigmoid()
        return 1.0 + (gate - gate.detach())
    return logits


def gather_tokens(x: Tensor, index: Tensor, token_dim: int = 1) -> Tensor:
    """x (B, T, *rest) with index (B, n), or [s, b, *rest] with [n, b] -> the indexed tokens with ``rest``."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - index.dim()))).expand(*index.shape, *x.shape[index.dim() :])
    return x.gather(token_dim, idx)


def scatter_tokens(x: Tensor, index: Tensor, rows: Tensor, token_dim: int = 1) -> Tensor:
    """``x`` with the tokens at ``index`` replaced by ``rows`` (the shapes of :func:`gather_tokens`);
    every other row is copied unchanged."""
    idx = index.reshape(*index.shape, *([1] * (x.dim() - index.dim()))).expand_as(rows)
    return x.scatter(token_dim, idx, rows)


def apply_update(selected: Tensor, update: Tensor, weight: Tensor, valid: Tensor | None = None) -> Tensor:
    """``selected + weight * update`` per entering token (weights broadcast over the feature
    axis); padding rows (``valid`` False) come back unchanged."""
    new = selected + weight[..., None].to(selected.dtype) * update.to(selected.dtype)
    return new if valid is None else torch.where(valid[..., None], new, selected)


def membership_bce(logits: Tensor, member: Tensor, total_tokens: int | None = None) -> Tensor:
    """BCE of ``logits`` against top-k membership: the mean over the tokens, or, with
    ``total_tokens``, the sum over these tokens divided by it (shards of one micro-batch then
    add up to its mean)."""
    if total_tokens is None:
        return F.binary_cross_entropy_with_logits(logits.float(), member.float())
    return F.binary_cross_entropy_with_logits(logits.float(), member.float(), reduction="sum") / total_tokens


PRIOR_QUANTILES = 128  # points of the router-logit distribution a prefix-rank router keeps


def quantile_sums(logits: Tensor, valid: Tensor | None = None, count: int = PRIOR_QUANTILES) -> Tensor:
    """(count + 1,) float32: each row's router logits (B, T) summarized by the values at ``count``
    evenly spaced quantiles (0 .. 1) of its real tokens (``valid``), summed over the rows that have
    any, then the number of those rows. Sums add up over micro-batches and ranks, and any split of
    the same sequences gives the same mean (sum / rows): the prior does not depend on the layout.
    Static shapes, no host read-back."""
    x = logits.detach().float()  # (B, T)
    if valid is not None:
        x = x.masked_fill(~valid, float("inf"))  # padding sorts last, past every real token
        real = valid.sum(-1)  # (B,)
    else:
        real = torch.full(x.shape[:1], x.shape[1], device=x.device)
    ranked = x.sort(dim=-1).values  # (B, T)
    share = torch.linspace(0, 1, count, device=x.device)  # (count,)
    index = (share[None] * (real[:, None] - 1).clamp_min(0)).round().long()  # (B, count)
    has = real > 0  # (B,)
    # A row without real tokens adds nothing; a NaN logit stays NaN, so the prior refuses the step.
    points = torch.where(has[:, None], ranked.gather(1, index), 0.0)  # (B, count)
    return torch.cat([points.sum(0), has.sum().float().reshape(1)])


def share_at_or_above(values: Tensor, quantiles: Tensor) -> Tensor:
    """The fraction of a distribution, given by sorted ``quantiles`` (Q,), at or above each value."""
    return 1.0 - torch.searchsorted(quantiles, values.float().contiguous()).float() / quantiles.numel()


def prefix_rank_enter(
    logits: Tensor,
    capacity: float,
    quantiles: Tensor,
    prior_tokens: float,
    history: Tensor | None = None,
    history_len: Tensor | None = None,
    valid: Tensor | None = None,
    chunk: int = 512,
) -> Tensor:
    """Causal top-k: each token enters when its router logit is within the top ``capacity`` of
    the logits its sequence has produced so far, its own included, counted together with
    ``prior_tokens`` virtual tokens drawn from the population (``quantiles``), which stand in
    for the sequence's threshold while the prefix is short.

    logits: (B, S) of the new tokens (a prefix of each row real, ``valid``); history: (B, L)
    logits of the row's earlier tokens, the first ``history_len`` (B,) of each row real (None:
    the sequence starts here). Returns (B, S) bool. Memory: (B, chunk, L + S) at a time."""
    B, S = logits.shape
    logits = logits.float()
    if valid is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=logits.device)
    before = torch.zeros(B, dtype=torch.long, device=logits.device) if history_len is None else history_len
    prior = prior_tokens * share_at_or_above(logits, quantiles)  # (B, S)
    keys = logits.masked_fill(~valid, float("-inf"))  # padding never counts as at or above
    key_index = torch.arange(S, device=logits.device)
    out = []
    for start in range(0, S, chunk):
        query = logits[:, start : start + chunk]  # (B, C)
        q_index = key_index[start : start + chunk]
        seen = (keys[:, None, :] >= query[:, :, None]) & (key_index[None, None, :] <= q_index[None, :, None])
        above = seen.sum(-1)  # (B, C): this chunk's prefix within the new tokens, self included
        if history is not None:
            L = history.shape[1]
            earlier = torch.arange(L, device=logits.device)[None, None, :] < before[:, None, None]
            above = above + ((history.float()[:, None, :] >= query[:, :, None]) & earlier).sum(-1)
        out.append(above)
    above = torch.cat(out, dim=1).float()  # (B, S)
    count = before[:, None] + key_index[None, :] + 1  # (B, S): tokens of the prefix, self included
    return (above + prior[:, :S]) / (count + prior_tokens) <= capacity
