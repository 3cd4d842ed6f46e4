# SPDX-License-Identifier: AGPL-3.0-or-later
"""Seeing the mesh: the SharedLLM dashboard page in a real headless Chromium, the Prometheus metrics on the scheduler's
``/metrics``, and ``sharedllm status``; all on the shared loopback mesh, with the real model generating.

The browser is Debian's ``chromium`` with ``chromedriver``, driven by Selenium (``.ci/run`` installs them). Without
them the page test is skipped on a developer's machine, and fails under CI (``CI`` set), so CI never skips silently.
Set ``SHAREDLLM_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to keep the page's screenshot (the README's picture).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import N_CTX, PROMPT, TWO, admin_env, run_cli, wait_for

pytestmark = pytest.mark.mesh

logger = logging.getLogger(__name__)

BIN = Path(sys.executable).parent
SCREENSHOT_ENV = "SHAREDLLM_DASHBOARD_SCREENSHOT"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,1700",
)
# Installed before any script of the page runs: collects uncaught errors, rejected promises and console.error calls.
ERROR_HOOK = """
window.__errors = [];
window.addEventListener('error', (e) => window.__errors.push('error: ' + (e.message || String(e))));
window.addEventListener('unhandledrejection', (e) => window.__errors.push('unhandled rejection: ' + String(e.reason)));
const __console_error = console.error;
console.error = function (...args) { window.__errors.push('console.error: ' + args.map(String).join(' '));
                                     return __console_error.apply(this, args); };
