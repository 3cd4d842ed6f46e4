# SPDX-License-Identifier: AGPL-3.0-or-later
"""Planning: the ready devices of the qualifying machines, and a topology over them (``sharedllm.placement``).
"""

from __future__ import annotations

import logging
import os
import time

from sharedllm.errors import NoMachines
from sharedllm.gguf import ModelEstimate
from sharedllm.machine.state import public_endpoint
from sharedllm.placement import DeviceSlot, output_on_client, plan
from sharedllm.scheduler_plugins.mesh.data import MeshData
from sharedllm.scheduler_plugins.mesh.registry import Registry

logger = logging.getLogger("sharedllm.scheduler")


class Planner:
    """Device slots and plans over the registry's machines."""

    def __init__(self, data: MeshData, registry: Registry):
        self.data = data
        self.registry = registry

    def device_slots(self, machines: list[dict], build: dict | None = None) -> tuple[list[DeviceSlot], list[str]]:
        """Ready devices with fresh free memory, plus the reasons machines were left out."""
        slots: list[DeviceSlot] = []
        skipped: list[str] = []
        want_proto = (build or {}).get("rpc_protocol")
        reserved: dict[tuple[str, str], int] = {}  # (machine, device) -> bytes the open sessions' stages hold there
        if any(m.get("max_memory") for m in machines):
            from sharedllm.views import session_stages

            sessions = ({"session_id": x.session_id, "model": x.model, "topology": x.topology}
                        for x in self.data.sessions.values())
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
            if reach == "probing":
                skipped.append(f"{m['machine_id']} (its relay is being tried from the scheduler: back in seconds)")
                continue
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

    def plan(
        self,
        estimate: dict,
        estimate_client: dict | None = None,
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

        ``estimate_client``: the model's estimate with its output layer on the client, for a client that leaves that
        choice to placement (``output_layer="auto"``): taken when every usable device is a CPU
        (:func:`sharedllm.placement.output_on_client`); the topology says which (``output_on_client``).
        ``privacy="trusted"``, ``min_trust`` and ``labels`` restrict the machines; a request is never placed on a
        machine that does not qualify, and banned machines are never placed."""
        t0 = time.perf_counter()
        state = self.registry.machines()
        skipped = []
        if machines:
            # A requested machine may be away for a moment (its worker restarting): leave it out, say so.
            live = sorted(m["machine_id"] for m in state)
            missing = [mid for mid in machines if mid not in live]
            if missing and len(missing) == len(set(machines)):  # none of them: a typo, or all away
                raise NoMachines(f"no machine {', '.join(map(repr, missing))} in the mesh now (it has "
                                 f"{', '.join(live) or 'none'}); check the id, or wait for the machine to connect")
            skipped += [f"{mid} (not connected)" for mid in missing]
            state = [m for m in state if m["machine_id"] in machines]
        skipped += [f"{m['machine_id']} (excluded)" for m in state if m["machine_id"] in (exclude or ())]
        state = [m for m in state if m["machine_id"] not in (exclude or ())]
        qualified = []
        for m in state:
            why = self.data.trust.qualifies(m["machine_id"], privacy, min_trust, labels)
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
            leased = self.data.leased_machines(but=replaces)
            skipped += [f"{m['machine_id']} (leased)" for m in state if m["machine_id"] in leased]
            skipped += [f"{m['machine_id']} (draining)" for m in state if m["machine_id"] in self.data.draining]
            state = [m for m in state if m["machine_id"] not in leased and m["machine_id"] not in self.data.draining]
        slots, skipped_dev = self.device_slots(state, build)
        skipped += skipped_dev
        if not slots:
            why = f"; left out: {', '.join(skipped)}" if skipped else ""
            raise NoMachines(
                f"no machine in the mesh has a ready rpc-server ({len(state)} machine(s) usable{why}); start workers "
                "with `dask worker ADDR --preload sharedllm.worker` or wait for their rpc-servers"
            )
        est = ModelEstimate.from_dict(estimate_client if estimate_client and output_on_client(slots) else estimate)
        name = os.path.basename(est.path)
        warm = {m for m, models in self.data.warm.items() if name in models}
        topo = plan(slots, est, headroom=headroom, strategy=strategy, max_devices=max_devices, prefer=warm)
        d = topo.to_dict()
        d["planning_ms"] = (time.perf_counter() - t0) * 1000
        d["skipped"] = skipped
        return d

    async def handle_plan(self, estimate: dict, **kwargs) -> dict:
        """A topology over every ready machine, leased or not (a dry run: nothing is reserved)."""
        await self.settle()
        return self.plan(estimate, **kwargs)

    async def settle(self) -> None:
        """Before a plan: the machines whose relay the scheduler is trying (a machine that just joined) tried."""
        if self.data.hub is not None:
            await self.data.hub.settle(self.registry.relays())
