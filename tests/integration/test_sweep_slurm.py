"""``modmoe sweep SPEC --slurm`` on the local Slurm cluster: the two points of a small sweep as a
job array (one task per point, each running the sweep's point command), then the report job
after it; submitting again finds every point finished."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from runs import run_modmoe
from slurm_cluster import SlurmCluster
from sweeps import write_spec

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]


def test_sweep_runs_as_a_job_array(slurm_cluster: SlurmCluster, tmp_path: Path, small_data_dir: str) -> None:
    # Two tasks at once: no shared SQLite database (a tracking server is the cluster's way).
    no_mlflow = {"logging.mlflow.enabled": False}
    spec = write_spec(tmp_path / "spec.yaml", small_data_dir, tmp_path / "runs", budgets=[1e10], extra=no_mlflow)
    out = run_modmoe(["sweep", str(spec), "--slurm"], env={"OMP_NUM_THREADS": "1"}).stdout
    array = re.search(r"^submitted job array (\d+) \(2 point\(s\): 0-1\)$", out, re.MULTILINE)
    report = re.search(r"^submitted report job (\d+)", out, re.MULTILINE)
    assert array and report, out
    sweep_dir = tmp_path / "runs" / "small"
    state = slurm_cluster.wait_job(report.group(1), timeout=300)
    logs = "\n".join(p.read_text() for p in sorted((sweep_dir / "slurm-logs").glob("*.out")))
    assert state == "COMPLETED", logs + slurm_cluster.diagnostics(report.group(1))
    for task in (0, 1):
        assert (sweep_dir / "slurm-logs" / f"sweep-small-{array.group(1)}_{task}.out").is_file(), logs
    results = json.loads((sweep_dir / "results.json").read_text())
    assert [r["status"] for r in results["points"]] == ["finished", "finished"], logs
    for row in results["points"]:
        assert row["steps"] == row["max_steps"] and row["loss_topk"] is not None
        run_dir = sweep_dir / row["point"]
        assert json.loads((run_dir / "sweep-attempts.jsonl").read_text())["slurm_job"] is not None
    assert (sweep_dir / "isoflop.png").is_file()

    again = run_modmoe(["sweep", str(spec), "--slurm"]).stdout
    assert "every point is finished: writing the report" in again and "submitted" not in again
