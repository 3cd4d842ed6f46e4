# SPDX-License-Identifier: AGPL-3.0-or-later
"""The registry of machines and their actors: which workers each machine has, one rpc-server actor per machine
(pinned, re-pinned when its worker leaves) and the reconcile loop that keeps it so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sharedllm.scheduler_plugins.mesh.actors import ActorChannel, ActorRef
from sharedllm.scheduler_plugins.mesh.data import MeshData
from sharedllm.scheduler_plugins.mesh.records import (
    EXTENSION,
    HEARTBEAT_LATE,
    SWEEP_EVERY,
    ActorRecord,
)

logger = logging.getLogger("sharedllm.scheduler")


class Registry:
    """The machines of the mesh, their workers, and exactly one actor per machine."""

    def __init__(self, scheduler, data: MeshData, *, reconcile_interval: float = 0.5,
                 actor_start_timeout: float = 90.0):
        self.scheduler = scheduler
        self.data = data
        self.reconcile_interval = reconcile_interval
        self.actor_start_timeout = actor_start_timeout
        self.channel = ActorChannel(scheduler)
        self.pending: dict[str, asyncio.Task] = {}  # machine -> its pin in progress
        self._generation = 0
        self.wake = asyncio.Event()
        self._dirty = True  # the next reconcile scans every worker (see reconcile)
        self._touched: set[str] = set()  # machines whose workers came or went since the last reconcile
        self._workers_of: dict[str, list[str]] = {}  # machine -> its live workers, oldest first (kept by the hooks)
        self._machine_of: dict[str, str] = {}  # worker -> its machine
        self._ticks = 0
        self.on_tick: list[Callable[[], None]] = []  # what else runs with every reconcile (expiries, fault notes)

    # --- workers coming and going (the plugin's hooks) -----------------------------------------------------------

    def add_worker(self, worker: str | None) -> None:
        # Do not pin actors here: the worker has not had its registration reply yet (see NOTES).
        rep = self.worker_report(worker) if worker else None
        if rep and rep.get("machine_id"):
            machine = rep["machine_id"]
            self._machine_of[worker] = machine
            self._workers_of.setdefault(machine, []).append(worker)
            self._touched.add(machine)
        else:
            self._dirty = True
        self.wake.set()

    def remove_worker(self, worker: str | None) -> None:
        self.channel.worker_left(worker)
        for machine, rec in list(self.data.actors.items()):
            if rec.worker == worker:
                logger.warning("worker %s holding the rpc-server actor of machine %s left", worker, machine)
                self.data.actors.pop(machine)
                self._touched.add(machine)  # its other workers, if any, take the actor at the next reconcile
        machine = self._machine_of.pop(worker, None)
        if machine is not None:
            rest = [w for w in self._workers_of.get(machine, []) if w != worker]
            if rest:
                self._workers_of[machine] = rest
            else:
                self._workers_of.pop(machine, None)
                self._touched.add(machine)
        self.wake.set()

    # --- what the machines report ----------------------------------------------------------------------------------

    def worker_report(self, addr: str) -> dict | None:
        """The latest sharedllm heartbeat payload of a worker (metrics), else its registration info."""
        ws = self.scheduler.workers.get(addr)
        if ws is None:
            return None
        return ws.metrics.get(EXTENSION) or ws.extra.get(EXTENSION)

    def relays(self) -> list[dict]:
        """Each machine with an actor and its rpc-server's state, as the hub's poll wants them (not ``machines()``:
        this runs every few seconds and must stay cheap with a thousand machines)."""
        out = []
        for machine, rec in self.data.actors.items():
            rpc = (self.worker_report(rec.worker) or {}).get("rpc")
            if rpc:
                out.append({"machine_id": machine, "rpc": rpc})
        return out

    def last_exit(self, machine: str) -> dict | None:
        """How the machine's last rpc-server process ended, as its actor reports."""
        rec = self.data.actors.get(machine)
        rep = self.worker_report(rec.worker) if rec else None
        return ((rep or {}).get("rpc") or {}).get("last_exit")

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
        hub = self.data.hub
        for machine, workers in sorted(self.machine_workers().items()):
            rec = self.data.actors.get(machine)
            holder = rec.worker if rec else None
            rep = self.worker_report(holder) if holder else None
            rep = rep or self.worker_report(workers[0])
            rpc = rep.get("rpc") if holder else None
            if rpc is None and rec is not None and rec.state:
                rpc = rec.state
            if rpc is None:
                rpc = {"state": "starting" if machine in self.pending else "stopped"}
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
                    "warm": sorted(self.data.warm.get(machine, {})),
                    "trust": self.data.trust.seen(machine, rep.get("labels") or {}).to_dict(),
                    "heartbeat_age": now - max(self.scheduler.workers[w].last_seen for w in workers),
                    "heartbeat_limit": limit,
                    "reach": hub.reach(machine, rpc) if hub else "direct",
                }
            )
        return out

    def offline_machines(self) -> list[dict]:
        """Machines seen before (this run or a previous one, from the state file) that have no live worker."""
        live = set(self.machine_workers())
        return [
            {"machine_id": mid, "first_seen": rec.get("first_seen"), "last_seen": rec.get("last_seen"),
             "build": rec.get("build")}
            for mid, rec in sorted(self.data.known.items()) if mid not in live
        ]

    # --- one actor per machine ---------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make sure every machine with a live worker has exactly one actor, and none lingers elsewhere.

        Called every ``reconcile_interval`` and at once when a worker comes or goes. Machines whose workers came or
        went (``_touched``) are settled at once; the scan of every worker and actor runs every ``SWEEP_EVERY`` calls,
        or at the next call after a pin failed (``_dirty``). So a heartbeat costs the plugin about the same with 10
        machines as with 1,000, churn included (``bench/bench_scale.py``)."""
        from distributed.scheduler import heartbeat_interval

        self._ticks += 1
        for job in self.on_tick:
            job()
        # Dask spaces heartbeats out as the cluster grows (0.5 s up to 10 workers, 6 s at 1,000); the sweeps follow
        # (every SWEEP_EVERY heartbeat intervals at the least), so they cost the same per heartbeat at any size.
        beat = heartbeat_interval(len(self.scheduler.workers))
        hub = self.data.hub
        if hub is not None and hub.due(beat):
            await hub.poll(self.relays())
        sweep_every = max(SWEEP_EVERY, round(SWEEP_EVERY * beat / self.reconcile_interval))
        if self._dirty or self._ticks % sweep_every == 0:
            self._dirty = False
            self._touched.clear()
            by_machine = self._workers_of = self.machine_workers()
            self._machine_of = {w: m for m, ws in by_machine.items() for w in ws}
            self._settle(by_machine, set(self.data.actors) | set(by_machine))
        elif self._touched:
            touched, self._touched = self._touched, set()
            live = self.scheduler.workers
            self._settle({m: ws for m in touched if (ws := [w for w in self._workers_of.get(m, []) if w in live])},
                         touched)

    def _settle(self, by_machine: dict[str, list[str]], machines: set[str]) -> None:
        """Give each of ``machines`` with a live worker (``by_machine``) one actor, and drop the actors of the rest."""
        for machine in machines:
            rec = self.data.actors.get(machine)
            if rec is not None and (machine not in by_machine or rec.worker not in self.scheduler.workers):
                self.data.actors.pop(machine)
            if machine in by_machine and machine not in self.data.actors and machine not in self.pending:
                self.pending[machine] = asyncio.ensure_future(self._pin(machine, by_machine[machine][0]))

    async def _pin(self, machine: str, worker: str) -> None:
        """Pin the machine's actor on ``worker`` and start its rpc-server and relay (with this machine's relay key,
        and the relay hub's address and credential)."""
        try:
            self._generation += 1
            actor = ActorRef(self.channel, worker, machine, timeout=self.actor_start_timeout)
            rec = ActorRecord(worker=worker, key=f"sharedllm-rpc-{machine}-{self._generation}", actor=actor)
            await actor.pin()
            if worker not in self.scheduler.workers:
                return
            self.data.actors[machine] = rec
            logger.info("pinned the rpc-server actor of machine %s on %s", machine, worker)
            from sharedllm.relay import machine_key

            key = machine_key(self.data.relay_master, machine).hex()
            hub = self.data.hub.for_machine(machine) if self.data.hub else None
            rec.state = await actor.start(relay_key=key, hub=hub)
            logger.info("machine %s: rpc-server %s %s", machine, rec.state.get("state"), rec.state.get("endpoint"))
        except Exception as exc:
            logger.warning("could not start the rpc-server actor of machine %s on %s: %s", machine, worker, exc)
            self._dirty = True  # try again at the next reconcile
        finally:
            self.pending.pop(machine, None)

    async def run(self, stopping: Callable[[], bool], also: Callable[[], None] | None = None) -> None:
        """The reconcile loop, until ``stopping()``; ``also`` runs after each reconcile (the state file)."""
        while not stopping():
            try:
                await self.reconcile()
                if also is not None:
                    also()
            except Exception:
                logger.exception("sharedllm: reconciling rpc-server actors failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.reconcile_interval)
            self.wake.clear()

    def close(self) -> None:
        for task in self.pending.values():
            task.cancel()
        self.data.actors.clear()
