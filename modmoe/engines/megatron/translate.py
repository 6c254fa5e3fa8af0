"""modmoe's config -> Megatron-Core: ``TransformerConfig`` kwargs, ``GPTModel`` kwargs, layout.

Plain Python (no Megatron import), so every check runs anywhere; :func:`build_transformer_config`
then turns the kwargs into the real dataclass. Each combination that one side cannot express
the way the native model (the specification) means it is rejected with a one-line
:class:`~modmoe.config_base.ConfigError` naming the field, rather than trained differently:

- integrated MoDE (no-op experts inside the MoE router): Megatron's router has no identity experts;
- expert capacity (token dropping): Megatron drops per rank, in ``[s, b]`` token order or by
  probability, the native model in ``(B, T)`` order over the whole micro-batch;
- top-1 routing with renormalized weights (native weight 1.0): Megatron needs pre-softmax
  (weight = probability) for top-1 softmax and never renormalizes a single sigmoid score;
- the expert bias with softmax scores: Megatron applies it with sigmoid scores only;
- the expert bias together with a balance loss: Megatron counts the loss's loads without the
  bias (opt in with ``megatron.aux_loss_with_expert_bias: megatron``);
- context parallelism with depth routing, ``unrouted`` activation checkpointing, FSDP2, and
  layouts Megatron itself refuses (sp without tp, MoE + tp without sp, DeepSpeed with pp, ...);
- of the pretrained families' features: q/k RMSNorm over the whole projection (OLMoE; Megatron's
  is per head), and llama3 RoPE scaling whose constants other than the factor differ from the
  ones Megatron fixes (:data:`MEGATRON_LLAMA3_ROPE`).

Mapped: q/k/v biases (``add_qkv_bias``), the output projection's bias (Llama; a biased
``linear_proj`` in the layer spec, MLPs stay bias-free), per-head q/k RMSNorm (``qk_layernorm``),
``head_dim`` (``kv_channels``), llama3 and linear RoPE scaling (``GPTModel``'s ``rope_scaling`` /
``seq_len_interpolation_factor``), the shared-expert gate (``moe_shared_expert_gate``),
``normalize_top_k`` (``moe_router_pre_softmax``) and the router's score function.

On a CPU (``device="cpu"``: tests, debugging, small runs) the parts Megatron builds for GPUs only
are chosen or refused here: ``megatron.distributed_optimizer: null`` picks the replicated
optimizer, ``megatron.dispatcher: null`` allgather where alltoall would need an uneven all-gather
(expert tensor parallelism); an explicit ``true``, ``alltoall`` there, ``trainer.precision: bf16``
(Megatron's mixed-precision optimizer), Transformer Engine, FP8 and tied embeddings with pp > 1
are refused in one line naming the value that works.
What the CPU run substitutes is listed in :attr:`MegatronPlan.cpu_choices` (the backend's
describe line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from modmoe.config_base import ConfigError, field_error
from modmoe.engines.megatron.config import MegatronConfig
from modmoe.model.args import entering_tokens
from modmoe.model_config import ModelConfig
from modmoe.parallel.config import ParallelConfig

Precision = Literal["auto", "fp32", "bf16"]
Device = Literal["cuda", "cpu"]


@dataclass(frozen=True)
class DepthLayerParams:
    """What a routed layer needs to know about depth routing (a ``ModuleSpec`` param)."""

    capacity: float
    router_weight: Literal["raw", "sigmoid", "unit"]
    bce_loss_coef: float
    predictor_hidden: int | None  # None: no stop-gradient predictor
    causal_router: Literal["aux_loss", "predictor", "prefix_rank"]
    prefix_prior_tokens: float = 32.0

    def tokens(self, seq_len: int) -> int:
        """k = ceil(capacity * seq_len), the native model's rule."""
        return entering_tokens(self.capacity, seq_len)


@dataclass(frozen=True)
class Layout:
    """Process layout; world = tp * pp * cp * dp, and experts use ep * etp ranks per pp stage."""

    world: int
    tp: int
    pp: int
    cp: int
    dp: int
    ep: int
    etp: int

    def parallel_state_kwargs(self) -> dict[str, int]:
        """Arguments of ``megatron.core.parallel_state.initialize_model_parallel``."""
        return {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "context_parallel_size": self.cp,
            "expert_model_parallel_size": self.ep,
            "expert_tensor_parallel_size": self.etp,
        }


