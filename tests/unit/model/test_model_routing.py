"""Depth routing (MoD) semantics of the native model."""

import math

import pytest
import torch

from modmoe.model import MoDETransformer
from modmoe.model.block import TransformerBlock
from modmoe.model_config import ModelConfig


def small_cfg(**depth) -> ModelConfig:
    return ModelConfig(
        vocab_size=97,
        dim=32,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=64,
        depth={"capacity": 0.25, "predictor": True, **depth},
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 16},
    )


@pytest.fixture
def model() -> MoDETransformer:
    torch.manual_seed(0)
    return MoDETransformer(small_cfg())


def routed_blocks(model):
    return [b for b in model.layers if b.router is not None]


def test_exactly_k_tokens_enter_each_routed_block(model):
    tokens = torch.randint(0, 97, (3, 40))
    out = model(tokens)
    k = math.ceil(0.25 * 40)
    depth = [a.depth for a in out.layers if a.depth is not None]
    assert len(depth) == 2  # blocks 1 and 3
    for d in depth:
        assert d.index.shape == (3, k)
        assert d.topk_mask.sum(1).tolist() == [k, k, k]
        assert (d.index.diff(dim=1) > 0).all()  # sorted positions: causal order preserved


def _block_io(block: TransformerBlock, model, tokens, mode="topk"):
    captured = {}

    def hook(mod, args, output):
        captured["x"], captured["out"], captured["aux"] = args[0], output[0], output[1]

    handle = block.register_forward_hook(hook)
    model(tokens, routing=mode)
    handle.remove()
    return captured["x"], captured["out"], captured["aux"]


def test_skipped_tokens_pass_through_bit_identical(model):
    tokens = torch.randint(0, 97, (2, 32))
    for block in routed_blocks(model):
        for mode in ("topk", "causal"):
            x, out, aux = _block_io(block, model, tokens, mode)
            entered = torch.zeros(2, 32, dtype=torch.bool).scatter_(
                1, aux.depth.index, aux.depth.valid if aux.depth.valid is not None else True
            )
            assert torch.equal(out[~entered], x[~entered])
            assert not torch.equal(out[entered], x[entered])


