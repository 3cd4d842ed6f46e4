# SPDX-License-Identifier: AGPL-3.0-or-later
"""The OpenAI-compatible endpoint, driven by the official ``openai`` package against a real loopback mesh.

One model is loaded for the whole module (the rpc-servers serve one session at a time) and served by uvicorn on
127.0.0.1 in a thread; the CLI test runs first, before that model is loaded, with its own ``sharedllm serve``.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from sharedllm.errors import ClientBanned, EngineError, MeshBusy, RateLimited, WorkerLost
from sharedllm.openai_server import ServerThread, create_app, listen_socket
from sharedllm.security import write_private
from tests.helpers import N_CTX, PROMPT, TWO, wait_for

pytestmark = pytest.mark.mesh

MODEL_ID = "gemma-3-270m-q4_k_m"
KEY = "sk-test-key-1"
CHAT = [{"role": "user", "content": "Name a colour."}]
BIN = Path(sys.executable).parent


def _client(url: str, key: str = KEY) -> openai.OpenAI:
    # max_retries=0: a 429 or 503 must reach the test, not be retried away.
    return openai.OpenAI(api_key=key, base_url=f"{url}/v1", max_retries=0, timeout=120)


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# --- the command line (first: it needs the rpc-servers that the module's model holds afterwards) -----------------


def test_serve_refuses_an_open_address_without_keys(tmp_path):
    out = subprocess.run([str(BIN / "sharedllm"), "serve", "--scheduler", "tcp://127.0.0.1:1", "--model",
                          "gemma-3-270m", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "refusing to serve without an API key" in out.stderr
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n\n")
    out = subprocess.run([str(BIN / "sharedllm"), "serve", "--scheduler", "tcp://127.0.0.1:1", "--model",
                          "gemma-3-270m", "--api-keys-file", str(empty)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "holds no key" in out.stderr


def test_sharedllm_serve_command(mesh_cluster, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# one key per line\nsk-file-key\n")
    # The server is a user of the mesh like any other: its own key, in the file SHAREDLLM_KEY_FILE names.
    mesh_key = tmp_path / "mesh.key"
    write_private(mesh_key, mesh_cluster.add_user("openai-serve") + "\n")
    env = {k: v for k, v in os.environ.items() if k != "SHAREDLLM_KEY"}
    env["SHAREDLLM_KEY_FILE"] = str(mesh_key)
    proc = subprocess.Popen(
        [str(BIN / "sharedllm"), "serve", "--scheduler", mesh_cluster.user_address, "--model", "gemma-3-270m",
         "--port", "0", "--api-keys-file", str(keys), "--model-name", "gemma", "--max-queue", "2",
         "--parallel", "2", "--fast-batches", *[a for m in TWO for a in ("--machine", m)]],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    try:
        seen, url = [], None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                ln = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(ln)
            if m := re.search(r"at (http://127\.0\.0\.1:\d+)/v1", ln):
                url = m.group(1)
        assert url, "".join(seen)
        assert "2 request(s) at once per replica, fast batches" in seen[-1], seen[-1]
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        client = _client(url, "sk-file-key")
        assert [m.id for m in client.models.list().data] == ["gemma"]
        chat = client.chat.completions.create(model="gemma", messages=CHAT, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            _client(url, "sk-wrong").models.list()
        # Its session is its user's.
        assert "openai-serve" in {s["client"] for s in mesh_cluster.mesh().state()["sessions"]}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# --- the module's model and server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(mesh):
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO) as model:
        yield model


@pytest.fixture(scope="module")
def app(llm):
    return create_app(llm, model_id=MODEL_ID, api_keys=[KEY, "sk-test-key-2"], max_queue=4, queue_timeout=120)


@pytest.fixture(scope="module")
def server(app):
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = _client(server.url)
    yield c
    c.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as h:
        yield h


def test_models_list(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert http.get("/health").json() == {"status": "ok", "model": MODEL_ID, "running": 0, "waiting": 0,
                                          "max_queue": 4, "error": None}


def test_greedy_chat_equals_the_python_api(client, llm, local_greedy):
    via_http = client.chat.completions.create(model=MODEL_ID, messages=CHAT, temperature=0, max_tokens=24)
    direct = llm.create_chat_completion(CHAT, temperature=0, max_tokens=24)
    text = via_http.choices[0].message.content
    assert text == direct["choices"][0]["message"]["content"] == local_greedy["chat"]
    assert via_http.model == MODEL_ID
    assert via_http.object == "chat.completion"
    assert via_http.choices[0].message.role == "assistant"
    assert via_http.choices[0].finish_reason == direct["choices"][0]["finish_reason"]
    assert via_http.usage.completion_tokens == direct["usage"]["completion_tokens"]

    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, temperature=0, max_tokens=24,
                                            stream=True)
    chunks = list(stream)
    assert len(chunks) > 5  # token by token, not one blob
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL_ID for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content  # the role rides with the first text: one event less before it
    assert [c for c in chunks if c.choices[0].delta.role] == chunks[:1]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == via_http.choices[0].finish_reason


def test_completions_plain_and_streaming(client, local_greedy):
    out = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=64, temperature=0)
    assert out.object == "text_completion"
    assert out.choices[0].text == local_greedy["completion"]
    assert out.usage.completion_tokens == 64
    # draft_max (llama-server's speculative.n_max) passes through; a model loaded without a draft has none to bound
    bounded = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=64, temperature=0,
                                        extra_body={"draft_max": 0})
    assert bounded.choices[0].text == local_greedy["completion"]
    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=64, temperature=0,
                                            stream=True))
    assert len(chunks) > 10
    assert "".join(c.choices[0].text for c in chunks) == local_greedy["completion"]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # not asked for
    # stream_options.include_usage: one more chunk, with no choices, says what the non-streamed answer's usage says.
    chunks = list(client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=64, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    *text, last = chunks
    assert "".join(c.choices[0].text for c in text) == local_greedy["completion"] and last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        out.usage.prompt_tokens, 64, out.usage.prompt_tokens + 64)
    assert all(c.usage is None for c in text) and last.id == text[0].id
    whole = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=8, temperature=0)
    chat = list(client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=8, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
    assert chat[-1].choices == [] and chat[-1].usage.total_tokens == whole.usage.total_tokens > 0
    assert (chat[-1].usage.prompt_tokens, chat[-1].usage.completion_tokens) == (whole.usage.prompt_tokens,
                                                                                whole.usage.completion_tokens)


def test_sse_wire_format(http):
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL_ID, "messages": CHAT, "max_tokens": 4,
                                                           "temperature": 0, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in resp.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in events)
    assert events[-1] == "data: [DONE]"
    assert [json.loads(ln[6:])["object"] for ln in events[:-1]] == ["chat.completion.chunk"] * (len(events) - 1)


def test_events_are_not_held_back_by_nagle():
    # asyncio disables Nagle's algorithm only on connections of sockets that name IPPROTO_TCP; otherwise each event
    # after the headers waited for the client's delayed ACK, 40 ms (plain HTTP clients such as httpx and curl).
    sock = listen_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_api_keys(server, http):
    with pytest.raises(openai.AuthenticationError) as err:
        _client(server.url, "sk-wrong").models.list()
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    assert _client(server.url, "sk-test-key-2").models.list().data[0].id == MODEL_ID  # every key works
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}):
        resp = httpx.post(f"{server.url}/v1/chat/completions", headers=headers,
                          json={"model": MODEL_ID, "messages": CHAT})
        assert resp.status_code == 401
        assert _error(resp)["code"] == "invalid_api_key"
    # Authentication comes first: a malformed body without a key is still a 401.
    assert httpx.post(f"{server.url}/v1/completions", content=b"{nope").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # no key needed
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200


def test_malformed_requests(client, http, local_greedy):
    def post(path, **kw):
        return http.post(path, **kw)

    resp = post("/v1/chat/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and _error(resp)["type"] == "invalid_request_error"
    resp = post("/v1/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and _error(resp)["type"] == "invalid_request_error"
    resp = post("/v1/chat/completions", json={"model": MODEL_ID})
    assert resp.status_code == 400 and _error(resp)["param"] == "messages"
    resp = post("/v1/chat/completions", json={"model": MODEL_ID, "messages": CHAT, "temperature": 7})
    assert resp.status_code == 400 and _error(resp)["param"] == "temperature"
    resp = post("/v1/completions", json={"model": MODEL_ID, "prompt": "x", "draft_max": -1})
    assert resp.status_code == 400 and _error(resp)["param"] == "draft_max"
    resp = post("/v1/chat/completions", json={"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]})
    assert resp.status_code == 400 and _error(resp)["param"].startswith("messages.0.role")
    resp = post("/v1/completions", json={"model": MODEL_ID, "prompt": [[1, 2], [3]]})
    assert resp.status_code == 400 and _error(resp)["param"] == "prompt"
    resp = post("/v1/completions", json={"model": MODEL_ID, "prompt": [2, 10**9]})
    assert resp.status_code == 400 and "vocabulary" in _error(resp)["message"]
    resp = post("/v1/completions", json={"model": MODEL_ID, "prompt": "hi", "logit_bias": {"99999999": 5}})
    assert resp.status_code == 400 and _error(resp)["param"] == "logit_bias"
    resp = post("/v1/chat/completions", json={"model": MODEL_ID, "messages": CHAT, "n": 2})
    assert resp.status_code == 400
    resp = post("/v1/chat/completions", json={"model": MODEL_ID, "messages": CHAT,
                                              "functions": [{"name": "f", "parameters": {}}]})
    assert resp.status_code == 400 and _error(resp)["param"] == "functions"  # tools: see test_tool_calls_...
    resp = post("/v1/embeddings", json={"model": MODEL_ID, "input": "x"})
    assert resp.status_code == 404 and _error(resp)["code"] == "unknown_url"

    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert err.value.code == "model_not_found"
    assert err.value.body["param"] == "model"

    long_prompt = "hello " * (N_CTX + 100)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt=long_prompt, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    # What is too long and what helps (lowering max_tokens cannot: it is capped to what fits)
    assert re.search(rf"the prompt has \d+ tokens, the context {N_CTX}\. Shorten the prompt\.$", err.value.message)
    with pytest.raises(openai.BadRequestError) as err:  # streamed: refused before the stream starts
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=4, stream=True)
    assert err.value.code == "context_length_exceeded"
    assert err.value.body["type"] == "invalid_request_error"

    # None of this hurt the model.
    assert http.get("/health").json()["status"] == "ok"
    out = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=64, temperature=0)
    assert out.choices[0].text == local_greedy["completion"]


def test_two_concurrent_streams_both_finish(client):
    expected = client.chat.completions.create(model=MODEL_ID, messages=CHAT, temperature=0, max_tokens=24)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def consume(i: int) -> None:
        try:
            stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, temperature=0, max_tokens=24,
                                                    stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert results == {0: expected.choices[0].message.content, 1: expected.choices[0].message.content}


def test_queue_full_429_queue_timeout_503_and_disconnect_cancels(llm, server):
    small = create_app(llm, model_id=MODEL_ID, api_keys=[KEY], max_queue=1, queue_timeout=2.0)
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}
    with ServerThread(small) as s, httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"},
                                                timeout=60) as h:
        with h.stream("POST", "/v1/completions", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()
            assert next(lines).startswith("data: ")  # the engine is busy with this stream now
            waited: dict = {}

            def second() -> None:
                t0 = time.monotonic()
                r = h.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
                waited.update(status=r.status_code, seconds=time.monotonic() - t0, headers=r.headers,
                              error=_error(r))

            t = threading.Thread(target=second)
            t.start()
            deadline = time.monotonic() + 10
            while small.state.queue.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert small.state.queue.waiting == 1
            t0 = time.monotonic()
            health = h.get("/health")  # the event loop is not blocked by the generation
            assert health.status_code == 200 and health.json()["running"] == 1
            assert time.monotonic() - t0 < 1.0
            third = h.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
            assert third.status_code == 429
            assert int(third.headers["Retry-After"]) >= 1
            assert _error(third)["code"] == "rate_limit_exceeded"
            t.join(timeout=30)
            assert waited["status"] == 503
            assert 1.9 <= waited["seconds"] < 10
            assert int(waited["headers"]["Retry-After"]) >= 1
            assert waited["error"]["code"] == "queue_timeout"
            # A client that gives up while it waits in the queue: when its turn comes, nothing is generated for it.
            with httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5) as impatient:
                with pytest.raises(httpx.ReadTimeout):
                    impatient.post("/v1/completions", json=body)
            assert small.state.queue.waiting == 1
            next(lines)
        # The first client hung up: its generation stops long before its 1000 tokens and the engine is free again.
        [gen] = small.state.generations
        assert gen.finished.wait(10) and gen.chunks < 500
        t0 = time.monotonic()
        out = h.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
        assert out.status_code == 200, out.text
        assert time.monotonic() - t0 < 10
        assert small.state.queue.running == 0
        assert small.state.abandoned == 1


def test_a_non_streamed_request_stops_generating_when_its_client_hangs_up(llm, mesh):
    small = create_app(llm, model_id=MODEL_ID, api_keys=[KEY], max_queue=1, queue_timeout=60)
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 1500, "temperature": 0}
    tokens = lambda: next(x for x in mesh.state()["sessions"] if x["session_id"] == llm.session_id)["tokens"]  # noqa: E731
    with ServerThread(small) as s, httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"},
                                                timeout=1.0) as impatient:
        before = tokens()
        with pytest.raises(httpx.ReadTimeout):  # 1500 tokens take far longer than the client waits
            impatient.post("/v1/completions", json=body)
        # It hung up: the generation stops at the next token, the engine is free again and the next request is
        # served at once (not after the abandoned one's 1500 tokens, nor with a 503 after the queue's timeout).
        wait_for(lambda: small.state.queue.running == 0, timeout=15, what="the abandoned request to stop")
        assert small.state.abandoned == 1
        with httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
            out = h.post("/v1/completions", json={**body, "max_tokens": 4})
        assert out.status_code == 200, out.text
        assert out.json()["usage"]["completion_tokens"] == 4
        assert tokens() - before < 1500


def test_openapi_schema_and_generated_requests(server, app, http):
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, settings

    resp = http.get("/openapi.json")
    assert resp.status_code == 200
    spec = resp.json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health"} <= set(spec["paths"])
    assert "422" not in json.dumps(spec["paths"])  # validation errors are OpenAI-style 400s

    schema = schemathesis.openapi.from_dict(spec)
    statuses: dict[str, list[int]] = {}

    def check(case, positive: bool) -> None:
        if isinstance(case.body, dict):
            # Valid requests name the served model, so that they reach the engine; a few tokens each keeps this quick.
            if positive:
                case.body["model"] = MODEL_ID
            # (Left out, a chat completion runs to the end of the context.)
            for k in ("max_tokens", "max_completion_tokens"):
                v = case.body.get(k)
                if v is None or (isinstance(v, int | float) and not isinstance(v, bool) and v > 4):
                    case.body[k] = 4
            if positive and isinstance(case.body.get("logit_bias"), dict):
                # A large positive bias on a byte-fallback token makes llama-cpp-python generate past max_tokens
                # until the context is full (a known engine limitation, not a server error): keep the fuzz quick.
                case.body["logit_bias"] = {k: min(v, 0.0) for k, v in case.body["logit_bias"].items()}
        r = case.call(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        statuses.setdefault(case.operation.label, []).append(r.status_code)
        assert r.status_code < 500, (case.operation.label, case.body, r.status_code, r.text[:500])

    def checker(positive: bool):
        return lambda case: check(case, positive)

    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode)
            test = hypothesis.given(case=strategy)(checker(mode == schemathesis.GenerationMode.POSITIVE))
            try:
                settings(max_examples=15, deadline=None, database=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))(test)()
            except hypothesis.errors.Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing to get wrong (GET /health)
    assert http.get("/health").json()["status"] == "ok"
    assert any(s == 200 for s in statuses.get("POST /v1/chat/completions", [])), statuses
    assert any(s == 200 for s in statuses.get("POST /v1/completions", [])), statuses


class _Failing:
    """A stand-in model that raises what the mesh raises, to check each error's status (no engine involved)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def create_completion(self, *args, **kwargs):
        raise self.exc

    create_chat_completion = create_completion