@dataclass(frozen=True)
class MegatronPlan:
    """Everything the builder and the trainer need, decided once from the configs."""

    transformer: dict[str, Any]  # kwargs of megatron.core TransformerConfig
    gpt: dict[str, Any]  # kwargs of GPTModel besides config and layer spec
    layout: Layout
    routed_layers: tuple[int, ...]  # 0-based indices of depth-routed layers
    depth: DepthLayerParams | None
    seq_len: int
    use_te: bool
    optimizer: Literal["distributed", "replicated", "deepspeed"]
    zero_stage: int | None  # DeepSpeed ZeRO stage (deepspeed only)
    device: Device = "cuda"
    cpu_choices: tuple[str, ...] = ()  # what a CPU run uses instead of a GPU-only part, for the describe line
    output_projection_bias: bool = False  # attention's linear_proj has a bias (Llama's attention_bias), MLPs none

    @property
    def dispatcher(self) -> str | None:
        """Megatron's token dispatcher (None without experts)."""
        return self.transformer.get("moe_token_dispatcher_type")


def resolve_precision(precision: Precision) -> Literal["fp32", "bf16"]:
    """Megatron runs on GPUs only, so ``auto`` means bf16."""
    return "fp32" if precision == "fp32" else "bf16"


# Megatron-Core 0.16's llama3 RoPE scaling takes only the factor (``GPTModel(rope_scaling=True,
# rope_scaling_factor=...)``); ``RotaryEmbedding._apply_scaling`` fixes the other constants at
# these values (Llama-3.1's and 3.2's).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _check_architecture(m: ModelConfig) -> None:
    """The pretrained families' features that Megatron cannot express the native model's way."""
    if m.qk_norm == "full":
        raise field_error(
            "model.qk_norm",
            "full",
            "is not supported by the megatron engine: Megatron normalizes queries and keys per head "
            "('head', Qwen3), not over the whole projection (OLMoE); use engine: native",
        )
    scaling = m.rope_scaling
    if scaling is not None and scaling.rope_type == "llama3":
        for key, fixed in MEGATRON_LLAMA3_ROPE.items():
            value = getattr(scaling, key)
            if value != fixed:
                raise field_error(
                    f"model.rope_scaling.{key}",
                    value,
                    f"Megatron-Core's llama3 RoPE scaling fixes it at {fixed} (it takes the factor only); "
                    "use engine: native",
                )


def _rope_kwargs(m: ModelConfig) -> dict[str, Any]:
    """``GPTModel`` kwargs of the RoPE scaling: llama3 through Megatron's own, linear as its position
    interpolation (positions / factor: every frequency / factor)."""
    scaling = m.rope_scaling
    if scaling is None:
        return {}
    if scaling.rope_type == "llama3":
        return {"rope_scaling": True, "rope_scaling_factor": scaling.factor}
    return {"seq_len_interpolation_factor": scaling.factor}


def _check_model(m: ModelConfig, g: MegatronConfig) -> None:
    d, e = m.depth, m.moe
    _check_architecture(m)
    if d.enabled and d.bce_detach_input:
        raise field_error(
            "model.depth.bce_detach_input", True, "must be false with the megatron engine (native engine only)"
        )
    if d.enabled and d.variant == "integrated":
        raise field_error(
            "model.depth.variant",
            "integrated",
            "the megatron engine supports 'staged' only (Megatron's MoE router has no no-op experts)",
        )
    if not e.enabled:
        return
    if e.capacity_factor is not None:
        raise field_error(
            "model.moe.capacity_factor",
            e.capacity_factor,
            "must be null (dropless) with the megatron engine: Megatron drops tokens per rank in [s, b] "
            "order or by probability, not as the native model does",
        )
    if e.top_k == 1 and e.score == "sigmoid":
        raise field_error(
            "model.moe.top_k",
            1,
            "must be >= 2 with sigmoid scores on the megatron engine "
            "(native renormalizes a single weight to 1.0, Megatron keeps sigmoid(logit))",
        )
    if e.top_k == 1 and e.normalize_top_k:
        raise field_error(
            "model.moe.normalize_top_k",
            True,
            "must be false with top_k = 1 on the megatron engine "
            "(Megatron weighs a top-1 token by its softmax probability)",
        )
    if e.bias_update_rate > 0 and e.score != "sigmoid":
        raise field_error(
            "model.moe.bias_update_rate",
            e.bias_update_rate,
            "needs model.moe.score = 'sigmoid' on the megatron engine (Megatron applies the expert bias "
            "to sigmoid scores only); or set it to 0",
        )
    balance = e.aux_loss_coef > 0 or e.seq_aux_loss_coef > 0
    if e.bias_update_rate > 0 and balance and g.aux_loss_with_expert_bias == "reject":
        raise field_error(
            "model.moe.bias_update_rate",
            e.bias_update_rate,
            "with a balance loss, Megatron counts expert loads without the bias (the native model with "
            "it): set megatron.aux_loss_with_expert_bias = 'megatron' to accept, or drop one of the two",
        )


