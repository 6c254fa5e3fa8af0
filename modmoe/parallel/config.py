"""Configuration of how training is spread over processes."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from modmoe.config_base import ConfigModel


class ParallelConfig(ConfigModel):
    """Process layout. The world size comes from the launcher (torchrun sets WORLD_SIZE);
    ``dp * tp`` must equal it. Expert parallelism borrows from the data-parallel ranks: the
    ``dp`` ranks form ``dp / ep`` groups of ``ep`` ranks, each group holding every expert once."""

    dp: int = Field(-1, ge=-1)
    """Data-parallel degree; -1 = whatever the world size leaves after ``tp``."""

    ep: int = Field(1, ge=1)
    """Expert-parallel degree: each rank holds ``num_experts / ep`` experts and tokens reach them
    by all-to-all. Must divide ``dp`` and the number of experts."""

    tp: int = Field(1, ge=1)
    """Tensor-parallel degree (DTensor): attention heads and MLP/expert hidden units are split
    over ``tp`` ranks. Must divide the attention and KV head counts."""

    dp_backend: Literal["ddp", "fsdp2", "deepspeed"] = "ddp"
    """How data-parallel ranks share gradients and state: ``ddp`` (replicated, all-reduce),
    ``fsdp2`` (PyTorch ``fully_shard``: parameters, gradients and optimizer state sharded), or
    ``deepspeed`` (DeepSpeed ZeRO at ``zero_stage``; needs the ``deepspeed`` extra)."""

    zero_stage: int = Field(1, ge=0, le=3)
    """ZeRO stage for ``dp_backend: deepspeed`` (0 = plain data parallel, 1 = optimizer state,
    2 = + gradients, 3 = + parameters sharded). For ``fsdp2``, 2 keeps parameters gathered
    between forward and backward, 3 frees them after forward (less memory, one more gather)."""

    deepspeed_extra: dict[str, Any] = Field(default_factory=dict)
    """Extra keys merged into the DeepSpeed config that modmoe generates (an escape hatch, e.g.
    ``{zero_optimization: {overlap_comm: true}}``); keys modmoe sets itself are rejected."""

    activation_checkpointing: Literal["none", "all", "unrouted"] = "none"
    """Recompute blocks in backward instead of storing their activations: ``all`` blocks, or
    only ``unrouted`` ones (they hold activations for all T tokens, a routed block only for
    capacity*T, so this saves most of the memory for a fraction of the recompute)."""

    comm_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend: ``auto`` = nccl on CUDA, gloo on CPU."""

    timeout_s: float = Field(600.0, gt=0, le=86_400)
    """Seconds a collective (or a rendezvous store operation) may wait for its peers before it
    fails, on every process group of the job (the dense and expert meshes and the checkpoint
    group too). A rank whose peer died or hangs then exits with status 75 and one log line
    naming the cause, so the job ends and Slurm can requeue it instead of waiting forever.
    gloo raises in the blocked call; NCCL's watchdog aborts the communicator (the launcher sets
    ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``). It must exceed the longest legitimate wait of one
    rank for another: a checkpoint save, rank 0 logging plots to MLflow, evaluation, or the
    first step's compilation (rank 0's set-up has its own ``setup_timeout_s``)."""

    setup_timeout_s: float = Field(3600.0, gt=0, le=7 * 86_400)
    """Seconds the ranks wait for rank 0's one-time work before training starts (preparing the
    data on a first start, opening the MLflow run). Kept apart from ``timeout_s``, which
    preparing a large corpus may far exceed; a node lost during set-up is detected after this long."""
