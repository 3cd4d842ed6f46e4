# SPDX-License-Identifier: AGPL-3.0-or-later
"""The scheduler's relay hub (:mod:`sharedllm.relay.hub`), run as a process of its own and kept running.

Started by the plugin when the scheduler starts (``dask scheduler --preload sharedllm.scheduler [--hub-port P]``),
with a key derived from the relay master key. Like a machine's relay it is data plane: with a state file
(``--state-path``) it records itself next to it and outlives a scheduler restart (the next scheduler adopts it, and
the sessions it carries go on); it stops by itself once no scheduler has touched its alive file for the orphan
timeout. Without a state file the scheduler's keys die with it, and the hub with them (``--parent-pid``).
When it exits, it is started again on the same port, so machines and clients find it where they did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sharedllm.dataplane import (
    DEFAULT_ORPHAN_TIMEOUT,
    HUB_FILE,
    TOUCH_EVERY,
    DataPlaneProcess,
    control_call,
    control_socket_path,
    process_runs,
    read_json,
    spawn_process,
    terminate,
    touch,
    wait_ready_file,
)
from sharedllm.security import write_private

logger = logging.getLogger("sharedllm.scheduler")

READY_FILE, ALIVE_FILE, KEY_FILE = HUB_FILE, "scheduler.alive", "hub.key"


class HubProcess:
    """``python -m sharedllm.relay hub`` on ``host:port``, supervised from the scheduler's event loop."""

    def __init__(self, key: bytes, *, host: str = "0.0.0.0", port: int = 0, workdir: str | os.PathLike | None = None,
                 max_connections_per_machine: int = 32, max_mbit_per_machine: float | None = None,
                 orphan_timeout: float = DEFAULT_ORPHAN_TIMEOUT, start_timeout: float = 30.0):
        self.key = key
        self.host, self.port = host, port
        self.persistent = workdir is not None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="sharedllm-hub-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.workdir.chmod(0o700)
        self.max_connections_per_machine = max_connections_per_machine
        self.max_mbit_per_machine = max_mbit_per_machine
        self.orphan_timeout = orphan_timeout
        self.start_timeout = start_timeout
        self._proc: DataPlaneProcess | None = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def _control(self) -> Path:
        return control_socket_path(self.workdir, "hub.sock")

    async def start(self) -> int:
        """Adopt the hub a previous scheduler left running with this key, or start one; returns its port."""
        touch(self.workdir / ALIVE_FILE)
        info = read_json(self.workdir / READY_FILE) if self.persistent else None
        try:
            same_key = (self.workdir / KEY_FILE).read_text().strip() == self.key.hex()
        except OSError:
            same_key = False
        if info and process_runs(info.get("pid"), "sharedllm.relay") and same_key and await self.stats() is not None:
            self._proc = DataPlaneProcess(info["pid"])
            self.port = int(info["endpoint"].rpartition(":")[2])
            logger.info("adopted the running relay hub on port %d (pid %d)", self.port, info["pid"])
        else:
            if info and process_runs(info.get("pid"), "sharedllm.relay"):  # another key: it must give up its port
                await terminate(DataPlaneProcess(info["pid"]))
            await self._launch()
        self._tasks = [asyncio.ensure_future(self._supervise())]
        if self.persistent:
            self._tasks.append(asyncio.ensure_future(self._touch()))
        return self.port

    async def _launch(self) -> None:
        write_private(self.workdir / KEY_FILE, self.key.hex())
        (self.workdir / READY_FILE).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "sharedllm.relay", "hub", "--listen", f"{self.host}:{self.port}",
               "--key-file", str(self.workdir / KEY_FILE), "--control-socket", str(self._control),
               "--ready-file", str(self.workdir / READY_FILE),
               "--max-connections-per-machine", str(self.max_connections_per_machine)]
        if self.max_mbit_per_machine:
            cmd += ["--max-mbit-per-machine", str(self.max_mbit_per_machine)]
        if self.persistent:
            cmd += ["--alive-file", str(self.workdir / ALIVE_FILE), "--orphan-timeout", str(self.orphan_timeout)]
        else:
            cmd += ["--parent-pid", str(os.getpid())]
        proc = await spawn_process(cmd, self.workdir / "hub.log")
        info = await wait_ready_file(self.workdir / READY_FILE, proc, time.monotonic() + self.start_timeout)
        if info is None:
            await terminate(proc, grace=0)
            tail = (self.workdir / "hub.log").read_text(errors="replace")[-500:]
            raise RuntimeError(f"the relay hub did not start on {self.host}:{self.port}: {tail}")
        self._proc = proc
        self.port = int(info["endpoint"].rpartition(":")[2])  # restarts keep the port: machines find it again
        logger.info("relay hub on %s (pid %d) for machines that take no inbound connections", info["endpoint"],
                    proc.pid)

    async def _supervise(self) -> None:
        while not self._closing:
            proc = self._proc
            code = await proc.wait()
            if self._closing:
                return
            self.restarts += 1
            logger.warning("the relay hub (pid %d) exited with status %s; starting it again on port %d", proc.pid,
                           code, self.port)
            while not self._closing:
                try:
                    await self._launch()
                    break
                except RuntimeError as exc:
                    logger.warning("%s; trying again in 2s", exc)
                    await asyncio.sleep(2.0)

    async def _touch(self) -> None:
        while not self._closing:
            with contextlib.suppress(OSError):
                touch(self.workdir / ALIVE_FILE)
            await asyncio.sleep(TOUCH_EVERY)

    async def stats(self, timeout: float = 2.0) -> dict | None:
        """The hub's figures (:meth:`sharedllm.relay.hub.RelayHub.stats`), or None when it does not answer."""
        return await control_call(self._control, "status", timeout)

    async def revoke(self, lease: str) -> dict | None:
        """Tell the hub that ``lease`` ended (its hub tokens are refused, its connections closed)."""
        return await control_call(self._control, f"revoke {lease}")

    async def close(self, stop: bool | None = None) -> None:
        """Stop supervising; stop the hub too when it cannot be adopted (no state file) or ``stop`` says so."""
        self._closing = True
        for t in self._tasks:
            t.cancel()
        if self._proc is not None and (stop if stop is not None else not self.persistent):
            await terminate(self._proc)
        if not self.persistent:  # a folder of our own in /tmp: its key, log and socket go with the hub
            shutil.rmtree(self.workdir, ignore_errors=True)


