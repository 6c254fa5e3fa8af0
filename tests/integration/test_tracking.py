"""MlflowTracker against a real ``mlflow server`` on loopback (one server for the module)."""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow_server import free_port
from typer.testing import CliRunner

from modmoe.tracking import (
    MlflowTracker,
    TrackingConfig,
    default_tags,
    depth_routing_map,
    expert_load_heatmap,
    flatten_config,
    replay_spool,
    tracking_app,
)
from modmoe.tracking.spool import logged_steps, read, spool_path


def _cfg(uri: str, **kw) -> TrackingConfig:
    base = dict(
        tracking_uri=uri,
        experiment=f"t-{uuid.uuid4().hex[:8]}",
        flush_interval_s=0.2,
        max_retries=1,
        retry_backoff_s=0.05,
        http_timeout_s=5,
    )
    return TrackingConfig(**(base | kw))


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "modmoe.tracking" and r.levelno == logging.WARNING]


def test_metrics_params_artifacts_arrive(mlflow_server, tmp_path: Path) -> None:
    nested = {
        "model": {"dim": 256, "moe": {"experts": 8, "router": "softmax"}},
        "optim": {"lr": 3e-4, "betas": [0.9, 0.95]},
        "many": {f"k{i}": i for i in range(150)},  # > MLflow's 100 params per batch
        "note": "x" * 7000,
    }  # > MLflow's 6000-character param cap
    params = flatten_config(nested)
    run_dir = tmp_path / "run"
    tracker = MlflowTracker(_cfg(mlflow_server.uri), run_dir, params=params, tags=default_tags("native", "dp1"))
    for step in range(1, 26):
        tracker.log_metrics({"train/loss": 10.0 / step, "lr": step * 1e-4}, step)
    heat = expert_load_heatmap(np.full((2, 4), 0.25), ["layer 0", "layer 1"], tmp_path / "load.png")
    route = depth_routing_map(["a", "b", "c"], np.array([[1, 0, 1]], bool), ["block 1"], tmp_path / "route.png")
    cfg_file = tmp_path / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(nested))
    tracker.log_artifact(heat, "plots")
    tracker.log_artifact(route, "plots")
    heat.unlink()  # the tracker took a copy at call time
    tracker.log_artifact(cfg_file)
    tracker.log_text("hello", "notes/hello.txt")
    tracker.log_dict({"a": 1}, "resolved.yaml")
    run_id = tracker.run_id
    tracker.close()

    client = MlflowClient(mlflow_server.uri)
    assert _history(client, run_id, "train/loss") == [(s, pytest.approx(10.0 / s)) for s in range(1, 26)]
    assert [s for s, _ in _history(client, run_id, "lr")] == list(range(1, 26))
    run = client.get_run(run_id)
    expected = dict(params, note="x" * 6000)
    assert run.data.params == expected
    assert run.data.tags["engine"] == "native" and run.data.tags["parallel_layout"] == "dp1"
    assert run.info.status == "FINISHED"
    assert {f.path for f in client.list_artifacts(run_id, "plots")} == {"plots/load.png", "plots/route.png"}
    top = {f.path for f in client.list_artifacts(run_id)}
    assert {"config.yaml", "resolved.yaml", "notes"} <= top
    downloaded = client.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(Path(downloaded).read_text()) == nested
    assert not spool_path(run_dir).exists()
    assert not any((run_dir / "mlflow_staging").iterdir())  # staged copies removed once sent


def test_resume_continues_the_same_run(mlflow_server, tmp_path: Path) -> None:
    cfg = _cfg(mlflow_server.uri)
    first = MlflowTracker(cfg, tmp_path)
    for step in range(1, 6):
        first.log_metrics({"loss": float(step)}, step)
    run_id = first.run_id
    first.close()

    second = MlflowTracker(cfg, tmp_path, run_id=run_id)
    assert second.run_id == run_id
    second.flush()
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    for step in range(6, 11):
        second.log_metrics({"loss": float(step)}, step)
    second.close()

    exp = client.get_experiment_by_name(cfg.experiment)
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [run_id]
    assert _history(client, run_id, "loss") == [(s, float(s)) for s in range(1, 11)]
    assert client.get_run(run_id).info.status == "FINISHED"

    with pytest.raises(RuntimeError, match="cannot resume run"):
        MlflowTracker(cfg, tmp_path, run_id=uuid.uuid4().hex)


