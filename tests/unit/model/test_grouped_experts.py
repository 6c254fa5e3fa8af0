"""Grouped-GEMM experts equal the per-expert loop (forward and gradients), and the kernel
choice follows the grouped op's size rule."""

from __future__ import annotations

import pytest
import torch

from modmoe.model.grouped_gemm import grouped_mm
from modmoe.model.moe import GroupedExperts, MoE
from modmoe.model_config import ModelConfig


def experts(kernel: str, E=4, D=16, F=24, seed=0) -> GroupedExperts:
    torch.manual_seed(seed)
    module = GroupedExperts(E, D, F)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    module.kernel = kernel
    return module


def run(module, xs, counts, upstream):
    xs = xs.clone().requires_grad_()
    out = module(xs, counts)
    (out * upstream).sum().backward()
    return out, xs.grad, [p.grad for p in (module.w1, module.w3, module.w2)]


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 0, 0], [10, 0, 0, 0], [2, 2, 0, 1]])
def test_grouped_equals_loop_forward_and_gradients(counts):
    """Including empty experts and rows past the last expert (the static-shape tail, which the
    grouped op leaves unwritten: the MoE masks it, see the layer test below)."""
    xs, upstream = torch.randn(10, 16), torch.randn(10, 16)
    counts = torch.tensor(counts)
    out_l, gx_l, gw_l = run(experts("loop"), xs, counts, upstream)
    out_g, gx_g, gw_g = run(experts("grouped"), xs, counts, upstream)
    n = int(counts.sum())
    torch.testing.assert_close(out_g[:n], out_l[:n], rtol=1e-6, atol=1e-6)
    assert (out_l[n:] == 0).all()
    torch.testing.assert_close(gx_g[:n], gx_l[:n], rtol=1e-6, atol=1e-6)
    for a, b in zip(gw_g, gw_l):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for e in (counts == 0).nonzero().flatten().tolist():  # unused experts: zero gradient, not None
        assert all(g[e].abs().sum() == 0 for g in gw_g)


def test_grouped_bf16_matches_loop_within_bf16_rounding():
    xs, counts = torch.randn(12, 16), torch.tensor([4, 4, 0, 4])
    loop, grouped = experts("loop"), experts("grouped")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = loop(xs, counts), grouped(xs, counts)
    assert b.dtype == torch.bfloat16  # the grouped op is not autocast-listed: the module casts
    ref = experts("loop")(xs, counts)
    err_loop, err_grouped = (a.float() - ref).abs().max(), (b.float() - ref).abs().max()
    assert err_grouped <= 2 * err_loop + 1e-2


def test_grouped_mm_custom_op_gradients_match_autograd_of_the_native_op():
    x, w = torch.randn(9, 8, requires_grad=True), torch.randn(3, 8, 16, requires_grad=True)
    offsets = torch.tensor([4, 4, 9], dtype=torch.int32)
    g = torch.randn(9, 16)
    (grouped_mm(x, w, offsets) * g).sum().backward()  # fp32: the custom op
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (torch._grouped_mm(x2, w2, offs=offsets) * g).sum().backward()  # the native op's own backward
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_kernel_is_chosen_once_from_the_sizes():
    assert GroupedExperts(4, 16, 24).kernel == "grouped"
    assert GroupedExperts(4, 12, 24).kernel == "loop"  # 12 fp32/bf16 elements break the 16-byte rule
    assert GroupedExperts(4, 16, 20).kernel == "loop"


def moe(kernel: str, seed=0, noop=0, **moe_cfg) -> MoE:
    cfg = ModelConfig(
        vocab_size=16,
        dim=16,
        num_layers=1,
        num_heads=2,
        max_seq_len=32,
        depth={"enabled": False},
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 16, **moe_cfg},
    )
    torch.manual_seed(seed)
    layer = MoE(cfg.to_args(), noop_experts=noop)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    layer.experts.kernel = kernel
    return layer


@pytest.mark.parametrize(
    "noop,moe_cfg,padded",
    [
        (0, {}, False),
        (0, {"capacity_factor": 0.75}, False),
        (0, {"capacity_factor": 1.0}, True),
        (3, {}, False),
        (2, {"capacity_factor": 1.25, "num_shared_experts": 1}, True),
    ],
    ids=["dropless", "capacity", "capacity-padded", "noop", "noop-capacity-shared-padded"],
)
def test_moe_layer_same_numbers_with_either_kernel(noop, moe_cfg, padded):
    x = torch.randn(2, 12, 16)
    valid = torch.rand(2, 12) > 0.3 if padded else None
    results = []
    for kernel in ("loop", "grouped"):
        layer = moe(kernel, noop=noop, **moe_cfg)
        xr = x.clone().requires_grad_()
        out, aux = layer(xr, valid)
        (out.square().sum() + aux.aux_loss).backward()
        results.append((out, xr.grad, {n: p.grad for n, p in layer.named_parameters()}, aux))
    (out_l, gx_l, gp_l, aux_l), (out_g, gx_g, gp_g, aux_g) = results
    torch.testing.assert_close(out_g, out_l, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_g, gx_l, rtol=1e-6, atol=1e-6)
    for name in gp_l:
        torch.testing.assert_close(gp_g[name], gp_l[name], rtol=1e-6, atol=1e-6, msg=name)
    assert int(aux_g.dispatched_slots) == int(aux_l.dispatched_slots)
    if "capacity_factor" in moe_cfg and not padded:
        assert int(aux_g.dropped_slots) > 0  # the case really drops


def test_unwritten_rows_never_reach_the_output_or_the_gradients():
    """The grouped GEMM leaves rows past the last offset unwritten: any bits, NaN included.
    Poisoning them with NaN must change nothing (a `0 * NaN` anywhere would show)."""
    x, valid = torch.randn(2, 12, 16), torch.rand(2, 12) > 0.3
    results = []
    for poison in (False, True):
        layer = moe("grouped", noop=2, capacity_factor=0.75)
        if poison:
            inner = layer.experts.forward

            def poisoned(xs, counts, inner=inner):
                out = inner(xs, counts)
                n = int(counts.sum())
                return torch.cat([out[:n], torch.full_like(out[n:], float("nan"))])

            layer.experts.forward = poisoned
        xr = x.clone().requires_grad_()
        out, aux = layer(xr, valid)
        (out.square().sum() + aux.aux_loss).backward()
        results.append((out, xr.grad, [p.grad for p in layer.parameters()]))
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert all(torch.equal(a, b) for a, b in zip(gp_a, gp_b))


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [10, 0, 0, 0], [1, 1, 1, 1]])
def test_groups_padded_to_aligned_starts_give_the_same_numbers(counts):
    """The CUDA path pads every group to a multiple of 8 rows on the device; forced on here."""
    xs, upstream = torch.randn(12, 16), torch.randn(12, 16)  # rows past the groups too
    counts = torch.tensor(counts)
    padded = experts("grouped")
    padded.group_align = 8
    out_p, gx_p, gw_p = run(padded, xs, counts, upstream)
    out_l, gx_l, gw_l = run(experts("loop"), xs, counts, upstream)
    n = int(counts.sum())
    torch.testing.assert_close(out_p[:n], out_l[:n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_p[:n], gx_l[:n], rtol=1e-6, atol=1e-6)
    for a, b in zip(gw_p, gw_l):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
