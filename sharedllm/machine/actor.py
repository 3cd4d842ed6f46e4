# SPDX-License-Identifier: AGPL-3.0-or-later
"""The per-machine actor: the scheduler plugin pins exactly one per machine, on one of its workers, and calls it to
start the machine's rpc-server and relay, to change the lease the relay admits, and to keep the tensor cache. Thin:
the supervisor (:mod:`.server`) does the work."""

from __future__ import annotations

import asyncio

from sharedllm.machine.server import RPCServerSupervisor

# The stream messages of actor calls: the scheduler's call (``call`` id, ``machine``, ``method``, ``kwargs``) and the
# worker's reply (``call``, ``ok``, ``result`` or ``error``); see sharedllm.scheduler_plugins.mesh.actors.
CALL, REPLY = "sharedllm-actor", "sharedllm-actor-reply"


class RPCServerActor:
    """The actor of one machine, pinned by the scheduler plugin on one of its workers (see
    :meth:`sharedllm.machine.agent.MachineAgent.on_actor_call`). Thin: the supervisor does the work."""

    METHODS = frozenset({"start", "set_lease", "stop", "status", "maintain_cache"})  # what the scheduler may call

    def __init__(self, machine_id: str, supervisor: RPCServerSupervisor, scheduler_host: str):
        self.machine_id = machine_id
        self.supervisor = supervisor
        self.scheduler_host = scheduler_host  # as this worker reaches it: the hub's host when it advertises none

    async def start(self, relay_key: str | None = None, hub: dict | None = None) -> dict:
        """Start (or keep) the rpc-server; ``relay_key`` (hex) is this machine's relay key from the scheduler, ``hub``
        its relay hub (``{"host": ..., "port": ..., "credential": hex}``; no host: the scheduler's host as this
        worker reaches it)."""
        key = bytes.fromhex(relay_key) if relay_key else None
        link = None
        if hub:
            from sharedllm.relay import join_endpoint

            host = hub.get("host") or self.scheduler_host
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
