# SPDX-License-Identifier: AGPL-3.0-or-later
"""The per-machine actor that owns and supervises that machine's rpc-server process.

The scheduler plugin pins exactly one ``RPCServerActor`` per machine. The actor runs ``python -m sharedllm.rpc_server``
as a child of the worker process, waits until it answers the RPC HELLO, restarts it with backoff when it exits, and
publishes its state through the worker's ``sharedllm`` extension (which the heartbeat carries to the scheduler).

By default the rpc-server listens on loopback only, and remote clients reach it through the machine's relay
(``python -m sharedllm.relay server``, another child): TLS, plus a token for the machine's current lease. The
scheduler gives the actor this machine's relay key when it pins it, and tells it the current lease on every lease
change (:meth:`RPCServerSupervisor.set_lease`), so that a token of another or an ended lease opens nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sharedllm.dataplane import (
    ALIVE_FILE,
    DEFAULT_ORPHAN_TIMEOUT,
    RELAY_FILE,
    SERVER_FILE,
    TOUCH_EVERY,
    DataPlaneProcess,
    control_call,
    control_socket_path,
    listens,
    process_runs,
    process_state,
    read_json,
    spawn_process,
    terminate,
    touch,
    wait_ready_file,
    write_json,
)

logger = logging.getLogger(__name__)


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


class RPCServerSupervisor:
    """Runs and watches one machine's rpc-server and relay on the current event loop. No Dask.

    Both run in sessions of their own and record themselves in ``workdir`` (the machine's state directory, see
    :mod:`sharedllm.dataplane`): when this supervisor's worker exits (it lost the scheduler, or was killed), they serve
    on, and the next supervisor on the machine adopts them with :meth:`start` instead of starting new ones."""

    def __init__(self, config: RPCServerConfig, workdir: str | os.PathLike, on_change=None):
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.workdir.chmod(0o700)  # the relay key and its control socket live here
        self.status = RPCServerState()
        self._proc: DataPlaneProcess | None = None
        self._log_offset = 0  # where the current server's lines start in its log
        self._watch: asyncio.Task | None = None
        self._toucher: asyncio.Task | None = None
        self._stopping = False
        self._restart_times: list[float] = []
        self._on_change = on_change
        self._relay_key: bytes | None = None
        self._hub: tuple[str, bytes] | None = None  # the relay hub's endpoint and this machine's credential there
        self._relay_proc: DataPlaneProcess | None = None
        self._relay_watch: asyncio.Task | None = None
        self._relay_lock = asyncio.Lock()
        self._lease: str | None = None
        self._lease_seq = -1

    @property
    def log_path(self) -> Path:
        return self.workdir / "rpc-server.log"

    @property
    def _server_file(self) -> Path:
        return self.workdir / SERVER_FILE

    @property
    def _relay_file(self) -> Path:
        return self.workdir / RELAY_FILE

    @property
    def _control_path(self) -> Path:
        return control_socket_path(self.workdir)

    def _set(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self.status, k, v)
        self.status.since = time.time()
        if self._on_change:
            self._on_change(self.status)

    async def start(self, relay_key: bytes | None = None, hub: tuple[str, bytes] | None = None) -> RPCServerState:
        """Start the server (and its relay, given this machine's relay key) and wait until it answers HELLO.

        ``hub``: the relay hub's ``HOST:PORT`` and this machine's credential there (from the scheduler): the relay
        registers at it, so that clients that cannot reach the machine directly go through it.

        Returns the state (ready, or failed with the reason). A server that runs already is kept: one this
        supervisor runs (a re-created actor), or one an earlier supervisor of the machine left running (adopted,
        with its relay and the lease it admits when the relay key is the same)."""
        self._stopping = False
        touch(self.workdir / ALIVE_FILE)
        if self._toucher is None or self._toucher.done():
            self._toucher = asyncio.ensure_future(self._touch_alive())
        if relay_key is not None and relay_key != self._relay_key:
            if self._relay_key is not None:
                await self._stop_relay()  # a relay with the old key would refuse every token of the new scheduler
            self._relay_key = relay_key
        if relay_key is not None and hub != self._hub:
            if self._relay_proc is not None:
                await self._stop_relay()  # registered at another hub, or with another credential
            self._hub = hub
        if self._proc is None and await self._adopt():
            await self._ensure_relay()
        elif self._proc is None or self._proc.exited:
            await self._launch()
        elif self.status.state == "ready":
            await self._ensure_relay()
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._supervise())
        return self.status

    async def _touch_alive(self) -> None:
        while not self._stopping:
            with contextlib.suppress(OSError):
                touch(self.workdir / ALIVE_FILE)
            await asyncio.sleep(TOUCH_EVERY)

    def _server_cmd(self) -> list[str]:
        c = self.config
        threads = c.threads or len(os.sched_getaffinity(0))  # every core: stages never compute at once (NOTES)
        cmd = [sys.executable, "-m", "sharedllm.rpc_server", "--host", c.host, "--port", str(c.port),
               "--threads", str(threads), "--ready-file", str(self._server_file),
               "--alive-file", str(self.workdir / ALIVE_FILE), "--orphan-timeout", str(c.orphan_timeout)]
        for d in c.devices:
            cmd += ["--device", d]
        if c.cache_dir:
            cmd += ["--cache-dir", c.cache_dir]
        return cmd

    async def _adopt(self) -> bool:
        """Take over the rpc-server an earlier supervisor of this machine left running, if it still listens.

        No HELLO: an rpc-server serves one client at a time, and the session it serves now would hold the probe in
        its queue. The process and its listening socket are the proof; its protocol was recorded when it started."""
        info = read_json(self._server_file)
        if not info or not info.get("protocol") or not process_runs(info.get("pid"), "sharedllm.rpc_server"):
            return False
        if info.get("python") != sys.executable:  # another installation's (another release, another mesh)
            logger.warning("machine %s: the running rpc-server (pid %d) belongs to %s, not to this installation; "
                           "replacing it", self.config.machine_id, info["pid"], info.get("python") or "an older one")
            await terminate(DataPlaneProcess(info["pid"]), grace=5.0)
            return False
        endpoint = info["endpoint"]
        proc = DataPlaneProcess(info["pid"])
        if not await asyncio.to_thread(listens, endpoint):
            logger.warning("machine %s: the running rpc-server (pid %d) does not listen on %s; replacing it",
                           self.config.machine_id, proc.pid, endpoint)
            await terminate(proc, grace=0)
            return False
        self._proc, self._log_offset = proc, int(info.get("log_offset") or 0)
        self._started_at = time.time()
        self.config.port = int(endpoint.rpartition(":")[2])
        self._set(state="ready", endpoint=endpoint, devices=info["devices"], pid=proc.pid, threads=info["threads"],
                  protocol=info["protocol"], reason=None, direct=not self.config.relay)
        logger.info("machine %s: adopted the running rpc-server %s (pid %d): its sessions go on",
                    self.config.machine_id, endpoint, proc.pid)
        return True

    async def _launch(self) -> None:
        from sharedllm import ggml

        c = self.config
        self.maintain_cache()  # never during a load: the server is not running yet
        self._set(state="starting" if self.status.state != "restarting" else "restarting", reason=self.status.reason)
        self._server_file.unlink(missing_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = await spawn_process(self._server_cmd(), self.log_path, dict(os.environ, GGML_NO_BACKTRACE="1"))
        self._started_at = time.time()
        deadline = time.monotonic() + c.start_timeout
        info = await wait_ready_file(self._server_file, self._proc, deadline)
        if info is None:
            await self._reap()
            self._set(state="failed", reason=f"rpc-server did not start: {self._log_tail()}", pid=None)
            return
        endpoint = info["endpoint"]
        while time.monotonic() < deadline:
            if self._proc.child.returncode is not None:
                break
            try:
                version = await asyncio.to_thread(ggml.rpc_hello, endpoint, 2.0)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.config.port = int(endpoint.rpartition(":")[2])  # restarts reuse the port, so the endpoint stays stable
            protocol = ".".join(map(str, version))
            write_json(self._server_file, {**info, "protocol": protocol})  # for a supervisor that adopts it
            self._set(state="ready", endpoint=endpoint, devices=info["devices"], pid=info["pid"],
                      threads=info["threads"], protocol=protocol, reason=None, direct=not c.relay)
            logger.info("rpc-server ready on %s (%s)", endpoint, ", ".join(d["name"] for d in info["devices"]))
            await self._ensure_relay()
            return
        await self._reap()
        self._set(state="failed", reason=f"rpc-server never answered on {endpoint}: {self._log_tail()}", pid=None)

    async def _supervise(self) -> None:
        c = self.config
        while not self._stopping:
            proc = self._proc
            if proc is None:
                return
            code = await proc.wait()
            if self._stopping:
                return
            now = time.monotonic()
            self._restart_times = [t for t in self._restart_times if now - t < c.restart_window] + [now]
            message = self._exit_message()
            reason = f"rpc-server exited with status {'unknown (adopted)' if code is None else code}: {message}"
            logger.warning("%s", reason)
            self._set(last_exit={"pid": proc.pid, "code": code, "message": message, "time": time.time()})
            self._discard_partial_cache()
            if len(self._restart_times) > c.max_restarts:
                # Crash loop: marked failed (placement leaves it out), then one fresh try after a cool-down.
                self._set(state="failed", reason=f"crash loop ({len(self._restart_times)} exits in "
                          f"{c.restart_window:.0f}s), next try in {c.cooldown:.0f}s: {reason}", pid=None)
                await asyncio.sleep(c.cooldown)
                self._restart_times.clear()
                if not self._stopping:
                    await self._launch()
                continue
            self._set(state="restarting", reason=reason, restarts=self.status.restarts + 1, pid=None)
            await asyncio.sleep(c.backoff * 2 ** (len(self._restart_times) - 1))
            if not self._stopping:
                await self._launch()

    # --- the relay -------------------------------------------------------------------------------------------------

    def _relay_cert(self) -> tuple[str, str]:
        """The relay's certificate and key, made on first use. Clients pin the fingerprint the scheduler hands out
        with each lease, so a new certificate after a worker restart needs no one's attention."""
        from sharedllm import relay

        d = self.workdir / "relay"
        cert, key = d / "relay.pem", d / "relay-key.pem"
        if not (cert.exists() and key.exists()):
            hosts = [] if self.config.relay_host in ("127.0.0.1", "localhost") else [self.config.relay_host]
            cert_s, _key, _ca = relay.make_self_signed(d, [h.strip("[]") for h in hosts], days=3650)
            logger.info("made the relay certificate %s (%s)", cert_s, relay.cert_fingerprint(cert_s))
        return str(cert), str(key)

    async def _ensure_relay(self) -> None:
        """Start the relay in front of the ready server, if it is not running (needs the relay key)."""
        async with self._relay_lock:
            await self._ensure_relay_locked()

    def _adoptable_relay(self, endpoint: str) -> dict | None:
        """The relay an earlier supervisor left running in front of ``endpoint`` with this relay key, if any."""
        info = read_json(self._relay_file)
        if not info or not process_runs(info.get("pid"), "sharedllm.relay") or info.get("target") != endpoint:
            return None
        if info.get("python") != sys.executable:  # another installation's relay: replaced
            return None
        if info.get("hub") != (self._hub[0] if self._hub else None) or info.get("inbound", True) != self.config.inbound:
            return None  # registered at another hub, or listening where it should not (or the reverse)
        try:
            same_key = (self.workdir / "relay.key").read_text().strip() == self._relay_key.hex()
        except OSError:
            return None
        return info if same_key else None

    async def _ensure_relay_locked(self) -> None:
        from sharedllm import relay
        from sharedllm.security import write_private

        c = self.config
        endpoint = self.status.endpoint
        if not c.relay or self._stopping or endpoint is None:
            return
        if self._relay_key is None:
            self._set(relay=None, reason="relay key not received from the scheduler yet")
            return
        if not c.inbound and self._hub is None:
            self._set(relay=None, reason="this machine takes no inbound connections (--no-inbound) and the scheduler "
                                         "runs no relay hub; start the scheduler with a hub (the default)")
            return
        proc = self._relay_proc
        if proc is not None and not proc.exited and (self.status.relay or {}).get("target") == endpoint:
            return
        if proc is None and (info := self._adoptable_relay(endpoint)) is not None:
            self._relay_proc = DataPlaneProcess(info["pid"])
            answer = await self._control("status")
            if answer is not None:
                self._lease = answer.get("lease")
                self._set_relay(info)
                logger.info("machine %s: adopted the running relay %s (pid %d), admitting lease %s",
                            c.machine_id, info["endpoint"], info["pid"], self._lease)
                return
            logger.warning("machine %s: the running relay (pid %d) does not answer on %s; replacing it",
                           c.machine_id, info["pid"], self._control_path)
        await self._stop_relay_locked()
        stale = read_json(self._relay_file)  # an old relay (another key, another server): it must give up its port
        if stale and process_runs(stale.get("pid"), "sharedllm.relay"):
            await terminate(DataPlaneProcess(stale["pid"]))
        cert, key = self._relay_cert()
        key_file = self.workdir / "relay.key"
        write_private(key_file, self._relay_key.hex())
        self._relay_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "sharedllm.relay", "server",
               "--listen", relay.join_endpoint(c.relay_host, c.relay_port), "--target", endpoint,
               "--cert", cert, "--key", key, "--machine-id", c.machine_id, "--key-file", str(key_file),
               "--control-socket", str(self._control_path), "--ready-file", str(self._relay_file),
               "--alive-file", str(self.workdir / ALIVE_FILE), "--orphan-timeout", str(c.orphan_timeout)]
        if self._lease is not None:
            cmd += ["--lease", self._lease]
        if self._hub is not None:
            hub_file = self.workdir / "hub.key"
            write_private(hub_file, self._hub[1].hex())
            cmd += ["--hub", self._hub[0], "--hub-key-file", str(hub_file)]
            if not c.inbound:
                cmd.append("--no-inbound")
        proc = await spawn_process(cmd, self.workdir / "relay.log")
        info = await wait_ready_file(self._relay_file, proc, time.monotonic() + c.start_timeout)
        if info is None:
            await terminate(proc, grace=0)
            tail = self._log_tail(self.workdir / "relay.log")
            self._set(relay=None, reason=f"the relay did not start: {tail}")
            logger.warning("machine %s: the relay did not start: %s", c.machine_id, tail)
            return
        self._relay_proc = proc
        if c.inbound:
            c.relay_port = int(info["endpoint"].rpartition(":")[2])  # restarts keep the port: clients keep it
        self._set_relay(info)
        logger.info("relay of machine %s on %s (%s) in front of %s", c.machine_id, info["endpoint"],
                    info["fingerprint"], endpoint)

    def _set_relay(self, info: dict) -> None:
        self._set(relay={"endpoint": info["endpoint"], "fingerprint": info["fingerprint"], "pid": info["pid"],
                         "target": info["target"], "lease": self._lease, "hub": info.get("hub"),
                         "inbound": info.get("inbound", True)}, reason=None)
        if self._relay_watch is None or self._relay_watch.done():
            self._relay_watch = asyncio.ensure_future(self._watch_relay())

    async def _watch_relay(self) -> None:
        while not self._stopping:
            proc = self._relay_proc
            if proc is None:
                return
            code = await proc.wait()
            if self._stopping or proc is not self._relay_proc:
                continue  # stopped on purpose, or replaced: watch the new one, if any
            logger.warning("machine %s: the relay exited with status %s: %s; restarting it", self.config.machine_id,
                           code, self._log_tail(self.workdir / "relay.log"))
            self._relay_proc = None
            self._set(relay=None)
            await asyncio.sleep(self.config.backoff)
            await self._ensure_relay()

    async def _control(self, command: str, timeout: float = 10.0) -> dict | None:
        """Send one command to the relay's control socket; its answer, or None when it cannot be reached."""
        return await control_call(self._control_path, command, timeout)

    async def _tell_relay(self, lease: str | None) -> None:
        """Make the relay admit ``lease`` (None: nobody) and wait for its acknowledgement."""
        proc = self._relay_proc
        if proc is None or proc.exited:
            return
        answer = await self._control(f"lease {lease or ''}")
        if answer is None or answer.get("lease") != lease:
            raise ConnectionError("the relay exited or did not acknowledge the lease change within 10s")
        if self.status.relay is not None:
            self._set(relay={**self.status.relay, "lease": lease})

    async def set_lease(self, lease: str | None, seq: int) -> dict:
        """Admit ``lease`` on this machine's relay (None: nobody); live connections of other leases are closed.

        ``seq`` orders the scheduler's lease changes: an older change arriving late is ignored."""
        async with self._relay_lock:
            if seq < self._lease_seq:
                return self.status.to_dict()
            self._lease_seq, self._lease = seq, lease
            await self._tell_relay(lease)
        return self.status.to_dict()

    async def _stop_relay(self) -> None:
        async with self._relay_lock:
            await self._stop_relay_locked()

    async def _stop_relay_locked(self) -> None:
        proc, self._relay_proc = self._relay_proc, None
        if proc is not None:
            await terminate(proc)
        if self.status.relay is not None:
            self._set(relay=None)

    def maintain_cache(self) -> dict:
        """Evict least recently used tensor-cache files beyond the cap; refresh the reported cache stats.

        Call it only while no session is loading (before a start, after a session ends): the server writes cache
        files during a load."""
        from sharedllm import tensor_cache

        d = self.config.cache_dir
        if not d:
            return {}
        try:
            evicted = tensor_cache.prune(d, self.config.cache_cap)
            if evicted:
                logger.info("tensor cache %s: evicted %d file(s) beyond %d MiB", d, len(evicted),
                            self.config.cache_cap >> 20)
            self.status.cache = {**tensor_cache.stats(d), "cap": self.config.cache_cap}
        except OSError as exc:
            logger.warning("could not maintain the tensor cache %s: %s", d, exc)
        return self.status.cache

    def _discard_partial_cache(self) -> None:
        # llama.cpp writes cache files with an unchecked ofstream: a crash mid-write leaves a truncated file that a
        # later load would take as a hit (wrong weights). Drop what the dead server wrote.
        from sharedllm import tensor_cache

        if self.config.cache_dir and getattr(self, "_started_at", None):
            with contextlib.suppress(OSError):
                dropped = tensor_cache.discard_since(self.config.cache_dir, self._started_at)
                if dropped:
                    logger.warning("dropped %d tensor-cache file(s) written by the crashed rpc-server", len(dropped))

    def _exit_message(self) -> str:
        """What the dead server said last: its ggml assertion if it aborted on one (its other output may come after
        it), else its last line. Only this server's lines count: the log holds its predecessors' too."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(self._log_offset, self.log_path.stat().st_size - 8192))
                lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        marked = [ln for ln in lines if "GGML_ASSERT" in ln]
        return ((marked or lines or ["no output"])[-1])[-300:]

    def _log_tail(self, path: Path | None = None) -> str:
        try:
            lines = [ln for ln in (path or self.log_path).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1][-300:] if lines else "no output"

    async def _reap(self) -> None:
        if self._proc is not None:
            await terminate(self._proc, grace=0)

    async def stop(self) -> RPCServerState:
        """Stop the server and its relay for good."""
        self._stopping = True
        await self._stop_relay()
        if self._proc is not None:
            await terminate(self._proc)
        for task in (self._watch, self._toucher):
            if task is not None:
                task.cancel()
        for f in (self._server_file, self._relay_file):
            f.unlink(missing_ok=True)
        self._set(state="stopped", pid=None, reason=None)
        return self.status

    def report(self) -> dict:
        """The state for the heartbeat, with ``stopped``: which of the server and its relay are stopped now (SIGSTOP,
        a debugger): alive, listening, and silent, which no timeout of the RPC protocol would notice."""
        status = self.status.to_dict()
        pids = {"rpc-server": status["pid"], "relay": (status["relay"] or {}).get("pid")}
        status["stopped"] = [name for name, pid in pids.items() if pid and process_state(pid) == "T"]
        return status

    def detach(self) -> None:
        """Stop supervising, and leave the server and its relay serving: this worker is going away without being
        told to (it lost the scheduler), and the next supervisor of the machine adopts them."""
        self._stopping = True
        for task in (self._watch, self._toucher, self._relay_watch):
            if task is not None:
                task.cancel()
        logger.info("machine %s: leaving the rpc-server (pid %s) and its relay serving for the next worker",
                    self.config.machine_id, self.status.pid)


class RPCServerActor:
    """Dask actor pinned by the scheduler plugin, one per machine. Thin: the supervisor does the work."""

    machine_id: str
    supervisor: RPCServerSupervisor | None

    def __init__(self, machine_id: str):
        from distributed import get_worker

        self.machine_id = machine_id
        worker = get_worker()
        agent = worker.extensions.get("sharedllm")
        if agent is None:
            raise RuntimeError(f"worker {worker.address} does not run the sharedllm.worker preload")
        self.supervisor = agent.new_supervisor(machine_id)
        self._scheduler_address = worker.scheduler.address

    async def start(self, relay_key: str | None = None, hub: dict | None = None) -> dict:
        """Start (or keep) the rpc-server; ``relay_key`` (hex) is this machine's relay key from the scheduler, ``hub``
        its relay hub (``{"host": ..., "port": ..., "credential": hex}``; no host: the scheduler's host as this
        worker reaches it)."""
        key = bytes.fromhex(relay_key) if relay_key else None
        link = None
        if hub:
            from distributed.comm.addressing import get_address_host

            from sharedllm.relay import join_endpoint

            host = hub.get("host") or get_address_host(self._scheduler_address)
            link = (join_endpoint(host, int(hub["port"])), bytes.fromhex(hub["credential"]))
        return (await self.supervisor.start(key, link)).to_dict()

    async def set_lease(self, lease: str | None, seq: int) -> dict:
        return await self.supervisor.set_lease(lease, seq)

    async def stop(self) -> dict:
        return (await self.supervisor.stop()).to_dict()

    async def status(self) -> dict:
        return self.supervisor.status.to_dict()

    async def maintain_cache(self) -> dict:
        return await asyncio.to_thread(self.supervisor.maintain_cache)
