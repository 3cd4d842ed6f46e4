# SPDX-License-Identifier: AGPL-3.0-or-later
"""The `sharedllm` command line, run as a user runs it, against real `dask scheduler`/`dask worker` processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharedllm.dataplane import kill_recorded
from tests.helpers import BIN, PROMPT, admin_env, key_env, run_cli

pytestmark = pytest.mark.mesh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_table_and_json(mesh_cluster, mesh):
    admin = admin_env(mesh_cluster)
    out = run_cli("status", "--scheduler", mesh_cluster.user_address, env=admin)
    assert out.returncode == 0, out.stderr
    assert "machine-1" in out.stdout and "machine-2" in out.stdout and "ready" in out.stdout
    js = run_cli("status", "--scheduler", mesh_cluster.user_address, "--json", env=admin)
    assert js.returncode == 0, js.stderr
    data = json.loads(js.stdout)
    assert {m["machine_id"] for m in data["machines"]} == {m["machine_id"] for m in mesh.machines()}
    assert all(m["rpc"]["state"] == "ready" for m in data["machines"])


def test_generate_streams_the_greedy_text(mesh_cluster, local_greedy):
    out = run_cli("generate", "gemma-3-270m", PROMPT, "--scheduler", mesh_cluster.user_address, "--max-tokens", "16",
                  env=admin_env(mesh_cluster))
    assert out.returncode == 0, out.stderr
    text = out.stdout.rstrip("\n")
    assert len(text) > len(PROMPT) + 10
    assert (PROMPT + local_greedy["completion"]).startswith(text)  # 16 greedy tokens: a prefix of the 64
    assert "machine-1" in out.stderr and "machine-2" in out.stderr  # the topology table


def test_errors_are_one_line_and_nonzero(tmp_path):
    missing = run_cli("generate", str(tmp_path / "missing.gguf"), "hi")
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0
    assert missing.stderr.startswith("error: model file") and "does not exist" in missing.stderr

    addr = f"tcp://127.0.0.1:{_free_port()}"
    down = run_cli("status", "--scheduler", addr)
    assert down.returncode == 1
    assert down.stderr.strip().count("\n") == 0
    assert "cannot reach the Dask scheduler" in down.stderr and addr in down.stderr


def test_documented_dask_commands_with_preloads(tmp_path):
    """`dask scheduler --preload sharedllm.scheduler` + `dask worker --preload sharedllm.worker`, as in the README."""
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    env = dict(os.environ, SHAREDLLM_MACHINE_ID="cli-box")
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--dashboard-address", "127.0.0.1:0", "--preload", "sharedllm.scheduler"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "s.log", "wb"),
                              start_new_session=True)]
    try:
        time.sleep(1.0)
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", addr, "--host", "127.0.0.1", "--nworkers", "2",
                                       "--local-directory", str(tmp_path / "worker"),
                                       "--preload-nanny", "sharedllm.nanny", "--preload", "sharedllm.worker"],
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "w.log", "wb"), env=env,
                                      start_new_session=True))
        deadline = time.monotonic() + 90
        while True:
            js = run_cli("status", "--scheduler", addr, "--json")
            machines = json.loads(js.stdout)["machines"] if js.returncode == 0 else []
            if machines and len(machines[0]["workers"]) == 2 and machines[0]["rpc"]["state"] == "ready":
                break
            assert time.monotonic() < deadline, f"mesh never got ready: {js.stderr} {machines}"
            time.sleep(0.5)
        assert [m["machine_id"] for m in machines] == ["cli-box"]  # --nworkers 2 on one host: one machine
    finally:
        # The worker first, and to its end, as `systemctl stop` does (to the `dask worker` process alone): a worker
        # told to stop stops its machine's rpc-server and relay (one that loses its scheduler leaves them serving).
        for p in reversed(procs):
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        for state_dir in (tmp_path / "worker").glob("*/sharedllm-cli-box"):
            assert not kill_recorded(state_dir, signal.SIGKILL), "the stopped worker left its rpc-server or relay"


def test_up_starts_and_stops_an_embedded_mesh(tmp_path):
    import psutil

    err = (tmp_path / "up.stderr").open("w+")  # a file: a full pipe that nobody reads would block the process
    proc = subprocess.Popen([str(BIN / "sharedllm"), "up", "--machines", "1"], stdout=subprocess.PIPE,
                            stderr=err, text=True, start_new_session=True)
    children: list = []
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any(ln.startswith("generate:") for ln in lines):  # its last line before it waits for Ctrl-C
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "up.stderr").read_text()
            lines.append(proc.stdout.readline())
        children = psutil.Process(proc.pid).children(recursive=True)
        said = {ln.split(":", 1)[0]: ln.split(":", 1)[1].split() for ln in lines if ":" in ln}
        address, key_file = said["user port"][0], said["admin key"][0]
        assert said["dask port"][0].startswith("tcp://") and said["cluster secret"]
        assert said["generate"][:3] == ["sharedllm", "--key-file", key_file]  # a command to copy, as it is
        assert said["generate"][said["generate"].index("--scheduler") + 1] == address
        key = tmp_path / "admin.key"  # a copy: the mesh's own goes with its work directory
        key.write_text(Path(key_file).read_text())
        status = run_cli("status", "--scheduler", address, env=key_env(key))
        assert status.returncode == 0, status.stderr
        assert "machine-1" in status.stdout and "ready" in status.stdout
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=60) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("sharedllm up did not stop within 60 s of Ctrl-C: " + (tmp_path / "up.stderr").read_text())
        down = run_cli("status", "--scheduler", address, env=key_env(key))
        assert down.returncode == 1  # everything it started is gone
        assert "cannot reach" in down.stderr and address in down.stderr, down.stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for child in children:  # its scheduler and workers run in sessions of their own
            with contextlib.suppress(psutil.Error):
                child.kill()
        err.close()


def test_module_entry_point_lists_every_command():
    # `python -m sharedllm.cli.main` must work as well as the console script (command modules import it by name).
    out = subprocess.run([sys.executable, "-m", "sharedllm.cli.main", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("up", "generate", "status", "demo", "drain", "serve", "models", "trust", "clients"):
        assert f"  {command} " in out.stdout


def test_the_same_commands_under_dask():
    # The README: "The same command group is available as `dask sharedllm ...`" (it was `dask cli`).
    out = subprocess.run([str(BIN / "dask"), "sharedllm", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage: dask sharedllm" in out.stdout and "  generate " in out.stdout
