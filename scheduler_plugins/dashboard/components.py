# SPDX-License-Identifier: AGPL-3.0-or-later
"""The components of the SharedLLM dashboard page: what each shows and how it reads ``MeshPlugin`` on every tick
(see the package's docstring)."""

from __future__ import annotations

import html
import itertools
import logging
import time
from collections.abc import Iterable
from typing import Any

from bokeh.core.properties import without_property_validation
from bokeh.layouts import column
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    Div,
    FactorRange,
    HoverTool,
    LabelSet,
    NumeralTickFormatter,
    Range1d,
    TableColumn,
)
from bokeh.palettes import Category10_10, Dark2_8
from bokeh.plotting import figure
from distributed.dashboard.components import DashboardComponent
from distributed.dashboard.utils import update
from distributed.utils import log_errors

from sharedllm.errors import gib
from sharedllm.machine.state import describe_endpoint
from sharedllm.views import DeviceMemory, device_memory, draft_summary, session_stages

logger = logging.getLogger("sharedllm.dashboard")

EXTENSION = "sharedllm"  # where MeshPlugin registers itself in scheduler.extensions
PAGE = "sharedllm"
INTERVAL_MS = 1000
REPORT_SPAN = 3.0  # seconds a throughput report stands for (the client reports every 2 s during a stream)
TIMELINE_WINDOW = 600.0  # seconds of history on the timeline

MEMORY_COLORS = {"used": "#6baed6", "reserved": "#fd8d3c", "free": "#e6e6e6"}
MEMORY_NAMES = {"used": "used by others", "reserved": "reserved by SharedLLM", "free": "free"}


# --- what the components read --------------------------------------------------------------------------------------


def _plugin(scheduler) -> Any | None:
    return scheduler.extensions.get(EXTENSION)


def _sessions(plugin) -> list[dict]:
    return [s.to_dict() for s in plugin.sessions.values()]


def machine_colors(machine_ids: Iterable[str]) -> dict[str, str]:
    """A stable color per machine: the same machine has the same color on every figure."""
    return {m: Category10_10[i % len(Category10_10)] for i, m in enumerate(sorted(set(machine_ids)))}


def report_intervals(
    history: Iterable[tuple[float, float]], span: float = REPORT_SPAN
) -> list[tuple[float, float, float]]:
    """``(start, end, tokens/s)`` for each throughput report ``(t, r)`` of one session.

    A report says the session generated ``r`` tokens/s just before ``t``: it stands for the interval since the
    session's previous report, at most ``span`` seconds.
    """
    out: list[tuple[float, float, float]] = []
    prev = float("-inf")
    for t, r in sorted(history):
        out.append((max(prev, t - span), t, float(r)))
        prev = t
    return out


def session_steps(intervals: list[tuple[float, float, float]], idle: bool) -> tuple[list[float], list[float]]:
    """A step line through one session's intervals: flat at each rate, zero in the gaps between them (and after the
    last one when the session is ``idle``)."""
    xs: list[float] = []
    ys: list[float] = []
    for i, (a, b, r) in enumerate(intervals):
        if i and a > intervals[i - 1][1]:
            xs += [intervals[i - 1][1], a]
            ys += [0.0, 0.0]
        xs += [a, b]
        ys += [r, r]
    if intervals and idle:
        xs.append(intervals[-1][1])
        ys.append(0.0)
    return xs, ys


def mesh_steps(intervals: Iterable[tuple[float, float, float]], idle: bool) -> tuple[list[float], list[float]]:
    """The whole mesh's tokens/s as a step line: at each moment, the sum of the rates of the intervals covering it."""
    changes: dict[float, float] = {}
    for a, b, r in intervals:  # a sweep over where rates start and stop
        changes[a] = changes.get(a, 0.0) + r
        changes[b] = changes.get(b, 0.0) - r
    xs: list[float] = []
    ys: list[float] = []
    rate = 0.0
    cuts = sorted(changes)
    for lo, hi in itertools.pairwise(cuts):
        rate += changes[lo]
        level = max(round(rate, 9), 0.0)  # no -0.000001 from float sums
        xs += [lo, hi]
        ys += [level, level]
    if xs and idle:
        xs.append(xs[-1])
        ys.append(0.0)
    return xs, ys


