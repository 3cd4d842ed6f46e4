# SPDX-License-Identifier: AGPL-3.0-or-later
"""End to end on a real loopback mesh: real dask scheduler/workers, real rpc-servers, the real Gemma 270M."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest

from sharedllm.errors import EngineError, ModelClosed, ModelTooLarge, WorkerLost
from tests.helpers import N_CTX, PROMPT, TWO, machine, wait_for

pytestmark = pytest.mark.mesh


async def _leave(dask_worker):
    # Close shortly after answering, so client.run gets its reply first.
    asyncio.get_running_loop().call_later(0.2, lambda: asyncio.ensure_future(dask_worker.close(reason="test")))


def test_machines_report_resources_and_ready_rpc_servers(mesh):
    table = mesh.machines()
    by_id = {m["machine_id"]: m for m in table}
    assert set(TWO) <= set(by_id)
    for mid in TWO:
        m = by_id[mid]
        res, rpc = m["resources"], m["rpc"]
        assert res["machine_id"] == mid
        assert res["cpu_count"] >= 1 and res["ram_total"] >= res["ram_available"] > 0
        assert all(g["memory_total"] >= g["memory_free"] for g in res["gpus"])  # none here; fake NVML in unit tests
        assert rpc["state"] == "ready", rpc
        assert rpc["protocol"].split(".")[0] == "7"
        assert rpc["devices"][0]["name"] == "CPU"
        assert m["actor_worker"] in m["workers"]
    text = str(table)
    assert "machine-1" in text and "ready" in text


def test_greedy_mesh_equals_local(mesh, local_greedy):
    total_before = mesh.state()["tokens_total"]
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        # The layers really are spread: two machines, contiguous slots covering every layer and the output.
        assert llm.topology.machines == TWO
        assert sum(llm.topology.tensor_split) == llm.topology.n_layer + 1
        assert [d["endpoint"] for d in llm.devices] == llm.topology.endpoints
        assert llm.plan_ms < 200
        out = llm.create_completion(PROMPT, max_tokens=64, temperature=0)
        assert out["object"] == "text_completion"
        assert out["usage"]["completion_tokens"] == 64
        assert out["choices"][0]["text"] == local_greedy["completion"]

        chunks = list(llm.create_completion(PROMPT, max_tokens=64, temperature=0, stream=True))
        assert len(chunks) > 10  # streamed token by token, not one blob
        assert "".join(c["choices"][0]["text"] for c in chunks) == local_greedy["completion"]

        chat = llm.create_chat_completion([{"role": "user", "content": "Name a colour."}], max_tokens=24,
                                          temperature=0)
        assert chat["object"] == "chat.completion"
        assert chat["choices"][0]["message"]["role"] == "assistant"
        assert chat["choices"][0]["message"]["content"] == local_greedy["chat"]

        deltas = list(llm.create_chat_completion([{"role": "user", "content": "Name a colour."}], max_tokens=24,
                                                 temperature=0, stream=True))
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in deltas) == local_greedy["chat"]

        # The scheduler saw the session: its machines and the tokens it generated, counted as tokens (not as stream
        # chunks: a streamed completion ends with a chunk of no token, a streamed chat starts with a role chunk).
        n_chat = chat["usage"]["completion_tokens"]
        assert len(deltas) != n_chat
        state = mesh.state()
        sess = next(x for x in state["sessions"] if x["session_id"] == llm.session_id)
        assert list(sess["machines"]) == TWO
        assert sess["requests"] == 4
        assert sess["tokens"] == 64 + 64 + n_chat + n_chat
        assert state["tokens_total"] - total_before == sess["tokens"]
        assert sess["last_tok_s"] > 0
    assert all(x["session_id"] != llm.session_id for x in mesh.state()["sessions"])
    # Both machines now hold the model's weights warm; placement prefers them for it.
    assert all("gemma-3-270m-q4_k_m.gguf" in machine(mesh, m)["warm"] for m in TWO)


def test_weights_over_one_mib_reach_the_machines_tensor_caches(mesh):
    # Our build offers every weight over 1 MiB to the machines' tensor caches by hash (scripts/setup.sh lowers
    # llama.cpp's client-side HASH_THRESHOLD from 10 MiB), so a warm load re-sends none of them. The first machine
    # never holds the output layer or the 170 MiB embedding: after a load from an empty cache it holds Gemma's 1.03 MiB
    # ffn_down weights of its layers, where a stock llama.cpp caches nothing.
    from pathlib import Path

    from sharedllm import tensor_cache

    # machine-1's cache, as sharedllm.worker places it by default (the test cluster gives no --cache-dir)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharedllm" / "tensor-cache" / "machine-1"
    for entry in tensor_cache.entries(cache):
        entry.path.unlink()  # always safe between sessions: the next load sends that tensor again
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        llm.create_completion(PROMPT, max_tokens=2, temperature=0)
    sizes = [e.size for e in tensor_cache.entries(cache)]
    assert len(sizes) >= 3 and all(1 << 20 < n <= 10 << 20 for n in sizes), sizes


def test_stream_stopped_early_leaves_the_session_usable(mesh, local_greedy):
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        it = llm.create_completion(PROMPT, max_tokens=64, temperature=0, stream=True)
        first = [next(it) for _ in range(3)]
        it.close()
        assert first[0]["choices"][0]["text"]
        out = llm.create_completion(PROMPT, max_tokens=64, temperature=0)
        assert out["choices"][0]["text"] == local_greedy["completion"]


def test_asyncio_api_equals_the_blocking_one(mesh, local_greedy):
    colour = [{"role": "user", "content": "Name a colour."}]

    async def main(llm) -> dict:
        out = {}
        stream = await llm.acreate_completion(PROMPT, max_tokens=64, temperature=0, stream=True)
        chunks = [c async for c in stream]
        out["streamed"] = "".join(c["choices"][0]["text"] for c in chunks)
        out["chunks"], out["ids"] = len(chunks), {c["id"] for c in chunks}
        chat = await llm.acreate_chat_completion(colour, max_tokens=24, temperature=0)
        out["chat"] = chat["choices"][0]["message"]["content"]
        deltas = await llm.acreate_chat_completion(colour, max_tokens=24, temperature=0, stream=True)
        out["chat streamed"] = "".join([c["choices"][0]["delta"].get("content") or "" async for c in deltas])

        # A consumer cancelled mid-stream (a client hung up): the engine stops and the next request starts clean.
        accepted = []
        stream = await llm.acreate_completion(PROMPT, max_tokens=500, temperature=0, stream=True,
                                              on_accepted=lambda: accepted.append(True))

        async def read_three() -> None:
            async for _ in stream:
                out["read"] = out.get("read", 0) + 1
                if out["read"] == 3:
                    await asyncio.sleep(3600)

        task = asyncio.ensure_future(read_three())
        while out.get("read", 0) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        out["accepted"] = accepted
        # Closed early instead: the same.
        stream = await llm.acreate_completion(PROMPT, max_tokens=500, temperature=0, stream=True)
        await anext(stream)
        await stream.aclose()
        out["after"] = (await llm.acreate_completion(PROMPT, max_tokens=64, temperature=0))["choices"][0]["text"]
        return out

    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as llm:
        out = asyncio.run(main(llm))
        assert out["streamed"] == local_greedy["completion"] and out["chunks"] > 10 and len(out["ids"]) == 1
        assert out["chat"] == out["chat streamed"] == local_greedy["chat"]
        assert out["accepted"] == [True] and out["read"] == 3
        assert out["after"] == local_greedy["completion"]
        # Blocking calls after asyncio ones, on the same handle.
        assert llm.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"] == out["after"]
        sess = next(x for x in mesh.state()["sessions"] if x["session_id"] == llm.session_id)
        assert sess["requests"] == 7  # every asyncio request passed the scheduler's admission too
        assert sess["tokens"] >= 64 * 3 + 3 + 1


@pytest.mark.parametrize("api", ["blocking", "asyncio"])
def test_close_while_another_thread_streams_ends_that_stream_and_frees_the_lease(mesh, api):
    llm = mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO)
    sid, got, errors = llm.session_id, [], []

    def stream() -> None:
        kwargs = {"max_tokens": 500, "temperature": 0, "stream": True}
        try:
            if api == "asyncio":
                async def consume() -> None:
                    async for chunk in await llm.acreate_completion(PROMPT, **kwargs):
                        got.append(chunk)

                asyncio.run(consume())
            else:
                for chunk in llm.create_completion(PROMPT, **kwargs):
                    got.append(chunk)
        except Exception as exc:
            errors.append(exc)

    reader = threading.Thread(target=stream, name="streaming-while-closed")
    reader.start()
    wait_for(lambda: len(got) >= 3, timeout=60, what="the stream to start")
    llm.close()
    reader.join(timeout=60)
    assert not reader.is_alive(), "the stream did not end when its model was closed"
    assert len(errors) == 1 and isinstance(errors[0], ModelClosed), errors
    assert "closed" in str(errors[0]) and len(got) < 500
    assert llm.recoveries == []  # the close was not taken for a lost machine
    state = mesh.state()
    assert not [x for x in state["sessions"] if x["client"] == mesh.control.identity], "a lease outlived the close"
    assert next(x for x in state["recent_sessions"] if x["session_id"] == sid)["reason"] == "closed"
    with pytest.raises(EngineError, match="closed"):
        llm.create_completion(PROMPT, max_tokens=4)


def test_model_too_large_is_refused_before_upload(mesh):
    # The KV cache of a 4M-token context needs ~70 GiB: more than the two machines have.
    with pytest.raises(ModelTooLarge) as err:
        mesh.load("gemma-3-270m", n_ctx=4_000_000, machines=TWO)
    assert err.value.needed > err.value.available > 0
    assert "gemma-3-270m" in str(err.value) and "n_ctx" in str(err.value)


def test_kill_rpc_server_mid_stream_raises_typed_error_and_server_restarts(mesh):
    victim = machine(mesh, "machine-2")["rpc"]
    # max_recoveries=0: no reload on the remaining machines (test_churn covers that), the typed error surfaces.
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, max_recoveries=0) as llm:
        it = llm.create_completion(PROMPT, max_tokens=256, temperature=0, stream=True)
        next(it)
        os.kill(victim["pid"], signal.SIGKILL)
        with pytest.raises(WorkerLost) as err:
            for _ in it:
                pass
        assert err.value.machine == "machine-2"
        # The error names the endpoint the session used for machine-2 (its relay), as in llm.topology.
        used = next(s.endpoint for s in llm.topology.stages if s.machine_id == "machine-2")
        assert used == machine(mesh, "machine-2")["rpc"]["relay"]["endpoint"]
        assert used in str(err.value) and err.value.endpoint == used
        with pytest.raises(Exception, match="failed earlier"):
            llm.create_completion(PROMPT, max_tokens=4)
    # This process is alive (we are here); the actor brings the rpc-server back on the same endpoint.
    back = wait_for(lambda: (m := machine(mesh, "machine-2")) and m["rpc"]["state"] == "ready"
                    and m["rpc"]["pid"] != victim["pid"] and m["rpc"], what="rpc-server restart")
    assert back["restarts"] >= 1
    assert back["endpoint"] == victim["endpoint"]


def test_one_actor_per_machine_and_repinning(mesh_cluster, mesh):
    """`dask worker --nworkers 2` on one machine gives one actor; when its worker leaves, it is pinned again."""
    client = mesh_cluster.client()
    mesh_cluster.add_machine("multi", nworkers=2)
    m = wait_for(lambda: (m := machine(mesh, "multi")) and len(m["workers"]) == 2 and m["rpc"]["state"] == "ready"
                 and m, what="machine 'multi' with 2 workers and a ready rpc-server")

    def actors_on(workers):
        counts = client.run(lambda dask_worker: int(dask_worker.extensions["sharedllm"].actor is not None),
                            workers=workers)
        return sum(counts.values())

    assert actors_on(m["workers"]) == 1
    pinned = client.run_on_scheduler(
        lambda dask_scheduler: {k: r.worker for k, r in dask_scheduler.extensions["sharedllm"].data.actors.items()})
    assert pinned["multi"] == m["actor_worker"]
    # The scheduler addresses the actor over the worker's own connection: no Dask task or actor behind it.
    assert not client.run_on_scheduler(
        lambda dask_scheduler: [k for k in dask_scheduler.tasks if str(k).startswith("sharedllm-rpc")])
    holder, other = m["actor_worker"], next(w for w in m["workers"] if w != m["actor_worker"])

    # retire_workers refuses workers that hold actors, so the holder leaves the way a stopped worker does.
    client.run(_leave, workers=[holder])
    m2 = wait_for(lambda: (x := machine(mesh, "multi")) and x["actor_worker"] == other
                  and x["rpc"]["state"] == "ready" and x, what="actor pinned again on the remaining worker")
    assert list(m2["workers"]) == [other]
    assert actors_on([other]) == 1
    mesh_cluster.stop_machine("multi")
    wait_for(lambda: machine(mesh, "multi") is None, what="machine 'multi' to leave")
