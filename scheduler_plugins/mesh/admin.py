# SPDX-License-Identifier: AGPL-3.0-or-later
"""The operator's operations on the mesh: the model catalog, machines' trust and bans, clients' bans, drains, the
mesh's users, and the audit trail of them all."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sharedllm.errors import MeshError
from sharedllm.scheduler_plugins.mesh.data import MeshData
from sharedllm.scheduler_plugins.mesh.records import validate_catalog_entry
from sharedllm.scheduler_plugins.mesh.registry import Registry
from sharedllm.scheduler_plugins.mesh.sessions import Leases

logger = logging.getLogger("sharedllm.scheduler")


class Admin:
    """Catalog changes, trust records and bans, client bans, drains; each change is persisted."""

    def __init__(self, data: MeshData, registry: Registry, leases: Leases, persist: Callable[[], None],
                 clients: Callable[[], list[str]], revoked: Callable[[str], None] = lambda name: None):
        self.data = data
        self.revoked = revoked  # a user's key was rotated or removed: their open connections end now
        self.registry = registry
        self.leases = leases
        self.persist = persist
        self.clients = clients  # the identities connected now (they use the mesh or may)

    async def handle_catalog(self, action: str = "list", entry: dict | None = None, name: str | None = None) -> dict:
        """The model catalog: ``action`` is ``list``, ``add`` (``entry``) or ``remove`` (``name``). Persisted."""
        catalog = self.data.catalog
        if action == "add":
            e = validate_catalog_entry(entry or {})
            catalog[e["name"]] = e
        elif action == "remove":
            if name not in catalog:
                raise MeshError(f"no model {name!r} in the catalog; `sharedllm models list` shows it")
            del catalog[name]
        elif action != "list":
            raise MeshError(f"unknown catalog action {action!r}; use list, add or remove")
        if action != "list":
            self.persist()
        return {"models": sorted(catalog.values(), key=lambda e: e["name"])}

    async def handle_drain(self, machine: str, undrain: bool = False) -> dict:
        """Stop new leases on ``machine`` (or allow them again); report the sessions still using it."""
        if undrain:
            self.data.draining.discard(machine)
            self.leases.released()
        else:
            self.data.draining.add(machine)
        using = [sid for sid, sess in self.data.sessions.items() if machine in sess.machines]
        return {"machine": machine, "draining": machine in self.data.draining, "sessions": using}

    async def handle_trust(self, action: str = "list", machine: str | None = None) -> dict:
        """Trust records: ``list``, ``ban`` or ``unban`` a machine. Banned machines are never placed."""
        trust = self.data.trust
        if action in ("ban", "unban"):
            if not machine:
                raise MeshError(f"trust {action} needs a machine id")
            known = set(trust.records) | set(self.data.known) | set(self.registry.machine_workers())
            if machine not in known:  # a typo would ban nobody, or lift no ban, and say it did
                some = ", ".join(sorted(known)[:20]) + (", ..." if len(known) > 20 else "")
                raise MeshError(f"no machine {machine!r} in the mesh or its history (it knows {some or 'none'}); "
                                "check the id with `sharedllm trust list`")
            trust.set_banned(machine, action == "ban")
            logger.warning("machine %s %sned", machine, action)
            self.persist()
        elif action != "list":
            raise MeshError(f"unknown trust action {action!r}; use list, ban or unban")
        return {"machines": [r.to_dict() for r in sorted(trust.records.values(), key=lambda r: r.machine_id)]}

    async def handle_users(self, action: str = "list", name: str | None = None, role: str = "user",
                           limits: dict | None = None) -> dict:
        """The mesh's users: ``list``; ``add`` a user (``role``, ``limits``: requests-per-minute, tokens-per-minute,
        max-leases of their own), ``rotate`` their key, ``grant`` a role, ``limit`` them, or ``remove`` them. ``add``
        and ``rotate`` answer the key, which is shown this once: the mesh keeps only what verifies it."""
        users = self.data.users
        out: dict = {}
        if action == "add":
            out["key"] = users.add(name, role, limits)
        elif action == "rotate":
            out["key"] = users.rotate(name)
            self.revoked(name)
        elif action == "grant":
            users.grant(name, role)
        elif action == "limit":
            users.set_limits(name, limits)
        elif action == "remove":
            users.remove(name)
            self.revoked(name)
            if name in self.data.rate.banned:
                self.data.rate.banned.discard(name)
        elif action != "list":
            raise MeshError(f"unknown users action {action!r}; use list, add, rotate, grant, limit or remove")
        if action != "list":
            self.apply_limits()
            logger.warning("users %s %s", action, name)
            self.persist()
        return {**out, "users": [u.public() for u in sorted(users.users.values(), key=lambda u: u.name)]}

    def apply_limits(self) -> None:
        """The rate limiter takes each user's own limits (a user without any takes the mesh's)."""
        from sharedllm.scheduler_plugins.trust import Limits

        rate = self.data.rate
        for name in list(rate.overrides):
            if name not in self.data.users.users:
                rate.set_limits(name, None)
        for user in self.data.users.users.values():
            if user.limits:
                base = rate.limits
                rate.set_limits(user.name, Limits(
                    requests_per_minute=user.limits.get("requests_per_minute", base.requests_per_minute),
                    tokens_per_minute=user.limits.get("tokens_per_minute", base.tokens_per_minute),
                    concurrent_leases=int(user.limits.get("concurrent_leases", base.concurrent_leases))))
            elif user.name in rate.overrides:
                rate.set_limits(user.name, None)

    async def handle_audit(self, limit: int = 100) -> dict:
        """The audit trail: the last ``limit`` admin actions (who, what, when, from where, done or refused)."""
        return {"entries": self.data.audit.recent(max(1, min(int(limit), 10_000)))}

    async def handle_clients(self, action: str = "list", client: str | None = None) -> dict:
        """Clients: ``list`` (with their leases), ``ban`` or ``unban`` one. A banned client cannot lease."""
        rate = self.data.rate
        if action in ("ban", "unban"):
            if not client:
                raise MeshError(f"clients {action} needs a client id")
            (rate.banned.add if action == "ban" else rate.banned.discard)(client)
            if action == "ban":
                for sid, sess in list(self.data.sessions.items()):
                    if sess.client == client:
                        self.leases.close_session(sid, "failed: client banned")
            self.persist()
        elif action != "list":
            raise MeshError(f"unknown clients action {action!r}; use list, ban or unban")
        sessions = self.data.sessions
        clients = sorted({*self.clients(), *rate.banned})
        return {"clients": [{"client": c, "banned": c in rate.banned, "strikes": rate.strikes(c),
                             "sessions": [s for s, x in sessions.items() if x.client == c]} for c in clients]}
