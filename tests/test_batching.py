# SPDX-License-Identifier: AGPL-3.0-or-later
"""Continuous batching on the real loopback mesh: many requests share one engine, each gets the text it gets alone.

The oracle: a batched greedy request yields the text the same request yields alone (and ``parallel=1`` yields plain
local llama-cpp-python's text: ``test_mesh.py``). Each sequence has its own KV stream and its prompt is evaluated
apart from the other sequences' tokens, so on the CPU kernels the batch changes no sequence's arithmetic.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import threading
import time

import httpx
import pytest

from sharedllm.engine import Engine, EngineSpec
from sharedllm.engine.batch import MIN_PREFILL
from sharedllm.errors import ModelBusy, ModelClosed
from sharedllm.openai_server import ServerThread, create_app
from tests.helpers import BATCH_N_CTX, TWO, at_once, idle_stats, machine, text_of, wait_for

pytestmark = pytest.mark.mesh

# Different prompts of different lengths, with different max_tokens: the sequences join and leave at different steps.
PROMPTS = [
    ("Once upon a time", 40),
    ("The capital of France is", 24),
    ("def fibonacci(n):", 48),
    ("List three colours of the rainbow, then explain why the sky is blue in one sentence:", 32),
    ("In 1969, humans", 16),
    ("The best way to learn a new language is", 44),
    ("Water boils at", 20),
    ("Here is a short poem about the sea:\n", 36),
]


def _solo(llm) -> dict[str, str]:
    """Each request alone on the handle, one after the other."""
    return {p: text_of(llm.create_completion(p, max_tokens=n, temperature=0)) for p, n in PROMPTS}


@pytest.fixture(scope="module")
def batched(mesh):
    with mesh.load("gemma-3-270m", n_ctx=BATCH_N_CTX, machines=TWO, parallel=8) as llm:
        assert llm.measured()["max_batch"] >= 1  # steps as wide as measured (a first load measures while idle)
        yield llm


@pytest.fixture(scope="module")
def solo(batched):
    return _solo(batched)


def test_eight_concurrent_greedy_requests_each_equal_their_solo_text(batched, solo, model_path):
    # The solo texts through the batch engine are plain llama-cpp-python's.
    from sharedllm.engine import build_llama

    local = build_llama(str(model_path), n_ctx=BATCH_N_CTX, n_threads=2, use_extra_bufts=False)
    try:
        for p, n in PROMPTS[:3]:
            local.reset()
            assert solo[p] == text_of(local.create_completion(p, max_tokens=n, temperature=0))
    finally:
        local.close()

    # Threads, joining one after the other: each starts once the previous one has its first chunk.
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    started = [threading.Event() for _ in PROMPTS]

    def run(i: int, prompt: str, n: int) -> None:
        try:
            text = ""
            for chunk in batched.create_completion(prompt, max_tokens=n, temperature=0, stream=True):
                started[i].set()
                text += chunk["choices"][0]["text"]
            results[prompt] = text
        except BaseException as exc:
            errors.append(exc)
        finally:
            started[i].set()

    threads = []
    for i, (p, n) in enumerate(PROMPTS):
        threads.append(threading.Thread(target=run, args=(i, p, n)))
        threads[-1].start()
        assert started[i].wait(120)
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results == solo
    assert batched.load_stats["batch"] > 1.5, batched.load_stats  # they really were decoded together

    # asyncio tasks, all at once, non-streamed and streamed.
    async def run_all() -> dict[str, str]:
        async def one(i: int, p: str, n: int) -> tuple[str, str]:
            if i % 2:
                return p, text_of(await batched.acreate_completion(p, max_tokens=n, temperature=0))
            stream = await batched.acreate_completion(p, max_tokens=n, temperature=0, stream=True)
            return p, "".join([c["choices"][0]["text"] async for c in stream])

        return dict(await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(PROMPTS))))

    assert asyncio.run(run_all()) == solo


def test_a_cancelled_request_frees_its_sequence_at_once(batched):
    # Every sequence taken by a long stream; one of them is cancelled; a short request must get its sequence then,
    # not after the others end.
    order: list[str] = []
    stop = threading.Event()
    going = threading.Barrier(len(PROMPTS) + 1, timeout=120)

    def long_stream(i: int, prompt: str) -> None:
        stream = batched.create_completion(prompt, max_tokens=300, temperature=0, stream=True)
        try:
            next(stream)
            going.wait()
            if i == 0:
                return  # this caller leaves: closing its stream cancels its sequence
            for _ in stream:
                if stop.is_set():
                    break
            order.append(f"long-{i}")
        finally:
            stream.close()

    threads = [threading.Thread(target=long_stream, args=(i, p)) for i, (p, _) in enumerate(PROMPTS)]
    for t in threads:
        t.start()
    going.wait()
    out = batched.create_completion("Water boils at", max_tokens=8, temperature=0)
    order.append("short")
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert out["usage"]["completion_tokens"] == 8
    assert order[0] == "short", order  # it did not wait for a long stream to end


def test_sequences_that_left_in_any_order_leave_the_next_batch_one_pass_a_step(batched, solo):
    # llama.cpp evaluates several KV streams in one pass only when their sequence ids are consecutive, in increasing
    # order; a batch of slots in any other order is split into one pass per run of them (each a round trip to every
    # machine and a read of all the weights). Round 1: 8 sequences of different lengths, which leave in an order
    # unlike the one they came in; round 2: 8 at once, as long as each other, must take no more passes a step than
    # the kernels' limit asks (max_batch), whatever round 1 left behind (and one per prompt: exact batches read
    # each prompt alone).
    assert at_once(batched, PROMPTS) == solo
    before = idle_stats(batched)
    texts = at_once(batched, [(p, 16) for p, _ in PROMPTS])
    after = idle_stats(batched, before["steps"])
    assert all(solo[p].startswith(texts[p]) and texts[p] for p, _ in PROMPTS), texts
    steps, passes = after["steps"] - before["steps"], after["passes"] - before["passes"]
    assert 15 <= steps <= 24, (steps, passes)  # the 8 sequences were decoded together, not one after another
    assert passes <= len(PROMPTS) + steps * -(-len(PROMPTS) // batched.max_batch), (steps, passes, batched.max_batch)


def test_the_server_batches_and_answers_queue_full_and_context_overflow(batched, solo):
    app = create_app(batched, model_id="gemma", max_queue=0, queue_timeout=60)
    assert app.state.queue.concurrency == 8
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=120) as h:
        streams = [h.stream("POST", "/v1/completions", json={"model": "gemma", "prompt": p, "max_tokens": 200,
                                                               "temperature": 0, "stream": True})
                   for p, _ in PROMPTS]
        opened = [st.__enter__() for st in streams]
        try:
            assert all(r.status_code == 200 for r in opened)
            assert app.state.queue.running == 8
            busy = h.post("/v1/completions", json={"model": "gemma", "prompt": "Hi", "max_tokens": 4})
            assert busy.status_code == 429
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
        finally:
            for st in streams:
                st.__exit__(None, None, None)
        wait_for(lambda: app.state.queue.running == 0, timeout=60, what="the streams' sequences to be freed")
        long = h.post("/v1/completions", json={"model": "gemma", "prompt": "word " * (BATCH_N_CTX + 10),
                                               "max_tokens": 4})
        assert long.status_code == 400
        assert long.json()["error"]["code"] == "context_length_exceeded"
        p, n = PROMPTS[1]
        ok = h.post("/v1/completions", json={"model": "gemma", "prompt": p, "max_tokens": n, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == solo[p]


def test_the_engine_samples_each_sequence_with_its_own_chain(model_path):
    """Without a mesh: seeds, logit bias and the waiting line of the batch engine itself."""
    engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 4096}, parallel=2, max_waiting=1))
    engine.start()
    try:
        def sample(seed: int) -> str:
            return text_of(engine.call("create_completion", {"prompt": "Once upon a time", "max_tokens": 12,
                                                           "temperature": 0.9, "seed": seed}))

        assert sample(7) == sample(7) != sample(8)  # a seed of its own, not the shared Llama's
        # logit_bias runs in llama.cpp's chain: a +100 bias on one token makes it the only choice.
        [the] = engine.call("tokenize", {"text": b" the", "add_bos": False})
        out = engine.call("create_completion", {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
                                                "logit_bias": {str(the): 100.0}})
        assert text_of(out) == " the" * 4
        # A grammar (here from response_format) is a link of the sequence's chain too.
        schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                                   "size": {"enum": ["small", "large"]}},
                  "required": ["colour", "size"]}
        chat = engine.call("create_chat_completion", {
            "messages": [{"role": "user", "content": "Describe a ball as JSON."}], "max_tokens": 64,
            "temperature": 0, "response_format": {"type": "json_object", "schema": schema}})
        answer = json.loads(chat["choices"][0]["message"]["content"])
        assert answer["colour"] in ("red", "green", "blue") and answer["size"] in ("small", "large"), answer
        # Two sequences run, one waits: a fourth request finds the line full.
        # (4000 tokens each: they run far longer than this test needs them to.)
        held = [engine.stream("create_completion", {"prompt": "Once upon a time", "max_tokens": 4000,
                                                    "temperature": 0}) for _ in range(3)]
        for h in held[:2]:
            next(h)
        def drain(stream) -> None:
            with contextlib.suppress(ModelClosed):  # the engine closes under it at the end of the test
                collections.deque(stream, maxlen=0)

        waiting = threading.Thread(target=drain, args=(held[2],), daemon=True)
        waiting.start()
        wait_for(lambda: (engine.stats.get("running"), engine.stats.get("waiting")) == (2, 1), timeout=60,
                 what="two requests running and one waiting for a sequence")
        with pytest.raises(ModelBusy, match="larger parallel"):
            engine.call("create_completion", {"prompt": "Hi", "max_tokens": 2})
        for h in held[:2]:
            h.close()  # cancelled: the engine frees their sequences, and the waiting request runs
        wait_for(lambda: (engine.stats.get("running"), engine.stats.get("waiting")) == (1, 0), timeout=60,
                 what="the waiting request to take a freed sequence")
    finally:
        engine.close()


def test_a_sequence_is_not_decoded_past_its_max_tokens(model_path):
    """Without a mesh: a request of max_tokens=n costs n steps (its prompt's, then n - 1 decodes), streamed or not,
    completion or chat: the engine does not decode ahead of a consumer that will take no more (work thrown away, in a
    step a newcomer would wait for)."""
    engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 1024}, parallel=2))
    engine.start()
    try:
        def steps_of(run) -> tuple[str, int]:
            before = engine.poll_stats().get("steps", 0)  # idle: each run waits for the report of its last step
            text = run()
            after = wait_for(lambda: (s := engine.poll_stats()).get("running") == 0 and s.get("steps", 0) > before
                             and s, timeout=60, what="the engine's report of the request's last step")
            return text, after["steps"] - before

        args = {"prompt": "Once upon a time", "temperature": 0}
        for n in (1, 6, 17):
            called, steps = steps_of(lambda n=n: text_of(engine.call("create_completion", {**args, "max_tokens": n})))
            assert steps == n, (n, steps)
            streamed, steps = steps_of(lambda n=n: "".join(
                c["choices"][0]["text"] for c, _ in engine.stream("create_completion", {**args, "max_tokens": n})))
            assert (streamed, steps) == (called, n)
        chat, steps = steps_of(lambda: engine.call("create_chat_completion", {
            "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5, "temperature": 0}))
        assert steps == chat["usage"]["completion_tokens"] == 5, chat
    finally:
        engine.close()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_a_long_prompt_does_not_freeze_the_running_streams(model_path, exact):
    """Without a mesh: while a stream runs, a long prompt is read a bounded chunk a step (``max_stall_ms``, here so
    small that each step reads about MIN_PREFILL tokens), so the running stream keeps getting tokens meanwhile;
    without the bound, n_batch tokens a step and the stream waits for them. Exact batches cut the prompt only where
    that leaves its arithmetic as it is (``invariant_chunks``): its text is the text it gets alone."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60  # more than n_batch (512) tokens
    runner = "Once upon a time, in a small village at the edge of a great forest, there lived"  # >= StepCost.SAMPLE
    args = {"prompt": long_prompt, "max_tokens": 8, "temperature": 0}

    def run(max_stall_ms: float) -> tuple[int, int, str, str]:
        # The long prompt is sent twice (alone, then beside the stream): no prompt cache, or the second read is short.
        engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 4096}, parallel=2, exact_batches=exact,
                                   max_stall_ms=max_stall_ms, prompt_cache=False))
        engine.start()
        if exact:  # prompt chunks once the engine measured that they keep the arithmetic (while idle, at first)
            engine.measured(120)
        stamps: list[float] = []
        try:
            alone = text_of(engine.call("create_completion", args))  # nothing else running: n_batch a step
            n_prompt = len(engine.call("tokenize", {"text": long_prompt.encode()}))
            stream = engine.stream("create_completion", {"prompt": runner, "max_tokens": 1000, "temperature": 0})

            def read() -> None:
                with contextlib.suppress(ModelClosed):  # the engine closes under it at the end
                    stamps.extend(time.monotonic() for _ in stream)

            threading.Thread(target=read, daemon=True).start()
            wait_for(lambda: len(stamps) >= 3, timeout=60, what="the running stream's first tokens")
            start, first, text = time.monotonic(), None, ""
            for chunk, _ in engine.stream("create_completion", args):
                first = first or time.monotonic()
                text += chunk["choices"][0]["text"]
            return sum(start < t < first for t in list(stamps)), n_prompt, alone, text
        finally:
            engine.close()

    bounded, n_prompt, alone, batched = run(1.0)
    assert n_prompt > 8 * MIN_PREFILL, n_prompt
    # About n_prompt / MIN_PREFILL steps read the prompt, each with the running stream's next token.
    assert bounded >= n_prompt // MIN_PREFILL // 2, (bounded, n_prompt)
    if exact:
        assert batched == alone and alone, (batched, alone)
    unbounded, *_ = run(0.0)
    assert unbounded <= 5, unbounded  # 2 steps of n_batch


