# SPDX-License-Identifier: AGPL-3.0-or-later
"""The registry of machines and their actors: which workers each machine has, one rpc-server actor per machine
(pinned, re-pinned when its worker leaves), the reconcile loop and the machines' rpc-server faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sharedllm.machine.state import model_fault
from sharedllm.scheduler_plugins.mesh.records import (
    EXTENSION,
    HEARTBEAT_LATE,
    SWEEP_EVERY,
    ActorRecord,
)

logger = logging.getLogger("sharedllm.scheduler")


class Registry:
    """Part of ``MeshPlugin``: machines, workers and actors."""

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
        """A machine's rpc-server aborted on a ggml assertion (:func:`sharedllm.machine.state.model_fault`): the model
        its session ran did that, so the client of that session gets a strike (see ``RateLimiter.strike``); the machine
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
        from sharedllm.machine.actor import RPCServerActor

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
