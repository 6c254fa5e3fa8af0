"""A real single-node Slurm cluster on this host, for the ``slurm`` tests.

munged, slurmctld and slurmd run as root from Debian's packages with everything (key, socket,
config, state, spool, logs) in a private temporary directory, on free ports, so the system's
``/etc/slurm`` and ``/etc/munge`` are never read or changed. Client commands find the cluster
through ``SLURM_CONF``, which the fixture sets for the test session.

Use it through the ``slurm_cluster`` fixture: ``from slurm_cluster import slurm_cluster``.
The cluster is started once per pytest session (even when several test files import the
fixture) and torn down at the end; tests are skipped, with the reason, where it cannot start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest

# Binaries the cluster needs; scripts/install-system-deps.sh installs them.
_REQUIRED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue")
# Fake GPUs on the node let ``sbatch --test-only`` check the GPU variant of the launch script
# (no job asking for them ever runs here).
FAKE_GPUS = 2
PARTITION = "debug"
PAPER_NODE = "paper1"
PAPER_PARTITION = "paper"
_START_TIMEOUT_S = 60.0


def _find(binary: str) -> str | None:
    return shutil.which(binary) or next(
        (str(p) for p in (Path("/usr/sbin") / binary, Path("/usr/bin") / binary) if p.exists()), None
    )


def skip_reason() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if os.name != "posix" or os.geteuid() != 0:
        return "Slurm tests need root (slurmd must run jobs as any user)"
    missing = [b for b in _REQUIRED if _find(b) is None]
    if missing:
        return f"Slurm binaries missing ({', '.join(missing)}): run scripts/install-system-deps.sh"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    """Handle on a running test cluster."""

    root: Path
    conf: Path
    hostname: str
    cpus: int
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    daemon_log: IO[bytes] | None = None

    def run(self, *args: str, check: bool = True, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
        """Runs a Slurm client command against this cluster."""
        proc = subprocess.run(
            list(args), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
            timeout=timeout, **kw,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_field(self, job_id: str, name: str) -> str | None:
        """One ``scontrol show job`` field (``JobState``, ``Restarts``, ``ExitCode``...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for token in out.split():
            key, _, value = token.partition("=")
            if key == name:
                return value
        return None

    def wait_job(self, job_id: str, timeout: float, states: tuple[str, ...] = ("COMPLETED",)) -> str:
        """Waits until the job reaches a finished state; returns it. Fails on timeout, with the
        job record and the daemon logs' tails in the message."""
        finished = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in finished or state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s\n{self.diagnostics(job_id)}")

    def release_requeue_hold(self, job: str, restarts: int, timeout: float) -> None:
        """Waits until the job has been requeued ``restarts`` times and its previous attempt has
        left the node, then lifts the hold Slurm puts on a requeued job (it may start again only
        2 minutes later) so the test need not wait."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job, "JobState")
            if self.job_field(job, "Restarts") == str(restarts) and state == "PENDING" and self.node_idle():
                # slurmd revokes the old attempt's credential with 1 s resolution: a new one
                # issued within the same second would be refused ("Job credential revoked").
                time.sleep(2.0)
                self.run("scontrol", "update", f"JobId={job}", "StartTime=now")
                return
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                raise AssertionError(f"job {job} ended ({state}) before requeue {restarts}\n{self.diagnostics(job)}")
            time.sleep(0.3)
        raise TimeoutError(f"job {job} not requeued {restarts} time(s) in {timeout}s\n{self.diagnostics(job)}")

    def node_idle(self) -> bool:
        """True when this host's node runs nothing (a finished job's processes are gone too)."""
        out = self.run("sinfo", "-h", "-n", self.hostname, "-o", "%T", check=False, timeout=10).stdout.split()
        return out == ["idle"]

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = []
        if job_id:
            parts.append(self.run("scontrol", "show", "job", job_id, check=False).stdout)
        for name in ("slurmctld.log", "slurmd.log"):
            log = self.root / "log" / name
            if log.exists():
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if self.daemon_log is not None:
            self.daemon_log.close()
            self.daemon_log = None


def _write_conf(root: Path, hostname: str, hardware: str, ctld_port: int, slurmd_port: int) -> Path:
    # Slurm counts GPUs by device file; any character devices do for GPUs nobody uses.
    devices = ",".join(["/dev/null", "/dev/zero", "/dev/full", "/dev/random"][:FAKE_GPUS])
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={hostname} Name=gpu File={devices}\n")
    # An empty plugin stack, so a site's /etc/slurm/plugstack.conf cannot interfere.
    (root / "plugstack.conf").write_text("")
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=modmoe-test
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
# No cgroups in a container: track processes through /proc, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
# Long: the paper node must not turn DOWN (and fail --test-only) during a session.
SlurmdTimeout=36000
GresTypes=gpu
NodeName={hostname} NodeAddr=127.0.0.1 {hardware} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
# A second node that exists only on paper (no slurmd answers), in its own partition, so
# multi-node scripts can pass ``sbatch --test-only`` while real jobs never land there.
NodeName={PAPER_NODE} NodeAddr=127.0.0.2 {hardware} Gres=gpu:{FAKE_GPUS} State=IDLE
PartitionName={PAPER_PARTITION} Nodes={hostname},{PAPER_NODE} Default=NO MaxTime=INFINITE State=UP
""")
    return conf


