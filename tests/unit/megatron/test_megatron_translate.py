"""Config translation to Megatron-Core: every supported option reaches a real TransformerConfig,
every combination either side cannot express is refused with one line naming the field."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from modmoe.config_base import ConfigError, validate_config  # noqa: E402
from modmoe.engines.megatron import MegatronConfig  # noqa: E402
from modmoe.engines.megatron.compat import te_available  # noqa: E402
from modmoe.engines.megatron.translate import build_transformer_config, translate  # noqa: E402
from modmoe.model_config import ModelConfig  # noqa: E402
from modmoe.parallel.config import ParallelConfig  # noqa: E402

BASE_MODEL = {
    "vocab_size": 256,
    "dim": 64,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "ffn_hidden": 128,
    "max_seq_len": 64,
    "depth": {"capacity": 0.25},
    "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 32},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def plan_for(model=None, parallel=None, engine=None, world=1, seq_len=64, precision="fp32", te=False, **kw):
    m = ModelConfig.model_validate(_merge(BASE_MODEL, model or {}))
    return translate(
        m,
        ParallelConfig(**(parallel or {})),
        MegatronConfig(**(engine or {})),
        world_size=world,
        seq_len=seq_len,
        precision=precision,
        te_available=te,
        **kw,
    )


SUPPORTED = {
    "defaults": ({}, {}, {}, 1, False),
    "tp2_sp": ({}, {"tp": 2}, {"sequence_parallel": True}, 2, False),
    "tp2_sp_etp1_ep2": ({}, {"tp": 2, "ep": 2}, {"sequence_parallel": True, "etp": 1}, 4, False),
    "pp2": ({}, {}, {"pp": 2}, 2, False),
    "pp2_tp2_ep2": ({}, {"tp": 2, "ep": 2}, {"pp": 2, "sequence_parallel": True, "etp": 1}, 8, False),
    "cp2_moe_only": ({"depth": {"enabled": False}}, {}, {"cp": 2}, 2, True),
    "allgather": ({}, {}, {"dispatcher": "allgather"}, 1, False),
    "grouped_gemm_te": ({}, {}, {"grouped_gemm": True, "transformer_impl": "transformer_engine"}, 1, True),
    "te_auto": ({}, {}, {"transformer_impl": "auto"}, 1, True),
    "local_with_te_installed": ({}, {}, {"transformer_impl": "local"}, 1, True),
    "fp8_e4m3_delayed": ({}, {}, {"fp8": "e4m3"}, 1, True),
    "fp8_hybrid_tensorwise": ({}, {}, {"fp8": "hybrid", "fp8_recipe": "tensorwise"}, 1, True),
    "replicated_optimizer": ({}, {}, {"distributed_optimizer": False}, 2, False),
    "deepspeed_zero1": ({}, {"dp_backend": "deepspeed", "zero_stage": 1}, {}, 2, False),
    "deepspeed_zero2_tp2_dense": (
        {"moe": {"enabled": False}},
        {"dp_backend": "deepspeed", "zero_stage": 2, "tp": 2},
        {},
        4,
        False,
    ),
    "global_aux_loss": ({}, {}, {"aux_loss_scope": "global_batch"}, 1, False),
    "seq_and_batch_aux": ({"moe": {"seq_aux_loss_coef": 0.01}}, {}, {}, 1, False),
    "seq_aux_only_no_z": (
        {"moe": {"aux_loss_coef": 0.0, "seq_aux_loss_coef": 0.01, "z_loss_coef": 0.0}},
        {},
        {},
        1,
        False,
    ),
    "no_balance_losses": ({"moe": {"aux_loss_coef": 0.0}}, {}, {}, 1, False),
    "sigmoid_bias": ({"moe": {"score": "sigmoid", "bias_update_rate": 0.001, "aux_loss_coef": 0.0}}, {}, {}, 1, False),
    "sigmoid_bias_aux_megatron": (
        {"moe": {"score": "sigmoid", "bias_update_rate": 0.001}},
        {},
        {"aux_loss_with_expert_bias": "megatron"},
        1,
        False,
    ),
    "softmax_top1_unnormalized": ({"moe": {"top_k": 1, "normalize_top_k": False}}, {}, {}, 1, False),
    "shared_experts_first_dense": ({"moe": {"num_shared_experts": 2, "first_dense": 1, "every": 2}}, {}, {}, 1, False),
    "dense_mod": ({"moe": {"enabled": False}}, {}, {}, 1, False),
    "moe_only": ({"depth": {"enabled": False}}, {}, {}, 1, False),
    "predictor_sigmoid_weight": (
        {"depth": {"predictor": True, "causal_router": "predictor", "router_weight": "sigmoid"}},
        {},
        {},
        1,
        False,
    ),
    "tied_embeddings": ({"tie_embeddings": True}, {}, {}, 1, False),
    "recompute_all": ({}, {"activation_checkpointing": "all"}, {}, 1, False),
    "bf16": ({}, {}, {}, 1, False),
    "pretrained_features_tp2": (
        {
            "attention_bias": "all",
            "qk_norm": "head",
            "head_dim": 24,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0},
            "moe": {"num_shared_experts": 1, "shared_expert_gate": True, "normalize_top_k": False},
        },
        {"tp": 2},
        {"sequence_parallel": True},
        2,
        False,
    ),
}


@pytest.mark.parametrize("name", list(SUPPORTED))
def test_supported_option_builds_a_real_transformer_config(name):
    model, parallel, engine, world, te = SUPPORTED[name]
    precision = "bf16" if name in ("bf16", "fp8_e4m3_delayed", "fp8_hybrid_tensorwise") else "fp32"
    plan = plan_for(model, parallel, engine, world=world, precision=precision, te=te)
    if engine.get("fp8", "none") != "none" and not te_available():
        # TransformerConfig asks Transformer Engine's version for FP8: check the kwargs only.
        assert (plan.transformer["fp8"], plan.transformer["fp8_recipe"]) == (
            engine["fp8"],
            engine.get("fp8_recipe", "delayed"),
        )
        tc = build_transformer_config(plan, fp8=None, moe_router_padding_for_quantization=False)
    else:
        tc = build_transformer_config(plan)  # Megatron's own __post_init__ checks run here
    m = ModelConfig.model_validate(_merge(BASE_MODEL, model))
    assert (tc.num_layers, tc.hidden_size, tc.num_attention_heads, tc.num_query_groups) == (4, 64, 4, 2)
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.hidden_dropout == 0.0 and tc.attention_dropout == 0.0 and not tc.apply_rope_fusion
    lay = plan.layout
    assert lay.world == world == lay.tp * lay.pp * lay.cp * lay.dp
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size, tc.context_parallel_size) == (
        lay.tp,
        lay.pp,
        lay.cp,
    )
    assert tc.sequence_parallel == engine.get("sequence_parallel", False)
    assert tc.params_dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert plan.routed_layers == tuple(i for i in range(4) if m.to_args().layer_kind(i)[0])
    assert plan.use_te == (te and engine.get("transformer_impl", "auto") != "local")
    if m.moe.enabled:
        e = m.moe
        assert tc.num_moe_experts == e.num_experts and tc.moe_router_topk == e.top_k
        assert tc.moe_layer_freq == [int(e.is_moe(i)) for i in range(4)]
        assert tc.moe_ffn_hidden_size == e.expert_hidden and tc.moe_router_score_function == e.score
        assert tc.moe_router_pre_softmax == (e.score == "softmax" and not e.normalize_top_k)
        assert tc.moe_router_enable_expert_bias == (e.bias_update_rate > 0)
        assert tc.moe_z_loss_coeff == (e.z_loss_coef or None)
        assert tc.moe_expert_capacity_factor is None and tc.moe_router_dtype == "fp32"
        assert tc.moe_token_dispatcher_type == engine.get("dispatcher", "alltoall")
        assert tc.expert_model_parallel_size == lay.ep and tc.expert_tensor_parallel_size == lay.etp
        shared = e.num_shared_experts * e.expert_hidden or None
        assert tc.moe_shared_expert_intermediate_size == shared
    else:
        assert tc.num_moe_experts is None


def test_pretrained_architecture_features_map_to_megatron():
    """q/k/v (and output) biases, per-head q/k norms, head_dim, RoPE scaling, the shared-expert gate."""
    plan = plan_for(SUPPORTED["pretrained_features_tp2"][0], {"tp": 2}, {"sequence_parallel": True}, world=2)
    tc = build_transformer_config(plan)
    assert tc.add_qkv_bias and tc.qk_layernorm and tc.kv_channels == 24 and not tc.add_bias_linear
    assert tc.moe_shared_expert_gate and plan.output_projection_bias
    assert plan.gpt["rope_scaling"] and plan.gpt["rope_scaling_factor"] == 32.0
    qwen = plan_for({"attention_bias": "qkv", "rope_scaling": {"rope_type": "linear", "factor": 4.0}})
    assert qwen.transformer["add_qkv_bias"] and not qwen.output_projection_bias and not qwen.transformer["qk_layernorm"]
    assert qwen.gpt["seq_len_interpolation_factor"] == 4.0 and "rope_scaling" not in qwen.gpt
    plain = plan_for()
    assert not plain.transformer["add_qkv_bias"] and not plain.transformer.get("moe_shared_expert_gate")


def test_balance_loss_types_and_coefficients():
    both = build_transformer_config(plan_for({"moe": {"aux_loss_coef": 0.02, "seq_aux_loss_coef": 0.03}}))
    assert both.moe_router_load_balancing_type == ["aux_loss", "seq_aux_loss"]
    assert both.moe_aux_loss_coeff == [0.02, 0.03]
    glob = build_transformer_config(plan_for(engine={"aux_loss_scope": "global_batch"}))
    assert glob.moe_router_load_balancing_type == "global_aux_loss" and glob.moe_aux_loss_coeff == 0.01
    none = build_transformer_config(plan_for({"moe": {"aux_loss_coef": 0.0}}))
    assert none.moe_router_load_balancing_type == "none"


def test_layout_optimizer_fp8_recompute_and_model_kwargs():
    plan = plan_for(parallel={"tp": 2, "ep": 2}, engine={"pp": 2, "sequence_parallel": True, "etp": 1}, world=8)
    assert plan.layout.dp == 2 and plan.layout.parallel_state_kwargs() == {
        "tensor_model_parallel_size": 2,
        "pipeline_model_parallel_size": 2,
        "context_parallel_size": 1,
        "expert_model_parallel_size": 2,
        "expert_tensor_parallel_size": 1,
    }
    assert plan.optimizer == "distributed" and plan.zero_stage is None
    assert plan_for(engine={"distributed_optimizer": False}).optimizer == "replicated"
    ds = plan_for(parallel={"dp_backend": "deepspeed", "zero_stage": 2}, world=2)
    assert (ds.optimizer, ds.zero_stage) == ("deepspeed", 2)
    fp8 = plan_for(engine={"fp8": "hybrid", "fp8_recipe": "blockwise"}, precision="bf16", te=True).transformer
    assert (fp8["fp8"], fp8["fp8_recipe"], fp8["bf16"]) == ("hybrid", "blockwise", True)
    assert fp8["moe_router_padding_for_quantization"] is True  # FP8 tiles of 16 rows per expert
    dense_fp8 = plan_for({"moe": {"enabled": False}}, engine={"fp8": "e4m3"}, precision="bf16", te=True).transformer
    assert "moe_router_padding_for_quantization" not in dense_fp8
    rc = build_transformer_config(plan_for(parallel={"activation_checkpointing": "all"}))
    assert (rc.recompute_granularity, rc.recompute_method, rc.recompute_num_layers) == ("full", "uniform", 1)
    gpt = plan_for({"tie_embeddings": True, "rope_theta": 5e5}).gpt
    assert gpt == {
        "vocab_size": 256,
        "max_sequence_length": 64,
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "rotary_base": 5e5,
        "share_embeddings_and_output_weights": True,
        "parallel_output": True,
    }
    auto = plan_for(precision="auto")
    assert auto.transformer["bf16"] is True  # a GPU-only engine: auto means bf16
    depth = plan_for(
        {"depth": {"predictor": True, "predictor_hidden": 7, "router_weight": "sigmoid", "bce_loss_coef": 0.5}}
    ).depth
    assert (depth.capacity, depth.router_weight, depth.bce_loss_coef, depth.predictor_hidden) == (
        0.25,
        "sigmoid",
        0.5,
        7,
    )
    assert depth.tokens(64) == 16 and depth.tokens(3) == 1
    assert plan_for({"depth": {"enabled": False}}).depth is None


REJECTED = {
    "integrated": ({"depth": {"variant": "integrated", "noop_experts": 2}}, {}, {}, 1, "model.depth.variant"),
    "bce_detach_input": ({"depth": {"bce_detach_input": True}}, {}, {}, 1, "model.depth.bce_detach_input"),
    "capacity_factor": ({"moe": {"capacity_factor": 1.25}}, {}, {}, 1, "model.moe.capacity_factor"),
    "sigmoid_top1": ({"moe": {"top_k": 1, "score": "sigmoid"}}, {}, {}, 1, "model.moe.top_k"),
    "softmax_top1_normalized": ({"moe": {"top_k": 1}}, {}, {}, 1, "model.moe.normalize_top_k"),
    "bias_with_softmax": (
        {"moe": {"bias_update_rate": 0.001, "aux_loss_coef": 0.0}},
        {},
        {},
        1,
        "model.moe.bias_update_rate",
    ),
    "bias_with_aux_loss": (
        {"moe": {"score": "sigmoid", "bias_update_rate": 0.001}},
        {},
        {},
        1,
        "model.moe.bias_update_rate",
    ),
    "bias_with_seq_aux": (
        {"moe": {"score": "sigmoid", "bias_update_rate": 0.001, "aux_loss_coef": 0.0, "seq_aux_loss_coef": 0.1}},
        {},
        {},
        1,
        "model.moe.bias_update_rate",
    ),
    "fsdp2": ({}, {"dp_backend": "fsdp2"}, {}, 2, "parallel.dp_backend"),
    "deepspeed_with_dist_opt": (
        {},
        {"dp_backend": "deepspeed"},
        {"distributed_optimizer": True},
        2,
        "megatron.distributed_optimizer",
    ),
    "deepspeed_with_pp": ({}, {"dp_backend": "deepspeed"}, {"pp": 2}, 2, "parallel.dp_backend"),
    "deepspeed_zero3": ({}, {"dp_backend": "deepspeed", "zero_stage": 3}, {}, 2, "parallel.zero_stage"),
    "deepspeed_zero0": ({}, {"dp_backend": "deepspeed", "zero_stage": 0}, {}, 2, "parallel.zero_stage"),
    "deepspeed_with_ep": ({}, {"dp_backend": "deepspeed", "ep": 2}, {}, 2, "parallel.ep"),
    "deepspeed_with_sp": (
        {"moe": {"enabled": False}},
        {"dp_backend": "deepspeed", "tp": 2},
        {"sequence_parallel": True},
        2,
        "megatron.sequence_parallel",
    ),
    "world_not_divisible": ({}, {"tp": 2}, {"sequence_parallel": True, "pp": 2}, 6, "parallel.tp"),
    "dp_mismatch": ({}, {"dp": 4}, {}, 2, "parallel.dp"),
    "ep_vs_experts": ({}, {"ep": 3}, {}, 3, "parallel.ep"),
    "ep_etp_pp_vs_world": ({}, {"ep": 4, "tp": 2}, {"sequence_parallel": True}, 4, "parallel.ep"),
    "ep_without_experts": ({"moe": {"enabled": False}}, {"ep": 2}, {}, 2, "parallel.ep"),
    "tp_vs_heads": (
        {"num_heads": 6, "num_kv_heads": 6, "dim": 96},
        {"tp": 4},
        {"sequence_parallel": True},
        4,
        "parallel.tp",
    ),
    "tp_vs_kv_heads": (
        {"num_heads": 12, "num_kv_heads": 3, "dim": 96},
        {"tp": 2},
        {"sequence_parallel": True},
        2,
        "parallel.tp",
    ),
    "tp_vs_ffn": ({"moe": {"enabled": False}, "ffn_hidden": 129}, {"tp": 2}, {}, 2, "parallel.tp"),
    "tp_vs_vocab": ({"vocab_size": 255}, {"tp": 2}, {"sequence_parallel": True}, 2, "parallel.tp"),
    "etp_vs_expert_hidden": ({"moe": {"expert_hidden": 33}}, {"tp": 2}, {"sequence_parallel": True}, 2, "megatron.etp"),
    "sp_without_tp": ({}, {}, {"sequence_parallel": True}, 1, "megatron.sequence_parallel"),
    "moe_tp_without_sp": ({}, {"tp": 2}, {}, 2, "megatron.sequence_parallel"),
    "pp_vs_layers": ({}, {}, {"pp": 3}, 3, "megatron.pp"),
    "cp_with_depth": ({}, {}, {"cp": 2}, 2, "megatron.cp"),
    "cp_vs_seq_len": ({"depth": {"enabled": False}, "max_seq_len": 128}, {}, {"cp": 4}, 4, "megatron.cp"),
    "sp_vs_seq_len": ({"max_seq_len": 128}, {"tp": 4}, {"sequence_parallel": True}, 4, "data.seq_len"),
    "sp_vs_routed_tokens": (
        {"depth": {"capacity": 0.2}},
        {"tp": 4},
        {"sequence_parallel": True},
        4,
        "model.depth.capacity",
    ),
    "unrouted_recompute": ({}, {"activation_checkpointing": "unrouted"}, {}, 1, "parallel.activation_checkpointing"),
    "te_missing": ({}, {}, {"transformer_impl": "transformer_engine"}, 1, "megatron.transformer_impl"),
    "fp8_without_te": ({}, {}, {"fp8": "e4m3"}, 1, "megatron.fp8"),
    "fp8_with_local_layers": ({}, {}, {"fp8": "e4m3", "transformer_impl": "local"}, 1, "megatron.fp8"),
    "grouped_gemm_without_te": ({}, {}, {"grouped_gemm": True}, 1, "megatron.grouped_gemm"),
    "fp8_experts_with_allgather": ({}, {}, {"fp8": "e4m3", "dispatcher": "allgather"}, 1, "megatron.dispatcher"),
    "seq_len_over_max": ({"max_seq_len": 32}, {}, {}, 1, "data.seq_len"),
    "qk_norm_over_the_projection": ({"qk_norm": "full"}, {}, {}, 1, "model.qk_norm"),
    "llama3_rope_other_context": (
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16}},
        {},
        {},
        1,
        "model.rope_scaling.original_max_position_embeddings",
    ),
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_rejected_combination_names_the_field_in_one_line(name):
    model, parallel, engine, world, field = REJECTED[name]
    seq_len = {"cp_vs_seq_len": 124, "sp_vs_seq_len": 66, "sp_vs_routed_tokens": 64, "seq_len_over_max": 64}.get(
        name, 64
    )
    te = name in ("fp8_with_local_layers", "fp8_experts_with_allgather")
    precision = "bf16" if te else "fp32"
    with pytest.raises(ConfigError) as err:
        plan_for(model, parallel, engine, world=world, seq_len=seq_len, te=te, precision=precision)
    msg = str(err.value)
    assert msg.startswith(f"config error: {field} = ") and "\n" not in msg, msg


def test_fp8_needs_bf16():
    with pytest.raises(ConfigError, match=r"^config error: megatron\.fp8 = 'e4m3': needs trainer\.precision"):
        plan_for(engine={"fp8": "e4m3"}, precision="fp32", te=True)


def test_megatron_rejections_of_the_kwargs_become_one_line():
    plan = plan_for()
    with pytest.raises(ConfigError, match="^config error: Megatron-Core TransformerConfig rejected") as err:
        build_transformer_config(plan, tensor_model_parallel_size=3)  # 4 heads do not split over 3 ranks
    assert "\n" not in str(err.value)


def test_engine_config_is_documented_and_strict():
    for name, field in MegatronConfig.model_fields.items():
        assert field.description, f"megatron.{name} has no docstring"
    with pytest.raises(ConfigError) as err:
        validate_config(MegatronConfig, {"pipeline": 2}, prefix="megatron")
    assert str(err.value).startswith("config error: unknown key megatron.pipeline (allowed keys: ")
    with pytest.raises(ConfigError, match=r"^config error: megatron\.dispatcher = 'flex'"):
        validate_config(MegatronConfig, {"dispatcher": "flex"}, prefix="megatron")


def test_on_cpu_the_engine_picks_what_runs_there_and_names_it():
    """Every Megatron setting at its default: GPU plans keep the distributed optimizer and the
    alltoall dispatcher; a CPU plan picks the replicated optimizer (and allgather where alltoall
    would need an uneven all-gather gloo lacks), and lists what it substituted."""
    gpu = plan_for(precision="auto", world=2, te=True, grad_clip=True)
    assert (gpu.optimizer, gpu.dispatcher, gpu.use_te, gpu.cpu_choices) == ("distributed", "alltoall", True, ())
    cpu = plan_for(precision="auto", world=2, te=True, device="cpu", grad_clip=True)
    assert (cpu.optimizer, cpu.dispatcher, cpu.use_te, cpu.transformer["bf16"]) == (
        "replicated",
        "alltoall",
        False,
        False,
    )
    assert cpu.cpu_choices == (
        "replicated optimizer (the distributed one is CUDA-only)",
        "synchronous gradient reduction",
        "clipping by Megatron's norm without its CUDA type check",
        "alltoall dispatcher without a side stream",
    )
    tp2 = plan_for(parallel={"tp": 2}, engine={"sequence_parallel": True}, world=2, device="cpu")  # etp = tp = 2
    assert tp2.dispatcher == "allgather" and any(c.startswith("allgather dispatcher") for c in tp2.cpu_choices)
    whole_experts = {"sequence_parallel": True, "etp": 1}
    assert plan_for(parallel={"tp": 2, "ep": 2}, engine=whole_experts, world=4, device="cpu").dispatcher == "alltoall"
    assert plan_for(engine={"dispatcher": "allgather"}, device="cpu").dispatcher == "allgather"
    assert plan_for({"moe": {"enabled": False}}, device="cpu").dispatcher is None
    ds = plan_for(parallel={"dp_backend": "deepspeed", "zero_stage": 1}, world=2, device="cpu", grad_clip=True)
    assert ds.optimizer == "deepspeed" and ds.cpu_choices == ("alltoall dispatcher without a side stream",)


CPU_REJECTED = {  # what Megatron builds for CUDA devices only, with the value that works on CPU
    "distributed_optimizer": ({}, {"distributed_optimizer": True}, "fp32", "megatron.distributed_optimizer", "null"),
    "bf16": ({}, {}, "bf16", "trainer.precision", "'fp32'"),
    "transformer_engine": (
        {},
        {"transformer_impl": "transformer_engine"},
        "fp32",
        "megatron.transformer_impl",
        "'local'",
    ),
    "fp8": ({}, {"fp8": "e4m3"}, "fp32", "megatron.fp8", "'none'"),
    "alltoall_over_etp": (
        {},
        {"dispatcher": "alltoall", "sequence_parallel": True},
        "fp32",
        "megatron.dispatcher",
        "allgather",
    ),
    "tied_embeddings_pp2": ({"tie_embeddings": True}, {"pp": 2}, "fp32", "model.tie_embeddings", "false"),
}


@pytest.mark.parametrize("name", list(CPU_REJECTED))
def test_cpu_refuses_cuda_only_parts_in_one_line_naming_what_works(name):
    model, engine, precision, field, works = CPU_REJECTED[name]
    parallel, world = ({"tp": 2}, 2) if name == "alltoall_over_etp" else ({}, 2 if name == "tied_embeddings_pp2" else 1)
    with pytest.raises(ConfigError) as err:
        plan_for(model, parallel, engine, world=world, precision=precision, device="cpu")
    msg = str(err.value)
    assert msg.startswith(f"config error: {field} = ") and "\n" not in msg and works in msg, msg


def test_context_parallelism_needs_transformer_engine_attention():
    moe_only = {"depth": {"enabled": False}}
    assert plan_for(moe_only, engine={"cp": 2}, world=2, te=True).layout.cp == 2
    with pytest.raises(ConfigError, match=r"^config error: megatron\.cp = 2: needs Transformer Engine attention"):
        plan_for(moe_only, engine={"cp": 2}, world=2, te=False)
