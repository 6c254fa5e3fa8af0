"""Reading DeepSpeed's ``*.pt`` files without running code from them.

``torch.load(weights_only=False)`` would execute whatever the pickle names, so every file is
read with ``weights_only=True``. DeepSpeed's ZeRO optimizer files pickle three of its own
classes (plain records: the loss scaler's fields, the ZeRO stage number, fragment offsets); they
are allowed under their DeepSpeed names but bound to the inert stand-ins below, so reading a
checkpoint neither imports DeepSpeed nor calls its code. The globals a file names are listed
first (without unpickling), and anything outside the allowlist is refused in one line.
"""

from __future__ import annotations

import enum
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals

from checkpoints_tools.convert_errors import ConvertError
from modmoe.checkpoint.safe_read import DEEPSPEED_RECORD_GLOBALS


class LossScalerRecord:
    """Fields of DeepSpeed's (dynamic) loss scaler; only carried, never used."""


class ZeroStage(enum.IntEnum):
    """DeepSpeed's ``ZeroStageEnum`` values (the pickle stores the number)."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


class FragmentAddress:
    """``numel`` and ``start`` of a parameter inside a flat partition (not needed here:
    offsets are recomputed from ``param_shapes``)."""


# DeepSpeed's record classes (modmoe/checkpoint/safe_read.py), each bound to its stand-in.
ALLOWED_GLOBALS: dict[str, type] = dict(
    zip(DEEPSPEED_RECORD_GLOBALS, (LossScalerRecord, LossScalerRecord, ZeroStage, FragmentAddress), strict=True)
)


def load_pt(path: Path, mmap: bool = False) -> Any:
    """``torch.load`` of a DeepSpeed file with ``weights_only=True`` and :data:`ALLOWED_GLOBALS`;
    ``mmap`` leaves tensor data on disk until it is touched (optimizer partitions)."""
    if not path.is_file():
        raise ConvertError(f"{path}: missing")
    if not zipfile.is_zipfile(path):
        raise ConvertError(f"{path}: not a torch.save zip archive (the legacy format cannot be read safely)")
    try:
        named = get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 (any parse failure: the file is unusable)
        raise ConvertError(f"{path}: unreadable pickle ({type(err).__name__}: {err})") from None
    unexpected = [g for g in named if g not in ALLOWED_GLOBALS]
    if unexpected:
        raise ConvertError(
            f"{path}: pickles the global {unexpected[0]}, which is not allowed "
            f"(allowed: {', '.join(sorted(ALLOWED_GLOBALS))})"
        )
    try:
        with safe_globals([(cls, name) for name, cls in ALLOWED_GLOBALS.items()]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 (weights_only refusals come as several types)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        detail = f"pickles the global {found.group(1)}, which is not allowed" if found else first
        raise ConvertError(f"{path}: {detail}") from None
