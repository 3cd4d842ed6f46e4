# SPDX-License-Identifier: AGPL-3.0-or-later
"""The plugin itself: its state, start and close, and the handlers that need every part (state, catalog, drain)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque

from distributed import SchedulerPlugin

from sharedllm.errors import MeshError
from sharedllm.scheduler_plugins.mesh.guard import Guard
from sharedllm.scheduler_plugins.mesh.persistence import Persistence
from sharedllm.scheduler_plugins.mesh.planning import Planning
from sharedllm.scheduler_plugins.mesh.records import (
    EXTENSION,
    ActorRecord,
    Session,
    answering_refusals,
    default_catalog,
    validate_catalog_entry,
)
from sharedllm.scheduler_plugins.mesh.registry import Registry
from sharedllm.scheduler_plugins.mesh.sessions import Leases
from sharedllm.scheduler_plugins.trust import Admission, Limits, RateLimiter, TrustRegistry

logger = logging.getLogger("sharedllm.scheduler")


def _listen_host(scheduler) -> str:
    """The interface the scheduler listens on (``0.0.0.0`` when it cannot tell)."""
    from distributed.comm import get_address_host

    try:
        host = get_address_host(scheduler.listeners[0].listen_address)
    except (AttributeError, IndexError, ValueError):
        return "0.0.0.0"
    return host or "0.0.0.0"


class MeshPlugin(Registry, Leases, Planning, Guard, Persistence, SchedulerPlugin):
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
            scheduler.handlers[f"sharedllm_{name}"] = answering_refusals(f"sharedllm_{name}", handler)
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
        # The hub listens where the scheduler does: a scheduler on loopback (an embedded mesh) opens no other port to
        # the network; on every interface (0.0.0.0), the hub too.
        config.setdefault("listen", _listen_host(self.scheduler))
        if not config.get("port") and self._saved_hub_port:
            config["port"] = self._saved_hub_port  # where the machines behind NAT look for it after a restart
        workdir = f"{self.state_path}.hub" if self.state_path else None
        hub = MeshHub(config, self.relay_master, workdir)
        try:
            await hub.start()
        except (OSError, RuntimeError) as exc:
            if config.get("port") == self._saved_hub_port and not self.hub_config.get("port"):
                logger.warning("%s; the relay hub takes another port", exc)
                hub = MeshHub({**config, "port": 0}, self.relay_master, workdir)
                await hub.start()
            else:
                raise
        self.hub = hub

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
