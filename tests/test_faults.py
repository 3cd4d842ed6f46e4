# SPDX-License-Identifier: AGPL-3.0-or-later
"""Faults that are not a lost machine: a poisoned model, typed refusals."""

from __future__ import annotations

import os
import shutil
import signal
import struct
from pathlib import Path

import pytest

from sharedllm.errors import EngineError, InvalidModel
from tests.helpers import N_CTX, PROMPT, TWO, machine, stream_with_fault, wait_for

pytestmark = pytest.mark.mesh

EPS_KEY = b"gemma3.attention.layer_norm_rms_epsilon"
FLOAT32 = 6


@pytest.fixture(scope="module")
def poisoned(model_path, tmp_path_factory) -> Path:
    """A copy of the Gemma file whose RMS-norm epsilon is -1.0: it loads, and ggml asserts on the first token."""
    path = tmp_path_factory.mktemp("poisoned") / "gemma-poisoned.gguf"
    shutil.copyfile(model_path, path)
    with open(path, "r+b") as f:
        head = f.read(16 << 20)
        at = head.index(struct.pack("<Q", len(EPS_KEY)) + EPS_KEY) + 8 + len(EPS_KEY)
        assert struct.unpack_from("<I", head, at)[0] == FLOAT32
        f.seek(at + 4)
        f.write(struct.pack("<f", -1.0))
    return path


def _failures(mesh) -> dict[str, int]:
    return {r["machine_id"]: r["failures"] for r in mesh.control.call("trust")["machines"]}


def test_a_poisoned_model_is_refused_before_a_byte_moves(mesh, poisoned):
    pids = {m: machine(mesh, m)["rpc"]["pid"] for m in TWO}
    with pytest.raises(InvalidModel) as err:
        mesh.load(str(poisoned), n_ctx=N_CTX, machines=TWO)
    msg = str(err.value)
    assert str(poisoned) in msg and "layer_norm_rms_epsilon is -1.0" in msg and "GGML_ASSERT(eps >= 0.0f)" in msg
    assert "\n" not in msg
    assert {m: machine(mesh, m)["rpc"]["pid"] for m in TWO} == pids  # no rpc-server ran it


def test_a_model_that_makes_rpc_servers_abort_is_invalid_and_blames_no_machine(mesh, poisoned, monkeypatch):
    from sharedllm import gguf

    # Stands for an assertion the pre-load check cannot foresee: the model reaches the rpc-servers.
    monkeypatch.setattr(gguf.reader, "_ASSERTED", {})
    failures = _failures(mesh)
    client = mesh.control.identity

    def check(err: pytest.ExceptionInfo, pids: dict, strikes: int) -> None:
        msg = str(err.value)
        assert str(poisoned) in msg and "GGML_ASSERT(eps >= 0.0f) failed" in msg, msg
        assert "it was not loaded elsewhere and no machine is blamed" in msg
        # The servers it aborted come back; no machine's trust record is charged; the client has a strike.
        def back() -> bool:
            now = {m: (machine(mesh, m) or {}).get("rpc") or {} for m in TWO}
            return all(r.get("state") == "ready" and r.get("relay") for r in now.values()) and any(
                now[m].get("pid") != pids[m] for m in TWO)

        wait_for(back, timeout=90, what="the aborted rpc-servers to be ready again")
        assert _failures(mesh) == failures
        [me] = [c for c in mesh.control.call("clients")["clients"] if c["client"] == client]
        assert me["strikes"] == strikes
        ended = mesh.state()["recent_sessions"][-1]
        assert ended["model"] == poisoned.name and ended["reason"].startswith("failed: invalid model")

    # The engine decodes at load (its prompt cache's measure of the kernels): the load itself says it.
    pids = {m: machine(mesh, m)["rpc"]["pid"] for m in TWO}
    with pytest.raises(InvalidModel) as err:
        mesh.load(str(poisoned), n_ctx=N_CTX, machines=TWO)
    check(err, pids, strikes=1)
    # Without that measure the load decodes nothing: the first request says it, and is not replayed elsewhere.
    pids = {m: machine(mesh, m)["rpc"]["pid"] for m in TWO}
    with mesh.load(str(poisoned), n_ctx=N_CTX, machines=TWO, prompt_cache=False) as llm:
        with pytest.raises(InvalidModel) as err:
            llm.create_completion(PROMPT, max_tokens=8, temperature=0)
        assert llm.recoveries == []
        with pytest.raises(EngineError, match="failed earlier"):
            llm.create_completion(PROMPT, max_tokens=4)
    check(err, pids, strikes=2)


