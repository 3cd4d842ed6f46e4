# SPDX-License-Identifier: AGPL-3.0-or-later
"""The prompt cache: a request keeps the KV cells its prompt shares with an earlier request's and reads only the
rest, wherever that leaves its greedy text what it is alone (one request at a time and exact batches: cells written
by the passes a fresh context would make; fast batches: any common prefix)."""

from __future__ import annotations

import pytest

from sharedllm.engine import Engine, EngineSpec
from sharedllm.engine.prompt_cache import PromptCache
from tests.helpers import wait_for

pytestmark = pytest.mark.mesh  # the real model (one test, the cluster too): not among `pytest -m "not mesh"`'s

# A chat's history of 700-odd tokens (more than one n_batch pass of 512), then two turns.
HISTORY = ("The fox and the dog lived on the same farm. Every morning the fox ran to the river and the dog "
           "watched the sheep, and every evening they met by the old barn to tell each other about their day. ") * 18
TURN1 = HISTORY + "\nQuestion: where did the fox run every morning?\nAnswer:"
QUESTION2 = "\nQuestion: and what did the dog watch?\nAnswer:"
ARGS = {"max_tokens": 16, "temperature": 0}


def _engine(model_path, mode: str, prompt_cache: bool = True) -> Engine:
    engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 2048}, parallel=1 if mode == "serial" else 2,
                               exact_batches=mode != "fast", prompt_cache=prompt_cache))
    engine.start()
    if mode == "exact":  # the measures a first load takes while idle use every slot's cells: had before the turns
        assert engine.measured(120) is not None
    return engine


def _complete(engine: Engine, prompt: str) -> tuple[str, int, int]:
    """The greedy text of ``prompt``, and how many prompt tokens the engine read and found in its cache for it."""
    before = engine.poll_stats()
    n = len(engine.call("tokenize", {"text": prompt.encode()}))
    out = engine.call("create_completion", {"prompt": prompt, **ARGS})
    after = wait_for(lambda: (s := engine.poll_stats()).get("prompt_tokens", 0) >= before.get("prompt_tokens", 0) + n
                     and s.get("running", 0) == 0 and s, timeout=60, what="the engine's report of the request")
    assert after["prompt_tokens"] - before.get("prompt_tokens", 0) == n
    cached = after["cached_tokens"] - before.get("cached_tokens", 0)
    # The response says it as OpenAI's API does.
    assert out["usage"].get("prompt_tokens_details", {"cached_tokens": 0}) == {"cached_tokens": cached}, out["usage"]
    return out["choices"][0]["text"], n, cached


@pytest.fixture(scope="module")
def fresh(model_path) -> dict[str, str]:
    """The two turns on an engine without the cache: every request reads its whole prompt."""
    engine = _engine(model_path, "serial", prompt_cache=False)
    try:
        out1, _, cached1 = _complete(engine, TURN1)
        turn2 = TURN1 + out1 + QUESTION2
        out2, _, cached2 = _complete(engine, turn2)
        assert cached1 == cached2 == 0
        return {"out1": out1, "turn2": turn2, "out2": out2}
    finally:
        engine.close()


@pytest.mark.parametrize("mode", ["serial", "exact", "fast"])
def test_the_next_turn_of_a_chat_reads_only_what_it_adds(model_path, fresh, mode):
    """The second turn of a chat (the first turn's prompt, its answer and a new question) keeps the cells of the
    first turn's prompt: one request at a time and exact batches, all of them but what leaves the rest read in the
    passes of a solo request (chunks of at least the measured size, and a solo request's own short last pass); fast
    batches, the first turn's answer too. One at a time and exact, the answer is the answer without the cache."""
    engine = _engine(model_path, mode)
    try:
        out1, n1, cached1 = _complete(engine, TURN1)
        assert cached1 == 0 and n1 > 512, (cached1, n1)
        turn2 = TURN1 + out1 + QUESTION2
        out2, n2, cached2 = _complete(engine, turn2)
        if mode in ("serial", "exact"):
            assert n1 - 64 <= cached2 <= n1, (cached2, n1, n2)
        else:
            n_answer = len(engine.call("tokenize", {"text": (TURN1 + out1).encode()}))
            assert n_answer - 2 <= cached2 < n2, (cached2, n_answer, n2)
        if mode != "fast":
            assert (out1, turn2, out2) == (fresh["out1"], fresh["turn2"], fresh["out2"])
        assert out2.strip()
        # The same prompt again (a retried request) keeps at least as much, and gives the same text.
        again, _, cached3 = _complete(engine, turn2)
        assert cached3 >= cached2 and (mode == "fast" or again == out2), (cached3, cached2, again, out2)
    finally:
        engine.close()


