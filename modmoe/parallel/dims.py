"""``ParallelDims``: checks a layout against the world size and the model, and builds meshes.

Rank layout (row-major, ``tp`` innermost so tensor-parallel peers share a node)::

    dense mesh   ("dp", "tp")          shape (dp, tp)
    expert mesh  ("edp", "ep", "tp")   shape (dp / ep, ep, tp)

Expert parallelism borrows from data parallelism: the ``ep`` ranks of one expert group hold
disjoint slices of every MoE layer's experts and exchange tokens by all-to-all; the ``edp``
ranks holding the same slice average its gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from importlib.util import find_spec

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from modmoe.config_base import ConfigError
from modmoe.model_config import ModelConfig
from modmoe.parallel.config import ParallelConfig

# Mesh dimension names: the dense mesh is (DP, TP), the expert mesh (EDP, EP, TP).
DP, TP = "dp", "tp"
EP = "ep"
EDP = "edp"
"""Expert data parallel: the ranks that hold the same slice of experts."""


@dataclass
class ParallelDims:
    dp: int
    ep: int
    tp: int
    world_size: int
    dp_backend: str
    zero_stage: int
    device_type: str = "cpu"

    @classmethod
    def build(cls, cfg: ParallelConfig, model: ModelConfig, world_size: int, device_type: str = "cpu") -> ParallelDims:
        """Validates everything a layout depends on before any work; one line per problem."""
        if world_size % cfg.tp:
            raise ConfigError(f"config error: parallel.tp = {cfg.tp}: must divide the world size ({world_size})")
        dp = world_size // cfg.tp if cfg.dp == -1 else cfg.dp
        if dp * cfg.tp != world_size:
            raise ConfigError(
                f"config error: parallel.dp = {cfg.dp}: dp * tp ({dp} * {cfg.tp}) must equal the world size ({world_size})"
            )
        if dp % cfg.ep:
            raise ConfigError(f"config error: parallel.ep = {cfg.ep}: must divide the data-parallel degree ({dp})")
        if cfg.ep > 1:
            if not model.moe.enabled:
                raise ConfigError(
                    f"config error: parallel.ep = {cfg.ep}: the model has no MoE layers (model.moe.enabled = false)"
                )
            if model.moe.num_experts % cfg.ep:
                raise ConfigError(
                    f"config error: parallel.ep = {cfg.ep}: must divide model.moe.num_experts ({model.moe.num_experts})"
                )
        if cfg.tp > 1:
            for name, heads in (
                ("num_heads", model.num_heads),
                ("num_kv_heads", model.num_kv_heads or model.num_heads),
            ):
                if heads % cfg.tp:
                    raise ConfigError(f"config error: parallel.tp = {cfg.tp}: must divide model.{name} ({heads})")
            hidden = [("ffn_hidden", model.ffn_hidden)]
            if model.moe.enabled:
                hidden += [("moe.expert_hidden", model.moe.expert_hidden)]
                shared = model.to_args().moe.shared_hidden
                if shared:
                    hidden += [("moe.shared_expert_hidden (or num_shared_experts * expert_hidden)", shared)]
            if model.qk_norm == "full":
                raise ConfigError(
                    f"config error: parallel.tp = {cfg.tp}: model.qk_norm = 'full' normalizes over all heads, "
                    "which tensor parallelism splits; use parallel.tp = 1 (or fsdp2/ep) for this model"
                )
            for name, size in hidden:
                if size % cfg.tp:
                    raise ConfigError(f"config error: parallel.tp = {cfg.tp}: must divide model.{name} ({size})")
            if dp > 1 and cfg.dp_backend != "fsdp2":
                raise ConfigError(
                    f"config error: parallel.dp_backend = {cfg.dp_backend!r}: tensor parallelism with dp > 1 needs 'fsdp2' "
                    "(DTensor parameters are sharded over the 2-D mesh)"
                )
            if cfg.ep > 1:
                raise ConfigError(
                    f"config error: parallel.ep = {cfg.ep}: combining expert and tensor parallelism (parallel.tp = {cfg.tp}) "
                    "is not supported by the native engine yet; use ep or tp"
                )
        if cfg.dp_backend == "deepspeed" and find_spec("deepspeed") is None:
            raise ConfigError(
                "config error: parallel.dp_backend = 'deepspeed': DeepSpeed is not installed "
                "(pip install 'modmoe[deepspeed]', with DS_BUILD_OPS=0 on machines without a CUDA toolkit)"
            )
        if cfg.dp_backend == "deepspeed" and cfg.tp > 1:
            raise ConfigError(
                "config error: parallel.dp_backend = 'deepspeed': not combinable with parallel.tp > 1 (use fsdp2)"
            )
        return cls(dp, cfg.ep, cfg.tp, world_size, cfg.dp_backend, cfg.zero_stage, device_type)

    # ------------------------------------------------------------------ derived degrees
    @property
    def edp(self) -> int:
        """Ranks that hold the same expert slice (expert data parallel)."""
        return self.dp // self.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------------ meshes
    @cached_property
    def dense_mesh(self) -> DeviceMesh:
        return init_device_mesh(self.device_type, (self.dp, self.tp), mesh_dim_names=(DP, TP))

    @cached_property
    def expert_mesh(self) -> DeviceMesh:
        return init_device_mesh(self.device_type, (self.edp, self.ep, self.tp), mesh_dim_names=(EDP, EP, TP))

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The ranks that split the global batch (None without a process group)."""
        return self.dense_mesh[DP].get_group() if self.distributed else None

    def dp_rank(self, global_rank: int) -> int:
        return global_rank // self.tp

    def describe(self) -> str:
        parts = [
            f"dp {self.dp} ({self.dp_backend}{f' zero-{self.zero_stage}' if self.dp_backend == 'deepspeed' else ''})"
        ]
        if self.ep > 1:
            parts.append(f"ep {self.ep} (edp {self.edp})")
        if self.tp > 1:
            parts.append(f"tp {self.tp}")
        return ", ".join(parts)
