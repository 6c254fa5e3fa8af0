"""A rank blocked in a collective whose peer hangs or dies leaves within ``parallel.timeout_s``
with one line naming the cause and status 75, while rank 0's set-up may take longer than that
(``parallel.setup_timeout_s``); real gloo ranks under torchrun."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
from runs import REPO, TEST_PYTHONPATH

from modmoe.parallel.failures import EXIT_PEER_LOST

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(180)]
WORKER = REPO / "tests" / "support" / "comm_timeout_worker.py"
TIMEOUT_S = 3.0


def _run(mode: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TEST_PYTHONPATH}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--tee=3"]
        + [str(WORKER), mode, str(TIMEOUT_S)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    return proc, time.monotonic() - started


@pytest.mark.parametrize("mode", ["hang", "die"])
def test_blocked_collective_with_a_lost_peer_exits_75_with_one_line(mode: str) -> None:
    proc, wall = _run(mode)
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if "error: rank 0:" in ln]
    assert proc.returncode != 0 and len(lines) == 1, out[-4000:]
    assert f"exitcode  : {EXIT_PEER_LOST}" in out, out[-4000:]  # torchrun's record of rank 0
    waited = float(re.search(r"\[after ([\d.]+) s\]", lines[0]).group(1))
    if mode == "hang":
        # Rank 0's set-up took twice the collective timeout: rank 1 waited (setup_timeout_s).
        assert "rank 0 set up" in out and "rank 1 set up" in out, out[-4000:]
        # gloo gives up on the silent peer after the timeout, not before, and not much later.
        assert "did not answer within parallel.timeout_s" in lines[0], lines[0]
        assert TIMEOUT_S - 0.1 <= waited < TIMEOUT_S + 5, waited
    else:
        # A dead process's connections are reset by its kernel: no need to wait for the timeout.
        assert "connection to a peer rank was lost" in lines[0], lines[0]
        assert waited < TIMEOUT_S + 5, waited
    assert wall < 120, wall
