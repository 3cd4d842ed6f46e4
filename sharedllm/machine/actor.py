# SPDX-License-Identifier: AGPL-3.0-or-later
"""The per-machine actor: the scheduler plugin pins exactly one per machine, on one of its workers, and calls it to
start the machine's rpc-server and relay, to change the lease the relay admits, and to keep the tensor cache. Thin:
the supervisor (:mod:`.server`) does the work."""

from __future__ import annotations

import asyncio

from sharedllm.machine.server import RPCServerSupervisor


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
