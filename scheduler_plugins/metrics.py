# SPDX-License-Identifier: AGPL-3.0-or-later
"""Prometheus metrics of a SharedLLM mesh, served on the Dask scheduler's existing ``/metrics`` page.

Distributed's ``/metrics`` handler writes ``prometheus_client.generate_latest()`` of the process-wide default registry.
:func:`install_metrics` registers one :class:`MeshCollector` there (once per process, however many schedulers start in
it), so every scrape also carries the ``sharedllm_*`` series below, computed from the live plugin state:

==========================================================  =========  ============================================
name                                                        type       what
==========================================================  =========  ============================================
``sharedllm_machines{state}``                               gauge      machines by rpc-server state
``sharedllm_machine_info{machine,state,endpoint,...}``      gauge      1 per machine; its rpc-server and build
``sharedllm_device_memory_total_bytes{machine,device}``     gauge      RAM and every GPU of every machine
``sharedllm_device_memory_free_bytes{machine,device}``      gauge      free memory, as last reported
``sharedllm_device_memory_reserved_bytes{machine,device}``  gauge      what active sessions' stages take there
``sharedllm_gpu_utilization_ratio{machine,device}``         gauge      NVML utilization, 0 to 1
``sharedllm_sessions_active``                               gauge      models loaded on the mesh now
``sharedllm_session_tokens_per_second{session,model}``      gauge      last reported throughput of each session
                                                                       (aggregate over its concurrent requests)
``sharedllm_session_sequences{session,model,state}``        gauge      requests ``running`` in its engine's batch
                                                                       or ``waiting`` for a sequence
``sharedllm_session_batch_size{session,model}``             gauge      mean sequences per decode step
``sharedllm_session_passes_per_step{session,model}``        gauge      mean llama_decode passes per step (each a
                                                                       round trip to every machine)
``sharedllm_session_prompt_tokens{session,model,source}``   gauge      prompt tokens since its engine was loaded:
                                                                       ``read``, or ``cached`` (the prompt cache)
``sharedllm_session_draft_acceptance{session,model}``       gauge      share of the drafts its engine verified that
                                                                       were accepted (speculative decoding)
``sharedllm_session_tokens_per_step{session,model}``        gauge      tokens a sequence got per decode step (1
                                                                       without drafts)
``sharedllm_draft_tokens_total{result}``                    counter    draft tokens verified: ``accepted`` or
                                                                       ``rejected``
``sharedllm_tokens_generated_total``                        counter    tokens generated since the scheduler started
``sharedllm_requests_total``                                counter    completed requests
``sharedllm_time_to_first_token_seconds``                   histogram  per streamed request
``sharedllm_sessions_closed_total{reason}``                 counter    ``closed``, ``failed`` or ``expired`` (the
                                                                       client disconnected and lost its lease)
``sharedllm_engine_failures_total``                         counter    sessions closed because their engine failed
                                                                       (close reason ``failed...``)
``sharedllm_engine_recoveries_total``                       counter    engines a client rebuilt on the remaining
                                                                       machines after losing one (``recovered``)
``sharedllm_machines_leased`` / ``..._draining``            gauge      machines leased by a session / draining
``sharedllm_lease_waiters``                                 gauge      sessions queued for leased machines
``sharedllm_rpc_server_restarts_total{machine}``            counter    restarts of each machine's rpc-server by its
                                                                       actor (resets when the actor is re-pinned)
==========================================================  =========  ============================================

Observations the state does not keep (first-token times, requests, recoveries, closes and failures) are recorded by
two hook calls in ``MeshPlugin``'s session handlers: :func:`record_session_report` and :func:`record_session_close`.
They are plain Python, never raise, and need no ``prometheus_client``; only the collector does. The histogram takes one
first-token time per request: the first report of a request that carries one (later reports of a long stream may
carry one again).

What the state means per device and per stage comes from :mod:`sharedllm.views`, as on the dashboard page and in
``sharedllm status``.
"""

from __future__ import annotations

import bisect
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from sharedllm.views import device_memory

logger = logging.getLogger("sharedllm.metrics")

PREFIX = "sharedllm"
RPC_STATES = ("ready", "starting", "restarting", "stopped", "failed")
# Seconds. First tokens over the mesh take from tens of milliseconds (GPUs) to seconds (CPUs, long prompts).
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


# --- observations made by the plugin's handlers -------------------------------------------------------------------


