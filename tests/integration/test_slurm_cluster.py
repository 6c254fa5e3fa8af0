"""The launch scripts against a real single-node Slurm cluster (see slurm_cluster.py)."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest
from slurm_cluster import TWO_NODE_PARTITION, SlurmCluster

from modmoe.launch import submit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
from runs import REPO

TINY = REPO / "configs" / "tiny.yaml"


def test_cluster_has_this_host_idle(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %c %T").stdout.split()
    assert out == [slurm_cluster.hostname, str(os.cpu_count()), "idle"]
    conf = slurm_cluster.run("scontrol", "show", "config").stdout
    assert "JobRequeue              = 1" in conf


# Every shape of script ``modmoe submit`` renders; multi-node ones go to the partition that has
# a second node on paper (it never runs anything, --test-only only plans).
VARIANTS = {
    "cpu-1node": dict(gpus_per_node=0, procs_per_node=2, time="30"),
    "cpu-2nodes": dict(nodes=2, gpus_per_node=0, procs_per_node=2, partition=TWO_NODE_PARTITION, time="1-00:00"),
    "gpu-1node": dict(gpus_per_node=2, time="4:00:00", signal_grace_s=600),
    "gpu-2nodes-options": dict(
        nodes=2,
        gpus_per_node=2,
        partition=TWO_NODE_PARTITION,
        time="2-00:00:00",
        cpus_per_node=2,
        job_name="big.run",
        max_requeues=10,
        socket_ifname="lo",
        sbatch_args=["--exclusive", "--comment=preemptible"],
    ),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_sbatch_test_only_accepts_rendered_script(slurm_cluster: SlurmCluster, tmp_path: Path, name: str) -> None:
    script = submit(TINY, dry_run=True, runs_root=tmp_path, echo=lambda _: None, **VARIANTS[name]).script
    proc = slurm_cluster.run("sbatch", "--test-only", input=script, check=False)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr


def test_sbatch_test_only_refuses_an_impossible_job(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # The check above has teeth: more GPUs than any node has is refused.
    script = submit(TINY, gpus_per_node=3, dry_run=True, runs_root=tmp_path, echo=lambda _: None).script
    proc = slurm_cluster.run("sbatch", "--test-only", input=script, check=False)
    assert proc.returncode != 0, proc.stderr


def test_two_task_job_all_reduces_over_gloo(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    program = tmp_path / "allreduce.py"
    program.write_text(
        textwrap.dedent("""
        import os, sys, torch, torch.distributed as dist
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=rank, world_size=world)
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        open(sys.argv[2] + f"/rank{rank}", "w").write(f"{world} {t.item()}")
        dist.destroy_process_group()
    """)
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    job = slurm_cluster.run(
        "sbatch",
        "--parsable",
        "--ntasks=2",
        f"--output={tmp_path}/job.out",
        f"--chdir={tmp_path}",
        f"--wrap=srun {sys.executable} {program} {port} {tmp_path}",
    ).stdout.strip()
    state = slurm_cluster.wait_job(job, timeout=120)
    assert state == "COMPLETED", (tmp_path / "job.out").read_text()
    assert sorted((tmp_path / f"rank{r}").read_text() for r in range(2)) == ["2 3.0", "2 3.0"]


def test_failing_run_requeues_up_to_the_limit_then_fails(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # The corpus glob matches nothing: every attempt of the trainer fails at start.
    result = submit(
        TINY,
        procs_per_node=1,
        time="10",
        signal_grace_s=60,
        max_requeues=1,
        runs_root=tmp_path,
        overrides=[
            "data.corpus=files",
            f"data.corpus_glob={tmp_path}/none/*.txt",
            f"data.prepared_dir={tmp_path}/prepared",
        ],
        echo=lambda _: None,
    )
    job = result.job_id
    slurm_cluster.release_requeue_hold(job, restarts=1, timeout=120)
    state = slurm_cluster.wait_job(job, timeout=120)
    log = (tmp_path / "slurm-logs" / f"modmoe-tiny-{job}.out").read_text()
    assert state == "FAILED", log
    assert slurm_cluster.job_field(job, "Restarts") == "1"
    assert "attempt 0" in log and "attempt 1" in log and "MODMOE_MAX_REQUEUES reached" in log, (
        log + slurm_cluster.diagnostics(job)
    )
    assert not (result.run_dir / "COMPLETED").exists()


def test_cancelled_job_stays_cancelled(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # scancel sends SIGTERM like `scontrol requeue` does; the batch shell must not requeue the job
    # itself then (Slurm requeues when that is what was asked), or a cancel would be undone.
    result = submit(
        TINY,
        procs_per_node=1,
        time="10",
        signal_grace_s=60,
        max_requeues=3,
        runs_root=tmp_path,
        overrides=[f"data.prepared_dir={tmp_path}/prepared"],
        echo=lambda _: None,
    )
    job = result.job_id
    deadline = time.monotonic() + 60
    while slurm_cluster.job_field(job, "JobState") != "RUNNING":
        assert time.monotonic() < deadline, slurm_cluster.diagnostics(job)
        time.sleep(0.2)
    time.sleep(3.0)  # the batch shell is waiting for srun
    slurm_cluster.run("scancel", job)
    assert slurm_cluster.wait_job(job, timeout=90) == "CANCELLED"
    time.sleep(3.0)  # a self-requeue would show by now
    log = (tmp_path / "slurm-logs" / f"modmoe-tiny-{job}.out").read_text()
    assert (
        slurm_cluster.job_field(job, "JobState") == "CANCELLED" and slurm_cluster.job_field(job, "Restarts") == "0"
    ), log
    assert "got SIGTERM" in log and "Slurm is ending this attempt" in log, log
