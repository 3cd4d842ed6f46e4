# SPDX-License-Identifier: AGPL-3.0-or-later
"""What keeps the mesh safe as it runs: the vouching secret checked at worker registration, the per-client rate
limits and bans, and the strikes a client gets when its model makes an rpc-server abort.
"""

from __future__ import annotations

import logging
import math
import time

from sharedllm.errors import ClientBanned, RateLimited
from sharedllm.machine.state import model_fault
from sharedllm.scheduler_plugins.mesh.data import MeshData
from sharedllm.scheduler_plugins.mesh.registry import Registry

logger = logging.getLogger("sharedllm.scheduler")


class Guard:
    """Admission of workers, client limits, and model faults charged to the client whose model caused them."""

    def __init__(self, data: MeshData, registry: Registry):
        self.data = data
        self.registry = registry
        self._faults_noted: dict[str, int] = {}  # machine -> pid of its last rpc-server abort charged to a client

    def check_rate(self, client: str, new_lease: bool = False) -> None:
        """``ClientBanned`` or ``RateLimited`` (with its ``retry_after``) when ``client`` may not go on now."""
        rate = self.data.rate
        if client in rate.banned:
            raise ClientBanned(f"client {client} is banned from this mesh; its operator can lift the ban with "
                               f"`sharedllm clients unban {client}`")
        leases = sum(1 for x in self.data.sessions.values() if x.client == client)
        over = rate.check_request(client or "anonymous", leases=leases, new_lease=new_lease)
        if over:
            why, retry = over
            logger.warning("rate limit: %s", why)
            raise RateLimited(f"{why}; retry in {math.ceil(retry)}s", retry_after=retry)

    def guard_registration(self, scheduler) -> None:
        """Refuse workers that cannot prove the cluster secret. ``SchedulerPlugin.add_worker`` cannot refuse a
        worker; wrapping the handler can (see NOTES)."""
        original = scheduler.handlers["register-worker"]
        admission = self.data.admission

        async def register_worker(comm, **msg):
            why = admission.check((msg.get("extra") or {}).get("sharedllm_auth"), msg.get("address", "?"))
            if why is None:
                return await original(comm, **msg)
            logger.warning("refused worker %s: %s", msg.get("address"), why)
            await comm.write({"status": "error", "message": f"SharedLLM refused this worker: {why}",
                              "time": time.time()})

        scheduler.handlers["register-worker"] = register_worker

    async def handle_challenge(self) -> dict:
        """A one-time nonce for a joining worker (``None`` when this scheduler checks no secret)."""
        return {"nonce": self.data.admission.challenge() if self.data.admission else None}

    def note_model_faults(self) -> None:
        """A machine's rpc-server aborted on a ggml assertion (:func:`sharedllm.machine.state.model_fault`): the model
        its session ran did that, so the client of that session gets a strike (see ``RateLimiter.strike``); the
        machine is not blamed. Runs with every reconcile and before a session closes, once per abort."""
        for machine in self.data.actors:
            last = self.registry.last_exit(machine)
            if not last or self._faults_noted.get(machine) == last.get("pid"):
                continue
            assertion = model_fault(last)
            if assertion is None:
                continue
            self._faults_noted[machine] = last.get("pid")
            for sess in self.data.sessions.values():
                if machine in sess.machines:
                    client = sess.client or "anonymous"
                    n = self.data.rate.strike(client)
                    logger.warning("machine %s: rpc-server aborted under session %s (%s) of client %s: %s; the model "
                                   "is invalid, not the machine (%d strike(s) for the client in the last hour)",
                                   machine, sess.session_id, sess.model, client, assertion, n)

    def aborted_on_model(self, machine: str) -> bool:
        """Whether ``machine``'s last rpc-server exit was an abort on a model's assertion."""
        return model_fault(self.registry.last_exit(machine)) is not None
