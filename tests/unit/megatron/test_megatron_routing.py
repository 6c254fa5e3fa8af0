"""The MoDE layer's routing functions on [s, b, h] against the native block's semantics
(single process; the sequence-parallel runs are in test_megatron_multirank.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modmoe.engines.megatron.routing import (
    gather_attention_mask,
    gather_rotary,
    gather_routed,
    plan_routed_rows,
    scatter_routed,
)
from modmoe.model import MoDETransformer
from modmoe.model.block import TransformerBlock
from modmoe.model.layers import rope_angles
from modmoe.model.routing import membership_bce, router_weight
from modmoe.model.routing import topk_positions as topk_along
from modmoe.model_config import ModelConfig


def topk_positions(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The shared selection on Megatron's [s, b] layout (tokens along dim 0)."""
    return topk_along(logits, k, token_dim=0)


def _cfg(router_weight: str = "raw") -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=64,
        depth={"capacity": 0.25, "router_weight": router_weight},
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 16},
    )


@pytest.mark.parametrize("kind", ["raw", "sigmoid"])
def test_gather_scatter_reproduce_the_native_routed_block(kind):
    """A native routed block's output, rebuilt from the pure functions on [s, b, h] around the
    block's own f(x): equal bit for bit, skipped tokens untouched."""
    torch.manual_seed(0)
    cfg = _cfg(kind)
    model = MoDETransformer(cfg)
    block = model.layers[1].eval()  # initialized weights
    assert isinstance(block, TransformerBlock) and block.router is not None
    B, T = 3, 40
    k = cfg.to_args().entering_tokens(T)
    x = torch.randn(B, T, cfg.dim)
    cos, sin = model.rotary_tables(torch.arange(T).expand(B, T))
    with torch.no_grad():
        expected, aux = block(x, cos, sin, k, "topk")

        x_sbh = x.transpose(0, 1)  # [s, b, h]
        logits = block.router.proj(x_sbh).squeeze(-1).float()  # [s, b]
        plan = plan_routed_rows(logits, k)
        assert torch.equal(plan.index.t(), aux.depth.index)  # the same tokens, in position order
        x_sel = gather_routed(x_sbh, plan)  # [k, b, h]
        idx = plan.index.t()[..., None].expand(-1, -1, cos.shape[-1])
        update, _ = block.residual_update(x_sel.transpose(0, 1), cos.gather(1, idx), sin.gather(1, idx), None)
        out = scatter_routed(x_sbh, plan, update.transpose(0, 1), router_weight(logits, kind))

    assert torch.equal(out.transpose(0, 1), expected)
    skipped = ~plan.mask  # [s, b]
    assert torch.equal(out[skipped], x_sbh[skipped])
    assert plan.mask.sum(0).tolist() == [k] * B


def test_selection_is_the_per_sequence_top_k_in_position_order():
    torch.manual_seed(1)
    logits = torch.randn(20, 4)
    index = topk_positions(logits, 5)
    assert (index.diff(dim=0) > 0).all()
    for b in range(4):
        assert set(index[:, b].tolist()) == set(logits[:, b].topk(5).indices.tolist())
    plan = plan_routed_rows(logits, 5)
    assert torch.equal(plan.pack, index) and plan.pack_valid.all()
    assert torch.equal(plan.source, torch.arange(5)[:, None].expand(5, 4))


def test_plan_routed_rows_rejects_shapes_sequence_parallelism_cannot_split():
    with pytest.raises(ValueError, match="multiples of the SP world size 2"):
        plan_routed_rows(torch.randn(16, 2), 5, rank=0, world=2)
    with pytest.raises(ValueError, match="1 <= k <= s"):
        plan_routed_rows(torch.randn(8, 2), 9)


def test_routed_tokens_keep_their_positions_for_rope():
    """Megatron's RoPE angles [s, 1, 1, d] gathered per sequence give each routed token the
    cos/sin the native model uses at its original position."""
    head_dim, s = 8, 24
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(s).float(), inv_freq)
    freqs = torch.cat([angles, angles], dim=-1)[:, None, None, :]  # Megatron's [s, 1, 1, d] layout
    index = topk_positions(torch.randn(s, 3), 6)  # [k, b]
    got = gather_rotary(freqs, index)  # [k, b, 1, d]
    assert got.shape == (6, 3, 1, head_dim)
    cos = rope_angles(index.t(), head_dim, 10000.0).cos()  # (b, k, d/2): the native model's angles
    assert torch.allclose(got[..., : head_dim // 2].squeeze(2).cos().transpose(0, 1), cos)


def test_attention_mask_is_restricted_to_the_routed_tokens():
    s, b, k = 10, 2, 4
    mask = torch.rand(b, 1, s, s) > 0.5
    index = topk_positions(torch.randn(s, b), k)
    got = gather_attention_mask(mask, index)
    assert got.shape == (b, 1, k, k)
    for j in range(b):
        rows = index[:, j]
        assert torch.equal(got[j, 0], mask[j, 0][rows][:, rows])
    causal = ~torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    assert torch.equal(
        gather_attention_mask(causal, index), ~torch.ones(k, k, dtype=torch.bool).tril()[None, None].expand(b, 1, k, k)
    )


def test_bce_shares_sum_to_the_native_mean():
    torch.manual_seed(2)
    logits = torch.randn(16, 3)
    mask = torch.zeros(16, 3, dtype=torch.bool).scatter_(0, topk_positions(logits, 4), True)
    native = F.binary_cross_entropy_with_logits(logits.t(), mask.t().float())
    shards = sum(
        membership_bce(logits[i * 4 : (i + 1) * 4], mask[i * 4 : (i + 1) * 4], logits.numel()) for i in range(4)
    )
    assert torch.allclose(shards, native)
    assert math.isclose(float(membership_bce(logits, mask, logits.numel())), float(native), rel_tol=1e-6)
