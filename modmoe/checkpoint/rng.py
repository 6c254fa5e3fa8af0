"""Per-rank RNG states as JSON (python ``random``, numpy, torch CPU, torch CUDA).

Stored one file per rank (``rng/rank_00003.json``) so a checkpoint reloads under another world
size: a rank with no saved state gets a deterministic reseed from (step, rank) instead.
JSON, not pickle, so nothing executable is read from the checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import random
from typing import Any

import numpy as np
import torch

RNG_DIR = "rng"


def rng_filename(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank:05d}.json"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """The calling process's RNG states, JSON-serializable."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; CUDA states apply to the devices present."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(_unb64(state["torch_cpu"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        for device, s in enumerate(state["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), device)


def reseed_rng(step: int, rank: int) -> int:
    """Deterministic fallback seed for a rank that has no saved state; returns the seed."""
    digest = hashlib.sha256(f"modmoe-rng:{step}:{rank}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") % (2**63)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed
