# SPDX-License-Identifier: AGPL-3.0-or-later
"""The SharedLLM page of the Dask scheduler's Bokeh dashboard.

:func:`install_dashboard` adds ``/sharedllm`` (linked in the dashboard's top bar) and one page per figure
(``/individual-sharedllm-*``, in the "More..." menu) to a running scheduler. They are built the way distributed builds
its own: ``DashboardComponent`` classes with a ``ColumnDataSource`` and an ``update()`` that a periodic callback of the
Bokeh document calls, served by a ``BokehApplication`` added to the scheduler's HTTP application.

What the page shows, from ``MeshPlugin`` on every tick:

- a summary line: machines by rpc-server state, active sessions, tokens generated, mesh tokens/s;
- every machine: rpc-server state, endpoint, RPC protocol and llama-cpp-python version, restarts, CPUs, RAM, GPUs;
- RAM and every GPU as a memory bar: used by others, reserved by SharedLLM (the bytes of the active sessions' stages on
  that device: weights, KV cache and compute buffer), free;
- each active session's topology: one bar per stage over its slot range ``[first_slot, first_slot + n_slots)``,
  colored by machine and labeled with the layers it holds;
- tokens/s over time for each session (its throughput reports) and for the whole mesh;
- the active sessions as a table;
- leases: which session holds which machine, draining machines, the queue of waiting sessions, and each machine's
  trust score (``MeshPlugin.trust``).

Every data source is named (``sharedllm-machines``, ``sharedllm-memory``, ``sharedllm-layers``,
``sharedllm-throughput-sessions``, ``sharedllm-throughput-mesh``, ``sharedllm-sessions``, ``sharedllm-leases``), so
a test or a script can read what the page shows through BokehJS:
``Bokeh.documents[0].get_model_by_name("sharedllm-layers").data``.

The components are in :mod:`.components`; this module assembles the pages and installs them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from bokeh.layouts import column
from bokeh.models import Div
from bokeh.server.server import BokehTornado
from distributed.dashboard.components import DashboardComponent, add_periodic_callback
from distributed.dashboard.components.scheduler import BOKEH_THEME, env
from distributed.utils import log_errors

from sharedllm.scheduler_plugins.dashboard.charts import DeviceMemoryBars, LayerMap, Throughput
from sharedllm.scheduler_plugins.dashboard.read import (
    INTERVAL_MS,
    PAGE,
    machine_colors,
    mesh_steps,
    report_intervals,
    session_steps,
    update_table,
)
from sharedllm.scheduler_plugins.dashboard.tables import AuditTrail, Leases, MachineTable, MeshSummary, SessionTable

logger = logging.getLogger("sharedllm.dashboard")

# --- documents -----------------------------------------------------------------------------------------------------

COMPONENTS: tuple[type[DashboardComponent], ...] = (
    MeshSummary, MachineTable, DeviceMemoryBars, LayerMap, Throughput, SessionTable, Leases, AuditTrail,
)


def _finish(doc, title: str, extra: dict, template: bool = True) -> None:
    doc.title = title
    doc.theme = BOKEH_THEME
    if template:
        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)


HEADINGS = {MachineTable: "Machines", SessionTable: "Active sessions", Leases: "Leases and trust",
            AuditTrail: "Admin actions (audit trail)"}


@log_errors
def sharedllm_doc(scheduler, extra: dict, doc) -> None:
    """The whole page: every component, top to bottom."""
    parts = []
    for cls in COMPONENTS:
        comp = cls(scheduler, sizing_mode="stretch_width")
        comp.update()
        add_periodic_callback(doc, comp, INTERVAL_MS)
        if cls in HEADINGS:
            parts.append(Div(text=f"<h3 style='margin:8px 0 2px 0'>{HEADINGS[cls]}</h3>", sizing_mode="stretch_width"))
        parts.append(comp.root)
    doc.add_root(column(*parts, sizing_mode="stretch_width", name="sharedllm-page"))
    _finish(doc, "Dask: SharedLLM", extra)


def individual_doc(cls: type[DashboardComponent]) -> Callable:
    """A page holding one component, like distributed's ``individual_doc`` (for the "More..." menu)."""

    @log_errors
    def doc_fn(scheduler, extra: dict, doc) -> None:
        comp = cls(scheduler, sizing_mode="stretch_both")
        comp.update()
        add_periodic_callback(doc, comp, INTERVAL_MS)
        doc.add_root(comp.root)
        _finish(doc, f"Dask: SharedLLM {cls.__name__}", extra, template=False)

    return doc_fn


