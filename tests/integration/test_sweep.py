"""``modmoe sweep`` end to end on CPU: a two-point sweep (MoE-only vs MoDE at one budget) stopped
by SIGTERM while its second point trains; run again, it skips the finished point and resumes the
interrupted one from its checkpoint, then trains each variant's best point at a second seed;
then the printed findings, the table, the plot, MLflow (one experiment, tagged
runs, a summary run holding the artifacts) and the FLOP budget of each point, checked against
metrics.jsonl. (The point command under Slurm: tests/integration/test_sweep_slurm.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from runs import REPO, read_metrics, run_modmoe
from sweeps import write_spec

from modmoe.config import JobConfig
from modmoe.model.flops import count_flops

BUDGET = 2e10  # MoE-only: 32 steps, MoDE (capacity 0.25): 45 steps of 8 x 64 tokens


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the point finished before it could be interrupted"
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file() and any(
            json.loads(line).get("step", 0) >= step for line in metrics.read_text().splitlines() if line.endswith("}")
        ):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir} did not reach step {step}")


def test_sweep_trains_resumes_skips_and_reports(tmp_path: Path, small_data_dir: str) -> None:
    spec = write_spec(tmp_path / "spec.yaml", small_data_dir, tmp_path / "runs", budgets=[BUDGET])
    sweep_dir = tmp_path / "runs" / "small"
    moe_dir, mode_dir = sweep_dir / "2e10_base_moe", sweep_dir / "2e10_base_mode"

    # First run: point 0 (MoE-only) finishes; point 1 (MoDE) is stopped by SIGTERM to the sweep,
    # as Slurm stops a job: passed on to the trainer, which checkpoints and exits.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "modmoe", "sweep", str(spec)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(mode_dir, 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "run the sweep again to resume" in out, out
    assert "2e10_base_moe: training 32 steps" in out and (moe_dir / "COMPLETED").is_file(), out
    assert not (mode_dir / "COMPLETED").exists() and not (sweep_dir / "results.json").exists()
    assert max(r["step"] for r in read_metrics(mode_dir)) < 45

    # Second run, with a second seed added to the spec (the grid keeps its seed, names and state):
    # the finished point is skipped, the interrupted one resumes from its checkpoint, then each
    # variant's best point trains at seed 5. Before it, the plan knows moe's seed point (its grid
    # has finished) and holds mode's as a slot.
    write_spec(tmp_path / "spec.yaml", small_data_dir, tmp_path / "runs", budgets=[BUDGET], seeds=[1234, 5])
    plan = run_modmoe(["sweep", str(spec), "--plan"]).stdout
    assert "  2 2e10_base_moe_s5: 32 steps" in plan and "(seed 5 of the best 2e+10 moe point)" in plan, plan
    assert "  3 seed 5 of the best 2e+10 mode point: waits for that grid (0 of 1 points finished)" in plan, plan
    again = run_modmoe(["sweep", str(spec)], timeout=300).stdout
    assert "2e10_base_moe: finished, skipped" in again, again
    assert "2e10_base_mode: resuming 45 steps" in again, again
    assert again.index("2e10_base_mode: resuming") < again.index("2e10_base_moe_s5: training 32 steps"), again
    assert "2e10_base_mode_s5: training 45 steps" in again, again
    # The report prints what it found by itself: best point, gap with its 2-seed spread, equal time.
    assert "| 2e+10 | mode | base | " in again and "(n=2)" in again, again
    assert "## Equal time, in cpu seconds" in again, again
    assert f"resumed from {mode_dir / 'checkpoints'}" in (mode_dir / "train.log").read_text()
    assert len((moe_dir / "sweep-attempts.jsonl").read_text().splitlines()) == 1  # trained once

    # Each point: its budget honoured within one step, counted from what the run recorded.
    for run_dir, steps in ((moe_dir, 32), (mode_dir, 45)):
        cfg = JobConfig.model_validate(yaml.safe_load((run_dir / "config.yaml").read_text()))
        tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
        per_step = count_flops(cfg.model, cfg.data.seq_len).training_per_token * tokens_per_step
        records = read_metrics(run_dir)
        assert [r["step"] for r in records] == list(range(1, steps + 1))  # resumed: every step once
        assert steps * per_step <= BUDGET < (steps + 1) * per_step
        assert (run_dir / "COMPLETED").is_file()

    results = json.loads((sweep_dir / "results.json").read_text())
    rows = {r["point"]: r for r in results["points"]}
    for name in ("2e10_base_moe", "2e10_base_mode"):  # another seed: the same steps, another result
        seeded = rows[f"{name}_s5"]
        assert seeded["seed"] == 5 and seeded["steps"] == rows[name]["steps"] and seeded["status"] == "finished"
        assert seeded["loss_topk"] != rows[name]["loss_topk"]
    gap = results["gaps"][0]
    assert gap["variant_loss"]["n"] == gap["baseline_loss"]["n"] == 2 and isinstance(gap["exceeds_spread"], bool)
    assert rows["2e10_base_mode"]["steps"] == 45 and rows["2e10_base_mode"]["status"] == "finished"
    assert rows["2e10_base_mode"]["loss_topk"] == read_metrics(mode_dir)[-1]["eval/loss_topk"]
    assert rows["2e10_base_mode"]["wall_s"] > rows["2e10_base_mode"]["cpu_s"] / 2 > 0  # both attempts counted
    assert rows["2e10_base_mode"]["budget_used"] <= 1.0
    assert {r["variant"] for r in results["summary"]} == {"moe", "mode"}
    assert "| 2e+10 | mode |" in (sweep_dir / "sweep.md").read_text()
    assert (sweep_dir / "points.csv").read_text().startswith("point,budget,size,variant,lr,")
    assert (sweep_dir / "isoflop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("small")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    # The resumed point: one run.
    assert set(runs) == {"2e10_base_moe", "2e10_base_mode", "2e10_base_moe_s5", "2e10_base_mode_s5", "small-summary"}
    mode_run = runs["2e10_base_mode"]
    assert {k: mode_run.data.tags[k] for k in ("sweep", "budget", "variant", "size")} == {
        "sweep": "small",
        "budget": "2e+10",
        "variant": "mode",
        "size": "base",
    }
    summary_files = {a.path for a in client.list_artifacts(runs["small-summary"].info.run_id)}
    assert {"isoflop.png", "sweep.md", "points.csv", "results.json"} <= summary_files
