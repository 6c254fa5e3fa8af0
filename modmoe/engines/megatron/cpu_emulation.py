"""Run Megatron-Core's local (non-TE) layers on CPU: for tests and debugging only.

Megatron-Core does not run on CPU (DESIGN.md §2), but what stops its local layers is small:
buffers allocated at ``torch.cuda.current_device()``, ``torch.cuda.synchronize()`` before a
checkpoint write, and the CUDA RNG tracker forked around attention dropout. Inside
:func:`megatron_on_cpu` the device query answers ``"cpu"``, synchronize has nothing to wait
for, and the tracker is Megatron's own inference tracker (a no-op fork; dropout is 0 in
modmoe configs). Megatron's replicated fp32 optimizer, its gradient norm, and the pipeline schedules create a few
scalars with ``device='cuda'``; those modules see a ``torch`` whose ``tensor``/``zeros``
put them on the CPU. (The distributed and mixed-precision optimizers check
``param.type() == 'torch.cuda.FloatTensor'`` and stay GPU-only.)
Everything else, attention, the MoE router, dispatcher and experts, tensor/sequence-parallel
collectives over gloo, is Megatron's code unchanged. CUDA-only parts (Transformer Engine,
fused kernels, the alltoall dispatcher's side stream, NCCL) are not exercised: the GPU
verification script covers those.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import torch

_CUDA_LITERAL_MODULES = (
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.utils",
    "megatron.core.transformer.moe.moe_utils",
)


class _CpuTorch:
    """``torch`` for modules that hard-code ``device='cuda'``: same API, CPU factories."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def _device(device: Any) -> Any:
        return "cpu" if device is not None and str(device).startswith("cuda") else device

    def tensor(self, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(*args, device=self._device(device), **kwargs)

    def zeros(self, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*args, device=self._device(device), **kwargs)


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    from megatron.core.tensor_parallel import random as mrandom

    from modmoe.engines.megatron.compat import prepare_megatron

    prepare_megatron()
    saved = torch.cuda.current_device, torch.cuda.synchronize
    modules = [importlib.import_module(name) for name in _CUDA_LITERAL_MODULES]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    for module in modules:
        module.torch = _CpuTorch()  # type: ignore[attr-defined]
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved  # type: ignore[assignment]
        for module in modules:
            module.torch = torch  # type: ignore[attr-defined]
        mrandom.initialize_rng_tracker(force_reset=True)
