# SPDX-License-Identifier: AGPL-3.0-or-later
"""The plugin itself: it holds the mesh's records (:class:`~.data.MeshData`) and its rooms, each given what it uses
(the registry of machines and actors, the planner, the leases, the guard, the operator's operations, the state file),
starts and stops them, and maps the scheduler's hooks and SharedLLM's operations onto them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from pathlib import Path

from distributed import SchedulerPlugin

from sharedllm.scheduler_plugins.mesh.admin import Admin
from sharedllm.scheduler_plugins.mesh.data import MeshData
from sharedllm.scheduler_plugins.mesh.guard import Guard
from sharedllm.scheduler_plugins.mesh.operations import Operation, Operations, admin_unless_read, changes
from sharedllm.scheduler_plugins.mesh.persistence import Persistence
from sharedllm.scheduler_plugins.mesh.planning import Planner
from sharedllm.scheduler_plugins.mesh.records import EXTENSION, Session, answering_refusals
from sharedllm.scheduler_plugins.mesh.registry import Registry
from sharedllm.scheduler_plugins.mesh.sessions import Leases
from sharedllm.scheduler_plugins.trust import Admission, Limits, RateLimiter
from sharedllm.scheduler_plugins.users import ANONYMOUS, Caller

logger = logging.getLogger("sharedllm.scheduler")


def _listen_host(scheduler) -> str:
    """The interface the scheduler listens on (``0.0.0.0`` when it cannot tell)."""
    from distributed.comm import get_address_host

    try:
        host = get_address_host(scheduler.listeners[0].listen_address)
    except (AttributeError, IndexError, ValueError):
        return "0.0.0.0"
    return host or "0.0.0.0"


class MeshPlugin(SchedulerPlugin):
    """Tracks machines and pins exactly one rpc-server actor per machine; serves SharedLLM's operations."""

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
        user_port: int | None = None,
        user_port_file: str | None = None,
        admin_key_file: str | None = None,
        allow_anonymous: bool = False,
        show_user_names: bool = False,
        connection_grace: float = 10.0,
    ):
        if reconcile_interval <= 0:
            raise ValueError(f"reconcile_interval must be positive, got {reconcile_interval}")
        if persist_interval <= 0:
            raise ValueError(f"persist_interval must be positive, got {persist_interval}")
        self.reconcile_interval = reconcile_interval
        self.actor_start_timeout = actor_start_timeout
        self.state_path = state_path
        self.persist_interval = persist_interval
        self.data = MeshData(rate=RateLimiter(limits), admission=Admission(secret) if secret else None)
        self.hub_config = hub  # None: no relay hub (machines behind NAT cannot serve); see scheduler_plugins.hub
        self.user_port_config = user_port  # None: no user port (users come through Dask: the operator's way only)
        self.user_port_file = user_port_file  # where the user port's address is written once it listens
        self.admin_key_file = admin_key_file or (f"{state_path}.admin.key" if state_path else None)
        self.allow_anonymous = allow_anonymous
        self.show_user_names = show_user_names  # the state shows non-admins the names of other users' sessions
        self.connection_grace = connection_grace  # seconds a dropped user connection's sessions wait for it
        self.ops = None
        self.user_port = None
        self.scheduler = None
        self.registry: Registry | None = None
        self.planner: Planner | None = None
        self.guard: Guard | None = None
        self.leases: Leases | None = None
        self.admin: Admin | None = None
        self.persistence: Persistence | None = None
        self._tasks: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._closing = False

    # --- what the dashboard, the metrics and the benchmarks read ----------------------------------------------------

    @property
    def sessions(self) -> dict[str, Session]:
        return self.data.sessions

    @property
    def tokens_total(self) -> int:
        return self.data.tokens_total

    @property
    def ended(self):
        return self.data.ended

    @property
    def hub(self):
        return self.data.hub

    def machines(self) -> list[dict]:
        return self.registry.machines()

    def persist(self) -> None:
        if self.persistence is not None:
            self.persistence.persist()

    def public_name(self, client: str) -> str:
        """A user as the unauthenticated HTTP side (the dashboard, ``/metrics``) shows them: by name where the
        operator allows it (``--show-user-names``), else by a pseudonym that stays the same for them."""
        if self.show_user_names or not client:
            return client or "?"
        return "user-" + hashlib.sha256(self.data.relay_master + client.encode()).hexdigest()[:8]

    # --- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        data = self.data
        self.registry = Registry(scheduler, data, reconcile_interval=self.reconcile_interval,
                                 actor_start_timeout=self.actor_start_timeout)
        self.persistence = Persistence(data, self.registry, self.state_path, self.persist_interval)
        self.planner = Planner(data, self.registry)
        self.guard = Guard(data, self.registry)
        self.leases = Leases(data, self.registry, self.planner, self.guard, self._background, self.persist)
        self.admin = Admin(data, self.registry, self.leases, self.persist, self._clients, self._revoked)
        self.registry.on_tick += [self.leases.expire_unreclaimed, self.guard.note_model_faults]
        self.ops = Operations(self.operations(), data.audit, self.persist)
        for name in self.ops.operations:
            scheduler.handlers[f"sharedllm_{name}"] = answering_refusals(f"sharedllm_{name}",
                                                                         self._dask_handler(name))
        scheduler.extensions[EXTENSION] = self
        if data.admission is not None:
            self.guard.guard_registration(scheduler)
        else:
            logger.warning("NO CLUSTER SECRET: any machine that reaches this scheduler can join the mesh and "
                           "receive model layers. Set SHAREDLLM_CLUSTER_SECRET (or --secret-file) on the scheduler "
                           "and the workers.")
        self.persistence.restore()
        self.admin.apply_limits()
        self._admin_credential()
        if self.user_port_config is not None:
            await self._start_user_port()
        if self.hub_config is not None:
            try:
                await self._start_hub()
            except Exception:  # the mesh serves on without it; only machines behind NAT cannot
                logger.exception("sharedllm: could not start the relay hub; machines started with --no-inbound "
                                 "cannot serve")
        self._task = asyncio.ensure_future(self.registry.run(lambda: self._closing, self.persistence.persist_if_due))
        logger.info("SharedLLM mesh plugin started")
        try:  # observability is optional: the mesh runs without its metrics and dashboard page
            from sharedllm.scheduler_plugins.metrics import install_metrics

            install_metrics(self)
            from sharedllm.scheduler_plugins.dashboard import install_dashboard

            install_dashboard(scheduler, self)  # no-op under --no-dashboard
        except Exception:
            logger.exception("sharedllm: could not install the metrics or the dashboard page")
        self._announce()

    def operations(self) -> dict[str, Operation]:
        """SharedLLM's operations by name (``sharedllm_<name>`` on the scheduler), with the role each needs."""
        leases, admin = self.leases, self.admin
        return {
            "whoami": Operation(self.handle_whoami, "user", takes_caller=True),
            "state": Operation(self.handle_state, "user", takes_caller=True),
            "plan": Operation(self.planner.handle_plan, "user"),
            "acquire": Operation(leases.handle_acquire, "user", takes_caller=True),
            "request": Operation(leases.handle_request, "user", takes_caller=True),
            "usage": Operation(leases.handle_usage, "user", takes_caller=True),
            "session_report": Operation(leases.handle_session_report, "user", takes_caller=True),
            "session_close": Operation(leases.handle_session_close, "user", takes_caller=True),
            "session_open": Operation(leases.handle_session_open, "admin", takes_caller=True, audited=True),
            "catalog": Operation(admin.handle_catalog, admin_unless_read, audited=changes, target="name"),
            "trust": Operation(admin.handle_trust, admin_unless_read, audited=changes, target="machine"),
            "clients": Operation(admin.handle_clients, "admin", audited=changes, target="client"),
            "drain": Operation(admin.handle_drain, "admin", audited=True, target="machine"),
            "users": Operation(admin.handle_users, "admin", audited=changes, target="name"),
            "audit": Operation(admin.handle_audit, "admin"),
            "challenge": Operation(self.guard.handle_challenge, "anyone"),
        }

    def _dask_handler(self, name: str):
        """Operation ``name`` as a Dask handler: the caller is the connection's, as the guard proved it (an
        operator's Dask client holds the admin credential; on a mesh without a cluster secret, Dask trusts every
        connection, and so does this)."""

        async def handler(comm=None, **kwargs):
            role = getattr(comm, "sharedllm_role", None) or "admin"
            who = getattr(comm, "sharedllm_name", None) or kwargs.get("client") or "dask"
            address = getattr(comm, "peer_address", "") or ""
            return await self.ops.call(Caller(who, role, via="dask", address=address), name, kwargs)

        return handler

    def _admin_credential(self) -> None:
        """The mesh's first admin, created with the mesh: a user ``admin`` whose key goes to ``admin_key_file``
        (readable by its owner only), said in the log; a key already in that file (provisioned ahead, as a
        deployment's secret) is taken as the admin's. A mesh that has an admin already keeps it."""
        from sharedllm.security import load_user_key, write_private

        users = self.data.users
        if users.admins():
            return
        path = Path(self.admin_key_file or Path.home() / ".config" / "sharedllm" / "admin.key").expanduser()
        if "admin" in users.users:
            users.remove("admin")
        provisioned = load_user_key(key_file=path) if path.is_file() else None
        if provisioned is not None:
            users.add("admin", "admin", key=provisioned)
            logger.warning("SharedLLM: the mesh's admin is the key provisioned in %s (user 'admin')", path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_private(path, users.add("admin", "admin") + "\n")
            logger.warning("SharedLLM: created the mesh's admin credential in %s (user 'admin'; keep it secret: "
                           "`sharedllm users add NAME` issues users their keys)", path)
        self.persist()

    async def _start_user_port(self) -> None:
        from sharedllm.scheduler_plugins.userport import UserPort, server_ssl_context

        self.user_port = UserPort(self.ops, self.data.users, host=_listen_host(self.scheduler),
                                  port=self.user_port_config, ssl_context=server_ssl_context(self.scheduler),
                                  allow_anonymous=self.allow_anonymous, on_closed=self._connection_closed,
                                  on_opened=self._connection_opened)
        await self.user_port.start()

    def _announce(self) -> None:
        """Write the user port's address to ``user_port_file``: the mesh plugin is up, every part of it."""
        import json

        from sharedllm.security import write_private

        if self.user_port_file and self.user_port is not None:
            write_private(self.user_port_file, json.dumps({"host": _listen_host(self.scheduler),
                                                           "port": self.user_port.port,
                                                           "tls": self.user_port.ssl_context is not None}))

    def _revoked(self, name: str) -> None:
        if self.user_port is not None:
            self.user_port.disconnect(name, f"user {name}'s key was removed or rotated; connect again with the new key")

    def _connection_opened(self, caller: Caller) -> None:
        if caller.role != ANONYMOUS:  # anonymous users share a name: none of them reclaims another's session
            self.leases.add_client(caller.name)

    def _connection_closed(self, caller: Caller, sessions: set[str]) -> None:
        if sessions:
            self.leases.connection_closed(caller, sessions, self.connection_grace)

    async def _start_hub(self) -> None:
        from sharedllm.scheduler_plugins.hub import MeshHub

        config = dict(self.hub_config)
        # The hub listens where the scheduler does: a scheduler on loopback (an embedded mesh) opens no other port to
        # the network; on every interface (0.0.0.0), the hub too.
        config.setdefault("listen", _listen_host(self.scheduler))
        saved = self.data.saved_hub_port
        if not config.get("port") and saved:
            config["port"] = saved  # where the machines behind NAT look for it after a restart
        workdir = f"{self.state_path}.hub" if self.state_path else None
        hub = MeshHub(config, self.data.relay_master, workdir)
        try:
            await hub.start()
        except (OSError, RuntimeError) as exc:
            if config.get("port") == saved and not self.hub_config.get("port"):
                logger.warning("%s; the relay hub takes another port", exc)
                hub = MeshHub({**config, "port": 0}, self.data.relay_master, workdir)
                await hub.start()
            else:
                raise
        self.data.hub = hub

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.persistence is not None:
                self.persistence.close()
        self._closing = True
        if self._task:
            self._task.cancel()
        # The machines' rpc-servers and relays are not stopped: their sessions go on while the scheduler restarts
        # (an upgrade), and their workers leave them to the next ones (sharedllm.dataplane).
        if self.registry is not None:
            self.registry.close()
        if self.data.hub is not None:
            await self.data.hub.close()
        if self.user_port is not None:
            await self.user_port.close()

    # --- the scheduler's hooks -------------------------------------------------------------------------------------

    def add_worker(self, scheduler=None, worker: str | None = None) -> None:
        if self.registry is not None:
            self.registry.add_worker(worker)

    def remove_worker(self, scheduler=None, worker: str | None = None, **kwargs) -> None:
        if self.registry is not None:
            self.registry.remove_worker(worker)

    def add_client(self, scheduler=None, client: str | None = None) -> None:
        if self.leases is not None:
            self.leases.add_client(client)

    def remove_client(self, scheduler=None, client: str | None = None) -> None:
        if self.leases is not None:
            self.leases.remove_client(client)

    def _clients(self) -> list[str]:
        """Who is connected now: the users on the user port, and Dask's clients but its own (fire-and-forget)."""
        users = [u for u, n in self.user_port.connected.items() if n > 0] if self.user_port else []
        return [*users, *(c for c in self.scheduler.clients if c != "fire-and-forget")]

    def _background(self, coro) -> asyncio.Task:
        """Run a call in the background, bounded to 30 s; its failure is only its own."""

        async def run():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(coro, 30)

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- the operations that need every room -----------------------------------------------------------------------

    async def handle_whoami(self, caller: Caller) -> dict:
        """Who this connection is, as the scheduler knows it."""
        return {"name": caller.name, "role": caller.role, "via": caller.via}

    async def handle_state(self, caller: Caller | None = None) -> dict:
        """The mesh: machines, sessions, history. A non-admin sees other users' sessions without their names,
        unless the operator shows them (``--show-user-names``)."""
        data = self.data
        sessions = [x.to_dict() for x in data.sessions.values()]
        if caller is not None and not caller.is_admin and not self.show_user_names:
            sessions = [s if s["client"] == caller.name else {**s, "client": "(another user)"} for s in sessions]
        return {
            "machines": self.registry.machines(),
            "sessions": sessions,
            "tokens_total": data.tokens_total,
            "known_machines": self.registry.offline_machines(),
            "recent_sessions": list(data.ended)[-20:],
            "draining": sorted(data.draining),
            "hub": data.hub.state() if data.hub else None,
            "user_port": self.user_port.state() if self.user_port else None,
            "time": time.time(),
        }
