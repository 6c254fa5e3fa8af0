"""Turns ``launch/train.sbatch`` into a job script for one submission.

The template is a working batch script on its own; two marked blocks in it are replaced: the
``#SBATCH`` options and the settings (exported variables plus the script's arguments, which
are stored with the job, so a requeued attempt runs the very same command).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from modmoe.config_base import ConfigError
from modmoe.launch.config import SubmitConfig

# The checkout holding launch/ (the batch script sources launch/lib.sh from there).
MODMOE_HOME = Path(__file__).resolve().parents[2]
TEMPLATE = MODMOE_HOME / "launch" / "train.sbatch"
_BLOCKS = ("sbatch options", "settings")


def sbatch_options(cfg: SubmitConfig, workdir: Path) -> list[str]:
    """The ``#SBATCH`` lines of the job."""
    runs_root = cfg.runs_root.resolve()
    opts = [
        f"--job-name={cfg.resolved_job_name}",
        f"--nodes={cfg.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the ranks
        f"--time={cfg.time}",
        "--requeue",
        "--open-mode=append",  # attempts after a requeue append to the same log
        f"--signal=B:USR1@{cfg.signal_grace_s}",  # B: only the batch shell, which relays it
        f"--chdir={workdir}",
        f"--output={runs_root / 'slurm-logs' / '%x-%j.out'}",
    ]
    if cfg.partition:
        opts.append(f"--partition={cfg.partition}")
    if cfg.gpus_per_node:
        opts.append(f"--gpus-per-node={cfg.gpus_per_node}")
    cpus = cfg.cpus_per_node or (None if cfg.gpus_per_node else cfg.ranks_per_node)
    if cpus:
        opts.append(f"--cpus-per-task={cpus}")
    return opts + list(cfg.sbatch_args)


def settings(cfg: SubmitConfig) -> list[str]:
    """Shell lines exporting the launch settings and fixing the script's arguments."""
    env = {
        "MODMOE_HOME": str(MODMOE_HOME),
        "MODMOE_PYTHON": cfg.python,
        "MODMOE_DEVICE": cfg.device,
        "MODMOE_PROCS_PER_NODE": str(cfg.ranks_per_node),
        "MODMOE_RUNS_ROOT": str(cfg.runs_root.resolve()),
        "MODMOE_MAX_REQUEUES": str(cfg.max_requeues),
    }
    if cfg.socket_ifname:
        env["MODMOE_SOCKET_IFNAME"] = cfg.socket_ifname
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    args = [str(cfg.config)] + [a for item in cfg.overrides for a in ("--set", item)]
    lines.append("set -- " + " ".join(shlex.quote(a) for a in args))
    return lines


def render(cfg: SubmitConfig, workdir: Path, template: Path = TEMPLATE) -> str:
    """The complete job script."""
    if not template.is_file():
        raise ConfigError(f"launch error: template {template} not found (modmoe submit needs the source checkout)")
    replacements = {
        "sbatch options": [f"#SBATCH {opt}" for opt in sbatch_options(cfg, workdir)],
        "settings": settings(cfg),
    }
    out: list[str] = []
    skipping = None
    for line in template.read_text().splitlines():
        marker = line.strip()
        block = next((b for b in _BLOCKS if marker.startswith(f"# >>> {b}")), None)
        if block:
            out.append(line)
            out.extend(replacements.pop(block))
            skipping = block
            continue
        if skipping and marker.startswith(f"# <<< {skipping}"):
            skipping = None
        if skipping is None:
            out.append(line)
    if replacements or skipping:
        raise ConfigError(
            f"launch error: template {template} lacks the marked block(s) {sorted(replacements) or [skipping]}"
        )
    return "\n".join(out) + "\n"
