"""The MoDE decoder-only transformer (the native model: the project's reference semantics)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from modmoe.model.block import BlockAux, TransformerBlock
from modmoe.model.config import ModelConfig
from modmoe.model.depth_router import RoutingMode
from modmoe.model.layers import RotaryEmbedding
from modmoe.model.moe import MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # () next-token cross-entropy, when targets were given
    aux_loss: torch.Tensor  # () weighted sum of every auxiliary loss (add it to `loss`)
    aux: dict[str, torch.Tensor]  # unweighted auxiliary losses, summed over layers, detached
    layers: list[BlockAux] = field(default_factory=list)  # per-block routing details


class MoDETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std, out_std = self.cfg.init_std, self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:  # norm scales
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight", ".w2")):  # residual output projections
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        routing: RoutingMode = "topk",
        positions: torch.Tensor | None = None,
    ) -> ModelOutput:
        """tokens: (B, T) ids; targets: (B, T) next-token ids (-100 ignored); positions:
        (B, T) absolute positions (default 0..T-1)."""
        B, T = tokens.shape
        max_position = None
        if positions is None:
            positions, max_position = torch.arange(T, device=tokens.device).expand(B, T), T - 1
        cos, sin = self.rope(positions, max_position)  # (B, T, hd/2)
        k = self.cfg.depth_capacity_tokens(T)
        x = self.tok_embeddings(tokens)  # (B, T, D)
        layer_aux: list[BlockAux] = []
        for block in self.layers:
            x, aux = block(x, cos, sin, k, routing)
            layer_aux.append(aux)
        logits = self.output(self.norm(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        aux_loss, aux = self._aux_losses(layer_aux, logits.device)
        return ModelOutput(logits, loss, aux_loss, aux, layer_aux)

    def _aux_losses(self, layer_aux: list[BlockAux], device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m, d = self.cfg.moe, self.cfg.depth
        terms: dict[str, list[torch.Tensor]] = {
            "moe_aux_loss": [],
            "moe_seq_aux_loss": [],
            "moe_z_loss": [],
            "mod_bce_loss": [],
            "mod_predictor_loss": [],
        }
        for a in layer_aux:
            if a.moe is not None:
                terms["moe_aux_loss"].append(a.moe.aux_loss)
                terms["moe_seq_aux_loss"].append(a.moe.seq_aux_loss)
                terms["moe_z_loss"].append(a.moe.z_loss)
            if a.depth is not None:
                terms["mod_bce_loss"].append(a.depth.bce_loss)
                if a.depth.predictor_loss is not None:
                    terms["mod_predictor_loss"].append(a.depth.predictor_loss)
        coefs = {
            "moe_aux_loss": m.aux_loss_coef,
            "moe_seq_aux_loss": m.seq_aux_loss_coef,
            "moe_z_loss": m.z_loss_coef,
            "mod_bce_loss": d.bce_loss_coef,
            "mod_predictor_loss": 1.0,  # only reaches the stop-gradient predictor
        }
        total = torch.zeros((), device=device)
        summed: dict[str, torch.Tensor] = {}
        for name, values in terms.items():
            if values:
                s = torch.stack(values).sum()
                summed[name] = s.detach()
                if coefs[name]:
                    total = total + coefs[name] * s
        return total, summed