def test_exact_prompt_chunks_keep_the_passes_of_a_solo_request_where_it_matters():
    """No model: how exact batches cut a prompt (``exact_chunk``): every pass at least ``min_chunk`` tokens, none
    leaving fewer behind, and a solo request's own last pass kept as it is when it is shorter."""
    from sharedllm.engine.invariance import exact_chunk, solo_last_pass

    assert [solo_last_pass(n, 512, 512) for n in (1, 7, 512, 515, 600, 1024)] == [1, 7, 512, 3, 88, 512]
    assert solo_last_pass(600, 512, 256) == 88 and solo_last_pass(300, 512, 256) == 44

    def cuts(total: int, budget: int, cap: int = 512, min_chunk: int = 32) -> list[int]:
        out, done = [], 0
        final = solo_last_pass(total, 512, cap)
        while done < total:
            out.append(exact_chunk(total - done, final, budget, cap, min_chunk))
            done += out[-1]
        assert done == total
        return out

    assert cuts(20, 32) == [20]  # shorter than a chunk: one pass, as alone
    assert cuts(40, 32) == [40]  # 32 would leave 8
    assert cuts(64, 32) == [32, 32]
    assert cuts(600, 100) == [100] * 5 + [100]  # solo: 512 + 88, both long passes
    assert cuts(610, 100) == [100] * 5 + [110]  # 100 would leave 10
    assert cuts(515, 100) == [100] * 4 + [112, 3]  # solo's last pass of 3 is kept, alone and last
    assert cuts(515, 512) == [512, 3]
    assert cuts(1000, 10) == [32] * 30 + [40]  # at least min_chunk, whatever the budget
    assert cuts(2000, 2000) == [512, 512, 512, 464]  # at most one ubatch


