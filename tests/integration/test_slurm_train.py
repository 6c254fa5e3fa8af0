"""End to end under Slurm: ``modmoe submit`` of configs/tiny.yaml (shrunk by overrides) as a
2-rank CPU job; a job preempted three times (USR1 to the batch shell and ``scontrol requeue``)
that checkpoints, requeues itself, resumes and ends bit-identical to the uninterrupted run in
one MLflow run; and (slow) a job that Slurm itself warns before its time limit.

The trainer's contract: SIGUSR1/SIGTERM or RUN_DIR/STOP -> checkpoint at the next step and
exit without RUN_DIR/COMPLETED; ``--resume auto`` continues from the newest valid checkpoint.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pytest
from mlflow_server import MlflowServer
from slurm_cluster import (
    Preemption,
    SlurmCluster,
    SubmittedJob,
    batch_log,
    check_finished_run,
    checkpoint_meta,
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

from modmoe.launch import SubmitResult, submit

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]
from runs import REPO

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 150  # ~10 s of steps: room for three preemptions 15 steps apart


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Holds the prepared data shared by this module's runs (so they see the same tokens)."""
    return tmp_path_factory.mktemp("slurm-train")


def _overrides(shared: Path, steps: int = STEPS) -> list[str]:
    return tiny_job_overrides(shared / "prepared", steps)


def _submit(shared: Path, runs: str, steps: int = STEPS, **options) -> SubmitResult:
    args = dict(
        gpus_per_node=0,
        procs_per_node=2,
        time="20",
        signal_grace_s=60,
        max_requeues=3,
        runs_root=shared / runs,
        overrides=_overrides(shared, steps),
        echo=lambda _: None,
    )
    return submit(TINY, **{**args, **options})


class Submitted:
    """A job submitted through the command line, with what the command printed."""

    def __init__(self, job: SubmittedJob, server: MlflowServer) -> None:
        self.output, self.job_id, self.run_dir, self.server = job.output, job.job_id, job.run_dir, server
        link = re.search(r"^MLflow run: (\S+)$", job.output, re.MULTILINE)
        self.link = link.group(1) if link else None


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, shared: Path, mlflow_server: MlflowServer) -> Submitted:
    """The reference run: ``modmoe submit`` as a user types it, tracking to an MLflow server."""
    args = ["--procs-per-node", "2", "--time", "20", "--signal-grace", "60", "--runs-root", str(shared / "plain")]
    job = submit_cli(TINY, args, _overrides(shared) + [f"logging.mlflow.tracking_uri={mlflow_server.uri}"])
    submitted = Submitted(job, mlflow_server)
    assert submitted.run_dir == shared / "plain" / f"modmoe-tiny-{job.job_id}"
    state = slurm_cluster.wait_job(submitted.job_id, timeout=240)
    assert state == "COMPLETED", batch_log(submitted.run_dir) + node_logs(submitted.run_dir)
    return submitted


def test_submit_prints_job_id_and_mlflow_run_link(slurm_cluster: SlurmCluster, uninterrupted: Submitted) -> None:
    from mlflow import MlflowClient

    # The job id is the Slurm job that ran this run directory.
    assert slurm_cluster.job_field(uninterrupted.job_id, "JobName") == "modmoe-tiny"
    assert f"run directory: {uninterrupted.run_dir}" in uninterrupted.output
    # The link opens the MLflow UI on the run list of this job's run: experiment and filter.
    assert uninterrupted.link, uninterrupted.output
    url = urlparse(uninterrupted.link)
    assert f"{url.scheme}://{url.netloc}" == uninterrupted.server.uri
    route = urlparse(url.fragment)  # "/experiments/<id>/runs?searchFilter=..."
    exp_id = re.fullmatch(r"/experiments/(\d+)/runs", route.path).group(1)
    search = unquote(parse_qs(route.query)["searchFilter"][0])
    client = MlflowClient(tracking_uri=uninterrupted.server.uri)
    runs = client.search_runs([exp_id], filter_string=search)
    assert len(runs) == 1 and runs[0].data.tags["slurm_job_id"] == uninterrupted.job_id, search
    newest = sorted(uninterrupted.run_dir.glob("checkpoints/step_*"))[-1]
    assert checkpoint_meta(newest)["mlflow_run_id"] == runs[0].info.run_id
    with urllib.request.urlopen(uninterrupted.link, timeout=30) as page:  # the UI answers at that address
        assert page.status == 200 and b"<html" in page.read(2000).lower()


