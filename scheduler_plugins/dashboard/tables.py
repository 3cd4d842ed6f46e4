# SPDX-License-Identifier: AGPL-3.0-or-later
"""The dashboard's tables: the mesh summary, machines, sessions, leases and the audit trail (see the package's
docstring)."""

from __future__ import annotations

import html
import logging
import time
from typing import Any

from bokeh.layouts import column
from bokeh.models import (
    Div,
)

from sharedllm.errors import gib
from sharedllm.machine.state import describe_endpoint
from sharedllm.scheduler_plugins.dashboard.read import (
    REPORT_SPAN,
    MeshComponent,
    clock,
    sessions_of,
    table_of,
    update_table,
)
from sharedllm.views import device_memory, draft_summary, session_stages

logger = logging.getLogger("sharedllm.dashboard")


class MeshSummary(MeshComponent):
    """One line: machines by state, sessions, tokens generated and the mesh's current tokens/s."""

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        self.source = None
        self.root = Div(text="", name="sharedllm-summary", **kwargs)

    def absent(self) -> None:
        self.root.text = "<p>SharedLLM is not running on this scheduler (preload <code>sharedllm.scheduler</code>)."

    def show(self, plugin: Any) -> None:
        machines = plugin.machines()
        states: dict[str, int] = {}
        for m in machines:
            st = (m.get("rpc") or {}).get("state", "?")
            states[st] = states.get(st, 0) + 1
        now = time.time()
        rate = sum(s.last_tok_s for s in plugin.sessions.values() if now - s.last_report <= REPORT_SPAN)
        by_state = ", ".join(f"{n} {html.escape(st)}" for st, n in sorted(states.items())) or "none"
        text = (
            f"<h2 style='margin:4px 0'>SharedLLM mesh</h2>"
            f"<p style='font-size:14px;margin:2px 0'><b>{len(machines)}</b> machine(s) ({by_state}) &middot; "
            f"<b>{len(plugin.sessions)}</b> active session(s) &middot; <b>{plugin.tokens_total}</b> tokens generated "
            f"&middot; <b>{rate:.1f}</b> tokens/s now</p>"
        )
        if text != self.root.text:
            self.root.text = text


class MachineTable(MeshComponent):
    """Every machine: its rpc-server (state, endpoint, protocol, build, restarts) and resources."""

    columns = {
        "machine": "machine",
        "state": "rpc-server",
        "endpoint": "endpoint",
        "version": "protocol / llama-cpp-python",
        "restarts": "restarts",
        "cpus": "CPUs",
        "ram": "RAM used / total",
        "gpus": "GPUs (used / total)",
        "reserved": "reserved by SharedLLM",
        "workers": "workers",
        "sessions": "sessions",
    }

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        widths = {"machine": 110, "state": 160, "endpoint": 210, "version": 150, "restarts": 60, "cpus": 70,
                  "ram": 140, "gpus": 200, "reserved": 130, "workers": 60, "sessions": 60}
        self.source, self.root = table_of(self.columns, widths, "sharedllm-machines", "sharedllm-machine-table", 160,
                                          **kwargs)

    def show(self, plugin: Any) -> None:
        machines = plugin.machines()
        sessions = sessions_of(plugin)
        reserved: dict[str, int] = {}
        for d in device_memory(machines, sessions):
            reserved[d.machine_id] = reserved.get(d.machine_id, 0) + d.reserved
        leases: dict[str, int] = {}  # machine -> sessions on it, counted in one pass over the sessions
        for s in sessions:
            for mid in set(s.get("machines", [])):
                leases[mid] = leases.get(mid, 0) + 1
        data: dict[str, list] = {k: [] for k in self.columns}
        for m in machines:
            mid = m["machine_id"]
            res, rpc, build = m.get("resources") or {}, m.get("rpc") or {}, m.get("build") or {}
            state = rpc.get("state", "?") + (f": {rpc['reason']}" if rpc.get("reason") else "")
            gpus = res.get("gpus") or []
            ram_used = int(res.get("ram_total", 0)) - int(res.get("ram_available", 0))
            data["machine"].append(mid)
            data["state"].append(state)
            data["endpoint"].append(describe_endpoint(rpc, m.get("reach")))
            data["version"].append(f"{rpc.get('protocol') or '?'} / {build.get('llama_cpp_python') or '?'}")
            data["restarts"].append(int(rpc.get("restarts") or 0))
            threads = f" ({rpc['threads']} serving)" if rpc.get("threads") else ""
            data["cpus"].append(f"{res.get('cpu_count', '?')}{threads}")
            data["ram"].append(f"{gib(ram_used)} / {gib(res.get('ram_total', 0))}" if res else "-")
            data["gpus"].append(", ".join(
                f"{g['name']} {gib(g['memory_total'] - g['memory_free'])} / {gib(g['memory_total'])}" for g in gpus
            ) or (f"none ({res['nvml_error']})" if res.get("nvml_error") else "none"))
            data["reserved"].append(gib(reserved.get(mid, 0)))
            data["workers"].append(len(m.get("workers") or []))
            data["sessions"].append(leases.get(mid, 0))
        self.root.height = 30 + 28 * max(len(machines), 1)
        update_table(self.root, data)


