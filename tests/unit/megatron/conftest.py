"""Shared by the Megatron unit tests: one CPU process with Megatron's parallel state."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def megatron_cpu():
    """One 1-rank gloo group and Megatron parallel state for the module, torn down after."""
    pytest.importorskip("megatron.core")
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from modmoe.engines.megatron.cpu_emulation import megatron_on_cpu

    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # module-level state an earlier model may have set
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    with megatron_on_cpu():
        yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