def test_kill_an_rpc_server_with_four_sequences_in_flight(mesh, batched, solo):
    # Last in the module: the handle goes on without machine-2 afterwards.
    four = PROMPTS[:4]
    llm = batched
    victim = machine(mesh, "machine-2")["rpc"]
    results: dict[str, str] = {}
    errors: list[BaseException] = []
    going = threading.Barrier(len(four) + 1, timeout=120)

    def run(prompt: str, n: int) -> None:
        try:
            text, chunks = "", 0
            for chunk in llm.create_completion(prompt, max_tokens=n, temperature=0, stream=True):
                text += chunk["choices"][0]["text"]
                chunks += 1
                if chunks == 4:
                    going.wait()  # every sequence has delivered text before the machine dies
            results[prompt] = text
        except BaseException as exc:
            errors.append(exc)
            going.abort()

    threads = [threading.Thread(target=run, args=pn) for pn in four]
    for t in threads:
        t.start()
    going.wait()
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert results == {p: solo[p] for p, _ in four}  # no duplicated, no missing text in any of them
    assert [r["lost"] for r in llm.recoveries] == ["machine-2"]  # one recovery for the four
    wait_for(lambda: (m := machine(mesh, "machine-2")) and m["rpc"]["state"] == "ready"
             and m["rpc"]["pid"] != victim["pid"], timeout=90, what="machine-2's rpc-server to be back")