class MeshHub:
    """What the mesh plugin knows of its relay hub: the process (or a separate hub's address), the key, which machine
    is reached how, and the hub's figures.

    ``config``: ``{"port": 0, "host": None, "address": None, "key_file": None, "max_mbit_per_machine": None}``.
    ``address`` (``HOST:PORT``) with ``key_file`` names a hub someone else runs (``python -m sharedllm.relay hub``
    with the same key); else the scheduler runs one on ``port`` (0: any free port, kept across restarts when there is
    a state file). ``host`` is the address to advertise; by default each machine and client uses the scheduler's host
    as it reaches it."""

    PROBE_EVERY = 300.0  # seconds before a machine's direct endpoint is tried again
    POLL_EVERY = 2.0

    def __init__(self, config: dict, relay_master: bytes, workdir: str | os.PathLike | None = None):
        from sharedllm.relay.hub import hub_key

        self.config = dict(config)
        self.address = self.config.get("address")
        if self.address:
            from sharedllm.relay.tokens import read_key

            if not self.config.get("key_file"):
                raise ValueError("a separate relay hub (--hub-address) needs its key (--hub-key-file)")
            self.key = read_key(self.config["key_file"])
            self.host, _, port = self.address.rpartition(":")
            self.port = int(port)
        else:
            self.key = hub_key(relay_master)
            self.host, self.port = self.config.get("host"), int(self.config.get("port") or 0)
        self.process: HubProcess | None = None
        self.workdir = workdir
        self.stats: dict | None = None
        self._polled = 0.0
        self._probes: dict[str, tuple[str, bool | None, float]] = {}  # machine -> (endpoint, reachable, when)
        self._probing: set[asyncio.Task] = set()
        self._in_flight: set[str] = set()  # machines whose relay is being tried now

    async def start(self) -> None:
        if self.address:
            logger.info("machines without inbound connections register at the relay hub %s", self.address)
            return
        self.process = HubProcess(self.key, host=self.config.get("listen") or "0.0.0.0", port=self.port,
                                  workdir=self.workdir, max_mbit_per_machine=self.config.get("max_mbit_per_machine"))
        self.port = await self.process.start()

    async def close(self) -> None:
        for t in self._probing:
            t.cancel()
        if self.process is not None:
            await self.process.close()

    def for_machine(self, machine: str) -> dict:
        """The hub as ``RPCServerActor.start`` takes it: where, and this machine's credential."""
        from sharedllm.relay.hub import hub_machine_key

        return {"host": self.host, "port": self.port, "credential": hub_machine_key(self.key, machine).hex()}

    async def revoke(self, session_id: str) -> None:
        """A session ended: its hub tokens stop working at the hub too (a separate hub is not told)."""
        if self.process is not None:
            await self.process.revoke(session_id)

    def for_lease(self, session_id: str, machine: str, ttl: float) -> dict:
        """The hub as a client's relay takes it (the host filled in by the client when not advertised)."""
        from sharedllm.relay import mint_token
        from sharedllm.relay.hub import hub_client_key

        return {"host": self.host, "port": self.port, "machine": machine,
                "token": mint_token(hub_client_key(self.key), session_id, machine, ttl)}

    def reach(self, machine: str, rpc: dict) -> str:
        """``direct``, ``hub`` (it takes no inbound connection, or the scheduler could not reach its relay while the
        hub has it), ``probing`` (its relay is being tried from the scheduler: which way is not known yet), or
        ``none`` (no inbound connection and not at the hub: nobody can reach it now)."""
        relay = rpc.get("relay") or {}
        if rpc.get("direct") or not relay:
            return "direct"
        at_hub = self.registered(machine)
        if not relay.get("inbound", True):
            return "hub" if at_hub is not False else "none"
        probe = self._probes.get(machine)
        if probe is None or probe[0] != relay.get("endpoint"):
            return "probing" if self.process is not None else "direct"  # a separate hub: no probe of ours
        if probe[1] is None:
            return "probing"
        if probe[1] is False:  # the scheduler cannot reach it directly: only through the hub, while it is there
            return "hub" if at_hub is not False else "none"
        return "direct"

    def registered(self, machine: str) -> bool | None:
        """Whether the machine is registered at the hub now (None: unknown, a separate hub)."""
        if self.process is None or self.stats is None:
            return None
        return machine in (self.stats.get("machines") or {})

    def due(self, heartbeat_interval: float = 0.0) -> bool:
        """Whether to poll again: every POLL_EVERY seconds, or every heartbeat interval of a larger cluster."""
        return time.monotonic() - self._polled >= max(self.POLL_EVERY, heartbeat_interval)

    async def poll(self, machines: list[dict]) -> None:
        """Refresh the hub's figures, and try the direct endpoint of machines not tried lately (in the background)."""
        now = self._polled = time.monotonic()
        if self.process is not None:
            self.stats = await self.process.stats()
        for m in machines:
            relay = (m.get("rpc") or {}).get("relay") or {}
            endpoint = relay.get("endpoint")
            if not endpoint or not relay.get("inbound", True) or (m.get("rpc") or {}).get("direct"):
                continue
            probe = self._probes.get(m["machine_id"])
            if m["machine_id"] in self._in_flight or (probe and probe[0] == endpoint
                                                      and now - probe[2] < self.PROBE_EVERY):
                continue
            # A machine tried before keeps its way while it is tried again; a new endpoint is "probing" until then.
            self._probes[m["machine_id"]] = (endpoint, probe[1] if probe and probe[0] == endpoint else None, now)
            self._in_flight.add(m["machine_id"])
            task = asyncio.ensure_future(self._probe(m["machine_id"], endpoint))
            self._probing.add(task)
            task.add_done_callback(self._probing.discard)

    async def settle(self, machines: list[dict], timeout: float = 4.0) -> None:
        """Try at once the relays whose way in is not known yet (not at the next poll) and wait, at most ``timeout``
        seconds, for the tries in flight: a load does not leave out a machine that joined a moment ago."""
        if self.process is None:
            return
        if any(self.reach(m["machine_id"], m.get("rpc") or {}) == "probing" for m in machines):
            await self.poll(machines)
        if self._probing:
            await asyncio.wait(list(self._probing), timeout=timeout)

    async def _probe(self, machine: str, endpoint: str) -> None:
        from sharedllm.relay import parse_endpoint

        host, port = parse_endpoint(endpoint)
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3.0)
            writer.close()
            ok = True
        except (OSError, asyncio.TimeoutError):
            ok = False
        if not ok:
            logger.warning("machine %s: its relay %s does not accept connections from the scheduler; clients go "
                           "through the relay hub", machine, endpoint)
        self._probes[machine] = (endpoint, ok, time.monotonic())
        self._in_flight.discard(machine)

    def state(self) -> dict:
        stats = self.stats or {}
        return {"address": self.address or f"{self.host or '(scheduler host)'}:{self.port}", "port": self.port,
                "separate": bool(self.address), "machines": stats.get("machines", {}),
                "refused": stats.get("refused", {}), "forwarded": stats.get("forwarded", 0),
                "restarts": self.process.restarts if self.process else 0,
                "pid": self.process.pid if self.process else None}