@pytest.mark.parametrize(("exc", "status", "code", "retry"), [
    (RateLimited("client over 60 requests/min", retry_after=2.5), 429, "rate_limit_exceeded", "3"),
    (MeshBusy("every machine is leased"), 503, "mesh_busy", "10"),
    (ClientBanned("client c-1 is banned from this mesh"), 403, "client_banned", None),
    (WorkerLost("machine-2 (rpc-server 127.0.0.1:1) is unreachable", machine="machine-2"), 503, "engine_failed",
     None),
])
def test_mesh_errors_become_openai_errors(exc, status, code, retry):
    app = create_app(_Failing(exc), model_id=MODEL_ID, max_queue=1, queue_timeout=5)
    with ServerThread(app) as s:
        for stream in (False, True):
            resp = httpx.post(f"{s.url}/v1/chat/completions", json={"model": MODEL_ID, "messages": CHAT,
                                                                     "stream": stream}, timeout=30)
            assert resp.status_code == status, resp.text
            assert _error(resp)["code"] == code
            assert resp.headers.get("Retry-After") == retry
        health = httpx.get(f"{s.url}/health", timeout=30)
        # An engine failure leaves the handle unusable: /health says so, and later requests fail at once.
        assert health.status_code == (503 if isinstance(exc, EngineError) else 200)
        assert app.state.queue.running == 0


