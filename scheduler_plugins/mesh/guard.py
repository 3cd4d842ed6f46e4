# SPDX-License-Identifier: AGPL-3.0-or-later
"""What keeps the mesh safe: the vouching secret checked at worker registration, the trust registry's bans, and the
per-client rate limits and bans.
"""

from __future__ import annotations

import logging
import math
import time

from sharedllm.errors import ClientBanned, MeshError, RateLimited

logger = logging.getLogger("sharedllm.scheduler")


class Guard:
    """Part of ``MeshPlugin``: admission of workers, trust and client limits."""

    def _check_rate(self, client: str, new_lease: bool = False) -> None:
        if client in self.rate.banned:
            raise ClientBanned(f"client {client} is banned from this mesh; its operator can lift the ban with "
                               f"`sharedllm clients unban {client}`")
        leases = sum(1 for x in self.sessions.values() if x.client == client)
        over = self.rate.check_request(client or "anonymous", leases=leases, new_lease=new_lease)
        if over:
            why, retry = over
            logger.warning("rate limit: %s", why)
            raise RateLimited(f"{why}; retry in {math.ceil(retry)}s", retry_after=retry)

    def _guard_registration(self, scheduler) -> None:
        # SchedulerPlugin.add_worker cannot refuse a worker; wrapping the handler can (see NOTES).
        original = scheduler.handlers["register-worker"]

        async def register_worker(comm, **msg):
            why = self.admission.check((msg.get("extra") or {}).get("sharedllm_auth"), msg.get("address", "?"))
            if why is None:
                return await original(comm, **msg)
            logger.warning("refused worker %s: %s", msg.get("address"), why)
            await comm.write({"status": "error", "message": f"SharedLLM refused this worker: {why}",
                              "time": time.time()})

        scheduler.handlers["register-worker"] = register_worker

    async def handle_challenge(self) -> dict:
        """A one-time nonce for a joining worker (``None`` when this scheduler checks no secret)."""
        return {"nonce": self.admission.challenge() if self.admission else None}

    async def handle_trust(self, action: str = "list", machine: str | None = None) -> dict:
        """Trust records: ``list``, ``ban`` or ``unban`` a machine. Banned machines are never placed."""
        if action in ("ban", "unban"):
            if not machine:
                raise MeshError(f"trust {action} needs a machine id")
            known = set(self.trust.records) | set(self.known) | set(self._workers_of)
            if machine not in known:  # a typo would ban nobody, or lift no ban, and say it did
                some = ", ".join(sorted(known)[:20]) + (", ..." if len(known) > 20 else "")
                raise MeshError(f"no machine {machine!r} in the mesh or its history (it knows {some or 'none'}); "
                                "check the id with `sharedllm trust list`")
            self.trust.set_banned(machine, action == "ban")
            logger.warning("machine %s %sned", machine, action)
            self.persist()
        elif action != "list":
            raise MeshError(f"unknown trust action {action!r}; use list, ban or unban")
        return {"machines": [r.to_dict() for r in sorted(self.trust.records.values(), key=lambda r: r.machine_id)]}

    async def handle_clients(self, action: str = "list", client: str | None = None) -> dict:
        """Clients: ``list`` (with their leases), ``ban`` or ``unban`` one. A banned client cannot lease."""
        if action in ("ban", "unban"):
            if not client:
                raise MeshError(f"clients {action} needs a client id")
            (self.rate.banned.add if action == "ban" else self.rate.banned.discard)(client)
            if action == "ban":
                for sid, sess in list(self.sessions.items()):
                    if sess.client == client:
                        self._close_session(sid, "failed: client banned")
            self.persist()
        elif action != "list":
            raise MeshError(f"unknown clients action {action!r}; use list, ban or unban")
        # Not Dask's own (fire-and-forget) nor the plugin's (it pins the actors): they use no model.
        internal = {"fire-and-forget", getattr(self._client, "id", None)}
        clients = sorted({*(c for c in self.scheduler.clients if c not in internal), *self.rate.banned})
        return {"clients": [{"client": c, "banned": c in self.rate.banned, "strikes": self.rate.strikes(c),
                             "sessions": [s for s, x in self.sessions.items() if x.client == c]} for c in clients]}
