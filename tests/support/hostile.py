"""What a hostile writer of a checkpoint does (issue 14, finding 1): replace a pickle in a step
directory with one whose ``__reduce__`` would run a shell command, then rewrite the manifest's
size and sha256 so that every integrity check passes. The command only creates a marker file,
so a test proves that no code ran by that file's absence."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shlex
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, TensorStorageMetadata

from modmoe.checkpoint.safe_read import unpickle_metadata


class Payload:
    """Unpickling it runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def reseal(step_dir: Path, *rel_paths: str) -> None:
    """Rewrites the manifest entries of ``rel_paths`` (adding missing ones) to their new size and
    sha256, as someone who can write the checkpoint can."""
    manifest_path = step_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    by_path = {entry["path"]: entry for entry in manifest["files"]}
    for rel in rel_paths:
        data = (step_dir / rel).read_bytes()
        entry = by_path.setdefault(rel, {"path": rel})
        entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["files"] = sorted(by_path.values(), key=lambda e: e["path"])
    manifest_path.write_text(json.dumps(manifest))


def plant_metadata_payload(step_dir: Path, marker: Path) -> None:
    """The issue's reproduction: DCP's ``.metadata`` becomes the payload."""
    (step_dir / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    reseal(step_dir, ".metadata")


def plant_torch_save_payload(step_dir: Path, rel: str, marker: Path) -> None:
    """A ``torch.save`` file of the checkpoint (Megatron's ``common.pt``, a DeepSpeed partition)
    becomes a zip archive whose pickle holds the payload."""
    torch.save({"state": Payload(marker)}, step_dir / rel)
    reseal(step_dir, rel)


def plant_bytes_item(step_dir: Path, marker: Path) -> str:
    """A DCP *non-tensor* item whose bytes are the payload: the index itself names only DCP's own
    classes, but the item it points at is ``torch.save``d Python. In a native checkpoint an
    existing tensor entry is turned into such an item (DCP then reads it with
    ``torch.load(weights_only=False)``); in a Megatron one an existing item is re-pointed.
    Returns the item's key."""
    md = unpickle_metadata(step_dir / ".metadata")  # our own checkpoint: safe to read this way
    bytes_keys = [k for k, v in md.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    key = bytes_keys[0] if bytes_keys else next(k for k, v in md.state_dict_metadata.items() if ".model." in k)
    shard = next(p for p in sorted(step_dir.glob("*.distcp")))
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buf.getvalue())
    for index in [i for i in md.storage_data if i.fqn == key]:
        del md.storage_data[index]
    template = next(iter(md.storage_data.values()))
    md.storage_data[MetadataIndex(key)] = type(template)(shard.name, offset, len(buf.getvalue()))
    if isinstance(md.state_dict_metadata[key], TensorStorageMetadata):
        md.state_dict_metadata[key] = BytesStorageMetadata()
        md.planner_data = None
    (step_dir / ".metadata").write_bytes(pickle.dumps(md))
    reseal(step_dir, ".metadata", shard.name)
    return key


def one_line(text: str, prefix: str) -> str:
    """The single line of ``text`` that starts with ``prefix``; fails on a traceback."""
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, text[-3000:]
    return lines[0]
