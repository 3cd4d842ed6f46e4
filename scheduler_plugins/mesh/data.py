# SPDX-License-Identifier: AGPL-3.0-or-later
"""What the mesh plugin knows and keeps, in one place: every room of the plugin (registry, planner, leases, guard,
persistence) is given this object and reads or changes only the fields declared here."""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sharedllm.scheduler_plugins.mesh.records import ActorRecord, Session, default_catalog
from sharedllm.scheduler_plugins.trust import Admission, RateLimiter, TrustRegistry
from sharedllm.scheduler_plugins.users import AuditLog, UserRegistry

if TYPE_CHECKING:
    from sharedllm.scheduler_plugins.hub import MeshHub


@dataclass(eq=False)
class MeshData:
    """The plugin's records. Live state (workers, actors, sessions) and the policy the state file keeps."""

    trust: TrustRegistry = field(default_factory=TrustRegistry)
    rate: RateLimiter = field(default_factory=RateLimiter)
    admission: Admission | None = None  # None: no cluster secret, any worker may join
    users: UserRegistry = field(default_factory=UserRegistry)  # who may use the user port, with which role
    audit: AuditLog = field(default_factory=AuditLog)  # every admin action, done or refused
    # machine -> its rpc-server actor (the worker holding it, its handle, its last state)
    actors: dict[str, ActorRecord] = field(default_factory=dict)
    known: dict[str, dict] = field(default_factory=dict)  # every machine ever seen (persisted), with its last report
    sessions: dict[str, Session] = field(default_factory=dict)
    ended: deque = field(default_factory=lambda: deque(maxlen=100))  # recently closed sessions, newest last
    tokens_total: int = 0
    # Draft tokens verified since the scheduler started, by outcome (speculative decoding: "accepted", "rejected")
    drafts_total: dict[str, float] = field(default_factory=lambda: {"accepted": 0.0, "rejected": 0.0})
    session_seq: int = 0
    draining: set[str] = field(default_factory=set)
    catalog: dict[str, dict] = field(default_factory=default_catalog)  # model name -> entry (url, sha256, size, ...)
    # machine -> {model file name: last session end}: weights its rpc-server's tensor cache likely holds
    warm: dict[str, dict[str, float]] = field(default_factory=dict)
    # Machine relay keys derive from it (random per scheduler run, or restored); it never leaves the scheduler.
    relay_master: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    lease_seq: int = 0  # orders lease changes pushed to the relays
    saved_hub_port: int = 0
    hub: MeshHub | None = None  # None: no relay hub (machines behind NAT cannot serve)

    def leased_machines(self, but: str | None = None) -> set[str]:
        """The machines some session holds (``but``: leaving that session out)."""
        return {m for sid, sess in self.sessions.items() if sid != but for m in sess.machines}

    def count_drafts(self, now: dict, before: dict | None) -> None:
        """Add a session's new draft tokens to ``drafts_total``: its engine's counts ``now`` less those of its last
        report (``before``); counts that went down come from a new engine (a recovery, a move), counted whole."""
        before = before or {}
        drafted, accepted = now.get("drafted", 0.0), now.get("accepted", 0.0)
        if drafted < before.get("drafted", 0.0) or accepted < before.get("accepted", 0.0):
            before = {}
        new_accepted = accepted - before.get("accepted", 0.0)
        self.drafts_total["accepted"] += new_accepted
        self.drafts_total["rejected"] += max(0.0, drafted - before.get("drafted", 0.0) - new_accepted)
