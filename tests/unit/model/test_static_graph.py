"""No host synchronisation in the top-k training step: the whole MoDE model compiles into one
graph, forward and backward, with ``torch.compile(fullgraph=True)`` (a graph break is an error),
and neither graph reads a device value on the host.

The second half matters since torch 2.13: under ``fullgraph=True`` dynamo no longer breaks on
``.item()`` / ``.tolist()`` / ``int(tensor)`` but captures them (``capture_scalar_outputs`` is
switched on for full graphs) as ``aten._local_scalar_dense`` nodes and unbacked sizes, which are
host syncs at run time. So the backend below looks into the forward and backward graphs that
AOTAutograd hands it and fails on any such node or data-dependent size; the control case
proves it bites. It then runs the graphs with the eager kernels (like ``aot_eager``), so each
variant compiles in seconds instead of the 15-40 s inductor takes on this CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from modmoe.model import MoDETransformer
from modmoe.model.moe import GroupedExperts
from modmoe.model_config import ModelConfig
from modmoe.parallel.compile import apply_compile


def tiny(**parts) -> ModelConfig:
    depth, moe = parts.pop("depth", {}), parts.pop("moe", {})
    return ModelConfig(
        vocab_size=64,
        dim=16,
        num_layers=2,
        num_heads=2,
        ffn_hidden=32,
        max_seq_len=32,
        depth={"capacity": 0.25, "predictor": True, **depth},
        moe={"num_experts": 4, "top_k": 2, "expert_hidden": 16, **moe},
    )


VARIANTS = {
    "staged-dropless": tiny(),
    "staged-capacity": tiny(moe={"capacity_factor": 1.0, "bias_update_rate": 0.01}),
    "integrated-dropless": tiny(depth={"variant": "integrated", "noop_experts": 2}),
    "integrated-capacity-shared": tiny(
        depth={"variant": "integrated", "noop_experts": 2}, moe={"capacity_factor": 1.25, "num_shared_experts": 1}
    ),
}


aten = torch.ops.aten
HOST_READS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.bincount, aten.unique_consecutive}


def host_sync_checker():
    """(backend, found): an AOTAutograd backend recording every node of the forward and backward
    graphs that needs a device value on the host (a read-back op, or an output whose size is
    data dependent)."""
    found: list[str] = []

    def inspect(gm: torch.fx.GraphModule, _inputs):
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if getattr(node.target, "overloadpacket", None) in HOST_READS:
                found.append(f"{node.target} ({node.name})")
            elif free_unbacked_symbols(node.meta.get("val")):
                found.append(f"data-dependent size from {node.target} ({node.name})")
        return gm

    return aot_autograd(fw_compiler=inspect, bw_compiler=inspect), found


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def step(model, tokens) -> torch.Tensor:
    out = model(tokens, tokens)
    (out.loss + out.aux_total).backward()
    return out.loss.detach()


@pytest.mark.parametrize("name", VARIANTS)
def test_topk_training_step_compiles_as_one_graph(name):
    torch.manual_seed(0)
    model = MoDETransformer(VARIANTS[name]).train()
    tokens = torch.randint(0, 64, (2, 16))
    backend, found = host_sync_checker()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    loss = step(compiled, tokens)
    assert not found, found
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert torch.equal(loss, step(model, tokens))
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-6, atol=1e-7, msg=n)


def test_the_check_catches_a_host_sync():
    """Control: the per-expert loop reads its counts on the host (``tolist``): caught."""
    model = MoDETransformer(VARIANTS["staged-dropless"]).train()
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.kernel = "loop"
    backend, found = host_sync_checker()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    try:
        step(compiled, torch.randint(0, 64, (2, 16)))
    except torch._dynamo.exc.Unsupported:
        return  # refused at trace time: also a failure of the check
    assert any("_local_scalar_dense" in f for f in found), found


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compile_step_leaves_causal_routing_eager(mode):
    """The compile step compiles top-k calls only; causal routing (evaluation) picks a
    data-dependent number of tokens and must still run, uncompiled, under fullgraph."""
    torch.manual_seed(0)
    model = MoDETransformer(VARIANTS["staged-dropless"]).eval()
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref = {r: model(tokens, tokens, routing=r).loss for r in ("topk", "causal")}
        names = sorted(n for n, _ in model.named_parameters())
        assert apply_compile(model, mode, backend="aot_eager") == (1 if mode == "model" else 2)
        assert sorted(n for n, _ in model.named_parameters()) == names  # names unchanged: checkpoints too
        for routing, loss in ref.items():
            assert torch.equal(model(tokens, tokens, routing=routing).loss, loss)


def test_bf16_autocast_step_also_compiles_as_one_graph():
    """The GPU path: autocast bf16, where the experts cast to bf16 and call the native grouped op."""
    torch.manual_seed(0)
    model = MoDETransformer(VARIANTS["staged-capacity"]).train()
    backend, found = host_sync_checker()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(*(torch.randint(0, 64, (2, 16)),) * 2)
    (out.loss + out.aux_total).backward()
    assert not found, found
    assert all(p.grad is not None for p in model.layers[1].mlp.experts.parameters())


def test_group_padding_of_the_cuda_path_compiles_as_one_graph():
    """Groups padded to 8-row starts (what the grouped GEMM does on CUDA) stay static too."""
    torch.manual_seed(0)
    model = MoDETransformer(VARIANTS["integrated-capacity-shared"]).train()
    for m in model.modules():
        if isinstance(m, GroupedExperts):
            m.group_align = 8
    tokens = torch.randint(0, 64, (2, 16))
    backend, found = host_sync_checker()
    loss = step(torch.compile(model, fullgraph=True, backend=backend, dynamic=False), tokens)
    assert not found, found
    model.zero_grad()
    assert torch.equal(loss, step(model, tokens))
