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
from tests.helpers import N_CTX, PROMPT, machine, wait_for

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


def test_a_request_that_continues_an_earlier_one_goes_to_its_replica():
    """No model (handles that record their calls): a chat's next turn, or a prompt extending an earlier prompt, goes
    to the replica that served the earlier request (its prompt cache holds the prefix), unless that replica has more
    than AFFINITY_SLACK requests in flight beyond the least loaded one; anything else goes to the least loaded. And a
    stream counts its request out however it ends, also when it is dropped unread."""
    from sharedllm.replicas import AFFINITY_SLACK

    class Handle:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def create_completion(self, prompt, **kwargs):
            self.calls.append(prompt)
            return iter(["chunk"]) if kwargs.get("stream") else {"prompt": prompt}

        def create_chat_completion(self, messages, **kwargs):
            self.calls.append(messages[-1]["content"])
            return {}

    handles = [Handle(), Handle()]
    replicas = Replicas(handles)
    doc = "The village council meets on the first Monday of every month. " * 20  # > Affinity.STEP characters
    chat = [{"role": "system", "content": doc}, {"role": "user", "content": "When?"}]

    # A stream counts its request out when it ends, is closed or is dropped, iterated or not.
    for end in ("close", "drop"):
        stream = replicas.create_completion(f"{end} " * 100, stream=True)
        assert sum(replicas._load) == 1
        if end == "close":
            stream.close()
        del stream
        assert replicas._load == [0, 0], end
    handles[0].calls.clear()

    held = replicas.create_completion("Once upon a time " * 40, stream=True)  # replica 0 busy: the chat goes to 1
    replicas.create_chat_completion(chat)
    assert list(held) == ["chunk"]  # replica 0 idle again
    assert handles[1].calls == ["When?"]
    # Both idle: the next turn goes where the first went, not to the first of the least loaded.
    replicas.create_chat_completion([*chat, {"role": "assistant", "content": "Monday."},
                                     {"role": "user", "content": "Where?"}])
    assert handles[1].calls == ["When?", "Where?"]
    replicas.create_completion("Once upon a time " * 40 + "there was a fox.")
    assert handles[0].calls[-1].endswith("fox.")  # the prompt that extends replica 0's
    replicas.create_completion("Something else entirely.")  # no earlier request: the least loaded (a tie: 0)
    assert handles[0].calls[-1] == "Something else entirely."
    # Busier than the least loaded by more than AFFINITY_SLACK: the continuation goes to the least loaded.
    replicas._load = [0, AFFINITY_SLACK + 1]
    replicas.create_chat_completion([*chat, {"role": "user", "content": "Who?"}])
    assert handles[0].calls[-1] == "Who?" and handles[1].calls[-1] == "Where?"
    replicas._load = [AFFINITY_SLACK, 0]
    replicas.create_chat_completion([*chat, {"role": "user", "content": "Why?"}])
    assert handles[0].calls[-1] == "Why?"  # within the slack: where the prefix was read last ("Who?")
