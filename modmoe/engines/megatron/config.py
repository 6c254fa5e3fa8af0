"""Settings that only the Megatron-Core engine has.

The degrees both engines share (``tp``, ``ep``, ``dp``, the data-parallel backend, activation
checkpointing) stay in ``parallel`` (:class:`modmoe.parallel.config.ParallelConfig`); this
section adds what Megatron offers on top. Cross-section checks (e.g. sequence parallelism
needs ``parallel.tp > 1``) live in :mod:`modmoe.engines.megatron.translate`, which sees every
section at once.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from modmoe.config_base import ConfigModel


class MegatronConfig(ConfigModel):
    """Megatron-Core engine: pipeline/context/expert-tensor parallelism, MoE dispatch, FP8."""

    pp: int = Field(1, ge=1)
    """Pipeline-parallel stages. Layers are split evenly, so ``model.num_layers`` must be a
    multiple; routed (MoD) layers may sit on any stage."""

    cp: int = Field(1, ge=1)
    """Context-parallel degree (attention over a sequence split across ranks). Only for models
    without depth routing: the per-sequence top-k over context-parallel chunks is not built."""

    etp: int | None = Field(None, ge=1)
    """Expert tensor-parallel degree: how many ranks split one expert's hidden units
    (null = ``parallel.tp``; 1 = whole experts, usually fastest with expert parallelism)."""

    sequence_parallel: bool = False
    """Split norms, routers and residual activations along the sequence over the ``parallel.tp``
    ranks. Needs ``parallel.tp > 1``; required by Megatron's MoE layers when ``tp > 1``."""

    dispatcher: Literal["alltoall", "allgather"] | None = None
    """How tokens reach their experts: ``alltoall`` (exchange only the routed tokens; best with
    expert parallelism) or ``allgather`` (every rank gathers all tokens; simple, fine for
    ``ep = 1``). ``null`` = ``alltoall``, except on CPU with expert tensor parallelism
    (etp > 1), where alltoall all-gathers uneven token counts, which gloo cannot: ``allgather``."""

    grouped_gemm: bool = False
    """Run all local experts in one grouped GEMM (Transformer Engine's ``TEGroupedMLP``)
    instead of one GEMM per expert. Needs Transformer Engine."""

    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    """Layer implementation: ``transformer_engine`` (fused norm+linear kernels, FP8),
    ``local`` (Megatron-Core's plain PyTorch layers), or ``auto`` (TE when it imports)."""

    fp8: Literal["none", "e4m3", "hybrid"] = "none"
    """FP8 GEMMs through Transformer Engine: ``e4m3`` everywhere, or ``hybrid`` (e4m3 forward,
    e5m2 gradients). Needs TE, ``trainer.precision: bf16`` and an FP8 GPU (H100 and later)."""

    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    """TE scaling recipe when ``fp8`` is on (``mxfp8`` needs Blackwell GPUs)."""

    distributed_optimizer: bool | None = None
    """Megatron's distributed optimizer: optimizer state sharded over data-parallel ranks and
    gradients reduce-scattered (ZeRO-1/2 style). ``null`` = on with ``parallel.dp_backend:
    ddp``; must stay null/false with ``deepspeed``, which shards state itself."""

    aux_loss_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
    """Where the switch balance loss (``model.moe.aux_loss_coef``) counts expert loads: over the
    micro-batch (Megatron ``aux_loss``; what the native model computes on one rank) or over the
    global batch (Megatron ``global_aux_loss``)."""

    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduction with the backward pass."""

    overlap_param_gather: bool = True
    """With the distributed optimizer: overlap the parameter all-gather with the next forward."""

    aux_loss_with_expert_bias: Literal["reject", "megatron"] = "reject"
    """With both aux-loss-free balancing (``model.moe.bias_update_rate > 0``) and a balance loss,
    Megatron counts the loss's expert loads from the top-k *without* the bias (DeepSeek-V3's
    definition); the native model counts the biased choice it dispatches. ``reject`` refuses
    the combination; ``megatron`` accepts Megatron's definition (forward passes and logits are
    the same; only the balance loss's gradient differs)."""
