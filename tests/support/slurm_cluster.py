"""A real Slurm cluster on this host, for the ``slurm`` tests: this host as one node, and two
more nodes (``node1``, ``node2``), each in its own network namespace with its own address.

munged, slurmctld and the slurmds run as root from Debian's packages with everything (key,
socket, config, state, spool, logs) in a private temporary directory, on free ports, so the
system's ``/etc/slurm`` and ``/etc/munge`` are never read or changed. Client commands find the
cluster through ``SLURM_CONF``, which the fixture sets for the test session.

- Partition ``debug`` (the default): this host, reached at 127.0.0.1.
- Partition ``two``: the two virtual nodes (see ``netns_nodes.py``). Debian builds Slurm with
  multiple-slurmd support (``MULTIPLE_SLURMD = Yes`` in ``scontrol show config``), so several
  slurmds run on one host, each told its node name with ``-N`` and keeping its own spool, pid
  file and log (``%n``). A node is lost with :meth:`SlurmCluster.kill_node` (link down, every
  process in it SIGKILLed) and comes back with :meth:`SlurmCluster.restart_node`. Where network
  namespaces cannot be made, the two nodes exist only on paper (no slurmd answers: ``sbatch
  --test-only`` still plans two-node jobs) and :attr:`SlurmCluster.two_node_reason` says why.

Use it through the ``slurm_cluster`` fixture: ``from slurm_cluster import slurm_cluster``.
The cluster is started once per pytest session (even when several test files import the
fixture) and torn down at the end; tests are skipped, with the reason, where it cannot start.

The second half reads what a training job left in its run directory and drives preemptions of a
running job (``preempt_attempt``, ``check_finished_run``), for the tests and for
benchmarks/slurm_preempt_stress.py, which starts a cluster with ``start_cluster``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest
from netns_nodes import NodeNetwork
from netns_nodes import skip_reason as netns_skip_reason

# Binaries the cluster needs; scripts/install-system-deps.sh installs them.
_REQUIRED = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue", "sdiag")
# Fake GPUs on the node let ``sbatch --test-only`` check the GPU variant of the launch script
# (no job asking for them ever runs here).
FAKE_GPUS = 2
PARTITION = "debug"
TWO_NODE_PARTITION = "two"
TWO_NODES = ("node1", "node2")
# How long slurmctld waits for a silent node before it sets it DOWN and requeues (or fails) its
# jobs. It pings every SlurmdTimeout/3 s, so a dead node turns DOWN 1 to 4/3 timeouts after its
# last answer. Longer than the collective timeout of the node-loss test (the survivors must
# leave on their own first), short enough for a test.
SLURMD_TIMEOUT_S = 30
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
    network: NodeNetwork | None = None
    """The virtual nodes' namespaces and bridge (None: they exist only on paper)."""
    two_node_reason: str | None = None
    """Why the two virtual nodes are only on paper here (None when they run)."""
    slurmds: dict[str, subprocess.Popen] = field(default_factory=dict)
    """The running slurmd of each node, by node name."""

    def run(self, *args: str, check: bool = True, timeout: float = 60.0, **kw) -> subprocess.CompletedProcess:
        """Runs a Slurm client command against this cluster."""
        proc = subprocess.run(
            list(args),
            env={**self.env, **kw.pop("env", {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def _scontrol_field(self, kind: str, what: str, name: str) -> str | None:
        out = self.run("scontrol", "show", kind, "-o", what, check=False).stdout
        for token in out.split():
            key, _, value = token.partition("=")
            if key == name:
                return value
        return None

    def job_field(self, job_id: str, name: str) -> str | None:
        """One ``scontrol show job`` field (``JobState``, ``Restarts``, ``ExitCode``...)."""
        return self._scontrol_field("job", job_id, name)

    def node_field(self, node: str, name: str) -> str | None:
        """One ``scontrol show node`` field (``State`` is e.g. ``DOWN+NOT_RESPONDING``)."""
        return self._scontrol_field("node", node, name)

    def wait_job(self, job_id: str, timeout: float, states: tuple[str, ...] = ("COMPLETED",)) -> str:
        """Waits until the job reaches a finished state; returns it. Fails on timeout, with the
        job record and the daemon logs' tails in the message."""
        finished = {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        }
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
        2 minutes later) so the test need not wait. The nodes that must be idle are those of the
        job's partition.

        The hold also lets slurmctld deliver what it still owes a node that stopped answering:
        after a node loss, the previous attempt's ``srun`` asked to kill its step (``StepId=J.0``)
        and slurmctld retries that signal every 60 s until the node answers. Delivered to a new
        attempt, whose first step has the same id, it kills that one (seen: 15 s into the
        requeued attempt). So the hold is lifted only once slurmctld's retry queue is empty."""
        nodes = TWO_NODES if self.job_field(job, "Partition") == TWO_NODE_PARTITION else None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job, "JobState")
            if (
                self.job_field(job, "Restarts") == str(restarts)
                and state == "PENDING"
                and self.node_idle(nodes)
                and self.agent_queue_size() == 0
            ):
                # slurmd revokes the old attempt's credential with 1 s resolution: a new one
                # issued within the same second would be refused ("Job credential revoked").
                time.sleep(2.0)
                self.run("scontrol", "update", f"JobId={job}", "StartTime=now")
                return
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
                raise AssertionError(f"job {job} ended ({state}) before requeue {restarts}\n{self.diagnostics(job)}")
            time.sleep(0.3)
        raise TimeoutError(
            f"job {job} not requeued {restarts} time(s) in {timeout}s (or its nodes not idle: "
            f"{self.node_states(nodes)}, or slurmctld's agent queue not empty: {self.agent_queue_size()})\n"
            f"{self.diagnostics(job)}"
        )

    def agent_queue_size(self) -> int | None:
        """Messages slurmctld is still retrying to send to nodes (``sdiag``'s agent queue)."""
        found = re.search(r"Agent queue size:\s*(\d+)", self.run("sdiag", check=False, timeout=10).stdout)
        return int(found.group(1)) if found else None

    def node_states(self, nodes: tuple[str, ...] | list[str] | None = None) -> dict[str, str]:
        """Node name -> ``State`` as ``scontrol show node`` gives it (``IDLE``, ``MIXED``,
        ``IDLE+COMPLETING``, ``DOWN+NOT_RESPONDING`` ...); this host's node by default. Not
        sinfo: ``sinfo -n NODE`` showed a node ``mixed`` for minutes after its job had left
        (while ``sinfo`` without ``-n`` and scontrol said idle), and a DOWN node as ``mixed*``."""
        states = {}
        for node in nodes or [self.hostname]:
            state = self.node_field(node, "State")
            if state is not None:
                states[node] = state
        return states

    def node_idle(self, nodes: tuple[str, ...] | list[str] | None = None) -> bool:
        """True when the nodes (this host's by default) run nothing: a finished job's processes
        are gone too (no ``+COMPLETING``)."""
        states = self.node_states(nodes)
        return len(states) == len(nodes or [self.hostname]) and set(states.values()) == {"IDLE"}

    def require_two_nodes(self) -> None:
        """Skips the calling test where the two virtual nodes exist only on paper."""
        if self.two_node_reason:
            pytest.skip(f"no two-node cluster here: {self.two_node_reason}")

    def start_slurmd(self, node: str) -> None:
        """Starts the node's slurmd (inside its namespace for a virtual node)."""
        prefix = self.network.nodes[node].exec_args() if self.network and node in self.network.nodes else []
        proc = subprocess.Popen(
            [*prefix, _find("slurmd"), "-D", "-f", str(self.conf), "-N", node],
            stdout=self.daemon_log,
            stderr=self.daemon_log,
            env=self.env,
        )
        self.slurmds[node] = proc
        self.procs.append(proc)

    def kill_node(self, node: str) -> float:
        """Loses a virtual node as a power cut would: its link goes down (its peers get no reset,
        only silence), then its slurmd, slurmstepds, torchrun and ranks are SIGKILLed. Returns
        the wall-clock time (``time.time()``) at which the node fell silent."""
        assert self.network is not None, self.two_node_reason
        self.network.cut(node)
        lost_at = time.time()
        self.network.kill_all(node)
        proc = self.slurmds.pop(node)
        proc.wait(timeout=30)
        self.procs.remove(proc)
        return lost_at

    def processes(self, node: str) -> dict[int, str]:
        """pid -> command line of every process running in a virtual node."""
        assert self.network is not None, self.two_node_reason
        out = {}
        for pid in self.network.nodes[node].pids():
            try:
                out[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
        return out

    def restart_node(self, node: str) -> None:
        """Brings a killed node back (link up, a fresh slurmd). A DOWN node returns to service
        when its slurmd registers (``ReturnToService=2``)."""
        assert self.network is not None, self.two_node_reason
        self.network.restore(node)
        self.start_slurmd(node)

    def diagnostics(self, job_id: str | None = None) -> str:
        parts = []
        if job_id:
            parts.append(self.run("scontrol", "show", "job", job_id, check=False).stdout)
        parts.append(self.run("sinfo", "-N", "-o", "%N %T %E", check=False).stdout)
        for log in [self.root / "log" / "slurmctld.log", *sorted((self.root / "log").glob("slurmd-*.log"))]:
            if log.exists():
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
                parts.append(f"--- {log.name} (tail) ---\n{tail}")
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
        self.slurmds.clear()
        if self.network is not None:
            self.network.remove()
            self.network = None
        if self.daemon_log is not None:
            self.daemon_log.close()
            self.daemon_log = None


def _write_conf(
    root: Path, hostname: str, hardware: str, ctld_port: int, slurmd_port: int, network: NodeNetwork | None
) -> Path:
    twins = ",".join(TWO_NODES)
    # Slurm counts GPUs by device file; any character devices do for GPUs nobody uses.
    devices = ",".join(["/dev/null", "/dev/zero", "/dev/full", "/dev/random"][:FAKE_GPUS])
    (root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={hostname},{twins} Name=gpu File={devices}\n")
    # An empty plugin stack, so a site's /etc/slurm/plugstack.conf cannot interfere.
    (root / "plugstack.conf").write_text("")
    if network is not None:
        # slurmctld listens on every address; the virtual nodes reach it on the bridge.
        ctld_addr = network.host_addr
        twin_lines = "\n".join(
            f"NodeName={n.name} NodeAddr={n.addr} {hardware} Gres=gpu:{FAKE_GPUS} State=UNKNOWN"
            for n in network.nodes.values()
        )
        slurmd_timeout = SLURMD_TIMEOUT_S
    else:
        ctld_addr = "127.0.0.1"
        # Nodes only on paper (no slurmd answers at these addresses), so two-node scripts can pass
        # ``sbatch --test-only`` while real jobs never land there.
        twin_lines = "\n".join(
            f"NodeName={name} NodeAddr=127.0.0.{2 + i} {hardware} Gres=gpu:{FAKE_GPUS} State=IDLE"
            for i, name in enumerate(TWO_NODES)
        )
        slurmd_timeout = 36000  # paper nodes must not turn DOWN (and fail --test-only) during a session
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=modmoe-test
SlurmctldHost={hostname}({ctld_addr})
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
# Several slurmds on one host: each node keeps its own spool, pid file and log.
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
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
# A node that was DOWN (not responding) is back in service as soon as its slurmd registers.
ReturnToService=2
JobRequeue=1
# Slurm's default: SIGTERM'd ranks have this long to checkpoint before SIGKILL.
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout={slurmd_timeout}
GresTypes=gpu
NodeName={hostname} NodeAddr=127.0.0.1 {hardware} Gres=gpu:{FAKE_GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={hostname} Default=YES MaxTime=INFINITE State=UP
{twin_lines}
PartitionName={TWO_NODE_PARTITION} Nodes={twins} Default=NO MaxTime=INFINITE State=UP
""")
    return conf


def _hardware() -> str:
    """This host's CPU layout as slurmd sees it (``CPUs=2 Boards=1 ...``), so the node's
    configuration matches the hardware and slurmd does not drain it."""
    out = subprocess.run([_find("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    return " ".join(t for t in out.split() if t.partition("=")[0] in keys)


def start_cluster(root: Path, two_nodes: bool = True) -> SlurmCluster:
    """Starts munged, slurmctld and the slurmds under ``root`` (with ``two_nodes``, the virtual
    nodes too, where namespaces work); returns once every running node is idle."""
    hostname = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    for sub in ("munge", "state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # munged refuses group/world-writable directories on its paths.
    os.chmod(root, 0o755)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    subprocess.run([_find("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
    reason = netns_skip_reason() if two_nodes else "not asked for"
    network = NodeNetwork.create(list(TWO_NODES)) if reason is None else None
    try:
        conf = _write_conf(root, hostname, _hardware(), _free_port(), _free_port(), network)
    except BaseException:
        if network is not None:
            network.remove()
        raise
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
        del env[var]  # a surrounding Slurm job must not leak into ours
    cluster = SlurmCluster(
        root=root, conf=conf, hostname=hostname, cpus=cpus, env=env, network=network, two_node_reason=reason
    )
    log = cluster.daemon_log = open(root / "log" / "daemons.out", "ab")  # noqa: SIM115 (closed by stop())
    munge_dir = root / "munge"
    try:
        cluster.procs.append(
            subprocess.Popen(
                [
                    _find("munged"),
                    "--foreground",
                    "--force",
                    f"--socket={munge_dir}/munge.socket",
                    f"--key-file={key}",
                    f"--pid-file={munge_dir}/munged.pid",
                    f"--log-file={munge_dir}/munged.log",
                    f"--seed-file={munge_dir}/munged.seed",
                ],
                stdout=log,
                stderr=log,
                env=env,
            )
        )
        _wait_for(lambda: (munge_dir / "munge.socket").exists(), "munged socket", cluster)
        cluster.procs.append(
            subprocess.Popen(
                [_find("slurmctld"), "-D", "-i", "-f", str(conf)],
                stdout=log,
                stderr=log,
                env=env,
            )
        )
        _wait_for(
            lambda: cluster.run("scontrol", "ping", check=False, timeout=10).returncode == 0,
            "slurmctld to answer",
            cluster,
        )
        running = [hostname, *(network.nodes if network else [])]
        for node in running:
            (root / "spool" / node).mkdir(exist_ok=True)
            cluster.start_slurmd(node)
        _wait_for(lambda: cluster.node_idle(running), "the nodes to become idle", cluster)
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


# ------------------------------------------------------------------------------------------
# What a training job leaves in its run directory, and a driver that preempts a running job
# and checks each attempt. Shared by tests/test_slurm_train.py and
# benchmarks/slurm_preempt_stress.py.

REPO = Path(__file__).resolve().parents[2]
_FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
_ATTEMPT_LINE = re.compile(r"node rank 0/\d+ .*attempt (\d+)$", re.MULTILINE)
_RESUMED_LINE = re.compile(r"resumed from \S+ at step (\d+)")


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_rank():
    """Every job of a module that imports this runs its ranks with one intra-op thread (sbatch
    exports the submitting environment). Runs compared bit for bit must use the same thread
    count: with 1 vs 2 threads the float sums round differently (seen as a 4e-8 drift from step 6)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@dataclass
class SubmittedJob:
    """A job submitted with ``python -m modmoe submit``, and what the command printed."""

    output: str
    job_id: str
    run_dir: Path


def submit_cli(config: Path, args: list[str], overrides: list[str]) -> SubmittedJob:
    """Runs ``python -m modmoe submit CONFIG ARGS --set ...`` as a user types it (one thread per
    rank) and reads the job id and run directory from what it prints."""
    proc = subprocess.run(
        [sys.executable, "-m", "modmoe", "submit", str(config), *args, *[a for o in overrides for a in ("--set", o)]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = re.search(r"^submitted job (\d+)$", proc.stdout, re.MULTILINE)
    run_dir = re.search(r"^run directory: (.+)$", proc.stdout, re.MULTILINE)
    assert job and run_dir, proc.stdout
    return SubmittedJob(proc.stdout, job.group(1), Path(run_dir.group(1)))


def tiny_job_overrides(prepared_dir: Path, steps: int) -> list[str]:
    """``--set`` items that shrink configs/tiny.yaml to a ~0.3M-parameter model on 1 MB of
    stdlib text (a 2-rank step takes tens of milliseconds); runs that share ``prepared_dir``
    see the same tokens."""
    return [
        f"trainer.max_steps={steps}",
        "trainer.eval_every=0",
        "trainer.eval_batches=1",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "model.dim=64",
        "model.num_layers=2",
        "model.ffn_hidden=128",
        "model.moe.expert_hidden=64",
        "model.max_seq_len=64",
        "model.vocab_size=512",
        "data.seq_len=64",
        "data.vocab_size=512",
        "data.max_corpus_bytes=1000000",
        "data.val_fraction=0.1",
        f"data.prepared_dir={prepared_dir}",
    ]


def training_records(run_dir: Path) -> list[dict]:
    """The training-step records of ``metrics.jsonl`` (a line being written is left out)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line, half written
        if "loss" in record:
            records.append(record)
    return records


def last_step(run_dir: Path) -> int:
    records = training_records(run_dir)
    return records[-1]["step"] if records else 0


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in run_dir.glob("checkpoints/step_*/manifest.json"))


def batch_log(run_dir: Path) -> str:
    """The job's batch log (``modmoe submit`` puts it in ``<runs_root>/slurm-logs``)."""
    log = run_dir.parent / "slurm-logs" / f"{run_dir.name}.out"
    return log.read_text() if log.exists() else "(no batch log)"


def node_logs(run_dir: Path, tail: int = 3000) -> str:
    return "\n".join(p.read_text()[-tail:] for p in sorted((run_dir / "logs").glob("node*.log")))


def resumed_steps(run_dir: Path) -> dict[int, int | None]:
    """Attempt -> the step it resumed from (None: it started fresh or stopped before loading),
    read from node 0's log, which launch/node.sh marks at each attempt's start."""
    log_path = run_dir / "logs" / "node0.log"
    text = log_path.read_text() if log_path.exists() else ""
    marks = list(_ATTEMPT_LINE.finditer(text))
    out: dict[int, int | None] = {}
    for i, mark in enumerate(marks):
        chunk = text[mark.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        found = _RESUMED_LINE.search(chunk)
        out[int(mark.group(1))] = int(found.group(1)) if found else None
    return out


def mlflow_runs(run_dir: Path) -> list:
    """Every run in the run directory's MLflow database (the embedded default)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def mlflow_history(run_dir: Path, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def checkpoint_meta(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "manifest.json").read_text())["meta"]


def validate_checkpoint(checkpoint: Path) -> subprocess.CompletedProcess:
    """``python -m checkpoints_tools validate`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "checkpoints_tools", "validate", str(checkpoint)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Preemption:
    """One preemption of a running attempt."""

    how: str
    """``usr1``: ``scancel --signal=USR1 --batch`` (what ``--signal=B:USR1`` does at the time
    limit); ``requeue``: ``scontrol requeue`` (SIGTERM to every process of the job)."""

    steps: int | None = 10
    """Send it once the attempt has trained this many steps past its resume point."""

    delay_s: float = 0.0
    """With ``steps=None``: send it this long after the attempt starts running, whatever it is
    doing then (starting up, loading, training)."""


@dataclass
class Attempt:
    """What one preempted attempt did, and what the next one found."""

    number: int
    how: str
    sent_at_step: int
    """Last step in metrics.jsonl when the preemption was sent."""
    sent_after_s: float
    """Seconds between the attempt starting to run and the preemption."""
    checkpoint: int | None
    """Newest checkpoint once the attempt had ended."""
    stopped_at: int
    """Last step in metrics.jsonl once the attempt had ended."""
    resumed_at: int | None = None
    """Step the next attempt resumed from (filled in by :func:`check_finished_run`); None when it
    started fresh, or was itself preempted while starting, before it loaded anything."""
    problems: list[str] = field(default_factory=list)


def preempt_attempt(
    cluster: SlurmCluster, job: str, run_dir: Path, number: int, plan: Preemption, timeout: float = 240.0
) -> Attempt:
    """Waits until attempt ``number`` of the job runs, preempts it as ``plan`` says, waits
    until Slurm has requeued the job, lifts the requeue hold, and checks what the attempt
    left: no COMPLETED, contiguous steps, a checkpoint at the step where it stopped."""
    deadline = time.monotonic() + timeout

    def alive() -> None:
        state = cluster.job_field(job, "JobState")
        if state in _FINISHED or (run_dir / "COMPLETED").exists():
            raise AssertionError(
                f"job {job} ended ({state}) before preemption {number + 1}\n{batch_log(run_dir)}{node_logs(run_dir)}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"attempt {number} of job {job}: nothing to preempt after {timeout:.0f}s "
                f"(state {state})\n{batch_log(run_dir)}{node_logs(run_dir)}"
            )

    while not (cluster.job_field(job, "Restarts") == str(number) and cluster.job_field(job, "JobState") == "RUNNING"):
        alive()
        time.sleep(0.1)
    started = time.monotonic()
    if plan.steps is None:
        time.sleep(plan.delay_s)
    else:
        target = max(checkpoint_steps(run_dir), default=0) + plan.steps
        while last_step(run_dir) < target:
            alive()
            time.sleep(0.05)
    sent_at, sent_after = last_step(run_dir), time.monotonic() - started
    if plan.how == "usr1":
        cluster.run("scancel", "--signal=USR1", "--batch", job)
    elif plan.how == "requeue":
        cluster.run("scontrol", "requeue", job)
    else:
        raise ValueError(f"Preemption.how = {plan.how!r}: expected usr1 or requeue")
    cluster.release_requeue_hold(job, restarts=number + 1, timeout=max(deadline - time.monotonic(), 60.0))

    ckpts, steps = checkpoint_steps(run_dir), [r["step"] for r in training_records(run_dir)]
    attempt = Attempt(number, plan.how, sent_at, sent_after, max(ckpts, default=None), steps[-1] if steps else 0)
    if (run_dir / "COMPLETED").exists():
        attempt.problems.append("COMPLETED after a preempted attempt")
    if steps != list(range(1, len(steps) + 1)):
        attempt.problems.append(f"metrics.jsonl steps not 1..{len(steps)}: {_ranges(steps)}")
    if steps and attempt.checkpoint != attempt.stopped_at:
        attempt.problems.append(
            f"stopped at step {attempt.stopped_at} but the newest checkpoint is {attempt.checkpoint}"
        )
    return attempt


def check_finished_run(
    cluster: SlurmCluster,
    job: str,
    run_dir: Path,
    attempts: list[Attempt],
    steps: int,
    reference: dict[int, float] | None = None,
    timeout: float = 240.0,
) -> list[str]:
    """Waits for the job to complete, fills in where each attempt's successor resumed, and
    returns every broken invariant (an empty list when the run is sound): completion, each
    resume from the newest checkpoint, steps 1..``steps`` once each, losses bit-identical to
    ``reference``, one MLflow run holding each step's loss once and named in the checkpoint,
    a checkpoint that ``checkpoints_tools validate`` accepts."""
    state = cluster.wait_job(job, timeout=timeout)
    problems = []
    if state != "COMPLETED" or not (run_dir / "COMPLETED").exists():
        return [
            f"job {job} ended {state}, COMPLETED file: {(run_dir / 'COMPLETED').exists()}\n"
            f"{batch_log(run_dir)}{node_logs(run_dir)}"
        ]
    if cluster.job_field(job, "Restarts") != str(len(attempts)):
        problems.append(f"Restarts = {cluster.job_field(job, 'Restarts')}, expected {len(attempts)}")
    resumed = resumed_steps(run_dir)
    for i, attempt in enumerate(attempts):
        attempt.resumed_at = resumed.get(attempt.number + 1)
        nxt = attempts[i + 1] if i + 1 < len(attempts) else None
        if (
            attempt.resumed_at is None
            and nxt is not None
            and (nxt.checkpoint, nxt.stopped_at) == (attempt.checkpoint, attempt.stopped_at)
        ):
            pass  # the next attempt was preempted while starting, before it loaded or trained anything
        elif attempt.resumed_at != attempt.checkpoint:
            attempt.problems.append(
                f"attempt {attempt.number + 1} resumed at {attempt.resumed_at}, "
                f"not at the newest checkpoint {attempt.checkpoint}"
            )
        problems += [f"attempt {attempt.number}: {p}" for p in attempt.problems]

    records = training_records(run_dir)
    losses = {r["step"]: r["loss"] for r in records}
    if [r["step"] for r in records] != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl steps: {_ranges([r['step'] for r in records])}, expected 1..{steps}")
    if reference is not None:
        differ = [s for s in range(1, steps + 1) if losses.get(s) != reference.get(s)]
        if differ:
            s = differ[0]
            problems.append(
                f"loss differs from the uninterrupted run at {len(differ)} step(s), first "
                f"step {s}: {losses.get(s)!r} vs {reference.get(s)!r}"
            )

    ckpts = sorted(run_dir.glob("checkpoints/step_*"))
    if not ckpts:
        return problems + ["no checkpoint"]
    newest = ckpts[-1]
    check = validate_checkpoint(newest)
    if check.returncode != 0:
        problems.append(f"checkpoints_tools validate {newest.name}: {check.stdout.strip()} {check.stderr.strip()}")
    runs = mlflow_runs(run_dir)
    if len(runs) != 1:
        return problems + [f"{len(runs)} MLflow runs in {run_dir / 'mlflow.db'}, expected 1"]
    run_id = runs[0].info.run_id
    if checkpoint_meta(newest).get("mlflow_run_id") != run_id:
        problems.append(
            f"checkpoint names MLflow run {checkpoint_meta(newest).get('mlflow_run_id')}, the run is {run_id}"
        )
    if runs[0].info.status != "FINISHED":
        problems.append(f"MLflow run status {runs[0].info.status}")
    history = mlflow_history(run_dir, run_id)
    logged = [s for s, _ in history]
    if logged != list(range(1, steps + 1)):
        twice = sorted({s for s in logged if logged.count(s) > 1})
        problems.append(
            f"MLflow loss history has steps {_ranges(logged)} (logged twice: {twice[:20]}), "
            f"expected 1..{steps} once each"
        )
    mismatch = [s for s, v in history if losses.get(s) != v]
    if mismatch:
        problems.append(f"MLflow loss differs from metrics.jsonl at steps {mismatch[:10]}")
    return problems


def _ranges(steps: list[int]) -> str:
    """``[1, 2, 3, 7, 8]`` -> ``1-3,7-8`` (steps as they come, repeats shown)."""
    parts: list[list[int]] = []
    for s in steps:
        if parts and s == parts[-1][1] + 1:
            parts[-1][1] = s
        else:
            parts.append([s, s])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in parts) or "none"


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