def _hardware() -> str:
    """This host's CPU layout as slurmd sees it (``CPUs=2 Boards=1 ...``), so the node's
    configuration matches the hardware and slurmd does not drain it."""
    out = subprocess.run([_find("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return " ".join(t for t in out.split() if t.partition("=")[0] in keys)


def start_cluster(root: Path) -> SlurmCluster:
    """Starts munged, slurmctld and slurmd under ``root``; returns once the node is idle."""
    hostname = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # munged refuses group/world-writable directories on its paths.
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    subprocess.run([_find("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
    conf = _write_conf(root, hostname, _hardware(), _free_port(), _free_port())
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[var]  # a surrounding Slurm job must not leak into ours
    cluster = SlurmCluster(root=root, conf=conf, hostname=hostname, cpus=cpus, env=env)
    log = cluster.daemon_log = open(root / "log" / "daemons.out", "ab")  # closed by stop()
    munge_dir = root / "munge"
    try:
        cluster.procs.append(subprocess.Popen(
            [_find("munged"), "--foreground", "--force", f"--socket={munge_dir}/munge.socket",
             f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
             f"--seed-file={munge_dir}/munged.seed"],
            stdout=log, stderr=log, env=env,
        ))
        _wait_for(lambda: (munge_dir / "munge.socket").exists(), "munged socket", cluster)
        cluster.procs.append(subprocess.Popen(
            [_find("slurmctld"), "-D", "-i", "-f", str(conf)], stdout=log, stderr=log, env=env,
        ))
        _wait_for(lambda: cluster.run("scontrol", "ping", check=False, timeout=10).returncode == 0,
                  "slurmctld to answer", cluster)
        cluster.procs.append(subprocess.Popen(
            [_find("slurmd"), "-D", "-f", str(conf), "-N", hostname], stdout=log, stderr=log, env=env,
        ))
        _wait_for(cluster.node_idle, "the node to become idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(predicate, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead[0]} exited while waiting for {what}\n{cluster.diagnostics()}")
        if predicate():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}\n{cluster.diagnostics()}")


_CLUSTER: SlurmCluster | None = None
_FAILURE: str | None = None


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> SlurmCluster:
    """The session's cluster (started on first use); ``SLURM_CONF`` points at it meanwhile."""
    global _CLUSTER, _FAILURE
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if _FAILURE:
        pytest.fail(_FAILURE)
    if _CLUSTER is None:
        root = Path(tempfile.mkdtemp(prefix="modmoe-slurm-"))
        try:
            _CLUSTER = start_cluster(root)
        except Exception as err:  # noqa: BLE001 - reported once, then every user fails the same way
            _FAILURE = f"Slurm test cluster failed to start: {err}"
            pytest.fail(_FAILURE)
        old_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(_CLUSTER.conf)

        def teardown() -> None:
            global _CLUSTER
            if _CLUSTER is not None:
                _CLUSTER.stop()
                _CLUSTER = None
            if old_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = old_conf
            shutil.rmtree(root, ignore_errors=True)

        request.config.add_cleanup(teardown)
    return _CLUSTER
