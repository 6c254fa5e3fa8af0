"""The GPU check's CPU rehearsal: the same script, phases and report as on a lent GPU, with a
tiny model (``--device cpu --quick``). About a minute on two loaded cores: six phase processes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from runs import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def rehearse(tmp_path, phases: str) -> tuple[dict, str]:
    doc = tmp_path / "gpu.md"
    shutil.copy(REPO / "docs" / "gpu.md", doc)
    cmd = [sys.executable, str(SCRIPT), "--out-dir", str(tmp_path / "out"), "--doc", str(doc), "--device", "cpu"]
    cmd += ["--quick", "--phases", phases, "--steps", "2", "--warmup", "1", "--micro-batch", "2"]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[gpu-check] torch:" in proc.stdout and "gpu_check_ok=1" in proc.stdout
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text()), doc.read_text()


def test_cpu_rehearsal_runs_every_phase_and_writes_the_report(tmp_path):
    data, doc = rehearse(tmp_path, "correctness,speed")
    results = data["results"]
    checks = results["correctness"]["checks"]
    assert {"bf16_vs_fp32_logits", "grouped_vs_loop_fp32_grads", "compiled_vs_eager_grads"} <= set(checks)
    assert all(c["ok"] for c in checks.values())
    rows = [row for name, r in results.items() if name.startswith("speed") for row in r["rows"]]
    got = {(r["variant"], r["precision"].split(" ")[0], r["mode"]) for r in rows}
    assert got == {
        *((v, "bf16", m) for v in ("mode", "moe_only", "dense") for m in ("eager", "compiled")),
        ("mode", "fp8", "compiled"),
        ("moe_only", "fp8", "compiled"),
    }
    assert all(r["tokens_per_s"] > 0 and r["ok"] for r in rows)
    # The doc keeps its hand-written part; the results section holds the tables and the command.
    assert doc.startswith("# The GPU check") and "## 1. Carry the wheels" in doc
    assert doc.count("<!-- gpu_check results: begin -->") == 1 and "No GPU has been lent" not in doc
    assert (
        "python benchmarks/gpu_check.py --out-dir" in doc and "| mode | fp8 (cpu: fp32, emulated) | compiled |" in doc
    )
    assert (tmp_path / "out" / "gpu.md").read_text() == doc


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("megatron") is None, reason="megatron-core not installed")
def test_cpu_rehearsal_of_the_megatron_phase(tmp_path):
    data, doc = rehearse(tmp_path, "megatron")
    assert data["results"]["megatron"]["ok"] and "### Megatron engine" in doc
