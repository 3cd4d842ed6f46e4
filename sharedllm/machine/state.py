# SPDX-License-Identifier: AGPL-3.0-or-later
"""What the mesh knows of a machine's rpc-server (``RPCServerState``, carried in heartbeats as a dict), how it is
configured (``RPCServerConfig``), and what a state says: where clients reach the machine, whether a server's exit was
a model's fault. Pure; no Dask, no processes: the client, the scheduler and the command line read states with these."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from sharedllm.dataplane import DEFAULT_ORPHAN_TIMEOUT


@dataclass
class RPCServerState:
    """What the mesh knows about one machine's rpc-server. Travels in heartbeats as a dict."""

    state: str = "stopped"  # stopped | starting | ready | restarting | failed
    endpoint: str | None = None
    devices: list[dict] = field(default_factory=list)
    protocol: str | None = None  # RPC protocol version from the server's own HELLO
    pid: int | None = None
    threads: int | None = None
    restarts: int = 0
    reason: str | None = None
    cache: dict = field(default_factory=dict)  # tensor cache: files, bytes, cap
    relay: dict | None = None  # the TLS relay in front of the server: endpoint, fingerprint, pid (None: not running)
    direct: bool = False  # --insecure-direct-rpc: clients connect to ``endpoint`` itself, without the relay
    last_exit: dict | None = None  # the last server process that exited: pid, code, message (see model_fault)
    since: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


def model_fault(last_exit: dict | None) -> str | None:
    """The assertion an rpc-server aborted on (``RPCServerState.last_exit``), else None.

    ggml asserts on what a client sends (tensor shapes, hyperparameters such as a negative norm epsilon, a malformed
    graph): an rpc-server that aborts on a ``GGML_ASSERT`` was made to by the model it ran, not by its machine. A
    killed or crashed server (any other exit) is the machine's fault."""
    # SIGABRT (as a signal or as a shell status), or unknown: a server adopted from an earlier worker is no child
    if not last_exit or last_exit.get("code") not in (-6, 134, None):
        return None
    message = last_exit.get("message") or ""
    return message if "GGML_ASSERT" in message else None


def public_endpoint(rpc: dict) -> str | None:
    """Where clients reach a machine's rpc-server (its reported state): its relay, or the server itself when
    direct; None while neither is up."""
    if rpc.get("direct"):
        return rpc.get("endpoint")
    return (rpc.get("relay") or {}).get("endpoint")


def describe_endpoint(rpc: dict, reach: str | None = None) -> str:
    """:func:`public_endpoint` for tables, saying which it is (``reach``: the scheduler's ``machines()`` field)."""
    endpoint = public_endpoint(rpc)
    if endpoint is None:
        return "-"
    if rpc.get("direct"):
        return f"{endpoint} (direct, no TLS)"
    relay = rpc.get("relay") or {}
    if reach == "none":
        return f"{endpoint} (TLS relay, no inbound connections and not at the hub: unreachable)"
    if relay.get("hub") and not relay.get("inbound", True):
        return f"{endpoint} (TLS relay, through hub {relay['hub']} only)"
    if reach == "hub":
        return f"{endpoint} (TLS relay, unreachable from the scheduler: through hub {relay.get('hub')})"
    return f"{endpoint} (TLS relay)"


@dataclass
class RPCServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, kept across restarts
    threads: int | None = None  # None: every core of the machine
    devices: tuple[str, ...] = ()  # empty: every GPU, else the CPU
    cache_dir: str | None = None
    start_timeout: float = 60.0
    max_restarts: int = 5  # within restart_window seconds, then the server is marked failed
    restart_window: float = 300.0
    backoff: float = 1.0
    cooldown: float = 60.0  # after a crash loop
    cache_cap: int = 10 << 30  # bytes of tensor cache kept (least recently used files are evicted beyond it)
    relay: bool = True  # serve remote clients through the TLS relay only (False: --insecure-direct-rpc)
    relay_host: str = "127.0.0.1"  # where the relay listens (the machine's reachable address)
    relay_port: int = 0  # 0: a free port, kept across restarts
    inbound: bool = True  # False (--no-inbound): the relay listens nowhere and serves through the relay hub only
    machine_id: str = ""
    orphan_timeout: float = DEFAULT_ORPHAN_TIMEOUT  # seconds the data plane serves on without a supervisor