def _clock(t: float | None) -> str:
    # Absolute times, not "5 s ago": a table redraws only when its data changes, not every second.
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else "-"


def update_table(table: DataTable, data: dict[str, list]) -> None:
    """Put ``data`` in a table's source and make BokehJS redraw it.

    BokehJS 3.9 redraws a ``DataTable`` when its CDS view's row indices change, so new values in the same number of
    rows never reach the screen. Any change of the table model re-renders it: bump its ``tags`` when the data changed.
    (Plain lists, not distributed's ``update``: it turns long columns into numpy arrays, which do not compare.)
    """
    source = table.source
    if dict(source.data) == data:
        return
    source.data = data
    table.tags = [int(table.tags[0]) + 1 if table.tags else 1]


# --- components ----------------------------------------------------------------------------------------------------


class MeshSummary(DashboardComponent):
    """One line: machines by state, sessions, tokens generated and the mesh's current tokens/s."""

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        self.source = None
        self.root = Div(text="", name="sharedllm-summary", **kwargs)

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = _plugin(self.scheduler)
        if plugin is None:
            self.root.text = "<p>SharedLLM is not running on this scheduler (preload <code>sharedllm.scheduler</code>)."
            return
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


class MachineTable(DashboardComponent):
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
        self.source = ColumnDataSource({k: [] for k in self.columns}, name="sharedllm-machines")
        cols = [TableColumn(field=k, title=v) for k, v in self.columns.items()]
        widths = {"machine": 110, "state": 160, "endpoint": 210, "version": 150, "restarts": 60, "cpus": 70,
                  "ram": 140, "gpus": 200, "reserved": 130, "workers": 60, "sessions": 60}
        for c in cols:
            c.width = widths.get(c.field, 100)
        kwargs.setdefault("height", 160)
        self.root = DataTable(source=self.source, columns=cols, index_position=None, reorderable=False,
                              name="sharedllm-machine-table", **kwargs)

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = _plugin(self.scheduler)
        if plugin is None:
            return
        machines = plugin.machines()
        sessions = _sessions(plugin)
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


class DeviceMemoryBars(DashboardComponent):
    """RAM and every GPU of every machine as one bar: used by others, reserved by SharedLLM, free."""

    parts = ("used", "reserved", "free")

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        self.source = ColumnDataSource(self._data([]), name="sharedllm-memory")
        self.root = figure(title="Memory per device: used by others / reserved by SharedLLM / free",
                           y_range=FactorRange(factors=[]), x_range=Range1d(0, 1), tools="", toolbar_location=None,
                           height=120, name="sharedllm-memory-figure", **kwargs)
        self.root.hbar_stack([f"{p}_frac" for p in self.parts], y="device", height=0.7, source=self.source,
                             color=[MEMORY_COLORS[p] for p in self.parts],
                             legend_label=[MEMORY_NAMES[p] for p in self.parts])
        self.root.add_layout(LabelSet(x=1, y="device", text="text", source=self.source, x_offset=-6,
                                      text_align="right", text_baseline="middle", text_font_size="12px",
                                      text_color="#222222"))
        self.root.xaxis.formatter = NumeralTickFormatter(format="0 %")
        self.root.ygrid.visible = False
        self.root.legend.orientation = "horizontal"
        self.root.legend.location = "top_right"
        self.root.legend.background_fill_alpha = 0.6
        self.root.add_layout(self.root.legend[0], "above")
        self.root.add_tools(HoverTool(tooltips=[("device", "@device"), ("total", "@total_text"),
                                                ("used by others", "@used_text"),
                                                ("reserved by SharedLLM", "@reserved_text"),
                                                ("free", "@free_text"), ("GPU utilization", "@util_text")]))

    @staticmethod
    def _data(devices: list[DeviceMemory]) -> dict[str, list]:
        data: dict[str, list] = {k: [] for k in (
            "device", "machine", "total", "used", "reserved", "free", "used_frac", "reserved_frac", "free_frac",
            "text", "total_text", "used_text", "reserved_text", "free_text", "util_text")}
        for d in devices:
            total = max(d.total, 1)
            data["device"].append(f"{d.machine_id} · {d.label}")
            data["machine"].append(d.machine_id)
            data["total"].append(d.total)
            for part, value in zip(("used", "reserved", "free"), (d.used_other, d.reserved, d.free_shown), strict=True):
                data[part].append(value)
                data[f"{part}_frac"].append(value / total)
                data[f"{part}_text"].append(gib(value))
            data["total_text"].append(gib(d.total))
            data["util_text"].append("-" if d.utilization is None else f"{d.utilization:.0%}")
            util = "" if d.utilization is None else f" · {d.utilization:.0%} busy"
            data["text"].append(f"{gib(d.used_other)} used · {gib(d.reserved)} SharedLLM · {gib(d.free_shown)} free "
                                f"of {gib(d.total)}{util}")
        return data

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = _plugin(self.scheduler)
        if plugin is None:
            return
        devices = device_memory(plugin.machines(), _sessions(plugin))
        data = self._data(devices)
        factors = list(reversed(data["device"]))  # first machine on top
        if list(self.root.y_range.factors) != factors:
            self.root.y_range.factors = factors
            self.root.height = 100 + 40 * max(len(factors), 1)
        update(self.source, data)