def test_exception_marks_the_run_failed(mlflow_server, tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), MlflowTracker(_cfg(mlflow_server.uri), tmp_path) as tracker:
        run_id = tracker.run_id
        tracker.log_metrics({"loss": 1.0}, 1)
        1 / 0  # noqa: B018
    assert MlflowClient(mlflow_server.uri).get_run(run_id).info.status == "FAILED"


def test_unreachable_server_never_blocks_and_replay_delivers(mlflow_server, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="modmoe.tracking")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = _cfg(closed, max_retries=2)
    tracker = MlflowTracker(cfg, tmp_path)
    assert tracker.run_id is None  # offline: the run could not be created

    start = time.perf_counter()
    for step in range(1, 101):
        tracker.log_metrics({"loss": 1.0 / step, "tokens": float(step * 64)}, step)
    assert time.perf_counter() - start < 0.5  # 100 calls: queue puts, no network wait
    assert tracker.flush(timeout_s=30)
    assert len(_warnings(caplog)) == 1 and "unreachable" in _warnings(caplog)[0]
    spooled = read(spool_path(tmp_path))
    rows = [m for r in spooled if r["kind"] == "metrics" for m in r["metrics"]]
    assert sorted(m[3] for m in rows if m[0] == "loss") == list(range(1, 101))
    tracker.close()

    sent = replay_spool(tmp_path, tracking_uri=mlflow_server.uri)
    assert sent >= 3  # create_run, metric batch(es), terminate
    assert not spool_path(tmp_path).exists()
    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    assert _history(client, run.info.run_id, "loss") == [(s, pytest.approx(1.0 / s)) for s in range(1, 101)]
    assert run.info.status == "FINISHED"
    assert replay_spool(tmp_path) == 0  # nothing left


def test_server_restart_mid_run_loses_nothing(mlflow_server, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="modmoe.tracking")
    # `spooling` gives up at once and spools; `patient` retries long enough to outlive the restart.
    spooling = MlflowTracker(_cfg(mlflow_server.uri, max_retries=0), tmp_path / "a")
    patient = MlflowTracker(_cfg(mlflow_server.uri, max_retries=6, retry_backoff_s=0.5), tmp_path / "b")
    trackers = (spooling, patient)

    def log(steps: range) -> None:
        for step in steps:
            for t in trackers:
                t.log_metrics({"loss": float(step)}, step)

    log(range(1, 11))
    assert all(t.flush(timeout_s=30) for t in trackers)
    mlflow_server.stop()
    log(range(11, 21))
    assert spooling.flush(timeout_s=30)
    assert spool_path(tmp_path / "a").exists()
    mlflow_server.start()
    log(range(21, 31))
    for t in trackers:
        t.close()

    assert not spool_path(tmp_path / "b").exists()  # delivered by retries
    assert replay_spool(tmp_path / "a") >= 1
    assert not spool_path(tmp_path / "a").exists()
    client = MlflowClient(mlflow_server.uri)
    for t in trackers:
        assert _history(client, t.run_id, "loss") == [(s, float(s)) for s in range(1, 31)]
        assert client.get_run(t.run_id).info.status == "FINISHED"


