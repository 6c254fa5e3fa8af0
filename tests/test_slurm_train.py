"""End to end under Slurm: ``modmoe submit`` of configs/tiny.yaml (shrunk by overrides) as a
2-rank CPU job; and a preempted job that checkpoints, requeues itself, resumes and finishes
with the same metrics as an uninterrupted run.

These depend on the trainer's contract (STOP file / SIGUSR1 -> checkpoint and exit without
COMPLETED; ``--resume auto`` from the run directory's newest checkpoint). While the trainer
does not checkpoint yet they are skipped with that reason.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from modmoe.launch import SubmitResult, submit
from slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
STEPS = 150  # long enough (~10 s of steps) for the stop request to land mid-run


def _requires_checkpointing() -> None:
    from modmoe.config import JobConfig

    if "checkpoint" not in JobConfig.model_fields:
        pytest.skip("trainer does not checkpoint yet (the job config has no checkpoint section)")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Holds the prepared data shared by this module's runs (so they see the same tokens)."""
    return tmp_path_factory.mktemp("slurm-train")


def _overrides(shared: Path) -> list[str]:
    # A ~100k-parameter model on 1 MB of stdlib text: a step takes tens of milliseconds.
    return [
        f"trainer.max_steps={STEPS}", "trainer.eval_every=0", "trainer.eval_batches=1",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
        "model.dim=64", "model.num_layers=2", "model.ffn_hidden=128", "model.moe.expert_hidden=64",
        "model.max_seq_len=64", "model.vocab_size=512",
        "data.seq_len=64", "data.vocab_size=512", "data.max_corpus_bytes=1000000", "data.val_fraction=0.1",
        f"data.prepared_dir={shared / 'prepared'}",
    ]


def _submit(shared: Path, runs: str) -> SubmitResult:
    return submit(TINY, gpus_per_node=0, procs_per_node=2, time="20", signal_grace_s=60, max_requeues=2,
                  runs_root=shared / runs, overrides=_overrides(shared), echo=lambda _: None)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r for r in records if "loss" in r]  # training-step records (not eval-only ones)


def _checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("**/step_*/manifest.json"))


def _batch_log(result: SubmitResult) -> str:
    log = result.run_dir.parent / "slurm-logs" / f"{result.run_dir.name}.out"
    return log.read_text() if log.exists() else "(no batch log)"


def _node_logs(result: SubmitResult) -> str:
    return "\n".join(p.read_text()[-3000:] for p in sorted((result.run_dir / "logs").glob("node*.log")))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster: SlurmCluster, shared: Path) -> SubmitResult:
    _requires_checkpointing()
    result = _submit(shared, "plain")
    state = slurm_cluster.wait_job(result.job_id, timeout=240)
    assert state == "COMPLETED", _batch_log(result) + _node_logs(result)
    return result


def test_submitted_two_rank_job_completes_with_checkpoint(slurm_cluster: SlurmCluster, uninterrupted: SubmitResult) -> None:
    run_dir = uninterrupted.run_dir
    assert (run_dir / "COMPLETED").exists()
    assert _checkpoint_steps(run_dir), f"no checkpoint under {run_dir}"
    steps = [m["step"] for m in _metrics(run_dir)]
    assert steps == list(range(1, STEPS + 1))
    assert "2 cpu rank(s)" in _node_logs(uninterrupted)
    assert slurm_cluster.job_field(uninterrupted.job_id, "Restarts") == "0"


def test_preempted_job_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, shared: Path, uninterrupted: SubmitResult
) -> None:
    result = _submit(shared, "preempted")
    job, run_dir = result.job_id, result.run_dir
    # Preempt once training is under way: USR1 to the batch shell, as --signal=B:USR1 would.
    deadline = time.monotonic() + 180
    while len(_metrics(run_dir)) < 10:
        assert time.monotonic() < deadline, "training did not start\n" + _batch_log(result) + _node_logs(result)
        assert slurm_cluster.job_field(job, "JobState") in ("PENDING", "RUNNING"), _batch_log(result)
        time.sleep(0.1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)

    slurm_cluster.release_requeue_hold(job, restarts=1, timeout=120)
    # First attempt over: it stopped early, checkpointed, and did not claim completion.
    first = _metrics(run_dir)
    ckpts = _checkpoint_steps(run_dir)
    assert not (run_dir / "COMPLETED").exists()
    assert ckpts and first[-1]["step"] < STEPS, f"not preempted mid-run: steps {len(first)}, checkpoints {ckpts}"

    state = slurm_cluster.wait_job(job, timeout=240)
    log = _batch_log(result)
    assert state == "COMPLETED", log + _node_logs(result)
    assert (run_dir / "COMPLETED").exists()
    assert "got SIGUSR1" in log and "attempt 1" in log, log
    assert slurm_cluster.job_field(job, "Restarts") == "1"

    records = _metrics(run_dir)
    resumed = records[len(first):]
    # The second attempt continued from the newest checkpoint instead of starting over.
    assert resumed and resumed[0]["step"] == max(ckpts) + 1 > 1, [r["step"] for r in resumed[:3]]
    by_step = {r["step"]: r for r in records}  # a resumed step overwrites the first attempt's
    assert sorted(by_step) == list(range(1, STEPS + 1))
    reference = {r["step"]: r["loss"] for r in _metrics(uninterrupted.run_dir)}
    mismatched = [s for s in by_step if not math.isclose(by_step[s]["loss"], reference[s], rel_tol=1e-5, abs_tol=1e-6)]
    assert not mismatched, f"loss differs from the uninterrupted run at steps {mismatched[:10]}"
