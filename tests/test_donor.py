# SPDX-License-Identifier: AGPL-3.0-or-later
"""Donor memory caps: a machine's owner gives part of it (``--max-memory``); placement never plans more there, open
sessions' stages count against the cap, and ``sharedllm status`` shows it."""

from __future__ import annotations

import dataclasses

import click
import pytest

from sharedllm.scheduler_plugins.mesh import Session
from sharedllm.worker import parse_max_memory
from tests.helpers import admin_env, estimate, run_cli, wait_for

MiB, GiB = 1 << 20, 1 << 30


def test_max_memory_values():
    assert parse_max_memory(["12GiB"]) == {"*": 12 * GiB}
    assert parse_max_memory(["CPU=1GiB", "CUDA0=20GiB"]) == {"CPU": GiB, "CUDA0": 20 * GiB}
    for bad in ("lots", "=1GiB", "CPU=0", "-5GiB"):
        with pytest.raises(click.BadParameter, match="--max-memory"):
            parse_max_memory([bad])


def _machine(mid: str, max_memory: dict | None = None) -> dict:
    return {"machine_id": mid, "resources": {"ram_total": 16 * GiB, "ram_available": 8 * GiB, "gpus": []},
            "rpc": {"state": "ready", "relay": {"endpoint": f"{mid}:1", "inbound": True}, "devices": [
                {"name": "CPU", "kind": "cpu", "memory_free": 8 * GiB, "memory_total": 16 * GiB}]},
            "max_memory": max_memory or {}, "reach": "direct"}


def test_placement_honours_the_cap_less_what_open_sessions_hold():
    from sharedllm.placement import DeviceSlot, plan
    from sharedllm.scheduler_plugins.mesh.data import MeshData
    from sharedllm.scheduler_plugins.mesh.planning import Planner

    planner = Planner(MeshData(), registry=None)  # device slots read the machines given and the open sessions
    machines = [_machine("free"), _machine("capped", {"*": 600 * MiB}), _machine("gpu-only", {"CUDA0": MiB})]
    slots = {s.machine_id: s for s in planner.device_slots(machines)[0]}
    assert slots["free"].free_bytes == 8 * GiB
    assert (slots["capped"].free_bytes, slots["capped"].total_bytes) == (600 * MiB, 600 * MiB)
    assert slots["gpu-only"].free_bytes == 8 * GiB  # a cap on another device leaves the CPU alone
    # A session holding ~350 MiB on "capped" leaves the rest of the 600 the owner gave.
    est = estimate()
    topo = plan([DeviceSlot("capped", "capped:1", 0, "CPU", 4 * GiB, 4 * GiB)], est)
    held = dataclasses.asdict(topo)
    planner.data.sessions["s1"] = Session("s1", "client", "model", held)
    slots = {s.machine_id: s for s in planner.device_slots(machines)[0]}
    assert slots["capped"].free_bytes == 600 * MiB - topo.total_bytes > 0
    # Placement gives the capped machine no more than it has left.
    two = plan([slots["free"], slots["capped"]], est)
    capped = [s for s in two.stages if s.machine_id == "capped"]
    assert all(s.total_bytes <= slots["capped"].free_bytes for s in capped)


@pytest.mark.mesh
def test_a_capped_machine_is_planned_within_its_cap_and_status_shows_it(mesh_cluster, mesh):
    from sharedllm.errors import ModelTooLarge

    mesh_cluster.add_machine("machine-cap", worker_args=["--max-memory", "100MiB"])
    try:
        # ready(): placement's own test (a ready rpc-server behind a relay the scheduler has reached)
        wait_for(lambda: [m for m in mesh.machines().ready() if m["machine_id"] == "machine-cap"
                          and m["rpc"].get("relay")], 120, what="the capped machine ready")
        cap = next(m for m in mesh.machines() if m["machine_id"] == "machine-cap")
        assert cap["max_memory"] == {"*": 100 * MiB} and cap["resources"]["ram_available"] > 2 * GiB
        # Gemma 3 270M at n_ctx 2048 needs ~140 MiB on one device: the machine has GiBs free, its owner gave 100 MiB.
        with pytest.raises(ModelTooLarge) as err:
            mesh.plan("gemma-3-270m", 2048, machines=["machine-cap"])
        assert err.value.available <= 100 * MiB
        out = run_cli("status", "--scheduler", mesh_cluster.user_address, env=admin_env(mesh_cluster))
        assert out.returncode == 0 and "gives each device 100" in out.stdout, out.stdout
    finally:
        mesh_cluster.stop_machine("machine-cap")
        wait_for(lambda: all(m["machine_id"] != "machine-cap" for m in mesh.machines()), 60,
                 what="machine-cap to leave")
