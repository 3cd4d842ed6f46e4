# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm status``: the machines of a mesh and its active sessions, as tables (``--json``: the raw state).

The tables show what the dashboard's SharedLLM page shows: every machine with its rpc-server (state, endpoint, RPC
protocol, llama-cpp-python build, restarts), CPUs, RAM and GPUs, the memory the active sessions reserve there (column
"SharedLLM") and who leases it; then every active session with the layers each machine holds, tokens and throughput.
``--json`` prints the scheduler's state exactly as ``Mesh.state()`` returns it (machines, sessions, tokens_total, ...).
"""

from __future__ import annotations

import json
import sys
import time

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sharedllm.cli.common import friendly_errors, open_mesh, scheduler_option
from sharedllm.errors import gib
from sharedllm.machine.state import describe_endpoint
from sharedllm.views import device_memory, draft_summary, session_stages

STATE_STYLES = {"ready": "green", "starting": "yellow", "restarting": "yellow", "stopped": "dim", "failed": "bold red"}


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(now - t, 0.0)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def machines_table(state: dict) -> Table:
    """One row per machine: rpc-server, resources, memory reserved by sessions, lease."""
    machines, sessions = state.get("machines") or [], state.get("sessions") or []
    draining = set(state.get("draining") or [])
    devices = device_memory(machines, sessions)
    table = Table(title="Machines", title_justify="left", title_style="bold", header_style="bold")
    for name, kw in (
        ("machine", {"no_wrap": True}), ("rpc-server", {}), ("endpoint", {"no_wrap": True}),
        ("protocol / build", {}), ("CPUs", {"justify": "right"}), ("RAM used / total", {}),
        ("GPUs used / total", {}), ("SharedLLM", {"justify": "right"}), ("lease", {}),
        ("workers", {"justify": "right"}),
    ):
        table.add_column(name, **kw)
    for m in machines:
        mid = m["machine_id"]
        res, rpc, build = m.get("resources") or {}, m.get("rpc") or {}, m.get("build") or {}
        st = rpc.get("state") or "?"
        cell = Text(st, style=STATE_STYLES.get(st, ""))
        if rpc.get("restarts"):
            cell.append(f" ({rpc['restarts']} restarts)")
        if rpc.get("reason"):
            cell.append(f"\n{rpc['reason']}", style="dim")
        ram_total = int(res.get("ram_total", 0))
        ram = f"{gib(ram_total - int(res.get('ram_available', 0)))} / {gib(ram_total)}" if res else "-"
        if m.get("max_memory"):  # what the owner gives the mesh (--max-memory)
            ram += "\ngives " + ", ".join(f"{'each device' if k == '*' else k} {gib(v)}"
                                         for k, v in sorted(m["max_memory"].items()))
        gpus = "\n".join(
            f"{d.label}: {gib(d.total - d.free)} / {gib(d.total)}"
            + ("" if d.utilization is None else f" ({d.utilization:.0%} busy)")
            for d in devices if d.machine_id == mid and d.kind == "gpu"
        ) or (f"none ({res['nvml_error']})" if res.get("nvml_error") else "none")
        reserved = sum(d.reserved for d in devices if d.machine_id == mid)
        holders = [s["session_id"] for s in sessions if mid in (s.get("machines") or [])]
        lease = ("leased by " + ", ".join(holders)) if holders else "free"
        if mid in draining:
            lease += ", draining"
        threads = f" ({rpc['threads']} serving)" if rpc.get("threads") else ""
        table.add_row(
            mid, cell, describe_endpoint(rpc, m.get("reach")),
            f"{rpc.get('protocol') or '?'} / {build.get('llama_cpp_python') or '?'}",
            f"{res.get('cpu_count', '?')}{threads}", ram, gpus, gib(reserved) if reserved else "-", lease,
            str(len(m.get("workers") or [])),
        )
    return table


def sessions_table(state: dict) -> Table:
    """One row per active session: model, which machine holds which layers, tokens, throughput."""
    sessions = state.get("sessions") or []
    stages = session_stages(sessions)
    now = state.get("time") or time.time()
    table = Table(title="Active sessions", title_justify="left", title_style="bold", header_style="bold")
    for name, kw in (
        ("session", {"no_wrap": True}), ("model", {}), ("layers (machine: range)", {}),
        ("tokens", {"justify": "right"}), ("requests", {"justify": "right"}), ("tok/s", {"justify": "right"}),
        ("last TTFT", {"justify": "right"}), ("drafts", {}), ("recoveries", {"justify": "right"}), ("opened", {}),
    ):
        table.add_column(name, **kw)
    for s in sessions:
        sid = s["session_id"]
        layers = "\n".join(f"{st.machine_id}: {st.layers}" for st in stages if st.session_id == sid)
        ttft = s.get("last_ttft_ms")
        table.add_row(
            sid, s.get("model") or "?", layers, str(s.get("tokens", 0)), str(s.get("requests", 0)),
            f"{s.get('last_tok_s') or 0:.1f}", "-" if ttft is None else f"{ttft:.0f} ms",
            draft_summary(s.get("load")) or "-", str(s.get("recoveries", 0)), _ago(s.get("opened"), now),
        )
    return table


def summary(state: dict) -> str:
    """One line: machines by state, sessions, tokens generated; machines seen before that are offline now."""
    machines = state.get("machines") or []
    by_state: dict[str, int] = {}
    for m in machines:
        st = (m.get("rpc") or {}).get("state") or "?"
        by_state[st] = by_state.get(st, 0) + 1
    states = ", ".join(f"{n} {st}" for st, n in sorted(by_state.items())) or "none"
    line = (f"{len(machines)} machine(s) ({states}) · {len(state.get('sessions') or [])} active session(s) · "
            f"{state.get('tokens_total', 0)} tokens generated")
    offline = state.get("known_machines") or []
    if offline:
        now = state.get("time") or time.time()
        line += "\noffline (seen before): " + ", ".join(
            f"{k['machine_id']} (last seen {_ago(k.get('last_seen'), now)})" for k in offline)
    return line


def render(state: dict, console: Console) -> None:
    """Print the status tables of a mesh state to ``console``."""
    if not state.get("machines"):
        console.print("no machines in the mesh")
    else:
        console.print(machines_table(state))
    if state.get("sessions"):
        console.print(sessions_table(state))
    else:
        console.print("no active session")
    console.print(summary(state), highlight=False)


def _console() -> Console:
    # Piped output (scripts, tests, `| less`) gets a fixed wide layout, so rows are not cut at 80 columns.
    return Console(width=None if sys.stdout.isatty() else 200, soft_wrap=False)


@click.command()
@scheduler_option
@click.option("--json", "as_json", is_flag=True, help="the scheduler's state as JSON, as Mesh.state() returns it")
@friendly_errors
def status(scheduler: str, as_json: bool) -> None:
    """Show a mesh: machines (resources, rpc-servers, leases) and active sessions."""
    from sharedllm.ggml import build_info

    with open_mesh(scheduler) as mesh:
        state = mesh.state()
    if as_json:
        click.echo(json.dumps(state, indent=2, default=str))
        return
    render(state, _console())
    mine = build_info()
    for m in state.get("machines") or []:
        proto = (m.get("rpc") or {}).get("protocol")
        if proto and proto.split(".")[0] != mine["rpc_protocol"].split(".")[0]:
            click.echo(f"warning: {m['machine_id']} speaks RPC protocol {proto}, this client "
                       f"{mine['rpc_protocol']}: it will not be placed", err=True)
