# SPDX-License-Identifier: AGPL-3.0-or-later
"""Shared fixtures. The slow end-to-end tests share one real loopback mesh (``mesh_cluster``)."""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from pathlib import Path

import pytest

PROMPT = "Once upon a time"
N_CTX = 2048
HELLO = struct.pack("<BQ", 14, 24) + bytes(24)  # llama.cpp RPC: HELLO with 24 bytes of capabilities
ACCEPTED = "Accepted client connection"  # what an rpc-server logs for every client it serves


def everything_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            got += chunk
    return got


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


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def machine(mesh, machine_id: str) -> dict | None:
    return next((m for m in mesh.machines() if m["machine_id"] == machine_id), None)