def test_generations_outlive_a_scheduler_kill(local_greedy, tmp_path):
    """kill -9 of the scheduler mid-stream: the stream goes on (the machines' rpc-servers and relays outlive their
    workers, the client keeps its engine); the scheduler comes back on its port with its state file, the workers
    rejoin and adopt their data planes, the session is reclaimed with its counts, and new sessions work."""
    from sharedllm.errors import SchedulerUnreachable
    from sharedllm.local import LocalMesh

    with LocalMesh(machines=2, dashboard=False, state_path=tmp_path / "state.sqlite", persist_interval=0.5) as lm:
        mesh = lm.mesh()
        llm = mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO)
        sid = llm.session_id
        servers = {m: machine(mesh, m)["rpc"]["pid"] for m in TWO}

        def kill_scheduler() -> None:
            os.kill(lm.scheduler.popen.pid, signal.SIGKILL)
            lm.scheduler.popen.wait()

        text, gap = stream_with_fault(llm, kill_scheduler)
        assert text == local_greedy["completion"] and llm.recoveries == []
        assert gap < 3
        with pytest.raises(SchedulerUnreachable):  # a call while it is gone: a typed error, not a hang
            mesh.control.call("state", timeout=2)

        # What systemd (or `sharedllm up`) does: start the scheduler again on its port, and the workers that exited.
        wait_for(lambda: all(w.popen.poll() is not None for w in lm.workers), timeout=60,
                 what="the workers to exit without their scheduler")
        assert set(lm.supervise()) == {"scheduler", *(w.name for w in lm.workers)}

        def back() -> dict | None:
            st = mesh.state()
            ready = [m for m in st["machines"] if m["rpc"]["state"] == "ready" and m["rpc"].get("relay")]
            mine = [s for s in st["sessions"] if s["session_id"] == sid]
            return st if len(ready) == 2 and mine and not mine[0]["reclaiming"] else None

        wait_for(back, timeout=90, what="the machines to rejoin and the session to be reclaimed")
        assert {m: machine(mesh, m)["rpc"]["pid"] for m in TWO} == servers  # adopted, not restarted
        again = llm.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"]
        assert again == text and llm.recoveries == []
        llm.close()
        ended = next(s for s in mesh.state()["recent_sessions"] if s["session_id"] == sid)
        assert ended["reason"] == "closed" and ended["tokens"] == 128 and ended["requests"] == 2
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as fresh:
            assert fresh.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"] == text


def test_a_rolling_upgrade_fails_no_request(tmp_path):
    """The documented procedure, with requests running all along: drain each machine (the session moves off it
    between two requests), stop it, start it again, undrain; then restart the scheduler. No request fails, every
    text equals the one before the upgrade."""
    import threading

    from sharedllm.local import LocalMesh

    three = [*TWO, "machine-3"]
    with LocalMesh(machines=3, dashboard=False, state_path=tmp_path / "state.sqlite", persist_interval=0.5) as lm:
        mesh = lm.mesh()
        llm = mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=three, strategy="pack")  # room to move: one machine
        reference = llm.create_completion(PROMPT, max_tokens=24, temperature=0)["choices"][0]["text"]
        results: list = []
        stop = threading.Event()

        def requests() -> None:
            while not stop.is_set():
                stream = len(results) % 2 == 0
                try:
                    if stream:
                        text = "".join(c["choices"][0]["text"] for c in llm.create_completion(
                            PROMPT, max_tokens=24, temperature=0, stream=True))
                    else:
                        text = llm.create_completion(PROMPT, max_tokens=24, temperature=0)["choices"][0]["text"]
                    results.append(text)
                except Exception as exc:
                    results.append(exc)

        worker = threading.Thread(target=requests, name="requests-during-the-upgrade")
        worker.start()
        try:
            for mid in three:
                mesh.control.call("drain", machine=mid)
                wait_for(lambda mid=mid: not any(mid in s["machines"] for s in mesh.state()["sessions"]),
                         timeout=120, what=f"the session to move off {mid}")
                server = machine(mesh, mid)["rpc"]["pid"]
                lm.stop_machine(mid)  # systemctl stop: its worker stops its rpc-server and relay
                before = len(results)
                wait_for(lambda before=before: len(results) > before, timeout=120,
                         what=f"a request served while {mid} is down")
                lm._stopped.discard(mid)
                lm.supervise()  # systemctl start (the upgraded release)
                back = wait_for(lambda mid=mid: (m := machine(mesh, mid)) and m["rpc"]["state"] == "ready"
                                and m["rpc"].get("relay") and m, timeout=120, what=f"{mid} to serve again")
                assert back["rpc"]["pid"] != server  # a new rpc-server (of the upgraded release), not the old one
                mesh.control.call("drain", machine=mid, undrain=True)
            # The scheduler last: a graceful restart with its state file (the workers leave their data planes up).
            served = len(results)
            lm.scheduler.popen.send_signal(signal.SIGTERM)
            lm.scheduler.popen.wait(timeout=60)
            wait_for(lambda: all(w.popen.poll() is not None for w in lm.workers), timeout=60,
                     what="the workers to leave with their scheduler")
            lm.supervise()
            wait_for(lambda: len(results) >= served + 3, timeout=120, what="requests after the scheduler's restart")
        finally:
            stop.set()
            worker.join(timeout=120)
        failed = [r for r in results if isinstance(r, Exception)]
        assert not failed, failed
        assert served >= 3 and all(r == reference for r in results)
        moved = [s for s in mesh.state()["recent_sessions"] if s["reason"].startswith("moved")]
        assert moved, "the session never had to move off a draining machine"
        assert llm.recoveries == []  # it moved between requests: nothing failed, nothing was replayed
        llm.close()
