# SPDX-License-Identifier: AGPL-3.0-or-later
"""Shared fixtures (plain helpers and constants: ``tests/helpers.py``). The slow end-to-end tests share one real
loopback mesh (``mesh_cluster``); they and every other test that starts a cluster, a scheduler, a worker, an
rpc-server, a relay or engine process, or loads the real model, are marked ``mesh``."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from tests.helpers import N_CTX, PROMPT, FileServer


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real Gemma 3 270M Q4_K_M, assembled from its PyPI package."""
    from sharedllm.models import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def local_greedy(model_path):
    """Oracle: plain local llama-cpp-python with the rpc-server's CPU kernels (use_extra_bufts=False)."""
    from sharedllm.engine import build_llama

    llm = build_llama(str(model_path), n_ctx=N_CTX, n_threads=2, use_extra_bufts=False)
    out = {
        "completion": llm.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"],
    }
    llm.reset()
    out["chat"] = llm.create_chat_completion(
        [{"role": "user", "content": "Name a colour."}], max_tokens=24, temperature=0
    )["choices"][0]["message"]["content"]
    llm.close()
    return out


@pytest.fixture(scope="session")
def mesh_cluster():
    """A real mesh on loopback: `dask scheduler` + 2 `dask worker` processes (machine-1, machine-2) with the preloads,
    each machine with its own rpc-server. Shared by every integration test; tests that change it restore it."""
    from sharedllm.local import LocalMesh

    logging.getLogger("sharedllm").setLevel(logging.INFO)
    lm = LocalMesh(machines=2)
    lm.start()
    yield lm
    lm.close()


@pytest.fixture(scope="session")
def mesh(mesh_cluster):
    return mesh_cluster.mesh()


@pytest.fixture
def server():
    """A loopback HTTP file server in a thread (``tests.helpers.FileServer``)."""
    srv = FileServer()
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)
