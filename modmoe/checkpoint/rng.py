"""Per-rank RNG states as JSON (python ``random``, numpy, torch CPU, torch CUDA).

Stored one file per rank (``rng/rank_00003.json``) so a checkpoint reloads under another world
size: a rank with no saved state gets a deterministic reseed from (step, rank) instead.
JSON, not pickle, so nothing executable is read from the checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import random
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from modmoe.checkpoint.errors import CheckpointError
from modmoe.config_json import JSONInputError, read_json, validate_record

RNG_DIR = "rng"
MAX_RNG_BYTES = 1 << 20  # a state is ~25 kB; a machine with many GPUs adds ~7 kB each
_Word = Annotated[int, Field(ge=0, lt=2**32)]
_MT_WORDS = 624  # the Mersenne Twister's state (Python's random and NumPy's MT19937)


class PythonRngState(BaseModel):
    """``random.getstate()``: version, 624 state words and the position, the cached gauss."""

    model_config = ConfigDict(extra="forbid")
    version: Literal[3]
    internal: list[_Word] = Field(min_length=_MT_WORDS + 1, max_length=_MT_WORDS + 1)
    gauss: float | None


class NumpyRngState(BaseModel):
    """NumPy's legacy global ``MT19937`` state."""

    model_config = ConfigDict(extra="forbid")
    bit_generator: Literal["MT19937"]
    key: list[_Word] = Field(min_length=_MT_WORDS, max_length=_MT_WORDS)
    pos: int = Field(ge=0, le=_MT_WORDS)
    has_gauss: Literal[0, 1]
    gauss: float


class RngState(BaseModel):
    """One rank's random-number states, as ``rng/rank_NNNNN.json`` holds them."""

    model_config = ConfigDict(extra="forbid")
    python: PythonRngState
    numpy: NumpyRngState
    torch_cpu: str = Field(max_length=64 << 10)
    """Base64 of ``torch.get_rng_state()``."""
    torch_cuda: list[Annotated[str, Field(max_length=64 << 10)]] | None = Field(default=None, max_length=1024)
    """Base64 of each CUDA device's state (absent on CPU-only runs)."""


def rng_filename(rank: int) -> str:
    return f"{RNG_DIR}/rank_{rank:05d}.json"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)


def read_rng(path: Path) -> RngState:
    """Parses and checks one rank's RNG file (bounded JSON, typed, torch's state of the right
    size); raises a one-line :class:`CheckpointError` naming the file."""
    try:
        state = validate_record(RngState, read_json(path, MAX_RNG_BYTES), str(path))
    except JSONInputError as err:
        raise CheckpointError(str(err)) from None
    try:
        cpu = base64.b64decode(state.torch_cpu, validate=True)
        for s in state.torch_cuda or []:
            base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError(f"{path}: a torch RNG state is not base64") from None
    expected = torch.get_rng_state().numel()
    if len(cpu) != expected:
        raise CheckpointError(f"{path}: torch_cpu holds {len(cpu)} bytes, torch's CPU generator state is {expected}")
    return state


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


def restore_rng(state: RngState | dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`; CUDA states apply to the devices present."""
    if not isinstance(state, RngState):
        state = validate_record(RngState, state, "RNG state")
    py, npy = state.python, state.numpy
    random.setstate((py.version, tuple(py.internal), py.gauss))
    np.random.set_state(
        {
            "bit_generator": npy.bit_generator,
            "state": {"key": np.asarray(npy.key, dtype=np.uint32), "pos": npy.pos},
            "has_gauss": npy.has_gauss,
            "gauss": npy.gauss,
        }
    )
    torch.set_rng_state(_unb64(state.torch_cpu))
    if state.torch_cuda and torch.cuda.is_available():
        for device, s in enumerate(state.torch_cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(_unb64(s), device)


def reseed_rng(step: int, rank: int) -> int:
    """Deterministic fallback seed for a rank that has no saved state; returns the seed."""
    digest = hashlib.sha256(f"modmoe-rng:{step}:{rank}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") % (2**63)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # also seeds every CUDA device
    return seed
