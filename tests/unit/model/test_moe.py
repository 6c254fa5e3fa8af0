"""MoE router, experts and load balancing of the native model."""

import math

import pytest
import torch

from modmoe.model.moe import MoE
from modmoe.model_config import ModelConfig


def moe_cfg(**moe) -> ModelConfig:
    base = {"num_experts": 4, "top_k": 2, "expert_hidden": 8}
    return ModelConfig(
        vocab_size=16, dim=8, num_layers=1, num_heads=2, max_seq_len=16, depth={"enabled": False}, moe={**base, **moe}
    )


def make(noop=0, seed=0, **moe) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(moe_cfg(**moe).to_args(), noop_experts=noop)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return layer


def test_aux_losses_match_hand_computation():
    layer = make()
    x = torch.randn(2, 5, 8)  # (B, S, D)
    _, aux = layer(x)
    # By hand, token by token, with plain Python over the softmax probabilities.
    logits = (x.reshape(10, 8) @ layer.gate.weight.T).tolist()
    E, K = 4, 2
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    chosen = [sorted(range(E), key=lambda e: -row[e])[:K] for row in probs]
    f = [sum(e in c for c in chosen) / (10 * K) for e in range(E)]
    P = [sum(row[e] for row in probs) / 10 for e in range(E)]
    assert aux.aux_loss.item() == pytest.approx(E * sum(fe * pe for fe, pe in zip(f, P)), rel=1e-5)
    seq = []
    for b in range(2):
        rows, ch = probs[b * 5 : b * 5 + 5], chosen[b * 5 : b * 5 + 5]
        fb = [sum(e in c for c in ch) / (5 * K) for e in range(E)]
        pb = [sum(r[e] for r in rows) / 5 for e in range(E)]
        seq.append(E * sum(a * c for a, c in zip(fb, pb)))
    assert aux.seq_aux_loss.item() == pytest.approx(sum(seq) / 2, rel=1e-5)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / 10
    assert aux.z_loss.item() == pytest.approx(z, rel=1e-5)
    assert aux.tokens_per_expert.tolist() == [f_e * 20 for f_e in f]


def test_output_is_weighted_sum_of_chosen_experts():
    layer = make(num_shared_experts=1)
    x = torch.randn(1, 3, 8)
    out, aux = layer(x)
    flat = x.reshape(3, 8)
    logits, _, experts, weights = layer.route(flat)
    for t in range(3):
        expected = layer.shared(flat[t])
        for slot in range(2):
            e = int(experts[t, slot])
            h = torch.nn.functional.silu(flat[t] @ layer.experts.w1[e]) * (flat[t] @ layer.experts.w3[e])
            expected = expected + weights[t, slot] * (h @ layer.experts.w2[e])
        torch.testing.assert_close(out[0, t], expected, rtol=1e-5, atol=1e-6)
    assert aux.dropped_slots == 0 and aux.dispatched_slots == 6


def test_capacity_mode_drops_the_expected_tokens():
    layer = make(top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(1, 16, 8).abs()  # all 16 tokens choose expert 0
    out, aux = layer(x)
    capacity = math.ceil(1.0 * 16 * 1 / 4)  # 4 slots per expert
    assert aux.dispatched_slots == capacity and aux.dropped_slots == 16 - capacity
    # First come, first served: the first `capacity` tokens got an output, the rest none.
    assert (out[0, :capacity].abs().sum(-1) > 0).all()
    assert (out[0, capacity:] == 0).all()
    dropless = make(top_k=1)
    dropless.load_state_dict(layer.state_dict())
    _, aux2 = dropless(x)
    assert aux2.dropped_slots == 0 and aux2.dispatched_slots == 16


def test_integrated_noop_experts_skip_the_mlp():
    layer = make(noop=3)
    assert layer.gate.out_features == 4 + 3
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[4:, 0] = 10.0  # no-op experts win for every token with x[0] > 0
    x = torch.randn(1, 6, 8)
    x[..., 0] = x[..., 0].abs() + 1
    out, aux = layer(x)
    assert aux.dispatched_slots == 0
    assert torch.equal(out, torch.zeros_like(out))
    assert aux.tokens_per_expert[4:].sum() == 12 and aux.tokens_per_expert[:4].sum() == 0


def test_padded_tokens_are_not_routed():
    layer = make()
    x = torch.randn(2, 4, 8)
    valid = torch.tensor([[True, True, False, False], [True, True, True, False]])
    out, aux = layer(x, valid)
    assert aux.total_slots == 5 * 2 and aux.tokens_per_expert.sum() == 10
    assert (out[~valid] == 0).all()


def test_expert_bias_moves_load_toward_balance():
    layer = make(bias_update_rate=0.01, seed=4, score="sigmoid")
    with torch.no_grad():
        layer.gate.weight[0] += 0.3  # skew: expert 0 is preferred
    layer.train()
    gen = torch.Generator().manual_seed(0)

    def imbalance() -> float:
        with torch.no_grad():
            _, aux = layer(torch.randn(4, 64, 8, generator=gen).abs())
        load = aux.tokens_per_expert
        return float(load.max() / load.mean())

    before = imbalance()
    for _ in range(60):
        with torch.no_grad():
            _, aux = layer(torch.randn(4, 64, 8, generator=gen).abs())
        layer.update_expert_bias(aux.tokens_per_expert)
    after = imbalance()
    assert before > 1.5 and after < before - 0.3, (before, after)
    assert layer.expert_bias[0] < 0  # the overloaded expert was pushed down


def test_every_expert_gets_a_gradient_even_when_unused():
    layer = make(top_k=1)
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[0, 0] = 10.0
    x = torch.randn(1, 4, 8).abs()
    out, _ = layer(x)
    out.sum().backward()
    assert (
        layer.experts.w1.grad is not None
        and layer.experts.w1.grad[1:].abs().sum() == 0
        and layer.experts.w1.grad[0].abs().sum() > 0
    )
