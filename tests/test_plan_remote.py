# SPDX-License-Identifier: AGPL-3.0-or-later
"""Plan before download: the GGUF header of a remote model, read with HTTP Range requests, is all a plan needs; a
model too large for the mesh is refused with the shortfall before a byte of its weights moves (the server counts
what it sent)."""

from __future__ import annotations

import pytest

from sharedllm import models
from sharedllm.errors import ModelTooLarge
from sharedllm.gguf import read_gguf
from sharedllm.gguf_remote import read_gguf_url
from tests.helpers import N_CTX, TWO, admin_env, run_cli

HEADER_BUDGET = 16 << 20  # Gemma 3 270M's header (a 262k-token vocabulary) is ~6 MB of its 253 MB


@pytest.fixture(scope="module")
def gemma_bytes(model_path) -> bytes:
    return model_path.read_bytes()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAREDLLM_MODEL_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


def test_header_over_http_ranges_equals_the_local_header(server, gemma_bytes, model_path):
    url = server.put("/gemma.gguf", gemma_bytes)
    remote, local = read_gguf_url(url, start=1 << 20), read_gguf(model_path)
    assert remote.tensors == local.tensors and remote.metadata.keys() == local.metadata.keys()
    assert remote.file_size == len(gemma_bytes) and remote.path == url
    assert server.sent == remote.header_bytes < HEADER_BUDGET  # 1, 2, 4 then 8 MiB: the header alone
    assert all(r["range"].startswith("bytes=0-") for r in server.requests)
    # A server that ignores a range's end: only what is needed is read before hanging up.
    server.closed_ranges, server.sent = False, 0
    assert read_gguf_url(url).tensors == local.tensors
    assert server.sent < len(gemma_bytes) // 4


@pytest.mark.mesh
def test_plan_of_a_url_downloads_nothing(mesh, server, gemma_bytes, empty_cache):
    url = server.put("/models/gemma-remote.gguf", gemma_bytes)
    topo = mesh.plan(url, N_CTX, machines=TWO)
    assert sorted(topo.machines) == TWO and topo.n_layer == 18
    with pytest.raises(ModelTooLarge) as err:
        mesh.plan(url, 4_000_000, machines=TWO)
    assert err.value.needed > err.value.available > 0
    # load() plans from the header first: refused before the download, nothing in the cache
    with pytest.raises(ModelTooLarge):
        mesh.load(url, n_ctx=4_000_000, machines=TWO)
    assert server.sent < 3 * HEADER_BUDGET
    assert not empty_cache.exists() or not any(empty_cache.iterdir())
    assert models.needs_download(url)


@pytest.mark.mesh
def test_cli_plan_prints_the_topology_or_the_shortfall(mesh_cluster, server, gemma_bytes, empty_cache):
    url = server.put("/cli/gemma-cli.gguf", gemma_bytes)
    admin = admin_env(mesh_cluster)
    ok = run_cli("plan", url, "--scheduler", mesh_cluster.user_address, "--n-ctx", str(N_CTX), env=admin)
    assert ok.returncode == 0, ok.stderr
    assert "machine-1" in ok.stdout and "18 layers" in ok.stdout
    big = run_cli("plan", url, "--scheduler", mesh_cluster.user_address, "--n-ctx", "4000000", env=admin)
    assert big.returncode == 1
    (line,) = [ln for ln in big.stderr.strip().splitlines() if "error" in ln.lower()]  # one line, beside the log's
    assert line.startswith("error:") and "gemma-cli.gguf" in line and "n_ctx=4000000" in line
    assert server.sent < 3 * HEADER_BUDGET