class LayerMap(DashboardComponent):
    """Each active session's topology: one bar per stage over its slot range, colored by machine, labeled."""

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        self.source = ColumnDataSource(self._data([], {}), name="sharedllm-layers")
        self.root = figure(title="Layers per machine (slots: the model's layers, then its output layer)",
                           y_range=FactorRange(factors=[]), x_range=Range1d(0, 1), tools="", toolbar_location=None,
                           height=140, name="sharedllm-layers-figure", **kwargs)
        self.root.hbar(y="row", left="first", right="end", height=0.5, color="color", line_color="white",
                       line_width=2, source=self.source, legend_field="machine")
        self.root.add_layout(LabelSet(x="center", y="row", text="inside", source=self.source, text_align="center",
                                      text_baseline="middle", text_color="white", text_font_size="12px",
                                      text_font_style="bold"))
        self.root.add_layout(LabelSet(x="outside_x", y="outside_y", text="outside", source=self.source,
                                      text_align="outside_align", text_baseline="bottom", text_color="#222222",
                                      text_font_size="12px"))
        self.root.xaxis.axis_label = "slot"
        self.root.ygrid.visible = False
        self.root.legend.orientation = "horizontal"
        self.root.legend.location = "top_right"
        self.root.add_layout(self.root.legend[0], "above")
        self.root.add_tools(HoverTool(tooltips=[("session", "@session"), ("machine", "@machine"),
                                                ("device", "@device"), ("layers", "@layers"),
                                                ("slots", "@first to @end (exclusive)"), ("bytes", "@bytes_text")]))

    @staticmethod
    def _data(sessions: list[dict], colors: dict[str, str]) -> dict[str, list]:
        data: dict[str, list] = {k: [] for k in (
            "row", "session", "model", "machine", "device", "first", "end", "center", "layers", "label", "inside",
            "outside", "outside_x", "outside_y", "outside_align", "color", "bytes", "bytes_text")}
        stages = session_stages(sessions)
        for st in stages:
            label = f"{st.machine_id}: {st.layers}"
            wide = (st.end - st.first) / max(st.n_layer + 1, 1) >= 0.25
            data["row"].append(f"{st.session_id} · {st.model}")
            data["session"].append(st.session_id)
            data["model"].append(st.model)
            data["machine"].append(st.machine_id)
            data["device"].append(st.device)
            data["first"].append(st.first)
            data["end"].append(st.end)
            data["center"].append((st.first + st.end) / 2)
            data["layers"].append(st.layers)
            data["label"].append(label)
            data["inside"].append(label if wide else "")
            data["outside"].append("" if wide else label)
            # A narrow stage's label goes over its bar (a categorical offset above the bar's top edge at +0.25),
            # growing towards the middle so it stays on the plot.
            right_half = (st.first + st.end) / 2 > (st.n_layer + 1) / 2
            data["outside_x"].append(st.end if right_half else st.first)
            data["outside_y"].append((f"{st.session_id} · {st.model}", 0.28))
            data["outside_align"].append("right" if right_half else "left")
            data["color"].append(colors.get(st.machine_id, "#999999"))
            data["bytes"].append(st.bytes)
            data["bytes_text"].append(gib(st.bytes))
        return data

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = _plugin(self.scheduler)
        if plugin is None:
            return
        sessions = _sessions(plugin)
        colors = machine_colors(m["machine_id"] for m in plugin.machines())
        data = self._data(sessions, colors)
        rows = list(reversed(list(dict.fromkeys(data["row"]))))
        if list(self.root.y_range.factors) != rows:
            self.root.y_range.factors = rows
            self.root.height = 110 + 70 * max(len(rows), 1)
        end = max(data["end"], default=1)
        if self.root.x_range.end != end:
            self.root.x_range.end = end
        title = ("Layers per machine (slots: the model's layers, then its output layer)" if sessions
                 else "Layers per machine: no active session")
        if self.root.title.text != title:
            self.root.title.text = title
        update(self.source, data)


