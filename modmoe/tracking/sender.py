"""The background thread that batches records, sends them with retries, and spools failures.

The training loop only ever does ``queue.put``; every network wait happens here.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from modmoe.tracking import records, spool
from modmoe.tracking.client import create_run, is_permanent, short_error
from modmoe.tracking.records import Record

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("modmoe.tracking")


@dataclass
class _Control:
    """Queue marker: everything queued before it has been sent or spooled when ``done`` is set."""

    stop: bool = False
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class PendingRun:
    """A run that could not be created at start; records name it by ``local_run`` until it is."""

    local_run: str
    experiment: str
    run_name: str | None
    tags: dict[str, str]


class Sender(threading.Thread):
    def __init__(
        self,
        client: MlflowClient,
        tracking_uri: str,
        run_id: str | None,
        pending: PendingRun | None,
        spool_file: Path,
        flush_interval_s: float,
        max_retries: int,
        retry_backoff_s: float,
        degraded: bool = False,
    ) -> None:
        super().__init__(name="modmoe-mlflow-sender", daemon=True)
        self.client, self.uri, self.run_id, self.pending = client, tracking_uri, run_id, pending
        self.spool_file = spool_file
        self.flush_interval_s, self.max_retries, self.backoff_s = flush_interval_s, max_retries, retry_backoff_s
        self.queue: queue.SimpleQueue[Record | _Control] = queue.SimpleQueue()
        self.spooled = 0  # records written to the spool by this sender
        # Inside an outage: one attempt per batch, no backoff, no further warning. Starts True
        # when the tracker already found (and reported) MLflow unreachable.
        self._degraded = degraded

    # --- caller side -------------------------------------------------------------------------
    def put(self, rec: Record) -> None:
        self.queue.put(rec)

    def flush(self, timeout_s: float | None = None) -> bool:
        marker = _Control()
        self.queue.put(marker)
        return marker.done.wait(timeout_s)

    def stop(self, timeout_s: float | None = None) -> None:
        marker = _Control(stop=True)
        self.queue.put(marker)
        self.join(timeout_s)

    # --- thread side -------------------------------------------------------------------------
    def run(self) -> None:
        pending: list[list] = []  # metric rows waiting to fill a batch
        deadline = 0.0
        while True:
            timeout = max(0.0, deadline - time.monotonic()) if pending else None
            try:
                item = self.queue.get(timeout=timeout)
            except queue.Empty:
                pending = self._send_metrics(pending)
                continue
            if isinstance(item, dict) and item["kind"] == "metrics":
                if not pending:
                    deadline = time.monotonic() + self.flush_interval_s
                pending.extend(item["metrics"])
                if len(pending) >= records.limits().MAX_METRICS_PER_BATCH:
                    pending = self._send_metrics(pending)
                continue
            pending = self._send_metrics(pending)  # keep the order the caller logged in
            if isinstance(item, _Control):
                item.done.set()
                if item.stop:
                    return
            else:
                self._deliver(item)

    def _send_metrics(self, rows: list[list]) -> list[list]:
        for rec in records.chunk_metrics(rows):
            self._deliver(rec)
        return []

    def _deliver(self, rec: Record) -> None:
        try:
            if self.run_id is None and not self._create_pending_run():
                self._spool(rec, None)
                return
            attempts = 1 if self._degraded else 1 + self.max_retries
            for attempt in range(attempts):
                try:
                    records.send(self.client, self.run_id, rec)
                except Exception as err:  # noqa: BLE001 - any failure: retry, then spool
                    if is_permanent(err) or attempt + 1 == attempts:
                        self._spool(rec, err)
                        return
                    time.sleep(self.backoff_s * 2**attempt)
                else:
                    records.discard_staged(rec)
                    if self._degraded:
                        self._degraded = False
                        log.warning(
                            "MLflow at %s answers again; records sent meanwhile are in %s", self.uri, self.spool_file
                        )
                    return
        except Exception:  # noqa: BLE001 - the thread must survive anything a record does
            log.exception("tracking: unexpected error while sending a %s record", rec.get("kind"))

    def _create_pending_run(self) -> bool:
        if self.pending is None:
            return False
        try:
            run_id = create_run(
                self.client, self.uri, self.pending.experiment, self.pending.run_name, self.pending.tags
            )
        except Exception:  # noqa: BLE001 - still unreachable; stay offline
            return False
        # Records spooled under the spool-local id belong to this run from now on.
        spool.append(
            self.spool_file, [{"kind": "bind", "local_run": self.pending.local_run, "run_id": run_id, "uri": self.uri}]
        )
        log.warning("MLflow at %s answers again; created run %s", self.uri, run_id)
        self.run_id, self.pending, self._degraded = run_id, None, False
        return True

    def _spool(self, rec: Record, err: BaseException | None) -> None:
        stamped = dict(rec, uri=self.uri)
        if self.run_id is not None:
            stamped["run_id"] = self.run_id
        else:
            stamped["local_run"] = self.pending.local_run if self.pending else None
        try:
            spool.append(self.spool_file, [stamped])
        except OSError as spool_err:
            log.error("tracking: lost a %s record: cannot write %s: %s", rec["kind"], self.spool_file, spool_err)
            return
        self.spooled += 1
        if err is not None and is_permanent(err):
            log.error("MLflow refused a %s record (kept in %s): %s", rec["kind"], self.spool_file, short_error(err))
        elif not self._degraded:
            self._degraded = True  # one warning per outage, and no more retries until it ends
            log.warning(
                "MLflow at %s is unreachable (%s); training continues and tracking records "
                "go to %s (replay them with `modmoe tracking replay %s`)",
                self.uri,
                short_error(err) if err else "run not created",
                self.spool_file,
                self.spool_file.parent,
            )
