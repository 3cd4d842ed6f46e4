# SPDX-License-Identifier: AGPL-3.0-or-later
"""What the dashboard's components read: the plugin, its sessions, colors, throughput reports as step lines, and
how a table redraws. No Bokeh figure here."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from typing import Any

from bokeh.core.properties import without_property_validation
from bokeh.models import (
    ColumnDataSource,
    DataTable,
    TableColumn,
)
from bokeh.palettes import Category10_10
from distributed.dashboard.components import DashboardComponent
from distributed.utils import log_errors

logger = logging.getLogger("sharedllm.dashboard")


EXTENSION = "sharedllm"  # where MeshPlugin registers itself in scheduler.extensions
PAGE = "sharedllm"
INTERVAL_MS = 1000
REPORT_SPAN = 3.0  # seconds a throughput report stands for (the client reports every 2 s during a stream)
TIMELINE_WINDOW = 600.0  # seconds of history on the timeline

MEMORY_COLORS = {"used": "#6baed6", "reserved": "#fd8d3c", "free": "#e6e6e6"}
MEMORY_NAMES = {"used": "used by others", "reserved": "reserved by SharedLLM", "free": "free"}


# --- what the components read --------------------------------------------------------------------------------------


def plugin_of(scheduler) -> Any | None:
    return scheduler.extensions.get(EXTENSION)


def sessions_of(plugin) -> list[dict]:
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


def clock(t: float | None) -> str:
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




class MeshComponent(DashboardComponent):
    """A component that reads the mesh plugin on every tick: :meth:`show` with it, :meth:`absent` when the scheduler
    runs no SharedLLM plugin."""

    scheduler: Any

    @without_property_validation
    @log_errors
    def update(self) -> None:
        plugin = plugin_of(self.scheduler)
        if plugin is None:
            self.absent()
        else:
            self.show(plugin)

    def show(self, plugin: Any) -> None:
        raise NotImplementedError

    def absent(self) -> None:
        pass


def table_of(columns: dict[str, str], widths: dict[str, int], source: str, name: str, height: int,
             **kwargs: Any) -> tuple[ColumnDataSource, DataTable]:
    """A table's data source (named ``source``) and its ``DataTable`` of ``columns`` (field: title), each column
    ``widths[field]`` pixels wide (100 when not given)."""
    data = ColumnDataSource({k: [] for k in columns}, name=source)
    cols = [TableColumn(field=k, title=v, width=widths.get(k, 100)) for k, v in columns.items()]
    kwargs.setdefault("height", height)
    return data, DataTable(source=data, columns=cols, index_position=None, reorderable=False, name=name, **kwargs)
