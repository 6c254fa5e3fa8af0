"""``modmoe submit`` without a cluster: argument checks, time syntax, the rendered script and
the shell helpers. (The ``slurm``-marked files run the scripts on a real cluster.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from runs import REPO
from typer.testing import CliRunner

from modmoe.config import load_config
from modmoe.config_base import ConfigError
from modmoe.launch import submit
from modmoe.launch.cli import app
from modmoe.launch.config import SubmitConfig
from modmoe.launch.mlflow_link import run_link
from modmoe.launch.render import MODMOE_HOME, render
from modmoe.launch.slurm_time import parse_slurm_time

TINY = REPO / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90", 90 * 60),
        ("30:15", 30 * 60 + 15),
        ("4:00:00", 4 * 3600),
        ("2-12", 2 * 86400 + 12 * 3600),
        ("1-02:03", 86400 + 2 * 3600 + 3 * 60),
        ("1-02:03:04", 86400 + 2 * 3600 + 3 * 60 + 4),
    ],
)
def test_slurm_time_forms(text: str, seconds: int) -> None:
    assert parse_slurm_time(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "1-", "-5", "0", "1:60:00", "1-24:00", "4h", "infinite"])
def test_slurm_time_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="MM:SS"):
        parse_slurm_time(text)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"config_path": "missing.yaml"}, "config"),
        ({"nodes": 0}, "nodes"),
        ({"nodes": "two"}, "nodes"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"gpus_per_node": 2, "procs_per_node": 4}, "procs_per_node"),
        ({"time": "1:99:00"}, "time"),
        ({"time": "tomorrow"}, "time"),
        ({"time": "4", "signal_grace_s": 300}, "signal_grace_s"),
        ({"partition": "gpu;rm -rf /"}, "partition"),
        ({"sbatch_args": ["exclusive"]}, "sbatch_args"),
        ({"overrides": ["trainer.max_steps=lots"]}, "trainer.max_steps"),
        ({"overrides": ["no_equals_sign"]}, "no_equals_sign"),
        ({"overrides": ["trainer.run_dir=/elsewhere"]}, "overrides"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_arguments_give_one_line_naming_the_field(kwargs: dict, field: str) -> None:
    args = {"config_path": TINY, "dry_run": True, "echo": lambda _: None, **kwargs}
    with pytest.raises(ConfigError) as info:
        submit(**args)
    msg = str(info.value)
    assert "\n" not in msg and field in msg, msg


def test_cli_reports_errors_on_one_line_with_status_2() -> None:
    result = CliRunner().invoke(app, [str(TINY), "--nodes", "0", "--dry-run"])
    assert result.exit_code == 2
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "nodes" in lines[0], result.output


def test_cli_dry_run_prints_the_script(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            str(TINY),
            "--nodes",
            "4",
            "--gpus-per-node",
            "8",
            "--partition",
            "h100",
            "--time",
            "2-00:00:00",
            "--dry-run",
            "--set",
            "trainer.max_steps=10",
            "--runs-root",
            str(tmp_path),
            "--sbatch-arg=--account=proj",
        ],
    )
    assert result.exit_code == 0, result.output
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=h100",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --account=proj",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "export MODMOE_DEVICE=gpu",
    ]:
        assert line in result.output.splitlines(), line


def _render(**fields) -> str:
    cfg = SubmitConfig(config=TINY, **fields).check()
    return render(cfg, Path("/work dir"))


def test_render_replaces_template_defaults_and_parses() -> None:
    script = _render(
        nodes=2,
        gpus_per_node=0,
        procs_per_node=3,
        time="45",
        signal_grace_s=120,
        max_requeues=5,
        runs_root=Path("/shared/runs"),
        job_name="exp1",
        overrides=["optimizer.lr=0.001", "trainer.seed=7", "tracking.run_name=two words"],
    )
    lines = script.splitlines()
    sbatch = [ln for ln in lines if ln.startswith("#SBATCH")]
    # The template's own defaults are gone, each option appears once.
    assert "#SBATCH --gpus-per-node=8" not in sbatch and "#SBATCH --time=24:00:00" not in sbatch
    assert len({ln.split("=")[0] for ln in sbatch}) == len(sbatch)
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --cpus-per-task=3",
        "#SBATCH --time=45",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --job-name=exp1",
        "#SBATCH --chdir=/work dir",
        "#SBATCH --output=/shared/runs/slurm-logs/%x-%j.out",
        "export MODMOE_DEVICE=cpu",
        "export MODMOE_PROCS_PER_NODE=3",
        "export MODMOE_MAX_REQUEUES=5",
        f"export MODMOE_HOME={MODMOE_HOME}",
    ]:
        assert line in lines, line
    assert f"set -- {TINY} --set optimizer.lr=0.001 --set trainer.seed=7 --set 'tracking.run_name=two words'" in lines
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # The arguments survive shell quoting exactly.
    settings = script[script.index("# >>> settings") : script.index("# <<< settings")]
    out = subprocess.run(["bash", "-c", settings + '\nprintf "%s\\n" "$@"'], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        str(TINY),
        "--set",
        "optimizer.lr=0.001",
        "--set",
        "trainer.seed=7",
        "--set",
        "tracking.run_name=two words",
    ]


def test_template_without_markers_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "t.sbatch"
    bad.write_text("#!/bin/bash\n#SBATCH --nodes=1\n")
    with pytest.raises(ConfigError, match="marked block"):
        render(SubmitConfig(config=TINY), tmp_path, template=bad)


def test_missing_sbatch_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="sbatch not found") as info:
        submit(TINY, runs_root=tmp_path, echo=lambda _: None)
    assert "\n" not in str(info.value)


def _lib(snippet: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MODMOE_"))}
    proc = subprocess.run(
        ["bash", "-c", f"source {REPO}/launch/lib.sh && {snippet}"],
        env={**clean, **env},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_lib_ranks_per_node() -> None:
    assert _lib("modmoe_defaults; modmoe_procs_per_node", SLURM_JOB_ID="7", SLURM_GPUS_ON_NODE="4") == "4"
    assert _lib("modmoe_defaults; modmoe_procs_per_node", SLURM_JOB_ID="7", MODMOE_DEVICE="cpu") == "1"
    assert (
        _lib("modmoe_defaults; modmoe_procs_per_node", SLURM_JOB_ID="7", MODMOE_DEVICE="cpu", MODMOE_PROCS_PER_NODE="3")
        == "3"
    )


def test_lib_run_dir_is_keyed_by_job_id_not_attempt() -> None:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "exp", "SLURM_SUBMIT_DIR": "/sub"}
    first = _lib('modmoe_defaults; echo "$MODMOE_RUN_DIR"', **env)
    again = _lib('modmoe_defaults; echo "$MODMOE_RUN_DIR"', **env, SLURM_RESTART_COUNT="2")
    assert first == again == "/sub/runs/exp-4242"


def test_lib_rendezvous_port_is_free_here_unless_set() -> None:
    # Free on the batch host (the first node) at the time of the attempt: jobs with the same id on
    # two clusters sharing a host, or on one host at once, must not meet in one rendezvous.
    ports = {int(_lib("modmoe_rdzv_port", MODMOE_PYTHON=sys.executable)) for _ in range(3)}
    for port in ports:
        assert 1024 < port < 65536
        with socket.socket() as s:
            s.bind(("", port))
    assert _lib("modmoe_rdzv_port", MODMOE_RDZV_PORT="29400") == "29400"


def test_lib_rejects_bad_device() -> None:
    proc = subprocess.run(
        ["bash", "-c", f"source {REPO}/launch/lib.sh && modmoe_defaults"],
        env={**os.environ, "SLURM_JOB_ID": "1", "MODMOE_DEVICE": "tpu"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "MODMOE_DEVICE=tpu" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_link_of_the_embedded_default_names_database_and_job(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    line = run_link(load_config(TINY), tmp_path / "modmoe-tiny-7", "7")
    assert line.startswith(f"sqlite:///{tmp_path / 'modmoe-tiny-7' / 'mlflow.db'} ")
    assert "tags.slurm_job_id = '7'" in line and "mlflow ui --backend-store-uri sqlite:///" in line
    assert run_link(load_config(TINY, ["logging.mlflow.enabled=false"]), tmp_path, "7").startswith("disabled")


def test_mlflow_link_to_an_unreachable_server_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Nothing listens there: the job is queued anyway, the line says what is known.
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(var, os.environ.get(var, "0" if "RETRIES" in var else "5"))
    uri = f"http://127.0.0.1:{_free_port()}"
    line = run_link(load_config(TINY, [f"logging.mlflow.tracking_uri={uri}"]), tmp_path, "7")
    assert line.startswith(f"{uri} (experiment 'modmoe' not reachable now: ") and "\n" not in line, line
    assert line.endswith("filter tags.slurm_job_id = '7')")
