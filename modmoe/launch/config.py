"""What ``modmoe submit`` needs to know about the Slurm job (one typed, documented field each)."""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_core import PydanticCustomError

from modmoe.config_base import ConfigModel, field_error
from modmoe.launch.slurm_time import parse_slurm_time

_NAME = r"^[A-Za-z0-9_.+\-]+$"


def check_slurm_time(value: str) -> str:
    """Pydantic check of a Slurm time limit (one line naming the accepted forms)."""
    try:
        parse_slurm_time(value)
    except ValueError as err:  # custom error type: no "Value error," prefix in the message
        raise PydanticCustomError("slurm_time", str(err)) from None
    return value.strip()


def check_sbatch_options(value: list[str]) -> list[str]:
    """Pydantic check of extra ``#SBATCH`` lines: options only, one line each."""
    for arg in value:
        if not arg.startswith("-") or "\n" in arg:
            raise PydanticCustomError("sbatch_option", "each entry must be an sbatch option such as --account=NAME")
    return value


class SubmitConfig(ConfigModel):
    """A Slurm training job: the allocation, the launch settings and the training config."""

    config: Path
    """Training config (YAML) passed to ``modmoe train`` on every rank."""

    nodes: int = Field(default=1, ge=1, le=10_000)
    """Nodes to allocate; one torchrun per node."""

    gpus_per_node: int = Field(default=0, ge=0, le=64)
    """GPUs per node, one rank each (nccl). 0 = CPU mode: gloo ranks, ``procs_per_node`` of them."""

    procs_per_node: int | None = Field(default=None, ge=1, le=1024)
    """Ranks per node in CPU mode (default 1). In GPU mode the rank count is ``gpus_per_node``."""

    cpus_per_node: int | None = Field(default=None, ge=1, le=100_000)
    """CPUs to request per node (``--cpus-per-task`` of the one task per node). Default: one
    per rank in CPU mode, the partition's default in GPU mode."""

    partition: str | None = Field(default=None, pattern=_NAME)
    """Slurm partition; ``None`` = the cluster's default partition."""

    time: str = "24:00:00"
    """Time limit, in Slurm's syntax: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""

    job_name: str | None = Field(default=None, pattern=_NAME, max_length=128)
    """Slurm job name; ``None`` = ``modmoe-<config file stem>``. Also names the run directory."""

    signal_grace_s: int = Field(default=300, ge=60, le=65535)
    """Seconds before the time limit at which Slurm sends USR1 to the batch shell
    (``--signal=B:USR1@...``), which then asks the trainer to checkpoint and stop. slurmctld
    looks at time limits every 30 s, so the signal comes between this many and this many + 30
    seconds before the limit; stopping at the next step and checkpointing must fit in it."""

    max_requeues: int = Field(default=3, ge=0, le=1000)
    """Requeues after which an unfinished job gives up instead of requeueing itself again."""

    runs_root: Path = Path("runs")
    """Directory on storage shared by all nodes that holds the run directories
    (``<runs_root>/<job_name>-<job_id>``) and the batch logs (``<runs_root>/slurm-logs``)."""

    python: str = sys.executable
    """Python interpreter on the compute nodes (the one running ``modmoe submit`` by default)."""

    socket_ifname: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:,^\-]+$")
    """Network interface for rendezvous and collectives (``NCCL_SOCKET_IFNAME`` and
    ``GLOO_SOCKET_IFNAME``); ``None`` lets NCCL/gloo choose."""

    sbatch_args: list[str] = []
    """Extra sbatch options written as ``#SBATCH`` lines, e.g. ``--account=proj`` or ``--exclusive``."""

    overrides: list[str] = []
    """``key=value`` overrides of the training config (``--set``), applied on every attempt."""

    @field_validator("config")
    @classmethod
    def _config_exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise PydanticCustomError("missing_file", "config file does not exist")
        return value.resolve()

    @field_validator("time")
    @classmethod
    def _time_format(cls, value: str) -> str:
        return check_slurm_time(value)

    @field_validator("sbatch_args")
    @classmethod
    def _options_only(cls, value: list[str]) -> list[str]:
        return check_sbatch_options(value)

    def check(self) -> SubmitConfig:
        """Checks that span fields (kept out of pydantic so the error stays one plain line)."""
        if self.gpus_per_node > 0 and self.procs_per_node not in (None, self.gpus_per_node):
            raise field_error(
                "procs_per_node",
                self.procs_per_node,
                f"GPU mode runs one rank per GPU ({self.gpus_per_node}); leave it unset",
            )
        limit_s = parse_slurm_time(self.time)
        if self.signal_grace_s >= limit_s:
            raise field_error(
                "signal_grace_s",
                self.signal_grace_s,
                f"must be shorter than the time limit ({self.time} = {limit_s} s)",
            )
        return self

    @property
    def device(self) -> str:
        return "gpu" if self.gpus_per_node > 0 else "cpu"

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else (self.procs_per_node or 1)

    @property
    def resolved_job_name(self) -> str:
        return self.job_name or f"modmoe-{self.config.stem}"
