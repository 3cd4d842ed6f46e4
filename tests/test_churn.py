# SPDX-License-Identifier: AGPL-3.0-or-later
"""Fault injection on the real loopback mesh: generations outlive lost machines, leases, hung peers, dead clients."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

from sharedllm.errors import MeshBusy
from tests.helpers import N_CTX, PROMPT, TWO, machine, stream_with_fault, wait_for

pytestmark = pytest.mark.mesh


def lease_waiters(mesh_cluster) -> float:
    """Sessions queued for leased machines, as the scheduler's ``/metrics`` says."""
    from prometheus_client.parser import text_string_to_metric_families

    base = mesh_cluster.dashboard_link.rsplit("/", 1)[0]
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "sharedllm_lease_waiters")


def ready_again(mesh, machine_id: str, old_pid: int | None = None, timeout: float = 90.0) -> dict:
    """Wait until a machine's rpc-server is ready (and, if given, is a new process) with its relay in front of it:
    placement leaves out a machine whose relay is not up yet."""
    def ready() -> dict | None:  # MachineTable.ready(): placement's own test (the scheduler has reached its relay)
        return next((m for m in mesh.machines().ready() if m["machine_id"] == machine_id), None)

    return wait_for(
        lambda: (m := ready()) and m["rpc"]["pid"] != old_pid and m["rpc"].get("relay") and m["rpc"],
        timeout=timeout, what=f"{machine_id}'s rpc-server to be ready",
    )


@pytest.mark.parametrize("api", ["blocking", "asyncio"])
def test_kill_rpc_server_mid_stream_the_stream_goes_on(mesh, local_greedy, api):
    victim = machine(mesh, "machine-2")["rpc"]
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        # the engine process started ahead for a recovery, once the handle is idle
        standby = wait_for(lambda: llm._standby, timeout=30, what="the standby engine process").proc.pid
        text, gap = stream_with_fault(llm, lambda: os.kill(victim["pid"], signal.SIGKILL), api=api)
        assert text == local_greedy["completion"]  # no duplicated, no missing text
        assert [r["lost"] for r in llm.recoveries] == ["machine-2"]
        assert llm.topology.machines == ["machine-1"]
        assert gap < 10
        # The recovery loaded into the standby, and a new one waits for the next.
        assert llm._engine.info["pid"] == standby
        spare = wait_for(lambda: (sb := llm._standby) and sb.alive and sb.proc.pid != standby and sb.proc.pid,
                         timeout=30, what="a new standby engine process")
        # The handle keeps working on its new topology.
        again = llm.create_completion(PROMPT, max_tokens=64, temperature=0)
        assert again["choices"][0]["text"] == local_greedy["completion"]
    with pytest.raises(ProcessLookupError):  # closing the handle stopped its standby
        os.kill(spare, 0)
    ready_again(mesh, "machine-2", victim["pid"])


def test_a_lost_machine_that_came_back_takes_the_session_again(mesh, local_greedy, monkeypatch):
    """Lost machines are left out of new leases for a while, not for ever: after each of the two machines was lost
    once, the session still has somewhere to go (found by the soak)."""
    from sharedllm.client import MeshModel

    monkeypatch.setattr(MeshModel, "EXCLUDE_FOR", 0.0)  # forget each loss at once (60 s in production)
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        first = machine(mesh, "machine-2")["rpc"]["pid"]
        text, _ = stream_with_fault(llm, lambda: os.kill(first, signal.SIGKILL))
        assert text == local_greedy["completion"] and llm.topology.machines == ["machine-1"]
        ready_again(mesh, "machine-2", first)
        second = machine(mesh, "machine-1")["rpc"]["pid"]
        text, _ = stream_with_fault(llm, lambda: os.kill(second, signal.SIGKILL))
        assert text == local_greedy["completion"] and llm.topology.machines == ["machine-2"]
        assert [r["lost"] for r in llm.recoveries] == ["machine-2", "machine-1"]
    ready_again(mesh, "machine-1", second)