def test_the_queue_serves_waiting_clients_in_turn():
    """One client's burst does not keep another client waiting behind all of it (RequestQueue, no model)."""
    from sharedllm.openai_server import RequestQueue

    async def scenario() -> list[str]:
        q = RequestQueue(max_queue=16, timeout=60, concurrency=2)
        held = [await q.acquire("alice"), await q.acquire("alice")]  # both sequences taken
        order: list[str] = []

        async def request(client: str, i: int) -> None:
            slot = await q.acquire(client)
            order.append(f"{client}{i}")
            await asyncio.sleep(0)  # let the next one queue behind the release below
            slot.release()

        tasks = [asyncio.create_task(request("alice", i)) for i in range(4)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(request("bob", i)) for i in range(2)]
        await asyncio.sleep(0)
        assert q.waiting == 6
        for slot in held:
            slot.release()
        await asyncio.gather(*tasks)
        return order

    order = asyncio.run(scenario())
    # alice came first with four, bob after with two: they alternate while both wait.
    assert order[:4] == ["alice0", "bob0", "alice1", "bob1"], order
    assert sorted(order) == ["alice0", "alice1", "alice2", "alice3", "bob0", "bob1"]


def test_a_decode_step_is_one_pass_per_run_of_consecutive_slots():
    """No model: how a step's sequences (in slot order) are cut into llama_decode passes."""
    from types import SimpleNamespace

    from sharedllm.engine.sequence import passes

    def cut(slots: list[int], size: int) -> list[list[int]]:
        return [[s.slot for s in group] for group in passes([SimpleNamespace(slot=s) for s in slots], size)]

    assert cut(list(range(16)), 16) == [list(range(16))]
    assert cut(list(range(16)), 7) == [list(range(6)), list(range(6, 12)), list(range(12, 16))]
    assert cut([0, 1, 3, 4, 5, 9], 16) == [[0, 1], [3, 4, 5], [9]]  # a free slot between two runs: two passes
    assert cut([0, 1, 2, 3, 5, 6], 3) == [[0, 1], [2, 3], [5, 6]]
    assert cut([], 4) == []


