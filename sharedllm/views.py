# SPDX-License-Identifier: AGPL-3.0-or-later
"""What the mesh's state means per device and per stage: the scheduler's state (``sharedllm_state``) turned into each
device's memory (with what sessions reserve there) and each session's stages. Pure; no Dask. The scheduler's planning
and metrics, its dashboard page and ``sharedllm status`` read the state through these."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sharedllm.placement import Stage


@dataclass(frozen=True)
class DeviceMemory:
    """One memory pool of one machine: its RAM or one GPU. ``reserved`` is what active sessions' stages take there."""

    machine_id: str
    device: str  # "RAM", or the rpc-server's device name ("CUDA0")
    label: str  # for humans: "RAM", "CUDA0 NVIDIA H100"
    kind: str  # "ram" or "gpu"
    total: int
    free: int
    reserved: int = 0
    utilization: float | None = None  # GPUs with NVML: 0 to 1

    @property
    def used_other(self) -> int:
        """Used memory not counted as reserved by SharedLLM (other programs, the OS, or the stage's slack)."""
        return max(self.total - self.free - self.reserved, 0)

    @property
    def free_shown(self) -> int:
        """Free memory once the reservation is taken out: the three parts add up to ``total``."""
        return max(self.total - self.used_other - self.reserved, 0)


@dataclass(frozen=True)
class StageView:
    """One stage of one session's topology: a machine's device holding the slot range ``[first, end)``."""

    session_id: str
    model: str
    machine_id: str
    device: str
    first: int
    end: int
    n_layer: int
    bytes: int
    layers: str  # the range for humans, as the topology table writes it (``Stage.describe_layers``)


def draft_summary(load: dict | None) -> str | None:
    """A session's speculative decoding, from its engine's report (``load["draft"]``): its drafter, the share of
    drafts accepted and the tokens each sequence got per decode step, e.g. ``lookup: 82% accepted, 2.6 tok/step``.
    None without a drafter."""
    draft = (load or {}).get("draft")
    if not isinstance(draft, dict):
        return None
    drafted, steps = draft.get("drafted", 0), draft.get("steps", 0)
    rate = f"{100 * draft.get('accepted', 0) / drafted:.0f}% accepted" if drafted else "no drafts yet"
    per_step = f", {draft.get('tokens', 0) / steps:.1f} tok/step" if steps else ""
    return f"{draft.get('drafter') or 'draft'}: {rate}{per_step}"


def session_stages(sessions: Iterable[dict]) -> list[StageView]:
    """Every stage of every session (dicts as ``Session.to_dict`` gives them), in session then slot order."""
    out = []
    for s in sessions:
        topo = s.get("topology") or {}
        n_layer = int(topo.get("n_layer", 0))
        for st in topo.get("stages", []):
            stage = Stage.from_dict(st)
            out.append(StageView(
                session_id=s["session_id"], model=s.get("model", "?"), machine_id=stage.machine_id,
                device=str(stage.device_name or "?"), first=stage.first_slot, end=stage.end_slot, n_layer=n_layer,
                bytes=stage.total_bytes, layers=stage.describe_layers(),
            ))
    return out


def device_memory(machines: Iterable[dict], sessions: Iterable[dict]) -> list[DeviceMemory]:
    """RAM and every GPU of every machine, with the bytes the given sessions' stages reserve on each.

    A stage on a ``CUDA<i>`` device counts against GPU ``i`` (NVML numbering, as placement does); a stage on any other
    device (the rpc-server's CPU) counts against the machine's RAM. Devices an rpc-server serves that NVML does not see
    (another backend) are listed with the figures the rpc-server reported at its start.
    """
    stages: dict[str, list[StageView]] = {}  # machine -> its stages: one pass over the sessions, not one per machine
    for st in session_stages(sessions):
        stages.setdefault(st.machine_id, []).append(st)
    out: list[DeviceMemory] = []
    for m in machines:
        mid = m["machine_id"]
        res, rpc = m.get("resources") or {}, m.get("rpc") or {}
        gpus = {f"CUDA{g['index']}": g for g in res.get("gpus") or []}
        extra = {d["name"]: d for d in rpc.get("devices") or [] if d.get("kind") != "cpu" and d["name"] not in gpus}
        reserved: dict[str, int] = {}
        for st in stages.get(mid, ()):
            dev = st.device if st.device in gpus or st.device in extra else "RAM"
            reserved[dev] = reserved.get(dev, 0) + st.bytes
        if res:
            total, avail = int(res.get("ram_total", 0)), int(res.get("ram_available", 0))
            out.append(DeviceMemory(mid, "RAM", "RAM", "ram", total, avail, reserved.get("RAM", 0)))
        for name, g in gpus.items():
            util = g.get("utilization")
            out.append(DeviceMemory(mid, name, f"{name} {g.get('name', '')}".strip(), "gpu", int(g["memory_total"]),
                                    int(g["memory_free"]), reserved.get(name, 0),
                                    None if util is None else float(util) / 100.0))
        for name, d in extra.items():
            out.append(DeviceMemory(mid, name, f"{name} {d.get('description', '')}".strip(), "gpu",
                                    int(d.get("memory_total", 0)), int(d.get("memory_free", 0)), reserved.get(name, 0)))
    return out
