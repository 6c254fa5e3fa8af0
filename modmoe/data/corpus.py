"""Reading the raw text corpus: the standard library's own sources, or files from a glob.

Documents are taken in sorted path order and capped at ``max_corpus_bytes`` so the same config
always yields the same text. Each document carries a stable ``key`` (its path relative to the
corpus root) that decides its train/val split.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from modmoe.config_base import field_error
from modmoe.data.config import DataConfig
from modmoe.data.errors import DataError

# Third-party code is not the standard library, and a venv or distro may nest it inside.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_GLOB_MAGIC = set("*?[")


@dataclass(frozen=True)
class Document:
    key: str
    """Path relative to the corpus root, with ``/`` separators (stable across machines)."""
    text: str


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
    """The leading directories of ``pattern`` that hold no wildcard: keys are relative to it,
    so moving the whole corpus does not reshuffle the split."""
    parts = Path(pattern).parts
    fixed: list[str] = []
    for part in parts[:-1]:
        if _GLOB_MAGIC & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _glob_files(pattern: str) -> list[tuple[str, Path]]:
    root = glob_root(pattern)
    found = []
    for match in glob.glob(pattern, recursive=True):
        path = Path(match)
        if path.is_file():
            found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it cannot be read or is not UTF-8 text."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if not raw or b"\x00" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _truncate_utf8(text: str, max_bytes: int) -> str:
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


def iter_documents(cfg: DataConfig, log: Callable[[str], None] = print) -> Iterator[Document]:
    """Yields the corpus documents in sorted key order; the document that crosses
    ``max_corpus_bytes`` is cut to fit and ends the corpus."""
    if cfg.corpus == "stdlib":
        files = _stdlib_files(stdlib_root())
        where = f"the standard library at {stdlib_root()}"
    else:
        if not cfg.corpus_glob:
            raise field_error(
                "data.corpus_glob", cfg.corpus_glob, "set a glob of text files when data.corpus = 'files'"
            )
        files = _glob_files(os.path.expanduser(cfg.corpus_glob))
        where = f"files matching data.corpus_glob = {cfg.corpus_glob!r}"
    budget = cfg.max_corpus_bytes
    used = skipped = count = 0
    for key, path in files:
        text = _read_text(path)
        if text is None:
            skipped += 1
            continue
        size = len(text.encode("utf-8"))
        if used + size > budget:
            text = _truncate_utf8(text, budget - used)
            size = len(text.encode("utf-8"))
        if text:
            used += size
            count += 1
            yield Document(key, text)
        if used >= budget:
            break
    if count == 0:
        raise DataError(f"corpus is empty: no readable UTF-8 text among {where} ({skipped} files skipped)")
    log(f"corpus: {count} documents, {used:,} bytes from {where} ({skipped} unreadable/binary skipped)")


def read_corpus(cfg: DataConfig, log: Callable[[str], None] = print) -> list[Document]:
    return list(iter_documents(cfg, log))