def test_submitted_two_rank_job_completes_with_checkpoint(
    slurm_cluster: SlurmCluster, uninterrupted: Submitted
) -> None:
    from mlflow import MlflowClient

    run_dir = uninterrupted.run_dir
    assert (run_dir / "COMPLETED").exists()
    assert checkpoint_steps(run_dir)[-1] == STEPS
    check = validate_checkpoint(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    assert check.returncode == 0 and check.stdout.startswith("OK "), check.stdout + check.stderr
    assert [r["step"] for r in training_records(run_dir)] == list(range(1, STEPS + 1))
    assert "2 cpu rank(s)" in node_logs(run_dir)
    assert slurm_cluster.job_field(uninterrupted.job_id, "Restarts") == "0"
    # The MLflow run holds every step's loss, as metrics.jsonl does.
    run_id = checkpoint_meta(run_dir / "checkpoints" / f"step_{STEPS:08d}")["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uninterrupted.server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(r["step"], r["loss"]) for r in training_records(run_dir)]


def test_job_preempted_three_times_resumes_each_time_and_matches_uninterrupted(
    slurm_cluster: SlurmCluster, shared: Path, uninterrupted: Submitted
) -> None:
    reference = {r["step"]: r["loss"] for r in training_records(uninterrupted.run_dir)}
    result = _submit(shared, "preempted", max_requeues=3)  # three requeues: within the limit
    # The first request comes while the attempt starts up (the trainer clears a STOP file it
    # finds then, so the batch shell must renew it); the others mid-run.
    plans = [Preemption("usr1", steps=None, delay_s=3.0), Preemption("requeue", steps=15), Preemption("usr1", steps=15)]
    attempts = [preempt_attempt(slurm_cluster, result.job_id, result.run_dir, i, plan) for i, plan in enumerate(plans)]
    problems = check_finished_run(slurm_cluster, result.job_id, result.run_dir, attempts, STEPS, reference)
    assert not problems, "\n".join(problems) + "\n" + batch_log(result.run_dir)
    # Every attempt stopped mid-run at a later step than the one before, and was followed by a resume there.
    stops = [a.checkpoint for a in attempts]
    assert 0 < stops[0] < stops[1] < stops[2] < STEPS, stops
    assert [a.resumed_at for a in attempts] == stops
    log = batch_log(result.run_dir)
    assert log.count("got SIGUSR1") == 2 and log.count("got SIGTERM") == 1, log


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_time_limit_signal_from_slurm_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, shared: Path
) -> None:
    # slurmctld looks at time limits every 30 s and warns a job once now >= end - grace - 30: with
    # a 2-minute limit and 90 s of grace the warning comes at its first look, 0-30 s after the
    # start (measured). The step budget is one no machine finishes in that window (a fast CI
    # machine did 600 steps in 25 s and finished before the warning), so the job is always
    # warned mid-run; finishing after a requeue is the three-preemption test's part.
    steps = 1_000_000
    result = _submit(shared, "time-limit", steps=steps, time="2", signal_grace_s=90, max_requeues=2)
    job, run_dir = result.job_id, result.run_dir
    deadline = time.monotonic() + 150
    while not (
        slurm_cluster.job_field(job, "Restarts") == "1" and slurm_cluster.job_field(job, "JobState") == "PENDING"
    ):
        assert time.monotonic() < deadline, (
            "no requeue before the time limit\n" + batch_log(run_dir) + node_logs(run_dir)
        )
        assert slurm_cluster.job_field(job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), (
            batch_log(run_dir) + node_logs(run_dir)
        )
        time.sleep(0.3)
    log = batch_log(run_dir)
    assert "got SIGUSR1" in log and "stopped on SIGUSR1" in log, log
    stopped = last_step(run_dir)
    assert stopped > 0 and checkpoint_steps(run_dir)[-1] == stopped, (stopped, checkpoint_steps(run_dir))
    # The next attempt would be warned as early: give it time (Slurm keeps the limit of a
    # requeued job; an operator would raise it the same way).
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=20")
    slurm_cluster.release_requeue_hold(job, restarts=1, timeout=60)
    deadline = time.monotonic() + 120
    while last_step(run_dir) < stopped + 20:
        assert time.monotonic() < deadline, (
            "the requeued attempt did not train\n" + batch_log(run_dir) + node_logs(run_dir)
        )
        assert slurm_cluster.job_field(job, "JobState") in ("PENDING", "CONFIGURING", "RUNNING"), batch_log(
            run_dir
        ) + node_logs(run_dir)
        time.sleep(0.3)
    assert resumed_steps(run_dir).get(1) == stopped, (resumed_steps(run_dir), stopped, node_logs(run_dir))
    steps_seen = [r["step"] for r in training_records(run_dir)]
    assert steps_seen[: steps_seen.index(stopped) + 1] == list(range(1, stopped + 1)), "steps lost or repeated"
    # scancel (SIGTERM, no requeue) stops it with a checkpoint past the resumed one.
    slurm_cluster.run("scancel", job)
    assert slurm_cluster.wait_job(job, timeout=60) == "CANCELLED"
    newest = checkpoint_steps(run_dir)[-1]
    assert newest > stopped and "got SIGTERM" in batch_log(run_dir), (newest, batch_log(run_dir))
    check = validate_checkpoint(run_dir / "checkpoints" / f"step_{newest:08d}")
    assert check.returncode == 0, check.stdout + check.stderr
