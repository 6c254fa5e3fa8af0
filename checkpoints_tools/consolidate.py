"""DCP sharded checkpoint -> one ``.safetensors`` file of the model weights (on CPU).

Tensors are loaded in groups of bounded size into preallocated CPU tensors (DCP reassembles
each one from however many shards wrote it) and streamed to the output, so peak memory is
about one group, never the checkpoint twice.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from checkpoints_tools.safetensors_writer import SafetensorsStreamWriter
from modmoe.checkpoint.manifest import LAYOUT_MEGATRON, CheckpointError, validate
from modmoe.checkpoint.reader import load_tensor_groups, model_tensors, read_dcp_metadata


def outputs(out: Path, with_config: bool) -> list[Path]:
    """The files a consolidation writes: the weights, ``<stem>.meta.json`` and, when the
    checkpoint records its config, ``config.json`` beside them."""
    return [out, out.with_name(out.stem + ".meta.json"), *([out.parent / "config.json"] if with_config else [])]


def _check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Each output must be new, or ``--overwrite`` given: a user's ``config.json`` or weights
    beside ``--out`` are never replaced silently (and a directory or a symlink never at all)."""
    for path in paths:
        if not path.exists() and not path.is_symlink():
            continue
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path}: exists and is not a regular file; refusing to replace it")
        if not overwrite:
            raise CheckpointError(f"{path}: exists; choose another --out or pass --overwrite to replace it")


def _write_new(path: Path, text: str) -> None:
    """Writes ``text`` under a fresh temporary name, then renames it into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def consolidate(
    ckpt_dir: Path, out: Path, prefix: str | None = None, group_bytes: int = 256 << 20, overwrite: bool = False
) -> dict[str, Any]:
    """Writes the model weights of ``ckpt_dir`` to ``out`` (keys without ``prefix``), plus
    ``<out stem>.meta.json`` (step, world size, meta) and ``config.json`` (the resolved config,
    when the checkpoint's meta has ``config``) beside it. An existing output is replaced only
    with ``overwrite``. Returns a summary."""
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
    config = manifest.meta.get("config")
    paths = outputs(out, isinstance(config, dict))
    _check_outputs(paths, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.{secrets.token_hex(4)}.partial")
    try:
        with open(tmp_out, "xb") as f:
            writer = SafetensorsStreamWriter(f, specs, {"format": "pt", "step": str(manifest.step)})
            for group in load_tensor_groups(ckpt_dir, items, group_bytes):
                for name, tensor in group.items():
                    writer.write(name, tensor)
                del group
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        _check_outputs(paths, overwrite)  # again: one may have appeared while the weights were written
        os.replace(tmp_out, out)
    finally:
        tmp_out.unlink(missing_ok=True)
    info = {"source": str(ckpt_dir), "step": manifest.step, "world_size": manifest.world_size, "meta": manifest.meta}
    _write_new(paths[1], json.dumps(info, indent=1, sort_keys=True) + "\n")
    if isinstance(config, dict):
        _write_new(paths[2], json.dumps(config, indent=1, sort_keys=True) + "\n")
    return {"tensors": len(items), "bytes": out.stat().st_size, "step": manifest.step}
