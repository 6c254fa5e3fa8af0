"""The one bounded JSON reader (modmoe/config_json.py) and the one contained-path check
(modmoe/file_paths.py) every file reader of issue 24 goes through."""

from __future__ import annotations

import os
import time

import pytest
from pydantic import BaseModel

from modmoe.config_json import JSONInputError, parse_json, read_json, validate_record
from modmoe.file_paths import escape_problem, not_regular_problem


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 64"),
        ('{"a": ' * 65 + "1" + "}" * 65, "nested deeper than 64"),
        ("9" * 100_000, "does not fit in 64 bits"),
        (str(2**63), "does not fit in 64 bits"),
        ("1e999", "overflows"),
        ("NaN", "NaN is not a JSON number"),
        ("-Infinity", "-Infinity is not a JSON number"),
        ('"\\ud800"', "surrogate"),
        ('{"\\udfff": 1}', "surrogate"),
        ('{"a": 1', "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_hostile_json_is_one_line_in_bounded_time(text, fragment):
    t0 = time.perf_counter()
    with pytest.raises(JSONInputError) as err:
        parse_json(text, "src.json")
    assert time.perf_counter() - t0 < 1.0
    assert str(err.value).startswith("src.json: ") and fragment in str(err.value) and "\n" not in str(err.value)


def test_what_modmoe_writes_reads_back():
    value = {
        "a": [1, -(2**63), 2**63 - 1, 1.5e300, "\U0001f600 ok (an escaped surrogate pair)", None, True],
        "b": {"c": [[[]]]},
    }
    import json

    assert parse_json(json.dumps(value), "x") == value
    assert parse_json(json.dumps(value, ensure_ascii=False).encode(), "x") == value


def test_read_json_bounds_size_and_refuses_what_is_not_a_file(tmp_path):
    big = tmp_path / "big.json"
    big.write_text("[" + "1," * 1000 + "1]")
    with pytest.raises(JSONInputError, match="more than such a file may have"):
        read_json(big, max_bytes=100)
    assert len(read_json(big, max_bytes=10_000)) == 1001
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    with pytest.raises(JSONInputError, match="not a regular file"):
        read_json(fifo, max_bytes=100)  # no writer: an open() that blocks would hang here
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(JSONInputError, match="cannot be read"):
        read_json(tmp_path / "missing.json", max_bytes=100)


class _Record(BaseModel):
    size: int
    name: str


def test_validate_record_names_the_first_bad_field():
    assert validate_record(_Record, {"size": 3, "name": "x"}, "f.json").size == 3
    with pytest.raises(JSONInputError) as err:
        validate_record(_Record, {"size": "big", "name": "x"}, "f.json")
    assert str(err.value).startswith("f.json: field size = 'big': ")


def test_escape_problem_keeps_paths_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    os.symlink("/etc", tmp_path / "out")
    assert escape_problem(tmp_path, "sub/a.bin") is None and escape_problem(tmp_path, "a.bin") is None
    for rel, fragment in [
        ("/etc/passwd", "absolute"),
        ("../x", "leads out"),
        ("sub/../../x", "leads out"),
        ("a\\b", "leads out"),
        ("C:x", "absolute"),
        ("out/passwd", "symlink"),
        ("", "not a relative file name"),
        ("a\x00b", "not a relative file name"),
    ]:
        assert fragment in (escape_problem(tmp_path, rel) or ""), rel


def test_not_regular_problem_says_what_a_path_is(tmp_path):
    (tmp_path / "f").write_text("x")
    os.mkfifo(tmp_path / "p")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert not_regular_problem(tmp_path / "f") is None
    assert "FIFO" in not_regular_problem(tmp_path / "p")
    assert "device" in not_regular_problem("/dev/zero")
    assert "directory" in not_regular_problem(tmp_path)
    assert "symlink loop" in not_regular_problem(tmp_path / "loop")
    assert "dangling" in not_regular_problem(tmp_path / "dangling")
    assert "no such file" in not_regular_problem(tmp_path / "nothing")
