"""Path rules of ``convert``: names read from files never leave their directory, and the
destination starts empty."""

from __future__ import annotations

import re
from pathlib import Path

from checkpoints_tools.convert_errors import ConvertError

# A directory name taken from a file (a DeepSpeed tag, a parameter name): no separators, no
# "." or ".." and nothing a shell or another OS would read differently.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


def safe_child(root: Path, name: str, what: str) -> Path:
    """``root / name`` for a ``name`` read from a file; refuses one that could point elsewhere
    (separators, ``..``, a symlink out of ``root``)."""
    if not _SAFE_NAME.match(name) or name in (".", ".."):
        raise ConvertError(f"{what} = {name!r}: must be one path component of letters, digits, '_', '.', '-'")
    path = root / name
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise ConvertError(f"{what} = {name!r}: leads out of {root}")
    return path


def require_empty_dst(dst: Path) -> None:
    """Refuses a destination that exists and is not an empty directory."""
    if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
        raise ConvertError(f"DST {dst}: exists and is not a directory (give a new or empty directory)")
    if dst.is_dir() and any(dst.iterdir()):
        raise ConvertError(f"DST {dst}: exists and is not empty (give a new or empty directory)")
