"""``manifest.json``: the seal of a committed checkpoint, and its validation.

A checkpoint directory is trusted only through its manifest: every file is listed with its size
and SHA-256, and nothing in the directory is read by a parser that can execute code
(DCP's ``.metadata`` and its non-tensor items are pickles) before :func:`validate` or
:func:`verify_files` matched it against the manifest.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from modmoe.checkpoint.errors import CheckpointError
from modmoe.checkpoint.fsutil import fsync_file, sha256_file, write_json_durable
from modmoe.checkpoint.rng import RNG_DIR, read_rng
from modmoe.checkpoint.safe_read import (
    DCP_METADATA,
    DEEPSPEED_RECORD_GLOBALS,
    MEGATRON_ITEM_GLOBALS,
    UnsafeCheckpointError,
    item_bytes,
    metadata_problems,
    torch_save_problem,
    unpickle_metadata,
)
from modmoe.config_json import JSONInputError, read_json
from modmoe.data.errors import DataError
from modmoe.data.sampler_state import parse_sampler_state
from modmoe.file_paths import escape_problem

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "modmoe-checkpoint"
FORMAT_VERSION = 1
LAYOUT_DCP = "dcp"
LAYOUT_MEGATRON = "megatron"  # megatron.core.dist_checkpointing's torch_dist format (DCP files plus its own)
LAYOUTS = (LAYOUT_DCP, LAYOUT_MEGATRON)
STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
MAX_MANIFEST_BYTES = 256 << 20  # 100k files take ~15 MB


def step_dirname(step: int) -> str:
    return f"step_{step:08d}"


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1)
    """Path relative to the checkpoint directory, ``/``-separated."""
    size: int = Field(ge=0)
    """Size in bytes."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of the content."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str
    """Always ``modmoe-checkpoint``."""
    format_version: int
    """Version of this manifest layout."""
    step: int = Field(ge=0)
    """Training step the checkpoint was taken at."""
    world_size: int = Field(ge=1)
    """Number of ranks that wrote it."""
    layout: str
    """Storage layout of the tensors: ``dcp`` (torch.distributed.checkpoint, native engine) or
    ``megatron`` (Megatron-Core dist checkpointing, Megatron engine)."""
    model_prefix: str | None = None
    """Prefix of the model weights' keys in the DCP state dict (for consolidation)."""
    created_unix: float
    """Commit time (seconds since the epoch)."""
    files: list[FileEntry]
    """Every file of the checkpoint except the manifest itself."""
    meta: dict[str, Any]
    """Caller's JSON metadata: sampler state, tracking run id, resolved config, ..."""


def build_manifest(
    ckpt_dir: Path,
    *,
    step: int,
    world_size: int,
    meta: dict[str, Any],
    model_prefix: str | None,
    created: float,
    layout: str = LAYOUT_DCP,
) -> Manifest:
    """Lists, fsyncs and hashes every file under ``ckpt_dir`` (written by all ranks)."""
    rel_paths = sorted(
        p.relative_to(ckpt_dir).as_posix() for p in ckpt_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )

    def entry(rel: str) -> FileEntry:
        full = ckpt_dir / rel
        fsync_file(full)
        return FileEntry(path=rel, size=full.stat().st_size, sha256=sha256_file(full))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        files = list(pool.map(entry, rel_paths))
    return Manifest(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        step=step,
        world_size=world_size,
        layout=layout,
        model_prefix=model_prefix,
        created_unix=created,
        files=files,
        meta=meta,
    )


def write_manifest(ckpt_dir: Path, manifest: Manifest) -> None:
    write_json_durable(ckpt_dir / MANIFEST_NAME, manifest.model_dump(mode="json"))