class Throughput(DashboardComponent):
    """Tokens/s over time: one line per session (active or recently closed) and one for the whole mesh."""

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        self.source = ColumnDataSource({"xs": [], "ys": [], "session": [], "color": []},
                                       name="sharedllm-throughput-sessions")
        self.mesh_source = ColumnDataSource({"time": [], "tok_s": []}, name="sharedllm-throughput-mesh")
        self.root = figure(title="Tokens per second", x_axis_type="datetime", height=300, tools="",
                           toolbar_location=None, name="sharedllm-throughput-figure", **kwargs)
        self.root.multi_line(xs="xs", ys="ys", color="color", line_width=3, source=self.source, legend_field="session")
        self.root.line(x="time", y="tok_s", source=self.mesh_source, color="#222222", line_width=2,
                       line_dash="dashed", legend_label="whole mesh")
        self.root.yaxis.axis_label = "tokens/s"
        self.root.y_range.start = 0
        self.root.legend.orientation = "horizontal"
        self.root.legend.location = "top_right"
        self.root.legend.click_policy = "hide"
        self.root.add_layout(self.root.legend[0], "above")
        self.root.add_tools(HoverTool(tooltips=[("session", "@session")], renderers=self.root.renderers[:1]))

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = _plugin(self.scheduler)
        if plugin is None:
            return
        now = time.time()
        since = now - TIMELINE_WINDOW
        runs = [(s.session_id, s.model, list(s.history), "") for s in plugin.sessions.values()]
        runs += [(e["session_id"], e.get("model", ""), e.get("history") or [], " (closed)")
                 for e in list(plugin.ended) if (e.get("closed") or 0) >= since]
        data: dict[str, list] = {"xs": [], "ys": [], "session": [], "color": []}
        every: list[tuple[float, float, float]] = []
        last = 0.0
        for i, (sid, model, hist, suffix) in enumerate(sorted(runs)):
            intervals = [iv for iv in report_intervals(hist) if iv[1] >= since]
            if not intervals:
                continue
            every += intervals
            last = max(last, intervals[-1][1])
            xs, ys = session_steps(intervals, idle=bool(suffix) or now - intervals[-1][1] > REPORT_SPAN)
            data["xs"].append([x * 1000 for x in xs])
            data["ys"].append(ys)
            data["session"].append(f"{sid} {model}{suffix}")
            data["color"].append(Dark2_8[i % len(Dark2_8)])
        xs, ys = mesh_steps(every, idle=now - last > REPORT_SPAN)
        update(self.source, data)
        update(self.mesh_source, {"time": [x * 1000 for x in xs], "tok_s": ys})


