"""Finding a source's files and cutting them into work units.

A unit is a run of consecutive input (whole files, byte ranges of a JSONL file, Parquet row
groups, dataset rows) of about ``unit_bytes``. Units are planned from file sizes and metadata
only, so planning reads no text; each unit is tokenized by one worker, and the source's token
stream is its units' outputs in order, whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from modmoe.data.config import SourceConfig
from modmoe.data.errors import DataError
from modmoe.file_paths import not_regular_problem

# Third-party code is not the standard library, and a venv or distro may nest it inside.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_GLOB_MAGIC = set("*?[")
_SUFFIXES = {
    "jsonl": (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst"),
    "parquet": (".parquet",),
}
COMPRESSED = (".gz", ".zst")


@dataclass(frozen=True)
class Span:
    path: str
    size: int
    """File size in bytes (with ``mtime_ns``, detects a file changed since planning)."""
    mtime_ns: int
    start: int = 0
    """jsonl: first byte; parquet: first row group; hf: first row."""
    stop: int = -1
    """Exclusive end in the same unit as ``start`` (-1 = the end)."""
    limit: int = -1
    """text: bytes taken from the file (-1 = all)."""
    row0: int = 0
    """parquet: the file row number of the first row group's first row."""


@dataclass(frozen=True)
class Unit:
    source: str
    index: int
    kind: str
    text_field: str
    hf_split: str | None
    spans: tuple[Span, ...]
    nbytes: int
    """Input bytes (for progress and the ``max_bytes`` budget)."""

    def digest(self) -> str:
        """Identifies the unit's exact input: a finished unit is kept on re-run only if this
        still matches."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def glob_root(pattern: str) -> Path:
    """The leading directories of ``pattern`` that hold no wildcard: files are ordered by their
    path relative to it, so moving the whole corpus does not reorder it."""
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if _GLOB_MAGIC & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _matches(name: str, kind: str) -> bool:
    return kind not in _SUFFIXES or name.lower().endswith(_SUFFIXES[kind])


def _regular(path: Path, seen: set[tuple[int, int]]) -> bool:
    """A regular file (a symlink to one counts; a FIFO or a device would block or never end)
    not met before: two names of one file (links, a symlinked directory) are read once."""
    try:
        info = path.stat()
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) in seen:
        return False
    seen.add((info.st_dev, info.st_ino))
    return True


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)


def _glob(pattern: str) -> Iterator[tuple[str, Path]]:
    """(path relative to the glob root, path) of every match. ``**`` descends into real
    directories only, never through a directory symlink, so a symlink loop (``ln -s . a``)
    can neither hang the search nor read a file twice; as with the shell, wildcards match no
    hidden (dot) names unless the pattern spells the dot."""
    root = glob_root(pattern)
    rest = Path(pattern).relative_to(root) if root != Path(".") else Path(pattern)
    dotted = _hidden(rest.parts)
    for path in root.glob(str(rest)):  # pathlib's ``**`` does not follow symlinks (Python >= 3.11)
        rel = path.relative_to(root)
        if dotted or not _hidden(rel.parts):
            yield rel.as_posix(), path


def source_files(src: SourceConfig, kind: str, label: str) -> list[Path]:
    """The source's regular files in order: sorted by path relative to the glob root (or
    directory). A direct path that is not a regular file is refused in one line saying what it is."""
    if kind == "stdlib":
        return [path for _, path in _stdlib_files(stdlib_root())]
    assert src.path is not None
    pattern = os.path.expanduser(src.path)
    found: list[tuple[str, Path]] = []
    seen: set[tuple[int, int]] = set()
    if _GLOB_MAGIC & set(pattern):
        found = [(rel, path) for rel, path in sorted(_glob(pattern)) if _regular(path, seen)]
    elif Path(pattern).is_dir():
        root = Path(pattern)
        for dirpath, dirnames, filenames in os.walk(root):  # never into a directory symlink
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath, name)
                if not name.startswith(".") and _matches(name, kind) and _regular(path, seen):
                    found.append((path.relative_to(root).as_posix(), path))
    elif (why := not_regular_problem(pattern)) is None:
        found.append((Path(pattern).name, Path(pattern)))
    else:
        raise DataError(f"{label} = {src.path!r}: {why}")
    return [path for _, path in sorted(found)]


def _span(path: Path, **fields: int) -> Span:
    st = path.stat()
    return Span(str(path), st.st_size, st.st_mtime_ns, **fields)


def _candidate_spans(src: SourceConfig, kind: str, files: list[Path], unit_bytes: int) -> list[tuple[Span, int]]:
    """(span, input bytes) in order, each at most about ``unit_bytes`` where the format allows
    cutting (plain JSONL by byte range, Parquet by row group, datasets by rows)."""
    spans: list[tuple[Span, int]] = []
    if kind in ("stdlib", "text"):
        for path in files:
            span = _span(path)
            spans.append((span, span.size))
    elif kind == "jsonl":
        for path in files:
            span = _span(path)
            if path.name.lower().endswith(COMPRESSED) or span.size <= unit_bytes:
                spans.append((span, span.size))
                continue
            for start in range(0, span.size, unit_bytes):
                stop = min(span.size, start + unit_bytes)
                spans.append((Span(span.path, span.size, span.mtime_ns, start=start, stop=stop), stop - start))
    elif kind == "parquet":
        from modmoe.data.readers import parquet_row_groups

        for path in files:
            span, row0 = _span(path), 0
            for first, count, rows, nbytes in parquet_row_groups(path, unit_bytes):
                spans.append((Span(span.path, span.size, span.mtime_ns, first, first + count, row0=row0), nbytes))
                row0 += rows
    elif kind == "hf":
        from modmoe.data.readers import hf_row_ranges

        for path in files:
            span = _span(path)
            for start, stop, nbytes in hf_row_ranges(path, src, unit_bytes):
                spans.append((Span(span.path, span.size, span.mtime_ns, start=start, stop=stop), nbytes))
    else:
        raise DataError(f"source kind {kind!r} is not prepared (Megatron datasets are read directly)")
    return spans


def _cap(span: Span, nbytes: int, kind: str, room: int) -> tuple[Span, int] | None:
    """The part of a span that fits the remaining ``max_bytes`` budget, or None when it must
    be taken whole (or left out, when room is 0)."""
    if room <= 0:
        return None
    if kind in ("stdlib", "text"):
        return Span(**{**asdict(span), "limit": room}), room
    if kind == "jsonl" and not span.path.lower().endswith(COMPRESSED):
        stop = span.stop if span.stop >= 0 else span.size
        return Span(**{**asdict(span), "stop": min(stop, span.start + room)}), room
    return span, nbytes


def plan_units(src: SourceConfig, name: str, label: str, unit_bytes: int) -> list[Unit]:
    """The work units of one source, in stream order."""
    kind = src.resolved_kind()
    if kind == "hf":
        files = [Path(os.path.expanduser(src.path or ""))]
        if not files[0].is_dir():
            raise DataError(f"{label} = {src.path!r}: not a directory written by save_to_disk")
    else:
        files = source_files(src, kind, label)
    if not files:
        raise DataError(f"{label} = {src.path!r}: corpus is empty: matches no {kind} files")
    units: list[Unit] = []
    pending: list[Span] = []
    pending_bytes = used = 0
    budget = src.max_bytes

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            units.append(Unit(name, len(units), kind, src.text_field, src.hf_split, tuple(pending), pending_bytes))
            pending, pending_bytes = [], 0

    for span, nbytes in _candidate_spans(src, kind, files, unit_bytes):
        if budget is not None and used + nbytes > budget:
            capped = _cap(span, nbytes, kind, budget - used)
            if capped is not None:
                pending.append(capped[0])
                pending_bytes += capped[1]
            used = budget
            break
        pending.append(span)
        pending_bytes += nbytes
        used += nbytes
        if pending_bytes >= unit_bytes:
            flush()
    flush()
    return units
