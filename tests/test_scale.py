# SPDX-License-Identifier: AGPL-3.0-or-later
"""A thousand simulated machines on a real scheduler with ``MeshPlugin`` (``bench/bench_scale.py``'s ``Fleet``): the
registry lists every one of them with the fields real workers produce, placement over their 8,000 GPUs gives a valid
plan, the dashboard and ``/metrics`` read them, and churn (machines leaving, joining, rpc-servers restarting) shows.
No timing here: speed is the benchmark's business."""

from __future__ import annotations

import asyncio
from dataclasses import asdict

import pytest

from bench import bench_scale

N = 1000
GPUS = 8


@pytest.fixture(scope="module")
def template() -> dict:
    return bench_scale.dask_metrics_template()


def test_simulated_report_has_the_shape_of_a_real_one(tmp_path):
    from sharedllm.machine.agent import MachineAgent
    from sharedllm.machine.state import RPCServerConfig

    real = MachineAgent(None, "real-1", RPCServerConfig(), state_dir=tmp_path).report()
    sim = bench_scale.SimMachine("sim-1", GPUS, 1, "tcp://10.0.0.1:40001")
    fake = sim.report()
    assert fake.keys() == real.keys()
    assert fake["resources"].keys() == real["resources"].keys()
    assert fake["build"].keys() == real["build"].keys()
    assert fake["rpc"] is None  # no actor yet, as a real worker reports before its rpc-server starts
    sim.pinned = True
    assert len(sim.report()["rpc"]["devices"]) == GPUS and sim.report()["rpc"]["state"] == "ready"


def test_trust_record_dict_is_asdict():
    from sharedllm.scheduler_plugins.trust import TrustRecord

    rec = TrustRecord("m-1", sessions=6, tokens=12_345, failures=1, labels={"region": "eu", "nested": {"a": [1]}})
    assert rec.to_dict() == {**asdict(rec), "score": rec.score, "probation": rec.probation}
    assert rec.to_dict()["labels"]["nested"] is not rec.labels["nested"]  # a copy, as asdict makes


@pytest.mark.mesh
def test_a_thousand_machines_listed_placed_shown_and_churning(template):
    asyncio.run(_thousand(template))


async def _thousand(template: dict) -> None:
    from sharedllm.gguf import ModelEstimate
    from sharedllm.placement import Topology
    from sharedllm.scheduler_plugins import dashboard
    from sharedllm.views import device_memory

    fleet = await bench_scale.Fleet(GPUS, template).start()
    try:
        await fleet.grow(N)
        p = fleet.plugin
        machines = p.machines()
        assert [m["machine_id"] for m in machines] == sorted(fleet.live)
        for m in machines:
            sim = fleet.machines[m["machine_id"]]
            assert m["workers"] == [sim.address] and m["actor_worker"] == sim.address
            assert m["rpc"]["state"] == "ready" and len(m["rpc"]["devices"]) == GPUS
            assert len(m["resources"]["gpus"]) == GPUS and m["labels"] == {"region": "eu"}
            assert m["trust"]["machine_id"] == m["machine_id"] and m["trust"]["probation"]
            assert m["heartbeat_age"] < m["heartbeat_limit"]

        est = bench_scale.model_estimate()
        topo = Topology.from_dict(p.planner.plan(est))  # validates: contiguous, every slot once, no device twice
        assert topo.n_layer == ModelEstimate.from_dict(est).n_layer
        assert p.planner.plan(est, max_devices=8)["stages"].__len__() == 8
        sessions = await fleet.open_sessions(est, every=100)
        assert sessions == N // 100
        leased = p.data.leased_machines()
        free = Topology.from_dict(p.planner.plan(est, free_only=True))
        assert not set(free.machines) & leased

        # Churn: 30 machines leave, 30 join (15 of them back), 10 rpc-servers restart.
        gone = fleet.live[:30]
        for mid in gone:
            await fleet._leave(mid)
        back = [await fleet.join(mid) for mid in gone[:15]]
        new = [await fleet.join() for _ in range(15)]
        restarting = fleet.live[100:110]
        for mid in restarting:
            fleet.machines[mid].restarting = 5
        fleet.beat_all()
        states = {m["machine_id"]: m["rpc"]["state"] for m in p.machines()}
        assert len(states) == N and not set(gone[15:]) & states.keys()
        assert all(states[s.machine_id] == "stopped" for s in back + new)  # no actor yet
        assert all(states[m] == "restarting" for m in restarting)
        plan = p.planner.plan(est)
        assert sum("rpc-server restarting" in s for s in plan["skipped"]) == 10
        assert sum("rpc-server stopped" in s for s in plan["skipped"]) == 30
        await fleet.reconcile()
        fleet.beat_all()
        states = {m["machine_id"]: m["rpc"]["state"] for m in p.machines()}
        assert all(states[s.machine_id] == "ready" for s in back + new)
        assert all(p.data.actors[s.machine_id].worker == s.address for s in back + new)

        # What the page and /metrics show: a row per machine, the sessions' reservations.
        table = dashboard.MachineTable(fleet.scheduler)
        table.update()
        assert table.source.data["machine"] == sorted(fleet.live)
        counts = dict(zip(table.source.data["machine"], table.source.data["sessions"], strict=True))
        assert {m for m, c in counts.items() if c} == p.data.leased_machines() & set(fleet.live)
        leases = dashboard.Leases(fleet.scheduler)
        leases.update()
        held = {m for m, lease in zip(leases.source.data["machine"], leases.source.data["lease"], strict=True)
                if lease.startswith("leased")}
        assert held == p.data.leased_machines() & set(fleet.live)
        devices = device_memory(p.machines(), [s.to_dict() for s in p.sessions.values()])
        assert len(devices) == N * (GPUS + 1)
        stage_bytes = sum(st["weight_bytes"] + st["kv_bytes"] + st["compute_bytes"] for s in p.sessions.values()
                          for st in s.topology["stages"] if st["machine_id"] in set(fleet.live))
        assert sum(d.reserved for d in devices) == stage_bytes
        assert bench_scale.metrics_timing(fleet, 1)["bytes"] > 0
    finally:
        await fleet.close()