def _layout(m: ModelConfig, p: ParallelConfig, g: MegatronConfig, world: int) -> Layout:
    model_ranks = p.tp * g.pp * g.cp
    if world < 1 or world % model_ranks:
        raise field_error(
            "parallel.tp", p.tp, f"tp * megatron.pp * megatron.cp = {model_ranks} must divide the world size ({world})"
        )
    dp = world // model_ranks
    if p.dp not in (-1, dp):
        raise field_error("parallel.dp", p.dp, f"must be -1 or {dp} (world {world} / (tp * pp * cp) {model_ranks})")
    etp = g.etp if g.etp is not None else p.tp
    if m.moe.enabled:
        if m.moe.num_experts % p.ep:
            raise field_error("parallel.ep", p.ep, f"must divide model.moe.num_experts ({m.moe.num_experts})")
        expert_ranks = p.ep * etp * g.pp
        if world % expert_ranks:
            raise field_error(
                "parallel.ep", p.ep, f"ep * etp * pp = {expert_ranks} must divide the world size ({world})"
            )
    elif p.ep > 1:
        raise field_error("parallel.ep", p.ep, "must be 1 without experts (model.moe.enabled = false)")
    return Layout(world=world, tp=p.tp, pp=g.pp, cp=g.cp, dp=dp, ep=p.ep, etp=etp)


def _check_layout(m: ModelConfig, p: ParallelConfig, g: MegatronConfig, lay: Layout, seq_len: int) -> None:
    if m.num_heads % lay.tp:
        raise field_error("parallel.tp", lay.tp, f"must divide model.num_heads ({m.num_heads})")
    kv_heads = m.to_args().num_kv_heads
    if kv_heads % lay.tp and lay.tp % kv_heads:
        raise field_error("parallel.tp", lay.tp, f"must divide, or be a multiple of, the KV heads ({kv_heads})")
    if m.ffn_hidden % lay.tp:
        raise field_error("parallel.tp", lay.tp, f"must divide model.ffn_hidden ({m.ffn_hidden})")
    if m.vocab_size % lay.tp:
        raise field_error(
            "parallel.tp", lay.tp, f"must divide model.vocab_size ({m.vocab_size}) (vocab-parallel embedding)"
        )
    if m.moe.enabled and m.moe.expert_hidden % lay.etp:
        raise field_error("megatron.etp", lay.etp, f"must divide model.moe.expert_hidden ({m.moe.expert_hidden})")
    if g.sequence_parallel and lay.tp == 1:
        raise field_error("megatron.sequence_parallel", True, "needs parallel.tp > 1")
    if m.moe.enabled and lay.tp > 1 and not g.sequence_parallel:
        raise field_error(
            "megatron.sequence_parallel",
            False,
            "must be true when parallel.tp > 1 with experts (Megatron's MoE layers require it)",
        )
    if m.num_layers % lay.pp:
        raise field_error("megatron.pp", lay.pp, f"must divide model.num_layers ({m.num_layers})")
    if lay.cp > 1:
        if m.depth.enabled:
            raise field_error("megatron.cp", lay.cp, "must be 1 with depth routing (model.depth.enabled)")
        if seq_len % (2 * lay.cp):
            raise field_error("megatron.cp", lay.cp, f"2 * cp must divide data.seq_len ({seq_len})")
    if seq_len % lay.tp and g.sequence_parallel:
        raise field_error(
            "data.seq_len", seq_len, f"must be a multiple of parallel.tp ({lay.tp}) under sequence parallelism"
        )
    if m.depth.enabled and g.sequence_parallel:
        k = m.to_args().entering_tokens(seq_len)
        if k % lay.tp:
            raise field_error(
                "model.depth.capacity",
                m.depth.capacity,
                f"ceil(capacity * seq_len) = {k} tokens must be a multiple of parallel.tp ({lay.tp}) "
                "under sequence parallelism (the routed tokens are split evenly over TP ranks)",
            )
    if p.activation_checkpointing == "unrouted":
        raise field_error(
            "parallel.activation_checkpointing",
            "unrouted",
            "the megatron engine recomputes by layer count: use 'none' or 'all'",
        )


