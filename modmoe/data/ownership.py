"""Which directories modmoe may delete or replace: only its own preparations, recognised by
the marker file written into every preparation (or, for preparations made before the marker
existed, by an index whose files are exactly the directory's). Anything else is refused in one
line naming the path."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from modmoe.config_json import JSONInputError, read_json
from modmoe.data.errors import DataError
from modmoe.file_paths import escape_problem

MARKER = "MODMOE_PREPARED.json"
PRODUCER = "modmoe.data"
_LEGACY_FILES = {"index.json", "tokenizer.json"}
_MAX_MARKER_BYTES = 64 << 10
_MAX_LEGACY_INDEX_BYTES = 256 << 20


def write_marker(directory: Path, fingerprint: str) -> None:
    tmp = directory / f".{MARKER}.tmp"
    tmp.write_text(json.dumps({"producer": PRODUCER, "fingerprint": fingerprint}) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MARKER)


def marker_fingerprint(directory: Path) -> str | None:
    """The fingerprint in the directory's marker; None when it carries no modmoe marker."""
    try:
        marker = read_json(directory / MARKER, _MAX_MARKER_BYTES)
    except JSONInputError:
        return None
    if not isinstance(marker, dict) or marker.get("producer") != PRODUCER:
        return None
    return str(marker.get("fingerprint"))


def _legacy_preparation(directory: Path) -> bool:
    """A format-1 preparation (no marker yet): its index lists shards, and the directory holds
    nothing but that index, the tokenizer and those shards."""
    try:
        index = read_json(directory / "index.json", _MAX_LEGACY_INDEX_BYTES)
        if index.get("format_version") != 1 or "fingerprint_fields" not in index:
            return False
        listed = {s["file"] for split in index["splits"].values() for s in split["shards"]}
    except (JSONInputError, AttributeError, KeyError, TypeError):
        return False
    if any(not isinstance(name, str) or "/" in name or escape_problem(directory, name) for name in listed):
        return False
    present = {p.name for p in directory.iterdir()}
    return present <= listed | _LEGACY_FILES and "index.json" in present


def is_ours(directory: Path) -> bool:
    return directory.is_dir() and (marker_fingerprint(directory) is not None or _legacy_preparation(directory))


def check_replaceable(path: Path, what: str) -> bool:
    """True if ``path`` holds a modmoe preparation, False if it is absent or an empty
    directory; anything else raises a one-line :class:`DataError`."""
    if not path.exists():
        return False
    if not path.is_dir():
        raise DataError(f"{what} {path}: exists and is not a directory")
    if is_ours(path):
        return True
    if any(path.iterdir()):
        raise DataError(
            f"{what} {path}: not a modmoe preparation (no {MARKER}); refusing to overwrite it: "
            "choose another directory or empty it yourself"
        )
    return False


def remove_ours(path: Path, what: str) -> None:
    """Deletes ``path`` if it is a modmoe preparation (or empty); refuses anything else."""
    if path.exists() and (check_replaceable(path, what) or path.is_dir()):
        shutil.rmtree(path)


def install(work: Path, target: Path) -> None:
    """Moves the finished ``work`` directory to ``target``: at every instant ``target`` is the
    old complete preparation, absent, or the new complete one. An existing ``target`` must be
    modmoe's own (checked here again) or an empty directory."""
    if check_replaceable(target, "data.prepared_dir"):
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        old.mkdir()
        os.replace(target, old / "data")
        os.replace(work, target)
        shutil.rmtree(old)
    else:
        os.replace(work, target)  # rename(2) replaces an empty directory


def clear_leftovers(target: Path) -> None:
    """Removes the ``.<name>.old-*`` directories a crash during :func:`install` can leave,
    when they hold nothing but a modmoe preparation."""
    for stale in target.parent.glob(f".{target.name}.old-*"):
        inner = [p for p in stale.iterdir()] if stale.is_dir() else None
        if inner is not None and all(p.name == "data" and is_ours(p) for p in inner):
            shutil.rmtree(stale)