class _Scripted:
    """A stand-in model that streams the chat chunks it is given (no engine involved)."""

    def __init__(self, deltas: list[dict]):
        self.deltas = deltas

    def create_chat_completion(self, messages, **kwargs):
        for i, delta in enumerate(self.deltas):
            last = i == len(self.deltas) - 1
            yield {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL_ID,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": "stop" if last and not delta else None}]}


@pytest.mark.parametrize(("deltas", "events", "finish"), [
    # The role rides with the first text.
    ([{"role": "assistant"}, {"content": "Hi"}, {"content": "!"}, {}],
     [{"role": "assistant", "content": "Hi"}, {"content": "!"}, {}], "stop"),
    # An answer without text: the role joins the final chunk; nothing is lost.
    ([{"role": "assistant"}, {}], [{"role": "assistant"}], "stop"),
    # A stream that ends after the role: the role chunk goes out on its own, then [DONE].
    ([{"role": "assistant"}], [{"role": "assistant"}], None),
])
def test_chat_role_chunk_joins_the_first_text(deltas, events, finish):
    app = create_app(_Scripted(deltas), model_id=MODEL_ID, max_queue=1, queue_timeout=5)
    with ServerThread(app) as s:
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", timeout=30,
                          json={"model": MODEL_ID, "messages": CHAT, "stream": True}) as resp:
            lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:])["choices"][0] for ln in lines[:-1]]
    assert [c["delta"] for c in chunks] == events
    assert chunks[-1]["finish_reason"] == finish


