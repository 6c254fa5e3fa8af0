"""What this Megatron-Core install can do, and one workaround for it.

Megatron-Core 0.16.1's MoE router (``moe_utils.RouterGatingLinearFunction``) tests
``te_general_gemm is not None``, but that module-level name is only bound when Transformer
Engine imports: without TE every MoE forward raises ``NameError``. :func:`prepare_megatron`
binds it to ``None``, the value the code itself uses for "no TE", so local (non-TE) MoE layers
work. It runs before any model is built, on CPU and GPU alike.
"""

from __future__ import annotations

import importlib.util


def te_available() -> bool:
    """Transformer Engine importable (its PyTorch extension, not just the wheel's metadata)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def apex_available() -> bool:
    return importlib.util.find_spec("apex") is not None


def prepare_megatron() -> None:
    """Idempotent fix-ups needed before building Megatron modules (see the module docstring)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