def test_kill_worker_holding_the_actor_mid_stream(mesh_cluster, mesh, local_greedy):
    client = mesh_cluster.client()
    m2 = machine(mesh, "machine-2")
    worker_pid = client.run(os.getpid, workers=[m2["actor_worker"]])[m2["actor_worker"]]
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        text, gap = stream_with_fault(llm, lambda: os.kill(worker_pid, signal.SIGKILL))
        assert text == local_greedy["completion"]
        # The machine's rpc-server and relay do not die with the worker that supervised them: nothing to recover.
        assert llm.recoveries == []
        assert gap < 10
        # The nanny restarts the worker; the scheduler pins a new actor, which adopts the same rpc-server and relay.
        back = wait_for(lambda: (m := machine(mesh, "machine-2")) and m["actor_worker"] != m2["actor_worker"]
                        and m["rpc"]["state"] == "ready" and m["rpc"]["relay"] and m,
                        timeout=90, what="machine-2's new worker to adopt its rpc-server")
        assert back["rpc"]["pid"] == m2["rpc"]["pid"] and back["rpc"]["relay"]["pid"] == m2["rpc"]["relay"]["pid"]
        assert back["rpc"]["relay"]["lease"] == llm.session_id
        # And the session goes on through them.
        assert llm.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"] == text
        assert llm.recoveries == []


def test_three_machines_one_killed_continues_on_the_other_two(mesh_cluster, mesh, local_greedy):
    mesh_cluster.add_machine("machine-3")
    ready_again(mesh, "machine-3")
    three = ["machine-1", "machine-2", "machine-3"]
    try:
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=three) as llm:
            assert llm.topology.machines == three
            victim = machine(mesh, "machine-1")["rpc"]
            text, _ = stream_with_fault(llm, lambda: os.kill(victim["pid"], signal.SIGKILL))
            assert text == local_greedy["completion"]
            assert llm.topology.machines == ["machine-2", "machine-3"]
        ready_again(mesh, "machine-1", victim["pid"])
    finally:
        mesh_cluster.stop_machine("machine-3")
        wait_for(lambda: machine(mesh, "machine-3") is None, what="machine-3 to leave")


def test_a_hung_rpc_server_behind_a_timeout_is_found_by_the_probe(mesh, local_greedy, monkeypatch):
    """Without the watchdog's evidence (a hang that is not a stopped process), ``token_timeout`` and the HELLO probe
    still find the machine."""
    from sharedllm.client import MeshModel

    monkeypatch.setattr(MeshModel, "_suspect", lambda self: None)
    victim = machine(mesh, "machine-2")["rpc"]
    try:
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, token_timeout=3.0) as llm:
            text, gap = stream_with_fault(llm, lambda: os.kill(victim["pid"], signal.SIGSTOP))
            assert text == local_greedy["completion"]
            assert "stopped answering" in llm.recoveries[0]["reason"]
            assert gap < 20  # token_timeout + probe + reload: bounded, not forever
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
    ready_again(mesh, "machine-2")


def test_hung_rpc_server_is_detected_and_left_behind(mesh, local_greedy):
    victim = machine(mesh, "machine-2")["rpc"]
    stopped = []

    def hang():
        os.kill(victim["pid"], signal.SIGSTOP)
        stopped.append(time.perf_counter())

    try:
        # Default timeouts: the machine's heartbeat says its rpc-server is stopped, the watchdog acts on it.
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
            text, gap = stream_with_fault(llm, hang)
            assert text == local_greedy["completion"]
            assert llm.recoveries[0]["lost"] == "machine-2"
            assert "rpc-server stopped" in llm.recoveries[0]["reason"]
            assert gap < 10  # found in seconds, not at token_timeout (60 s)
    finally:
        if stopped:
            os.kill(victim["pid"], signal.SIGCONT)
    ready_again(mesh, "machine-2")


def test_two_clients_at_once_get_disjoint_machines_and_both_finish(mesh_cluster, local_greedy):
    """Two users, each through the user port with a key of their own, load at once."""
    keys = {name: mesh_cluster.add_user(f"churn-{name}") for name in ("a", "b")}
    results, errors = {}, []

    def run(name):
        try:
            with mesh_cluster.user_mesh(keys[name]) as m:
                with m.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, strategy="pack") as llm:
                    results[name] = ("".join(ch["choices"][0]["text"] for ch in llm.create_completion(
                        PROMPT, max_tokens=64, temperature=0, stream=True)), llm.topology.machines)
        except Exception as exc:  # surfaced by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert {results["a"][0], results["b"][0]} == {local_greedy["completion"]}
    assert set(results["a"][1]).isdisjoint(results["b"][1])  # each session leased its own machine


