# SPDX-License-Identifier: AGPL-3.0-or-later
"""Fast batches (``exact_batches=False``) on the real loopback mesh: llama-server's way, one KV cache shared by the
sequences, so a step of the batch is one pass over the mesh whatever it holds. A module of its own: a machine takes
one session at a time, and ``test_batching``'s handle holds both for its module."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from sharedllm.engine import Engine, EngineSpec
from sharedllm.engine.batch import MIN_PREFILL
from sharedllm.errors import ModelClosed
from tests.conftest import wait_for
from tests.test_batching import N_CTX, TWO, _at_once, _idle, _text

pytestmark = pytest.mark.mesh

# Counting, from prompts of different lengths: a continuation so certain that another batch's rounding cannot change
# it (fast batches do not promise a request's solo text).
COUNTING = [(f"{lead}{', '.join(str(a + i) for i in range(k))},", 20) for lead, a, k in (
    ("", 1, 4), ("Numbers: ", 10, 3), ("Let us count: ", 20, 5), ("", 31, 6), ("Count on: ", 45, 3),
    ("Keep counting. ", 52, 4), ("", 63, 3), ("The page numbers are ", 70, 5))]


@pytest.fixture(scope="module")
def fast(mesh):
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, parallel=8, exact_batches=False) as llm:
        yield llm


def test_fast_batches_read_new_prompts_in_the_running_streams_pass(fast):
    # exact_batches=False: one KV cache shared by the sequences (llama-server's way), so a step is one pass whatever
    # it holds: the running sequences' next tokens and the new prompts (exact batches: one pass per prompt more).
    alone = {p: _text(fast.create_completion(p, max_tokens=n, temperature=0)) for p, n in COUNTING}
    assert all(alone.values()), alone
    before = _idle(fast)
    texts = _at_once(fast, COUNTING)
    after = _idle(fast, before["steps"])
    assert texts == alone
    steps, passes = after["steps"] - before["steps"], after["passes"] - before["passes"]
    assert steps <= 2 * max(n for _, n in COUNTING), (steps, passes)  # decoded together
    assert passes == steps, (steps, passes)


def test_a_long_prompt_does_not_freeze_the_running_streams(model_path):
    """Without a mesh: while a stream runs, a long prompt is read a bounded chunk a step (``max_stall_ms``, here so
    small that each step reads MIN_PREFILL tokens), so the running stream keeps getting tokens meanwhile; without the
    bound, the whole prompt is one step and the stream waits for all of it."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60  # more than n_batch (512) tokens
    runner = "Once upon a time, in a small village at the edge of a great forest, there lived"  # >= StepCost.SAMPLE

    def tokens_meanwhile(max_stall_ms: float) -> tuple[int, int]:
        engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 4096}, parallel=2, exact_batches=False,
                                   max_stall_ms=max_stall_ms))
        engine.start()
        stamps: list[float] = []
        try:
            stream = engine.stream("create_completion", {"prompt": runner, "max_tokens": 1000, "temperature": 0})
            def read() -> None:
                with contextlib.suppress(ModelClosed):  # the engine closes under it at the end
                    stamps.extend(time.monotonic() for _ in stream)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            wait_for(lambda: len(stamps) >= 3, timeout=60, what="the running stream's first tokens")
            n_prompt = len(engine.call("tokenize", {"text": long_prompt.encode()}))
            start = time.monotonic()
            engine.call("create_completion", {"prompt": long_prompt, "max_tokens": 1, "temperature": 0})
            end = time.monotonic()
            return sum(start < t < end for t in list(stamps)), n_prompt
        finally:
            engine.close()

    bounded, n_prompt = tokens_meanwhile(1.0)
    assert n_prompt > 8 * MIN_PREFILL, n_prompt
    # ceil(n_prompt / MIN_PREFILL) steps read the prompt, and each decodes the running stream's next token; without
    # the bound, n_batch tokens a step: 2 steps.
    assert bounded >= n_prompt // MIN_PREFILL // 2, (bounded, n_prompt)
    unbounded, _ = tokens_meanwhile(0.0)
    assert unbounded <= 5, unbounded
