"""Sparse MoE MLP: token-choice top-k router and stacked SwiGLU experts.

Naming follows one convention through the file:
``logits`` (gate output) -> ``scores`` (softmax or sigmoid of logits) -> ``probs`` (scores
normalized per token; what the balance losses see) -> ``topk_experts`` / ``topk_weights``
(the choice and the mixing weights) -> ``dispatch`` (which chosen slots are actually computed:
not dropped by capacity, not padding, not a no-op expert).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.profiler import record_function

from .args import ModelArgs
from .grouped_gemm import ROW_ALIGN, grouped_mm, grouped_mm_fits, pad_groups
from .layers import SwiGLU

ExpertKernel = Literal["grouped", "loop"]


@dataclass
class MoEAux:
    """Unweighted balance losses (attached to the graph) and detached load statistics."""

    aux_loss: torch.Tensor
    seq_aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # (E_total,) routed slots per expert, before dropping
    dispatched_slots: torch.Tensor  # () slots computed by real experts
    dropped_slots: torch.Tensor  # () slots to real experts dropped by capacity
    total_slots: torch.Tensor  # () valid tokens * top_k


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of a parameter that a parallelize step may have made a DTensor."""
    return t.to_local() if isinstance(t, DTensor) else t


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts stored as one stacked ``(E, ...)`` parameter per projection, so the
    global parameter names and shapes do not depend on expert parallelism (under EP each rank
    holds a ``Shard(0)`` slice; under TP the hidden dimension is split).

    ``kernel`` is chosen once, when the module is built (and again by a parallelize step that
    changes the local sizes): ``grouped``, one ``torch._grouped_mm`` per projection over all
    experts with device-side offsets, or ``loop``, one matmul per expert on host-side counts,
    the fallback where the grouped op is missing or the sizes break its 16-byte rule."""

    def __init__(self, num_experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.kernel: ExpertKernel = self.best_kernel(dim, hidden)
        # Rows per group boundary for the grouped GEMM: None = 8 on CUDA (16 bytes of bf16,
        # see ``pad_groups``), unpadded elsewhere; an int forces it (tests pad on CPU).
        self.group_align: int | None = None

    @staticmethod
    def best_kernel(dim: int, hidden: int) -> ExpertKernel:
        return "grouped" if grouped_mm_fits(dim, hidden) else "loop"

    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs: (M, D) rows sorted by expert; counts: (E_local,) rows per local expert -> (M, D).
        Rows past ``counts.sum()`` belong to no expert and are not computed: the loop leaves
        them zero, the grouped GEMM leaves them unwritten (the caller masks them)."""
        w1, w3, w2 = local_tensor(self.w1), local_tensor(self.w3), local_tensor(self.w2)
        if self.kernel == "grouped":
            dtype = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
            align = self.group_align or (ROW_ALIGN if xs.is_cuda else 1)
            x, where = xs.to(dtype), None
            if align > 1:
                x, offsets, where = pad_groups(x, counts, align)  # (M + E*(align-1), D)
            else:
                offsets = counts.cumsum(0).to(torch.int32)  # (E_local,) on the device: no host sync
            hidden = F.silu(grouped_mm(x, w1, offsets)) * grouped_mm(x, w3, offsets)  # (M', F)
            out = grouped_mm(hidden, w2, offsets)  # (M', D)
            return out if where is None else out[where]  # (M, D)
        # Fallback: one matmul per expert; an empty expert still touches its weights so that
        # every parameter gets a (zero) gradient. ``tolist`` waits for the device.
        sizes = counts.tolist()
        outs = []
        for e, chunk in enumerate(torch.split(xs[: sum(sizes)], sizes)):
            hidden = F.silu(chunk @ w1[e]) * (chunk @ w3[e])  # (n_e, F)
            outs.append(hidden @ w2[e])  # (n_e, D)
        out = torch.cat(outs)
        return torch.cat([out, out.new_zeros(xs.shape[0] - out.shape[0], out.shape[1])])

    def forward_counts(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Generation: xs (n, D) rows sorted by expert, ``counts[e]`` rows each -> (n, D). Only
        experts with rows are touched (at decode, most of them are not)."""
        w1, w3, w2 = local_tensor(self.w1), local_tensor(self.w3), local_tensor(self.w2)
        outs, start = [], 0
        for e, count in enumerate(counts):
            if count:
                chunk = xs[start : start + count]  # (n_e, D)
                outs.append((F.silu(chunk @ w1[e]) * (chunk @ w3[e])) @ w2[e])
                start += count
        return torch.cat(outs) if outs else xs[:0]


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, noop_experts: int = 0) -> None:
        super().__init__()
        m = args.moe
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.num_choices = m.num_experts + noop_experts  # router outputs: real experts, then no-ops
        self.score, self.normalize = m.score, m.normalize_top_k or m.score == "sigmoid"
        self.capacity_factor, self.bias_update_rate = m.capacity_factor, m.bias_update_rate
        self.gate = nn.Linear(args.dim, self.num_choices, bias=False)
        self.experts = GroupedExperts(m.num_experts, args.dim, m.expert_hidden)
        self.shared = SwiGLU(args.dim, m.shared_hidden) if m.shared_hidden else None
        # Qwen2-MoE scales the shared experts' output per token by sigmoid(w . x).
        self.shared_gate = nn.Linear(args.dim, 1, bias=False) if m.shared_hidden and m.shared_expert_gate else None
        if self.bias_update_rate > 0:
            self.register_buffer("expert_bias", torch.zeros(self.num_choices))
        else:
            self.expert_bias = None
        # Set from outside by the parallelize step: sums per-expert counts over the ranks
        # that share a global batch, so the balance loss sees the global load (training only).
        self.load_reducer: Callable[[torch.Tensor], torch.Tensor] | None = None

    # ---------------------------------------------------------------- routing
    def route(self, x: torch.Tensor):
        """x: (N, D) -> logits, probs (N, Et), topk_experts, topk_weights (N, K). Routing
        decisions are discrete: scored in float32, the input taken in the gate's dtype (float32
        in a bf16 export). The gate runs as a module (ZeRO-3 gathers a weight around its forward)."""
        logits = self.gate(x.to(self.gate.weight.dtype)).float()  # (N, Et)
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()  # bias: choice only
        topk_experts = choice.topk(self.top_k, dim=-1).indices  # (N, K)
        topk_weights = scores.gather(1, topk_experts)
        if self.normalize:
            topk_weights = topk_weights / topk_weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return logits, probs, topk_experts, topk_weights

    def _shared_out(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, D) -> the shared experts' contribution (N, D)."""
        out = self.shared(x)
        if self.shared_gate is not None:
            out = out * self.shared_gate(x.to(self.shared_gate.weight.dtype)).float().sigmoid().to(out.dtype)
        return out

    def _within_expert_capacity(
        self, topk_experts: torch.Tensor, slot_valid: torch.Tensor, padded: bool
    ) -> torch.Tensor:
        """(N, K) bool: slot within its expert's capacity, first come (token order) first served.
        Without padding every slot is valid and the capacity is a Python number; with padding it
        stays a device tensor (the same float64 arithmetic), so nothing waits for the host."""
        n_valid_slots = slot_valid.sum().double() if padded else slot_valid.numel()
        slots_per_expert = self.capacity_factor * n_valid_slots / self.num_experts
        slots_per_expert = torch.ceil(slots_per_expert) if padded else math.ceil(slots_per_expert)
        choices = torch.arange(self.num_choices, device=topk_experts.device)
        onehot = ((topk_experts[..., None] == choices) & slot_valid[..., None]).flatten(0, 1).long()  # (N*K, Et)
        rank_in_expert = (onehot.cumsum(0) * onehot).sum(-1) - 1  # (N*K,)
        is_noop = topk_experts >= self.num_experts
        return (rank_in_expert.view_as(topk_experts) < slots_per_expert) | is_noop

    def _balance_losses(self, logits, probs, topk_experts, slot_valid, token_valid, batch: int):
        Et, K = self.num_choices, self.top_k
        counts = torch.zeros(Et, device=logits.device).index_add_(
            0, topk_experts.flatten(), slot_valid.flatten().float()
        )  # (Et,) routed slots per choice
        n_tokens = token_valid.sum().float()
        global_counts, global_tokens = counts, n_tokens
        if self.load_reducer is not None and self.training:  # eval forwards may run on one rank alone
            global_counts = self.load_reducer(counts)
            global_tokens = self.load_reducer(n_tokens.reshape(1)).reshape(())
        mask = token_valid.float()[:, None]
        load_fraction = global_counts / (global_tokens * K).clamp_min(1)  # f_e
        mean_prob = (probs * mask).sum(0) / n_tokens.clamp_min(1)  # P_e
        aux = Et * (load_fraction * mean_prob).sum()
        # Per-sequence version: the same product inside each sequence, then averaged.
        seq_probs = (probs * mask).view(batch, -1, Et)  # (B, S, Et)
        seq_tokens = token_valid.view(batch, -1).sum(1).float().clamp_min(1)  # (B,)
        seq_counts = torch.zeros(batch, Et, device=logits.device).scatter_add_(
            1, topk_experts.reshape(batch, -1), slot_valid.reshape(batch, -1).float()
        )  # (B, Et)
        seq_aux = Et * ((seq_counts / (seq_tokens[:, None] * K)) * (seq_probs.sum(1) / seq_tokens[:, None])).sum(1)
        z = (torch.logsumexp(logits, -1) ** 2 * mask[:, 0]).sum() / n_tokens.clamp_min(1)
        return aux, seq_aux.mean(), z, counts

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEAux]:
        """x: (B, S, D); valid: (B, S) bool marking real tokens of a padded selection."""
        B, S, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        N, K = flat.shape[0], self.top_k
        token_valid = valid.reshape(N) if valid is not None else torch.ones(N, dtype=torch.bool, device=x.device)
        with record_function("moe_router"):
            logits, probs, topk_experts, topk_weights = self.route(flat)
            slot_valid = token_valid[:, None].expand(N, K).contiguous()
            aux, seq_aux, z, counts = self._balance_losses(logits, probs, topk_experts, slot_valid, token_valid, B)

        to_real = slot_valid & (topk_experts < self.num_experts)
        dispatch = to_real
        if self.capacity_factor is not None:
            dispatch = to_real & self._within_expert_capacity(topk_experts, slot_valid, padded=valid is not None)

        # Static shapes: all N*K slots are sorted by expert, the dispatched ones first; the rest
        # (dropped, padding, no-op) sort behind them under the sentinel E and are not computed.
        sort_key = torch.where(dispatch, topk_experts, self.num_experts).flatten()  # (N*K,)
        experts = torch.arange(self.num_experts, device=x.device)
        per_expert = (sort_key[:, None] == experts).sum(0)  # (E,) dispatched slots per expert
        order = torch.argsort(sort_key, stable=True)  # (N*K,) slots by expert
        token_of_slot = order // K
        rows = flat[token_of_slot]  # (N*K, D)
        weights = topk_weights.flatten()[order, None].to(x.dtype)  # (N*K, 1)
        if valid is None and self.capacity_factor is None and self.num_choices == self.num_experts:
            expert_out = self.experts(rows, per_expert) * weights  # dropless: every slot is computed
        else:
            # Slots past the dispatched ones: zeros in and out of the experts. A grouped GEMM
            # leaves those rows unwritten (any bits, inf and NaN included), so they are selected
            # away before anything multiplies them, and `where` also stops their gradient.
            computed = (sort_key[order] < self.num_experts)[:, None]  # (N*K, 1)
            rows = torch.where(computed, rows, 0)
            expert_out = torch.where(computed, self.experts(rows, per_expert), 0) * weights
        out = torch.zeros_like(flat).index_add_(0, token_of_slot, expert_out)  # (N, D)
        if self.shared is not None:
            out = out + self._shared_out(flat)

        stats = MoEAux(
            aux_loss=aux,
            seq_aux_loss=seq_aux,
            z_loss=z,
            tokens_per_expert=counts.detach(),
            dispatched_slots=dispatch.sum().detach(),
            dropped_slots=(to_real & ~dispatch).sum().detach(),
            total_slots=slot_valid.sum().detach(),
        )
        return out.view(B, S, D), stats

    def forward_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Generation: x (N, D) real tokens only -> (N, D), and the slots computed by real
        experts. Dropless: token dropping would make a token's output depend on the rest of its
        batch, which generation cannot know."""
        K = self.top_k
        _, _, topk_experts, topk_weights = self.route(x)
        if x.shape[0] == 1:
            return self._one_token(x, topk_experts[0], topk_weights[0])
        # No-op experts (integrated MoDE) get the sentinel E and are not computed.
        sort_key = torch.where(topk_experts < self.num_experts, topk_experts, self.num_experts).flatten()  # (N*K,)
        counts = torch.bincount(sort_key, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        order = torch.argsort(sort_key, stable=True)[: sum(counts)]  # computed slots, by expert
        token_of_slot = order // K
        out = self.experts.forward_counts(x[token_of_slot], counts)  # (n, D)
        out = out * topk_weights.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token_of_slot, out)
        if self.shared is not None:
            out = out + self._shared_out(x)
        return out, sum(counts)

    def _one_token(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Decode of one token: its K experts called directly (fewer ops than the sort and
        scatter above), summed in the same order, so the result is the same."""
        chosen = sorted((e, k) for k, e in enumerate(experts.tolist()) if e < self.num_experts)
        out = torch.zeros_like(x)
        w1, w3, w2 = (local_tensor(w) for w in (self.experts.w1, self.experts.w3, self.experts.w2))
        for e, k in chosen:
            out = out + ((F.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]) * weights[k].to(x.dtype)
        if self.shared is not None:
            out = out + self._shared_out(x)
        return out, len(chosen)

    @torch.no_grad()
    def update_expert_bias(self, load: torch.Tensor) -> None:
        """Aux-loss-free balancing: move each expert's bias toward balance by the sign of its
        load error. ``load``: (Et,) routed slots summed over the step and over data-parallel
        ranks (the trainer takes it from the step's router statistics, so a forward that
        activation checkpointing recomputes is not counted twice)."""
        if self.expert_bias is None:
            return
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
