"""Which checkpoint tensors each native tensor is made of, for the eight supported families.

:func:`native_sources` gives, for every native parameter name (``modmoe.model``'s), a recipe:

- :class:`Whole`: the checkpoint tensor as it is (embeddings, norms, attention, dense MLPs, the
  MoE gate, shared experts);
- :class:`Experts`: a stacked ``(E, A, B)`` native tensor whose expert ``e`` is the transpose of
  a 2-D block of a checkpoint tensor (per-expert Linear weights, the fused ``gate_up_proj`` /
  ``down_proj`` of transformers 5, or, when upcycling, a dense MLP or a slice of it), times a
  scale;
- :class:`Generated`: a tensor the checkpoint does not have and the import must make the same on
  every rank (the gate of upcycled experts).

Native tensors with no recipe (the depth routers and their predictors) keep the model's own
initialisation. Every recipe reads any slice of its native tensor without building the rest, so
a rank of a sharded layout reads only its part. The same table, read backwards, names the
tensors of a stock export (:func:`stock_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modmoe.hf.families import MIXTRAL
from modmoe.model.args import ModelArgs


@dataclass(frozen=True)
class Whole:
    """The native tensor is the checkpoint tensor ``name`` (same shape)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ExpertBlock:
    """Expert ``e``'s ``(A, B)`` matrix is ``checkpoint[name][lead][rows : rows + B, cols : cols + A].T``."""

    name: str
    shape: tuple[int, ...]  # the checkpoint tensor's shape
    lead: int | None  # index into dim 0 of a stacked checkpoint tensor (transformers 5's fused experts)
    rows: int
    cols: int


@dataclass(frozen=True)
class Experts:
    """A stacked ``(E, A, B)`` native tensor built from one block per expert, times ``scale``."""

    blocks: tuple[ExpertBlock, ...]
    scale: float = 1.0


