"""Where a path may lead: paths read from a file stay inside that file's directory, and the
files modmoe reads as data are regular files (a FIFO or a device would block or never end).

A leaf module (it imports nothing of modmoe): every package checks paths the same way and
raises its own one-line error with the reason given here.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path, PurePosixPath


def escape_problem(root: str | os.PathLike, rel: str) -> str | None:
    """Why ``rel`` (read from a file in ``root``) may not be followed from ``root``, or None: it
    is empty, absolute, climbs with ``..``, uses backslashes or a drive letter, or is (or passes)
    a symlink that leads out of ``root``."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return f"path {rel!r} is not a relative file name"
    if rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        return f"path {rel!r} is absolute (it must be relative to {root})"
    if ".." in PurePosixPath(rel).parts or "\\" in rel:
        return f"path {rel!r} leads out of {root}"
    base = Path(root).resolve()
    if not (base / rel).resolve().is_relative_to(base):
        return f"path {rel!r} is a symlink that leads out of {root}"
    return None


def not_regular_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a regular file modmoe can read as data, or None when it is one:
    missing, a directory, a FIFO, a device, a socket, a symlink loop, or not permitted."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symlink loop"
        if err.errno == errno.ENOENT:
            return "is a dangling symlink" if os.path.islink(path) else "no such file or directory"
        return f"cannot be read ({err.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"