def _optimizer(p: ParallelConfig, g: MegatronConfig, lay: Layout, cpu: bool) -> tuple[str, int | None]:
    if p.dp_backend == "fsdp2":
        raise field_error(
            "parallel.dp_backend",
            "fsdp2",
            "the megatron engine supports 'ddp' (+ megatron.distributed_optimizer) or 'deepspeed'",
        )
    if p.dp_backend == "deepspeed":
        if g.distributed_optimizer:
            raise field_error(
                "megatron.distributed_optimizer",
                True,
                "must be null/false with parallel.dp_backend = 'deepspeed' (DeepSpeed shards the state)",
            )
        if lay.pp > 1:
            raise field_error(
                "parallel.dp_backend",
                "deepspeed",
                "needs megatron.pp = 1 (use the distributed optimizer with pipelines)",
            )
        if p.zero_stage not in (1, 2):
            raise field_error(
                "parallel.zero_stage", p.zero_stage, "must be 1 or 2 with DeepSpeed on the megatron engine"
            )
        if lay.ep > 1:
            raise field_error(
                "parallel.ep",
                lay.ep,
                "must be 1 with parallel.dp_backend = 'deepspeed' (DeepSpeed cannot "
                "reduce Megatron expert gradients over the expert-data-parallel group)",
            )
        if g.sequence_parallel:
            raise field_error(
                "megatron.sequence_parallel",
                True,
                "must be false with parallel.dp_backend = 'deepspeed' "
                "(DeepSpeed does not all-reduce the sequence-parallel norm gradients over TP)",
            )
        return "deepspeed", p.zero_stage
    if cpu and g.distributed_optimizer:
        raise field_error(
            "megatron.distributed_optimizer",
            True,
            "Megatron's distributed optimizer runs on CUDA devices only (it checks torch.cuda tensor types): "
            "use null (picks the replicated optimizer on CPU) or false",
        )
    distributed = g.distributed_optimizer if g.distributed_optimizer is not None else not cpu
    return ("distributed" if distributed else "replicated"), None


def _check_cpu(m: ModelConfig, g: MegatronConfig, lay: Layout, precision: str) -> None:
    """What Megatron builds for CUDA devices only, refused on a CPU with the value that works."""
    if m.tie_embeddings and lay.pp > 1:
        raise field_error(
            "model.tie_embeddings",
            True,
            "with megatron.pp > 1 Megatron copies the embedding to the last stage through CUDA "
            "(a CUDA device only): use false, or megatron.pp = 1, on CPU",
        )
    if g.transformer_impl == "transformer_engine":
        raise field_error(
            "megatron.transformer_impl", "transformer_engine", "needs a CUDA device: use 'auto' or 'local' on CPU"
        )
    if g.fp8 != "none":
        raise field_error("megatron.fp8", g.fp8, "needs a CUDA device with Transformer Engine: use 'none' on CPU")
    if precision == "bf16":
        raise field_error(
            "trainer.precision",
            "bf16",
            "Megatron's mixed-precision optimizer runs on CUDA devices only: use 'auto' or 'fp32' on CPU",
        )


def _dispatcher(g: MegatronConfig, lay: Layout, cpu: bool, moe: bool) -> str:
    """The token dispatcher: ``megatron.dispatcher``; when null, alltoall, except allgather on a CPU
    with expert tensor parallelism (alltoall all-gathers uneven sizes there, which gloo cannot)."""
    if cpu and moe and lay.etp > 1:
        if g.dispatcher == "alltoall":
            raise field_error(
                "megatron.dispatcher",
                "alltoall",
                f"on CPU with expert tensor parallelism (megatron.etp = {lay.etp}) it all-gathers uneven token "
                "counts, which gloo cannot: use null (picks allgather) or 'allgather', or megatron.etp = 1",
            )
        return "allgather"
    return g.dispatcher or "alltoall"


