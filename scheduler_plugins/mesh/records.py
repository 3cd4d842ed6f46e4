# SPDX-License-Identifier: AGPL-3.0-or-later
"""The mesh plugin's records and constants: sessions, actors, catalog entries, and the handler wrapper that
answers expected refusals."""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sharedllm.errors import REFUSAL, MeshError, to_refusal

logger = logging.getLogger("sharedllm.scheduler")

EXTENSION = "sharedllm"
LEASE_TOKEN_TTL = 24 * 3600.0  # seconds; a token stops working earlier, when its lease ends (the relay checks)
LEASE_PUSH_TIMEOUT = 15.0  # seconds for the leased machines' relays to take a new lease
HEARTBEAT_LATE = 4.0  # seconds without a heartbeat that make a machine suspect (or 5 heartbeat intervals)
SWEEP_EVERY = 10  # reconciles, or heartbeat intervals if longer, between full scans when no worker came or went
RECLAIM_GRACE = 120.0  # seconds a session open when the scheduler died waits for its client to report again


def seq_of(session_id: str) -> int:
    """The sequence number in a session id (``s12-34567`` -> 12), 0 if it has none."""
    head = session_id.split("-", 1)[0]
    return int(head[1:]) if head[:1] == "s" and head[1:].isdigit() else 0


def answering_refusals(name: str, handler):
    """``handler`` for ``scheduler.handlers``, with the mesh's expected refusals (``MeshError``: a rate limit, a ban,
    a busy or too small mesh...) sent back as an answer the client raises again (``sharedllm.client``) instead of
    raised here, where Dask would log each one as an error with its traceback. Other exceptions are bugs and stay so.
    """

    @functools.wraps(handler)
    async def answer(*args, **kwargs):
        try:
            return await handler(*args, **kwargs)
        except MeshError as exc:
            logger.info("%s refused: %s: %s", name, type(exc).__name__, exc)
            return {REFUSAL: to_refusal(exc)}

    return answer


@dataclass
class ActorRecord:
    """The actor of one machine: which worker holds it, and its Dask future/handle."""

    worker: str
    key: str
    future: Any = None
    actor: Any = None
    state: dict | None = None
    created: float = field(default_factory=time.time)


def default_catalog() -> dict[str, dict]:
    """The catalog every mesh starts with (the test model, served from its PyPI package)."""
    from sharedllm.models import default_catalog as builtin

    return builtin()


def validate_catalog_entry(entry: dict) -> dict:
    """Check a catalog entry; raise ``MeshError`` naming the bad field."""
    import re

    name, url, sha = entry.get("name"), entry.get("url"), entry.get("sha256")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", name):
        raise MeshError(f"catalog entry needs a name of letters, digits and ._:- (got {name!r})")
    if not isinstance(url, str) or not url.startswith(("http://", "https://", "pypi://", "file://")):
        raise MeshError(f"catalog entry {name}: url must be http(s)://, file:// or pypi:// (got {url!r})")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise MeshError(f"catalog entry {name}: sha256 must be 64 lowercase hex digits (got {sha!r})")
    out = {"name": name, "url": url, "sha256": sha}
    for key, kind in (("size", int), ("layers", int), ("architecture", str), ("quantization", str)):
        v = entry.get(key)
        if v is not None and not isinstance(v, kind):
            raise MeshError(f"catalog entry {name}: {key} must be {kind.__name__} (got {v!r})")
        out[key] = v
    return out


@dataclass
class Session:
    """A model loaded by a client on some machines: what it holds and how fast it generates."""

    session_id: str
    client: str
    model: str
    topology: dict
    opened: float = field(default_factory=time.time)
    requests: int = 0
    tokens: int = 0
    seconds: float = 0.0  # time spent generating those tokens
    last_tok_s: float = 0.0
    last_ttft_ms: float | None = None
    last_report: float = field(default_factory=time.time)
    recoveries: int = 0  # engines this session's client rebuilt after losing a machine (reported by the client)
    history: deque = field(default_factory=lambda: deque(maxlen=600))  # (time, tokens/s)
    reclaim_by: float | None = None  # restored after a scheduler restart: closed unless its client reports by then
    reclaim_why: str = "the scheduler restarted"  # ... or why else it waits for its client
    # The client's engine, as last reported: sequences running and waiting, mean decode batch, parallel; and with a
    # drafter "draft": {drafter, drafted, accepted, steps, tokens} (speculative decoding since the engine started).
    load: dict = field(default_factory=dict)
    # A session that serves other users too (``sharedllm serve``): they may ask it to generate, each under their
    # own limits and bans, and their tokens are charged to them (``usage``), not to the session's owner.
    shared: bool = False

    @property
    def machines(self) -> list[str]:
        return list(dict.fromkeys(st["machine_id"] for st in self.topology.get("stages", [])))

    def to_dict(self) -> dict:
        return {
            "session_id": self.session_id, "client": self.client, "model": self.model, "topology": self.topology,
            "machines": self.machines, "opened": self.opened, "requests": self.requests, "tokens": self.tokens,
            "seconds": self.seconds, "last_tok_s": self.last_tok_s, "last_ttft_ms": self.last_ttft_ms,
            "last_report": self.last_report, "history": list(self.history), "recoveries": self.recoveries,
            "reclaiming": self.reclaim_by is not None, "load": dict(self.load), "shared": self.shared,
        }