class SessionTable(DashboardComponent):
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
        self.source = ColumnDataSource({k: [] for k in self.columns}, name="sharedllm-sessions")
        widths = {"session": 90, "model": 200, "layers": 260, "tokens": 70, "requests": 70, "tok_s": 90,
                  "ttft": 80, "batch": 200, "cached": 100, "drafts": 220, "opened": 90, "client": 200}
        cols = [TableColumn(field=k, title=v, width=widths[k]) for k, v in self.columns.items()]
        kwargs.setdefault("height", 80)
        self.root = DataTable(source=self.source, columns=cols, index_position=None, reorderable=False,
                              name="sharedllm-session-table", **kwargs)

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = _plugin(self.scheduler)
        if plugin is None:
            return
        sessions = _sessions(plugin)
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
            data["opened"].append(_clock(s.get("opened")))
            data["client"].append(plugin.public_name(s.get("client") or ""))
        self.root.height = 30 + 28 * max(len(sessions), 1)
        update_table(self.root, data)


class Leases(DashboardComponent):
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
        self.source = ColumnDataSource({k: [] for k in self.columns}, name="sharedllm-leases")
        widths = {"machine": 110, "lease": 110, "sessions": 160, "clients": 260, "since": 90, "trust": 90}
        cols = [TableColumn(field=k, title=v, width=widths[k]) for k, v in self.columns.items()]
        kwargs.setdefault("height", 80)
        self.table = DataTable(source=self.source, columns=cols, index_position=None, reorderable=False,
                               name="sharedllm-lease-table", **kwargs)
        self.note = Div(text="", name="sharedllm-leases-note", sizing_mode="stretch_width")
        self.root = column(self.note, self.table, sizing_mode="stretch_width")

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = _plugin(self.scheduler)
        if plugin is None:
            return
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
            data["since"].append(_clock(min((s.opened for s in holders), default=None)))
            data["trust"].append(_trust_cell(m.get("trust")))
        waiting = plugin.leases.waiting
        note = f"<p style='margin:2px 0'><b>{waiting}</b> session(s) waiting for leased machines</p>"
        if note != self.note.text:
            self.note.text = note
        self.table.height = 30 + 28 * max(len(data["machine"]), 1)
        update_table(self.table, data)


def _trust_cell(record: dict | None) -> str:
    """A machine's trust record as the table shows it: ``0.55``, ``0.50 (probation)`` or ``banned``."""
    if not record:
        return "-"
    if record.get("banned"):
        return "banned"
    return f"{record['score']:.2f}" + (" (probation)" if record.get("probation") else "")


class AuditTrail(DashboardComponent):
    """The last admin actions on the mesh (and refused attempts at them): who, what, when, and how it ended. A user
    who is no admin is shown by a pseudonym unless the operator shows names (``--show-user-names``)."""

    columns = {"time": "time", "who": "who", "action": "action", "target": "on", "outcome": "outcome", "via": "via"}

    def __init__(self, scheduler, **kwargs):
        self.scheduler = scheduler
        self.source = ColumnDataSource({k: [] for k in self.columns}, name="sharedllm-audit")
        widths = {"time": 90, "who": 160, "action": 140, "target": 160, "outcome": 260, "via": 80}
        cols = [TableColumn(field=k, title=v, width=widths[k]) for k, v in self.columns.items()]
        kwargs.setdefault("height", 80)
        self.root = DataTable(source=self.source, columns=cols, index_position=None, reorderable=False,
                              name="sharedllm-audit-table", **kwargs)

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = _plugin(self.scheduler)
        if plugin is None:
            return
        entries = list(reversed(plugin.data.audit.recent(50)))
        data: dict[str, list] = {k: [] for k in self.columns}
        for e in entries:
            data["time"].append(_clock(e["time"]))
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
