# SPDX-License-Identifier: AGPL-3.0-or-later
"""The batch engine's sequences (:mod:`.batch`): one request's prompt, sampler, slot and tokens, the order in which
prompts are read, and how a decode step's sequences are cut into ``llama_decode`` passes."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

from sharedllm.engine.drafting import DraftLength

PATIENCE_S = 2.0  # a prompt lets shorter ones go first for at most this long, then goes first itself


class Sequence:
    """One request's sequence: its prompt, sampler, slot and the tokens not yet taken by its consumer."""

    def __init__(self, prompt: list[int], sampler: Any, stopped: Callable[[], bool], limit: int | None = None):
        self.prompt = prompt
        self.limit = limit  # the tokens its consumer will take at most (max_tokens); None: until the context ends
        self.sampled = 0
        self.sampler = sampler
        self.stopped = stopped  # the parent cancelled the request (or the engine closes)
        self.slot = -1
        self.n_past = 0  # tokens in the sequence's KV cells
        self.next_input: int | None = None  # the last sampled token, to evaluate at the next step
        self.pending: collections.deque[int] = collections.deque()
        self.ended = False  # no more tokens will come (end of generation, context full, cancelled, error)
        self.left = False  # the consumer stopped taking tokens
        self.wanting = False  # the consumer waits for a token none of which is pending
        self.error: str | None = None
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.outputs: list[int] = []  # every token sampled: the cells past the prompt hold them, in order
        self.cached = 0  # prompt tokens whose cells it found in its slot (the prompt cache)
        self.reusable = 0  # its leading cells a later prompt may reuse (exact mode: written as a solo request would)
        self.on_admit: Callable[[int], None] | None = None
        # (k, records): append each sampled token's log-probability and the top k's (sharedllm.engine.logprobs)
        self.logprobs: tuple[int, list] | None = None
        # Speculative decoding (sharedllm.engine.speculative): this step's drafts, what the drafter offered, the
        # lookup drafter's n-gram index, the running acceptance; the drafts verified and accepted so far.
        self.draft: list[int] = []
        self.draft_offer: list[int] = []
        self.draft_max: int | None = None  # the request's own bound on its drafts a step (None: the load's)
        self.draft_index: Any = None
        self.draft_length = DraftLength()
        self.drafted = self.accepted = 0

    def history(self) -> list[int]:
        """Its context: the prompt and every token sampled (the last one not evaluated yet)."""
        return self.prompt + self.outputs

    @property
    def prefilled(self) -> bool:
        return self.n_past >= len(self.prompt)

    def wants_more(self) -> bool:
        """Whether its next token may be decoded: before its limit, or when the consumer asks for more (a consumer may
        take more than ``max_tokens``: llama-cpp-python does not count a token that ends in an incomplete UTF-8
        character). Decoding past the limit ahead of the consumer would be work thrown away, in a step a newcomer
        waits for."""
        return self.limit is None or self.sampled < self.limit or (self.wanting and not self.pending)


def decode_rows(seq: Sequence, tokens: list[tuple[int, int, Sequence]]) -> list[int]:
    """Append ``seq``'s decode rows to ``tokens`` (its next input, then its drafts, at the positions that follow);
    their indexes."""
    start = len(tokens)
    tokens += [(tok, seq.n_past + i, seq) for i, tok in enumerate([seq.next_input, *seq.draft])]
    return list(range(start, len(tokens)))


def prefill_order(seqs: list[Sequence], now: float) -> list[Sequence]:
    """The order in which sequences read their prompts: the fewest prompt tokens left first (shortest remaining
    processing time: in a burst of requests the short prompts get their first token after their own prompt, not
    after every prompt of the burst, which minimises the mean time to first token), except that a sequence waiting
    ``PATIENCE_S`` or more goes before, oldest first (no prompt waits for ever behind a stream of shorter ones).
    Ties: first admitted first."""
    def key(seq: Sequence) -> tuple[int, float]:
        if now - seq.submitted >= PATIENCE_S:
            return 0, seq.submitted
        return 1, len(seq.prompt) - seq.n_past

    return sorted(seqs, key=key)


def passes(seqs: list[Sequence], size: int) -> list[list[Sequence]]:
    """The ``llama_decode`` passes of a decode step of ``seqs`` (in slot order): each run of consecutive slots
    (llama.cpp evaluates the KV streams of one pass only when they are consecutive), in as few groups of at most
    ``size`` as possible, of sizes as equal as possible."""
    out: list[list[Sequence]] = []
    start = 0
    for i in range(1, len(seqs) + 1):
        if i == len(seqs) or seqs[i].slot != seqs[i - 1].slot + 1:
            run = seqs[start:i]
            n = -(-len(run) // size)
            step = -(-len(run) // n)
            out += [run[j:j + step] for j in range(0, len(run), step)]
            start = i
    return out