def test_fast_batches_share_a_running_sequences_prefix(model_path):
    """Fast batches: a request whose prompt starts as a running request's does (the same system prompt) shares that
    sequence's cells (one KV cache: a cell of two sequences is one cell) instead of reading them again, while the
    running one goes on."""
    engine = _engine(model_path, "fast")
    try:
        stream = engine.stream("create_completion", {"prompt": HISTORY + "\nTell me a long story about the fox.",
                                                     "max_tokens": 200, "temperature": 0})
        got = [next(stream) for _ in range(3)]  # it is running: its prompt's cells are written
        out, n, cached = _complete(engine, HISTORY + "\nQuestion: who watched the sheep?\nAnswer:")
        n_history = len(engine.call("tokenize", {"text": HISTORY.encode()}))
        assert n_history - 2 <= cached < n, (cached, n_history, n)
        assert out.strip()
        got += list(stream)  # and the running one went on to its end
        assert len(got) > 10, len(got)
    finally:
        engine.close()


def test_exact_batches_copy_a_shared_prefix_and_keep_each_conversation(model_path, fresh):
    """Exact batches, two slots: a second conversation that shares the first one's document gets a copy of its KV
    stream (the prefix kept, the rest dropped) in the free slot instead of taking the first one's slot; the first
    conversation's next turn then finds its own cells whole. Both texts are the texts without the cache."""
    engine = _engine(model_path, "exact")
    other = HISTORY + "\nQuestion: what did the dog do every morning?\nAnswer:"
    try:
        out1, n1, _ = _complete(engine, TURN1)
        n_history = len(engine.call("tokenize", {"text": HISTORY.encode()}))
        b1, _, cached_b = _complete(engine, other)
        assert n_history - 64 <= cached_b <= n_history, (cached_b, n_history)
        out2, _, cached2 = _complete(engine, fresh["turn2"])
        assert n1 - 64 <= cached2 <= n1, (cached2, n1)  # its own slot, whole
        assert (out1, out2) == (fresh["out1"], fresh["out2"])
    finally:
        engine.close()
    alone = _engine(model_path, "serial", prompt_cache=False)
    try:
        assert _complete(alone, other)[0] == b1
    finally:
        alone.close()


def test_without_the_cache_every_request_reads_its_whole_prompt(model_path, fresh):
    engine = _engine(model_path, "exact", prompt_cache=False)
    try:
        _complete(engine, TURN1)
        out2, _, cached2 = _complete(engine, fresh["turn2"])
        assert cached2 == 0 and out2 == fresh["out2"]
    finally:
        engine.close()


def test_how_many_cells_a_prompt_keeps():
    """No model: :meth:`PromptCache.reusable`, the cells of a slot's cache a new prompt keeps."""
    def keeps(prompt_len: int, common: int, *, unified: bool = False, min_chunk: int = 32, chunk: int = 512) -> int:
        cache = PromptCache(None, None, enabled=True, unified=unified, min_chunk=min_chunk, prefill_chunk=chunk,
                            n_batch=512, n_ubatch=512, n_swa=0)
        prompt = list(range(prompt_len))
        cached = prompt[:common] + [-1] * 50  # then they differ
        return cache.reusable(prompt, cached)

    assert keeps(700, 600, unified=True) == 600  # fast batches: the whole common prefix
    assert keeps(700, 700, unified=True) == 699  # never the last token: its logits are needed
    assert keeps(700, 600) == 600  # exact: the rest (100 tokens) is read in passes of at least min_chunk
    assert keeps(700, 690) == 668  # ... so 32 are read again, not 10
    assert keeps(530, 520) == 512  # a solo request reads 512 + 18: the pass of 18 is read as it is, alone
    assert keeps(530, 500) == 480  # 12 between the cache and that pass would be a short pass: 32 instead
    assert keeps(530, 10) == 10  # (a slot is chosen for its cache from REUSE_MIN tokens on)
    assert keeps(700, 600, min_chunk=0) == 512  # prompts read in whole passes of 512: whole passes kept
    assert keeps(700, 400, min_chunk=0) == 0


def test_on_the_mesh_the_next_turn_keeps_the_cells_on_the_machines(mesh, fresh):
    """Through the mesh (the cells live on the machines' rpc-servers): one request at a time, the second turn keeps
    the cells of the first turn's prompt, its text is the text without the cache, and the session reports what the
    cache gave."""
    with mesh.load("gemma-3-270m", n_ctx=2048, machines=["machine-1", "machine-2"]) as llm:
        first = llm.create_completion(TURN1, **ARGS)
        assert first["choices"][0]["text"] == fresh["out1"]
        before = wait_for(lambda: llm.engine_stats.get("prompt_tokens"), timeout=30, what="the engine's report")
        assert llm.create_completion(fresh["turn2"], **ARGS)["choices"][0]["text"] == fresh["out2"]
        stats = wait_for(lambda: (s := llm.engine_stats).get("prompt_tokens", 0) > before and s, timeout=30,
                         what="the engine's report of the second turn")
        n1 = first["usage"]["prompt_tokens"]
        assert n1 - 64 <= stats["cached_tokens"] <= n1, (stats, n1)
        assert llm.load_stats["cached_tokens"] == stats["cached_tokens"]
