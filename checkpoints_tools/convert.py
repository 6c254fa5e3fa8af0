"""``convert``: DeepSpeed checkpoints <-> modmoe (DCP) checkpoints.

``--to dcp`` reads what DeepSpeed's ``engine.save_checkpoint`` wrote (ZeRO 0-3, any
data-parallel world size) and writes a committed modmoe checkpoint (:mod:`convert_to_dcp`);
``--to deepspeed`` writes a DeepSpeed universal checkpoint from a modmoe one
(:mod:`convert_to_ds`). See docs/checkpoints.md for what is and is not carried over.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Any

from checkpoints_tools.convert_errors import ConvertError


class Target(str, enum.Enum):  # noqa: UP042 (typer renders plain str enums)
    dcp = "dcp"
    deepspeed = "deepspeed"


def convert(
    src: Path,
    dst: Path,
    to: Target,
    *,
    config: Path | None = None,
    tag: str | None = None,
    group_bytes: int = 256 << 20,
) -> dict[str, Any]:
    """Converts ``src`` into ``dst`` (new or empty); raises :class:`ConvertError` (one line)."""
    if to == Target.dcp:
        from checkpoints_tools.convert_to_dcp import deepspeed_to_dcp

        return deepspeed_to_dcp(src, dst, tag=tag, config_path=config)
    if config is not None or tag is not None:
        flag = "--config" if config is not None else "--tag"
        raise ConvertError(f"{flag}: only used with --to dcp (a modmoe checkpoint records its own config and step)")
    from checkpoints_tools.convert_to_ds import dcp_to_universal

    return dcp_to_universal(src, dst, group_bytes=group_bytes)
