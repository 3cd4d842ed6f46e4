# SPDX-License-Identifier: AGPL-3.0-or-later
"""Separate network stacks on one host, for tests and benchmarks of machines people own: a bridge that carries the
host's own address (where the scheduler listens), and a network namespace per machine with an address of its own on
it (``ip netns``, a veth pair), optionally behind a firewall that drops every new inbound connection and counts what
it drops (``nft``: a home router's behaviour). Outbound connections (to the scheduler, to the relay hub) go through;
nothing can dial in. Linux, as root, with iproute2 and nftables; :func:`unavailable` says why not otherwise.

    lab = NetworkLab().start()
    home = lab.add("home-1", firewall=True)          # a Host: its namespace, its address
    subprocess.Popen(home.prefix + ["python", "-m", ...])  # runs inside it
    lab.drops("home-1")                              # new inbound connections the firewall dropped
    lab.close()

No Dask.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import weakref
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_FIREWALL = """table inet sharedllm {
  chain input {
    type filter hook input priority 0; policy accept;
    iif "lo" accept
    ct state established,related accept
    ct state new counter drop
  }
}
"""


def unavailable() -> str | None:
    """Why separate network stacks cannot be made here (None: they can)."""
    if os.name != "posix" or not os.path.isdir("/proc/self/ns"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (Debian: apt-get install {package})"
    return None


def _run(*cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(list(cmd), capture_output=True, text=True, input=input, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out


@dataclass(frozen=True)
class Host:
    """One machine's network stack: its namespace and its address on the lab's bridge."""

    name: str
    namespace: str
    address: str
    veth: str  # the host's end of its link (``link(name, up)`` sets it down and up)
    firewall: bool

    @property
    def prefix(self) -> list[str]:
        """What runs a command inside the namespace (``ip netns exec`` execs it: the pid is the command's)."""
        return ["ip", "netns", "exec", self.namespace]


class NetworkLab:
    """A bridge on this host and a namespace per machine (see the module's docstring)."""

    def __init__(self) -> None:
        why = unavailable()
        if why is not None:
            raise RuntimeError(f"cannot make separate network stacks here: {why}")
        self.id = secrets.token_hex(2)
        self.bridge = f"slb{self.id}"
        self.subnet: str | None = None  # "10.77.N"
        self.hosts: dict[str, Host] = {}
        self._finalizer = weakref.finalize(self, _teardown, self.bridge, [])

    @property
    def host_address(self) -> str:
        """This host's address on the bridge: where the scheduler (and the relay hub) listen."""
        return f"{self.subnet}.1"

    def start(self) -> NetworkLab:
        used = set(re.findall(r"inet 10\.77\.(\d+)\.", _run("ip", "-o", "-4", "addr").stdout))
        third = next(str(n) for n in range(256) if str(n) not in used)
        self.subnet = f"10.77.{third}"
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host_address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        return self

    def add(self, name: str, firewall: bool = False) -> Host:
        """A namespace for machine ``name`` with the next address; behind the firewall when asked."""
        k = len(self.hosts) + 2
        ns, veth = f"sl{self.id}-{k}", f"slv{self.id}{k}"
        host = Host(name, ns, f"{self.subnet}.{k}", veth, firewall)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _teardown, self.bridge, [*(h.namespace for h in self.hosts.values()),
                                                                          ns])
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        inside = host.prefix
        _run(*inside, "ip", "addr", "add", f"{host.address}/24", "dev", "eth0")
        _run(*inside, "ip", "link", "set", "eth0", "up")
        _run(*inside, "ip", "link", "set", "lo", "up")
        _run(*inside, "ip", "route", "add", "default", "via", self.host_address)
        if firewall:
            _run(*inside, "nft", "-f", "-", input=_FIREWALL)
        self.hosts[name] = host
        logger.info("network namespace %s for %s at %s%s", ns, name, host.address,
                    " behind a firewall that drops new inbound connections" if firewall else "")
        return host

    def drops(self, name: str) -> int:
        """New inbound connection attempts (packets) the firewall of ``name`` dropped so far."""
        out = _run(*self.hosts[name].prefix, "nft", "list", "chain", "inet", "sharedllm", "input").stdout
        m = re.search(r"ct state new counter packets (\d+)", out)
        return int(m[1]) if m else 0

    def link(self, name: str, up: bool) -> None:
        """Cut ``name`` off the network (its link down), or bring it back."""
        _run("ip", "link", "set", self.hosts[name].veth, "up" if up else "down")

    def close(self) -> None:
        self._finalizer()


def _teardown(bridge: str, namespaces: list[str]) -> None:
    for ns in namespaces:
        with contextlib.suppress(Exception):
            _run("ip", "netns", "del", ns, check=False)
    with contextlib.suppress(Exception):
        _run("ip", "link", "del", bridge, check=False)