def test_router_receives_gradient(model):
    """The LM loss alone (no BCE term) trains the router, through the weight that scales the block output."""
    tokens = torch.randint(0, 97, (2, 32))
    out = model(tokens, targets=tokens)
    out.loss.backward()
    for block in routed_blocks(model):
        grad = block.router.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_routed_block_equals_dense_block_on_chosen_subsequence(model):
    tokens = torch.randint(0, 97, (2, 32))
    block = routed_blocks(model)[0]
    x, out, aux = _block_io(block, model, tokens)
    idx = aux.depth.index  # (B, k)
    positions = idx  # original positions of the chosen tokens
    cos, sin = model.rotary_tables(positions)
    x_sel = x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    # The same block without its router, run on just the chosen tokens at their positions.
    router, block.router = block.router, None
    try:
        dense_out, _ = block(x_sel, cos, sin, k=0, mode="topk")
    finally:
        block.router = router
    expected = x_sel + aux.depth.weight[..., None] * (dense_out - x_sel)
    got = out.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_chosen_tokens_attend_only_among_chosen(model):
    """Perturbing a skipped token (without changing the selection) leaves chosen outputs alone."""
    tokens = torch.randint(0, 97, (1, 32))
    block = routed_blocks(model)[0]
    x, out, aux = _block_io(block, model, tokens)
    skipped = [p for p in range(32) if p not in aux.depth.index[0].tolist()]
    x2 = x.clone()
    x2[0, skipped[len(skipped) // 2]] += 1e-3 * torch.randn(x.shape[-1])
    cos, sin = model.rotary_tables(torch.arange(32)[None])
    out2, aux2 = block(x2, cos, sin, k=aux.depth.index.shape[1], mode="topk")
    assert torch.equal(aux2.depth.index, aux.depth.index)
    chosen = aux.depth.index[0]
    torch.testing.assert_close(out2[0, chosen], out[0, chosen], rtol=0, atol=1e-6)


@pytest.mark.parametrize("causal_router", ["aux_loss", "predictor"])
def test_causal_routing_ignores_future_tokens(causal_router):
    torch.manual_seed(1)
    model = MoDETransformer(small_cfg(causal_router=causal_router)).eval()
    tokens = torch.randint(0, 97, (2, 48))
    changed = tokens.clone()
    t = 20
    changed[:, t + 1 :] = torch.randint(0, 97, (2, 48 - t - 1))
    with torch.no_grad():
        a = model(tokens, routing="causal").logits
        b = model(changed, routing="causal").logits
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
        # Top-k routing does look ahead: the same edit moves earlier logits (the test can fail).
        c = model(tokens, routing="topk").logits
        d = model(changed, routing="topk").logits
    assert not torch.allclose(c[:, : t + 1], d[:, : t + 1], atol=1e-5)


def test_predictor_is_stop_gradient():
    torch.manual_seed(2)
    model = MoDETransformer(small_cfg(causal_router="predictor"))
    tokens = torch.randint(0, 97, (2, 32))
    out = model(tokens)
    assert "mod_predictor_loss" in out.aux_losses
    predictor_loss = sum(a.depth.predictor_loss for a in out.layers if a.depth is not None)
    predictor_loss.backward()
    assert model.tok_embeddings.weight.grad is None or model.tok_embeddings.weight.grad.abs().sum() == 0
    assert all(b.router.predictor[0].weight.grad.abs().sum() > 0 for b in routed_blocks(model))


@pytest.mark.parametrize("detach", [False, True])
def test_bce_reaches_the_trunk_unless_detached(detach):
    torch.manual_seed(3)
    model = MoDETransformer(small_cfg(bce_detach_input=detach))
    out = model(torch.randint(0, 97, (2, 32)))
    bce = sum(a.depth.bce_loss for a in out.layers if a.depth is not None)
    bce.backward()
    trunk = model.tok_embeddings.weight.grad
    assert (trunk is not None and trunk.abs().sum() > 0) is not detach
    assert all(b.router.proj.weight.grad.abs().sum() > 0 for b in routed_blocks(model))


def test_sigmoid_router_weight_scales_by_sigmoid():
    torch.manual_seed(3)
    model = MoDETransformer(small_cfg(router_weight="sigmoid"))
    out = model(torch.randint(0, 97, (2, 32)))
    for d in (a.depth for a in out.layers if a.depth is not None):
        torch.testing.assert_close(d.weight, d.logits.gather(1, d.index).sigmoid())


def test_dense_and_moe_only_baselines_share_the_code():
    dense = ModelConfig(
        vocab_size=97, dim=32, num_layers=2, num_heads=4, depth={"enabled": False}, moe={"enabled": False}
    )
    moe_only = ModelConfig(vocab_size=97, dim=32, num_layers=2, num_heads=4, depth={"enabled": False})
    for cfg in (dense, moe_only):
        m = MoDETransformer(cfg)
        out = m(torch.randint(0, 97, (1, 16)))
        assert all(a.depth is None for a in out.layers)
    assert all(a.moe is None for a in MoDETransformer(dense)(torch.randint(0, 97, (1, 16))).layers)


def test_prefix_rank_is_the_rank_among_the_prefix_with_a_population_prior():
    """The rule against a direct count: enter when (prefix tokens at or above r_i, self included,
    + n0 * population share at or above r_i) / (i + n0) <= capacity; history + new = one pass."""
    from modmoe.model.routing import prefix_rank_enter, share_at_or_above

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    quantiles = torch.randn(128).sort().values
    capacity, n0 = 0.2, 6.0
    expected = torch.zeros(3, 50, dtype=torch.bool)
    for b in range(3):
        for i in range(50):
            above = int((logits[b, : i + 1] >= logits[b, i]).sum())
            share = float(share_at_or_above(logits[b, i : i + 1], quantiles))
            expected[b, i] = (above + n0 * share) / (i + 1 + n0) <= capacity
    got = prefix_rank_enter(logits, capacity, quantiles, n0, chunk=7)
    assert torch.equal(got, expected)
    history = torch.zeros(3, 64)
    history[:, :30] = logits[:, :30]
    later = prefix_rank_enter(logits[:, 30:], capacity, quantiles, n0, history, torch.full((3,), 30))
    assert torch.equal(later, expected[:, 30:])
    assert 0.1 < expected.float().mean() < 0.3  # about the capacity


def test_prefix_rank_prior_follows_the_training_logits():
    from modmoe.model.routing import quantile_sums

    cfg = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, ffn_hidden=32, max_seq_len=64,
        depth={"capacity": 0.25, "causal_router": "prefix_rank"}, moe={"enabled": False},
    )  # fmt: skip
    model = MoDETransformer(cfg).train()
    router = model.layers[1].router
    assert router.prior_quantiles is not None and float(router.prior_updates) == 0
    tokens = torch.randint(0, 64, (4, 32))
    out = model(tokens, tokens)
    sel = out.layers[1].depth
    assert float(router.prior_updates) == 0  # the forward only reports; the optimizer step moves it
    q = router.prior_quantiles.numel()
    rows = sel.logits.sort(-1).values[:, torch.linspace(0, 31, q).round().long()]  # (4, Q) per-row quantiles
    assert torch.allclose(sel.quantile_sums, torch.cat([rows.sum(0), torch.tensor([4.0])]))
    # Any split of the same rows (ranks, micro-batches) adds up to the same sums.
    halves = quantile_sums(sel.logits[:1], None, q) + quantile_sums(sel.logits[1:], None, q)
    assert torch.allclose(halves, sel.quantile_sums)
    router.observe(sel.quantile_sums)
    assert float(router.prior_updates) == 1  # the first step sets the prior: the mean row quantiles
    assert torch.allclose(router.prior_quantiles, rows.mean(0))
    before = router.prior_quantiles.clone()
    router.observe(torch.full_like(sel.quantile_sums, float("nan")))
    assert torch.equal(router.prior_quantiles, before) and float(router.prior_updates) == 1
    assert model.eval()(tokens).layers[1].depth.quantile_sums is None  # evaluation reports nothing


def test_quantile_sums_rank_only_real_tokens():
    from modmoe.model.routing import quantile_sums

    logits = torch.tensor([[3.0, 1.0, 2.0, 9.0], [5.0, 7.0, 6.0, 4.0], [8.0, 8.0, 8.0, 8.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    sums = quantile_sums(logits, valid, 3)
    # row 0: 1, 2, 3 (the padded 9 is left out); row 1: 4, 5.5 -> index round(1.5) = 2 -> 6, 7; row 2: no real tokens
    assert torch.equal(sums, torch.tensor([1.0 + 4.0, 2.0 + 6.0, 3.0 + 7.0, 2.0]))
    logits[1, 0] = float("nan")  # a non-finite step shows in the sums: the prior then skips it
    assert torch.isnan(quantile_sums(logits, valid, 3)[:-1]).any()


def test_prefix_rank_needs_its_prior():
    cfg = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, ffn_hidden=32, max_seq_len=64,
        depth={"capacity": 0.25, "causal_router": "prefix_rank"}, moe={"enabled": False},
    )  # fmt: skip
    with pytest.raises(ValueError, match="trained without its logit prior"):
        MoDETransformer(
            ModelConfig(**{**cfg.model_dump(), "depth": {"capacity": 0.25, "causal_router": "aux_loss"}})
        ).causal_rule("prefix_rank")


def test_unit_router_weight_is_one_with_the_sigmoids_gradient():
    from modmoe.model.routing import router_weight

    r = torch.tensor([-30.0, -1.0, 0.0, 2.0, 30.0], requires_grad=True)
    w = router_weight(r, "unit")
    assert torch.equal(w.detach(), torch.ones(5))  # a pretrained block's update is kept exactly
    w.sum().backward()
    s = r.detach().sigmoid()
    assert torch.allclose(r.grad, s * (1 - s))  # fades for confident logits, unlike the raw logit's 1
    assert r.grad[0] < 1e-10 and r.grad[-1] < 1e-10