def test_a_leased_mesh_queues_then_refuses_with_mesh_busy(mesh_cluster, mesh):
    other = mesh_cluster.add_user("churn-queued")
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm, mesh_cluster.user_mesh(other) as m:
        t0 = time.perf_counter()
        with pytest.raises(MeshBusy, match="busy") as err:
            m.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, wait_timeout=2)
        assert 2 <= time.perf_counter() - t0 < 30
        assert "machine-1" in str(err.value)
        # A waiter is served in turn once the lease is released.
        assert lease_waiters(mesh_cluster) == 0
        got, failed = [], []

        def wait_in_turn() -> None:
            try:
                got.append(m.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, wait_timeout=120))
            except Exception as exc:  # surfaced by the assertions below
                failed.append(exc)

        waiter = threading.Thread(target=wait_in_turn)
        waiter.start()
        wait_for(lambda: lease_waiters(mesh_cluster) == 1 or failed, timeout=60,
                 what="the second user's session to queue for the leased machines")
        assert not got and not failed, failed  # still waiting: the first session holds the machines
        llm.close()  # release the lease: the waiter gets the machines
        waiter.join(timeout=120)
        assert not failed, failed
        assert got and got[0].topology.machines == TWO
        assert next(s for s in mesh.state()["sessions"] if s["session_id"] == got[0].session_id)["client"] == \
            "churn-queued"
        got[0].close()


def test_killed_client_lease_expires(mesh_cluster, mesh):
    """A user whose process dies keeps its lease for the connection's grace (it could come back), then loses it."""
    key = mesh_cluster.add_user("churn-killed")
    script = textwrap.dedent(f"""
        import time
        from sharedllm.client import Mesh
        llm = Mesh({mesh_cluster.user_address!r}).load("gemma-3-270m", n_ctx={N_CTX}, machines={TWO!r})
        print("LOADED", llm.session_id, llm._engine.log_path, llm._standby.log.name, flush=True)
        time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if k != "SHAREDLLM_KEY_FILE"}
    env["SHAREDLLM_KEY"] = key  # the user's key reaches the child as a user's does: from the environment
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("LOADED"), line
        sid, logs = line.split()[1], line.split()[2:]
        assert next(s for s in mesh.state()["sessions"] if s["session_id"] == sid)["client"] == "churn-killed"
        assert len(logs) == 2 and all(os.path.exists(p) for p in logs)  # its engine's and its standby's
        proc.kill()
        proc.wait()
        wait_for(lambda: all(s["session_id"] != sid for s in mesh.state()["sessions"]), timeout=60,
                 what="the killed client's lease to expire")
        ended = [s for s in mesh.state()["recent_sessions"] if s["session_id"] == sid]
        assert ended and ended[-1]["reason"].startswith("lease expired"), ended
        # Its engine processes exited with it, and took their logs (in /tmp) with them.
        wait_for(lambda: not any(os.path.exists(p) for p in logs), timeout=30, what="the orphans' logs to go")
    finally:
        if proc.poll() is None:
            proc.kill()
    # Its machines are usable again (the engine child exited with its parent).
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, wait_timeout=30) as llm:
        assert llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]


def test_version_skew_is_refused_in_placement(mesh):
    from sharedllm.errors import NoMachines
    from sharedllm.gguf import estimate_memory, read_gguf
    from sharedllm.models import default_model_path

    est = estimate_memory(read_gguf(default_model_path()), N_CTX).to_dict()
    with pytest.raises(NoMachines) as err:
        mesh.control.call("plan", estimate=est, machines=TWO, build={"rpc_protocol": "99.0.0"})
    assert "machine-1 (RPC protocol 7.0.0, client has 99.0.0)" in str(err.value)


def test_drain_stops_new_leases(mesh):
    from sharedllm.errors import MeshBusy, NoMachines

    out = mesh.control.call("drain", machine="machine-2")
    assert out["draining"] and list(out["sessions"]) == []
    try:
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, wait_timeout=30) as llm:
            assert llm.topology.machines == ["machine-1"]
        with pytest.raises((MeshBusy, NoMachines)):
            mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=["machine-2"], wait_timeout=1)
    finally:
        mesh.control.call("drain", machine="machine-2", undrain=True)
