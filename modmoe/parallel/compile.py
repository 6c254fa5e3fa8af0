"""The compile step: ``torch.compile`` of the native model, applied from outside like the others.

Order, as in torchtitan: tensor parallel, expert parallel, activation checkpointing, compile,
then FSDP2/DDP. Compiling ``forward`` in place (not wrapping the module) keeps every parameter
name, so checkpoints stay layout independent, and leaves FSDP2's and DDP's hooks outside the
graph, where they run eagerly as those wrappers expect.

Only top-k routing is compiled: its shapes are static (k = ceil(c*T) tokens per routed block, N*top_k
dispatched expert rows) and nothing reads a device value on the host. Causal routing, used by
evaluation, picks a data-dependent number of tokens per block; those calls run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from modmoe.model.transformer import MoDETransformer

CompileMode = Literal["off", "blocks", "model"]
CompileBackend = Literal["inductor", "aot_eager"]


def _block_routing(args: tuple, kwargs: dict) -> str:
    # TransformerBlock.forward(x, cos, sin, k, mode)
    return args[4] if len(args) > 4 else kwargs.get("mode", "topk")


def _model_routing(args: tuple, kwargs: dict) -> str:
    # MoDETransformer.forward(tokens, targets=None, routing="topk", positions=None)
    return args[2] if len(args) > 2 else kwargs.get("routing", "topk")


def _compile_topk(module: nn.Module, routing_of: Callable[[tuple, dict], str], **options) -> None:
    """Replaces ``module.forward`` by one that runs the compiled forward for top-k routing and
    the eager one (the same function) otherwise."""
    eager = module.forward
    compiled = torch.compile(eager, **options)

    def forward(*args, **kwargs):
        return (compiled if routing_of(args, kwargs) == "topk" else eager)(*args, **kwargs)

    module.forward = forward


def compile_options(backend: CompileBackend, cuda_graphs: bool, fullgraph: bool) -> dict:
    """``torch.compile`` keyword arguments: static shapes (``dynamic=False``: k and the row
    counts are fixed per sequence length); ``fullgraph`` makes a graph break an error instead
    of a silent slow path. Inductor options: CUDA graphs (what mode ``reduce-overhead`` sets)
    when asked for, and no in-place buffer reuse: with it, torch 2.13's inductor generated
    code for the whole MoDE model that reads a buffer after freeing it (``UnboundLocalError:
    cannot access local variable 'buf105'``, CPU, fp32, measured); per-block graphs were not
    affected. Without in-place reuse the same graph runs and matches eager."""
    options: dict = {"backend": backend, "fullgraph": fullgraph, "dynamic": False}
    if backend == "inductor":
        options["options"] = {"inplace_buffers": False, "triton.cudagraphs": cuda_graphs}
    return options


def apply_compile(
    model: MoDETransformer,
    mode: CompileMode,
    backend: CompileBackend = "inductor",
    cuda_graphs: bool = False,
    fullgraph: bool = True,
) -> int:
    """Compiles each block (``blocks``) or the whole forward (``model``); returns how many
    forwards were compiled. With CUDA graphs, each model call starts a new graph step, so
    outputs of the previous micro-batch may be overwritten only after its backward ran."""
    if mode == "off":
        return 0
    options = compile_options(backend, cuda_graphs, fullgraph)
    if cuda_graphs:
        model.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
    if mode == "model":
        _compile_topk(model, _model_routing, **options)
        return 1
    for block in model.layers:
        _compile_topk(block, _block_routing, **options)
    return len(model.layers)
