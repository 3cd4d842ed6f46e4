# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: the scheduler plugin with 10 to 1,000 machines heartbeating, churning, and being placed on.

    .venv/bin/python bench/bench_scale.py [--sizes 10,100,1000] [--gpus 8] [--minutes 1] [--churn 3]
                                          [--placement-devices 10000] [--markdown] [--out bench/results/scale.json]

What runs for real, in this process: a ``distributed.Scheduler`` (inproc transport, no dashboard server) with
``MeshPlugin`` added the way ``sharedllm.scheduler``'s preload adds it (``start()`` runs: handlers, metrics). Each
simulated machine is one worker that registers through the scheduler's own ``register-worker`` handler over an inproc
comm (so ``Scheduler.add_worker``, and the plugin's ``add_worker`` hook, run as for a real worker), keeps that comm as
its batched stream, and leaves by closing it and awaiting the ``Scheduler.remove_worker`` that ``handle_worker`` runs
then (with the plugin's ``remove_worker``: a machine that dies). Its heartbeats call ``Scheduler.heartbeat_worker``, the
handler a real worker's ``heartbeat_worker`` RPC reaches, with the payload a real worker sends: the Dask part of
``metrics`` is taken from a real ``distributed.Worker``'s ``get_metrics()`` at start, the ``sharedllm`` part is built by
the classes ``MachineAgent.report`` uses (``MachineResources``/``GPUInfo.to_dict``, ``RPCServerState.to_dict`` plus
``stopped``, the build, labels, pid) for a machine of ``--gpus`` 80 GiB GPUs whose free memory, utilisation and
temperature move at every heartbeat. Every read is the real one: ``machines()``, ``sharedllm_state``,
``Planner.plan`` (trust filter, leases, ``device_slots``, ``placement.plan``), every component of the dashboard
page (their ``update()``, as the page's periodic callback calls it, and the page's first render), and the
``sharedllm_*`` series of ``/metrics`` (``prometheus_client.generate_latest`` over ``MeshCollector``).

What is simulated, and why that does not change what is measured:

- the rpc-server actor: ``Registry._pin`` is replaced by one that records an ``ActorRecord`` at once (the real one
  submits an actor task and starts llama.cpp processes: Dask's task path and subprocesses, not the plugin's per-machine
  bookkeeping); from then on the machine's heartbeats carry the ``ready`` state the real supervisor reports;
- time: every figure is CPU time of the event loop's thread (``time.thread_time``), which the other work on a shared
  machine does not inflate; the plugin's reconcile loop is stopped and driven on a virtual clock, one ``reconcile()``
  per ``reconcile_interval`` (0.5 s) plus one after each step with churn (the loop's wake-up on add/remove worker), with
  the heartbeats that fall in each step at Dask's own cadence (``heartbeat_interval(n)``: 0.5 s up to 10 workers,
  ``n / 200 + 1`` s from 200). A simulated minute so takes a few seconds, and the CPU of each call is its own
  (``time.thread_time``, the event loop's thread): the plugin's CPU per heartbeat is its reconcile and hook CPU over the
  minute divided by the heartbeats of that minute;
- churn: every minute ``--churn`` % of the machines leave (their comm closes) and as many join (half of them the
  machines that left, back with a new worker, half new machines), and ``--churn`` % of the ready rpc-servers restart
  (``restarting`` for a few heartbeats, then ``ready`` with one restart more);
- sessions: one per 20 machines, on 4 to 8 free GPUs each (planned by ``Planner.plan(free_only=True)``, as
  ``acquire`` does; the relay pushes are left out), with a minute of throughput reports, so the page's layer map,
  sessions and leases have rows.

Left out: the wire (msgpack of a heartbeat is Dask's cost; its size is in the table), the Bokeh server's diff of the
document to the browser, the state file (``--state-path``: off by default), TLS.

The placement rows time ``placement.plan`` alone over ``--placement-devices`` devices (machines of ``--gpus`` GPUs,
free memory spread over 40 to 80 GiB) for a 70B-class model, and ``Planner.plan`` through the plugin at the largest
size.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

logger = logging.getLogger("bench_scale")

GiB = 1 << 30
GPU_TOTAL = 80 * GiB
HEARTBEAT_FIELDS = ("resources", "rpc", "build", "labels")


# --- the simulated machines ------------------------------------------------------------------------------------------


def dask_metrics_template() -> dict:
    """The Dask part of a real worker's heartbeat ``metrics`` (a real ``distributed.Worker``'s ``get_metrics()``)."""

    async def capture() -> dict:
        from distributed import Scheduler, Worker

        async with Scheduler(protocol="inproc", dashboard=False) as s, \
                Worker(s.address, nthreads=1, dashboard=False) as w:
            m = await w.get_metrics()
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in m.items()}  # Counter -> dict, as on the wire

    return asyncio.run(capture()) if not _running_loop() else {}


def _running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SimMachine:
    """One machine of the fleet: its worker's registration and heartbeats, in the form a real worker sends them."""

    def __init__(self, machine_id: str, n_gpus: int, seed: int, address: str):
        self.machine_id = machine_id
        self.n_gpus = n_gpus
        self.rng = random.Random(seed)
        self.address = address
        self.comm = None
        self.pinned = False
        self.restarts = 0
        self.restarting = 0  # heartbeats left in "restarting"
        self.pid = 10_000 + seed
        host = address.split("://", 1)[1].rsplit(":", 1)[0]
        self.relay = {"endpoint": f"{host}:7000", "fingerprint": f"sha256:{seed:064x}"[:71], "pid": self.pid + 2,
                      "target": "127.0.0.1:50052", "lease": None}
        self._rpc: tuple | None = None
        self.base_used = [self.rng.randrange(1, 40) * GiB for _ in range(n_gpus)]

    def resources(self) -> dict:
        from sharedllm.resources import GPUInfo, MachineResources

        r = self.rng
        gpus = tuple(
            GPUInfo(i, "NVIDIA H100 80GB HBM3", f"GPU-{self.machine_id}-{i}", GPU_TOTAL,
                    GPU_TOTAL - (used := self.base_used[i] + r.randrange(0, 64) * (1 << 20)), used,
                    r.randrange(0, 100), r.randrange(30, 80))
            for i in range(self.n_gpus)
        )
        return MachineResources(self.machine_id, self.machine_id.split("-")[0], 64, 512 * GiB,
                                (400 + r.randrange(0, 50)) * GiB, gpus).to_dict()

    def rpc(self) -> dict | None:
        """What the machine's supervisor reports (``RPCServerSupervisor.report``), None before its actor exists."""
        if not self.pinned:
            return None
        key = (self.restarting > 0, self.restarts)
        if self._rpc is None or self._rpc[0] != key:  # asdict is slow: a new dict only when the state changes
            self._rpc = (key, self._rpc_state())
        return dict(self._rpc[1])

    def _rpc_state(self) -> dict:
        from sharedllm.machine.state import RPCServerState

        devices = [{"index": i, "name": f"CUDA{i}", "description": "NVIDIA H100 80GB HBM3", "kind": "gpu",
                    "memory_free": GPU_TOTAL - self.base_used[i], "memory_total": GPU_TOTAL}
                   for i in range(self.n_gpus)]
        state = "restarting" if self.restarting else "ready"
        d = RPCServerState(state=state, endpoint="127.0.0.1:50052", devices=devices, protocol="7.0.0",
                           pid=self.pid + 1, threads=64, restarts=self.restarts,
                           reason="rpc-server exited with -9" if self.restarting else None,
                           cache={"files": 12, "bytes": 40 * GiB, "cap": 100 * GiB},
                           relay=None if self.restarting else dict(self.relay), since=1_700_000_000.0).to_dict()
        d["stopped"] = []
        return d

    def report(self) -> dict:
        """``MachineAgent.report()``'s payload."""
        return {"machine_id": self.machine_id, "resources": self.resources(), "rpc": self.rpc(),
                "build": {"llama_cpp_python": "0.3.36", "rpc": True, "kernels": "0123456789abcdef"},
                "labels": {"region": "eu"}, "max_memory": {},
                "pid": self.pid}

    def metrics(self, template: dict) -> dict:
        m = copy.deepcopy(template)
        m["time"] = time.time()
        m["sharedllm"] = self.report()
        return m

    def registration(self, template: dict) -> dict:
        from distributed.versions import get_versions

        return dict(op="register-worker", reply=False, address=self.address, status="running", nthreads=64,
                    name=f"{self.machine_id}@{self.address}", now=time.time(), resources={}, memory_limit=500 * GiB,
                    local_directory="/tmp/dask-scratch-space/worker-sim", services={}, nanny=None, pid=self.pid,
                    versions=get_versions(), metrics=self.metrics(template), extra={"sharedllm": self.report()},
                    stimulus_id=f"worker-connect-{time.time()}", server_id=f"Worker-{self.address}")

    def heartbeat(self, template: dict) -> dict:
        """The keyword arguments of ``Scheduler.heartbeat_worker`` as ``Worker.heartbeat`` sends them."""
        if self.restarting:
            self.restarting -= 1
        return {"address": self.address, "now": time.time(), "metrics": self.metrics(template), "executing": {},
                "extensions": {}}


# --- the fleet on a real scheduler -----------------------------------------------------------------------------------


class CpuClock:
    """CPU seconds of this thread (the event loop's) spent in wrapped calls, per name."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.samples: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float) -> None:
        self.spent[name] = self.spent.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1
        self.samples.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.samples.get(name) or [0.0])

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.thread_time() - t0)

        return timed


class Fleet:
    """A real scheduler with ``MeshPlugin`` and a fleet of simulated machines on it."""

    def __init__(self, n_gpus: int = 8, template: dict | None = None, seed: int = 0):
        self.n_gpus = n_gpus
        self.template = template if template is not None else {}
        self.rng = random.Random(seed)
        self.machines: dict[str, SimMachine] = {}  # machine id -> machine, joined or away
        self.live: list[str] = []  # machine ids with a worker now
        self.clock = CpuClock()
        self.scheduler = None
        self.plugin = None
        self._seq = 0

    async def start(self) -> Fleet:
        from distributed import Scheduler

        from sharedllm.scheduler_plugins.mesh import MeshPlugin

        self.plugin = MeshPlugin(reconcile_interval=0.5)
        self.scheduler = Scheduler(protocol="inproc", dashboard=False)
        self.scheduler.add_plugin(self.plugin)  # as the preload does: start() runs when the scheduler starts
        await self.scheduler
        self.plugin._task.cancel()  # reconcile runs on the virtual clock (self.tick)
        with contextlib.suppress(asyncio.CancelledError):
            await self.plugin._task
        self.plugin.registry._pin = self._pin
        self._clock_hooks()
        return self

    def _clock_hooks(self) -> None:
        p = self.plugin
        p.add_worker = self.clock.wrap("add_worker", _unwrapped(p, "add_worker"))
        p.remove_worker = self.clock.wrap("remove_worker", _unwrapped(p, "remove_worker"))

    async def close(self) -> None:
        for mid in list(self.live):
            await self._leave(mid)
        await self.scheduler.close()

    async def _pin(self, machine: str, worker: str) -> None:
        """The actor appears at once (the real ``_pin`` submits it and starts the rpc-server)."""
        from sharedllm.scheduler_plugins.mesh import ActorRecord

        try:
            sim = self.machines[machine]
            if worker in self.scheduler.workers:
                sim.pinned = True
                self.plugin.data.actors[machine] = ActorRecord(worker=worker, key=f"sharedllm-rpc-{machine}",
                                                          state=sim.rpc())
        finally:
            self.plugin.registry.pending.pop(machine, None)

    def _address(self) -> str:
        self._seq += 1
        return f"tcp://10.{self._seq >> 16 & 255}.{self._seq >> 8 & 255}.{self._seq & 255}:{40000 + self._seq % 1000}"

    async def join(self, machine_id: str | None = None) -> SimMachine:
        """A machine's worker registers (``register-worker`` over an inproc comm, as ``Worker`` does)."""
        from distributed.comm import connect

        if machine_id is None:
            machine_id = f"node{len(self.machines):05d}-{self.rng.getrandbits(48):012x}"
        sim = self.machines.get(machine_id)
        if sim is None:
            sim = self.machines[machine_id] = SimMachine(machine_id, self.n_gpus, len(self.machines), self._address())
        else:
            sim.address, sim.pinned = self._address(), False
        comm = await connect(self.scheduler.address)
        await comm.write(sim.registration(self.template))
        reply = await comm.read()
        if reply.get("status") != "OK":
            raise RuntimeError(f"registration of {machine_id} refused: {reply}")
        sim.comm = comm
        self.live.append(machine_id)
        return sim

    async def _leave(self, machine_id: str) -> None:
        sim = self.machines[machine_id]
        self.live.remove(machine_id)
        await sim.comm.close()
        sim.comm = None
        # What handle_worker runs when it finds the stream closed, awaited here (its own call then finds it done).
        await self.scheduler.remove_worker(sim.address, stimulus_id=f"handle-worker-cleanup-{time.time()}")
        sim.pinned = False

    async def grow(self, n: int) -> None:
        while len(self.live) < n:
            await self.join()
        await self.reconcile()
        self.beat_all()

    async def reconcile(self) -> None:
        t0 = time.thread_time()
        await self.plugin.registry.reconcile()
        self.clock.add("reconcile", time.thread_time() - t0)
        await asyncio.gather(*self.plugin.registry.pending.values())  # the pins it started

    def beat(self, machine_id: str) -> None:
        kwargs = self.machines[machine_id].heartbeat(self.template)
        t0 = time.thread_time()
        reply = self.scheduler.heartbeat_worker(**kwargs)
        self.clock.add("heartbeat", time.thread_time() - t0)
        assert reply["status"] == "OK", reply

    def beat_all(self) -> None:
        for mid in self.live:
            self.beat(mid)

    async def run(self, minutes: float, churn: float, step: float = 0.5) -> dict:
        """Simulated ``minutes`` of heartbeats, churn and reconciles; the plugin's CPU over them."""
        from distributed.scheduler import heartbeat_interval

        self.clock = CpuClock()
        self._clock_hooks()
        n = len(self.live)
        steps = int(minutes * 60 / step)
        per_minute = max(1, round(n * churn / 100))
        events = [int(i * steps / (per_minute * minutes)) for i in range(int(per_minute * minutes))]
        away: list[str] = []
        beats = 0.0
        cursor = 0
        restarted = 0
        for k in range(steps):
            due = len(self.live) * step / heartbeat_interval(len(self.live))
            beats += due
            while beats >= 1:
                beats -= 1
                cursor = (cursor + 1) % len(self.live)
                self.beat(self.live[cursor])
            churned = False
            for _ in range(events.count(k)):
                churned = True
                leaving = self.rng.choice(self.live)
                await self._leave(leaving)
                away.append(leaving)
                back = away.pop(0) if self.rng.random() < 0.5 and len(away) > 1 else None
                sim = await self.join(back)
                self.beat(sim.machine_id)
                ready = [m for m in self.live if self.machines[m].pinned and not self.machines[m].restarting]
                if ready:  # an rpc-server restarts: a few heartbeats "restarting", then ready again
                    r = self.machines[self.rng.choice(ready)]
                    r.restarting, r.restarts = 3, r.restarts + 1
                    restarted += 1
            await self.reconcile()
            if churned:
                await self.reconcile()  # the loop's wake-up on add/remove worker
        spent, calls = self.clock.spent, self.clock.calls
        plugin_cpu = sum(spent.get(k, 0.0) for k in ("reconcile", "add_worker", "remove_worker"))
        heartbeats = calls.get("heartbeat", 0)
        return {
            "machines": n, "simulated_minutes": minutes, "heartbeats": heartbeats,
            "heartbeat_interval_s": heartbeat_interval(n), "left_and_joined": len(events), "restarted": restarted,
            "reconciles": calls.get("reconcile", 0),
            "heartbeat_handler_us": spent.get("heartbeat", 0.0) / max(heartbeats, 1) * 1e6,
            "reconcile_ms": spent.get("reconcile", 0.0) / max(calls.get("reconcile", 1), 1) * 1e3,
            "reconcile_median_ms": self.clock.median("reconcile") * 1e3,
            "heartbeat_handler_median_us": self.clock.median("heartbeat") * 1e6,
            "plugin_cpu_s": plugin_cpu,
            "plugin_us_per_heartbeat": plugin_cpu / max(heartbeats, 1) * 1e6,
            "plugin_cpu_per_s_ms": plugin_cpu / (minutes * 60) * 1e3,
        }

    async def open_sessions(self, estimate: dict, every: int = 20) -> int:
        """One session per ``every`` machines on 4 to 8 free GPUs, with a minute of throughput reports."""
        from sharedllm.scheduler_plugins.mesh import Session

        n = max(1, len(self.live) // every)
        now = time.time()
        for i in range(n):
            topo = self.plugin.planner.plan(estimate, free_only=True, max_devices=4 + i % 5)
            sid = f"s{i + 1}-{i:05d}"
            sess = Session(sid, f"Client-{i:04d}", "llama-70b-q4_k_m.gguf", topo)
            for t in range(30):
                sess.history.append((now - 60 + 2 * t, 20.0 + (t + i) % 7))
            sess.tokens, sess.requests, sess.last_tok_s, sess.last_report = 1200, 3, 22.0, now
            self.plugin.sessions[sid] = sess
        return n


def _unwrapped(plugin: Any, name: str) -> Callable:
    """The plugin's own hook (its class's method), without an earlier clock's wrapper."""
    return getattr(type(plugin), name).__get__(plugin)


# --- what is timed ---------------------------------------------------------------------------------------------------


def model_estimate(n_layer: int = 80) -> dict:
    """A 70B-class model in Q4_K_M at n_ctx 8192: about 40 GiB of weights and 2.5 GiB of KV cache."""
    from sharedllm.gguf import ModelEstimate

    return ModelEstimate(
        path="/models/llama-70b-q4_k_m.gguf", architecture="llama", n_layer=n_layer, n_ctx=8192,
        layer_weight_bytes=tuple(int(0.5 * GiB) + (i % 3) * (1 << 20) for i in range(n_layer)),
        layer_kv_bytes=(32 << 20,) * n_layer, output_bytes=int(1.1 * GiB), input_bytes=int(1.1 * GiB),
        compute_bytes=int(0.6 * GiB), file_bytes=42 * GiB,
    ).to_dict()


def timed(fn: Callable, repeat: int = 5) -> dict:
    """Median and best milliseconds of ``fn()`` over ``repeat`` calls, in CPU time of this thread: every call timed
    here is synchronous Python on the event loop's thread, so its CPU time is its time on an idle machine, and the
    other sessions sharing this machine's two cores do not inflate it."""
    out = []
    for _ in range(repeat):
        t0 = time.thread_time()
        fn()
        out.append((time.thread_time() - t0) * 1e3)
    return {"median_ms": statistics.median(out), "min_ms": min(out)}


def dashboard_timings(fleet: Fleet, repeat: int) -> dict:
    """Each component's ``update()`` (what the page's periodic callback runs each second, with fresh heartbeats
    in between), the sum of them (one tick of the page), and the page's first render."""
    from bokeh.document import Document

    from sharedllm.scheduler_plugins import dashboard

    comps = [cls(fleet.scheduler, sizing_mode="stretch_width") for cls in dashboard.COMPONENTS]
    for c in comps:
        c.update()
    per: dict[str, list[float]] = {type(c).__name__: [] for c in comps}
    for _ in range(repeat):
        fleet.beat_all()  # a second later every machine's figures moved
        for c in comps:
            t0 = time.thread_time()
            c.update()
            per[type(c).__name__].append((time.thread_time() - t0) * 1e3)
    out = {name: statistics.median(v) for name, v in per.items()}
    out["page_tick_ms"] = sum(out.values())
    extra = {"pages": [], "plots": []}
    out["first_render_ms"] = timed(lambda: dashboard.sharedllm_doc(fleet.scheduler, extra, Document()), 2)["median_ms"]
    return out


def metrics_timing(fleet: Fleet, repeat: int) -> dict:
    from prometheus_client import CollectorRegistry, generate_latest

    from sharedllm.scheduler_plugins.metrics import MeshCollector

    registry = CollectorRegistry()
    collector = MeshCollector()
    collector.track(fleet.plugin)
    registry.register(collector)
    body = generate_latest(registry)
    t = timed(lambda: generate_latest(registry), repeat)
    return {**t, "bytes": len(body)}


def placement_devices(n_devices: int, n_gpus: int, seed: int = 1) -> list:
    from sharedllm.placement import DeviceSlot

    rng = random.Random(seed)
    out = []
    for i in range(n_devices):
        m, d = divmod(i, n_gpus)
        free = rng.randrange(40, 80) * GiB
        out.append(DeviceSlot(f"node{m:05d}", f"10.{m >> 8 & 255}.{m & 255}.1:7000", d, f"CUDA{d}", free, GPU_TOTAL,
                              "gpu"))
    return out


def placement_timings(n_devices: int, n_gpus: int, repeat: int) -> list[dict]:
    from sharedllm.gguf import ModelEstimate
    from sharedllm.placement import plan

    devices = placement_devices(n_devices, n_gpus)
    est = ModelEstimate.from_dict(model_estimate())
    warm = {f"node{m:05d}" for m in range(0, n_devices // n_gpus, 97)}
    cases = [
        ("spread", {}),
        ("pack", {"strategy": "pack"}),
        ("max_devices=8", {"max_devices": 8}),
        ("pack, warm machines first", {"strategy": "pack", "prefer": warm}),
    ]
    rows = []
    for name, kwargs in cases:
        topo = plan(devices, est, **kwargs)
        t = timed(lambda kw=kwargs: plan(devices, est, **kw), repeat)
        rows.append({"case": name, "devices": n_devices, "stages": len(topo.stages), **t})
    return rows


async def measure(n: int, args: argparse.Namespace, template: dict) -> dict:
    fleet = await Fleet(args.gpus, template).start()
    try:
        t0 = time.perf_counter()
        await fleet.grow(n)
        grow_s = time.perf_counter() - t0
        est = model_estimate()
        sessions = await fleet.open_sessions(est)
        run = await fleet.run(args.minutes, args.churn)
        fleet.beat_all()
        p = fleet.plugin
        machines = p.machines()
        assert len(machines) == n, (len(machines), n)
        row = {**run, "sessions": sessions, "grow_s": grow_s,
               "ready": sum(m["rpc"]["state"] == "ready" for m in machines),
               "heartbeat_bytes": _msgpack_size(fleet.machines[fleet.live[0]].heartbeat(template))}
        row["machines_ms"] = timed(p.machines, args.repeat)
        row["state_ms"] = timed(lambda: _sync(p.handle_state()), args.repeat)
        row["dashboard"] = dashboard_timings(fleet, args.repeat)
        row["metrics"] = metrics_timing(fleet, args.repeat)
        row["plan_ms"] = timed(lambda: p.planner.plan(est), args.repeat)
        row["plan_devices"] = sum(len((m["rpc"] or {}).get("devices") or []) for m in machines
                                  if m["rpc"]["state"] == "ready")
        return row
    finally:
        await fleet.close()


def _sync(coro) -> Any:
    """Run a coroutine that never awaits anything pending (a handler that only reads state) to its end."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the handler awaited something")


def _msgpack_size(heartbeat: dict) -> int:
    from distributed.protocol import dumps

    return sum(len(f) for f in dumps({"op": "heartbeat_worker", **heartbeat}))


# --- main ------------------------------------------------------------------------------------------------------------


def table(result: dict, markdown: bool) -> str:
    from bench import common

    rows = [["machines", "heartbeat every", "Dask handler µs/hb", "plugin µs/hb", "plugin CPU ms/s", "reconcile ms",
             "machines() ms", "sharedllm_state ms", "page tick ms", "page first render ms", "/metrics ms",
             "_plan ms (devices)"]]
    for r in result["sizes"]:
        rows.append([str(r["machines"]), f"{r['heartbeat_interval_s']:g} s", f"{r['heartbeat_handler_us']:.0f}",
                     f"{r['plugin_us_per_heartbeat']:.1f}", f"{r['plugin_cpu_per_s_ms']:.2f}",
                     f"{r['reconcile_ms']:.2f}", f"{r['machines_ms']['median_ms']:.1f}",
                     f"{r['state_ms']['median_ms']:.1f}", f"{r['dashboard']['page_tick_ms']:.1f}",
                     f"{r['dashboard']['first_render_ms']:.0f}", f"{r['metrics']['median_ms']:.1f}",
                     f"{r['plan_ms']['median_ms']:.1f} ({r['plan_devices']})"])
    prow = [["placement.plan", "devices", "stages", "median ms", "best ms"]]
    for r in result["placement"]:
        prow.append([r["case"], str(r["devices"]), str(r["stages"]), f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}"])
    return common.render(rows, markdown) + "\n\n" + common.render(prow, markdown)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10,100,1000", help="machines, comma-separated (default 10,100,1000)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per machine (default 8)")
    p.add_argument("--minutes", type=float, default=1.0, help="simulated minutes of heartbeats and churn (default 1)")
    p.add_argument("--churn", type=float, default=3.0, help="percent of machines leaving (and joining) per minute")
    p.add_argument("--placement-devices", type=int, default=10_000, help="devices for the placement rows")
    p.add_argument("--repeat", type=int, default=5, help="timed calls per figure (median)")
    p.add_argument("--out", default="bench/results/scale.json", help="JSON results file")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--from-json", default=None, metavar="PATH", help="print the tables of an earlier results file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import distributed  # noqa: F401 (it sets its loggers' levels on import: quiet them after)

    for name in ("distributed", "sharedllm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.from_json:
        print(table(json.loads(Path(args.from_json).read_text()), args.markdown))
        return 0
    from bench import common

    t_start = time.perf_counter()
    template = dask_metrics_template()
    result: dict[str, Any] = {"command": " ".join(["bench/bench_scale.py", *(argv or sys.argv[1:])]),
                              "machine": common.machine_info(), "gpus_per_machine": args.gpus,
                              "churn_percent": args.churn, "sizes": [], "placement": []}
    for n in (int(x) for x in args.sizes.split(",")):
        logger.info("%d machines", n)
        row = asyncio.run(measure(n, args, template))
        logger.info("%d machines: %s", n, json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}))
        result["sizes"].append(row)
    result["placement"] = placement_timings(args.placement_devices, args.gpus, args.repeat)
    result["total_seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, args.markdown))
    logger.info("wrote %s (%.0f s in all)", out, result["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