"""
# What the page shows, read from BokehJS: every named ColumnDataSource of the document, as plain JSON.
PAGE_DATA = """
const out = {};
if (!window.Bokeh || !Bokeh.documents || !Bokeh.documents.length) return null;
for (const doc of Bokeh.documents) {
  for (const name of arguments[0]) {
    const model = doc.get_model_by_name(name);
    if (model == null) continue;
    const cols = {};
    for (const [k, v] of Object.entries(model.data)) cols[k] = Array.from(v);
    out[name] = cols;
  }
}
return JSON.stringify(out);
"""
SOURCES = ["sharedllm-machines", "sharedllm-memory", "sharedllm-layers", "sharedllm-sessions",
           "sharedllm-throughput-mesh", "sharedllm-throughput-sessions", "sharedllm-leases"]


def _browser_paths() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    return (chromium, driver) if chromium and driver else None


@pytest.fixture
def browser():
    """A headless Chromium with a fresh profile; stopped (chromedriver too) at the end."""
    paths = _browser_paths()
    if paths is None:
        msg = "chromium, chromedriver or selenium is missing (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}: .ci/run installs them, CI must not skip the dashboard page test")
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sharedllm-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=opts)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_HOOK})
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _page_data(driver) -> dict:
    raw = driver.execute_script(PAGE_DATA, SOURCES)
    return json.loads(raw) if raw else {}


def _js_errors(driver) -> list[str]:
    errors = list(driver.execute_script("return window.__errors || []") or [])
    errors += [f"{e['level']}: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return errors


def _base(mesh_cluster) -> str:
    assert mesh_cluster.dashboard_link, "the shared mesh runs without a dashboard"
    return mesh_cluster.dashboard_link.rsplit("/", 1)[0]


def _generate_until(llm, stop: threading.Event) -> tuple[threading.Thread, dict]:
    """Stream completions of up to 200 tokens, one after the other, until ``stop`` is set."""
    result: dict = {"tokens": 0, "streams": 0, "error": None}

    def run() -> None:
        try:
            while not stop.is_set():
                for _ in llm.create_completion(PROMPT, max_tokens=200, temperature=0, stream=True):
                    result["tokens"] += 1
                result["streams"] += 1
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, name="dashboard-test-generation", daemon=True)
    thread.start()
    return thread, result


def test_page_shows_machines_topology_and_live_throughput(mesh_cluster, mesh, browser, tmp_path):
    base = _base(mesh_cluster)
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        expected_stages = {(s.machine_id, s.first_slot, s.end_slot) for s in llm.topology.stages}
        expected_labels = {f"{s.machine_id}: {s.describe_layers()}" for s in llm.topology.stages}
        stop = threading.Event()
        thread, result = _generate_until(llm, stop)
        try:
            browser.get(f"{base}/sharedllm")

            def generating() -> dict | None:
                data = _page_data(browser)
                sessions = data.get("sharedllm-sessions", {})
                return data if llm.session_id in sessions.get("session", []) and any(sessions["tokens"]) else None

            data = wait_for(generating, timeout=90, what="the page to show the session generating")
            machines = data["sharedllm-machines"]
            assert set(TWO) <= set(machines["machine"])
            assert all(st == "ready" for m, st in zip(machines["machine"], machines["state"], strict=True) if m in TWO)
            layers = data["sharedllm-layers"]
            mine = [i for i, s in enumerate(layers["session"]) if s == llm.session_id]
            assert {(layers["machine"][i], layers["first"][i], layers["end"][i]) for i in mine} == expected_stages
            assert {layers["label"][i] for i in mine} == expected_labels
            leases = data["sharedllm-leases"]  # every machine's trust score, as its trust record has it
            records = {r["machine_id"]: r for r in mesh.control.call("trust")["machines"]}
            for m in TWO:
                cell = leases["trust"][leases["machine"].index(m)]
                assert cell.split(" ")[0] == f"{records[m]['score']:.2f}", (m, cell, records[m])
                assert ("(probation)" in cell) == records[m]["probation"], (m, cell)
            memory = data["sharedllm-memory"]
            for st in llm.topology.stages:  # what the session reserves on each machine's RAM, from its topology
                row = memory["device"].index(f"{st.machine_id} · RAM")
                assert memory["reserved"][row] >= st.total_bytes

            # Live: the session's token count grows while the page is open, and the timeline gets the mesh's rate.
            tokens = data["sharedllm-sessions"]["tokens"][data["sharedllm-sessions"]["session"].index(llm.session_id)]

            def grown() -> dict | None:
                d = _page_data(browser)
                s = d.get("sharedllm-sessions", {})
                mine = s["tokens"][s["session"].index(llm.session_id)] if llm.session_id in s.get("session", []) else 0
                more = mine > tokens
                rate = max(d.get("sharedllm-throughput-mesh", {}).get("tok_s") or [0]) > 0
                return d if more and rate else None

            data = wait_for(grown, timeout=90, what="the page to update the session's tokens and throughput")
            assert any(llm.session_id in name for name in data["sharedllm-throughput-sessions"]["session"])
            assert browser.find_elements("css selector", "a[href='sharedllm']"), "no SharedLLM link in the top bar"
            menu = browser.execute_script("return Array.from(document.querySelectorAll('.dropdown-content a'))"
                                          ".map(a => a.getAttribute('href'))")
            assert "individual-sharedllm-layers" in menu and "individual-sharedllm-memory" in menu

            if os.environ.get(SCREENSHOT_ENV):
                time.sleep(8)  # a few more throughput reports on the timeline for the picture
            shot = tmp_path / "dashboard.png"
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
            if os.environ.get(SCREENSHOT_ENV):
                target = Path(os.environ[SCREENSHOT_ENV])
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, target)
                logger.info("dashboard screenshot saved to %s", target)
            assert _js_errors(browser) == []

            # Every single-figure page of the "More..." menu renders without errors too.
            for page in ("individual-sharedllm-layers", "individual-sharedllm-memory",
                         "individual-sharedllm-throughput", "individual-sharedllm-machines"):
                browser.get(f"{base}/{page}")
                wait_for(lambda: _page_data(browser), timeout=30, what=f"{page} to render")
                assert _js_errors(browser) == [], page
        finally:
            stop.set()
            browser.quit()  # Chromium competes with the rpc-servers for the CPUs: let the generation finish faster
            thread.join(timeout=240)
        assert not thread.is_alive(), "the generation did not finish"
        assert result["error"] is None, result["error"]
        assert result["tokens"] > 0


def _metrics(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _value(families: dict, family: str, sample: str | None = None, **labels: str) -> float:
    fam = families[family]
    for s in fam.samples:
        if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {sample or family}{labels} in {fam.samples}")


def test_metrics_endpoint_has_sharedllm_series_after_a_generation(mesh_cluster, mesh):
    base = _base(mesh_cluster)
    before = _metrics(base)
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        chunks = list(llm.create_completion(PROMPT, max_tokens=16, temperature=0, stream=True))
        during = _metrics(base)
    after = _metrics(base)

    assert _value(after, "sharedllm_machines", state="ready") >= 2
    for m in TWO:
        assert _value(after, "sharedllm_machine_info", machine=m, state="ready") == 1
        assert _value(after, "sharedllm_device_memory_free_bytes", machine=m, device="RAM") > 0
        assert _value(after, "sharedllm_device_memory_total_bytes", machine=m, device="RAM") > 0
        assert _value(after, "sharedllm_rpc_server_restarts", "sharedllm_rpc_server_restarts_total", machine=m) >= 0
        assert _value(during, "sharedllm_device_memory_reserved_bytes", machine=m, device="RAM") > 0
    assert _value(during, "sharedllm_sessions_active") >= 1
    assert _value(during, "sharedllm_machines_leased") >= 2
    assert _value(after, "sharedllm_sessions_active") == _value(before, "sharedllm_sessions_active")

    tokens = "sharedllm_tokens_generated"
    assert after[tokens].type == "counter"
    # Tokens, not stream chunks: 16 tokens came in 17 chunks (the last one carries the finish reason).
    assert len(chunks) == 17
    assert _value(after, tokens, f"{tokens}_total") - _value(before, tokens, f"{tokens}_total") == 16

    ttft = "sharedllm_time_to_first_token_seconds"
    assert after[ttft].type == "histogram"
    count = _value(after, ttft, f"{ttft}_count")
    assert count - _value(before, ttft, f"{ttft}_count") == 1  # one streamed request, one first token
    assert _value(after, ttft, f"{ttft}_bucket", le="+Inf") == count
    assert _value(after, ttft, f"{ttft}_sum") > 0
    buckets = [s.value for s in after[ttft].samples if s.name == f"{ttft}_bucket"]
    assert buckets == sorted(buckets)

    closed = "sharedllm_sessions_closed"
    assert _value(after, closed, f"{closed}_total", reason="closed") > _value(before, closed, f"{closed}_total",
                                                                              reason="closed")
    for counter in ("sharedllm_engine_failures", "sharedllm_engine_recoveries", "sharedllm_requests"):
        assert after[counter].type == "counter" and _value(after, counter, f"{counter}_total") >= 0
    assert _value(after, "sharedllm_requests", "sharedllm_requests_total") > _value(before, "sharedllm_requests",
                                                                                    "sharedllm_requests_total")


def _cli(*args: str, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=120, env=env)


def test_status_json_matches_the_scheduler_and_the_table_shows_it(mesh_cluster, mesh):
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        sum(1 for _ in llm.create_completion(PROMPT, max_tokens=8, temperature=0, stream=True))
        sid, stages = llm.session_id, llm.topology.stages
        out = _cli("status", "--scheduler", mesh_cluster.user_address, "--json", env=admin_env(mesh_cluster))
        state = json.loads(json.dumps(mesh.state(), default=str))  # as JSON has it: lists, not tuples
        table = _cli("status", "--scheduler", mesh_cluster.user_address, env=admin_env(mesh_cluster))
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert set(shown) == set(state)
    key = ("machine_id", "workers", "actor_worker", "build")
    assert [{k: m[k] for k in key} for m in shown["machines"]] == [{k: m[k] for k in key} for m in state["machines"]]
    assert [(m["rpc"]["state"], m["rpc"].get("endpoint"), m["rpc"].get("protocol")) for m in shown["machines"]] == [
        (m["rpc"]["state"], m["rpc"].get("endpoint"), m["rpc"].get("protocol")) for m in state["machines"]]
    assert [s["session_id"] for s in shown["sessions"]] == [s["session_id"] for s in state["sessions"]]
    assert sid in [s["session_id"] for s in shown["sessions"]]
    for a, b in zip(shown["sessions"], state["sessions"], strict=True):
        assert a["topology"] == b["topology"] and a["model"] == b["model"] and a["tokens"] == b["tokens"]
    assert shown["tokens_total"] == state["tokens_total"]

    assert table.returncode == 0, table.stderr
    for m in state["machines"]:
        assert m["machine_id"] in table.stdout
        assert m["rpc"]["state"] in table.stdout
    assert sid in table.stdout
    for st in stages:
        assert f"{st.machine_id}: {st.describe_layers()}" in table.stdout
    assert f"{state['tokens_total']} tokens generated" in table.stdout


def test_scheduler_without_dashboard_serves_metrics_and_no_page():
    """`--no-dashboard`: the mesh plugin starts, /metrics carries the sharedllm series, the page is not there."""
    from sharedllm.local import LocalMesh

    with LocalMesh(machines=0, dashboard=False) as lm:
        base = _base(lm)
        families = _metrics(base)
        assert _value(families, "sharedllm_machines", state="ready") == 0
        assert "sharedllm_tokens_generated" in families
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/sharedllm", timeout=30)
        assert err.value.code == 404
        log = lm.scheduler.log.read_text(errors="replace")
        assert "could not install" not in log and "Traceback" not in log


# --- the pure parts: what the page and the metrics compute from the state ------------------------------------------


def _state() -> tuple[list[dict], list[dict]]:
    gib_ = 1 << 30
    machines = [
        {"machine_id": "a", "workers": ["tcp://x:1"], "build": {"llama_cpp_python": "0.3.36"},
         "resources": {"cpu_count": 8, "ram_total": 32 * gib_, "ram_available": 20 * gib_, "nvml_error": None,
                       "gpus": [{"index": 0, "name": "H100", "memory_total": 80 * gib_, "memory_free": 70 * gib_,
                                 "utilization": 50}]},
         "rpc": {"state": "ready", "endpoint": "x:50052", "protocol": "7.0.0", "restarts": 2,
                 "devices": [{"name": "CUDA0", "kind": "gpu", "memory_total": 80 * gib_, "memory_free": 79 * gib_}]}},
        {"machine_id": "b", "workers": ["tcp://y:1"], "resources": {"cpu_count": 4, "ram_total": 16 * gib_,
                                                                   "ram_available": 8 * gib_, "gpus": []},
         "rpc": {"state": "restarting", "reason": "exited", "restarts": 1}},
    ]
    stage = {"endpoint": "x:50052", "device_index": 0, "kv_bytes": gib_, "compute_bytes": gib_}
    sessions = [{"session_id": "s1", "model": "m.gguf", "machines": ["a", "b"], "topology": {"n_layer": 10, "stages": [
        {**stage, "machine_id": "a", "device_name": "CUDA0", "first_slot": 0, "n_slots": 8, "weight_bytes": 8 * gib_,
         "has_output": False},
        {**stage, "machine_id": "b", "device_name": "CPU", "first_slot": 8, "n_slots": 3, "weight_bytes": 3 * gib_,
         "has_output": True},
    ]}}]
    return machines, sessions


def test_device_memory_and_stages_from_the_state():
    from sharedllm.views import device_memory, session_stages

    machines, sessions = _state()
    devs = {(d.machine_id, d.device): d for d in device_memory(machines, sessions)}
    assert set(devs) == {("a", "RAM"), ("a", "CUDA0"), ("b", "RAM")}
    gpu = devs[("a", "CUDA0")]
    assert gpu.reserved == 10 << 30 and gpu.utilization == 0.5 and gpu.kind == "gpu"
    assert gpu.used_other == 0 and gpu.used_other + gpu.reserved + gpu.free_shown == gpu.total
    assert devs[("a", "RAM")].reserved == 0
    ram_b = devs[("b", "RAM")]
    assert ram_b.reserved == 5 << 30 and ram_b.used_other == 3 << 30
    assert [(s.machine_id, s.first, s.end, s.layers) for s in session_stages(sessions)] == [
        ("a", 0, 8, "0-7"), ("b", 8, 11, "8-9 + output")]


def test_throughput_steps_sum_the_sessions():
    from sharedllm.scheduler_plugins.dashboard import mesh_steps, report_intervals, session_steps

    one = report_intervals([(10.0, 5.0), (12.0, 7.0), (20.0, 4.0)], span=3.0)
    assert one == [(7.0, 10.0, 5.0), (10.0, 12.0, 7.0), (17.0, 20.0, 4.0)]
    xs, ys = session_steps(one, idle=True)
    assert xs == [7.0, 10.0, 10.0, 12.0, 12.0, 17.0, 17.0, 20.0, 20.0] and ys[-1] == 0.0 and max(ys) == 7.0
    other = report_intervals([(11.0, 1.0)], span=3.0)
    xs, ys = mesh_steps(one + other, idle=False)
    at = {x: y for x, y in zip(xs[::2], ys[::2], strict=True)}  # the rate from each cut on
    assert at[7.0] == 5.0 and at[8.0] == 6.0 and at[10.0] == 8.0 and at[11.0] == 7.0 and at[12.0] == 0.0
    assert at[17.0] == 4.0


def test_collector_series_and_one_first_token_per_request():
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from sharedllm.scheduler_plugins import metrics

    machines, sessions = _state()

    class Sess:
        def __init__(self, d: dict):
            self.d, self.session_id, self.machines = d, d["session_id"], d["machines"]

        def to_dict(self) -> dict:
            return {**self.d, "last_tok_s": 12.5,
                    "load": {"running": 3.0, "waiting": 1.0, "batch": 2.5, "passes_per_step": 1.5, "parallel": 4.0,
                             "prompt_tokens": 1000.0, "cached_tokens": 750.0,
                             "draft": {"drafter": "lookup", "drafted": 80.0, "accepted": 60.0, "steps": 40.0,
                                       "tokens": 100.0}}}

    class Data:  # what the collector reads of MeshPlugin.data (the observations are kept per data object)
        draining = {"b"}
        drafts_total = {"accepted": 60.0, "rejected": 20.0}

        def leased_machines(self):
            return {"a", "b"}

    class Plugin:  # what the collector reads of MeshPlugin
        scheduler = type("S", (), {"status": "Status.running"})()
        tokens_total = 42
        data = Data()
        leases = type("L", (), {"waiting": 1})()
        ops = None  # no role-checked operations: only the Dask port's refusals are counted
        user_port = None  # a scheduler without a user port has no user-port series

        def machines(self):
            return machines

    plugin = Plugin()
    plugin.sessions = {s["session_id"]: Sess(s) for s in sessions}
    metrics.record_session_report(plugin.data, "s1", 300.0, request_done=False)
    metrics.record_session_report(plugin.data, "s1", 2300.0, request_done=True)  # a later report of the same request
    metrics.record_session_report(plugin.data, "s1", 700.0, request_done=True, recovered=True)
    metrics.record_session_close(plugin.data, "s1", "failed: lost machine b")
    metrics.record_session_close(plugin.data, "s0", "lease expired: client disconnected")

    collector = metrics.MeshCollector()
    collector.track(plugin)
    collector.track(plugin)  # idempotent
    registry = CollectorRegistry()
    registry.register(collector)
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert _value(fams, "sharedllm_machines", state="ready") == 1
    assert _value(fams, "sharedllm_machines", state="restarting") == 1
    assert _value(fams, "sharedllm_rpc_server_restarts", "sharedllm_rpc_server_restarts_total", machine="a") == 2
    assert _value(fams, "sharedllm_device_memory_free_bytes", machine="a", device="CUDA0") == 70 << 30
    assert _value(fams, "sharedllm_device_memory_reserved_bytes", machine="b", device="RAM") == 5 << 30
    assert _value(fams, "sharedllm_gpu_utilization_ratio", machine="a", device="CUDA0") == 0.5
    assert _value(fams, "sharedllm_sessions_active") == 1
    assert _value(fams, "sharedllm_session_tokens_per_second", session="s1") == 12.5
    assert _value(fams, "sharedllm_session_sequences", session="s1", state="waiting") == 1
    assert _value(fams, "sharedllm_session_batch_size", session="s1") == 2.5
    assert _value(fams, "sharedllm_session_passes_per_step", session="s1") == 1.5
    assert _value(fams, "sharedllm_session_prompt_tokens", session="s1", source="cached") == 750
    assert _value(fams, "sharedllm_session_prompt_tokens", session="s1", source="read") == 250
    assert _value(fams, "sharedllm_tokens_generated", "sharedllm_tokens_generated_total") == 42
    assert _value(fams, "sharedllm_session_draft_acceptance", session="s1") == 0.75
    assert _value(fams, "sharedllm_session_tokens_per_step", session="s1") == 2.5
    assert _value(fams, "sharedllm_draft_tokens", "sharedllm_draft_tokens_total", result="rejected") == 20
    ttft = "sharedllm_time_to_first_token_seconds"
    assert _value(fams, ttft, f"{ttft}_count") == 2  # 0.3 s and 0.7 s; the 2.3 s of the same request is not one
    assert _value(fams, ttft, f"{ttft}_sum") == pytest.approx(1.0)
    assert _value(fams, ttft, f"{ttft}_bucket", le="0.5") == 1
    assert _value(fams, "sharedllm_requests", "sharedllm_requests_total") == 2
    assert _value(fams, "sharedllm_engine_failures", "sharedllm_engine_failures_total") == 1
    assert _value(fams, "sharedllm_engine_recoveries", "sharedllm_engine_recoveries_total") == 1
    assert _value(fams, "sharedllm_sessions_closed", "sharedllm_sessions_closed_total", reason="expired") == 1
    assert _value(fams, "sharedllm_machines_leased") == 2 and _value(fams, "sharedllm_machines_draining") == 1
    assert _value(fams, "sharedllm_lease_waiters") == 1
    assert "sharedllm_user_port_connections" not in fams

    plugin.scheduler.status = "Status.closed"  # a stopped scheduler's plugin is not reported
    assert list(collector.collect()) == []
