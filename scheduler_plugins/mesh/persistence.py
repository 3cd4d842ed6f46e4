# SPDX-License-Identifier: AGPL-3.0-or-later
"""What outlives a scheduler restart: the registry, sessions, policy and keys saved to the state file and restored at
start (the sessions open at the crash wait for their clients to reclaim them: see ``Leases``).
"""

from __future__ import annotations

import logging
import time

from sharedllm.scheduler_plugins.mesh.data import MeshData
from sharedllm.scheduler_plugins.mesh.records import RECLAIM_GRACE, Session, seq_of
from sharedllm.scheduler_plugins.mesh.registry import Registry

logger = logging.getLogger("sharedllm.scheduler")


class Persistence:
    """The state file (``path``; None: nothing is kept)."""

    def __init__(self, data: MeshData, registry: Registry, path: str | None, interval: float = 5.0):
        self.data = data
        self.registry = registry
        self.path = path
        self.interval = interval
        self.store = None
        self._persisted_at = 0.0

    def restore(self) -> None:
        """Open the state file (migrating an older one) and take what it keeps."""
        from sharedllm.scheduler_plugins.state import StateStore

        if not self.path:
            return
        d = self.data
        self.store = StateStore(self.path)
        saved = self.store.load()
        policy = saved["policy"]
        d.known = saved["machines"]
        d.draining = set(policy.get("draining", []))
        d.catalog.update(policy.get("catalog", {}))
        d.trust.load(policy.get("trust", {}))
        d.warm = policy.get("warm", {})
        d.rate.banned = set(policy.get("banned_clients", []))
        d.users.load(policy.get("users", {}))  # a file of an earlier release has none: the admin is created at start
        d.audit.load(policy.get("audit", []))
        if policy.get("relay_master"):  # the same machine keys as before: the relays and the tokens out there hold
            d.relay_master = bytes.fromhex(policy["relay_master"])
        d.lease_seq = int(policy.get("lease_seq", 0))
        d.saved_hub_port = int(policy.get("hub_port") or 0)
        now = time.time()
        reclaiming = []
        for sess in saved["sessions"]:
            d.session_seq = max(d.session_seq, seq_of(sess["session_id"]))
            if sess["closed"] is not None:
                d.ended.append(sess)
            elif sess.get("topology"):
                # Open when the scheduler died: its machines may still serve it (their data plane outlives the
                # scheduler) and its client may still be generating. It keeps its lease until the client reports
                # again, or RECLAIM_GRACE passes.
                d.sessions[sess["session_id"]] = Session(
                    sess["session_id"], sess.get("client") or "", sess.get("model") or "", sess["topology"],
                    opened=sess.get("opened") or now, requests=sess.get("requests") or 0,
                    tokens=sess.get("tokens") or 0, recoveries=sess.get("recoveries") or 0,
                    reclaim_by=now + RECLAIM_GRACE, shared=bool(sess.get("shared")))
                reclaiming.append(sess["session_id"])
            else:  # a file of an older release keeps no topology: that session cannot go on
                sess.update(closed=now, reason="interrupted: the scheduler restarted")
                d.ended.append(sess)
        self.persist()
        logger.info("restored scheduler state from %s: %d machine(s) known, %d session(s) in history, %d waiting "
                    "to be reclaimed by their clients (%s)", self.path, len(d.known), len(saved["sessions"]),
                    len(reclaiming), ", ".join(reclaiming) or "none")

    def persist(self) -> None:
        """Write the registry to the state file (one transaction). Called periodically and on change."""
        if self.store is None:
            return
        d = self.data
        live = self.registry.machines()
        now = time.time()
        for m in live:
            first = d.known.get(m["machine_id"], {}).get("first_seen", now)
            d.known[m["machine_id"]] = {**m, "first_seen": first, "last_seen": now}
        sessions = [{**x.to_dict(), "closed": None, "reason": None} for x in d.sessions.values()]
        self.store.save(live, [*d.ended, *sessions], {"draining": sorted(d.draining), "catalog": d.catalog,
                                                       "trust": d.trust.to_dict(), "warm": d.warm,
                                                       "banned_clients": sorted(d.rate.banned),
                                                       "users": d.users.to_dict(), "audit": d.audit.to_list(),
                                                       "relay_master": d.relay_master.hex(),
                                                       "lease_seq": d.lease_seq,
                                                       "hub_port": d.hub.port if d.hub else None},
                        now=now)
        self._persisted_at = time.monotonic()

    def persist_if_due(self) -> None:
        """``persist`` every ``interval`` seconds (the reconcile loop calls it)."""
        if self.store is not None and time.monotonic() - self._persisted_at >= self.interval:
            self.persist()

    def close(self) -> None:
        if self.store is not None:
            self.persist()
            self.store.close()
