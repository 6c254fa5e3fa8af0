"""``MlflowTracker``: what the trainer (rank 0) calls to log a run to MLflow."""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import sys
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any

from modmoe.tracking import records, spool
from modmoe.tracking.client import create_run, is_permanent, make_client, short_error
from modmoe.tracking.config import TrackingConfig, resolve_tracking_uri
from modmoe.tracking.sender import PendingRun, Sender

log = logging.getLogger("modmoe.tracking")


def _check_artifact_file(name: str) -> str:
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or ".." in parts:
        raise ValueError(f"artifact_file {name!r} must be a relative path inside the run")
    return name


class MlflowTracker:
    """Logs one run. Creation (or resumption, given ``run_id``) talks to MLflow once, with
    retries; after that nothing waits on the network: every ``log_*`` call queues a record
    for a background thread that batches, retries and spools.

    If the server cannot be reached at start, the tracker runs offline: ``run_id`` is ``None``
    until a later batch succeeds in creating the run; what was logged meanwhile sits in the
    spool and ``replay_spool`` delivers it. With ``cfg.enabled = False`` every method is a no-op.

    Resuming after a crash redoes the steps after the last checkpoint. MLflow can neither
    delete nor overwrite a metric point, so a metric is not sent again at a step the run (or
    the spool) already holds for it: every step stays in MLflow once, with its first value.
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: str | Path,
        run_id: str | None = None,
        params: dict[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self._run_id = run_id
        self._sender: Sender | None = None
        self._monitor = None
        self._closed = False
        self._known_keys: set[str] = set()
        self._already_logged: dict[str, int] = {}  # resumed run: metric -> last step it holds
        if not cfg.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = resolve_tracking_uri(cfg.tracking_uri, self.run_dir)
        self.spool_file = spool.spool_path(self.run_dir)
        self._client = make_client(self.tracking_uri, cfg.http_timeout_s)
        tags = {k: str(v) for k, v in {**(tags or {}), **cfg.tags}.items()}
        for key in tags:
            records.check_key(key, "tag")

        pending: PendingRun | None = None
        reachable = self._with_retries(lambda: self._open(run_id, tags))
        if run_id is None and not reachable:
            pending = PendingRun(uuid.uuid4().hex, cfg.experiment, cfg.run_name, tags)
            # The creation request goes first in the spool, so a replay can make the run even if
            # this process never reaches the server.
            spool.append(
                self.spool_file,
                [
                    {
                        "kind": "create_run",
                        "local_run": pending.local_run,
                        "experiment": pending.experiment,
                        "run_name": pending.run_name,
                        "tags": tags,
                        "uri": self.tracking_uri,
                    }
                ],
            )
        self._sender = Sender(
            self._client,
            self.tracking_uri,
            self._run_id,
            pending,
            self.spool_file,
            cfg.flush_interval_s,
            cfg.max_retries,
            cfg.retry_backoff_s,
            degraded=not reachable,
        )
        self._sender.start()
        if run_id is not None:  # resumed: the run is live again, and may get new tags
            self._note_spooled_steps(run_id, reachable)
            self._sender.put({"kind": "status", "status": "RUNNING"})
            if tags:
                self.set_tags(tags)
        if params:
            self.log_params(params)
        if cfg.system_metrics:
            self._start_system_metrics(resumed=run_id is not None)
        atexit.register(self._close_at_exit)

    # --- opening -----------------------------------------------------------------------------
    def _open(self, run_id: str | None, tags: dict[str, str]) -> None:
        if run_id is None:
            self._run_id = create_run(self._client, self.tracking_uri, self.cfg.experiment, self.cfg.run_name, tags)
        else:
            run = self._client.get_run(run_id)  # fails for an unknown id
            # MLflow keeps each metric's point of highest step as its latest value.
            self._already_logged = {m.key: int(m.step) for m in run.data.to_proto().metrics}

    def _note_spooled_steps(self, run_id: str, reachable: bool) -> None:
        for key, step in spool.logged_steps(self.spool_file, run_id).items():
            self._already_logged[key] = max(step, self._already_logged.get(key, step))
        if not reachable:
            log.warning(
                "tracking: cannot ask MLflow which steps run %s already holds; steps redone "
                "after the checkpoint may show twice in it",
                run_id,
            )

    def _with_retries(self, attempt_fn) -> bool:
        """Runs ``attempt_fn`` with the configured retries. False when MLflow stays unreachable;
        an error the server gives on purpose (unknown run, bad name) is raised as one line."""
        for attempt in range(1 + self.cfg.max_retries):
            try:
                attempt_fn()
                return True
            except Exception as err:  # noqa: BLE001
                if is_permanent(err):
                    what = f"resume run {self._run_id}" if self._run_id else "create a run"
                    raise RuntimeError(f"tracking: cannot {what} at {self.tracking_uri}: {short_error(err)}") from None
                last = err
                if attempt < self.cfg.max_retries:
                    time.sleep(self.cfg.retry_backoff_s * 2**attempt)
        log.warning(
            "MLflow at %s is unreachable (%s); training continues offline, tracking records go to %s",
            self.tracking_uri,
            short_error(last),
            self.spool_file,
        )
        return False

    def _start_system_metrics(self, resumed: bool) -> None:
        if self.run_id is None:
            log.warning("tracking: no system metrics for a run that does not exist yet (offline)")
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=self.cfg.system_metrics_interval_s,
            resume_logging=resumed,
            tracking_uri=self.tracking_uri,
        )
        self._monitor.start()

    # --- logging -----------------------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        """MLflow run id (store it in checkpoints to resume); ``None`` while offline or disabled."""
        return self._sender.run_id if self._sender is not None else self._run_id

    @property
    def active(self) -> bool:
        return self._sender is not None and not self._closed

    def _put(self, rec: dict) -> None:
        if self._closed:
            raise RuntimeError("tracking: the tracker is closed")
        self._sender.put(rec)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queues one step's metrics (never waits on the network)."""
        if self._sender is None:
            return
        now_ms = int(time.time() * 1000)
        rows = []
        held = self._already_logged
        for key, value in metrics.items():
            if key not in self._known_keys:
                self._known_keys.add(records.check_key(key, "metric"))
            if held and key in held:
                if step <= held[key]:
                    continue  # redone after a resume: the run already holds this step
                del held[key]
            rows.append([key, float(value), now_ms, int(step)])
        if rows:
            self._put({"kind": "metrics", "metrics": rows})

    def log_params(self, params: dict[str, Any]) -> None:
        """Queues a flat ``{name: value}`` dict (see ``flatten_config``), cut into MLflow-sized
        batches; values longer than MLflow's cap are truncated."""
        if self._sender is None:
            return
        for rec in records.chunk_values("params", {k: str(v) for k, v in params.items()}):
            self._put(rec)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self._sender is None:
            return
        for rec in records.chunk_values("tags", {k: str(v) for k, v in tags.items()}):
            self._put(rec)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queues a file or directory. It is copied now (into ``<run_dir>/mlflow_staging``), so
        the caller may overwrite or delete it at once; meant for plots, configs, small files."""
        if self._sender is None:
            return
        src = Path(path)
        if not src.exists():
            raise FileNotFoundError(f"tracking: artifact {src} does not exist")
        if artifact_path is not None:
            _check_artifact_file(artifact_path)
        staged = self.run_dir / "mlflow_staging" / uuid.uuid4().hex / src.name
        staged.parent.mkdir(parents=True)
        if src.is_dir():
            shutil.copytree(src, staged)
        else:
            shutil.copy2(src, staged)
        self._put({"kind": "artifact", "path": str(staged), "artifact_path": artifact_path, "staged": True})

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._sender is None:
            return
        self._put({"kind": "text", "text": str(text), "artifact_file": _check_artifact_file(artifact_file)})

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        """Queues ``data`` as JSON, or YAML when ``artifact_file`` ends in .yaml/.yml. The dict is
        copied now; it must hold JSON-compatible values."""
        if self._sender is None:
            return
        try:
            snapshot = json.loads(json.dumps(data))
        except (TypeError, ValueError) as err:
            raise ValueError(f"tracking: log_dict({artifact_file!r}) needs JSON-compatible values: {err}") from None
        self._put({"kind": "dict", "data": snapshot, "artifact_file": _check_artifact_file(artifact_file)})

    def flush(self, timeout_s: float | None = None) -> bool:
        """Waits until everything logged so far was sent or spooled; False on timeout."""
        if self._sender is None or self._closed:
            return True
        return self._sender.flush(timeout_s)

    # --- closing -----------------------------------------------------------------------------
    def close(self, exc: BaseException | None = None) -> None:
        """Sends what is queued and ends the run: FINISHED, or FAILED given an exception
        (KILLED for KeyboardInterrupt). Idempotent."""
        if self._sender is None or self._closed:
            return
        if self._monitor is not None:
            self._monitor.finish()
        status = "FINISHED" if exc is None else "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
        self._put({"kind": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        self._closed = True
        self._sender.stop()
        atexit.unregister(self._close_at_exit)
        if self._sender.spooled:
            log.warning(
                "tracking: %d record(s) could not be delivered and wait in %s; send them "
                "with `modmoe tracking replay %s`",
                self._sender.spooled,
                self.spool_file,
                self.run_dir,
            )

    def _close_at_exit(self) -> None:
        # The trainer forgot close(): still deliver, and say FAILED if the process is dying of
        # an uncaught exception (the interpreter leaves it in sys.last_value).
        self.close(getattr(sys, "last_value", None))

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)