class MeshObservations:
    """Counters and the first-token histogram of one scheduler's mesh. Thread-safe: scrapes run on the event loop,
    but nothing stops a collector from being read elsewhere."""

    def __init__(self, buckets: tuple[float, ...] = TTFT_BUCKETS):
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError(f"histogram buckets must be a non-empty increasing sequence, got {buckets}")
        self.buckets = tuple(float(b) for b in buckets)
        self.ttft_counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.ttft_sum = 0.0
        self.requests = 0
        self.closed: dict[str, int] = {"closed": 0, "failed": 0, "expired": 0}
        self.engine_failures = 0
        self.engine_recoveries = 0
        self._timed: set[str] = set()  # sessions whose current request already gave its first-token time
        self._lock = threading.Lock()

    def observe_ttft(self, seconds: float) -> None:
        """Count one time to first token."""
        with self._lock:
            self.ttft_counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.ttft_sum += seconds

    def ttft_histogram(self) -> tuple[list[tuple[str, float]], float]:
        """Cumulative buckets as Prometheus wants them (``le`` label, count), ending with ``+Inf``, and the sum."""
        with self._lock:
            counts, total = list(self.ttft_counts), self.ttft_sum
        out, acc = [], 0
        for le, n in zip([*map(_le, self.buckets), "+Inf"], counts, strict=True):
            acc += n
            out.append((le, float(acc)))
        return out, total

    @property
    def ttft_count(self) -> int:
        return sum(self.ttft_counts)

    def session_closed(self, session_id: str, reason: str) -> None:
        """Count one closed session; a reason starting with ``failed`` is an engine failure."""
        kind = close_kind(reason)
        with self._lock:
            self.closed[kind] = self.closed.get(kind, 0) + 1
            self.engine_failures += int(kind == "failed")
            self._timed.discard(session_id)

    def report(
        self, session_id: str, ttft_ms: float | None, request_done: int, recovered: bool
    ) -> None:
        """Count one throughput report: the first-token time (only the first one a request reports: later reports of
        a long stream may carry one again), the requests it completes (a report that waited for a scheduler that was
        away may carry several), an engine recovery."""
        with self._lock:
            first = ttft_ms is not None and ttft_ms >= 0 and session_id not in self._timed
            if first:
                self._timed.add(session_id)
            if request_done:
                self._timed.discard(session_id)
            self.requests += int(request_done)
            self.engine_recoveries += int(bool(recovered))
        if first:
            self.observe_ttft(float(ttft_ms) / 1000.0)


def close_kind(reason: str) -> str:
    """``failed`` (the engine failed, or failed to load), ``expired`` (the client went away) or ``closed``."""
    reason = str(reason)
    if reason.startswith("failed"):
        return "failed"
    if reason.startswith("lease expired"):
        return "expired"
    return "closed"


def _le(b: float) -> str:
    return repr(float(b))


_OBSERVATIONS: weakref.WeakKeyDictionary[Any, MeshObservations] = weakref.WeakKeyDictionary()


def observations(data: Any) -> MeshObservations:
    """The observations of one mesh (``MeshPlugin.data``; created on first use)."""
    obs = _OBSERVATIONS.get(data)
    if obs is None:
        obs = _OBSERVATIONS[data] = MeshObservations()
    return obs


def record_session_report(
    data: Any, session_id: str, ttft_ms: float | None, request_done: int, recovered: bool = False
) -> None:
    """Hook for ``MeshPlugin.handle_session_report``: first-token time, completed requests, recoveries. Never
    raises. (Tokens are counted by the plugin itself, in ``tokens_total``.)"""
    try:
        observations(data).report(session_id, ttft_ms, request_done, recovered)
    except Exception:
        logger.exception("sharedllm metrics: could not record a session report")


def record_session_close(data: Any, session_id: str, reason: str) -> None:
    """Hook for ``MeshPlugin``'s session close: closed sessions and engine failures. Never raises."""
    try:
        observations(data).session_closed(session_id, reason)
    except Exception:
        logger.exception("sharedllm metrics: could not record a closed session")


# --- the Prometheus collector -------------------------------------------------------------------------------------


class MeshCollector:
    """A ``prometheus_client`` custom collector for the ``sharedllm_*`` series of the running mesh plugin.

    One instance serves the whole process (the default registry is process-wide, as distributed's own collectors are).
    When several schedulers live in one process, the most recently installed plugin whose scheduler still runs is the
    one reported.
    """

    def __init__(self) -> None:
        self._plugins: list[weakref.ref] = []

    def track(self, plugin: Any) -> None:
        """Report ``plugin`` from now on (idempotent)."""
        self._plugins = [r for r in self._plugins if r() is not None and r() is not plugin]
        self._plugins.append(weakref.ref(plugin))

    def plugin(self) -> Any | None:
        """The plugin to report: the latest one whose scheduler is running."""
        for ref in reversed(self._plugins):
            p = ref()
            sched = getattr(p, "scheduler", None)
            if p is not None and sched is not None and str(getattr(sched, "status", "")).endswith("running"):
                return p
        return None

    def collect(self) -> Iterator[Any]:
        """Yield the metric families; nothing when no mesh plugin runs in this process."""
        plugin = self.plugin()
        if plugin is None:
            return
        try:
            yield from _families(plugin)
        except Exception:  # a scrape must never break the scheduler's /metrics page
            logger.exception("sharedllm metrics: collecting failed")


