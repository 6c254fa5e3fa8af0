"""Reading a work unit's documents, streamed with bounded memory, through kept libraries:
gzip and json (standard library), zstandard, pyarrow (Parquet) and ``datasets`` (directories
written by ``save_to_disk``). Every bad record is a one-line :class:`DataError` naming the file
and the line or row."""

from __future__ import annotations

import codecs
import gzip
import io
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modmoe.config_json import JSONInputError, parse_json
from modmoe.data.config import SourceConfig
from modmoe.data.documents import Document, utf8_prefix
from modmoe.data.errors import DataError
from modmoe.data.inputs import Span, Unit

_READ_BLOCK = 1 << 20
# zstd input is fed in pieces this small: the smallest block (3 header bytes and one byte to
# repeat) expands to at most 128 KiB, so one piece yields at most 32 MiB, whatever the file holds.
_ZSTD_PIECE = 1 << 10
_EXPANSION_SLACK = 4 << 20  # bytes any compressed file may expand to, whatever its ratio
_BLANK = b" \t\r\n"
_SMALL_FILE = 8 << 20  # text files up to this size are read whole; larger ones are streamed
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class ReadLimits:
    """What a reader accepts from a file, from the data config."""

    max_document_bytes: int
    """The longest JSONL line or Parquet/dataset text value."""
    max_compression_ratio: float
    """How many times its size (plus 4 MiB) a compressed JSONL file may expand to."""


class Skipped:
    """Counts what a unit left out, for the preparation's summary line."""

    def __init__(self) -> None:
        self.unreadable = 0
        self.empty = 0


# --- text files -------------------------------------------------------------------------


def _readable_text(path: Path) -> bool:
    """UTF-8 without NUL bytes, checked in one streaming pass (binary files are skipped)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as fh:
            while block := fh.read(_READ_BLOCK):
                if b"\x00" in block:
                    return False
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except (OSError, UnicodeDecodeError):
        return False
    return True


def _text_parts(path: Path, limit: int) -> Iterator[str]:
    """The file's text in parts, at most ``limit`` bytes of it (-1 = all), cut at a UTF-8
    character boundary."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
    left = limit if limit >= 0 else None
    with path.open("rb") as fh:
        while left is None or left > 0:
            block = fh.read(_READ_BLOCK if left is None else min(_READ_BLOCK, left))
            if not block:
                break
            if left is not None:
                left -= len(block)
            yield decoder.decode(block)
    # An incomplete final character (a cut inside it) is dropped, as utf8_prefix does.


def _read_text_file(span: Span, skipped: Skipped) -> Iterator[tuple[Document, Iterator[str] | None]]:
    path = Path(span.path)
    try:
        size = path.stat().st_size
    except OSError:
        skipped.unreadable += 1
        return
    if size == 0:
        skipped.empty += 1
        return
    if size <= _SMALL_FILE:
        try:
            raw = path.read_bytes()
            text = raw.decode("utf-8") if b"\x00" not in raw else None
        except (OSError, UnicodeDecodeError):
            text = None
        if text is None:
            skipped.unreadable += 1
            return
        if span.limit >= 0:
            text = utf8_prefix(text, span.limit)
        if not text:
            skipped.empty += 1
            return
        yield Document(text, str(path)), None
        return
    if not _readable_text(path):
        skipped.unreadable += 1
        return
    parts = _text_parts(path, span.limit)
    first = next(parts, "")
    yield Document(first, str(path)), parts  # the caller streams the rest of the file


# --- JSONL -------------------------------------------------------------------------------


