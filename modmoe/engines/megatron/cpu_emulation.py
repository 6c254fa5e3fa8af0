"""Run Megatron-Core's local (non-TE) layers on CPU: for tests, debugging and small CPU runs.

Megatron-Core does not run on CPU (DESIGN.md §2), but what stops its local layers is small.
Inside :func:`megatron_on_cpu`:

- ``torch.cuda.current_device()`` answers ``"cpu"`` (buffers Megatron allocates there) and
  ``torch.cuda.synchronize()`` has nothing to wait for (before a checkpoint write);
- the RNG tracker is Megatron's own inference tracker (a no-op fork; dropout is 0 in modmoe
  configs), and activation recompute saves and restores the CPU RNG only (there is no CUDA RNG);
- modules that hard-code ``device='cuda'`` scalars (the replicated fp32 optimizer, its gradient
  norm, the pipeline schedules, the MoE utilities) see a ``torch`` whose ``tensor``/``zeros``
  put them on the CPU, and whose ``torch.cuda`` streams are stand-ins: the alltoall
  dispatcher copies its split sizes "device to host" on a side stream, which on CPU has
  nothing to overlap (every operation has finished when it returns);
- gradient clipping scales the gradients by Megatron's coefficient without Megatron's
  ``torch.cuda.FloatTensor`` assertion (the norm itself is Megatron's, reduced over its groups).

Everything else, attention, the MoE router, both dispatchers and the experts, tensor/sequence/
pipeline/expert-parallel collectives over gloo, is Megatron's code unchanged. GPU-only: the
distributed and mixed-precision (bf16) optimizers (they check ``param.type()`` for CUDA
types), Transformer Engine, fused kernels, NCCL: ``translate`` refuses those on CPU in one line.
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
    "megatron.core.transformer.moe.token_dispatcher",
)


class _NoStream:
    """A CUDA stream or event on CPU: every operation has finished when it returns."""

    def wait_stream(self, _other: Any) -> None:
        return None

    def record_event(self) -> _NoStream:
        return self

    def synchronize(self) -> None:
        return None


class _CpuCuda:
    """``torch.cuda`` for those modules: one stand-in stream; everything else is torch's."""

    def __init__(self) -> None:
        self._stream = _NoStream()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    def Stream(self, *_args: Any, **_kwargs: Any) -> _NoStream:  # noqa: N802 (torch's name)
        return self._stream

    def current_stream(self, _device: Any = None) -> _NoStream:
        return self._stream

    def stream(self, _stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class _CpuTorch:
    """``torch`` for modules that hard-code ``device='cuda'``: same API, CPU factories."""

    cuda = _CpuCuda()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def _device(device: Any) -> Any:
        return "cpu" if device is not None and str(device).startswith("cuda") else device

    def tensor(self, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.tensor(*args, device=self._device(device), **kwargs)

    def zeros(self, *args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*args, device=self._device(device), **kwargs)


def clip_grads_on_cpu(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False) -> None:
    """Megatron's ``clip_grad_by_total_norm_fp32`` for CPU gradients: the same coefficient
    (``max_norm / (total_norm + 1e-6)``, applied when below 1), without its CUDA type check."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [g.detach() for p in parameters if (g := getattr(p, attr, None)) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if grads and coeff < 1.0:
        torch._foreach_mul_(grads, coeff)


def host_copy_on_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """Megatron's ``maybe_move_tensor_to_cpu`` for a tensor already on the CPU: the same result
    type (numpy when asked: the alltoall dispatcher's split sizes), which Megatron's version
    gives CUDA tensors only."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.detach().clone().numpy()
    return tensor


@contextlib.contextmanager
def megatron_on_cpu() -> Iterator[None]:
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import token_dispatcher
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    from modmoe.engines.megatron.compat import prepare_megatron

    prepare_megatron()
    saved = torch.cuda.current_device, torch.cuda.synchronize
    saved_rng = mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state
    saved_clip = moptimizer.clip_grad_by_total_norm_fp32
    saved_host_copy = token_dispatcher.maybe_move_tensor_to_cpu
    modules = [importlib.import_module(name) for name in _CUDA_LITERAL_MODULES]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda device=None: None  # type: ignore[assignment]
    for module in modules:
        module.torch = _CpuTorch()  # type: ignore[attr-defined]
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    moptimizer.clip_grad_by_total_norm_fp32 = clip_grads_on_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = host_copy_on_cpu
    mrandom.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved  # type: ignore[assignment]
        for module in modules:
            module.torch = torch  # type: ignore[attr-defined]
        mrandom._get_cuda_rng_state, mrandom._set_cuda_rng_state = saved_rng
        moptimizer.clip_grad_by_total_norm_fp32 = saved_clip
        token_dispatcher.maybe_move_tensor_to_cpu = saved_host_copy
        if isinstance(MoEAlltoAllTokenDispatcher.cuda_dtoh_stream, _NoStream):
            MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = None  # a GPU model later in this process makes its own
        mrandom.initialize_rng_tracker(force_reset=True)
