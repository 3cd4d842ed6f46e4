# SPDX-License-Identifier: AGPL-3.0-or-later
"""Fast batches (``exact_batches=False``) on the real loopback mesh: llama-server's way, one KV cache shared by the
sequences, so a step of the batch is one pass over the mesh whatever it holds. A module of its own: a machine takes
one session at a time, and ``test_batching``'s handle holds both for its module."""

from __future__ import annotations

import pytest

from tests.helpers import BATCH_N_CTX, TWO, at_once, idle_stats, text_of

pytestmark = pytest.mark.mesh

# Counting, from prompts of different lengths: a continuation so certain that another batch's rounding cannot change
# it (fast batches do not promise a request's solo text).
COUNTING = [(f"{lead}{', '.join(str(a + i) for i in range(k))},", 20) for lead, a, k in (
    ("", 1, 4), ("Numbers: ", 10, 3), ("Let us count: ", 20, 5), ("", 31, 6), ("Count on: ", 45, 3),
    ("Keep counting. ", 52, 4), ("", 63, 3), ("The page numbers are ", 70, 5))]


@pytest.fixture(scope="module")
def fast(mesh):
    with mesh.load("gemma-3-270m", n_ctx=BATCH_N_CTX, machines=TWO, parallel=8, exact_batches=False) as llm:
        yield llm


def test_fast_batches_read_new_prompts_in_the_running_streams_pass(fast):
    # exact_batches=False: one KV cache shared by the sequences (llama-server's way), so a step is one pass whatever
    # it holds: the running sequences' next tokens and the new prompts (exact batches: one pass per prompt more).
    alone = {p: text_of(fast.create_completion(p, max_tokens=n, temperature=0)) for p, n in COUNTING}
    assert all(alone.values()), alone
    before = idle_stats(fast)
    texts = at_once(fast, COUNTING)
    after = idle_stats(fast, before["steps"])
    assert texts == alone
    steps, passes = after["steps"] - before["steps"], after["passes"] - before["passes"]
    assert steps <= 2 * max(n for _, n in COUNTING), (steps, passes)  # decoded together
    assert passes == steps, (steps, passes)

