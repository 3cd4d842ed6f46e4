# SPDX-License-Identifier: AGPL-3.0-or-later
"""Replicas behind the OpenAI endpoint (``sharedllm serve --replicas``): a replica that loses a machine recovers
while the other one keeps answering."""

from __future__ import annotations

import json
import os
import signal

import httpx
import pytest

from sharedllm.openai_server import ServerThread, create_app
from sharedllm.replicas import Replicas
from tests.conftest import N_CTX, PROMPT, machine, wait_for

pytestmark = pytest.mark.mesh


def _ready(mesh, machine_id: str, old_pid: int | None = None) -> dict:
    return wait_for(lambda: (m := machine(mesh, machine_id)) and m["rpc"]["state"] == "ready"
                    and m["rpc"]["pid"] != old_pid and m["rpc"], timeout=90, what=f"{machine_id} to be ready")


def test_a_replica_that_loses_a_machine_recovers_while_the_other_answers(mesh_cluster, mesh, local_greedy):
    mesh_cluster.add_machine("machine-3")
    _ready(mesh, "machine-3")
    try:
        with Replicas.load(mesh, "gemma-3-270m", replicas=2, n_ctx=N_CTX, parallel=2, wait_timeout=0) as reps:
            first, second = reps.handles
            assert len(first.topology.machines) == len(second.topology.machines) == 1  # a third of the mesh each
            assert not set(first.topology.machines) & set(second.topology.machines)
            victim_id = first.topology.machines[0]
            victim = machine(mesh, victim_id)["rpc"]
            app = create_app(reps, model_id="gemma", max_queue=4, queue_timeout=120)
            assert app.state.queue.concurrency == 4
            body = {"model": "gemma", "prompt": PROMPT, "max_tokens": 64, "temperature": 0}
            with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=120) as h:
                text, chunks, during = "", 0, None
                with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        text += json.loads(line[6:])["choices"][0]["text"]
                        chunks += 1
                        if chunks == 8:  # the stream runs on the first replica (least loaded, first)
                            os.kill(victim["pid"], signal.SIGKILL)
                            during = h.post("/v1/completions", json=body)  # the second replica answers meanwhile
                assert during.status_code == 200, during.text
                assert during.json()["choices"][0]["text"] == local_greedy["completion"]
                assert text == local_greedy["completion"]  # the first replica's stream recovered: nothing lost
                assert [r["lost"] for r in first.recoveries] == [victim_id]
                assert second.recoveries == []
                assert victim_id not in first.topology.machines
                assert h.get("/health").json()["status"] == "ok"
        _ready(mesh, victim_id, victim["pid"])
    finally:
        mesh_cluster.stop_machine("machine-3")
        wait_for(lambda: machine(mesh, "machine-3") is None, what="machine-3 to leave")