def test_a_model_served_by_its_catalog_name_answers_to_it():
    # `sharedllm serve --model gemma-3-270m` serves the file gemma-3-270m-q4_k_m.gguf: clients may name either.
    app = create_app(_Scripted([{"role": "assistant"}, {"content": "Hi"}, {}]), model_id=MODEL_ID,
                     aliases=["gemma-3-270m"], max_queue=1, queue_timeout=5)
    with ServerThread(app) as s:
        assert httpx.get(f"{s.url}/v1/models/gemma-3-270m", timeout=30).json()["id"] == MODEL_ID
        assert [m["id"] for m in httpx.get(f"{s.url}/v1/models", timeout=30).json()["data"]] == [MODEL_ID]
        resp = httpx.post(f"{s.url}/v1/chat/completions", timeout=30,
                          json={"model": "gemma-3-270m", "messages": CHAT, "stream": True})
        assert resp.status_code == 200 and "Hi" in resp.text
        assert httpx.get(f"{s.url}/v1/models/gemma-3", timeout=30).status_code == 404


class _Accepting:
    """A stand-in model that says when it accepted a request (as MeshModel does), then waits for ``go``."""

    streams_acceptance = True

    def __init__(self, fail_before: BaseException | None = None, fail_after: BaseException | None = None):
        self.fail_before, self.fail_after = fail_before, fail_after
        self.go = threading.Event()

    def create_chat_completion(self, messages, on_accepted=None, **kwargs):
        if self.fail_before is not None:
            raise self.fail_before
        on_accepted()
        assert self.go.wait(30)
        if self.fail_after is not None:
            raise self.fail_after
        for delta in ({"role": "assistant"}, {"content": "Hi"}, {}):
            yield {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": MODEL_ID,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                "finish_reason": None if delta else "stop"}]}


def test_headers_go_out_when_the_model_accepts_the_request():
    model = _Accepting()
    app = create_app(model, model_id=MODEL_ID, max_queue=1, queue_timeout=5)
    with ServerThread(app) as s:
        # The status line and headers arrive while the model still works on the prompt (the client's work on them
        # overlaps it); the first chunk follows with the role merged in.
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", timeout=30,
                          json={"model": MODEL_ID, "messages": CHAT, "stream": True}) as resp:
            assert resp.status_code == 200 and not model.go.is_set()
            model.go.set()
            lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert [json.loads(ln[6:])["choices"][0]["delta"] for ln in lines[:-1]] == [
            {"role": "assistant", "content": "Hi"}, {}]

        # A failure after acceptance goes in-band, as OpenAI's mid-stream errors do; before it, it keeps its status.
        model.fail_after = WorkerLost("machine-2 is unreachable", machine="machine-2")
        model.go.set()
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", timeout=30,
                          json={"model": MODEL_ID, "messages": CHAT, "stream": True}) as resp:
            assert resp.status_code == 200
            lines = [ln for ln in resp.iter_lines() if ln.startswith("data: ")]
        assert len(lines) == 1 and json.loads(lines[0][6:])["error"]["code"] == "engine_failed"
    early = _Accepting(fail_before=RateLimited("client over 60 requests/min", retry_after=2.5))
    with ServerThread(create_app(early, model_id=MODEL_ID, max_queue=1, queue_timeout=5)) as s:
        resp = httpx.post(f"{s.url}/v1/chat/completions", json={"model": MODEL_ID, "messages": CHAT, "stream": True},
                          timeout=30)
        assert resp.status_code == 429 and _error(resp)["code"] == "rate_limit_exceeded"