def _families(plugin: Any) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    machines = plugin.machines()
    sessions = [s.to_dict() for s in plugin.sessions.values()]
    obs = observations(plugin.data)

    states = GaugeMetricFamily(f"{PREFIX}_machines", "Machines of the mesh by rpc-server state", labels=["state"])
    counts = dict.fromkeys(RPC_STATES, 0)
    for m in machines:
        st = (m.get("rpc") or {}).get("state") or "unknown"
        counts[st] = counts.get(st, 0) + 1
    for st, n in counts.items():
        states.add_metric([st], n)
    yield states

    info = GaugeMetricFamily(f"{PREFIX}_machine_info", "One per machine: its rpc-server state, endpoint and build",
                             labels=["machine", "state", "endpoint", "protocol", "llama_cpp_python"])
    restarts = CounterMetricFamily(f"{PREFIX}_rpc_server_restarts",
                                   "Restarts of each machine's rpc-server by its actor", labels=["machine"])
    for m in machines:
        rpc, build = m.get("rpc") or {}, m.get("build") or {}
        info.add_metric([m["machine_id"], str(rpc.get("state") or "unknown"), str(rpc.get("endpoint") or ""),
                         str(rpc.get("protocol") or ""), str(build.get("llama_cpp_python") or "")], 1)
        restarts.add_metric([m["machine_id"]], float(rpc.get("restarts") or 0))
    yield info
    yield restarts

    labels = ["machine", "device", "kind"]
    total = GaugeMetricFamily(f"{PREFIX}_device_memory_total_bytes", "Memory of each device (RAM or GPU)",
                              labels=labels)
    free = GaugeMetricFamily(f"{PREFIX}_device_memory_free_bytes", "Free memory of each device, as last reported",
                             labels=labels)
    reserved = GaugeMetricFamily(f"{PREFIX}_device_memory_reserved_bytes",
                                 "Memory the active sessions' stages take on each device", labels=labels)
    util = GaugeMetricFamily(f"{PREFIX}_gpu_utilization_ratio", "GPU utilization from NVML, 0 to 1",
                             labels=["machine", "device"])
    for d in device_memory(machines, sessions):
        key = [d.machine_id, d.device, d.kind]
        total.add_metric(key, d.total)
        free.add_metric(key, d.free)
        reserved.add_metric(key, d.reserved)
        if d.utilization is not None:
            util.add_metric([d.machine_id, d.device], d.utilization)
    yield from (total, free, reserved, util)

    yield GaugeMetricFamily(f"{PREFIX}_sessions_active", "Models loaded on the mesh now", value=len(sessions))
    tps = GaugeMetricFamily(f"{PREFIX}_session_tokens_per_second", "Last reported tokens per second of each session",
                            labels=["session", "model"])
    for s in sessions:
        tps.add_metric([s["session_id"], s.get("model", "")], float(s.get("last_tok_s") or 0.0))
    yield tps
    seqs = GaugeMetricFamily(f"{PREFIX}_session_sequences", "Requests of each session running in its engine's "
                             "batch or waiting for a sequence, as last reported", labels=["session", "model", "state"])
    batch = GaugeMetricFamily(f"{PREFIX}_session_batch_size", "Mean sequences decoded per step by each session's "
                              "engine, as last reported", labels=["session", "model"])
    passes = GaugeMetricFamily(f"{PREFIX}_session_passes_per_step", "Mean llama_decode passes per step of each "
                               "session's engine (a pass is a round trip to every machine: exact batches take one per "
                               "prompt chunk and per run of consecutive sequence ids, fast ones one), as last reported",
                               labels=["session", "model"])
    prompt = GaugeMetricFamily(f"{PREFIX}_session_prompt_tokens", "Prompt tokens of each session's requests since "
                               "its engine was loaded: read, or found in its prompt cache (cached)",
                               labels=["session", "model", "source"])
    for s in sessions:
        load = s.get("load") or {}
        for state in ("running", "waiting"):
            seqs.add_metric([s["session_id"], s.get("model", ""), state], float(load.get(state, 0.0)))
        batch.add_metric([s["session_id"], s.get("model", "")], float(load.get("batch", 0.0)))
        passes.add_metric([s["session_id"], s.get("model", "")], float(load.get("passes_per_step", 0.0)))
        cached = float(load.get("cached_tokens", 0.0))
        prompt.add_metric([s["session_id"], s.get("model", ""), "read"], float(load.get("prompt_tokens", 0.0)) - cached)
        prompt.add_metric([s["session_id"], s.get("model", ""), "cached"], cached)
    yield from (seqs, batch, passes, prompt)
    acceptance = GaugeMetricFamily(f"{PREFIX}_session_draft_acceptance", "Share of the drafts each session's engine "
                                   "verified that were accepted (speculative decoding), as last reported",
                                   labels=["session", "model"])
    per_step = GaugeMetricFamily(f"{PREFIX}_session_tokens_per_step", "Tokens a sequence of each session got per "
                                 "decode step (drafts accepted and the token after them), as last reported",
                                 labels=["session", "model"])
    for s in sessions:
        draft = (s.get("load") or {}).get("draft")
        if isinstance(draft, dict):
            key = [s["session_id"], s.get("model", "")]
            if draft.get("drafted"):
                acceptance.add_metric(key, draft.get("accepted", 0.0) / draft["drafted"])
            if draft.get("steps"):
                per_step.add_metric(key, draft.get("tokens", 0.0) / draft["steps"])
    drafts = CounterMetricFamily(f"{PREFIX}_draft_tokens", "Draft tokens verified by the mesh (speculative decoding), "
                                 "by result", labels=["result"])
    for result, n in plugin.data.drafts_total.items():
        drafts.add_metric([result], float(n))
    yield from (acceptance, per_step, drafts)

    yield CounterMetricFamily(f"{PREFIX}_tokens_generated", "Tokens generated on the mesh since the scheduler started",
                              value=float(plugin.tokens_total))
    yield CounterMetricFamily(f"{PREFIX}_requests", "Completed generation requests", value=float(obs.requests))
    buckets, ttft_sum = obs.ttft_histogram()
    yield HistogramMetricFamily(f"{PREFIX}_time_to_first_token_seconds", "Time to first token of streamed requests",
                                buckets=buckets, sum_value=ttft_sum)
    closed = CounterMetricFamily(f"{PREFIX}_sessions_closed", "Sessions closed, by how they ended", labels=["reason"])
    for reason, n in obs.closed.items():
        closed.add_metric([reason], float(n))
    yield closed
    yield CounterMetricFamily(f"{PREFIX}_engine_failures", "Sessions closed because their engine failed",
                              value=float(obs.engine_failures))
    yield CounterMetricFamily(f"{PREFIX}_engine_recoveries",
                              "Engines rebuilt on the remaining machines after a machine was lost",
                              value=float(obs.engine_recoveries))
    yield GaugeMetricFamily(f"{PREFIX}_machines_leased", "Machines leased by a session",
                            value=len(plugin.data.leased_machines()))
    yield GaugeMetricFamily(f"{PREFIX}_machines_draining", "Machines that take no new lease",
                            value=len(plugin.data.draining))
    yield GaugeMetricFamily(f"{PREFIX}_lease_waiters", "Sessions waiting in the queue for leased machines",
                            value=plugin.leases.waiting)
    from sharedllm.scheduler_plugins import lockdown

    refused = CounterMetricFamily(f"{PREFIX}_refusals", "Operations refused for want of a role (the user port and the "
                                  "Dask port)", labels=["action", "role"])
    counts: dict[tuple[str, str], int] = dict(lockdown.refusals)
    for k, n in (plugin.ops.refusals if plugin.ops is not None else {}).items():
        counts[k] = counts.get(k, 0) + n
    for (action, role), n in sorted(counts.items()):
        refused.add_metric([action, role], float(n))
    yield refused
    door = plugin.user_port
    if door is not None:
        yield GaugeMetricFamily(f"{PREFIX}_user_port_connections", "Connections open on the user port",
                                value=door.state()["connections"])
        door_refused = CounterMetricFamily(f"{PREFIX}_user_port_refused", "Connections the user port refused",
                                           labels=["reason"])
        for reason, n in sorted(door.refused.items()):
            door_refused.add_metric([reason], float(n))
        yield door_refused


_COLLECTOR: MeshCollector | None = None
_COLLECTOR_LOCK = threading.Lock()


def install_metrics(plugin: Any) -> bool:
    """Add the ``sharedllm_*`` series to the scheduler's ``/metrics`` page. False when ``prometheus_client`` is
    missing (distributed then serves a page saying metrics are unavailable). Idempotent, once per process."""
    global _COLLECTOR
    observations(plugin.data)
    try:
        import prometheus_client
    except ImportError:
        logger.warning("prometheus_client is not installed: no sharedllm metrics on /metrics")
        return False
    with _COLLECTOR_LOCK:
        if _COLLECTOR is None:
            collector = MeshCollector()
            collector.track(plugin)
            prometheus_client.REGISTRY.register(collector)
            _COLLECTOR = collector
        else:
            _COLLECTOR.track(plugin)
    logger.info("sharedllm metrics installed on the scheduler's /metrics")
    return True


__all__ = [
    "MeshCollector",
    "MeshObservations",
    "close_kind",
    "install_metrics",
    "observations",
    "record_session_close",
    "record_session_report",
]