def test_replay_command(mlflow_server, tmp_path: Path) -> None:
    tracker = MlflowTracker(_cfg(f"http://127.0.0.1:{free_port()}", max_retries=0), tmp_path)
    tracker.log_metrics({"loss": 2.0}, 7)
    tracker.close()
    runner = CliRunner()
    result = runner.invoke(tracking_app, ["replay", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(tracking_app, ["replay", str(tmp_path), "--tracking-uri", mlflow_server.uri])
    assert result.exit_code == 0, result.output
    assert "0 left" in result.output and not spool_path(tmp_path).exists()
    result = runner.invoke(tracking_app, ["replay", str(tmp_path)])
    assert result.exit_code == 0 and "nothing to replay" in result.output


def test_system_metrics(mlflow_server, tmp_path: Path) -> None:
    cfg = _cfg(mlflow_server.uri, system_metrics=True, system_metrics_interval_s=0.5)
    tracker = MlflowTracker(cfg, tmp_path)
    tracker.log_metrics({"loss": 1.0}, 1)
    time.sleep(1.6)
    tracker.close()
    keys = MlflowClient(mlflow_server.uri).get_run(tracker.run_id).data.metrics
    assert any(k.startswith("system/cpu") for k in keys), sorted(keys)


class _Forwarder:
    """TCP forwarder 127.0.0.1:port -> the server: a tracking URI that starts dead and comes
    alive without restarting the (slow to start) server."""

    def __init__(self, port: int, target_port: int) -> None:
        def pipe(src, dst) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                dst.close()

        open_sockets = self.open_sockets = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                upstream = socket.create_connection(("127.0.0.1", target_port))
                open_sockets.extend((upstream, self.request))
                back = threading.Thread(target=pipe, args=(upstream, self.request), daemon=True)
                back.start()
                pipe(self.request, upstream)
                back.join()

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stops listening and cuts the open connections (a kept-alive HTTP connection would
        otherwise still reach the server)."""
        self.server.shutdown()
        self.server.server_close()
        for sock in self.open_sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def test_offline_start_creates_the_run_when_the_server_appears(mlflow_server, tmp_path: Path) -> None:
    port = free_port()
    cfg = _cfg(f"http://127.0.0.1:{port}", max_retries=0)
    tracker = MlflowTracker(cfg, tmp_path)
    assert tracker.run_id is None
    for step in range(1, 6):
        tracker.log_metrics({"loss": float(step)}, step)
    assert tracker.flush(timeout_s=30)
    forwarder = _Forwarder(port, mlflow_server.port)
    try:
        for step in range(6, 11):
            tracker.log_metrics({"loss": float(step)}, step)
        tracker.close()
        assert tracker.run_id is not None  # created by the background thread once reachable
        assert replay_spool(tmp_path) >= 1  # steps 1-5 join the run created later, not a new one
    finally:
        forwarder.close()
    client = MlflowClient(mlflow_server.uri)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    assert run.info.run_id == tracker.run_id and run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "loss") == [(s, float(s)) for s in range(1, 11)]
    assert not spool_path(tmp_path).exists()


def test_resume_after_a_crash_sends_no_step_twice(mlflow_server, tmp_path: Path, caplog) -> None:
    """A crash after step 6, with the last checkpoint at step 2: steps 3-4 reached the server,
    5-6 the spool (outage). The resumed tracker redoes 3-6: none of them is sent again, and
    after replay every step is in MLflow once."""
    port = free_port()
    forwarder = _Forwarder(port, mlflow_server.port)
    crashed = MlflowTracker(_cfg(f"http://127.0.0.1:{port}", max_retries=0), tmp_path)
    run_id = crashed.run_id
    for step in range(1, 5):
        crashed.log_metrics({"loss": float(step), **({"eval/loss": step * 10.0} if step % 2 == 0 else {})}, step)
    assert crashed.flush(timeout_s=30)
    forwarder.close()
    for step in (5, 6):
        crashed.log_metrics({"loss": float(step), **({"eval/loss": step * 10.0} if step % 2 == 0 else {})}, step)
    crashed.close()  # the terminate request is spooled too; the process "dies" here
    assert logged_steps(spool_path(tmp_path), run_id) == {"loss": 6, "eval/loss": 6}

    resumed = MlflowTracker(_cfg(mlflow_server.uri), tmp_path, run_id=run_id)
    for step in range(3, 9):  # the redone steps carry other values, as a redone step may
        resumed.log_metrics({"loss": step + 0.5, **({"eval/loss": step * 10.5} if step % 2 == 0 else {})}, step)
    resumed.close()
    assert replay_spool(tmp_path, tracking_uri=mlflow_server.uri) >= 1
    client = MlflowClient(mlflow_server.uri)
    assert _history(client, run_id, "loss") == [(s, float(s)) for s in range(1, 7)] + [(7, 7.5), (8, 8.5)]
    assert _history(client, run_id, "eval/loss") == [(2, 20.0), (4, 40.0), (6, 60.0), (8, 84.0)]