def read_manifest(ckpt_dir: Path) -> Manifest:
    """Parses ``manifest.json`` (plain JSON, safe to read first); raises :class:`CheckpointError`."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: missing {MANIFEST_NAME} (checkpoint was never committed)")
    try:
        data = read_json(path, MAX_MANIFEST_BYTES)
    except JSONInputError as err:
        raise CheckpointError(str(err)) from None
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise CheckpointError(f"{path}: field {field}: {first['msg']}") from None
    if manifest.format != FORMAT_NAME or manifest.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format {manifest.format!r} version {manifest.format_version} "
            f"(this build reads {FORMAT_NAME!r} version {FORMAT_VERSION})"
        )
    if manifest.layout not in LAYOUTS:
        raise CheckpointError(f"{path}: field layout = {manifest.layout!r}: allowed {', '.join(map(repr, LAYOUTS))}")
    return manifest


def _path_problem(root: Path, rel: str) -> str | None:
    """Why ``rel`` may not be followed from ``root`` (absolute, ``..``, symlink out), or None."""
    why = escape_problem(root, rel)
    return None if why is None else f"manifest {why}"


def _file_problem(root: Path, entry: FileEntry, check_hash: bool) -> str | None:
    if (why := _path_problem(root, entry.path)) is not None:
        return why
    full = root / entry.path
    if not full.is_file():
        return f"file {entry.path!r} listed in the manifest is missing"
    size = full.stat().st_size
    if size != entry.size:
        return f"file {entry.path!r} has {size} bytes, manifest says {entry.size} (truncated or overwritten)"
    if check_hash and sha256_file(full) != entry.sha256:
        return f"file {entry.path!r} fails its sha256 checksum (corrupted)"
    return None


def validate(ckpt_dir: str | os.PathLike, check_hashes: bool = True) -> list[str]:
    """Problems that make ``ckpt_dir`` unusable, one line each; empty means valid.

    Checks: manifest present and well-formed, step matches the directory name, every listed
    file stays inside the directory, exists, has its size and (``check_hashes``) its checksum,
    DCP's ``.metadata`` is listed, and no unlisted file was added."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return [f"{root}: not a directory"]
    try:
        manifest = read_manifest(root)
    except CheckpointError as err:
        return [str(err)]
    problems: list[str] = []
    m = STEP_DIR_RE.match(root.name)
    if m and int(m.group(1)) != manifest.step:
        problems.append(f"directory name {root.name!r} does not match manifest step {manifest.step}")
    listed = {e.path for e in manifest.files}
    if DCP_METADATA not in listed:
        problems.append(f"manifest does not list DCP's {DCP_METADATA} file")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = pool.map(lambda e: _file_problem(root, e, check_hashes), manifest.files)
        problems += [p for p in found if p is not None]
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME and rel not in listed:
            problems.append(f"file {rel!r} is not listed in the manifest")
    if not problems:  # the files are the listed ones: is what they say safe to read?
        problems += _content_problems(root, manifest)
    if not problems:
        problems += _record_problems(root, manifest)
    return problems


def _record_problems(root: Path, manifest: Manifest) -> list[str]:
    """The JSON records a resume reads: every rank's RNG state, and the sampler position in
    ``meta`` (typed and range-checked, as the resume itself checks them)."""
    problems = []
    for entry in manifest.files:
        if entry.path.startswith(f"{RNG_DIR}/") and entry.path.endswith(".json"):
            try:
                read_rng(root / entry.path)
            except CheckpointError as err:
                problems.append(f"file {entry.path!r}: {str(err).removeprefix(str(root / entry.path) + ': ')}")
    if "sampler" in manifest.meta:
        try:
            parse_sampler_state(manifest.meta["sampler"], "manifest meta.sampler")
        except DataError as err:
            problems.append(str(err))
    return problems


def _content_problems(root: Path, manifest: Manifest) -> list[str]:
    """What in the listed files would need code outside the allowlists to be read
    (modmoe/checkpoint/safe_read.py): the DCP index's globals and shape, and, in a Megatron
    checkpoint, the globals of its pickled items and ``.pt`` files."""
    try:
        md = unpickle_metadata(root / DCP_METADATA)
    except UnsafeCheckpointError as err:
        return [f"file {DCP_METADATA!r} (DCP's index) {err}"]
    megatron = manifest.layout == LAYOUT_MEGATRON
    files = {e.path: e.size for e in manifest.files}
    problems = [f"file {DCP_METADATA!r}: {p}" for p in metadata_problems(md, files, allow_bytes=megatron)]
    if problems or not megatron:
        return problems
    for fqn, rel, data in item_bytes(root, md, BytesStorageMetadata):
        if (why := torch_save_problem(f"item {fqn!r} in {rel!r}", data, MEGATRON_ITEM_GLOBALS)) is not None:
            return [why]
    for entry in manifest.files:
        if entry.path.endswith(".pt"):
            allowed = DEEPSPEED_RECORD_GLOBALS if entry.path.startswith("deepspeed/") else ()
            if (why := torch_save_problem(f"file {entry.path!r}", root / entry.path, allowed)) is not None:
                return [why]
    return problems


def verify_files(ckpt_dir: Path, manifest: Manifest, rel_paths: list[str]) -> None:
    """Checks just ``rel_paths`` against the manifest (e.g. ``.metadata`` right before it is
    unpickled); raises :class:`CheckpointError`."""
    by_path = {e.path: e for e in manifest.files}
    for rel in rel_paths:
        entry = by_path.get(rel)
        if entry is None:
            raise CheckpointError(f"{ckpt_dir}: {rel!r} is not listed in the manifest")
        if (why := _file_problem(ckpt_dir, entry, check_hash=True)) is not None:
            raise CheckpointError(f"{ckpt_dir}: {why}")
