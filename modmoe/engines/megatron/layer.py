"""The MoDE layer for Megatron-Core: a ``TransformerLayer`` that only its top-k tokens enter.

:class:`MoDETransformerLayer` subclasses Megatron's ``TransformerLayer``, so the inner layer
(attention + dense MLP or ``MoELayer``, local or Transformer Engine modules) is exactly what
Megatron's own spec builds, and ``TransformerBlock`` treats it like any layer (pipeline stages,
recompute, dist checkpointing). Its ``forward`` routes with the native model's router and tensor
functions (:mod:`modmoe.model.routing`, on the token axis 0), through the sequence-parallel
plan of :mod:`~modmoe.engines.megatron.routing`: router logits -> per-sequence top-k (global under
sequence parallelism) -> gather ``[k, b, h]`` with each token's own RoPE angles -> the parent
``forward`` -> ``x + r * (out - x)`` scattered back; skipped tokens are untouched.

Auxiliary losses per stage. The membership BCE (weight ``bce_loss_coef``) and the predictor's
BCE (weight 1; its input is detached, so it trains the predictor only) are attached to the
layer's output with Megatron's ``MoEAuxLossAutoScaler``, the mechanism its MoE router uses
for the balance losses: the loss value rides along the activation and its gradient is
injected in backward, scaled like the main loss. So a routed layer on any pipeline stage
trains its router without sending losses through the pipeline. For logging, each layer keeps
detached sums (``depth_stats``) that :func:`collect_depth_metrics` reduces over TP (sequence
shards), PP (stages) and DP (replicas).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch import Tensor, nn

from modmoe.engines.megatron.routing import (
    all_gather_logits,
    gather_attention_mask,
    gather_rotary,
    gather_routed,
    plan_routed_rows,
    scatter_routed,
)
from modmoe.engines.megatron.translate import DepthLayerParams
from modmoe.model.depth_router import DepthRouter
from modmoe.model.routing import membership_bce, quantile_sums, router_weight

# The native model's metric names: the two losses summed over routed layers, the agreement of the
# causal decision with top-k averaged over them (docs/tracking.md).
STAT_NAMES = ("mod_bce_loss", "mod_predictor_loss", "mod/causal_agreement")


def _param_device(config: TransformerConfig):
    return "cpu" if config.use_cpu_initialization else torch.cuda.current_device()


def build_depth_router(config: TransformerConfig, params: DepthLayerParams) -> DepthRouter:
    """The native model's :class:`~modmoe.model.depth_router.DepthRouter` (same parameter names,
    ``proj`` and ``predictor.0``/``predictor.2``), placed and initialised as Megatron places and
    initialises its own parameters."""
    router = DepthRouter(
        config.hidden_size,
        params.predictor_hidden,
        params.router_weight,
        params.causal_router,
        capacity=params.capacity,
        prior_tokens=params.prefix_prior_tokens,
        device=_param_device(config),
        dtype=config.params_dtype,
    )
    if config.perform_initialization:
        with torch.no_grad():
            for p in router.parameters():
                config.init_method(p) if p.dim() == 2 else p.zero_()
    for p in router.parameters():
        # Under sequence parallelism each TP rank sees different tokens: Megatron's
        # finalize_model_grads all-reduces the gradients of parameters marked like this.
        p.sequence_parallel = config.sequence_parallel
    return router


class MoDETransformerLayer(TransformerLayer):
    """A Megatron ``TransformerLayer`` entered by the per-sequence top-k tokens only."""

    def __init__(
        self,
        config: TransformerConfig,
        submodules: TransformerLayerSubmodules,
        layer_number: int = 1,
        hidden_dropout: float | None = None,
        pg_collection=None,
        vp_stage: int | None = None,
        depth: DepthLayerParams | None = None,
    ) -> None:
        if depth is None:
            raise ValueError("MoDETransformerLayer needs its DepthLayerParams (ModuleSpec params={'depth': ...})")
        super().__init__(config, submodules, layer_number, hidden_dropout, pg_collection, vp_stage)
        self.depth = depth
        self.depth_router = build_depth_router(config, depth)
        # Detached fp32 sums for logging: the STAT_NAMES contributions, then the micro-batch count.
        # A plain attribute, not a buffer, so that bf16 wrappers do not round the sums.
        self.depth_stats: Tensor | None = None
        # The step's per-row router-logit quantile sums (prefix_rank), until the optimizer step.
        self.quantile_sums: Tensor | None = None
        # For the depth-routing plot: when set, forward keeps the positions it chose, [k, b].
        self.record_selection = False
        self.last_selection: Tensor | None = None

    def _sp_group(self) -> dist.ProcessGroup | None:
        return self.tp_group if self.config.sequence_parallel and self.tp_group.size() > 1 else None

    def forward(  # type: ignore[override]
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        rotary_pos_emb: Tensor | tuple | None = None,
        inference_context=None,
        packed_seq_params=None,
        padding_mask: Tensor | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        """hidden_states: [s/W, b, h] (W = TP size under sequence parallelism, else 1)."""
        kwargs.pop("dynamic_inference_decode_only", None)
        if inference_context is not None or kwargs.get("inference_params") is not None:
            raise NotImplementedError(
                "MoDE layers: generation runs on the native model (export the Megatron checkpoint)"
            )
        if packed_seq_params is not None or padding_mask is not None:
            raise NotImplementedError("MoDE layers: packed sequences and padding masks are not supported")
        if any(kwargs.get(n) is not None for n in ("rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin")):
            raise NotImplementedError("MoDE layers take RoPE as rotary_pos_emb angles, not precomputed cos/sin")
        group = self._sp_group()
        rank, world = (group.rank(), group.size()) if group is not None else (0, 1)

        x = hidden_states  # [s/W, b, h]
        logits = self.depth_router.logits(x)  # [s/W, b] fp32
        full = all_gather_logits(logits, group)  # [s, b]
        if self.training and self.depth_router.prior_quantiles is not None:
            # Per sequence, for the prior (update_depth_priors). Recompute runs this twice per
            # micro-batch, which doubles sums and row count alike: the mean stays.
            sums = quantile_sums(full.t(), None, self.depth_router.prior_quantiles.numel())  # (Q + 1,)
            self.quantile_sums = sums if self.quantile_sums is None else self.quantile_sums + sums
        plan = plan_routed_rows(full, self.depth.tokens(full.shape[0]), rank, world)
        if self.record_selection:
            self.last_selection = plan.index.detach()
        x_sel = gather_routed(x, plan, group)  # [k/W, b, h]
        rope = rotary_pos_emb
        if isinstance(rope, tuple):
            rope = tuple(None if t is None else gather_rotary(t, plan.index) for t in rope)
        elif rope is not None:
            rope = gather_rotary(rope, plan.index)  # [k, b, 1, d]: attention sees all k tokens
        mask = None if attention_mask is None else gather_attention_mask(attention_mask, plan.index)

        out, context = super().forward(hidden_states=x_sel, attention_mask=mask, rotary_pos_emb=rope, **kwargs)
        update = out - x_sel  # f(x): attention + MLP contributions of the inner layer, [k/W, b, h]
        y = scatter_routed(x, plan, update, router_weight(logits, self.depth.router_weight), group)
        if self.training and torch.is_grad_enabled():
            y = self._attach_losses(y, x, logits, plan.local_mask, full, rank)
        return y, context

    def _attach_losses(self, y: Tensor, x: Tensor, logits: Tensor, member: Tensor, full: Tensor, rank: int) -> Tensor:
        """member: [s/W, b] top-k membership of the local tokens; full: [s, b] the micro-batch's
        logits (every sequence-parallel rank's); rank: this rank's share of them."""
        total = full.numel()
        bce = membership_bce(logits, member, total)
        loss = self.depth.bce_loss_coef * bce if self.depth.bce_loss_coef > 0 else None
        pred_loss = torch.zeros((), device=logits.device)
        decision = logits
        if self.depth_router.predictor is not None:
            pred_logits = self.depth_router.predictor_logits(x)  # [s/W, b] fp32, input detached
            pred_loss = membership_bce(pred_logits, member, total)
            loss = pred_loss if loss is None else loss + pred_loss
            if self.depth.causal_router == "predictor":
                decision = pred_logits
        enter = decision > 0
        if self.depth.causal_router == "prefix_rank":  # ranks each token against its whole sequence's prefix
            n = logits.shape[0]
            enter = self.depth_router.decide(full.t(), None, "prefix_rank").t()[rank * n : (rank + 1) * n]
        agreement = (enter == member).sum() / total
        with torch.no_grad():
            stats = torch.stack([bce.detach(), pred_loss.detach(), agreement.float(), torch.ones_like(bce)])
            self.depth_stats = stats if self.depth_stats is None else self.depth_stats + stats
        if loss is not None:
            y = MoEAuxLossAutoScaler.apply(y, loss)
        return y


def update_depth_priors(modules: Iterable[nn.Module], dp_group: dist.ProcessGroup | None, applied: bool = True) -> None:
    """After the optimizer step: sums each prefix-rank layer's quantile sums over the data-parallel
    replicas and moves its prior toward their mean (only when the step was ``applied``); resets
    the sums. Every rank of the data-parallel group must call it."""
    for root in modules:
        for layer in root.modules():
            if not isinstance(layer, MoDETransformerLayer) or layer.quantile_sums is None:
                continue
            sums, layer.quantile_sums = layer.quantile_sums, None
            if not applied:
                continue
            if dist.is_initialized() and dp_group is not None:
                dist.all_reduce(sums, group=dp_group)
            layer.depth_router.observe(sums)


def collect_depth_metrics(
    modules: Iterable[nn.Module],
    sequence_parallel: bool,
    tp_group: dist.ProcessGroup | None = None,
    pp_group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
) -> dict[str, float]:
    """Sums over the routed layers (as the native model reports its aux losses), means over
    micro-batches and data-parallel replicas; resets the sums. Every rank must call it."""
    layers = [m for root in modules for m in root.modules() if isinstance(m, MoDETransformerLayer)]
    device = next((p.device for layer in layers for p in layer.depth_router.parameters()), torch.device("cpu"))
    n = len(STAT_NAMES)
    totals = torch.zeros(n + 1, device=device)  # per-micro-batch stats summed over layers, routed layers
    for layer in layers:
        if layer.depth_stats is not None:
            totals[:n] += layer.depth_stats[:n] / layer.depth_stats[n].clamp_min(1)
            layer.depth_stats = None
        totals[n] += 1
    if dist.is_initialized():
        if sequence_parallel and tp_group is not None:  # each TP rank holds a share of the tokens
            shares = totals[:n].clone()
            dist.all_reduce(shares, group=tp_group)
            totals[:n] = shares
        if pp_group is not None:  # routed layers live on several stages
            dist.all_reduce(totals, group=pp_group)
        if dp_group is not None:
            dist.all_reduce(totals, group=dp_group)
            totals /= dist.get_world_size(dp_group)
    if totals[n] == 0:
        return {}
    out = dict(zip(STAT_NAMES, totals[:n].tolist(), strict=True))
    out["mod/causal_agreement"] /= float(totals[n])  # an agreement is averaged over layers, not summed
    return out
