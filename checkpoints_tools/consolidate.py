"""DCP sharded checkpoint -> one ``.safetensors`` file of the model weights (on CPU).

Tensors are loaded in groups of bounded size into preallocated CPU tensors (DCP reassembles
each one from however many shards wrote it) and streamed to the output, so peak memory is
about one group, never the checkpoint twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from checkpoints_tools.safetensors_writer import SafetensorsStreamWriter
from modmoe.checkpoint.manifest import LAYOUT_MEGATRON, CheckpointError, validate
from modmoe.checkpoint.reader import load_tensor_groups, model_tensors, read_dcp_metadata


def consolidate(ckpt_dir: Path, out: Path, prefix: str | None = None, group_bytes: int = 256 << 20) -> dict[str, Any]:
    """Writes the model weights of ``ckpt_dir`` to ``out`` (keys without ``prefix``), plus
    ``<out stem>.meta.json`` (step, world size, meta) and ``config.json`` (the resolved config,
    when the checkpoint's meta has ``config``) beside it. Returns a summary."""
    ckpt_dir = Path(ckpt_dir)
    problems = validate(ckpt_dir)
    if problems:
        raise CheckpointError(f"refusing to consolidate {ckpt_dir}: {problems[0]}")
    manifest, md = read_dcp_metadata(ckpt_dir)
    if manifest.layout == LAYOUT_MEGATRON:
        raise CheckpointError(
            f"{ckpt_dir}: a Megatron engine checkpoint (Megatron's tensor names and sharding); "
            "export it with `modmoe export`, which converts it to the native model"
        )
    prefix = prefix if prefix is not None else manifest.model_prefix
    if prefix is None:
        raise CheckpointError(f"{ckpt_dir}: manifest records no model_prefix; pass --prefix (e.g. 'train.model.')")
    items = sorted(model_tensors(md, prefix), key=lambda s: s.name)
    if not items:
        raise CheckpointError(f"{ckpt_dir}: no tensor key starts with prefix {prefix!r}")
    specs = {s.name: (s.dtype, s.shape) for s in items}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".partial")
    with open(tmp_out, "wb") as f:
        writer = SafetensorsStreamWriter(f, specs, {"format": "pt", "step": str(manifest.step)})
        for group in load_tensor_groups(ckpt_dir, items, group_bytes):
            for name, tensor in group.items():
                writer.write(name, tensor)
            del group
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_out, out)
    info = {"source": str(ckpt_dir), "step": manifest.step, "world_size": manifest.world_size, "meta": manifest.meta}
    (out.with_name(out.stem + ".meta.json")).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    if isinstance(manifest.meta.get("config"), dict):
        (out.parent / "config.json").write_text(json.dumps(manifest.meta["config"], indent=1, sort_keys=True) + "\n")
    return {"tensors": len(items), "bytes": out.stat().st_size, "step": manifest.step}
