"""The run-directory lock across processes: a holder is named, a killed holder frees the
directory at once, and a requeued Slurm job waits for its predecessor's lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from modmoe.train.run_lock import LOCK_FILE, RunDirLockedError, RunLock

HOLD = """
import sys, time
from modmoe.train.run_lock import RunLock
lock = RunLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def _holder(tmp_path, env=None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_job_is_refused_naming_the_holder_and_a_dead_holder_frees_it(tmp_path):
    holder = _holder(tmp_path, {"SLURM_JOB_ID": "4242"})
    try:
        with pytest.raises(RunDirLockedError) as err:
            RunLock(tmp_path).acquire()
        message = str(err.value)
        assert f"pid {holder.pid}" in message and "Slurm job 4242" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the lock
        holder.wait()
    lock = RunLock(tmp_path)
    assert lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_requeued_job_waits_for_its_predecessor(tmp_path, monkeypatch):
    holder = _holder(tmp_path, {"SLURM_JOB_ID": "77"})
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    t0 = time.monotonic()
    killer = subprocess.Popen(["sh", "-c", f"sleep 1.5; kill -9 {holder.pid}"])
    lock = RunLock(tmp_path, requeue_wait_s=30)
    assert lock.acquire()
    assert 1.0 < time.monotonic() - t0 < 20
    lock.release()
    killer.wait()
    holder.wait()
