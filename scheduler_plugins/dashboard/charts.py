# SPDX-License-Identifier: AGPL-3.0-or-later
"""The dashboard's figures: device memory, the layer map and the mesh's throughput (see the package's docstring)."""

from __future__ import annotations

import logging
import time
from typing import Any

from bokeh.models import (
    ColumnDataSource,
    FactorRange,
    HoverTool,
    LabelSet,
    NumeralTickFormatter,
    Range1d,
)
from bokeh.palettes import Dark2_8
from bokeh.plotting import figure
from distributed.dashboard.utils import update

from sharedllm.errors import gib
from sharedllm.scheduler_plugins.dashboard.read import (
    MEMORY_COLORS,
    MEMORY_NAMES,
    REPORT_SPAN,
    TIMELINE_WINDOW,
    MeshComponent,
    machine_colors,
    mesh_steps,
    report_intervals,
    session_steps,
    sessions_of,
)
from sharedllm.views import DeviceMemory, device_memory, session_stages

logger = logging.getLogger("sharedllm.dashboard")


class DeviceMemoryBars(MeshComponent):
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

    def show(self, plugin: Any) -> None:
        devices = device_memory(plugin.machines(), sessions_of(plugin))
        data = self._data(devices)
        factors = list(reversed(data["device"]))  # first machine on top
        if list(self.root.y_range.factors) != factors:
            self.root.y_range.factors = factors
            self.root.height = 100 + 40 * max(len(factors), 1)
        update(self.source, data)


class LayerMap(MeshComponent):
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

    def show(self, plugin: Any) -> None:
        sessions = sessions_of(plugin)
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


class Throughput(MeshComponent):
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

    def show(self, plugin: Any) -> None:
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