def test_prompts_are_read_fewest_tokens_left_first_and_none_waits_for_ever():
    """No model: the order in which waiting prompts are read (shortest remaining first, a patient one first)."""
    from sharedllm.engine.sequence import PATIENCE_S, Sequence, prefill_order

    def seq(length: int, read: int = 0, waited: float = 0.0) -> Sequence:
        s = Sequence(list(range(length)), sampler=None, stopped=lambda: False)
        s.n_past, s.submitted = read, 1000.0 - waited
        return s

    def order(seqs: list[Sequence]) -> list[int]:
        return [seqs.index(s) for s in prefill_order(seqs, now=1000.0)]

    # A burst: the short prompts first; equal ones in the order they came.
    assert order([seq(50), seq(5), seq(20), seq(5)]) == [1, 3, 2, 0]
    # What is left counts: a long prompt almost read goes before a shorter new one.
    assert order([seq(12), seq(500, read=495)]) == [1, 0]
    # A prompt that let others go first for PATIENCE_S goes first, before shorter ones; the oldest of those first.
    assert order([seq(3), seq(400, waited=PATIENCE_S), seq(900, waited=PATIENCE_S + 1)]) == [2, 1, 0]


def test_the_prefill_budget_keeps_a_step_within_max_stall_ms():
    """No model: what a step is measured to cost, and the prompt tokens it may read while sequences decode."""
    from types import SimpleNamespace

    from sharedllm.engine.batch import MIN_PREFILL, STALL_STEPS, BatchScheduler
    from sharedllm.engine.cost import StepCost

    cost = StepCost()
    cost.observe(100.0, 50, 0)  # a burst's prompts, nothing decoding: 2 ms a prompt token
    assert (cost.token_ms, cost.decode_ms) == (2.0, None)
    cost.observe(40.0, 0, 4)  # a step that only decodes
    assert cost.decode_ms == 40.0
    cost.observe(40.0 + 3.0 * 20, 20, 4)  # decodes and reads 20 prompt tokens at 3 ms each
    assert cost.token_ms == pytest.approx(2.0 + StepCost.ALPHA * (3.0 - 2.0))
    cost.observe(500.0, StepCost.SAMPLE - 1, 4)  # too few prompt tokens to tell the cost of one
    assert cost.token_ms == pytest.approx(2.3)
    cost.observe(40.0 + 2.3 * 50, 50, 0)  # prompts only: the step's own cost (the decode step's) is not theirs
    assert cost.token_ms == pytest.approx(2.3)

    def budget(decoding: int, max_stall_ms: float, cost: StepCost = cost, reading: int = 1) -> int:
        return BatchScheduler._prefill_budget(SimpleNamespace(max_stall_ms=max_stall_ms, prefill_chunk=512,
                                                              cost=cost), decoding, reading)

    assert budget(4, 500.0) == int((500.0 - 40.0) / 2.3)
    assert budget(0, 500.0) == 512  # nothing decoding: no stream to hold up
    assert budget(4, 500.0, reading=4) == int((500.0 - 40.0) / 2.3)  # as many decoding as reading
    assert budget(4, 500.0, reading=5) == 512  # a burst: more newcomers than running streams, the prompts go first
    assert budget(4, 50.0) == MIN_PREFILL  # a prompt always progresses
    assert budget(4, 1e6) == budget(4, 0.0) == 512  # at most prefill_chunk; 0: no bound
    assert budget(4, 500.0, StepCost()) == 512  # not measured yet
    slow = StepCost()
    slow.observe(400.0, 0, 4)  # behind a link: a decode step alone takes 400 ms
    slow.observe(400.0 + 5.0 * 40, 40, 4)
    assert budget(4, 500.0, slow) == int((STALL_STEPS * 400.0 - 400.0) / 5.0)  # two decode steps' time, not 100 ms
    free = StepCost()
    free.observe(50.0, 0, 4)
    free.observe(20.0, 100, 4)  # a step with prompt tokens faster than the last decode-only step (noise)
    assert free.token_ms == 0.0 and budget(4, 500.0, free) == 512
