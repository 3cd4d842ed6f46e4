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
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    since: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


def public_endpoint(rpc: dict) -> str | None:
    """Where clients reach a machine's rpc-server (its reported state): its relay, or the server itself when
    direct; None while neither is up."""
    if rpc.get("direct"):
        return rpc.get("endpoint")
    return (rpc.get("relay") or {}).get("endpoint")


def describe_endpoint(rpc: dict) -> str:
    """:func:`public_endpoint` for tables, saying which it is."""
    endpoint = public_endpoint(rpc)
    if endpoint is None:
        return "-"
    return f"{endpoint} (direct, no TLS)" if rpc.get("direct") else f"{endpoint} (TLS relay)"


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
    machine_id: str = ""


async def _read_message(stream: asyncio.StreamReader, prefix: str, deadline: float,
                        match: Callable[[dict], bool] | None = None) -> dict | None:
    """The JSON of the next line of ``stream`` that starts with ``prefix`` (and satisfies ``match``), skipping other
    lines; None when the stream ends or ``deadline`` (monotonic) passes first."""
    try:
        while line := await asyncio.wait_for(stream.readline(), max(0.1, deadline - time.monotonic())):
            text = line.decode(errors="replace")
            if text.startswith(prefix):
                msg = json.loads(text[len(prefix):])
                if match is None or match(msg):
                    return msg
            if time.monotonic() >= deadline:
                break
    except asyncio.TimeoutError:
        pass
    return None


