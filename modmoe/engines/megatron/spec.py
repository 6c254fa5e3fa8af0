"""``ModuleSpec``s that put MoDE layers into Megatron-Core's ``GPTModel``.

Start from Megatron's own per-layer specs (``get_gpt_decoder_layer_specs``: dense or MoE,
Transformer Engine or local modules), then wrap the depth-routed layers in
:class:`~modmoe.engines.megatron.layer.MoDETransformerLayer` with the same submodules. Local
specs get :class:`LocalRMSNorm` (the q/k norms too), because Megatron's own torch norm refuses
sequence parallelism. A model with a bias on the attention output projection only (Llama's
``attention_bias``; Megatron's ``add_bias_linear`` would put biases on the MLPs too) gets a
``linear_proj`` built with one (:func:`biased`). The decoder block of one pipeline stage takes
its slice of the list, so routed layers can sit on any stage.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from modmoe.engines.megatron.layer import MoDETransformerLayer
from modmoe.engines.megatron.translate import MegatronPlan


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with Megatron's norm constructor; under sequence parallelism its weight
    is marked for the TP gradient all-reduce (``finalize_model_grads``)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


@functools.cache
def biased(linear: type) -> type:
    """``linear`` (Megatron's row-parallel linear, local or TE) always built with a bias."""

    def __init__(self, *args, bias: bool = False, **kwargs) -> None:
        linear.__init__(self, *args, bias=True, **kwargs)

    return type(f"Biased{linear.__name__}", (linear,), {"__init__": __init__, "__module__": __name__})


def _attention(sub, plan: MegatronPlan, config: TransformerConfig):
    """The layer's attention spec with the local q/k norms and the output projection's bias."""
    spec = sub.self_attention
    changes = {}
    if config.qk_layernorm and not plan.use_te:
        changes.update(q_layernorm=LocalRMSNorm, k_layernorm=LocalRMSNorm)
    if plan.output_projection_bias:
        changes["linear_proj"] = biased(spec.submodules.linear_proj)
    if not changes:
        return spec
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **changes))


def layer_specs(plan: MegatronPlan, config: TransformerConfig) -> list[ModuleSpec]:
    """One spec per layer of the whole model (all pipeline stages)."""
    specs = []
    for i, spec in enumerate(
        get_gpt_decoder_layer_specs(config, use_transformer_engine=plan.use_te, normalization="RMSNorm")
    ):
        sub = dataclasses.replace(spec.submodules, self_attention=_attention(spec.submodules, plan, config))
        if not plan.use_te:
            sub = dataclasses.replace(sub, input_layernorm=LocalRMSNorm, pre_mlp_layernorm=LocalRMSNorm)
        if i in plan.routed_layers:
            specs.append(ModuleSpec(module=MoDETransformerLayer, submodules=sub, params={"depth": plan.depth}))
        else:
            specs.append(ModuleSpec(module=spec.module, submodules=sub, params=dict(spec.params)))
    return specs


def final_norm(plan: MegatronPlan) -> type:
    if plan.use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return LocalRMSNorm


def decoder_block_spec(
    plan: MegatronPlan, config: TransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None
) -> TransformerBlockSubmodules:
    """The layers of one pipeline stage (``pp_rank`` None = this process's stage)."""
    specs = layer_specs(plan, config)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=final_norm(plan))


def build_gpt_model(
    plan: MegatronPlan,
    config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
) -> GPTModel:
    """Megatron's GPTModel with MoDE layers (parallel_state must be initialized)."""
    block = decoder_block_spec(plan, config, vp_stage=vp_stage, pp_rank=pp_rank)
    return GPTModel(config, block, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, **plan.gpt)