class _ZstdReader(io.RawIOBase):
    """A zstd file (one or more frames) decompressed as a stream in bounded memory; input that
    ends inside a frame raises, where zstandard's stream reader would just stop."""

    def __init__(self, path: Path) -> None:
        import zstandard

        self._zstd = zstandard
        self._fh = path.open("rb")
        self._dec = zstandard.ZstdDecompressor().decompressobj()
        self._buf, self._pos, self._done, self._fresh = b"", 0, False, True
        self._input, self._input_pos = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def _next_piece(self) -> bytes:
        if self._input_pos == len(self._input):
            self._input, self._input_pos = memoryview(self._fh.read(_READ_BLOCK)), 0
        piece = self._input[self._input_pos : self._input_pos + _ZSTD_PIECE]
        self._input_pos += len(piece)
        return bytes(piece)

    def readinto(self, out: Any) -> int:
        while self._pos == len(self._buf) and not self._done:
            chunk = self._next_piece()
            if not chunk:
                if not self._fresh and not self._dec.eof:
                    raise self._zstd.ZstdError("the data ends inside a frame (truncated)")
                self._done = True
                break
            parts = []
            while chunk:
                if self._dec.eof:  # the next frame
                    self._dec = self._zstd.ZstdDecompressor().decompressobj()
                self._fresh = False
                parts.append(self._dec.decompress(chunk))
                chunk = self._dec.unused_data if self._dec.eof else b""
            self._buf, self._pos = b"".join(parts), 0
        n = min(len(out), len(self._buf) - self._pos)
        out[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class _ExpansionLimit(io.RawIOBase):
    """Decompressed bytes of ``inner``, refused past ``limit``: a small file that expands to
    gigabytes (of blank lines, or one endless line) is a bomb, not a corpus."""

    def __init__(self, inner: io.RawIOBase | io.BufferedIOBase, path: Path, limit: int, ratio: float) -> None:
        self._inner, self._path, self._limit, self._ratio, self._count = inner, path, limit, ratio, 0

    def readable(self) -> bool:
        return True

    def readinto(self, out: Any) -> int:
        n = self._inner.readinto(out)
        self._count += n or 0
        if self._count > self._limit:
            raise DataError(
                f"{self._path}: decompresses to more than {self._limit:,} bytes ({self._ratio:g} times its size plus "
                "4 MiB): a decompression bomb? Raise data.max_compression_ratio to accept it"
            )
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


def _open_jsonl(path: Path, max_ratio: float) -> io.BufferedReader:
    name = path.name.lower()
    if name.endswith(".gz"):
        inner: io.RawIOBase | io.BufferedIOBase = gzip.open(path, "rb")  # type: ignore[assignment]
    elif name.endswith(".zst"):
        inner = _ZstdReader(path)
    else:
        return path.open("rb")
    limit = int(path.stat().st_size * max_ratio) + _EXPANSION_SLACK
    return io.BufferedReader(_ExpansionLimit(inner, path, limit, max_ratio), _READ_BLOCK)


def _skip_blank_run(fh: io.BufferedReader) -> tuple[int, int]:
    """Consumes the whole blank lines (whitespace only) that follow, in bulk: a million empty
    lines cost one scan, not a million reads. Returns (bytes, lines) skipped."""
    skipped = lines = 0
    while True:
        ahead = fh.peek(_READ_BLOCK)[:_READ_BLOCK]
        blank = len(ahead) - len(ahead.lstrip(_BLANK))
        cut = ahead.rfind(b"\n", 0, blank) + 1  # only up to the end of the last whole blank line
        if cut == 0:
            return skipped, lines
        fh.read(cut)
        skipped += cut
        lines += ahead.count(b"\n", 0, cut)
        if cut < len(ahead):
            return skipped, lines


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` of an uncompressed file."""
    count = 0
    with path.open("rb") as fh:
        while offset > 0:
            block = fh.read(min(_READ_BLOCK, offset))
            if not block:
                break
            count += block.count(b"\n")
            offset -= len(block)
    return count + 1


def _decode_error(path: Path, where: str, err: BaseException) -> DataError:
    kind = "zstd" if path.name.lower().endswith(".zst") else "gzip"
    return DataError(f"{path}: undecodable {kind} data {where} ({err or type(err).__name__})")


def _text_value(value: Any, field: str, where: Callable[[], str], keys: Callable[[], str]) -> str:
    """``value`` if it is a string; ``where`` and ``keys`` are only called for the message."""
    if value is None:
        raise DataError(f"{where()}: {field!r} is missing or null ({keys()})")
    if not isinstance(value, str):
        raise DataError(f"{where()}: {field!r} is {type(value).__name__}, expected a string")
    return value


def _read_jsonl(unit: Unit, span: Span, limits: ReadLimits, skipped: Skipped) -> Iterator[Document]:
    path, max_doc = Path(span.path), limits.max_document_bytes
    field = unit.text_field
    with _open_jsonl(path, limits.max_compression_ratio) as fh:
        position, line_no = 0, 1
        if span.start > 0:  # a byte range: its lines are those that begin inside it
            fh.seek(span.start - 1)
            position = span.start - 1 + len(fh.readline())
            line_no = 0  # counted only if a message needs it
        stop = span.stop if span.stop >= 0 else None
        while stop is None or position < stop:
            try:
                line = fh.readline(max_doc + 2)
            except (OSError, EOFError, zlib.error) as err:
                raise _decode_error(path, f"near line {line_no or '?'}", err) from None
            except Exception as err:  # zstandard.ZstdError
                if type(err).__name__ == "ZstdError":
                    raise _decode_error(path, f"near line {line_no or '?'}", err) from None
                raise
            if not line:
                break

            line_start = position

            def where() -> str:
                number = line_no or _line_number(path, line_start)
                return f"{path}:{number}"

            if len(line) > max_doc + 1 or (len(line) == max_doc + 1 and not line.endswith(b"\n")):
                raise DataError(
                    f"{where()}: line longer than data.max_document_bytes = {max_doc} bytes (raise it to accept it)"
                )
            position += len(line)
            if line.strip():
                try:
                    record = parse_json(line, "")
                except JSONInputError as err:
                    raise DataError(f"{where()}{err}") from None
                if not isinstance(record, dict):
                    raise DataError(f"{where()}: a JSON {type(record).__name__}, expected an object with {field!r}")
                keys = lambda: "keys: " + (", ".join(list(record)[:8]) or "none")
                text = _text_value(record.get(field), field, where, keys)
                if text:
                    yield Document(text, where() if line_no else f"{path} (byte {line_start})")
                else:
                    skipped.empty += 1
            else:
                try:
                    nbytes, nlines = _skip_blank_run(fh)
                except (OSError, EOFError, zlib.error) as err:
                    raise _decode_error(path, f"near line {line_no or '?'}", err) from None
                except Exception as err:  # zstandard.ZstdError
                    if type(err).__name__ == "ZstdError":
                        raise _decode_error(path, f"near line {line_no or '?'}", err) from None
                    raise
                position += nbytes
                if line_no:
                    line_no += nlines
            if line_no:
                line_no += 1


# --- Parquet and saved datasets ----------------------------------------------------------


def _check_column(schema: Any, field: str, where: str) -> None:
    import pyarrow as pa

    names = list(schema.names)
    if field not in names:
        raise DataError(f"{where}: no column {field!r} (columns: {', '.join(names[:12])}); set the source's text_field")
    kind = schema.field(field).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{where}: column {field!r} has type {kind}, expected strings")


def _rows(
    values: list[Any], first_row: int, field: str, label: str, max_doc: int, skipped: Skipped
) -> Iterator[Document]:
    for i, text in enumerate(values):
        where = f"{label}: row {first_row + i}"
        text = _text_value(text, field, lambda: where, lambda: "null value")
        if len(text) > max_doc // 4 and len(text.encode("utf-8")) > max_doc:
            raise DataError(f"{where}: text longer than data.max_document_bytes = {max_doc} bytes")
        if text:
            yield Document(text, where)
        else:
            skipped.empty += 1


def parquet_row_groups(path: Path, unit_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """(first row group, row group count, rows, uncompressed bytes) runs of about ``unit_bytes``."""
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    first = rows = nbytes = 0
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        rows += group.num_rows
        nbytes += group.total_byte_size
        if nbytes >= unit_bytes or rg == meta.num_row_groups - 1:
            yield first, rg + 1 - first, rows, nbytes
            first, rows, nbytes = rg + 1, 0, 0


def _read_parquet(unit: Unit, span: Span, limits: ReadLimits, skipped: Skipped) -> Iterator[Document]:
    max_doc = limits.max_document_bytes
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(span.path)
    except Exception as err:
        raise DataError(f"{span.path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    _check_column(pf.schema_arrow, unit.text_field, span.path)
    row = span.row0
    try:
        batches = pf.iter_batches(
            batch_size=_BATCH_ROWS, row_groups=range(span.start, span.stop), columns=[unit.text_field]
        )
        for batch in batches:
            values = batch.column(0).to_pylist()
            yield from _rows(values, row, unit.text_field, span.path, max_doc, skipped)
            row += len(values)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{span.path}: unreadable Parquet data near row {row} ({str(err).splitlines()[0]})") from None


def load_hf_dataset(path: Path, src_split: str | None) -> Any:
    """A dataset saved with ``save_to_disk`` (memory-mapped Arrow files; nothing executes)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{path}: reading a saved dataset needs the datasets package (pip install 'modmoe[data]')"
        ) from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({str(err).splitlines()[0]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        name = src_split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
        if name not in splits:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; set the source's hf_split")
        loaded = loaded[name]
    elif src_split is not None:
        raise DataError(f"{path}: a single dataset has no split {src_split!r}; remove hf_split")
    return loaded


def hf_row_ranges(path: Path, src: SourceConfig, unit_bytes: int) -> Iterator[tuple[int, int, int]]:
    ds = load_hf_dataset(path, src.hf_split)
    _check_column(ds.data.schema, src.text_field, str(path))
    rows = len(ds)
    if rows == 0:
        return
    per_row = max(1.0, ds.data.nbytes / rows)
    step = max(1, int(unit_bytes / per_row))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        yield start, stop, int((stop - start) * per_row)


def _read_hf(unit: Unit, span: Span, limits: ReadLimits, skipped: Skipped) -> Iterator[Document]:
    max_doc = limits.max_document_bytes
    ds = load_hf_dataset(Path(span.path), unit.hf_split).with_format("arrow")
    for start in range(span.start, span.stop, _BATCH_ROWS):
        table = ds[start : min(span.stop, start + _BATCH_ROWS)]
        yield from _rows(table.column(unit.text_field).to_pylist(), start, unit.text_field, span.path, max_doc, skipped)


# --- dispatch ----------------------------------------------------------------------------


def read_unit(
    unit: Unit, limits: ReadLimits, skipped: Skipped
) -> Iterator[tuple[Document, Iterator[str] | None]]:
    """The unit's documents in order; a document from a large text file comes with an iterator
    of its remaining parts (streamed, never held whole)."""
    for span in unit.spans:
        if unit.kind in ("stdlib", "text"):
            yield from _read_text_file(span, skipped)
            continue
        reader = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}[unit.kind]
        for doc in reader(unit, span, limits, skipped):
            yield doc, None
