"""Throughput of a step: tokens/s, executed TFLOP/s and model FLOPs utilization (MFU).

Executed FLOPs come from ``modmoe.model.flops`` (a routed block counts only the tokens that
enter it), so MFU = executed TFLOP/s per device / the device's dense bf16 peak.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a substring of
# torch.cuda.get_device_name(); the first match wins, so specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),  # also GH200
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def lookup_peak(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


@functools.cache
def peak_tflops_per_device(device: torch.device, configured: float | None) -> float | None:
    """``configured`` when set, else the table's value for this CUDA device; ``None`` (no MFU)
    on CPU or for a GPU the table does not know, which is said once."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = lookup_peak(name)
    if peak is None:
        log.warning("MFU is not logged: no known bf16 peak for %r; set logging.peak_tflops_per_device", name)
    return peak


def throughput_metrics(
    tokens: int, step_time_s: float, flops_per_token: float, devices: int, peak_tflops: float | None
) -> dict[str, float]:
    """``tokens`` processed by all ``devices`` in ``step_time_s``, at ``flops_per_token``
    executed training FLOPs each."""
    tflops = flops_per_token * tokens / step_time_s / 1e12
    out = {
        "tokens_per_s": tokens / step_time_s,
        "tokens_per_s_per_device": tokens / step_time_s / devices,
        "executed_tflops_per_s": tflops,
        "executed_tflops_per_s_per_device": tflops / devices,
    }
    if peak_tflops:
        out["mfu"] = tflops / devices / peak_tflops
    return out
