"""Virtual compute nodes on this host for the test Slurm cluster: each node is a network
namespace with its own address on a private bridge (veth pairs), so its slurmd, torchrun and
ranks see only their own ``localhost`` and reach the other nodes by address, as on a cluster.
Nothing leaves the host: the bridge has no uplink.

A node is lost by :meth:`NodeNetwork.cut` (its link goes down: packets to and from it vanish,
no connection is reset) followed by killing every process in its namespace, which is what the
surviving nodes see when a real node loses power.

Needs root and ``ip`` (iproute2). :func:`skip_reason` says why namespaces cannot be used here.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

FABRIC_IF = "fabric0"
"""Interface name inside every node's namespace (``--socket-ifname`` for gloo/NCCL)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def skip_reason() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} ({package}) missing: run scripts/install-system-deps.sh"
    probe = f"modmoe-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass(frozen=True)
class VirtualNode:
    name: str
    """The Slurm node name."""
    netns: str
    addr: str
    """The node's address on the bridge (its ``NodeAddr``)."""
    host_veth: str
    """The bridge side of the node's link."""

    def exec_args(self) -> list[str]:
        """Prefix that runs a command inside the node. ``nsenter`` switches the network namespace
        only; ``ip netns exec`` would also mount a fresh /sys, hiding /sys/fs/cgroup, without
        which slurmd refuses to start."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all", check=False).stdout
    nets = []
    for token in out.split():
        try:
            nets.append(ipaddress.ip_network(token, strict=False))
        except ValueError:
            continue
    return [n for n in nets if n.version == 4 and n.prefixlen > 0]


def _free_subnet(tag: int) -> ipaddress.IPv4Network:
    """A /24 in 10.213.0.0/16 that no address or route of this host overlaps (several clusters,
    of several test sessions, may run at once)."""
    used = _used_networks()
    for k in range(256):
        net = ipaddress.ip_network(f"10.213.{(tag + k) % 256}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free /24 in 10.213.0.0/16 for the test nodes' bridge")


@dataclass
class NodeNetwork:
    """A bridge on the host (address ``host_addr``: slurmctld listens there) and one namespace per node."""

    bridge: str
    host_addr: str
    nodes: dict[str, VirtualNode] = field(default_factory=dict)

    @classmethod
    def create(cls, names: list[str]) -> NodeNetwork:
        tag = os.getpid() % 100_000  # unique among the sessions running on this host
        net = _free_subnet(tag)
        hosts = list(net.hosts())
        network = cls(bridge=f"mmbr{tag}", host_addr=str(hosts[0]))
        try:
            _ip("link", "add", network.bridge, "type", "bridge")
            _ip("addr", "add", f"{network.host_addr}/{net.prefixlen}", "dev", network.bridge)
            _ip("link", "set", network.bridge, "up")
            for i, name in enumerate(names, start=1):
                node = VirtualNode(name, f"modmoe-{tag}-{name}", str(hosts[10 + i]), f"mmh{tag}n{i}")
                network.nodes[name] = node
                peer = f"mmp{tag}n{i}"
                _ip("netns", "add", node.netns)
                _ip("link", "add", node.host_veth, "type", "veth", "peer", "name", peer)
                _ip("link", "set", peer, "netns", node.netns)
                _ip("-n", node.netns, "link", "set", peer, "name", FABRIC_IF)
                _ip("-n", node.netns, "addr", "add", f"{node.addr}/{net.prefixlen}", "dev", FABRIC_IF)
                _ip("-n", node.netns, "link", "set", FABRIC_IF, "up")
                _ip("-n", node.netns, "link", "set", "lo", "up")
                _ip("link", "set", node.host_veth, "master", network.bridge)
                _ip("link", "set", node.host_veth, "up")
        except BaseException:
            network.remove()
            raise
        return network

    def cut(self, name: str) -> None:
        """The node drops off the network: its packets vanish, nobody sees a reset."""
        _ip("link", "set", self.nodes[name].host_veth, "down")

    def restore(self, name: str) -> None:
        _ip("link", "set", self.nodes[name].host_veth, "up")

    def kill_all(self, name: str, timeout: float = 30.0) -> None:
        """SIGKILLs every process in the node's namespace and waits until none is left."""
        node = self.nodes[name]
        deadline = time.monotonic() + timeout
        while pids := node.pids():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes {pids} of node {name} survive SIGKILL")
            time.sleep(0.1)

    def remove(self) -> None:
        """Kills what runs in the namespaces and deletes them, the links and the bridge."""
        for node in self.nodes.values():
            try:
                self.kill_all(node.name)
            except TimeoutError:
                pass
            _ip("netns", "del", node.netns, check=False)
            # The pair outlives its namespace while a dying process still holds it.
            _ip("link", "del", node.host_veth, check=False)
        _ip("link", "del", self.bridge, check=False)
