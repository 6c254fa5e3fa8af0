"""The Megatron engine on a real GPU (skipped without CUDA): the verification script's phases
in --quick mode (small model, few steps), each a fresh process as on a cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

from runs import REPO

SCRIPT = REPO / "benchmarks" / "gpu_verify_megatron.py"


def _verify(tmp_path: Path, phases: str, *extra: str) -> str:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--phases",
        phases,
        "--work",
        str(tmp_path / "work"),
        "--out",
        str(tmp_path / "gpu.md"),
        "--train-steps",
        "12",
        "--bench-steps",
        "3",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    report = (tmp_path / "gpu.md").read_text() if (tmp_path / "gpu.md").exists() else ""
    assert proc.returncode == 0, report + proc.stdout[-2000:] + proc.stderr[-4000:]
    return report


def _phase(tmp_path: Path, name: str) -> dict:
    return json.loads((tmp_path / "work" / f"{name}.json").read_text())


def test_megatron_logits_match_the_native_model_on_gpu(tmp_path):
    _verify(tmp_path, "logits")
    result = _phase(tmp_path, "logits")
    assert result["local/fp32"]["rel_err"] < 1e-3 and result["local/bf16"]["ok"]
    te = [k for k in result if k.startswith("transformer_engine/")]
    assert all(result[k]["ok"] for k in te)


def test_megatron_trains_resumes_and_exports_on_gpu(tmp_path):
    report = _verify(tmp_path, "train,resume,export")
    train = _phase(tmp_path, "train")
    assert train["last_loss"] < train["first_loss"]
    assert _phase(tmp_path, "resume")["max_rel_loss_diff"] < 1e-2
    assert _phase(tmp_path, "export")["rel_diff"] < 1e-2
    assert "all checks passed" in report


def test_megatron_throughput_phase_on_gpu(tmp_path):
    report = _verify(tmp_path, "bench")
    bench = _phase(tmp_path, "bench-mode-bf16")
    assert bench["tokens_per_s"] > 0 and bench["max_mem_gib"] > 0
    assert "MoDE / MoE-only tokens/s" in report