class _Endless:
    """A stand-in model with a blocking API only (no ``acreate_*``): the server runs its stream in a thread."""

    def __init__(self):
        self.closed = threading.Event()

    def create_completion(self, prompt, **kwargs):
        try:
            for i in itertools.count():
                time.sleep(0.01)
                yield {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": MODEL_ID,
                       "choices": [{"text": f" {i}", "index": 0, "logprobs": None, "finish_reason": None}]}
        finally:
            self.closed.set()


def test_a_blocking_model_streams_from_a_thread_and_stops_when_the_client_hangs_up():
    model = _Endless()
    app = create_app(model, model_id=MODEL_ID, max_queue=1, queue_timeout=5)
    with ServerThread(app) as s:
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=30,
                          json={"model": MODEL_ID, "prompt": "x", "stream": True}) as resp:
            lines = resp.iter_lines()
            got = [json.loads(ln[6:])["choices"][0]["text"] for ln in itertools.islice(
                (ln for ln in lines if ln.startswith("data: ")), 3)]
        assert got == [" 0", " 1", " 2"]
        [gen] = app.state.generations
        assert model.closed.wait(10) and gen.finished.wait(10)  # the generator was closed: the model stopped
        assert wait_for(lambda: app.state.queue.running == 0, timeout=10, what="the slot to be released")


