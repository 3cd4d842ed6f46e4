# SPDX-License-Identifier: AGPL-3.0-or-later
"""What outlives a scheduler restart: the registry, sessions, policy and keys saved to the state file, restored at
start, and the sessions open at the crash reclaimed by their clients (or closed after ``RECLAIM_GRACE``).
"""

from __future__ import annotations

import logging
import time

from sharedllm.scheduler_plugins.mesh.records import (
    RECLAIM_GRACE,
    Session,
    seq_of,
)

logger = logging.getLogger("sharedllm.scheduler")


class Persistence:
    """Part of ``MeshPlugin``: the state file."""

    def _restore(self) -> None:
        from sharedllm.scheduler_plugins.state import StateStore

        self.store = StateStore(self.state_path)
        saved = self.store.load()
        policy = saved["policy"]
        self.known = saved["machines"]
        self.draining = set(policy.get("draining", []))
        self.catalog.update(policy.get("catalog", {}))
        self.trust.load(policy.get("trust", {}))
        self.warm = policy.get("warm", {})
        self.rate.banned = set(policy.get("banned_clients", []))
        if policy.get("relay_master"):  # the same machine keys as before: the relays and the tokens out there hold
            self.relay_master = bytes.fromhex(policy["relay_master"])
        self._lease_seq = int(policy.get("lease_seq", 0))
        self._saved_hub_port = int(policy.get("hub_port") or 0)
        now = time.time()
        reclaiming = []
        for sess in saved["sessions"]:
            self._session_seq = max(self._session_seq, seq_of(sess["session_id"]))
            if sess["closed"] is not None:
                self.ended.append(sess)
            elif sess.get("topology"):
                # Open when the scheduler died: its machines may still serve it (their data plane outlives the
                # scheduler) and its client may still be generating. It keeps its lease until the client reports
                # again, or RECLAIM_GRACE passes.
                self.sessions[sess["session_id"]] = Session(
                    sess["session_id"], sess.get("client") or "", sess.get("model") or "", sess["topology"],
                    opened=sess.get("opened") or now, requests=sess.get("requests") or 0,
                    tokens=sess.get("tokens") or 0, recoveries=sess.get("recoveries") or 0,
                    reclaim_by=now + RECLAIM_GRACE)
                reclaiming.append(sess["session_id"])
            else:  # a file of an older release keeps no topology: that session cannot go on
                sess.update(closed=now, reason="interrupted: the scheduler restarted")
                self.ended.append(sess)
        self.persist()
        logger.info("restored scheduler state from %s: %d machine(s) known, %d session(s) in history, %d waiting "
                    "to be reclaimed by their clients (%s)", self.state_path, len(self.known), len(saved["sessions"]),
                    len(reclaiming), ", ".join(reclaiming) or "none")

    def _reclaim(self, sess: Session, client: str | None = None, how: str = "reported") -> None:
        """A restored session's client is back (``client``: its id now, if it had to connect anew)."""
        if sess.reclaim_by is not None:
            sess.reclaim_by = None
            sess.client = client or sess.client
            logger.info("session %s reclaimed by its client %s (%s) after the scheduler restarted", sess.session_id,
                        sess.client, how)

    def add_client(self, scheduler=None, client: str | None = None) -> None:
        # A Dask client reconnects with its id: its restored sessions are its own again.
        for sess in self.sessions.values():
            if client and sess.client == client:
                self._reclaim(sess, how="reconnected")

    def _expire_unreclaimed(self) -> None:
        """Close the restored sessions whose client did not report within RECLAIM_GRACE."""
        now = time.time()
        for sid, sess in list(self.sessions.items()):
            if sess.reclaim_by is not None and now > sess.reclaim_by:
                self._close_session(sid, "lease expired: its client did not come back after the scheduler restarted")

    def persist(self) -> None:
        """Write the registry to the state file (one transaction). Called periodically and on close."""
        if self.store is None:
            return
        live = self.machines()
        now = time.time()
        for m in live:
            first = self.known.get(m["machine_id"], {}).get("first_seen", now)
            self.known[m["machine_id"]] = {**m, "first_seen": first, "last_seen": now}
        sessions = [{**x.to_dict(), "closed": None, "reason": None} for x in self.sessions.values()]
        self.store.save(live, [*self.ended, *sessions], {"draining": sorted(self.draining), "catalog": self.catalog,
                                                          "trust": self.trust.to_dict(), "warm": self.warm,
                                                          "banned_clients": sorted(self.rate.banned),
                                                          "relay_master": self.relay_master.hex(),
                                                          "lease_seq": self._lease_seq,
                                                          "hub_port": self.hub.port if self.hub else None},
                        now=now)
        self._persisted_at = time.monotonic()
