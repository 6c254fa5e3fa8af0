"""Issue 24, finding 19: docs/compile.md says which compile path to take and holds a reproduction
of the inductor failure for an upstream report; this keeps the page in step with the code (its
script imports what exists, the options it recommends are the compile step's), and the slow pass
reruns the reproduction to notice when an upgraded torch fixes it."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modmoe.parallel.compile import compile_options

REPO = Path(__file__).resolve().parents[3]
PAGE = REPO / "docs" / "compile.md"


def _reproduction() -> str:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, "docs/compile.md holds one Python reproduction"
    return blocks[0]


def test_issue24_19_the_page_names_the_path_to_take_and_it_is_the_compile_steps():
    text = PAGE.read_text(encoding="utf-8")
    assert "trainer.compile" in text and "compile_options" in text
    options = compile_options("inductor", False, True)
    assert options["dynamic"] is False and options["fullgraph"] is True
    assert options["options"]["inplace_buffers"] is False
    assert "docs/compile.md" in (REPO / "docs" / "parallelism.md").read_text(encoding="utf-8")


def test_issue24_19_the_reproduction_imports_what_exists():
    tree = ast.parse(_reproduction())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("modmoe"):
            module = importlib.import_module(node.module)
            assert all(hasattr(module, alias.name) for alias in node.names), node.module
    assert "torch.compile(model, fullgraph=True)" in _reproduction()


@pytest.mark.slow
def test_the_reproduction_still_fails_upstream(tmp_path):
    """Minutes of inductor compilation. When this fails, torch fixed the bug: update docs/compile.md."""
    script = tmp_path / "repro.py"
    script.write_text(_reproduction())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode != 0 and "UnboundLocalError" in proc.stderr, proc.stderr[-2000:]
