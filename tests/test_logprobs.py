# SPDX-License-Identifier: AGPL-3.0-or-later
"""Log-probabilities (``logprobs``, chat ``top_logprobs``) from batched and one-at-a-time engines, through the mesh,
without ``logits_all``: equal to plain llama-cpp-python's (``logits_all=True``, the same CPU kernels)."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from sharedllm.engine import Engine, EngineSpec
from sharedllm.openai_server import ServerThread, create_app

pytestmark = pytest.mark.mesh

PROMPTS = ["The capital of France is", "Once upon a time, a little fox"]
ARGS = {"max_tokens": 6, "temperature": 0, "logprobs": 3}


def _plain(lp: dict) -> dict:
    """A completion's logprobs with plain floats (llama-cpp-python's own are numpy's)."""
    return {"tokens": lp["tokens"], "text_offset": lp["text_offset"],
            "token_logprobs": [float(x) for x in lp["token_logprobs"]],
            "top_logprobs": [{k: float(v) for k, v in top.items()} for top in lp["top_logprobs"]]}


def _assert_same(got: dict, want: dict) -> None:
    assert got["tokens"] == want["tokens"] and got["text_offset"] == want["text_offset"]
    assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-4)
    for top, ref in zip(got["top_logprobs"], want["top_logprobs"], strict=True):
        assert set(top) == set(ref) and [top[k] for k in ref] == pytest.approx(list(ref.values()), abs=1e-4)


@pytest.fixture(scope="module")
def native(model_path) -> dict[str, dict]:
    """llama-cpp-python's own logprobs (it needs ``logits_all``) for each prompt, with the oracle's kernels."""
    from sharedllm.engine import build_llama

    llm = build_llama(str(model_path), n_ctx=256, use_extra_bufts=False, logits_all=True)
    try:
        return {p: llm.create_completion(p, **ARGS)["choices"][0] for p in PROMPTS}
    finally:
        llm.close()


def _merged(chunks) -> dict:
    out = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
    for chunk in chunks:
        for key, values in (chunk["choices"][0]["logprobs"] or {}).items():
            out[key] += values
    return out


def _assert_bytes(content: list[dict], text: str) -> None:
    """OpenAI's ``bytes``: each token's UTF-8 bytes, together the message's text; each alternative's its own."""
    assert content and all(isinstance(e["bytes"], list) for e in content)
    assert bytes(b for e in content for b in e["bytes"]).decode() == text
    for e in content:
        assert bytes(e["bytes"]).decode(errors="ignore") == e["token"]
        assert all(bytes(t["bytes"]).decode(errors="ignore") == t["token"] for t in e["top_logprobs"])


@pytest.mark.parametrize("parallel", [1, 2])
def test_an_engine_gives_llama_cpp_pythons_logprobs_without_logits_all(model_path, native, parallel):
    engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 256}, parallel=parallel))
    engine.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # batched: side by side
            outs = dict(zip(PROMPTS, pool.map(lambda p: engine.call("create_completion", {"prompt": p, **ARGS}),
                                              PROMPTS), strict=True))
        for p in PROMPTS:
            choice, ref = outs[p]["choices"][0], native[p]
            assert choice["text"] == ref["text"]
            _assert_same(choice["logprobs"], _plain(ref["logprobs"]))
            # Streamed: each chunk carries the tokens its text begins, together the same.
            chunks = [c for c, _ in engine.stream("create_completion", {"prompt": p, **ARGS})]
            assert "".join(c["choices"][0]["text"] for c in chunks) == ref["text"]
            _assert_same(_merged(chunks), _plain(ref["logprobs"]))
        # Chat: OpenAI's logprobs.content, also for logprobs=True without top_logprobs (the chosen tokens').
        chat = engine.call("create_chat_completion", {"messages": [{"role": "user", "content": "Say hi"}],
                                                      "max_tokens": 5, "temperature": 0, "logprobs": True})
        content = chat["choices"][0]["logprobs"]["content"]
        assert "".join(e["token"] for e in content) == chat["choices"][0]["message"]["content"]
        assert all(e["logprob"] <= 0 and e["top_logprobs"] == [] for e in content)  # OpenAI: top_logprobs 0
        _assert_bytes(content, chat["choices"][0]["message"]["content"])
        # Streamed chat: each chunk's entries, their bytes too.
        chunks = [c for c, _ in engine.stream("create_chat_completion", {
            "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5, "temperature": 0, "logprobs": True,
            "top_logprobs": 2})]
        streamed = [e for c in chunks for e in ((c["choices"][0].get("logprobs") or {}).get("content") or [])]
        _assert_bytes(streamed, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks))
        assert [e["token"] for e in streamed] == [e["token"] for e in content]
        assert all(len(e["top_logprobs"]) == 2 for e in streamed)
        # Sampled: still the 2 most likely, whether or not the sampled token is one of them.
        sampled = engine.call("create_chat_completion", {
            "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 12, "temperature": 2.0, "seed": 3,
            "logprobs": True, "top_logprobs": 2})["choices"][0]["logprobs"]["content"]
        assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] >= e["top_logprobs"][1]["logprob"]
                   for e in sampled)
        # No logprobs asked: none given.
        assert engine.call("create_completion", {"prompt": PROMPTS[0], "max_tokens": 2})["choices"][0]["logprobs"] \
            is None
        if parallel > 1:
            with pytest.raises(ValueError, match="echo=True"):
                engine.call("create_completion", {"prompt": PROMPTS[0], "echo": True, **ARGS})
    finally:
        engine.close()


def test_logprobs_of_batched_requests_through_the_mesh_and_its_api(mesh, native):
    with mesh.load("gemma-3-270m", n_ctx=256, machines=["machine-1", "machine-2"], parallel=2) as llm:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            outs = list(pool.map(lambda p: llm.create_completion(p, **ARGS), PROMPTS))
        for p, out in zip(PROMPTS, outs, strict=True):
            assert out["choices"][0]["text"] == native[p]["text"]
            _assert_same(out["choices"][0]["logprobs"], _plain(native[p]["logprobs"]))
        app = create_app(llm, model_id="gemma")
        with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=120) as h:
            r = h.post("/v1/completions", json={"model": "gemma", "prompt": PROMPTS[0], **ARGS})
            assert r.status_code == 200, r.text
            _assert_same(r.json()["choices"][0]["logprobs"], _plain(native[PROMPTS[0]]["logprobs"]))
            r = h.post("/v1/chat/completions", json={"model": "gemma", "max_tokens": 4, "temperature": 0,
                                                     "messages": [{"role": "user", "content": "Say hi"}],
                                                     "logprobs": True, "top_logprobs": 2})
            assert r.status_code == 200, r.text
            content = r.json()["choices"][0]["logprobs"]["content"]
            assert "".join(e["token"] for e in content) == r.json()["choices"][0]["message"]["content"]
            assert all(len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] >= e["logprob"]
                       for e in content)  # OpenAI: the k most likely, no more (the chosen one is not added)
            _assert_bytes(content, r.json()["choices"][0]["message"]["content"])