@dataclass(frozen=True)
class Generated:
    """Not in the checkpoint: ``rows`` seeded normal rows (std ``std``), each repeated ``repeat``
    times, so the tensor is the same on every rank whatever slice it reads."""

    seed: int
    std: float
    rows: int
    cols: int
    repeat: int = 1

    def full(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        base = torch.randn(self.rows, self.cols, generator=generator) * self.std
        return base.repeat_interleave(self.repeat, dim=0)  # (rows * repeat, cols)


Source = Whole | Experts | Generated


@dataclass(frozen=True)
class _Layout:
    """How a family names its MoE tensors in the checkpoint."""

    moe: str  # module of the MoE block under model.layers.N
    projections: tuple[str, str, str]  # per-expert names of (gate, up, down)


def _layout(architecture: str | None) -> _Layout:
    if architecture == MIXTRAL:
        return _Layout("block_sparse_moe", ("w1", "w3", "w2"))
    return _Layout("mlp", ("gate_proj", "up_proj", "down_proj"))


def _expert_blocks(
    prefix: str, layout: _Layout, args: ModelArgs, checkpoint: set[str] | None
) -> dict[str, tuple[ExpertBlock, ...]]:
    """Blocks of ``w1``/``w3``/``w2`` for the E experts of one MoE layer in the checkpoint: the
    per-expert layout (hub checkpoints, transformers' save_pretrained), or, when only that is
    present, the fused one of transformers 5 (``mlp.experts.gate_up_proj`` (E, 2F, D) with the
    gate first, ``down_proj`` (E, D, F))."""
    E, D, F = args.moe.num_experts, args.dim, args.moe.expert_hidden
    per_expert = f"{prefix}.{layout.moe}.experts.0.{layout.projections[0]}.weight"
    fused = f"{prefix}.mlp.experts.gate_up_proj"
    if checkpoint is not None and per_expert not in checkpoint and fused in checkpoint:
        down = f"{prefix}.mlp.experts.down_proj"
        return {
            "w1": tuple(ExpertBlock(fused, (E, 2 * F, D), e, 0, 0) for e in range(E)),
            "w3": tuple(ExpertBlock(fused, (E, 2 * F, D), e, F, 0) for e in range(E)),
            "w2": tuple(ExpertBlock(down, (E, D, F), e, 0, 0) for e in range(E)),
        }
    gate, up, down = (f"{prefix}.{layout.moe}.experts.{{e}}.{p}.weight" for p in layout.projections)
    return {
        "w1": tuple(ExpertBlock(gate.format(e=e), (F, D), None, 0, 0) for e in range(E)),
        "w3": tuple(ExpertBlock(up.format(e=e), (F, D), None, 0, 0) for e in range(E)),
        "w2": tuple(ExpertBlock(down.format(e=e), (D, F), None, 0, 0) for e in range(E)),
    }


def upcycled_blocks(prefix: str, args: ModelArgs) -> dict[str, tuple[ExpertBlock, ...]]:
    """Experts cut from a dense MLP of width ``ffn_hidden``: expert ``e`` is slice ``e % g`` of
    ``g = ffn_hidden / expert_hidden`` (g = 1: a whole copy). Experts ``c*g .. c*g+g-1`` are
    copy ``c`` of the MLP's ``g`` slices."""
    D, F, Fe = args.dim, args.ffn_hidden, args.moe.expert_hidden
    g = F // Fe
    gate, up, down = (f"{prefix}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
    E = args.moe.num_experts
    return {
        "w1": tuple(ExpertBlock(gate, (F, D), None, (e % g) * Fe, 0) for e in range(E)),
        "w3": tuple(ExpertBlock(up, (F, D), None, (e % g) * Fe, 0) for e in range(E)),
        "w2": tuple(ExpertBlock(down, (D, F), None, 0, (e % g) * Fe) for e in range(E)),
    }


def native_sources(
    args: ModelArgs,
    architecture: str | None,
    checkpoint: set[str] | None = None,
    upcycle: bool = False,
    seed: int = 0,
) -> dict[str, Source]:
    """Native parameter name -> its recipe. ``checkpoint``: the checkpoint's tensor names (picks
    the experts' layout; None: the per-expert one); ``upcycle``: the checkpoint is dense and the
    model's MoE layers are cut from its MLPs; ``seed``: of the generated gates."""
    D, V = args.dim, args.vocab_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    layout = _layout(architecture)
    out: dict[str, Source] = {"tok_embeddings.weight": Whole("model.embed_tokens.weight", (V, D))}
    out["norm.weight"] = Whole("model.norm.weight", (D,))
    if not args.tie_embeddings:
        out["output.weight"] = Whole("lm_head.weight", (V, D))
    for i in range(args.num_layers):
        hf, me = f"model.layers.{i}", f"layers.{i}"
        out[f"{me}.attn_norm.weight"] = Whole(f"{hf}.input_layernorm.weight", (D,))
        out[f"{me}.mlp_norm.weight"] = Whole(f"{hf}.post_attention_layernorm.weight", (D,))
        shapes = {"q": ((q, D), q), "k": ((kv, D), kv), "v": ((kv, D), kv), "o": ((D, q), D)}
        for mine, theirs in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")):
            weight, bias = shapes[theirs]
            out[f"{me}.attn.{mine}.weight"] = Whole(f"{hf}.self_attn.{theirs}_proj.weight", weight)
            if args.attention_bias == "all" or (args.attention_bias == "qkv" and theirs != "o"):
                out[f"{me}.attn.{mine}.bias"] = Whole(f"{hf}.self_attn.{theirs}_proj.bias", (bias,))
        if args.qk_norm != "none":
            widths = (args.head_dim, args.head_dim) if args.qk_norm == "head" else (q, kv)
            out[f"{me}.attn.q_norm.weight"] = Whole(f"{hf}.self_attn.q_norm.weight", (widths[0],))
            out[f"{me}.attn.k_norm.weight"] = Whole(f"{hf}.self_attn.k_norm.weight", (widths[1],))
        out.update(_mlp_sources(args, i, layout, checkpoint, upcycle, seed))
    return out


def _mlp_sources(
    args: ModelArgs, i: int, layout: _Layout, checkpoint: set[str] | None, upcycle: bool, seed: int
) -> dict[str, Source]:
    hf, me = f"model.layers.{i}", f"layers.{i}.mlp"
    D, F = args.dim, args.ffn_hidden
    if not args.moe.is_moe(i):
        return {
            f"{me}.w1.weight": Whole(f"{hf}.mlp.gate_proj.weight", (F, D)),
            f"{me}.w3.weight": Whole(f"{hf}.mlp.up_proj.weight", (F, D)),
            f"{me}.w2.weight": Whole(f"{hf}.mlp.down_proj.weight", (D, F)),
        }
    m = args.moe
    out: dict[str, Source] = {}
    if upcycle:
        g = F // m.expert_hidden
        blocks = upcycled_blocks(hf, args)
        # Copy c's g slices share one gate row, so top-k takes whole copies; the slices' outputs
        # add up to the MLP's once w2 is scaled by g (each slice gets 1/g of the copy's weight).
        out[f"{me}.gate.weight"] = Generated(seed * 100_003 + i, args.init_std, m.num_experts // g, D, g)
        scales = {"w1": 1.0, "w3": 1.0, "w2": float(g)}
    else:
        if checkpoint is not None and f"{hf}.{layout.moe}.gate.weight" not in checkpoint:
            layout = _Layout("mlp", layout.projections)  # transformers 5's in-memory names (Mixtral)
        blocks = _expert_blocks(hf, layout, args, checkpoint)
        out[f"{me}.gate.weight"] = Whole(f"{hf}.{layout.moe}.gate.weight", (m.num_experts, D))
        scales = {"w1": 1.0, "w3": 1.0, "w2": 1.0}
    for name in ("w1", "w3", "w2"):
        out[f"{me}.experts.{name}"] = Experts(blocks[name], scales[name])
    if m.shared_hidden:
        S = m.shared_hidden
        out[f"{me}.shared.w1.weight"] = Whole(f"{hf}.mlp.shared_expert.gate_proj.weight", (S, D))
        out[f"{me}.shared.w3.weight"] = Whole(f"{hf}.mlp.shared_expert.up_proj.weight", (S, D))
        out[f"{me}.shared.w2.weight"] = Whole(f"{hf}.mlp.shared_expert.down_proj.weight", (D, S))
        if m.shared_expert_gate:
            out[f"{me}.shared_gate.weight"] = Whole(f"{hf}.mlp.shared_expert_gate.weight", (1, D))
    return out


def expected_tensors(sources: dict[str, Source]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> the shape the model needs it to have."""
    out: dict[str, tuple[int, ...]] = {}
    for source in sources.values():
        if isinstance(source, Whole):
            out[source.name] = source.shape
        elif isinstance(source, Experts):
            out.update({b.name: b.shape for b in source.blocks})
    return out


def stock_tensors(name: str, tensor: torch.Tensor, source: Source) -> dict[str, torch.Tensor]:
    """A native tensor as the checkpoint tensors of a stock export (per-expert layout)."""
    if isinstance(source, Whole):
        return {source.name: tensor}
    if isinstance(source, Experts) and source.scale == 1.0 and all(b.lead is None for b in source.blocks):
        return {b.name: tensor[e].t().contiguous() for e, b in enumerate(source.blocks)}
    raise ValueError(f"{name}: has no stock checkpoint tensor")
