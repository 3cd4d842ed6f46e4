# SPDX-License-Identifier: AGPL-3.0-or-later
"""The TLS relay in front of a machine's rpc-server (``python -m sharedllm.relay server``): its certificate, its start
(or the adoption of the one an earlier supervisor left running), its watch and restarts, the lease it admits, its
stop. Part of :class:`sharedllm.machine.server.RPCServerSupervisor`, which owns it."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sharedllm.dataplane import (
    ALIVE_FILE,
    RELAY_FILE,
    DataPlaneProcess,
    control_call,
    control_socket_path,
    process_runs,
    read_json,
    spawn_process,
    terminate,
    wait_ready_file,
)

if TYPE_CHECKING:
    from sharedllm.machine.server import RPCServerSupervisor

logger = logging.getLogger("sharedllm.machine")


class RelayKeeper:
    """Runs and watches the relay of ``server``'s machine (its key and hub come from the scheduler:
    :meth:`configure`)."""

    def __init__(self, server: RPCServerSupervisor):
        self.server = server
        self.key: bytes | None = None  # this machine's relay key, from the scheduler
        self.hub: tuple[str, bytes] | None = None  # the relay hub's endpoint and this machine's credential there
        self.lease: str | None = None
        self._lease_seq = -1
        self._proc: DataPlaneProcess | None = None
        self._watcher: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def ready_file(self) -> Path:
        return self.server.workdir / RELAY_FILE

    @property
    def control_path(self) -> Path:
        return control_socket_path(self.server.workdir)

    async def configure(self, key: bytes | None, hub: tuple[str, bytes] | None) -> None:
        """Take the scheduler's relay key and hub; a relay running with another key or at another hub is stopped (it
        would refuse every token of the new scheduler)."""
        if key is not None and key != self.key:
            if self.key is not None:
                await self.stop()
            self.key = key
        if key is not None and hub != self.hub:
            if self._proc is not None:
                await self.stop()  # registered at another hub, or with another credential
            self.hub = hub

    def _cert(self) -> tuple[str, str]:
        """The relay's certificate and key, made on first use. Clients pin the fingerprint the scheduler hands out
        with each lease, so a new certificate after a worker restart needs no one's attention."""
        from sharedllm import relay

        d = self.server.workdir / "relay"
        cert, key = d / "relay.pem", d / "relay-key.pem"
        if not (cert.exists() and key.exists()):
            host = self.server.config.relay_host
            hosts = [] if host in ("127.0.0.1", "localhost") else [host]
            cert_s, _key, _ca = relay.make_self_signed(d, [h.strip("[]") for h in hosts], days=3650)
            logger.info("made the relay certificate %s (%s)", cert_s, relay.cert_fingerprint(cert_s))
        return str(cert), str(key)

    async def ensure(self) -> None:
        """Start the relay in front of the ready server, if it is not running (needs the relay key)."""
        async with self._lock:
            await self._ensure_locked()

    def _adoptable(self, endpoint: str) -> dict | None:
        """The relay an earlier supervisor left running in front of ``endpoint`` with this relay key, if any."""
        info = read_json(self.ready_file)
        if not info or not process_runs(info.get("pid"), "sharedllm.relay") or info.get("target") != endpoint:
            return None
        if info.get("python") != sys.executable:  # another installation's relay: replaced
            return None
        hub = self.hub[0] if self.hub else None
        if info.get("hub") != hub or info.get("inbound", True) != self.server.config.inbound:
            return None  # registered at another hub, or listening where it should not (or the reverse)
        try:
            same_key = (self.server.workdir / "relay.key").read_text().strip() == self.key.hex()
        except OSError:
            return None
        return info if same_key else None

    async def _ensure_locked(self) -> None:
        from sharedllm import relay
        from sharedllm.security import write_private

        c = self.server.config
        endpoint = self.server.status.endpoint
        if not c.relay or self.server.stopping or endpoint is None:
            return
        if self.key is None:
            self.server.set_status(relay=None, reason="relay key not received from the scheduler yet")
            return
        if not c.inbound and self.hub is None:
            self.server.set_status(relay=None, reason="this machine takes no inbound connections (--no-inbound) and "
                                                      "the scheduler runs no relay hub; start the scheduler with a "
                                                      "hub (the default)")
            return
        proc = self._proc
        if proc is not None and not proc.exited and (self.server.status.relay or {}).get("target") == endpoint:
            return
        if proc is None and (info := self._adoptable(endpoint)) is not None:
            self._proc = DataPlaneProcess(info["pid"])
            answer = await self.control("status")
            if answer is not None:
                self.lease = answer.get("lease")
                self._record(info)
                logger.info("machine %s: adopted the running relay %s (pid %d), admitting lease %s",
                            c.machine_id, info["endpoint"], info["pid"], self.lease)
                return
            logger.warning("machine %s: the running relay (pid %d) does not answer on %s; replacing it",
                           c.machine_id, info["pid"], self.control_path)
        await self._stop_locked()
        stale = read_json(self.ready_file)  # an old relay (another key, another server): it must give up its port
        if stale and process_runs(stale.get("pid"), "sharedllm.relay"):
            await terminate(DataPlaneProcess(stale["pid"]))
        cert, key = self._cert()
        key_file = self.server.workdir / "relay.key"
        write_private(key_file, self.key.hex())
        self.ready_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "sharedllm.relay", "server",
               "--listen", relay.join_endpoint(c.relay_host, c.relay_port), "--target", endpoint,
               "--cert", cert, "--key", key, "--machine-id", c.machine_id, "--key-file", str(key_file),
               "--control-socket", str(self.control_path), "--ready-file", str(self.ready_file),
               "--alive-file", str(self.server.workdir / ALIVE_FILE), "--orphan-timeout", str(c.orphan_timeout)]
        if self.lease is not None:
            cmd += ["--lease", self.lease]
        if self.hub is not None:
            hub_file = self.server.workdir / "hub.key"
            write_private(hub_file, self.hub[1].hex())
            cmd += ["--hub", self.hub[0], "--hub-key-file", str(hub_file)]
            if not c.inbound:
                cmd.append("--no-inbound")
        proc = await spawn_process(cmd, self.server.workdir / "relay.log")
        info = await wait_ready_file(self.ready_file, proc, time.monotonic() + c.start_timeout)
        if info is None:
            await terminate(proc, grace=0)
            tail = self.server.log_tail(self.server.workdir / "relay.log")
            self.server.set_status(relay=None, reason=f"the relay did not start: {tail}")
            logger.warning("machine %s: the relay did not start: %s", c.machine_id, tail)
            return
        self._proc = proc
        if c.inbound:
            c.relay_port = int(info["endpoint"].rpartition(":")[2])  # restarts keep the port: clients keep it
        self._record(info)
        logger.info("relay of machine %s on %s (%s) in front of %s", c.machine_id, info["endpoint"],
                    info["fingerprint"], endpoint)

    def _record(self, info: dict) -> None:
        self.server.set_status(relay={"endpoint": info["endpoint"], "fingerprint": info["fingerprint"],
                                      "pid": info["pid"],
                         "target": info["target"], "lease": self.lease, "hub": info.get("hub"),
                         "inbound": info.get("inbound", True)}, reason=None)
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        while not self.server.stopping:
            proc = self._proc
            if proc is None:
                return
            code = await proc.wait()
            if self.server.stopping or proc is not self._proc:
                continue  # stopped on purpose, or replaced: watch the new one, if any
            logger.warning("machine %s: the relay exited with status %s: %s; restarting it",
                           self.server.config.machine_id,
                           code, self.server.log_tail(self.server.workdir / "relay.log"))
            self._proc = None
            self.server.set_status(relay=None)
            await asyncio.sleep(self.server.config.backoff)
            await self.ensure()

    async def control(self, command: str, timeout: float = 10.0) -> dict | None:
        """Send one command to the relay's control socket; its answer, or None when it cannot be reached."""
        return await control_call(self.control_path, command, timeout)

    async def _tell(self, lease: str | None) -> None:
        """Make the relay admit ``lease`` (None: nobody) and wait for its acknowledgement."""
        proc = self._proc
        if proc is None or proc.exited:
            return
        answer = await self.control(f"lease {lease or ''}")
        if answer is None or answer.get("lease") != lease:
            raise ConnectionError("the relay exited or did not acknowledge the lease change within 10s")
        if self.server.status.relay is not None:
            self.server.set_status(relay={**self.server.status.relay, "lease": lease})

    async def set_lease(self, lease: str | None, seq: int) -> dict:
        """Admit ``lease`` on this machine's relay (None: nobody); live connections of other leases are closed.

        ``seq`` orders the scheduler's lease changes: an older change arriving late is ignored."""
        async with self._lock:
            if seq < self._lease_seq:
                return self.server.status.to_dict()
            self._lease_seq, self.lease = seq, lease
            await self._tell(lease)
        return self.server.status.to_dict()

    async def stop(self) -> None:
        async with self._lock:
            await self._stop_locked()

    async def _stop_locked(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            await terminate(proc)
        if self.server.status.relay is not None:
            self.server.set_status(relay=None)

    def detach(self) -> None:
        """Stop watching the relay (it serves on, for the next supervisor)."""
        if self._watcher is not None:
            self._watcher.cancel()
