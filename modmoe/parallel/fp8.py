"""FP8 training of the linear layers through torchao float8, applied from outside the model.

torchao (the ``gpu`` extra) swaps chosen ``nn.Linear`` modules for ``Float8Linear``: inputs,
weights and output gradients are cast to float8 with dynamic scales (``tensorwise``: one per
tensor; ``rowwise``: one per row) and multiplied by ``torch._scaled_mm``; the weights and
optimizer state stay in full precision. The swap keeps module and parameter names, so
checkpoints do not change.

Converted: the attention projections and the dense / shared-expert SwiGLU projections, when
both of their sizes are multiples of 16 (the FP8 GEMM's rule). Kept in the compute precision:
the depth router and its predictor, the MoE gate (top-k decisions must not move with FP8
rounding), norms, embeddings, the LM head, and the routed experts, which are stacked
``(E, ...)`` parameters run by a grouped GEMM rather than ``nn.Linear``.

The CPU has no FP8 GEMM: torchao's emulation (``emulate=True``, the same casts with a
high-precision matmul) is what the CPU tests run; training asks for a CUDA GPU.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import torch
from torch import nn

from modmoe.config_base import ConfigError

Fp8Recipe = Literal["none", "tensorwise", "rowwise"]
CONVERTED = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")
SHARED = ("mlp.shared.w1", "mlp.shared.w2", "mlp.shared.w3")


def fp8_filter(module: nn.Module, fqn: str) -> bool:
    """Which linear layers become FP8 (``fqn`` like ``layers.3.attn.wq``)."""
    if not isinstance(module, nn.Linear):
        return True  # torchao walks into containers through this filter too
    inner = fqn.split(".", 2)[-1] if fqn.startswith("layers.") else ""
    return inner.endswith(CONVERTED + SHARED) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def import_float8():
    """torchao's float8 API, or one line saying how to install it."""
    if not torch.cuda.is_available():
        # torchao's CUDA extensions cannot load without a GPU; float8 training does not need them.
        os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError(
            "config error: trainer.fp8 needs torchao: pip install -c requirements/constraints.txt -e '.[gpu]'"
        ) from None
    return Float8LinearConfig, convert_to_float8_training


def apply_fp8(model: nn.Module, recipe: Fp8Recipe, emulate: bool = False) -> list[str]:
    """Swaps the chosen linear layers of ``model`` for torchao ``Float8Linear``; returns their
    names. ``emulate``: torchao's high-precision emulation of the FP8 GEMMs (CPU tests)."""
    if recipe == "none":
        return []
    config_cls, convert = import_float8()
    config = config_cls.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    before = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    convert(model, module_filter_fn=fp8_filter, config=config)
    return sorted(name for name, m in model.named_modules() if name in before and type(m) is not nn.Linear)
