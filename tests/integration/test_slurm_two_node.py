"""Two nodes under Slurm: the test cluster's virtual nodes ``node1`` and ``node2``, each in its
own network namespace with its own address (see slurm_cluster.py), one rank each over gloo,
every job submitted with ``python -m modmoe submit`` as a user types it.

- The two-node job trains exactly like the one-node job of the same global batch (2 ranks on
  this host): the same losses, bit for bit (``==``), since both are 2 gloo ranks with one thread
  each and a 2-rank all-reduce adds the same two numbers either way.
- Preempted twice (USR1 to the batch shell, ``scontrol requeue``), it requeues, resumes on both
  nodes and ends with the uninterrupted run's losses.
- Node loss: node2 falls silent mid-step (its link goes down, then every process on it is
  killed). The rank on node1 must leave on its own within ``parallel.timeout_s`` with one line
  naming the cause; Slurm sets node2 DOWN after ``SlurmdTimeout`` and requeues the job (it has
  ``--requeue``); once node2 is back, the job resumes from the last complete checkpoint,
  whatever was logged after it is redone, and the run ends with the uninterrupted run's losses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from netns_nodes import FABRIC_IF
from runs import REPO
from slurm_cluster import (
    PARTITION,
    SLURMD_TIMEOUT_S,
    TWO_NODE_PARTITION,
    Attempt,
    Preemption,
    SlurmCluster,
    SubmittedJob,
    batch_log,
    check_finished_run,
    checkpoint_steps,
    last_step,
    node_logs,
    one_thread_per_rank,  # noqa: F401 (autouse: every job of this module runs one thread per rank)
    preempt_attempt,
    resumed_steps,
    submit_cli,
    tiny_job_overrides,
    training_records,
    validate_checkpoint,
)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 120
TIMEOUT_S = 10
"""``parallel.timeout_s`` of every job here: well under SlurmdTimeout (30 s), so the surviving
rank leaves on its own before Slurm sets the lost node DOWN and ends the job."""
CHECKPOINT_EVERY = 10


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Holds the prepared data of this module's runs (so they all see the same tokens). A
    multi-node job never prepares: it opens a finished preparation, made here by
    ``modmoe data prepare`` as a cluster's preparation job would."""
    root = tmp_path_factory.mktemp("slurm-two-node")
    overrides = [a for o in tiny_job_overrides(root / "prepared", STEPS) for a in ("--set", o)]
    proc = subprocess.run(
        [sys.executable, "-m", "modmoe", "data", "prepare", str(TINY), "--no-bar", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root


def _submit(shared: Path, runs: str, *, two_nodes: bool, max_requeues: int = 3) -> SubmittedJob:
    """``python -m modmoe submit`` of the tiny job: 2 nodes x 1 rank on partition ``two`` (the
    ranks talk over the nodes' fabric interface) or 1 node x 2 ranks on this host. Every job has
    the same overrides; checkpoints, the collective timeout and plots do not change the numbers."""
    overrides = tiny_job_overrides(shared / "prepared", STEPS) + [
        f"checkpoint.interval_steps={CHECKPOINT_EVERY}",
        f"parallel.timeout_s={TIMEOUT_S}",
        # Rank 0 rendering plots while the other waits at the next step would count against the
        # short collective timeout on a loaded machine.
        "logging.plots_every_eval=false",
    ]
    layout = (
        ["--nodes", "2", "--procs-per-node", "1", "--partition", TWO_NODE_PARTITION, "--socket-ifname", FABRIC_IF]
        if two_nodes
        else ["--nodes", "1", "--procs-per-node", "2", "--partition", PARTITION]
    )
    args = [*layout, "--time", "20", "--signal-grace", "60", "--max-requeues", str(max_requeues)]
    return submit_cli(TINY, args + ["--runs-root", str(shared / runs)], overrides)


def _finished(cluster: SlurmCluster, job: SubmittedJob) -> SubmittedJob:
    state = cluster.wait_job(job.job_id, timeout=300)
    assert state == "COMPLETED", batch_log(job.run_dir) + node_logs(job.run_dir) + cluster.diagnostics(job.job_id)
    return job


@pytest.fixture(scope="module")
def two_node(slurm_cluster: SlurmCluster, shared: Path) -> SubmittedJob:
    """The uninterrupted two-node run (the first job)."""
    slurm_cluster.require_two_nodes()
    return _finished(slurm_cluster, _submit(shared, "two-node", two_nodes=True))


@pytest.fixture(scope="module")
def reference(two_node: SubmittedJob) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in training_records(two_node.run_dir)}


def _wait(what: str, predicate, timeout: float, job: SubmittedJob, cluster: SlurmCluster, poll: float = 0.1) -> float:
    """Polls until ``predicate()`` holds; returns when (``time.time()``). Fails with the logs."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out ({timeout:.0f} s) waiting for {what}\n{batch_log(job.run_dir)}"
                f"{node_logs(job.run_dir)}{cluster.diagnostics(job.job_id)}"
            )
        time.sleep(poll)
    return time.time()


def test_two_node_job_trains_exactly_like_the_one_node_job(
    slurm_cluster: SlurmCluster, shared: Path, two_node: SubmittedJob, reference: dict[int, float]
) -> None:
    one_node = _finished(slurm_cluster, _submit(shared, "one-node", two_nodes=False))
    assert slurm_cluster.job_field(two_node.job_id, "NodeList") == "node[1-2]"
    # One torchrun per node, each announcing its own address; both met at node1's, not at a localhost.
    addrs = {n: slurm_cluster.network.nodes[n].addr for n in ("node1", "node2")}
    logs = {i: (two_node.run_dir / "logs" / f"node{i}.log").read_text() for i in (0, 1)}
    endpoint = f"rendezvous {addrs['node1']}:"
    assert f"node rank 0/2 ({addrs['node1']}): 1 cpu rank(s), {endpoint}" in logs[0], logs[0][-2000:]
    assert f"node rank 1/2 ({addrs['node2']}): 1 cpu rank(s), {endpoint}" in logs[1], logs[1][-2000:]
    assert "ranks 2 on cpu" in logs[0]  # one world of two ranks over the two nodes
    # The same global batch on one node: the same losses, bit for bit.
    one = {r["step"]: r["loss"] for r in training_records(one_node.run_dir)}
    assert sorted(reference) == sorted(one) == list(range(1, STEPS + 1))
    differ = [s for s in one if one[s] != reference[s]]
    assert not differ, f"{len(differ)} steps differ, first {differ[0]}: {one[differ[0]]!r} vs {reference[differ[0]]!r}"
    check = validate_checkpoint(two_node.run_dir / "checkpoints" / f"step_{STEPS:08d}")
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_two_node_job_preempted_twice_requeues_and_continues_exactly(
    slurm_cluster: SlurmCluster, shared: Path, reference: dict[int, float]
) -> None:
    job = _submit(shared, "two-node-preempted", two_nodes=True)
    plans = [Preemption("usr1", steps=15), Preemption("requeue", steps=15)]
    attempts = [preempt_attempt(slurm_cluster, job.job_id, job.run_dir, i, plan) for i, plan in enumerate(plans)]
    problems = check_finished_run(slurm_cluster, job.job_id, job.run_dir, attempts, STEPS, reference)
    assert not problems, "\n".join(problems) + "\n" + batch_log(job.run_dir)
    stops = [a.checkpoint for a in attempts]
    assert 0 < stops[0] < stops[1] < STEPS and [a.resumed_at for a in attempts] == stops, stops
    log = batch_log(job.run_dir)
    assert log.count("got SIGUSR1") == 1 and log.count("got SIGTERM") == 1, log


def _ranks(cluster: SlurmCluster, node: str) -> list[int]:
    """The training ranks (not torchrun) running on a virtual node."""
    return [
        pid
        for pid, cmd in cluster.processes(node).items()
        if "modmoe train" in cmd and "torch.distributed.run" not in cmd
    ]


@pytest.mark.slow
def test_node_loss_ends_the_survivors_requeues_and_resumes_from_the_last_checkpoint(
    slurm_cluster: SlurmCluster, shared: Path, reference: dict[int, float]
) -> None:
    cluster = slurm_cluster
    job = _submit(shared, "node-loss", two_nodes=True)
    run_dir = job.run_dir
    # Mid-run and mid-interval: a checkpoint exists and a few steps have been logged after it.
    _wait(
        "a checkpoint and steps after it",
        lambda: checkpoint_steps(run_dir) and last_step(run_dir) >= checkpoint_steps(run_dir)[-1] + 4,
        240,
        job,
        cluster,
        poll=0.05,
    )
    assert cluster.job_field(job.job_id, "JobState") == "RUNNING"
    lost_at = cluster.kill_node("node2")
    timeline = {"node2 lost": 0.0}

    # The rank on node1 is blocked in a collective with a peer that will never answer: it must
    # leave by itself, within the timeout (plus the step in flight), and say why.
    survivor_gone = _wait("node1's rank to exit", lambda: not _ranks(cluster, "node1"), TIMEOUT_S + 60, job, cluster)
    timeline["rank on node1 exited"] = survivor_gone - lost_at
    torchrun_gone = _wait(
        "node1's torchrun to exit",
        lambda: not any("torch.distributed.run" in c for c in cluster.processes("node1").values()),
        60,
        job,
        cluster,
    )
    timeline["torchrun on node1 exited"] = torchrun_gone - lost_at
    log0 = (run_dir / "logs" / "node0.log").read_text()
    lines = [ln for ln in log0.splitlines() if "error: rank 0:" in ln]
    assert len(lines) == 1, log0[-3000:]
    # The link was cut, not reset: only the timeout can have noticed.
    assert "did not answer within parallel.timeout_s" in lines[0] and f"{TIMEOUT_S * 1000}ms" in lines[0], lines[0]
    assert "exitcode  : 75" in log0, log0[-3000:]
    assert timeline["rank on node1 exited"] <= TIMEOUT_S + 10, timeline

    # Whatever happened after this is not trusted: the newest complete checkpoint now (none can
    # be completed without node2's rank) and the steps logged after it.
    checkpoint = checkpoint_steps(run_dir)[-1]
    unfinished = sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-step_*"))  # a save cut off
    before = training_records(run_dir)
    stopped_at = before[-1]["step"]
    assert stopped_at > checkpoint, (stopped_at, checkpoint)
    metrics_inode = (run_dir / "metrics.jsonl").stat().st_ino

    # Slurm notices the silent node after SlurmdTimeout, sets it DOWN and requeues the job.
    down = _wait(
        "node2 to be set DOWN",
        lambda: "DOWN" in (cluster.node_field("node2", "State") or ""),
        3 * SLURMD_TIMEOUT_S + 30,
        job,
        cluster,
        poll=0.3,
    )
    timeline["node2 DOWN"] = down - lost_at
    requeued = _wait(
        "the job to be requeued",
        lambda: (
            cluster.job_field(job.job_id, "Restarts") == "1" and cluster.job_field(job.job_id, "JobState") == "PENDING"
        ),
        120,
        job,
        cluster,
        poll=0.3,
    )
    timeline["job requeued (PENDING)"] = requeued - lost_at
    ctld = (cluster.root / "log" / "slurmctld.log").read_text()
    assert f"requeue job JobId={job.job_id} due to failure of node node2" in ctld, ctld[-3000:]
    log = batch_log(run_dir)
    assert "requeueing, restart" not in log, log  # Slurm requeued it, not the batch shell

    # node2 comes back; the requeued attempt resumes from the checkpoint and redoes what followed.
    cluster.restart_node("node2")
    cluster.release_requeue_hold(job.job_id, restarts=1, timeout=120)
    _wait(
        "the requeued attempt to log steps",
        lambda: (
            (run_dir / "metrics.jsonl").stat().st_ino != metrics_inode and len(training_records(run_dir)) > checkpoint
        ),
        240,
        job,
        cluster,
    )
    resumed = training_records(run_dir)
    assert resumed[:checkpoint] == before[:checkpoint]  # the trusted part, kept as it was
    assert resumed[checkpoint]["step"] == checkpoint + 1, resumed[checkpoint]  # the attempt's first logged step

    attempt = Attempt(0, "node loss", stopped_at, 0.0, checkpoint, stopped_at)
    problems = check_finished_run(cluster, job.job_id, run_dir, [attempt], STEPS, reference)
    assert not problems, "\n".join(problems) + "\n" + batch_log(run_dir)
    assert resumed_steps(run_dir)[1] == checkpoint
    print(
        "node loss timeline (s after node2 fell silent): "
        + ", ".join(f"{k} {v:.1f}" for k, v in timeline.items())
        + f"; parallel.timeout_s={TIMEOUT_S}, SlurmdTimeout={SLURMD_TIMEOUT_S}; checkpoint {checkpoint}, "
        f"steps {checkpoint + 1}..{stopped_at} redone, unfinished saves left by the lost attempt: {unfinished or 'none'}"
    )
    assert not list((run_dir / "checkpoints").glob(".tmp-step_*"))  # removed by the resumed attempt