class SessionTable(MeshComponent):
    """The active sessions: model, where its layers are, tokens, throughput, first-token time."""

    columns = {
        "session": "session",
        "model": "model",
        "layers": "layers (machine: range)",
        "tokens": "tokens",
        "requests": "requests",
        "tok_s": "last tokens/s",
        "ttft": "last TTFT",
        "batch": "running / waiting / batch",
        "cached": "prompt cached",
        "drafts": "drafts",
        "opened": "opened",
        "client": "client",
    }

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        widths = {"session": 90, "model": 200, "layers": 260, "tokens": 70, "requests": 70, "tok_s": 90,
                  "ttft": 80, "batch": 200, "cached": 100, "drafts": 220, "opened": 90, "client": 200}
        self.source, self.root = table_of(self.columns, widths, "sharedllm-sessions", "sharedllm-session-table", 80,
                                              **kwargs)

    def show(self, plugin: Any) -> None:
        sessions = sessions_of(plugin)
        stages = session_stages(sessions)
        data: dict[str, list] = {k: [] for k in self.columns}
        for s in sessions:
            data["session"].append(s["session_id"])
            data["model"].append(s.get("model", "?"))
            data["layers"].append(" · ".join(f"{st.machine_id}: {st.layers}" for st in stages
                                             if st.session_id == s["session_id"]))
            data["tokens"].append(int(s.get("tokens", 0)))
            data["requests"].append(int(s.get("requests", 0)))
            data["tok_s"].append(f"{s.get('last_tok_s') or 0:.1f}")
            ttft = s.get("last_ttft_ms")
            data["ttft"].append("-" if ttft is None else f"{ttft:.0f} ms")
            load = s.get("load") or {}
            passes = f" in {load['passes_per_step']:.1f} passes" if load.get("passes_per_step", 1) > 1.05 else ""
            data["batch"].append(f"{load.get('running', 0):.0f} / {load.get('waiting', 0):.0f} / "
                                 f"{load.get('batch', 0):.1f}{passes} of {load.get('parallel', 1):.0f}"
                                 if load else "-")
            prompt = load.get("prompt_tokens", 0)
            data["cached"].append(f"{100 * load.get('cached_tokens', 0) / prompt:.0f}%" if prompt else "-")
            data["drafts"].append(draft_summary(load) or "-")
            data["opened"].append(clock(s.get("opened")))
            data["client"].append(plugin.public_name(s.get("client") or ""))
        self.root.height = 30 + 28 * max(len(sessions), 1)
        update_table(self.root, data)


class Leases(MeshComponent):
    """Who holds which machine: every machine with the sessions leasing it, whether it drains, its trust score (from
    the machine's trust record), and the queue of sessions waiting for leased machines."""

    columns = {
        "machine": "machine",
        "lease": "lease",
        "sessions": "leased by session",
        "clients": "client",
        "since": "since",
        "trust": "trust score",
    }

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        widths = {"machine": 110, "lease": 110, "sessions": 160, "clients": 260, "since": 90, "trust": 90}
        self.source, self.table = table_of(self.columns, widths, "sharedllm-leases", "sharedllm-lease-table", 80,
                                               **kwargs)
        self.note = Div(text="", name="sharedllm-leases-note", sizing_mode="stretch_width")
        self.root = column(self.note, self.table, sizing_mode="stretch_width")

    def show(self, plugin: Any) -> None:
        draining = set(getattr(plugin, "draining", ()) or ())
        data: dict[str, list] = {k: [] for k in self.columns}
        by_machine: dict[str, list] = {}  # machine -> the sessions leasing it, in session order; one pass
        for s in plugin.sessions.values():
            for mid in s.machines:
                by_machine.setdefault(mid, []).append(s)
        for m in plugin.machines():
            mid = m["machine_id"]
            holders = by_machine.get(mid, [])
            lease = "leased" if holders else "free"
            data["machine"].append(mid)
            data["lease"].append(f"{lease}, draining" if mid in draining else lease)
            data["sessions"].append(", ".join(s.session_id for s in holders) or "-")
            data["clients"].append(", ".join(plugin.public_name(s.client) for s in holders) or "-")
            data["since"].append(clock(min((s.opened for s in holders), default=None)))
            data["trust"].append(trust_cell(m.get("trust")))
        waiting = plugin.leases.waiting
        note = f"<p style='margin:2px 0'><b>{waiting}</b> session(s) waiting for leased machines</p>"
        if note != self.note.text:
            self.note.text = note
        self.table.height = 30 + 28 * max(len(data["machine"]), 1)
        update_table(self.table, data)


def trust_cell(record: dict | None) -> str:
    """A machine's trust record as the table shows it: ``0.55``, ``0.50 (probation)`` or ``banned``."""
    if not record:
        return "-"
    if record.get("banned"):
        return "banned"
    return f"{record['score']:.2f}" + (" (probation)" if record.get("probation") else "")


class AuditTrail(MeshComponent):
    """The last admin actions on the mesh (and refused attempts at them): who, what, when, and how it ended. A user
    who is no admin is shown by a pseudonym unless the operator shows names (``--show-user-names``)."""

    columns = {"time": "time", "who": "who", "action": "action", "target": "on", "outcome": "outcome", "via": "via"}

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        widths = {"time": 90, "who": 160, "action": 140, "target": 160, "outcome": 260, "via": 80}
        self.source, self.root = table_of(self.columns, widths, "sharedllm-audit", "sharedllm-audit-table", 80,
                                              **kwargs)

    def show(self, plugin: Any) -> None:
        entries = list(reversed(plugin.data.audit.recent(50)))
        data: dict[str, list] = {k: [] for k in self.columns}
        for e in entries:
            data["time"].append(clock(e["time"]))
            data["who"].append(e["who"] if e["role"] == "admin" else plugin.public_name(e["who"]))
            data["action"].append(e["action"])
            target = e.get("target") or "-"
            if e["action"].startswith(("users", "clients")) and target != "-":  # a user's name, as any other's
                target = plugin.public_name(target)
            data["target"].append(target)
            data["outcome"].append(e["outcome"])
            data["via"].append(e["via"])
        self.root.height = 30 + 28 * max(len(entries), 1)
        update_table(self.root, data)
