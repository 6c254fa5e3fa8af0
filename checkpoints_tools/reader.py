"""Reads a checkpoint's DCP index only after its checksum matched the manifest."""

from __future__ import annotations

from pathlib import Path

from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

from modmoe.checkpoint.manifest import DCP_METADATA, Manifest, read_manifest, verify_files


def read_dcp_metadata(ckpt_dir: Path) -> tuple[Manifest, Metadata]:
    """Manifest and DCP ``Metadata`` of ``ckpt_dir``. ``.metadata`` is a pickle, so it is
    unpickled only after its size and sha256 matched the manifest (raises ``CheckpointError``)."""
    manifest = read_manifest(ckpt_dir)
    verify_files(ckpt_dir, manifest, [DCP_METADATA])
    return manifest, FileSystemReader(ckpt_dir).read_metadata()
