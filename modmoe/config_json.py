"""JSON files read in bounded time and memory, and checked before anyone walks them.

Every JSON file modmoe reads that someone else may have written (a checkpoint's manifest and
RNG states, a prepared directory's index, marker and unit records, an export's config and
index, a tokenizer and its config, each line of a JSONL corpus) goes through
:func:`parse_json` or :func:`read_json`, which refuse in one line naming the source:

- more than the caller's ``max_bytes`` (the file's size is checked before it is read);
- text that is not UTF-8, or a lone UTF-16 surrogate (``"\\ud800"``), which no encoder takes;
- nesting deeper than ``max_depth`` (``[`` 100,000 deep would exhaust the recursion limit);
- ``NaN``/``Infinity``, a float that overflows (``1e999``) and an integer outside 64 bits
  (a 100,000-digit integer takes quadratic time to convert, and no field needs one).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from typing import Any, TypeVar

import pydantic

from modmoe.errors import UserError

Record = TypeVar("Record", bound=pydantic.BaseModel)

MAX_DEPTH = 64
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_MAX_INT_DIGITS = 19  # INT64_MAX has 19 digits: longer literals are refused before conversion
_SURROGATE = re.compile("[\ud800-\udfff]")


class JSONInputError(UserError, ValueError):
    """A JSON file or line that cannot be used; the message is one line naming it."""


def _parse_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > _MAX_INT_DIGITS or not INT64_MIN <= (value := int(text)) <= INT64_MAX:
        raise JSONInputError(f"the integer {text[:24]}{'…' if len(text) > 24 else ''} does not fit in 64 bits")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONInputError(f"the number {text[:24]} overflows a float")
    return value


def _parse_constant(name: str) -> float:
    raise JSONInputError(f"{name} is not a JSON number")


def _depth_problem(value: Any, max_depth: int) -> str | None:
    """Walks the parsed value without recursion; the first container deeper than ``max_depth``."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return None


def _surrogate_problem(text: str, value: Any) -> str | None:
    """Only a ``\\uXXXX`` escape can make a surrogate (UTF-8 decoding refuses them)."""
    if "\\u" not in text:
        return None
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if _SURROGATE.search(node):
                return "a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text"
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def parse_json(data: str | bytes, source: str, max_depth: int = MAX_DEPTH) -> Any:
    """The value of one JSON document, or a one-line :class:`JSONInputError` naming ``source``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
    except UnicodeDecodeError as err:
        raise JSONInputError(f"{source}: not UTF-8 text (byte {err.start})") from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except JSONInputError as err:
        raise JSONInputError(f"{source}: {err}") from None
    except json.JSONDecodeError as err:
        raise JSONInputError(f"{source}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise JSONInputError(f"{source}: nested deeper than {max_depth} levels") from None
    except ValueError as err:  # an integer literal the interpreter refuses to convert
        raise JSONInputError(f"{source}: a value cannot be read ({str(err)[:120]})") from None
    problem = _depth_problem(value, max_depth) or _surrogate_problem(text, value)
    if problem is not None:
        raise JSONInputError(f"{source}: {problem}")
    return value


def read_json(path: str | os.PathLike, max_bytes: int, source: str | None = None, max_depth: int = MAX_DEPTH) -> Any:
    """Parses the JSON file at ``path``: a regular file of at most ``max_bytes`` (a FIFO or a
    device is refused without blocking on it)."""
    source = source or str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise JSONInputError(f"{source}: cannot be read ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JSONInputError(f"{source}: not a regular file")
        if info.st_size > max_bytes:
            raise JSONInputError(f"{source}: {info.st_size} bytes, more than such a file may have ({max_bytes})")
        try:
            data = fh.read(max_bytes + 1)
        except OSError as err:
            raise JSONInputError(f"{source}: cannot be read ({err.strerror or err})") from None
    if len(data) > max_bytes:  # it grew while being read
        raise JSONInputError(f"{source}: more than {max_bytes} bytes")
    return parse_json(data, source, max_depth)


def validate_record(model_cls: type[Record], data: Any, source: str) -> Record:
    """``data`` as the typed record ``model_cls``, or one line naming the first bad field."""
    try:
        return model_cls.model_validate(data)
    except pydantic.ValidationError as err:
        first = err.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]) or "<root>"
        value = first.get("input")
        shown = "" if isinstance(value, dict | list) else f" = {str(value)[:60]!r}"
        raise JSONInputError(f"{source}: field {field}{shown}: {first['msg']}") from None
