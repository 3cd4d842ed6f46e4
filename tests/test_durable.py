# SPDX-License-Identifier: AGPL-3.0-or-later
"""The scheduler's state outlives a kill -9; supervised workers rejoin."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import stat
from pathlib import Path

import pytest

from sharedllm.local import LocalMesh
from sharedllm.scheduler_plugins.state import SCHEMA_VERSION, StateStore
from tests.helpers import N_CTX, wait_for

pytestmark = pytest.mark.mesh


def test_scheduler_kill_9_then_restart_restores_the_registry(tmp_path):
    state = tmp_path / "scheduler-state.db"
    with LocalMesh(machines=1, dashboard=False, state_path=state, persist_interval=0.5) as lm:
        mesh = lm.mesh()
        with mesh.load("gemma-3-270m", n_ctx=N_CTX) as llm:
            llm.create_completion("Hello", max_tokens=4, temperature=0)
            sid = llm.session_id
        mesh.control.call("drain", machine="machine-1")
        entry = {"name": "tiny", "url": "https://models.example/tiny.gguf", "sha256": "ab" * 32, "size": 1234}
        mesh.control.call("catalog", action="add", entry=entry)

        def persisted() -> bool:  # the drain and the catalog entry are in the state file
            store = StateStore(state)
            try:
                policy = store.load()["policy"]
            finally:
                store.close()
            return "machine-1" in policy.get("draining", []) and "tiny" in str(policy.get("catalog"))

        wait_for(persisted, timeout=30, interval=0.1, what="the scheduler to persist the drain and the catalog")
        old_address = lm.address
        os.kill(lm.scheduler.popen.pid, signal.SIGKILL)
        lm.scheduler.popen.wait()

        assert "scheduler" in lm.supervise()  # what `sharedllm up` (or systemd) does: start it again
        assert lm.address == old_address  # same port, so the workers' command lines still point at it
        st = lm.mesh().state()
        assert "machine-1" in {m["machine_id"] for m in st["known_machines"]} | {
            m["machine_id"] for m in st["machines"]}
        assert list(st["draining"]) == ["machine-1"]  # policy survived
        names = [m["name"] for m in lm.mesh().control.call("catalog")["models"]]
        assert names == ["gemma-3-270m-q4_k_m", "tiny"]  # the catalog too
        assert any(s["session_id"] == sid and s["tokens"] >= 4 for s in st["recent_sessions"])

        # Live state is rebuilt from the workers as they rejoin (restarted by the supervisor if they exited).
        def rejoined():  # ready(): placement's own test (a ready rpc-server behind a relay the scheduler reached)
            lm.supervise()
            return "machine-1" in {m["machine_id"] for m in lm.mesh().machines().ready()}

        wait_for(rejoined, timeout=120, interval=1.0, what="machine-1 to rejoin the restarted scheduler")
        # The new scheduler has the relay master key of the old one (from the state file): a session works again.
        lm.mesh().control.call("drain", machine="machine-1", undrain=True)
        with lm.mesh().load("gemma-3-270m", n_ctx=N_CTX) as llm:
            assert llm._lease_relays and llm.create_completion("Hello", max_tokens=4, temperature=0)["choices"]


def test_state_store_round_trip_and_bad_file(tmp_path):
    store = StateStore(tmp_path / "s.db")
    machines = [{"machine_id": "m1", "resources": {"cpu_count": 4}, "rpc": {"state": "ready"}, "build": {"x": 1}}]
    sessions = [{"session_id": "s1", "client": "c", "model": "g.gguf", "machines": ["m1"], "opened": 1.0,
                 "closed": None, "tokens": 5, "requests": 1, "recoveries": 0, "reason": None}]
    store.save(machines, sessions, {"draining": ["m1"]}, now=100.0)
    store.save(machines, sessions, {"draining": []}, now=200.0)
    store.close()
    loaded = StateStore(tmp_path / "s.db").load()
    assert loaded["machines"]["m1"]["first_seen"] == 100.0 and loaded["machines"]["m1"]["last_seen"] == 200.0
    assert loaded["machines"]["m1"]["resources"] == {"cpu_count": 4}
    assert loaded["sessions"][0]["machines"] == ["m1"] and loaded["sessions"][0]["tokens"] == 5
    assert loaded["policy"] == {"draining": []}

    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a usable SQLite database"):
        StateStore(bad)
    assert sqlite3.sqlite_version  # the stdlib module is what we rely on


def test_a_state_file_of_the_previous_release_opens_in_this_one(tmp_path):
    """``tests/data/state-v1.sqlite`` was written by the release before this one (schema 1): a mesh that served
    sessions, one open when its scheduler was killed, with a catalog entry, a banned client, a drained machine and
    trust records. It is migrated in place and the scheduler restores everything from it."""
    path = tmp_path / "state.sqlite"
    shutil.copyfile(Path(__file__).parent / "data" / "state-v1.sqlite", path)
    store = StateStore(path)
    assert store.migrated_from == 1
    saved = store.load()
    store.close()
    assert [s["closed"] is None for s in saved["sessions"]] == [False, True]
    assert all(s["topology"] is None for s in saved["sessions"])  # schema 1 kept none
    version = sqlite3.connect(path).execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert version == (str(SCHEMA_VERSION),) and SCHEMA_VERSION > 1  # migrated to this release's schema
    assert StateStore(path).migrated_from is None  # migrated once

    with LocalMesh(machines=0, dashboard=False, state_path=path) as lm:
        mesh = lm.mesh()
        st = mesh.state()
        assert not st["sessions"]  # the open session of schema 1 has no topology: it cannot go on
        open_sid = saved["sessions"][1]["session_id"]
        ended = {s["session_id"]: s for s in st["recent_sessions"]}
        assert ended[open_sid]["reason"] == "interrupted: the scheduler restarted"
        assert ended[saved["sessions"][0]["session_id"]]["tokens"] == saved["sessions"][0]["tokens"] > 0
        assert list(st["draining"]) == ["machine-2"]
        assert {m["machine_id"] for m in st["known_machines"]} == {"machine-1", "machine-2"}
        assert "tiny" in [m["name"] for m in mesh.control.call("catalog")["models"]]
        banned = [c for c in mesh.control.call("clients")["clients"] if c["banned"]]
        assert [c["client"] for c in banned] == ["Client-banned-0001"]
        trust = {r["machine_id"]: r for r in mesh.control.call("trust")["machines"]}
        assert trust["machine-1"]["sessions"] >= 1


def test_a_new_state_file_is_private_and_keeps_sessions_with_their_topology(tmp_path):
    store = StateStore(tmp_path / "s.db")
    assert stat.S_IMODE(os.stat(tmp_path / "s.db").st_mode) == 0o600  # it holds the relay master key
    assert store.migrated_from is None
    topology = {"stages": [{"machine_id": "m1"}], "n_layer": 2}
    store.save([], [{"session_id": "s1", "client": "c", "model": "g.gguf", "machines": ["m1"], "opened": 1.0,
                     "closed": None, "tokens": 5, "requests": 1, "recoveries": 0, "reason": None,
                     "topology": topology}], {"relay_master": "ab" * 32})
    store.close()
    loaded = StateStore(tmp_path / "s.db").load()
    assert loaded["sessions"][0]["topology"] == topology and loaded["policy"]["relay_master"] == "ab" * 32
