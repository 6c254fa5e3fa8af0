"""Grouped GEMM over stacked experts: every expert's rows in one kernel (``torch._grouped_mm``).

``grouped_mm(x, w, offsets)``: ``x`` (n, K) rows sorted by group, ``w`` (G, K, N), ``offsets``
(G,) int32 on the device, the cumulative row counts (``offsets[g]`` ends group ``g``) -> (n, N).
The offsets never leave the device, so nothing waits for the host, and rows past
``offsets[-1]`` are not computed: the op leaves them unwritten (uninitialized memory, seen on
CPU too), so the caller masks them on the way in and out.

Facts this file relies on (torch 2.13 here; torch 2.11 on the lent GPU machine, by its source):
- ``torch._grouped_mm`` runs on CPU in fp32 and bf16, and on CUDA; CUDA's fast kernel (bf16 on
  sm90+, CUTLASS) reads the offsets on the device, its fallback for other dtypes loops on the host.
- Every row stride must be a multiple of 16 bytes: K and N multiples of 8 cover fp32 and bf16.
- It is not on the autocast lists: fp32 inputs under bf16 autocast stay fp32, so the caller casts.
- Its fake (meta) kernel, which ``torch.compile`` traces with, accepts bf16 only. fp32 therefore
  goes through the custom op below, whose fake kernel and backward are ours, so fp32 models
  (the CPU tests) compile too; bf16 calls the native op, which inductor knows.
- Its backward needs a gradient with real strides (an expanded ``sum()`` gradient is refused);
  the custom op makes the gradient contiguous.
"""

from __future__ import annotations

import torch

ROW_ALIGN = 8  # elements: 16 bytes in bf16 (and 32 in fp32)


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


def grouped_mm_fits(*sizes: int) -> bool:
    """Whether matrices with these inner sizes meet the 16-byte stride rule in fp32 and bf16."""
    return grouped_mm_available() and all(s % ROW_ALIGN == 0 for s in sizes)


def _registered(name: str) -> bool:
    """Whether the op ``modmoe::name`` exists already: an exported directory carries a copy of
    this file, and a process that imports both (a test, a user's notebook) must define it once."""
    try:
        getattr(torch.ops.modmoe, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _define_ops() -> None:
    @torch.library.custom_op("modmoe::grouped_mm", mutates_args=())
    def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return torch._grouped_mm(x, w, offs=offsets)

    @_grouped_mm_op.register_fake
    def _(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[-1])

    @torch.library.custom_op("modmoe::grouped_mm_weight_grad", mutates_args=())
    def _grouped_weight_grad_op(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Per group g: x[rows of g].T @ grad[rows of g] -> (G, K, N); empty groups give zeros."""
        return torch._grouped_mm(x.t(), grad, offs=offsets)

    @_grouped_weight_grad_op.register_fake
    def _(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])

    def _setup_context(ctx, inputs, output) -> None:
        x, w, offsets = inputs
        ctx.save_for_backward(x, w, offsets)

    def _backward(ctx, grad: torch.Tensor):
        x, w, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _grouped_mm_op(grad, w.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
        grad_w = _grouped_weight_grad_op(x, grad, offsets) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, None

    _grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


if not _registered("grouped_mm"):
    _define_ops()
_grouped_mm_op = torch.ops.modmoe.grouped_mm
_grouped_weight_grad_op = torch.ops.modmoe.grouped_mm_weight_grad


def pad_groups(xs: torch.Tensor, counts: torch.Tensor, align: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each group's rows moved to start at a multiple of ``align`` rows, on the device.

    xs: (M, K) rows sorted by group, rows past ``counts.sum()`` in no group; counts: (G,).
    Returns the padded rows (M + G*(align-1), K) with zeros between groups, their offsets (G,)
    int32, and ``where`` (M,): the padded row of each input row (``out[where]`` undoes it).
    The shapes depend only on M and G, so this stays static and sync-free. Why: the weight
    gradient is a grouped GEMM whose contraction runs over the rows of a group, and CUDA's
    kernel wants every group to start on a 16-byte boundary (8 bf16 rows), as torchtitan pads
    its token groups to 8."""
    M, G = xs.shape[0], counts.shape[0]
    padded = (counts + align - 1) // align * align  # (G,)
    ends, count_ends = padded.cumsum(0), counts.cumsum(0)
    row = torch.arange(M, device=xs.device)
    group = torch.searchsorted(count_ends, row, right=True)  # (M,) G for rows in no group
    first_row = torch.cat([count_ends.new_zeros(1), count_ends])[group]  # first input row of the row's group
    first_slot = torch.cat([ends.new_zeros(1), ends])[group]  # where that group starts once padded
    where = first_slot + row - first_row  # (M,): rows in no group follow the last group
    rows = xs.new_zeros(M + G * (align - 1), xs.shape[1]).index_copy(0, where, xs)
    return rows, ends.to(torch.int32), where


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x: (n, K), w: (G, K, N), offsets: (G,) int32 -> (n, N), in x's dtype (cast w to it)."""
    w = w.to(x.dtype)
    if x.dtype == torch.bfloat16:
        return torch._grouped_mm(x, w, offs=offsets)
    return _grouped_mm_op(x, w, offsets)
