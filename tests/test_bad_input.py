# SPDX-License-Identifier: AGPL-3.0-or-later
"""Every bad input gets a clear error naming the problem, and nothing crashes the caller's process."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import pytest

from sharedllm.engine import Engine, EngineSpec
from sharedllm.errors import InvalidModel, ModelNotFound, NoMachines, SchedulerUnreachable
from tests.helpers import N_CTX


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _truncated_copy(src, dst, size):
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read(size))
    return dst


@pytest.mark.mesh
def test_missing_path(mesh, tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFound, match="does not exist") as err:
        mesh.load(missing)
    assert str(missing) in str(err.value)


@pytest.mark.mesh
def test_a_bad_context_or_an_unknown_machine_says_so(mesh):
    with pytest.raises(ValueError, match="n_ctx must be a positive number of tokens"):
        mesh.load("gemma-3-270m", n_ctx=0)
    with pytest.raises(ValueError, match="n_ctx must be a positive number of tokens"):
        mesh.plan("gemma-3-270m", n_ctx=-5)
    # A typo in a machine id: the machines the mesh has, not advice to start workers.
    with pytest.raises(NoMachines, match=r"no machine 'machine-9' in the mesh now \(it has machine-1, machine-2"):
        mesh.load("gemma-3-270m", n_ctx=256, machines=["machine-9"])


@pytest.mark.mesh
def test_non_gguf_file(mesh, tmp_path):
    bogus = tmp_path / "notes.gguf"
    bogus.write_text("these are not the weights you are looking for\n" * 10)
    with pytest.raises(InvalidModel, match="not a GGUF file") as err:
        mesh.load(bogus)
    assert "notes.gguf" in str(err.value)


@pytest.mark.mesh
def test_truncated_gguf(mesh, model_path, tmp_path):
    # Header intact, tensor data cut: the reader notices before any engine starts or byte is uploaded.
    cut = _truncated_copy(model_path, tmp_path / "cut.gguf", 20_000_000)
    with pytest.raises(InvalidModel, match="truncated") as err:
        mesh.load(cut)
    assert "cut.gguf" in str(err.value)


@pytest.mark.mesh
def test_architecture_llama_cpp_rejects_is_a_typed_error_not_a_crash(model_path, tmp_path):
    """A file our reader accepts but llama.cpp refuses: the engine fails, the caller gets InvalidModel."""
    data = bytearray(model_path.read_bytes())
    i = data.index(b"gemma3", 0, 1_000_000)  # the general.architecture value, same length keeps offsets valid
    data[i : i + 6] = b"gemmaX"
    bad = tmp_path / "unknown-arch.gguf"
    bad.write_bytes(bytes(data))
    engine = Engine(EngineSpec(str(bad), llama_kwargs={"n_ctx": N_CTX}), load_timeout=120)
    with pytest.raises(InvalidModel) as err:
        engine.start()
    assert "unknown-arch.gguf" in str(err.value)
    engine.close()


@pytest.mark.mesh
def test_engine_abort_does_not_kill_the_caller(tmp_path):
    """GGML_ABORT in the engine (an rpc-server that does not exist) surfaces as an exception here."""
    from sharedllm.engine import EngineStage
    from sharedllm.errors import WorkerLost
    from sharedllm.models import default_model_path

    endpoint = f"127.0.0.1:{_free_port()}"
    spec = EngineSpec(str(default_model_path()), [EngineStage(endpoint, 0, "ghost")], [19.0], {"n_ctx": N_CTX})
    engine = Engine(spec, load_timeout=60)
    with pytest.raises(WorkerLost) as err:
        engine.start()
    assert err.value.machine == "ghost" and err.value.endpoint == endpoint
    assert "unreachable" in str(err.value)


def test_unreachable_scheduler():
    from sharedllm.client import Mesh

    addr = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(SchedulerUnreachable, match="cannot reach") as err:
        Mesh.connect(addr, timeout=2)
    assert addr in str(err.value)


@pytest.mark.mesh
def test_scheduler_without_the_preload():
    from distributed import Client, LocalCluster

    from sharedllm.client import Mesh

    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster, Client(cluster) as client:
        with pytest.raises(SchedulerUnreachable, match="does not run SharedLLM"):
            Mesh(client).machines()


@pytest.mark.mesh
def test_mesh_with_zero_workers(model_path):
    from sharedllm.local import LocalMesh

    with LocalMesh(machines=0, dashboard=False) as lm:
        mesh = lm.mesh()
        assert mesh.machines() == []
        assert str(mesh.machines()) == "no machines in the mesh"
        with pytest.raises(NoMachines, match="no machine in the mesh has a ready rpc-server"):
            mesh.load(model_path)


@pytest.mark.mesh
def test_rpc_server_port_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "sharedllm.rpc_server", "--port", str(port), "--threads", "1"],
            capture_output=True, text=True, timeout=60,
        )
    assert out.returncode == 3
    assert f"port {port} on 127.0.0.1 is already in use" in out.stderr


@pytest.mark.mesh
def test_rpc_server_unknown_device():
    out = subprocess.run(
        [sys.executable, "-m", "sharedllm.rpc_server", "--port", "0", "--device", "CUDA7"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2
    assert "unknown device CUDA7" in out.stderr


@pytest.mark.mesh
def test_rpc_server_lists_devices_and_answers_hello(tmp_path):
    import json
    import time

    from sharedllm import ggml

    out = subprocess.run([sys.executable, "-m", "sharedllm.rpc_server", "--list-devices"], capture_output=True,
                         text=True, timeout=60)
    devices = json.loads(out.stdout)
    assert devices[0]["name"] == "CPU" and devices[0]["memory_total"] > 0
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sharedllm.rpc_server", "--port", str(port), "--threads", "1",
                             "--cache-dir", str(tmp_path / "cache")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                version = ggml.rpc_hello(f"127.0.0.1:{port}", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "rpc-server never answered"
                time.sleep(0.1)
        # the version the client checks a mesh against: from the installed header, and asked of a throwaway server
        # (the fallback for a build without the header); both must be what a real rpc-server answers
        assert version == ggml.rpc_protocol_version() == ggml.header_protocol_version()
        assert version == ggml.probe_protocol_version()
        assert version[0] == 7
    finally:
        proc.kill()
        proc.wait()
    assert (tmp_path / "cache").is_dir()


def test_setup_check_for_rpc_support():
    from sharedllm import ggml

    assert ggml.supports_rpc(), "llama-cpp-python must be built with -DGGML_RPC=ON (scripts/setup.sh)"
    assert shutil.which(sys.executable)