APPLICATIONS: dict[str, Callable] = {
    f"/{PAGE}": sharedllm_doc,
    "/individual-sharedllm-machines": individual_doc(MachineTable),
    "/individual-sharedllm-memory": individual_doc(DeviceMemoryBars),
    "/individual-sharedllm-layers": individual_doc(LayerMap),
    "/individual-sharedllm-throughput": individual_doc(Throughput),
    "/individual-sharedllm-sessions": individual_doc(SessionTable),
    "/individual-sharedllm-leases": individual_doc(Leases),
    "/individual-sharedllm-audit": individual_doc(AuditTrail),
}
MENU_NAMES = {
    "individual-sharedllm-machines": "SharedLLM Machines",
    "individual-sharedllm-memory": "SharedLLM Memory",
    "individual-sharedllm-layers": "SharedLLM Layers",
    "individual-sharedllm-throughput": "SharedLLM Throughput",
    "individual-sharedllm-sessions": "SharedLLM Sessions",
    "individual-sharedllm-leases": "SharedLLM Leases",
    "individual-sharedllm-audit": "SharedLLM Audit",
}


def _bokeh_apps(scheduler) -> list:
    return [a for a in getattr(getattr(scheduler, "http_application", None), "applications", []) or []
            if isinstance(a, BokehTornado)]


def install_dashboard(scheduler, plugin: Any = None) -> bool:
    """Serve the SharedLLM pages on ``scheduler``'s dashboard and list them in its menus.

    Returns False, and changes nothing, when the scheduler runs without the Bokeh dashboard (``--no-dashboard``).
    Idempotent per scheduler. ``plugin`` is unused: the pages find the plugin in ``scheduler.extensions`` at every
    update, so they keep working when a plugin is replaced.
    """
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables
    from tornado.ioloop import IOLoop

    apps = _bokeh_apps(scheduler)
    if not apps:
        logger.info("the scheduler has no Bokeh dashboard: no SharedLLM page")
        return False
    if any(f"/{PAGE}" in getattr(a, "app_paths", ()) for a in apps):
        return True
    prefix = getattr(apps[0], "prefix", "") or ""
    variables = template_variables(scheduler)  # memoized: the same lists the dashboard's own pages render
    if PAGE not in variables["pages"]:
        variables["pages"].append(PAGE)
    for url, name in MENU_NAMES.items():
        if not any(p["url"] == url for p in variables["plots"]):
            variables["plots"].append({"url": url, "name": name})
    variables["plots"].sort(key=lambda d: d["name"])

    bokeh_app = BokehApplication(APPLICATIONS, scheduler, prefix=prefix, template_variables=variables)
    scheduler.http_application.add_application(bokeh_app)
    bokeh_app.initialize(IOLoop.current())
    bokeh_app.start()
    logger.info("SharedLLM dashboard page at %s%s", prefix.rstrip("/") + "/" if prefix else "/", PAGE)
    return True


__all__ = [
    "APPLICATIONS",
    "AuditTrail",
    "DeviceMemoryBars",
    "LayerMap",
    "Leases",
    "MachineTable",
    "MeshSummary",
    "SessionTable",
    "Throughput",
    "install_dashboard",
    "machine_colors",
    "mesh_steps",
    "report_intervals",
    "session_steps",
    "update_table",
]