def test_a_system_message_is_the_start_of_gemmas_first_turn():
    """No model: GGUFs without a chat template get Gemma's own template (``sharedllm.engine.chat``), where a leading
    system message starts the first user turn; llama-cpp-python's ``gemma`` format dropped it (and every instruction an
    OpenAI client sends as ``system``). Without one, the prompt is llama-cpp-python's."""
    from llama_cpp import llama_chat_format

    from sharedllm.engine.chat import format_gemma

    turns = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
             {"role": "user", "content": "Another?"}]
    assert format_gemma(turns).prompt == llama_chat_format.format_gemma(turns).prompt
    with_system = format_gemma([{"role": "system", "content": " Answer in French. "}, *turns]).prompt
    assert with_system == ("<start_of_turn>user\nAnswer in French.\n\nName a colour.<end_of_turn>\n"
                           "<start_of_turn>model\nBlue.<end_of_turn>\n<start_of_turn>user\nAnother?<end_of_turn>\n"
                           "<start_of_turn>model\n")
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    assert format_gemma(parts).prompt == llama_chat_format.format_gemma(turns[:1]).prompt  # OpenAI's content parts


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers",
        "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_calls_through_the_mesh(client, http, llm):
    """tools + tool_choice "required" / a named function: the grammar holds the answer to a call whose arguments
    match the function's schema; streamed, the call comes whole in one delta; a tool result goes back in."""
    def matches(name: str, arguments: str) -> bool:  # the two schemas above
        args = json.loads(arguments)
        if name == "add":
            return set(args) == {"a", "b"} and all(isinstance(v, int | float) for v in args.values())
        return isinstance(args.get("city"), str) and args.get("unit", "C") in ("C", "F") and set(args) <= {
            "city", "unit"}

    schemas = {t["function"]["name"] for t in WEATHER}
    for choice, names in (("required", schemas), ({"type": "function", "function": {"name": "add"}}, {"add"})):
        out = client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=WEATHER, tool_choice=choice,
                                             max_tokens=60, temperature=0)
        [answer] = out.choices
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        [call] = answer.message.tool_calls  # one call: parallel_tool_calls was not asked for
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        assert matches(call.function.name, call.function.arguments), call
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=ASK, tools=WEATHER,
                                                 tool_choice="required", max_tokens=60, temperature=0, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    [streamed] = deltas[0].tool_calls
    assert streamed.index == 0 and streamed.function.name in schemas
    assert matches(streamed.function.name, streamed.function.arguments), streamed
    # The Python API reads answers back the same way.
    out = llm.create_chat_completion(ASK, tools=WEATHER, tool_choice="required", max_tokens=60, temperature=0)
    [py] = out["choices"][0]["message"]["tool_calls"]
    assert out["choices"][0]["finish_reason"] == "tool_calls" and matches(py["function"]["name"],
                                                                          py["function"]["arguments"])
    # The call and its result go back in as the conversation's history; the model answers (in any words).
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "cloudy"}'}]
    out = client.chat.completions.create(model=MODEL_ID, messages=history, tools=WEATHER, tool_choice="none",
                                         max_tokens=8, temperature=0)
    assert out.choices[0].message.content and out.choices[0].message.tool_calls is None
    # Malformed tools are 400s that name the field.
    for body, param in (({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
                        ({"tools": WEATHER, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                         "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice")):
        r = http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": ASK, "max_tokens": 4, **body})
        assert r.status_code == 400 and _error(r)["param"] == param, r.text