async def _terminate(proc: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """Stop a child: SIGTERM, then SIGKILL after ``grace`` seconds (at once with ``grace=0``); wait for it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            if grace > 0:
                proc.terminate()
            else:
                proc.kill()
        try:
            await asyncio.wait_for(proc.wait(), grace or None)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


class RPCServerSupervisor:
    """Runs and watches one rpc-server process on the current event loop. No Dask."""

    def __init__(self, config: RPCServerConfig, workdir: str | os.PathLike, on_change=None):
        self.config = config
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.status = RPCServerState()
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task | None = None
        self._stopping = False
        self._restart_times: list[float] = []
        self._on_change = on_change
        self._drainer: asyncio.Task | None = None
        self._relay_key: bytes | None = None
        self._relay_proc: asyncio.subprocess.Process | None = None
        self._relay_watch: asyncio.Task | None = None
        self._relay_lock = asyncio.Lock()
        self._lease: str | None = None
        self._lease_seq = -1

    @property
    def log_path(self) -> Path:
        return self.workdir / "rpc-server.log"

    def _set(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self.status, k, v)
        self.status.since = time.time()
        if self._on_change:
            self._on_change(self.status)

    async def start(self, relay_key: bytes | None = None) -> RPCServerState:
        """Start the server (and its relay, given this machine's relay key) and wait until it answers HELLO.

        Returns the state (ready, or failed with the reason). A server that runs already is kept: a re-created actor
        (the scheduler restarted) only hands over a new relay key."""
        self._stopping = False
        if relay_key is not None and relay_key != self._relay_key:
            self._relay_key = relay_key
            await self._stop_relay()  # a relay with the old key would refuse every token of the new scheduler
        if self._proc is None or self._proc.returncode is not None:
            await self._launch()
        elif self.status.state == "ready":
            await self._ensure_relay()
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._supervise())
        return self.status

    async def _launch(self) -> None:
        from sharedllm import ggml
        from sharedllm.rpc_server import READY_PREFIX

        c = self.config
        self.maintain_cache()  # never during a load: the server is not running yet
        threads = c.threads or len(os.sched_getaffinity(0))  # every core: stages never compute at once (NOTES)
        cmd = [sys.executable, "-m", "sharedllm.rpc_server", "--host", c.host, "--port", str(c.port),
               "--threads", str(threads), "--parent-pid", str(os.getpid())]
        for d in c.devices:
            cmd += ["--device", d]
        if c.cache_dir:
            cmd += ["--cache-dir", c.cache_dir]
        self._set(state="starting" if self.status.state != "restarting" else "restarting", reason=self.status.reason)
        log = open(self.log_path, "ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL,
                env=dict(os.environ, GGML_NO_BACKTRACE="1"),  # a crash must not wait for gdb
            )
        finally:
            log.close()
        self._started_at = time.time()
        deadline = time.monotonic() + c.start_timeout
        info = await _read_message(self._proc.stdout, READY_PREFIX, deadline)
        if info is None:
            await self._reap()
            self._set(state="failed", reason=f"rpc-server did not start: {self._log_tail()}", pid=None)
            return
        # Keep draining stdout (llama.cpp prints a line per client) so the pipe never fills up.
        self._drainer = asyncio.ensure_future(self._drain(self._proc))
        endpoint = info["endpoint"]
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                break
            try:
                version = await asyncio.to_thread(ggml.rpc_hello, endpoint, 2.0)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            self.config.port = int(endpoint.rpartition(":")[2])  # restarts reuse the port, so the endpoint stays stable
            self._set(state="ready", endpoint=endpoint, devices=info["devices"], pid=info["pid"],
                      threads=info["threads"], protocol=".".join(map(str, version)), reason=None,
                      direct=not c.relay)
            logger.info("rpc-server ready on %s (%s)", endpoint, ", ".join(d["name"] for d in info["devices"]))
            await self._ensure_relay()
            return
        await self._reap()
        self._set(state="failed", reason=f"rpc-server never answered on {endpoint}: {self._log_tail()}", pid=None)

    async def _drain(self, proc) -> None:
        with open(self.log_path, "ab") as log, contextlib.suppress(Exception):
            while line := await proc.stdout.readline():
                log.write(line)
                log.flush()

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
            reason = f"rpc-server exited with status {code}: {self._log_tail()}"
            logger.warning("%s", reason)
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
        proc = self._relay_proc
        if proc is not None and proc.returncode is None and (self.status.relay or {}).get("target") == endpoint:
            return
        await self._stop_relay_locked()
        cert, key = self._relay_cert()
        key_file = self.workdir / "relay.key"
        write_private(key_file, self._relay_key.hex())
        cmd = [sys.executable, "-m", "sharedllm.relay", "server",
               "--listen", relay.join_endpoint(c.relay_host, c.relay_port), "--target", endpoint,
               "--cert", cert, "--key", key, "--machine-id", c.machine_id,
               "--key-file", str(key_file), "--control-stdin", "--parent-pid", str(os.getpid())]
        log = open(self.workdir / "relay.log", "ab")
        try:
            proc = await asyncio.create_subprocess_exec(*cmd, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE, stderr=log)
        finally:
            log.close()
        info = await _read_message(proc.stdout, relay.READY_PREFIX, time.monotonic() + c.start_timeout)
        if info is None:
            await _terminate(proc, grace=0)
            tail = self._log_tail(self.workdir / "relay.log")
            self._set(relay=None, reason=f"the relay did not start: {tail}")
            logger.warning("machine %s: the relay did not start: %s", c.machine_id, tail)
            return
        self._relay_proc = proc
        c.relay_port = int(info["endpoint"].rpartition(":")[2])  # restarts keep the port: clients keep the endpoint
        self._set(relay={"endpoint": info["endpoint"], "fingerprint": info["fingerprint"], "pid": info["pid"],
                         "target": endpoint}, reason=None)
        logger.info("relay of machine %s on %s (%s) in front of %s", c.machine_id, info["endpoint"],
                    info["fingerprint"], endpoint)
        if self._lease is not None:
            await self._tell_relay(self._lease)
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

    async def _tell_relay(self, lease: str | None) -> None:
        """Make the relay admit ``lease`` (None: nobody) and wait for its acknowledgement."""
        from sharedllm import relay

        proc = self._relay_proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return
        proc.stdin.write(f"lease {lease or ''}\n".encode())
        await proc.stdin.drain()
        ack = await _read_message(proc.stdout, relay.READY_PREFIX, time.monotonic() + 10,
                                  match=lambda msg: msg.get("lease", "?") == lease)
        if ack is None:
            raise ConnectionError("the relay exited or did not acknowledge the lease change within 10s")

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
            await _terminate(proc)
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

    def _log_tail(self, path: Path | None = None) -> str:
        try:
            lines = [ln for ln in (path or self.log_path).read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1][-300:] if lines else "no output"

    async def _reap(self) -> None:
        if self._proc is not None:
            await _terminate(self._proc, grace=0)

    async def stop(self) -> RPCServerState:
        """Stop the server and its relay for good."""
        self._stopping = True
        await self._stop_relay()
        if self._proc is not None:
            await _terminate(self._proc)
        if self._watch is not None:
            self._watch.cancel()
        self._set(state="stopped", pid=None, reason=None)
        return self.status


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

    async def start(self, relay_key: str | None = None) -> dict:
        """Start (or keep) the rpc-server; ``relay_key`` (hex) is this machine's relay key from the scheduler."""
        key = bytes.fromhex(relay_key) if relay_key else None
        return (await self.supervisor.start(key)).to_dict()

    async def set_lease(self, lease: str | None, seq: int) -> dict:
        return await self.supervisor.set_lease(lease, seq)

    async def stop(self) -> dict:
        return (await self.supervisor.stop()).to_dict()

    async def status(self) -> dict:
        return self.supervisor.status.to_dict()

    async def maintain_cache(self) -> dict:
        return await asyncio.to_thread(self.supervisor.maintain_cache)
