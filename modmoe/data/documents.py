"""What every source kind shares once a document is read: its train/val assignment and the
bounded pieces it is encoded in."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CHUNK_CHARS = 1 << 18
"""Documents are encoded in pieces of at most this many characters, so a document of hundreds
of MB (or one line without whitespace) costs bounded memory and time."""
_SPLIT_PREFIX_CHARS = 1 << 16  # the split hash reads the first 64 Ki characters (< CHUNK_CHARS // 2)


@dataclass(frozen=True)
class Document:
    text: str
    where: str
    """File and line or row, for error messages."""


def val_score(text: str) -> float:
    """Uniform in [0, 1), a function of the document's first characters only: the same text is in
    the same split whatever file, format or position it comes from, and duplicates never straddle
    the split."""
    digest = hashlib.blake2b(text[:_SPLIT_PREFIX_CHARS].encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _cut(buf: str, pos: int) -> int:
    """Where to end the piece that starts at ``pos`` (more than CHUNK_CHARS remain): after the
    last newline in the second half of the window, else the last space there, else at its end."""
    for sep in ("\n", " "):
        at = buf.rfind(sep, pos + CHUNK_CHARS // 2, pos + CHUNK_CHARS)
        if at >= 0:
            return at + 1
    return pos + CHUNK_CHARS


def chunk_stream(parts: Iterable[str]) -> Iterator[str]:
    """Re-cuts a document given as consecutive parts into encoding pieces. The cuts depend only
    on the text, never on how it arrived, so a streamed file and the same text held in memory
    give the same pieces (and tokens)."""
    buf = ""
    for part in parts:
        buf, pos = buf + part, 0
        while len(buf) - pos > CHUNK_CHARS:
            end = _cut(buf, pos)
            yield buf[pos:end]
            pos = end
        buf = buf[pos:]
    if buf:
        yield buf


def utf8_prefix(text: str, max_bytes: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 encoding fits ``max_bytes``."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
