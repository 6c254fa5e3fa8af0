"""A stall injected on one rank (``MODMOE_DEBUG_STALL``) of a real 2-rank training run: every
rank's watchdog dumps its stacks and says which rank is slow, and rank 0 logs the straggler
line; the straggler metric names that rank in metrics.jsonl and MLflow."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from runs import read_metrics, run_modmoe, small_overrides

from modmoe.train.watchdog import STALL_ENV

pytestmark = [pytest.mark.multirank, pytest.mark.timeout(300)]
STALL_STEP, STALL_S = 8, 4.0


def test_stall_on_one_rank_dumps_every_rank_and_names_the_slow_one(small_data_dir, tmp_path):
    overrides = small_overrides(
        small_data_dir,
        tmp_path,
        **{
            "trainer.max_steps": 10,
            "trainer.micro_batch_size": 4,
            "logging.plots_every_eval": False,
            # A step of this model takes well under a second; the stall takes four.
            "trainer.watchdog.floor_s": 1.5,
            "trainer.watchdog.factor": 3.0,
            "trainer.watchdog.check_every_s": 0.1,
        },
    )
    proc = run_modmoe(
        ["train", "configs/tiny.yaml", *sum((["--set", o] for o in overrides), [])],
        nproc=2,
        env={STALL_ENV: f"1:{STALL_STEP}:{STALL_S}"},
    )
    out = proc.stdout + proc.stderr
    stacks = {r: tmp_path / "stacks" / f"rank_{r:05d}-step{STALL_STEP}.txt" for r in (0, 1)}
    assert all(p.exists() for p in stacks.values()), out[-3000:]
    # The stalled rank's main thread is in the seam's sleep; its peer waits in a collective of the step.
    assert "in debug_stall" in stacks[1].read_text(), stacks[1].read_text()
    assert "in forward_backward" in stacks[0].read_text(), stacks[0].read_text()
    lines = {
        r: [ln for ln in out.splitlines() if ln.startswith(f"watchdog: rank {r} step {STALL_STEP} ")] for r in (0, 1)
    }
    assert (
        len(lines[1]) == 1 and "in 'data', before its first collective of the step: no peer holds it up" in lines[1][0]
    ), out[-3000:]
    assert (
        len(lines[0]) == 1
        and "in 'forward/backward', a phase with collectives: it may be waiting for a slower peer" in lines[0][0]
    ), out[-3000:]
    assert f"stacks of all its threads in {stacks[0]}" in lines[0][0]
    straggler = [ln for ln in out.splitlines() if ln.startswith(f"straggler: step {STALL_STEP}: rank 1 took ")]
    assert len(straggler) == 1, out[-3000:]

    record = next(r for r in read_metrics(tmp_path) if r.get("step") == STALL_STEP and "loss" in r)
    assert record["straggler/slowest_rank"] == 1.0 and record["straggler/local_max_s"] >= STALL_S
    assert record["straggler/max_over_median"] > 3.0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "straggler/slowest_rank")}
    assert history[STALL_STEP] == 1.0 and sorted(history) == list(range(1, 11))
