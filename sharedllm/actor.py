# SPDX-License-Identifier: AGPL-3.0-or-later
"""The per-machine actor that owns and supervises that machine's rpc-server process.

The scheduler plugin pins exactly one ``RPCServerActor`` per machine. The actor runs ``python -m sharedllm.rpc_server``
as a child of the worker process, waits until it answers the RPC HELLO, restarts it with backoff when it exits, and
publishes its state through the worker's ``sharedllm`` extension (which the heartbeat carries to the scheduler).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
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
    since: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


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

    @property
    def log_path(self) -> Path:
        return self.workdir / "rpc-server.log"

    def _set(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self.status, k, v)
        self.status.since = time.time()
        if self._on_change:
            self._on_change(self.status)

    async def start(self) -> RPCServerState:
        """Start the server and wait until it answers HELLO. Returns the state (ready, or failed with the reason)."""
        self._stopping = False
        await self._launch()
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
        info = None
        deadline = time.monotonic() + c.start_timeout
        try:
            while info is None:
                line = await asyncio.wait_for(self._proc.stdout.readline(), max(0.1, deadline - time.monotonic()))
                if not line:
                    break
                text = line.decode(errors="replace")
                if text.startswith(READY_PREFIX):
                    info = json.loads(text[len(READY_PREFIX) :])
        except asyncio.TimeoutError:
            pass
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
                      threads=info["threads"], protocol=".".join(map(str, version)), reason=None)
            logger.info("rpc-server ready on %s (%s)", endpoint, ", ".join(d["name"] for d in info["devices"]))
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

    def _log_tail(self) -> str:
        try:
            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no log"
        return lines[-1][-300:] if lines else "no output"

    async def _reap(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()

    async def stop(self) -> RPCServerState:
        """Stop the server for good."""
        self._stopping = True
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except asyncio.TimeoutError:
                await self._reap()
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

    async def start(self) -> dict:
        return (await self.supervisor.start()).to_dict()

    async def stop(self) -> dict:
        return (await self.supervisor.stop()).to_dict()

    async def status(self) -> dict:
        return self.supervisor.status.to_dict()

    async def maintain_cache(self) -> dict:
        return await asyncio.to_thread(self.supervisor.maintain_cache)