def _check_engine(g: MegatronConfig, precision: str, te_available: bool, moe: bool, dispatcher: str) -> bool:
    """Returns whether Transformer Engine layers are used."""
    if g.transformer_impl == "transformer_engine" and not te_available:
        raise field_error(
            "megatron.transformer_impl",
            "transformer_engine",
            "Transformer Engine is not installed (use 'auto' or 'local')",
        )
    use_te = g.transformer_impl == "transformer_engine" or (g.transformer_impl == "auto" and te_available)
    if g.fp8 != "none":
        if not use_te:
            raise field_error("megatron.fp8", g.fp8, "needs Transformer Engine layers (megatron.transformer_impl)")
        if precision != "bf16":
            raise field_error("megatron.fp8", g.fp8, "needs trainer.precision = 'bf16'")
    if g.fp8 != "none" and moe and dispatcher == "allgather":
        raise field_error(
            "megatron.dispatcher",
            "allgather",
            "FP8 experts need 'alltoall' (Megatron pads each expert's tokens to the FP8 tile only there)",
        )
    if g.grouped_gemm and not use_te:
        raise field_error("megatron.grouped_gemm", True, "needs Transformer Engine layers (TEGroupedMLP)")
    if g.cp > 1 and not use_te:
        raise field_error(
            "megatron.cp",
            g.cp,
            "needs Transformer Engine attention (Megatron's local attention has no context "
            "parallelism): use 1, or megatron.transformer_impl 'auto'/'transformer_engine' where TE is installed",
        )
    return use_te


def _cpu_choices(g: MegatronConfig, optimizer: str, dispatcher: str | None, clip: bool) -> tuple[str, ...]:
    """What a CPU run uses in place of the GPU paths (named in the backend's describe line)."""
    out = []
    if optimizer == "replicated" and g.distributed_optimizer is None:
        out.append("replicated optimizer (the distributed one is CUDA-only)")
    if optimizer != "deepspeed" and g.overlap_grad_reduce:
        out.append("synchronous gradient reduction")
    if optimizer != "deepspeed" and clip:
        out.append("clipping by Megatron's norm without its CUDA type check")
    if dispatcher == "alltoall":
        out.append("alltoall dispatcher without a side stream")
    elif dispatcher == "allgather" and g.dispatcher is None:
        out.append("allgather dispatcher (alltoall over expert-TP ranks needs an uneven all-gather gloo lacks)")
    return tuple(out)


def _moe_kwargs(m: ModelConfig, g: MegatronConfig, dispatcher: str) -> dict[str, Any]:
    e = m.moe
    if not e.enabled:
        return {}
    types, coeffs = [], []
    if e.aux_loss_coef > 0:
        types.append("aux_loss" if g.aux_loss_scope == "micro_batch" else "global_aux_loss")
        coeffs.append(e.aux_loss_coef)
    if e.seq_aux_loss_coef > 0:
        types.append("seq_aux_loss")
        coeffs.append(e.seq_aux_loss_coef)
    balancing: Any = types[0] if len(types) == 1 else (types or "none")
    coeff: Any = coeffs[0] if len(coeffs) == 1 else (coeffs or 0.0)
    kw: dict[str, Any] = {
        "num_moe_experts": e.num_experts,
        "moe_layer_freq": [int(e.is_moe(i)) for i in range(m.num_layers)],
        "moe_ffn_hidden_size": e.expert_hidden,
        "moe_router_topk": e.top_k,
        "moe_router_score_function": e.score,
        # Softmax over the top-k logits equals the renormalized full softmax (native
        # normalize_top_k); pre-softmax keeps the raw probabilities.
        "moe_router_pre_softmax": e.score == "softmax" and not e.normalize_top_k,
        "moe_router_load_balancing_type": balancing,
        "moe_aux_loss_coeff": coeff,
        "moe_z_loss_coeff": e.z_loss_coef or None,
        "moe_router_enable_expert_bias": e.bias_update_rate > 0,
        "moe_router_dtype": "fp32",  # native routers compute logits in fp32
        "moe_token_dispatcher_type": dispatcher,
        "moe_grouped_gemm": g.grouped_gemm,
        "moe_expert_capacity_factor": None,
    }
    if e.bias_update_rate > 0:
        kw["moe_router_bias_update_rate"] = e.bias_update_rate
    if e.num_shared_experts:
        kw["moe_shared_expert_intermediate_size"] = m.to_args().moe.shared_hidden
        kw["moe_shared_expert_gate"] = e.shared_expert_gate  # Qwen2-MoE: sigmoid(w . x) * shared(x)
    return kw


