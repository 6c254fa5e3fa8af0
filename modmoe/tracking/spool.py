"""The spool: records that could not be delivered, kept in ``<run_dir>/mlflow_spool.jsonl``
until ``replay_spool`` re-sends them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from modmoe.tracking import records
from modmoe.tracking.client import create_run, is_permanent, make_client, short_error
from modmoe.tracking.records import Record

if TYPE_CHECKING:
    from mlflow import MlflowClient

SPOOL_NAME = "mlflow_spool.jsonl"
log = logging.getLogger("modmoe.tracking")


def spool_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / SPOOL_NAME


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # A live tracker appends while `modmoe tracking replay` may rewrite: one lock file orders them.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append(path: Path, recs: list[Record]) -> None:
    """Appends records durably (fsync: the spool exists for the case where things go wrong)."""
    with _locked(path), open(path, "a", encoding="utf-8") as f:
        for rec in recs:
            f.write(json.dumps(rec, allow_nan=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(path: Path) -> list[Record]:
    """Records of a spool. A torn last line (crash mid-write) is skipped; other bad lines are an
    error naming the file and line."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Record] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "kind" not in rec:
                raise ValueError
        except ValueError:
            if number == len(lines):
                log.warning("%s:%d: skipping a torn last record", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a tracking record (one JSON object per line)") from None
        out.append(rec)
    return out


def logged_steps(path: Path, run_id: str) -> dict[str, int]:
    """Highest step of each metric the spool holds for ``run_id``, including records of a run
    that was created offline and bound to ``run_id`` later."""
    if not path.exists():
        return {}
    with _locked(path):
        recs = read(path)
    aliases = {r["local_run"] for r in recs if r["kind"] == "bind" and r["run_id"] == run_id}
    last: dict[str, int] = {}
    for rec in recs:
        if rec["kind"] != "metrics" or not (rec.get("run_id") == run_id or rec.get("local_run") in aliases):
            continue
        for key, _value, _timestamp, step in rec["metrics"]:
            last[key] = max(int(step), last.get(key, int(step)))
    return last


def _write(path: Path, recs: list[Record]) -> None:
    if not recs:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in recs), encoding="utf-8")
    os.replace(tmp, path)


def replay_spool(run_dir: str | Path, tracking_uri: str | None = None) -> int:
    """Re-sends the spooled records of ``run_dir`` to the runs they belong to and removes the ones
    that were delivered. Returns how many records (MLflow requests) were sent.

    ``tracking_uri`` overrides the URI stored in each record (e.g. the server moved). Runs that
    could not be created at training start are created now. Delivery stops at the first failure
    that looks transient (server still down); records the server refuses are kept and reported.
    Re-sending is safe: MLflow ignores a metric identical to one it already holds.
    """
    path = spool_path(run_dir)
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    sent = 0
    with _locked(path):
        recs = read(path)
        bound = {r["local_run"]: r["run_id"] for r in recs if r["kind"] == "bind"}
        clients: dict[str, MlflowClient] = {}
        kept: list[Record] = []
        stalled = False
        for rec in recs:
            if rec["kind"] == "bind" or (rec["kind"] == "create_run" and rec["local_run"] in bound):
                continue
            if stalled:
                kept.append(rec)
                continue
            uri = tracking_uri or rec["uri"]
            client = clients.get(uri) or clients.setdefault(uri, make_client(uri))
            try:
                if rec["kind"] == "create_run":
                    bound[rec["local_run"]] = create_run(
                        client, uri, rec["experiment"], rec.get("run_name"), rec.get("tags", {})
                    )
                else:
                    run_id = rec.get("run_id") or bound.get(rec.get("local_run"))
                    if run_id is None:
                        raise ValueError(f"record of unknown run {rec.get('local_run')!r}")
                    records.send(client, run_id, rec)
                    records.discard_staged(rec)
                sent += 1
            except Exception as err:  # noqa: BLE001 - every failure keeps the record
                kept.append(rec)
                if is_permanent(err):
                    log.error("%s: %s record refused, kept in the spool: %s", path, rec["kind"], short_error(err))
                else:
                    stalled = True
                    log.warning("%s: stopped replaying, %s unreachable: %s", path, uri, short_error(err))
        for rec in kept:  # records of runs created just now no longer need the spool-local id
            if rec.get("run_id") is None and rec.get("local_run") in bound:
                rec["run_id"] = bound[rec.pop("local_run")]
        _write(path, kept)
    return sent
