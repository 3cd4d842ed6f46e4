# SPDX-License-Identifier: AGPL-3.0-or-later
"""The supervisor of a machine's rpc-server process: start it (or adopt the one an earlier worker of the machine left
running), wait until it answers the RPC HELLO, restart it with backoff when it exits, stop or leave it. Its relay
(:mod:`.relay`) and its tensor cache (:mod:`.cache`) are parts it owns. No Dask."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from sharedllm.dataplane import (
    ALIVE_FILE,
    SERVER_FILE,
    TOUCH_EVERY,
    DataPlaneProcess,
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
from sharedllm.machine.cache import CacheKeeper
from sharedllm.machine.relay import RelayKeeper
from sharedllm.machine.state import RPCServerConfig, RPCServerState

logger = logging.getLogger("sharedllm.machine")


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
        self.stopping = False
        self._restart_times: list[float] = []
        self._on_change = on_change
        self._started_at: float | None = None
        self.relay = RelayKeeper(self)  # the TLS relay in front of the server
        self.cache = CacheKeeper(config)  # its tensor cache

    @property
    def log_path(self) -> Path:
        return self.workdir / "rpc-server.log"

    @property
    def _server_file(self) -> Path:
        return self.workdir / SERVER_FILE

    def set_status(self, **kw: Any) -> None:
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
        self.stopping = False
        touch(self.workdir / ALIVE_FILE)
        if self._toucher is None or self._toucher.done():
            self._toucher = asyncio.ensure_future(self._touch_alive())
        await self.relay.configure(relay_key, hub)
        if self._proc is None and await self._adopt():
            await self.relay.ensure()
        elif self._proc is None or self._proc.exited:
            await self._launch()
        elif self.status.state == "ready":
            await self.relay.ensure()
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._supervise())
        return self.status

    async def _touch_alive(self) -> None:
        while not self.stopping:
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
        self.set_status(state="ready", endpoint=endpoint, devices=info["devices"], pid=proc.pid,
                        threads=info["threads"],
                  protocol=info["protocol"], reason=None, direct=not self.config.relay)
        logger.info("machine %s: adopted the running rpc-server %s (pid %d): its sessions go on",
                    self.config.machine_id, endpoint, proc.pid)
        return True

    async def _launch(self) -> None:
        from sharedllm import ggml

        c = self.config
        self.maintain_cache()  # never during a load: the server is not running yet
        self.set_status(state="starting" if self.status.state != "restarting" else "restarting",
                        reason=self.status.reason)
        self._server_file.unlink(missing_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._proc = await spawn_process(self._server_cmd(), self.log_path, dict(os.environ, GGML_NO_BACKTRACE="1"))
        self._started_at = time.time()
        deadline = time.monotonic() + c.start_timeout
        info = await wait_ready_file(self._server_file, self._proc, deadline)
        if info is None:
            await self._reap()
            self.set_status(state="failed", reason=f"rpc-server did not start: {self.log_tail()}", pid=None)
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
            self.set_status(state="ready", endpoint=endpoint, devices=info["devices"], pid=info["pid"],
                      threads=info["threads"], protocol=protocol, reason=None, direct=not c.relay)
            logger.info("rpc-server ready on %s (%s)", endpoint, ", ".join(d["name"] for d in info["devices"]))
            await self.relay.ensure()
            return
        await self._reap()
        self.set_status(state="failed", reason=f"rpc-server never answered on {endpoint}: {self.log_tail()}", pid=None)

    async def _supervise(self) -> None:
        c = self.config
        while not self.stopping:
            proc = self._proc
            if proc is None:
                return
            code = await proc.wait()
            if self.stopping:
                return
            now = time.monotonic()
            self._restart_times = [t for t in self._restart_times if now - t < c.restart_window] + [now]
            message = self._exit_message()
            reason = f"rpc-server exited with status {'unknown (adopted)' if code is None else code}: {message}"
            logger.warning("%s", reason)
            self.set_status(last_exit={"pid": proc.pid, "code": code, "message": message, "time": time.time()})
            self.cache.discard_partial(self._started_at)
            if len(self._restart_times) > c.max_restarts:
                # Crash loop: marked failed (placement leaves it out), then one fresh try after a cool-down.
                self.set_status(state="failed", reason=f"crash loop ({len(self._restart_times)} exits in "
                          f"{c.restart_window:.0f}s), next try in {c.cooldown:.0f}s: {reason}", pid=None)
                await asyncio.sleep(c.cooldown)
                self._restart_times.clear()
                if not self.stopping:
                    await self._launch()
                continue
            self.set_status(state="restarting", reason=reason, restarts=self.status.restarts + 1, pid=None)
            await asyncio.sleep(c.backoff * 2 ** (len(self._restart_times) - 1))
            if not self.stopping:
                await self._launch()

    async def set_lease(self, lease: str | None, seq: int) -> dict:
        """Admit ``lease`` on this machine's relay (None: nobody); see :meth:`RelayKeeper.set_lease`."""
        await self.relay.set_lease(lease, seq)
        return self.status.to_dict()

    def maintain_cache(self) -> dict:
        """Evict tensor-cache files beyond the cap; the cache's stats, reported with the state. Only while no
        session loads (the server writes cache files during a load)."""
        self.status.cache = self.cache.maintain()
        return self.status.cache

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

    def log_tail(self, path: Path | None = None) -> str:
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
        self.stopping = True
        await self.relay.stop()
        if self._proc is not None:
            await terminate(self._proc)
        for task in (self._watch, self._toucher):
            if task is not None:
                task.cancel()
        for f in (self._server_file, self.relay.ready_file):
            f.unlink(missing_ok=True)
        self.set_status(state="stopped", pid=None, reason=None)
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
        self.stopping = True
        for task in (self._watch, self._toucher):
            if task is not None:
                task.cancel()
        self.relay.detach()
        logger.info("machine %s: leaving the rpc-server (pid %s) and its relay serving for the next worker",
                    self.config.machine_id, self.status.pid)