def translate(
    model: ModelConfig,
    parallel: ParallelConfig,
    engine: MegatronConfig,
    *,
    world_size: int,
    seq_len: int,
    precision: Precision = "bf16",
    te_available: bool = False,
    device: Device = "cuda",
    grad_clip: bool = False,
) -> MegatronPlan:
    """Checks the combination and translates it; raises ConfigError (one line) if unsupported.
    ``device``: where the job runs (``cpu``: the CPU choices and refusals of the module
    docstring); ``grad_clip``: whether the optimizer clips (named among the CPU choices)."""
    if seq_len > model.max_seq_len:
        raise field_error("data.seq_len", seq_len, f"must be <= model.max_seq_len ({model.max_seq_len})")
    cpu = device == "cpu"
    prec = "fp32" if cpu and precision == "auto" else resolve_precision(precision)
    _check_model(model, engine)
    lay = _layout(model, parallel, engine, world_size)
    _check_layout(model, parallel, engine, lay, seq_len)
    if cpu:
        _check_cpu(model, engine, lay, prec)
    optimizer, zero_stage = _optimizer(parallel, engine, lay, cpu)
    dispatcher = _dispatcher(engine, lay, cpu, model.moe.enabled)
    use_te = _check_engine(engine, prec, te_available and not cpu, model.moe.enabled, dispatcher)

    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    tc: dict[str, Any] = {
        "num_layers": model.num_layers,
        "hidden_size": model.dim,
        "num_attention_heads": model.num_heads,
        "num_query_groups": model.to_args().num_kv_heads,
        "kv_channels": model.to_args().head_dim,
        "ffn_hidden_size": model.ffn_hidden,
        "normalization": "RMSNorm",
        "layernorm_epsilon": model.norm_eps,
        "gated_linear_unit": True,  # SwiGLU: fc1 packs [gate; up]
        "activation_func": F.silu,
        "add_bias_linear": False,  # no MLP biases; the output projection's comes from the spec
        "add_qkv_bias": model.attention_bias != "none",
        "qk_layernorm": model.qk_norm == "head",
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": model.init_std,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        # Routed layers rotate each sequence's chosen tokens by their own positions ([k, b, 1, d]
        # tables); TE's fused RoPE takes one [s, 1, 1, d] table only.
        "apply_rope_fusion": False,
        "bf16": prec == "bf16",
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "tensor_model_parallel_size": lay.tp,
        "pipeline_model_parallel_size": lay.pp,
        "context_parallel_size": lay.cp,
        "expert_model_parallel_size": lay.ep,
        "expert_tensor_parallel_size": lay.etp,
        "sequence_parallel": engine.sequence_parallel,
        **_moe_kwargs(model, engine, dispatcher),
    }
    if parallel.activation_checkpointing == "all":
        tc.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if engine.fp8 != "none":
        tc.update(fp8=engine.fp8, fp8_recipe=engine.fp8_recipe)
        if model.moe.enabled:  # FP8 GEMMs need row counts in tiles of 16: pad each expert's tokens (probability 0)
            tc["moe_router_padding_for_quantization"] = True

    gpt = {
        "vocab_size": model.vocab_size,
        "max_sequence_length": model.max_seq_len,
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "rotary_base": model.rope_theta,
        "share_embeddings_and_output_weights": model.tie_embeddings,
        "parallel_output": True,
        **_rope_kwargs(model),
    }
    d = model.depth
    depth = None
    routed = tuple(i for i in range(model.num_layers) if model.to_args().layer_kind(i)[0])
    if routed:
        # Routed layers hold a depth router the others lack: checkpoint keys per layer, as MoE
        # layouts already get (Megatron stacks identical layers along one axis, which would leave holes).
        tc["hetereogenous_dist_checkpoint"] = True
        depth = DepthLayerParams(
            capacity=d.capacity,
            router_weight=d.router_weight,
            bce_loss_coef=d.bce_loss_coef,
            predictor_hidden=d.predictor_hidden if d.predictor else None,
            causal_router=d.causal_router,
            prefix_prior_tokens=d.prefix_prior_tokens,
        )
    moe_dispatcher = dispatcher if model.moe.enabled else None
    choices = _cpu_choices(engine, optimizer, moe_dispatcher, grad_clip) if cpu else ()
    return MegatronPlan(
        transformer=tc,
        gpt=gpt,
        layout=lay,
        routed_layers=routed,
        depth=depth,
        seq_len=seq_len,
        use_te=use_te,
        optimizer=optimizer,  # type: ignore[arg-type]
        zero_stage=zero_stage,
        device=device,
        cpu_choices=choices,
        output_projection_bias=model.attention_bias == "all",
    )


def build_transformer_config(plan: MegatronPlan, **overrides: Any):
    """The real ``TransformerConfig`` (its own checks run too; a failure becomes one line)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    try:
        return TransformerConfig(**{**plan.transformer, **overrides})
    except (ValueError, AssertionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"config error: Megatron-Core TransformerConfig rejected the translation: {first}") from None
