# SPDX-License-Identifier: AGPL-3.0-or-later
"""The SharedLLM scheduler plugin: the registry of machines, one rpc-server actor per machine, and planning.

Installed by ``dask scheduler --preload sharedllm.scheduler``. Handlers, callable from any client as
``await client.scheduler.<name>(...)``:

- ``sharedllm_state()``: every machine with its workers, resources, rpc-server state and build;
- ``sharedllm_plan(estimate=..., ...)``: a topology for a model estimate, or ``ModelTooLarge`` / ``NoMachines``.

Actors are created through a client the plugin owns, so they belong to the scheduler side and outlive user clients.

The tunnel: the plugin holds a relay master key (random per scheduler run) and hands each machine's actor only that
machine's relay key. A lease (``sharedllm_acquire``) tells each leased machine's relay the new lease id before it
answers, and returns one token per machine (minted for that lease and machine), the relay's endpoint and its
certificate fingerprint. When the session ends, the relays admit nobody again and drop its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from distributed import SchedulerPlugin

from sharedllm.actor import model_fault, public_endpoint
from sharedllm.errors import REFUSAL, ClientBanned, MeshBusy, MeshError, NoMachines, RateLimited, to_refusal
from sharedllm.gguf import ModelEstimate
from sharedllm.placement import DeviceSlot, plan
from sharedllm.scheduler_plugins.trust import Admission, Limits, RateLimiter, TrustRegistry

logger = logging.getLogger("sharedllm.scheduler")

EXTENSION = "sharedllm"
LEASE_TOKEN_TTL = 24 * 3600.0  # seconds; a token stops working earlier, when its lease ends (the relay checks)
LEASE_PUSH_TIMEOUT = 15.0  # seconds for the leased machines' relays to take a new lease
HEARTBEAT_LATE = 4.0  # seconds without a heartbeat that make a machine suspect (or 5 heartbeat intervals)
SWEEP_EVERY = 10  # reconciles, or heartbeat intervals if longer, between full scans when no worker came or went
RECLAIM_GRACE = 120.0  # seconds a session open when the scheduler died waits for its client to report again


def _seq_of(session_id: str) -> int:
    """The sequence number in a session id (``s12-34567`` -> 12), 0 if it has none."""
    head = session_id.split("-", 1)[0]
    return int(head[1:]) if head[:1] == "s" and head[1:].isdigit() else 0


def _answering_refusals(name: str, handler):
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
    # The client's engine, as last reported: sequences running and waiting, mean decode batch, parallel.
    load: dict = field(default_factory=dict)

    @property
    def machines(self) -> list[str]:
        return list(dict.fromkeys(st["machine_id"] for st in self.topology.get("stages", [])))

    def to_dict(self) -> dict:
        return {
            "session_id": self.session_id, "client": self.client, "model": self.model, "topology": self.topology,
            "machines": self.machines, "opened": self.opened, "requests": self.requests, "tokens": self.tokens,
            "seconds": self.seconds, "last_tok_s": self.last_tok_s, "last_ttft_ms": self.last_ttft_ms,
            "last_report": self.last_report, "history": list(self.history), "recoveries": self.recoveries,
            "reclaiming": self.reclaim_by is not None, "load": dict(self.load),
        }


class MeshPlugin(SchedulerPlugin):
    """Tracks machines and pins exactly one ``RPCServerActor`` per machine."""

    name = "sharedllm-mesh"
    idempotent = True

    def __init__(
        self,
        reconcile_interval: float = 0.5,
        actor_start_timeout: float = 90.0,
        state_path: str | None = None,
        persist_interval: float = 5.0,
        secret: bytes | None = None,
        limits: Limits | None = None,
        hub: dict | None = None,
    ):
        if reconcile_interval <= 0:
            raise ValueError(f"reconcile_interval must be positive, got {reconcile_interval}")
        if persist_interval <= 0:
            raise ValueError(f"persist_interval must be positive, got {persist_interval}")
        self.reconcile_interval = reconcile_interval
        self.state_path = state_path
        self.persist_interval = persist_interval
        self.store = None
        self.known: dict[str, dict] = {}  # every machine ever seen (persisted), with its last report
        self._persisted_at = 0.0
        self.admission = Admission(secret) if secret else None
        self.trust = TrustRegistry()
        self.rate = RateLimiter(limits)
        self.actor_start_timeout = actor_start_timeout
        self.scheduler = None
        self.actors: dict[str, ActorRecord] = {}
        self._pending: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        self._client = None
        self._generation = 0
        self._wake: asyncio.Event | None = None
        self._dirty = True  # the next reconcile scans every worker (see reconcile)
        self._touched: set[str] = set()  # machines whose workers came or went since the last reconcile
        self._workers_of: dict[str, list[str]] = {}  # machine -> its live workers, oldest first (kept by the hooks)
        self._machine_of: dict[str, str] = {}  # worker -> its machine
        self._ticks = 0
        self._task: asyncio.Task | None = None
        self._closing = False
        self.sessions: dict[str, Session] = {}
        self.ended: deque[dict] = deque(maxlen=100)  # recently closed sessions, newest last
        self.tokens_total = 0
        self._session_seq = 0
        self._waiters: deque[asyncio.Future] = deque()  # FIFO of sessions waiting for leased machines
        self.draining: set[str] = set()
        self.catalog: dict[str, dict] = default_catalog()  # model name -> entry (url, sha256, size, ...)
        # machine -> {model file name: last session end}: weights its rpc-server's tensor cache likely holds
        self.warm: dict[str, dict[str, float]] = {}
        self.relay_master = secrets.token_bytes(32)  # machine relay keys derive from it; never leaves the scheduler
        self._lease_seq = 0  # orders lease changes pushed to the relays
        self._faults_noted: dict[str, int] = {}  # machine -> pid of its last rpc-server abort charged to a client
        self._saved_hub_port = 0
        self.hub_config = hub  # None: no relay hub (machines behind NAT cannot serve); see scheduler_plugins.hub
        self.hub = None

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        for name, handler in {
            "state": self.handle_state, "plan": self.handle_plan, "acquire": self.handle_acquire,
            "drain": self.handle_drain, "catalog": self.handle_catalog, "session_open": self.handle_session_open,
            "session_report": self.handle_session_report, "session_close": self.handle_session_close,
            "challenge": self.handle_challenge, "trust": self.handle_trust, "clients": self.handle_clients,
            "request": self.handle_request,
        }.items():
            scheduler.handlers[f"sharedllm_{name}"] = _answering_refusals(f"sharedllm_{name}", handler)
        scheduler.extensions[EXTENSION] = self
        if self.admission is not None:
            self._guard_registration(scheduler)
        else:
            logger.warning("NO CLUSTER SECRET: any machine that reaches this scheduler can join the mesh and "
                           "receive model layers. Set SHAREDLLM_CLUSTER_SECRET (or --secret-file) on the scheduler "
                           "and the workers.")
        self._wake = asyncio.Event()
        if self.state_path:
            self._restore()
        if self.hub_config is not None:
            try:
                await self._start_hub()
            except Exception:  # the mesh serves on without it; only machines behind NAT cannot
                logger.exception("sharedllm: could not start the relay hub; machines started with --no-inbound "
                                 "cannot serve")
        self._task = asyncio.ensure_future(self._reconcile_loop())
        logger.info("SharedLLM mesh plugin started")
        try:  # observability is optional: the mesh runs without its metrics and dashboard page
            from sharedllm.scheduler_plugins.metrics import install_metrics

            install_metrics(self)
            from sharedllm.scheduler_plugins.dashboard import install_dashboard

            install_dashboard(scheduler, self)  # no-op under --no-dashboard
        except Exception:
            logger.exception("sharedllm: could not install the metrics or the dashboard page")

    async def _start_hub(self) -> None:
        from sharedllm.scheduler_plugins.hub import MeshHub

        config = dict(self.hub_config)
        if not config.get("port") and self._saved_hub_port:
            config["port"] = self._saved_hub_port  # where the machines behind NAT look for it after a restart
        workdir = f"{self.state_path}.hub" if self.state_path else None
        hub = MeshHub(config, self.relay_master, workdir)
        try:
            await hub.start()
        except (OSError, RuntimeError) as exc:
            if config.get("port") == self._saved_hub_port and not self.hub_config.get("port"):
                logger.warning("%s; the relay hub takes another port", exc)
                hub = MeshHub(self.hub_config, self.relay_master, workdir)
                await hub.start()
            else:
                raise
        self.hub = hub

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
            self._session_seq = max(self._session_seq, _seq_of(sess["session_id"]))
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

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.persist()
            if self.store is not None:
                self.store.close()
        self._closing = True
        if self._task:
            self._task.cancel()
        for t in self._pending.values():
            t.cancel()
        # The machines' rpc-servers and relays are not stopped: their sessions go on while the scheduler restarts
        # (an upgrade), and their workers leave them to the next ones (sharedllm.dataplane).
        for rec in list(self.actors.values()):
            self._release(rec)
        self.actors.clear()
        if self.hub is not None:
            await self.hub.close()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close(timeout=5)

    def add_worker(self, scheduler=None, worker: str | None = None) -> None:
        # Do not create actors here: the worker has not had its registration reply yet (see NOTES).
        self._touch(worker)
        if self._wake:
            self._wake.set()

    def _touch(self, worker: str | None) -> None:
        """A worker joined: index it under its machine and settle that machine at the next reconcile (every machine,
        when its machine is not known)."""
        rep = self.worker_report(worker) if worker and self.scheduler is not None else None
        if rep and rep.get("machine_id"):
            machine = rep["machine_id"]
            self._machine_of[worker] = machine
            self._workers_of.setdefault(machine, []).append(worker)
            self._touched.add(machine)
        else:
            self._dirty = True

    def remove_worker(self, scheduler=None, worker: str | None = None, **kwargs) -> None:
        for machine, rec in list(self.actors.items()):
            if rec.worker == worker:
                logger.warning("worker %s holding the rpc-server actor of machine %s left", worker, machine)
                self.actors.pop(machine)
                self._release(rec)
                self._touched.add(machine)  # its other workers, if any, take the actor at the next reconcile
        machine = self._machine_of.pop(worker, None)
        if machine is not None:
            rest = [w for w in self._workers_of.get(machine, []) if w != worker]
            if rest:
                self._workers_of[machine] = rest
            else:
                self._workers_of.pop(machine, None)
                self._touched.add(machine)
        if self._wake:
            self._wake.set()

    # --- registry ----------------------------------------------------------------------------------------------

    def worker_report(self, addr: str) -> dict | None:
        """The latest sharedllm heartbeat payload of a worker (metrics), else its registration info."""
        ws = self.scheduler.workers.get(addr)
        if ws is None:
            return None
        return ws.metrics.get(EXTENSION) or ws.extra.get(EXTENSION)

    def _relays(self) -> list[dict]:
        """Each machine with an actor and its rpc-server's state, as the hub's poll wants them (not ``machines()``:
        this runs every few seconds and must stay cheap with a thousand machines)."""
        out = []
        for machine, rec in self.actors.items():
            rpc = (self.worker_report(rec.worker) or {}).get("rpc")
            if rpc:
                out.append({"machine_id": machine, "rpc": rpc})
        return out

    def machine_workers(self) -> dict[str, list[str]]:
        """machine id -> addresses of its live workers, oldest first."""
        out: dict[str, list[str]] = {}
        for addr in self.scheduler.workers:
            rep = self.worker_report(addr)
            if rep and rep.get("machine_id"):
                out.setdefault(rep["machine_id"], []).append(addr)
        return out

    def machines(self) -> list[dict]:
        """The mesh state: one record per machine. ``heartbeat_age``: seconds since the machine's latest heartbeat;
        beyond ``heartbeat_limit`` the machine is frozen or cut off (Dask forgets it only after its worker TTL)."""
        from distributed.metrics import time as dask_time
        from distributed.scheduler import heartbeat_interval

        now = dask_time()
        limit = max(HEARTBEAT_LATE, 5 * heartbeat_interval(len(self.scheduler.workers)))
        out = []
        for machine, workers in sorted(self.machine_workers().items()):
            rec = self.actors.get(machine)
            holder = rec.worker if rec else None
            rep = self.worker_report(holder) if holder else None
            rep = rep or self.worker_report(workers[0])
            rpc = rep.get("rpc") if holder else None
            if rpc is None and rec is not None and rec.state:
                rpc = rec.state
            if rpc is None:
                rpc = {"state": "starting" if machine in self._pending else "stopped"}
            out.append(
                {
                    "machine_id": machine,
                    "workers": workers,
                    "actor_worker": holder,
                    "actor_key": rec.key if rec else None,
                    "resources": rep.get("resources"),
                    "rpc": rpc,
                    "build": rep.get("build"),
                    "labels": rep.get("labels") or {},
                    "max_memory": rep.get("max_memory") or {},
                    "warm": sorted(self.warm.get(machine, {})),
                    "trust": self.trust.seen(machine, rep.get("labels") or {}).to_dict(),
                    "heartbeat_age": now - max(self.scheduler.workers[w].last_seen for w in workers),
                    "heartbeat_limit": limit,
                    "reach": self.hub.reach(machine, rpc) if self.hub else "direct",
                }
            )
        return out

    def offline_machines(self) -> list[dict]:
        """Machines seen before (this run or a previous one, from the state file) that have no live worker."""
        live = set(self.machine_workers())
        return [
            {"machine_id": mid, "first_seen": rec.get("first_seen"), "last_seen": rec.get("last_seen"),
             "build": rec.get("build")}
            for mid, rec in sorted(self.known.items()) if mid not in live
        ]

    # --- actors ------------------------------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while not self._closing:
            try:
                await self.reconcile()
                if self.store is not None and time.monotonic() - self._persisted_at >= self.persist_interval:
                    self.persist()
            except Exception:
                logger.exception("sharedllm: reconciling rpc-server actors failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.reconcile_interval)
            self._wake.clear()

    def _last_exit(self, machine: str) -> dict | None:
        rec = self.actors.get(machine)
        rep = self.worker_report(rec.worker) if rec else None
        return ((rep or {}).get("rpc") or {}).get("last_exit")

    def _note_model_faults(self) -> None:
        """A machine's rpc-server aborted on a ggml assertion (:func:`sharedllm.actor.model_fault`): the model its
        session ran did that, so the client of that session gets a strike (see ``RateLimiter.strike``); the machine
        is not blamed. Runs with every reconcile and before a session closes, once per abort."""
        for machine in self.actors:
            last = self._last_exit(machine)
            if not last or self._faults_noted.get(machine) == last.get("pid"):
                continue
            assertion = model_fault(last)
            if assertion is None:
                continue
            self._faults_noted[machine] = last.get("pid")
            for sess in self.sessions.values():
                if machine in sess.machines:
                    client = sess.client or "anonymous"
                    n = self.rate.strike(client)
                    logger.warning("machine %s: rpc-server aborted under session %s (%s) of client %s: %s; the model "
                                   "is invalid, not the machine (%d strike(s) for the client in the last hour)",
                                   machine, sess.session_id, sess.model, client, assertion, n)

    def _aborted_on_model(self, machine: str) -> bool:
        """Whether ``machine``'s last rpc-server exit was an abort on a model's assertion."""
        return model_fault(self._last_exit(machine)) is not None

    async def reconcile(self) -> None:
        """Make sure every machine with a live worker has exactly one actor, and none lingers elsewhere.

        Called every ``reconcile_interval`` and at once when a worker comes or goes. Machines whose workers came or
        went (``_touched``) are settled at once; the scan of every worker and actor runs every ``SWEEP_EVERY`` calls,
        or at the next call after a pin failed (``_dirty``). So a heartbeat costs the plugin about the same with 10
        machines as with 1,000, churn included (``bench/bench_scale.py``)."""
        from distributed.scheduler import heartbeat_interval

        self._ticks += 1
        self._expire_unreclaimed()
        # Dask spaces heartbeats out as the cluster grows (0.5 s up to 10 workers, 6 s at 1,000); the sweeps follow
        # (every SWEEP_EVERY heartbeat intervals at the least), so they cost the same per heartbeat at any size.
        beat = heartbeat_interval(len(self.scheduler.workers))
        if self.hub is not None and self.hub.due(beat):
            await self.hub.poll(self._relays())
        sweep_every = max(SWEEP_EVERY, round(SWEEP_EVERY * beat / self.reconcile_interval))
        if self._dirty or self._ticks % sweep_every == 0:
            self._dirty = False
            self._touched.clear()
            self._note_model_faults()
            by_machine = self._workers_of = self.machine_workers()
            self._machine_of = {w: m for m, ws in by_machine.items() for w in ws}
            self._settle(by_machine, set(self.actors) | set(by_machine))
        elif self._touched:
            touched, self._touched = self._touched, set()
            live = self.scheduler.workers
            self._settle({m: ws for m in touched if (ws := [w for w in self._workers_of.get(m, []) if w in live])},
                         touched)

    def _settle(self, by_machine: dict[str, list[str]], machines: set[str]) -> None:
        """Give each of ``machines`` with a live worker (``by_machine``) one actor, and drop the actors of the rest."""
        for machine in machines:
            rec = self.actors.get(machine)
            if rec is not None and (machine not in by_machine or rec.worker not in self.scheduler.workers):
                self.actors.pop(machine)
                self._release(rec)
            if machine in by_machine and machine not in self.actors and machine not in self._pending:
                self._pending[machine] = asyncio.ensure_future(self._pin(machine, by_machine[machine][0]))

    async def _get_client(self):
        if self._client is None:
            from distributed import Client

            self._client = await Client(
                self.scheduler.address, asynchronous=True, name="sharedllm-mesh", security=self._client_security()
            )
        return self._client

    def _client_security(self):
        # Dask TLS is mutual: our own client presents the scheduler's certificate (`dask scheduler --tls-cert`
        # only fills the scheduler's fields of Security).
        sec = getattr(self.scheduler, "security", None)
        if sec is None or not getattr(sec, "tls_scheduler_cert", None) or getattr(sec, "tls_client_cert", None):
            return sec
        from distributed.security import Security

        return Security(tls_ca_file=sec.tls_ca_file, tls_client_cert=sec.tls_scheduler_cert,
                        tls_client_key=sec.tls_scheduler_key, require_encryption=True)

    async def _pin(self, machine: str, worker: str) -> None:
        from sharedllm.actor import RPCServerActor

        try:
            client = await self._get_client()
            self._generation += 1
            key = f"sharedllm-rpc-{machine}-{self._generation}"
            fut = client.submit(
                RPCServerActor, machine, actor=True, workers=[worker], allow_other_workers=False, key=key, pure=False
            )
            rec = ActorRecord(worker=worker, key=key, future=fut)
            actor = await asyncio.wait_for(fut, self.actor_start_timeout)
            rec.actor = actor
            if worker not in self.scheduler.workers:
                self._release(rec)
                return
            self.actors[machine] = rec
            logger.info("pinned the rpc-server actor of machine %s on %s", machine, worker)
            from sharedllm.relay import machine_key

            key = machine_key(self.relay_master, machine).hex()
            hub = self.hub.for_machine(machine) if self.hub else None
            rec.state = await asyncio.wait_for(actor.start(relay_key=key, hub=hub), self.actor_start_timeout)
            logger.info("machine %s: rpc-server %s %s", machine, rec.state.get("state"), rec.state.get("endpoint"))
        except Exception as exc:
            logger.warning("could not start the rpc-server actor of machine %s on %s: %s", machine, worker, exc)
            self._dirty = True  # try again at the next reconcile
        finally:
            self._pending.pop(machine, None)

    def _background(self, coro) -> asyncio.Task:
        async def run():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(coro, 30)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _release(self, rec: ActorRecord) -> None:
        if rec.future is not None:
            with contextlib.suppress(Exception):
                rec.future.release()

    # --- handlers ----------------------------------------------------------------------------------------------

    async def handle_state(self) -> dict:
        return {
            "machines": self.machines(),
            "sessions": [x.to_dict() for x in self.sessions.values()],
            "tokens_total": self.tokens_total,
            "known_machines": self.offline_machines(),
            "recent_sessions": list(self.ended)[-20:],
            "draining": sorted(self.draining),
            "hub": self.hub.state() if self.hub else None,
            "time": time.time(),
        }

    # --- sessions ----------------------------------------------------------------------------------------------

    async def handle_session_open(self, model: str, topology: dict, client: str = "") -> dict:
        """Register a session on an explicit topology (leases its machines as they are)."""
        return await self._open_session(model, topology, client)

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
    ) -> dict:
        """A client's statistics for its session: tokens and seconds since its last report, ``requests`` finished
        (or ``request_done`` for one), a recovery, the engine's ``load`` (sequences ``running`` and ``waiting``, mean
        decode ``batch``, ``parallel``). ``seconds`` is wall time: the throughput of a batch is its aggregate one.
        ``total_tokens``/``total_requests``: the client's totals for the session, which the counts never stay
        under (reports this scheduler took but had not saved before a kill are counted again this way).
        The first report after a scheduler restart reclaims a restored
        session (``client``: the client's id now, in case it had to connect anew)."""
        sess = self.sessions.get(session_id)
        if sess is None:
            return {"status": "unknown-session"}
        self._reclaim(sess, client)
        sess.recoveries += int(recovered)
        if lost and not self._aborted_on_model(lost):  # a model that crashed the machine is not the machine's fault
            self.trust.failed(lost)
        self.rate.charge_tokens(sess.client or "anonymous", tokens)
        now = time.time()
        sess.tokens += tokens
        sess.seconds += seconds
        sess.requests += requests + int(request_done)
        if isinstance(total_tokens, int) and total_tokens > sess.tokens:
            self.tokens_total += total_tokens - sess.tokens
            sess.tokens = total_tokens
        if isinstance(total_requests, int) and total_requests > sess.requests:
            sess.requests = total_requests
        if seconds > 0 and tokens > 0:
            sess.last_tok_s = tokens / seconds
            sess.history.append((now, sess.last_tok_s))
        if ttft_ms is not None:
            sess.last_ttft_ms = ttft_ms
        if isinstance(load, dict):
            sess.load = {k: float(v) for k, v in load.items()
                         if k in ("running", "waiting", "batch", "passes_per_step", "parallel", "prompt_tokens",
                                  "cached_tokens")
                         and isinstance(v, (int, float))}
        sess.last_report = now
        self.tokens_total += tokens
        from sharedllm.scheduler_plugins.metrics import record_session_report

        record_session_report(self, session_id, ttft_ms, requests + int(request_done), recovered)  # never raises
        return {"status": "OK"}

    async def handle_session_close(self, session_id: str, reason: str = "closed", wait: bool = True) -> dict:
        """End a session; answers once its machines' relays no longer admit its tokens (``wait=False``: at once, for
        a client that replaces a failed engine and must not wait on the relay of a machine that does not answer)."""
        revokes = self._close_session(session_id, reason)
        if revokes and wait:
            await asyncio.wait(revokes, timeout=LEASE_PUSH_TIMEOUT)
        return {"status": "OK" if revokes is not None else "unknown-session"}

    def _close_session(self, session_id: str, reason: str) -> list[asyncio.Task] | None:
        """Close a session (None: unknown); returns the running calls that revoke its lease on the relays."""
        if session_id in self.sessions:
            self._note_model_faults()  # while the session still holds its machines: a strike goes to its client
        sess = self.sessions.pop(session_id, None)
        if sess is None:
            return None
        revokes = []
        if reason == "closed" or reason.startswith("moved"):
            self.trust.served(sess.machines, sess.tokens)
        for machine in sess.machines:  # its weights went through this machine's tensor cache
            self.warm.setdefault(machine, {})[sess.model] = time.time()
        for machine in sess.machines:
            if not any(machine in other.machines for other in self.sessions.values()):
                revoke = self._push_lease(machine, None)  # the lease's tokens stop working, its connections close
                if revoke is not None:
                    revokes.append(self._background(revoke))
        if self.hub is not None:  # and its hub tokens at the hub
            revokes.append(self._background(self.hub.revoke(session_id)))
        for machine in sess.machines:  # the servers are idle now: a safe moment to trim their tensor caches
            rec = self.actors.get(machine)
            if rec is not None and rec.actor is not None:
                self._background(rec.actor.maintain_cache())
        self.ended.append({**sess.to_dict(), "closed": time.time(), "reason": reason})
        from sharedllm.scheduler_plugins.metrics import record_session_close

        record_session_close(self, session_id, reason)  # never raises
        logger.info("session %s closed (%s): %d tokens in %d requests", session_id, reason, sess.tokens, sess.requests)
        self._released()
        return revokes

    def device_slots(self, machines: list[dict], build: dict | None = None) -> tuple[list[DeviceSlot], list[str]]:
        """Ready devices with fresh free memory, plus the reasons machines were left out."""
        slots: list[DeviceSlot] = []
        skipped: list[str] = []
        want_proto = (build or {}).get("rpc_protocol")
        reserved: dict[tuple[str, str], int] = {}  # (machine, device) -> bytes the open sessions' stages hold there
        if any(m.get("max_memory") for m in machines):
            from sharedllm.scheduler_plugins.metrics import session_stages

            sessions = ({"session_id": x.session_id, "model": x.model, "topology": x.topology}
                        for x in self.sessions.values())
            for st in session_stages(sessions):
                reserved[st.machine_id, st.device] = reserved.get((st.machine_id, st.device), 0) + st.bytes
        for m in machines:
            rpc, res = m["rpc"], m.get("resources") or {}
            if rpc.get("state") != "ready":
                why = f": {rpc['reason']}" if rpc.get("reason") else ""
                skipped.append(f"{m['machine_id']} (rpc-server {rpc.get('state')}{why})")
                continue
            if want_proto and rpc.get("protocol") and rpc["protocol"].split(".")[0] != want_proto.split(".")[0]:
                skipped.append(f"{m['machine_id']} (RPC protocol {rpc['protocol']}, client has {want_proto})")
                continue
            endpoint = public_endpoint(rpc)
            if not endpoint:
                why = f": {rpc['reason']}" if rpc.get("reason") else ""
                skipped.append(f"{m['machine_id']} (relay not running{why})")
                continue
            reach = m.get("reach", "direct")
            if reach == "none":
                skipped.append(f"{m['machine_id']} (takes no inbound connections and is not connected to the relay "
                               "hub now)")
                continue
            gpus = {f"CUDA{g['index']}": g for g in res.get("gpus", [])}
            for i, dev in enumerate(rpc.get("devices", [])):
                free, total = dev["memory_free"], dev["memory_total"]
                if dev["kind"] == "cpu" and res.get("ram_available"):
                    free, total = res["ram_available"], res["ram_total"]  # fresh, the server's figure is from its start
                elif dev["name"] in gpus:
                    free, total = gpus[dev["name"]]["memory_free"], gpus[dev["name"]]["memory_total"]
                cap = (m.get("max_memory") or {}).get(dev["name"]) or (m.get("max_memory") or {}).get("*")
                if cap:  # what the owner gives (--max-memory), less what open sessions hold there already
                    total = min(total, cap)
                    free = max(0, min(free, cap - reserved.get((m["machine_id"], dev["name"]), 0)))
                slots.append(DeviceSlot(m["machine_id"], endpoint, i, dev["name"], free, total,
                                        "cpu" if dev["kind"] == "cpu" else "gpu", via_hub=reach == "hub"))
        return slots, skipped

    def _plan(
        self,
        estimate: dict,
        strategy: str = "spread",
        headroom: float = 0.10,
        max_devices: int | None = None,
        machines: list[str] | None = None,
        exclude: list[str] | None = None,
        build: dict | None = None,
        free_only: bool = False,
        replaces: str | None = None,
        privacy: str = "any",
        min_trust: float | None = None,
        labels: dict | None = None,
    ) -> dict:
        """Plan over the ready machines (``free_only``: those no session leases and that are not draining).

        ``privacy="trusted"``, ``min_trust`` and ``labels`` restrict the machines; a request is never placed on a
        machine that does not qualify, and banned machines are never placed."""
        t0 = time.perf_counter()
        state = self.machines()
        skipped = []
        if machines:
            # A requested machine may be away for a moment (its worker restarting): leave it out, say so.
            skipped += [f"{mid} (not connected)" for mid in machines if mid not in {m["machine_id"] for m in state}]
            state = [m for m in state if m["machine_id"] in machines]
        skipped += [f"{m['machine_id']} (excluded)" for m in state if m["machine_id"] in (exclude or ())]
        state = [m for m in state if m["machine_id"] not in (exclude or ())]
        qualified = []
        for m in state:
            why = self.trust.qualifies(m["machine_id"], privacy, min_trust, labels)
            if not why and privacy == "trusted" and (m.get("rpc") or {}).get("direct"):
                why = "serves RPC without the tunnel (--insecure-direct-rpc)"
            if why:
                skipped.append(f"{m['machine_id']} ({why})")
            else:
                qualified.append(m)
        if state and not qualified:
            wanted = ", ".join(f"{k}={v}" for k, v in {"privacy": privacy, "min_trust": min_trust,
                                                          **(labels or {})}.items() if v not in (None, "any"))
            raise NoMachines(f"no machine qualifies for this request ({wanted or 'not banned'}): "
                             f"{', '.join(skipped)}; it is not placed elsewhere")
        state = qualified
        if free_only:
            leased = self.leased_machines(but=replaces)
            skipped += [f"{m['machine_id']} (leased)" for m in state if m["machine_id"] in leased]
            skipped += [f"{m['machine_id']} (draining)" for m in state if m["machine_id"] in self.draining]
            state = [m for m in state if m["machine_id"] not in leased and m["machine_id"] not in self.draining]
        slots, skipped_dev = self.device_slots(state, build)
        skipped += skipped_dev
        if not slots:
            why = f"; left out: {', '.join(skipped)}" if skipped else ""
            raise NoMachines(
                f"no machine in the mesh has a ready rpc-server ({len(state)} machine(s) usable{why}); start workers "
                "with `dask worker ADDR --preload sharedllm.worker` or wait for their rpc-servers"
            )
        est = ModelEstimate.from_dict(estimate)
        name = os.path.basename(est.path)
        warm = {m for m, models in self.warm.items() if name in models}
        topo = plan(slots, est, headroom=headroom, strategy=strategy, max_devices=max_devices, prefer=warm)
        d = topo.to_dict()
        d["planning_ms"] = (time.perf_counter() - t0) * 1000
        d["skipped"] = skipped
        return d

    async def handle_plan(self, estimate: dict, **kwargs) -> dict:
        """A topology over every ready machine, leased or not (a dry run: nothing is reserved)."""
        return self._plan(estimate, **kwargs)

    # --- leases ------------------------------------------------------------------------------------------------

    def leased_machines(self, but: str | None = None) -> set[str]:
        """The machines some session holds (``but``: leaving that session out)."""
        return {m for sid, sess in self.sessions.items() if sid != but for m in sess.machines}

    async def handle_acquire(
        self,
        estimate: dict,
        model: str = "",
        client: str = "",
        wait_timeout: float = 60.0,
        replaces: str | None = None,
        **plan_kwargs,
    ) -> dict:
        """Plan over free machines and lease them to a new session, atomically. When the model would fit but the
        machines it needs are leased, wait in a FIFO queue for a release, up to ``wait_timeout`` seconds.

        ``replaces``: a session of the same client that the new one takes over (its machines count as free, it ends
        when the new one opens): how a client moves off machines that drain, with no gap in its lease."""
        if replaces is not None and (self.sessions.get(replaces) or Session("", "", "", {})).client != client:
            raise MeshError(f"session {replaces} is not open for client {client}; load the model again")
        self._check_rate(client, new_lease=replaces is None)
        deadline = time.monotonic() + wait_timeout
        first = True
        err: Exception | None = None
        while True:
            if not (first and self._waiters):  # someone queued before us: keep FIFO order
                try:
                    topo = self._plan(estimate, free_only=True, replaces=replaces, **plan_kwargs)
                except MeshError as exc:
                    err = exc
                    self._plan(estimate, **plan_kwargs)  # raises when the model cannot fit even on an idle mesh
                else:
                    if replaces is not None:
                        self._close_session(replaces, "moved to other machines: its machines drain")
                    return await self._open_session(model, topo, client)
            first = False
            left = deadline - time.monotonic()
            if left <= 0:
                busy = sorted(self.leased_machines() | self.draining)
                raise MeshBusy(
                    f"every machine that can hold {model or 'the model'} is busy ({len(self.sessions)} session(s); "
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

    async def handle_request(self, session_id: str) -> dict:
        """Called by a client before each generation request: the per-client rate limits. ``draining``: machines of
        the session that drain, which the client should move off between two requests."""
        sess = self.sessions.get(session_id)
        if sess is None:
            raise MeshError(f"session {session_id} is not open (its lease expired?); load the model again")
        self._reclaim(sess)
        self._check_rate(sess.client)
        return {"status": "OK", "draining": [m for m in sess.machines if m in self.draining]}

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
        clients = sorted({*self.scheduler.clients, *self.rate.banned})
        return {"clients": [{"client": c, "banned": c in self.rate.banned, "strikes": self.rate.strikes(c),
                             "sessions": [s for s, x in self.sessions.items() if x.client == c]} for c in clients]}

    async def _open_session(self, model: str, topology: dict, client: str) -> dict:
        self._session_seq += 1
        sid = f"s{self._session_seq}-{int(time.time() * 1000) % 100000:05d}"
        sess = Session(sid, client, model, topology)
        self.sessions[sid] = sess  # the machines are leased from here on: no other acquire plans on them
        try:
            relays = await self._grant(sid, sess.machines)
        except MeshError:
            self._close_session(sid, "failed: a machine's relay did not take the lease")
            raise
        logger.info("session %s opened by %s: %s on %s", sid, client or "?", model, sess.machines)
        return {"session_id": sid, "topology": topology, "relays": relays}

    def _push_lease(self, machine: str, lease: str | None):
        """The actor call that makes ``machine``'s relay admit ``lease`` (None: nobody), or None without actor."""
        rec = self.actors.get(machine)
        if rec is None or rec.actor is None:
            return None
        self._lease_seq += 1
        return rec.actor.set_lease(lease, self._lease_seq)

    async def _grant(self, sid: str, machines: list[str]) -> dict[str, dict]:
        """Tell the leased machines' relays about lease ``sid``; one token per machine for the client.

        Machines serving RPC directly (``--insecure-direct-rpc``) get no token: the client connects to them as is."""
        from sharedllm.relay import machine_key, mint_token

        state = {m["machine_id"]: m for m in self.machines()}
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
                "token": mint_token(machine_key(self.relay_master, machine), sid, machine, LEASE_TOKEN_TTL),
            }
            if self.hub is not None and info.get("hub"):  # registered at the hub: the way in, or the fallback
                relays[machine]["hub"] = self.hub.for_lease(sid, machine, LEASE_TOKEN_TTL)
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

    def _released(self) -> None:
        # Wake every waiter in FIFO order; each re-plans in turn and requeues if it still does not fit.
        for w in list(self._waiters):
            if not w.done():
                w.set_result(None)

    def remove_client(self, scheduler=None, client: str | None = None) -> None:
        # A client that disconnects (killed, or gone without closing its models) loses its leases.
        for sid, sess in list(self.sessions.items()):
            if sess.client and sess.client == client:
                self._close_session(sid, "lease expired: client disconnected")

    async def handle_catalog(self, action: str = "list", entry: dict | None = None, name: str | None = None) -> dict:
        """The model catalog: ``action`` is ``list``, ``add`` (``entry``) or ``remove`` (``name``). Persisted."""
        if action == "list":
            return {"models": sorted(self.catalog.values(), key=lambda e: e["name"])}
        if action == "add":
            e = validate_catalog_entry(entry or {})
            self.catalog[e["name"]] = e
        elif action == "remove":
            if name not in self.catalog:
                raise MeshError(f"no model {name!r} in the catalog; `sharedllm models list` shows it")
            del self.catalog[name]
        else:
            raise MeshError(f"unknown catalog action {action!r}; use list, add or remove")
        self.persist()
        return {"models": sorted(self.catalog.values(), key=lambda e: e["name"])}

    async def handle_drain(self, machine: str, undrain: bool = False) -> dict:
        """Stop new leases on ``machine`` (or allow them again); report the sessions still using it."""
        if undrain:
            self.draining.discard(machine)
            self._released()
        else:
            self.draining.add(machine)
        using = [sid for sid, sess in self.sessions.items() if machine in sess.machines]
        return {"machine": machine, "draining": machine in self.draining, "sessions": using}
