"""A real ``mlflow server`` on 127.0.0.1 for the tracking tests.

The server gets a free port, a SQLite backend and an artifact directory in a private temporary
directory; ``stop()``/``start()`` restart it on the same port and data (outage tests). Use the
module-scoped fixture (``from mlflow_server import mlflow_server``): starting takes 10-20 s on
a small machine, so one server serves a whole test module. ``MlflowUi`` runs the README's
``mlflow ui --backend-store-uri ...`` command the same way.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

_START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """One ``mlflow server`` process group; ``uri`` stays valid across restarts."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_file = root / "server.log"
        self._proc: subprocess.Popen | None = None

    @staticmethod
    def launcher() -> list[str]:
        script = Path(sys.executable).with_name("mlflow")
        return [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]

    def _command(self) -> list[str]:
        return self.launcher() + [
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'backend.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job-runner process: faster start
        with open(self.log_file, "ab") as log:
            self._proc = subprocess.Popen(
                self._command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root, start_new_session=True
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}:\n{self._tail()}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {_START_TIMEOUT_S:.0f} s:\n{self._tail()}")

    def stop(self) -> None:
        """Stops the server's process group (the launcher and its uvicorn worker)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # The worker may outlive the launcher for a moment; wait until the port is free.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
        try:  # a worker that ignored SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class MlflowUi(MlflowServer):
    """``mlflow ui --backend-store-uri URI`` as a user types it in ``cwd`` (the README's command),
    only on a free port."""

    def __init__(self, cwd: Path, backend_store_uri: str) -> None:
        super().__init__(cwd)
        self.backend_store_uri = backend_store_uri

    def _command(self) -> list[str]:
        return self.launcher() + [
            "ui",
            "--backend-store-uri",
            self.backend_store_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]


@pytest.fixture(scope="module")
def mlflow_server():
    root = Path(tempfile.mkdtemp(prefix="modmoe-mlflow-"))
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
