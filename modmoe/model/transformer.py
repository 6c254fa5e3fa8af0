"""The MoDE decoder-only transformer: the one implementation of the computation.

Training, the trainer's evaluation, ``modmoe generate``, ``modmoe eval`` and the exported
transformers model all run this code:
- ``forward``/``forward_sequences``: whole sequences (B, T) with static shapes, top-k routing (as
  trained) or causal routing, with the language-model loss and the auxiliary losses;
- ``run_tokens``: causal routing over a ragged KV cache (prefill and decode), so generation
  executes what it decides: a token that skips a routed block computes nothing there.

The decoder is a mixin over modules ``tok_embeddings``, ``layers``, ``norm``, ``output``, so that
both a plain ``nn.Module`` (:class:`MoDETransformer`) and the transformers ``PreTrainedModel`` of
an export own these parameters at the top level, under the same names.

The package imports only torch and the standard library, with relative imports: ``modmoe export``
copies its files into every exported directory, where they load without modmoe installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .args import CAUSAL_ROUTERS, ModelArgs, as_args
from .block import BlockAux, TransformerBlock
from .depth_router import RoutingMode
from .kv_cache import RaggedKVCache
from .layers import rope_angles
from .moe import MoE
from .trace import LayerTrace, Trace

# Auxiliary losses by name (the metric names of docs/tracking.md): unweighted, summed over layers.
AUX_LOSS_NAMES = ("moe_aux_loss", "moe_seq_aux_loss", "moe_z_loss", "mod_bce_loss", "mod_predictor_loss")


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # () next-token cross-entropy, when targets were given
    aux_total: torch.Tensor  # () the auxiliary losses weighted by their coefficients (add it to `loss`)
    aux_losses: dict[str, torch.Tensor]  # unweighted auxiliary losses, summed over layers, detached
    layers: list[BlockAux] = field(default_factory=list)  # per-block routing details


def aux_loss_weights(args: ModelArgs) -> dict[str, float]:
    """The coefficient of each auxiliary loss in ``aux_total``. The predictor's BCE has weight 1:
    its input is detached, so it trains only the predictor."""
    m, d = args.moe, args.depth
    return {
        "moe_aux_loss": m.aux_loss_coef,
        "moe_seq_aux_loss": m.seq_aux_loss_coef,
        "moe_z_loss": m.z_loss_coef,
        "mod_bce_loss": d.bce_loss_coef,
        "mod_predictor_loss": 1.0,
    }


class DecoderMixin:
    """The MoDE decoder over modules ``tok_embeddings``, ``layers``, ``norm``, ``output``."""

    cfg: ModelArgs
    tok_embeddings: nn.Embedding
    layers: nn.ModuleList
    norm: nn.RMSNorm
    output: nn.Linear

    def build_modules(self, args: ModelArgs) -> None:
        self.cfg = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.num_layers))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal init; residual output projections scaled by 1/sqrt(2 * num_layers); norm scales
        1; attention biases 0."""
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if name.endswith(".bias") and ".attn." in name:
                nn.init.zeros_(p)
            elif p.dim() == 1:  # norm scales (and the predictor's biases)
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", ".w2")):  # residual output projections
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def rotary_tables(
        self, positions: torch.Tensor, max_position: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (B, T) -> cos, sin (B, T, hd/2), float32. ``max_position``: the largest
        position when the caller knows it, which spares reading it back from the device."""
        if max_position is None and positions.numel():
            max_position = int(positions.max())
        if max_position is not None and max_position >= self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {max_position + 1} tokens does not fit the context (model.max_seq_len = {self.cfg.max_seq_len})"
            )
        angles = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        return angles.cos(), angles.sin()

    # ------------------------------------------------------------------ whole sequences
    def decode_sequences(
        self,
        tokens: torch.Tensor,
        routing: RoutingMode = "topk",
        positions: torch.Tensor | None = None,
        checkpoint: Callable | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[BlockAux]]:
        """The decoder without its LM head: final hidden states (B, T, D), after the last norm,
        and each block's routing details. Arguments as :meth:`forward_sequences`."""
        if routing not in ("topk", "causal"):
            raise ValueError(f"routing = {routing!r}: allowed topk, causal")
        B, T = tokens.shape
        max_position = None
        if positions is None:
            positions, max_position = torch.arange(T, device=tokens.device).expand(B, T), T - 1
        cos, sin = self.rotary_tables(positions, max_position)  # (B, T, hd/2)
        k = self.cfg.entering_tokens(T)
        x = self.tok_embeddings(tokens)  # (B, T, D)
        layer_aux: list[BlockAux] = []
        for block in self.layers:
            inputs = (x, cos, sin, k, routing, token_valid)
            x, aux = block(*inputs) if checkpoint is None else checkpoint(block, *inputs)
            layer_aux.append(aux)
        return self.norm(x), layer_aux

    def forward_sequences(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        routing: RoutingMode = "topk",
        positions: torch.Tensor | None = None,
        checkpoint: Callable | None = None,
        token_valid: torch.Tensor | None = None,
    ) -> ModelOutput:
        """tokens: (B, T) ids; targets: (B, T) next-token ids (-100 ignored); positions: (B, T)
        absolute positions (default 0..T-1); checkpoint: runs each block (``checkpoint(block,
        *inputs)``), e.g. activation checkpointing; None calls the blocks directly; token_valid:
        (B, T) bool, False for padding at the end of a row, which top-k routing then takes only
        when a row has fewer real tokens than places (None: every token is real)."""
        hidden, layer_aux = self.decode_sequences(tokens, routing, positions, checkpoint, token_valid)
        logits = self.output(hidden)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        aux_total, aux_losses = self.aux_losses(layer_aux, logits.device)
        return ModelOutput(logits, loss, aux_total, aux_losses, layer_aux)

    def aux_losses(self, layer_aux: list[BlockAux], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of the auxiliary losses, and each one unweighted (detached), summed over layers."""
        terms: dict[str, list[torch.Tensor]] = {name: [] for name in AUX_LOSS_NAMES}
        for a in layer_aux:
            if a.moe is not None:
                terms["moe_aux_loss"].append(a.moe.aux_loss)
                terms["moe_seq_aux_loss"].append(a.moe.seq_aux_loss)
                terms["moe_z_loss"].append(a.moe.z_loss)
            if a.depth is not None:
                terms["mod_bce_loss"].append(a.depth.bce_loss)
                if a.depth.predictor_loss is not None:
                    terms["mod_predictor_loss"].append(a.depth.predictor_loss)
        weights = aux_loss_weights(self.cfg)
        total = torch.zeros((), device=device)
        summed: dict[str, torch.Tensor] = {}
        for name, values in terms.items():
            if values:
                s = torch.stack(values).sum()
                summed[name] = s.detach()
                if weights[name]:
                    total = total + weights[name] * s
        return total, summed

    # ------------------------------------------------------------------ generation
    def new_cache(self, batch: int) -> RaggedKVCache:
        return RaggedKVCache(self.cfg.num_layers, batch, self.tok_embeddings.weight.device)

    def causal_rule(self, causal_router: str | None) -> str:
        """The causal decision rule (None: the one the model was trained for), checked against
        what the model has (a predictor, a logit prior)."""
        routers = [b.router for b in self.layers if b.router is not None]
        if not routers:
            if causal_router not in (None, *CAUSAL_ROUTERS):
                raise ValueError(f"causal_router = {causal_router!r}: allowed {', '.join(CAUSAL_ROUTERS)}")
            return causal_router or self.cfg.depth.causal_router
        return routers[0].causal_rule(causal_router)

    def run_tokens(
        self,
        tokens: torch.Tensor,
        cache: RaggedKVCache,
        valid: torch.Tensor | None = None,
        *,
        causal_router: str | None = None,
        last_only: bool = False,
        trace: Trace | None = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Causal routing over a KV cache. tokens: (B, S) appended after what ``cache`` holds
        (empty cache: prefill; S = 1: one decode step). valid: (B, S) bool, a prefix of each row
        (right padding), None = all. Returns logits (B, S, V), or (B, 1, V) at each row's last
        valid token with ``last_only``; the final hidden states (B, S, D) instead with ``head=False``."""
        B, S = tokens.shape
        device = tokens.device
        valid = torch.ones(B, S, dtype=torch.bool, device=device) if valid is None else valid
        n_valid = valid.sum(1)  # (B,)
        positions = cache.positions[:, None] + torch.arange(S, device=device)  # (B, S)
        end = int((cache.positions + n_valid).max()) if B else 0
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {end} tokens does not fit the context (model.max_seq_len = {self.cfg.max_seq_len})"
            )
        rule = self.causal_rule(causal_router)
        seen = cache.positions
        angles = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        cos, sin = angles.cos(), angles.sin()  # (B, S, hd/2)
        x = self.tok_embeddings(tokens)  # (B, S, D)
        for i, block in enumerate(self.layers):
            layer_trace = LayerTrace(i) if trace is not None else None
            x = block.forward_cached(x, cos, sin, valid, cache.layers[i], rule, seen, layer_trace)
            if trace is not None:
                trace.layers.append(layer_trace)
        cache.positions = cache.positions + n_valid
        if last_only:
            last = (n_valid - 1).clamp_min(0)[:, None, None].expand(-1, 1, x.shape[-1])
            x = x.gather(1, last)  # (B, 1, D)
        if not head:
            return self.norm(x)
        if trace is not None:
            trace.lm_head_tokens += B if last_only else int(n_valid.sum())
        return self.output(self.norm(x))


class MoDETransformer(DecoderMixin, nn.Module):
    """The decoder as a plain module: what modmoe trains and its runtime generates with."""

    def __init__(self, args: ModelArgs) -> None:
        """args: the architecture (a validated ``ModelConfig`` is converted)."""
        super().__init__()
        self.build_modules(as_args(args))
        self.reset_parameters()

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        routing: RoutingMode = "topk",
        positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        return self.forward_sequences(tokens, targets, routing, positions)
