"""The sweep without training: spec checks, FLOP budgets -> steps, the schedule rule, point
states, the Slurm array script and the summary (tests/integration/test_sweep.py trains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from sweeps import VARIANTS, write_spec

from modmoe.config_base import ConfigError
from modmoe.model.flops import count_flops
from modmoe.sweep import SweepError, expand, load_spec, state
from modmoe.sweep.analysis import seed_gaps, summarize
from modmoe.sweep.points import budget_label, steps_for_budget
from modmoe.sweep.report import findings
from modmoe.sweep.results import PointResult
from modmoe.sweep.runner import ATTEMPTS, POINT_CONFIG, TRAIN_LOG
from modmoe.sweep.slurm import array_indices, render_array, render_report
from modmoe.train.run_dir import LAUNCHER_ENTRIES, check_run_dir


def _spec(tmp_path: Path, **fields):
    return load_spec(write_spec(tmp_path / "spec.yaml", str(tmp_path / "data"), tmp_path / "runs", **fields))


def test_each_budget_buys_whole_steps_within_one_step(tmp_path: Path) -> None:
    spec = _spec(tmp_path, budgets=[3e10, 9e10])
    points = expand(spec)
    assert [p.name for p in points] == ["3e10_base_moe", "3e10_base_mode", "9e10_base_moe", "9e10_base_mode"]
    for p in points:
        cfg = p.config
        # Counted independently of the sweep: executed training FLOPs per token x tokens per step.
        per_step = count_flops(cfg.model, cfg.data.seq_len).training_per_token * 8 * 64
        assert p.flops_per_step == pytest.approx(per_step)
        assert p.max_steps * per_step <= p.budget < (p.max_steps + 1) * per_step
    by_name = {p.name: p for p in points}
    # MoD executes fewer FLOPs per token, so the same budget buys it more steps.
    assert by_name["3e10_base_mode"].max_steps > by_name["3e10_base_moe"].max_steps
    assert steps_for_budget(10.0, 2.5) == 4 and steps_for_budget(9.99, 2.5) == 3
    assert steps_for_budget(0.3, 0.1) == 3  # 0.3 / 0.1 = 2.9999999999999996 in floats
    assert budget_label(1.5e13) == "1.5e13" and budget_label(2e12) == "2e12"


def test_schedule_and_tracking_follow_each_points_own_steps(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path, budgets=[3e10], learning_rates=[0.01, 0.003], schedule={"warmup_fraction": 0.1, "evaluations": 4}
    )
    points = expand(spec)
    assert len(points) == 4 and {p.lr for p in points} == {0.003, 0.01}
    for p in points:
        cfg = p.config
        assert cfg.optimizer.warmup_steps == round(0.1 * p.max_steps)
        assert cfg.optimizer.schedule == "cosine" and cfg.trainer.max_steps == p.max_steps
        assert cfg.trainer.eval_every == -(-p.max_steps // 4)
        assert cfg.optimizer.lr == p.lr
        assert Path(cfg.trainer.run_dir) == (tmp_path / "runs" / "small" / p.name).resolve()
        ml = cfg.logging.mlflow
        assert ml.experiment == "small" and ml.run_name == p.name
        assert ml.tracking_uri == f"sqlite:///{(tmp_path / 'runs' / 'small').resolve()}/mlflow.db"
        assert ml.tags["variant"] == p.variant and ml.tags["budget"] == "3e+10" and ml.tags["size"] == "base"
    assert points[0].name == "3e10_base_moe_lr0.003"


@pytest.mark.parametrize(
    "fields, where",
    [
        ({"budgets": [-1.0]}, "budgets"),
        ({"budgets": [1e9]}, "budgets"),  # buys fewer than schedule.min_steps steps
        (
            {"variants": [{"name": "a", "overrides": {"trainer.max_steps": 5}}]},
            "variants.a.overrides.trainer.max_steps",
        ),
        ({"variants": [{"name": "a", "overrides": {"data.seq_len": 32}}]}, "variants.a.overrides.data.seq_len"),
        ({"learning_rates": [0.01], "sizes": [{"name": "s", "overrides": {"optimizer.lr": 0.1}}]}, "optimizer.lr"),
        ({"variants": VARIANTS + [VARIANTS[0]]}, "variants"),
        ({"baseline": "dense"}, "baseline"),
        ({"colour": "blue"}, "colour"),
        ({"slurm": {"time": "soon"}}, "slurm.time"),
        ({"variants": [{"name": "bad name", "overrides": {}}]}, "variants.0.name"),
        ({"variants": [{"name": "a", "overrides": {"model.dim": "wide"}}]}, "model.dim"),
        ({"base_config": "missing.yaml"}, "base_config"),
    ],
)
def test_bad_specs_give_one_line_naming_the_field(tmp_path: Path, fields: dict, where: str) -> None:
    with pytest.raises(ConfigError) as info:
        expand(_spec(tmp_path, **fields))
    msg = str(info.value)
    assert "\n" not in msg and where in msg, msg


def test_point_states_and_a_run_directory_of_another_config(tmp_path: Path) -> None:
    point, other = expand(_spec(tmp_path))
    assert state(point) == "new"
    other.run_dir.mkdir(parents=True)
    (other.run_dir / "COMPLETED").write_text("{}")
    with pytest.raises(SweepError, match="records no config"):
        state(other)
    point.run_dir.mkdir(parents=True)
    recorded = point.config.model_dump(mode="json")
    recorded["logging"]["mlflow"]["tracking_uri"] = "http://elsewhere:5000"  # where metrics go is not compared
    (point.run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert state(point) == "interrupted"
    (point.run_dir / "COMPLETED").write_text(json.dumps({"step": point.max_steps}))
    assert state(point) == "finished"
    del recorded["parallel"]["setup_timeout_s"]  # a run from before the key existed: its default
    (point.run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert state(point) == "finished"
    # A default the sweep does not set, changed by a later modmoe (megatron.dispatcher was
    # 'alltoall', now null): the earlier point is still this point.
    recorded["megatron"]["dispatcher"] = "alltoall"
    (point.run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert state(point) == "finished"
    recorded["model"]["dim"] = 96
    (point.run_dir / "config.yaml").write_text(yaml.safe_dump(recorded))
    with pytest.raises(SweepError, match=r"model\.dim = 96, the spec gives 64"):
        state(point)


def test_the_trainer_accepts_what_the_sweep_writes_before_a_point_starts(tmp_path: Path) -> None:
    # A point's first attempt finds its run directory holding the sweep's own files; the trainer's
    # run-directory guard must take that for an unclaimed directory, not someone else's data.
    assert {POINT_CONFIG, TRAIN_LOG, ATTEMPTS} <= LAUNCHER_ENTRIES
    for name in (POINT_CONFIG, TRAIN_LOG, ATTEMPTS):
        (tmp_path / name).write_text("")
    assert check_run_dir(tmp_path) == "empty"


def test_slurm_array_script_runs_each_unfinished_point(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        budgets=[3e10, 9e10],
        slurm={"partition": "cpu", "max_parallel": 2, "cpus_per_task": 3, "sbatch_args": ["--account=proj"]},
    )
    points = expand(spec)
    assert array_indices([points[i] for i in (0, 1, 3)]) == "0-1,3"
    script = render_array(spec, tmp_path / "spec.yaml", [points[i] for i in (0, 1, 3)], Path("/work"))
    lines = script.splitlines()
    for line in [
        "#SBATCH --array=0-1,3%2",
        "#SBATCH --cpus-per-task=3",
        "#SBATCH --partition=cpu",
        "#SBATCH --account=proj",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --chdir=/work",
        f"#SBATCH --output={spec.sweep_dir()}/slurm-logs/%x-%A_%a.out",
    ]:
        assert line in lines, line
    assert lines[-1].endswith(f'-m modmoe sweep {tmp_path / "spec.yaml"} --point "$SLURM_ARRAY_TASK_ID"')
    assert lines[-1].startswith("exec ")
    report = render_report(spec, tmp_path / "spec.yaml", Path("/work"))
    assert report.splitlines()[-1].endswith("--report") and "--array" not in report
    # The --set options of the submitting call reach every task and the report job.
    sets = ["runs_root=/big disk"]
    script = render_array(spec, tmp_path / "spec.yaml", points, Path("/work"), sets)
    assert " '--set=runs_root=/big disk' --point \"$SLURM_ARRAY_TASK_ID\"" in script.splitlines()[-1]
    assert "'--set=runs_root=/big disk' --report" in render_report(spec, tmp_path / "spec.yaml", Path("/work"), sets)


def test_summary_takes_each_variants_best_over_sizes_and_rates(tmp_path: Path) -> None:
    spec = _spec(tmp_path, budgets=[3e10], learning_rates=[0.003, 0.01])
    points = expand(spec)
    losses = {"moe_lr0.003": 5.0, "moe_lr0.01": 4.8, "mode_lr0.003": 4.7, "mode_lr0.01": 4.9}
    results = []
    for p in points:
        loss = losses[p.name.split("_", 2)[2]]
        results.append(PointResult(p, "finished", steps=p.max_steps, loss_topk=loss, loss_causal=loss + 0.01))
    summary = {b.variant: b for b in summarize(spec, results)}
    assert summary["moe"].loss_topk == 4.8 and summary["moe"].lr == 0.01
    assert summary["moe"].best_loss_causal is None  # no depth router: causal is top-k
    assert summary["mode"].loss_topk == 4.7 and summary["mode"].best_loss_causal == pytest.approx(4.71)
    assert summary["mode"].vs_baseline == pytest.approx(4.7 / 4.8 - 1)
    text = findings(spec, list(summary.values()), seed_gaps(spec, list(summary.values())), [], [])
    assert "| 3e+10 | mode | base | 0.003 | lowest lr | " in text and "| -2.08% | 4.7100 |" in text
    assert "| 3e+10 | mode | -0.1000 | -2.08% | 4.7000 ± - (n=1) |" in text  # one seed: no spread, no verdict
