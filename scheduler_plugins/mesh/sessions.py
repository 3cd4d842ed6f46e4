# SPDX-License-Identifier: AGPL-3.0-or-later
"""Sessions and leases: a client's model on some machines, leased atomically (a FIFO queue while they are busy), the
relays told of each lease, the clients' reports, and the end of a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from sharedllm.errors import MeshBusy, MeshError, NoMachines, NotAuthorized
from sharedllm.scheduler_plugins.mesh.data import MeshData
from sharedllm.scheduler_plugins.mesh.guard import Guard
from sharedllm.scheduler_plugins.mesh.planning import Planner
from sharedllm.scheduler_plugins.mesh.records import (
    LEASE_PUSH_TIMEOUT,
    LEASE_TOKEN_TTL,
    Session,
)
from sharedllm.scheduler_plugins.mesh.registry import Registry
from sharedllm.scheduler_plugins.users import Caller

logger = logging.getLogger("sharedllm.scheduler")


class Leases:
    """Sessions and their leases, the clients' reports, and the sessions a restarted scheduler waits for."""

    def __init__(self, data: MeshData, registry: Registry, planner: Planner, guard: Guard,
                 background: Callable[[Awaitable], asyncio.Task], persist: Callable[[], None]):
        self.data = data
        self.registry = registry
        self.planner = planner
        self.guard = guard
        self.background = background  # runs a call in the background (bounded, never raises)
        self.persist = persist
        self._waiters: deque[asyncio.Future] = deque()  # FIFO of sessions waiting for leased machines

    async def handle_session_open(self, model: str, topology: dict, client: str = "", caller: Caller | None = None
                                  ) -> dict:
        """Register a session on an explicit topology (leases its machines as they are)."""
        return await self._open_session(model, topology, _identity(caller, client))

    def _own(self, sess: Session, caller: Caller | None, client: str | None = None) -> None:
        """``NotAuthorized`` unless ``caller`` (or an operator's Dask client, naming its ``client``) holds ``sess``:
        a user acts on their own sessions only; an admin on any."""
        if caller is None or caller.is_admin:
            return
        if sess.client != caller.name:
            raise NotAuthorized(f"session {sess.session_id} is not yours ({caller.describe()}); act on your own "
                                "sessions")

    async def handle_session_report(
        self,
        session_id: str,
        tokens: int,
        seconds: float,
        ttft_ms: float | None = None,
        request_done: bool = False,
        recovered: bool = False,
        lost: str | None = None,
        requests: int = 0,
        client: str | None = None,
        load: dict | None = None,
        total_tokens: int | None = None,
        total_requests: int | None = None,
        caller: Caller | None = None,
    ) -> dict:
        """A client's statistics for its session: tokens and seconds since its last report, ``requests`` finished
        (or ``request_done`` for one), a recovery, the engine's ``load`` (sequences ``running`` and ``waiting``, mean
        decode ``batch``, ``parallel``). ``seconds`` is wall time: the throughput of a batch is its aggregate one.
        ``total_tokens``/``total_requests``: the client's totals for the session, which the counts never stay
        under (reports this scheduler took but had not saved before a kill are counted again this way).
        The first report after a scheduler restart reclaims a restored
        session (``client``: the client's id now, in case it had to connect anew)."""
        sess = self.data.sessions.get(session_id)
        if sess is None:
            return {"status": "unknown-session"}
        self._own(sess, caller)
        self.reclaim(sess, _identity(caller, client))
        sess.recoveries += int(recovered)
        if lost and not self.guard.aborted_on_model(lost):  # a model that crashed a machine is not the machine's fault
            self.data.trust.failed(lost)
        if not sess.shared:  # a shared session's users are charged their own tokens (``usage``)
            self.data.rate.charge_tokens(sess.client or "anonymous", tokens)
        now = time.time()
        sess.tokens += tokens
        sess.seconds += seconds
        sess.requests += requests + int(request_done)
        if isinstance(total_tokens, int) and total_tokens > sess.tokens:
            self.data.tokens_total += total_tokens - sess.tokens
            sess.tokens = total_tokens
        if isinstance(total_requests, int) and total_requests > sess.requests:
            sess.requests = total_requests
        if seconds > 0 and tokens > 0:
            sess.last_tok_s = tokens / seconds
            sess.history.append((now, sess.last_tok_s))
        if ttft_ms is not None:
            sess.last_ttft_ms = ttft_ms
        if isinstance(load, dict):
            previous = sess.load.get("draft")
            sess.load = {k: float(v) for k, v in load.items()
                         if k in ("running", "waiting", "batch", "passes_per_step", "parallel", "prompt_tokens",
                                  "cached_tokens")
                         and isinstance(v, (int, float))}
            if isinstance(draft := load.get("draft"), dict):
                sess.load["draft"] = _draft_counts(draft)
                self.data.count_drafts(sess.load["draft"], previous)
        sess.last_report = now
        self.data.tokens_total += tokens
        from sharedllm.scheduler_plugins.metrics import record_session_report

        record_session_report(self.data, session_id, ttft_ms, requests + int(request_done), recovered)  # never raises
        return {"status": "OK"}

    async def handle_session_close(self, session_id: str, reason: str = "closed", wait: bool = True,
                                   caller: Caller | None = None) -> dict:
        """End a session; answers once its machines' relays no longer admit its tokens (``wait=False``: at once, for
        a client that replaces a failed engine and must not wait on the relay of a machine that does not answer)."""
        if (sess := self.data.sessions.get(session_id)) is not None:
            self._own(sess, caller)
        revokes = self.close_session(session_id, reason)
        if revokes and wait:
            await asyncio.wait(revokes, timeout=LEASE_PUSH_TIMEOUT)
        return {"status": "OK" if revokes is not None else "unknown-session"}

    def close_session(self, session_id: str, reason: str) -> list[asyncio.Task] | None:
        """Close a session (None: unknown); returns the running calls that revoke its lease on the relays."""
        if session_id in self.data.sessions:
            self.guard.note_model_faults()  # while the session still holds its machines: a strike goes to its client
        sess = self.data.sessions.pop(session_id, None)
        if sess is None:
            return None
        revokes = []
        if reason == "closed" or reason.startswith("moved"):
            self.data.trust.served(sess.machines, sess.tokens)
        for machine in sess.machines:  # its weights went through this machine's tensor cache
            self.data.warm.setdefault(machine, {})[sess.model] = time.time()
        for machine in sess.machines:
            if not any(machine in other.machines for other in self.data.sessions.values()):
                revoke = self._push_lease(machine, None)  # the lease's tokens stop working, its connections close
                if revoke is not None:
                    revokes.append(self.background(revoke))
        if self.data.hub is not None:  # and its hub tokens at the hub
            revokes.append(self.background(self.data.hub.revoke(session_id)))
        for machine in sess.machines:  # the servers are idle now: a safe moment to trim their tensor caches
            rec = self.data.actors.get(machine)
            if rec is not None and rec.actor is not None:
                self.background(rec.actor.maintain_cache())
        self.data.ended.append({**sess.to_dict(), "closed": time.time(), "reason": reason})
        from sharedllm.scheduler_plugins.metrics import record_session_close

        record_session_close(self.data, session_id, reason)  # never raises
        logger.info("session %s closed (%s): %d tokens in %d requests", session_id, reason, sess.tokens, sess.requests)
        self.released()
        return revokes

    async def handle_acquire(
        self,
        estimate: dict,
        model: str = "",
        client: str = "",
        wait_timeout: float = 60.0,
        replaces: str | None = None,
        caller: Caller | None = None,
        shared: bool = False,
        **plan_kwargs,
    ) -> dict:
        """Plan over free machines and lease them to a new session, atomically. When the model would fit but the
        machines it needs are leased, wait in a FIFO queue for a release, up to ``wait_timeout`` seconds.

        ``replaces``: a session of the same client that the new one takes over (its machines count as free, it ends
        when the new one opens): how a client moves off machines that drain, with no gap in its lease.
        ``shared``: other users may ask the session to generate (a server's), each under their own limits.

        The session is ``caller``'s (the identity its connection proved); ``client`` counts only from an operator's
        Dask client."""
        client = _identity(caller, client)
        if replaces is not None and (self.data.sessions.get(replaces) or Session("", "", "", {})).client != client:
            raise MeshError(f"session {replaces} is not open for client {client}; load the model again")
        self.guard.check_rate(client, new_lease=replaces is None)
        await self.planner.settle()
        deadline = time.monotonic() + wait_timeout
        first = True
        err: Exception | None = None
        while True:
            if not (first and self._waiters):  # someone queued before us: keep FIFO order
                try:
                    topo = self.planner.plan(estimate, free_only=True, replaces=replaces, **plan_kwargs)
                except MeshError as exc:
                    err = exc
                    self.planner.plan(estimate, **plan_kwargs)  # raises when the model cannot fit even on an idle mesh
                else:
                    if replaces is not None:
                        self.close_session(replaces, "moved to other machines: its machines drain")
                    return await self._open_session(model, topo, client, shared)
            first = False
            left = deadline - time.monotonic()
            if left <= 0:
                busy = sorted(self.data.leased_machines() | self.data.draining)
                raise MeshBusy(
                    f"every machine that can hold {model or 'the model'} is busy "
                    f"({len(self.data.sessions)} session(s); "
                    f"in use or draining: {', '.join(busy) or 'none'}); waited {wait_timeout:.0f}s: retry later, "
                    f"raise wait_timeout, or add machines ({err})"
                )
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, left)
            except asyncio.TimeoutError:
                pass
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    async def handle_request(self, session_id: str, caller: Caller | None = None) -> dict:
        """Called by a client before each generation request: the per-client rate limits. ``draining``: machines of
        the session that drain, which the client should move off between two requests."""
        sess = self.data.sessions.get(session_id)
        if sess is None:
            raise MeshError(f"session {session_id} is not open (its lease expired?); load the model again")
        who = self._user(sess, caller)
        if who == sess.client:
            self.reclaim(sess, how="its client asked to generate")
        self.guard.check_rate(who)
        return {"status": "OK", "draining": [m for m in sess.machines if m in self.data.draining]}

    async def handle_usage(self, session_id: str, tokens: int = 0, caller: Caller | None = None) -> dict:
        """A user's tokens generated through a shared session (a server's): charged to that user's limits."""
        sess = self.data.sessions.get(session_id)
        if sess is None:
            return {"status": "unknown-session"}
        self.data.rate.charge_tokens(self._user(sess, caller), max(int(tokens), 0))
        return {"status": "OK"}

    def _user(self, sess: Session, caller: Caller | None) -> str:
        """Who a request on ``sess`` is for: the caller, on their own session or on a shared one (``NotAuthorized``
        on another user's session that is not shared); the session's owner for an operator's Dask client."""
        if caller is None or caller.via == "dask":
            return sess.client
        if not sess.shared:
            self._own(sess, caller)
        return caller.name

    async def _open_session(self, model: str, topology: dict, client: str, shared: bool = False) -> dict:
        self.data.session_seq += 1
        sid = f"s{self.data.session_seq}-{int(time.time() * 1000) % 100000:05d}"
        sess = Session(sid, client, model, topology, shared=bool(shared))
        self.data.sessions[sid] = sess  # the machines are leased from here on: no other acquire plans on them
        try:
            relays = await self._grant(sid, sess.machines)
        except MeshError:
            self.close_session(sid, "failed: a machine's relay did not take the lease")
            raise
        logger.info("session %s opened by %s: %s on %s", sid, client or "?", model, sess.machines)
        return {"session_id": sid, "topology": topology, "relays": relays}

    def _push_lease(self, machine: str, lease: str | None):
        """The actor call that makes ``machine``'s relay admit ``lease`` (None: nobody), or None without actor."""
        rec = self.data.actors.get(machine)
        if rec is None or rec.actor is None:
            return None
        self.data.lease_seq += 1
        return rec.actor.set_lease(lease, self.data.lease_seq)

    async def _grant(self, sid: str, machines: list[str]) -> dict[str, dict]:
        """Tell the leased machines' relays about lease ``sid``; one token per machine for the client.

        Machines serving RPC directly (``--insecure-direct-rpc``) get no token: the client connects to them as is."""
        from sharedllm.relay import machine_key, mint_token

        state = {m["machine_id"]: m for m in self.registry.machines()}
        relays: dict[str, dict] = {}
        pushes = []
        for machine in machines:
            rpc = (state.get(machine) or {}).get("rpc") or {}
            info = rpc.get("relay")
            if rpc.get("direct") or not info:
                continue
            call = self._push_lease(machine, sid)
            if call is None:
                raise NoMachines(f"machine {machine} has no rpc-server actor right now; retry in a moment")
            pushes.append((machine, call))
            relays[machine] = {
                "endpoint": info["endpoint"], "fingerprint": info["fingerprint"],
                "token": mint_token(machine_key(self.data.relay_master, machine), sid, machine, LEASE_TOKEN_TTL),
            }
            if self.data.hub is not None and info.get("hub"):  # registered at the hub: the way in, or the fallback
                relays[machine]["hub"] = self.data.hub.for_lease(sid, machine, LEASE_TOKEN_TTL)
                relays[machine]["via_hub"] = state[machine].get("reach") == "hub"
        if pushes:
            results = await asyncio.gather(*(asyncio.wait_for(c, LEASE_PUSH_TIMEOUT) for _, c in pushes),
                                           return_exceptions=True)
            failed = [f"{m} ({r!r})" for (m, _), r in zip(pushes, results, strict=True) if isinstance(r, BaseException)]
            if failed:
                logger.warning("session %s: relays did not take the lease: %s", sid, ", ".join(failed))
                raise NoMachines(f"the relay of {', '.join(failed)} did not take the lease; retry, or leave the "
                                 "machine out with machines=[...]")
        return relays

    @property
    def waiting(self) -> int:
        """Sessions queued for leased machines."""
        return len(self._waiters)

    def released(self) -> None:
        # Wake every waiter in FIFO order; each re-plans in turn and requeues if it still does not fit.
        for w in list(self._waiters):
            if not w.done():
                w.set_result(None)

    def reclaim(self, sess: Session, client: str | None = None, how: str = "reported") -> None:
        """A session waiting for its client (restored after a restart, or its connection closed) has it back
        (``client``: its id now, if it had to connect anew)."""
        if sess.reclaim_by is not None:
            sess.reclaim_by = None
            sess.client = client or sess.client
            logger.info("session %s reclaimed by its client %s (%s) after %s", sess.session_id, sess.client, how,
                        sess.reclaim_why)

    def add_client(self, client: str | None) -> None:
        """A client connected again with its identity: its restored sessions are its own again."""
        for sess in self.data.sessions.values():
            if client and sess.client == client:
                self.reclaim(sess, how="reconnected")

    def expire_unreclaimed(self) -> None:
        """Close the restored sessions whose client did not report within RECLAIM_GRACE."""
        now = time.time()
        for sid, sess in list(self.data.sessions.items()):
            if sess.reclaim_by is not None and now > sess.reclaim_by:
                self.close_session(sid, f"lease expired: its client did not come back after {sess.reclaim_why}")

    def connection_closed(self, caller: Caller, sessions: set[str], grace: float) -> None:
        """A user's connection ended with sessions it opened still open: they keep their lease for ``grace``
        seconds, for the user to come back (a reconnect, the scheduler's client reconnecting), then expire."""
        deadline = time.time() + grace
        for sid in sessions:
            sess = self.data.sessions.get(sid)
            if sess is not None and sess.client == caller.name and sess.reclaim_by is None:
                sess.reclaim_by = deadline
                sess.reclaim_why = "its connection closed"
                logger.info("session %s: the connection of %s that opened it closed; its lease ends in %.0fs unless "
                            "its client comes back", sid, caller.describe(), grace)

    def remove_client(self, client: str | None) -> None:
        """A client that disconnects (killed, or gone without closing its models) loses its leases."""
        for sid, sess in list(self.data.sessions.items()):
            if sess.client and sess.client == client:
                self.close_session(sid, "lease expired: client disconnected")


def _identity(caller: Caller | None, client: str | None) -> str:
    """Who a session belongs to: the caller the connection proved; an operator's Dask client may name its own id."""
    if caller is None or (caller.via == "dask" and client):
        return client or ""
    return caller.name


def _draft_counts(draft: dict) -> dict:
    """A report's speculative decoding counts, checked: numbers, and the drafter's name (short text)."""
    out: dict = {k: float(v) for k, v in draft.items()
                 if k in ("drafted", "accepted", "steps", "tokens") and isinstance(v, (int, float)) and v >= 0}
    out["drafter"] = str(draft.get("drafter") or "")[:64]
    return out
