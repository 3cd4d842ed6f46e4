# SPDX-License-Identifier: AGPL-3.0-or-later
"""Continuous batching in the engine child: up to ``parallel`` sequences share one llama.cpp context.

The model of llama.cpp's ``tools/server``: a fixed set of slots, one per sequence id, each with its own KV cache
stream (``n_seq_max = parallel``, ``kv_unified = false``: a sequence's cells start at 0 in its own stream, so its
attention sums exactly the terms it would sum alone). One thread, the scheduler, owns the context and loops:

1. it frees the slots of sequences that ended, were cancelled or whose caller left (``llama_memory_seq_rm``; a slot
   keeps the cells a later prompt may reuse, :mod:`.prompt_cache`), and gives free slots to waiting sequences, first
   come first served, the lowest free slot first unless another's cells give the prompt a prefix (fairness between
   clients is the server's job, at admission: see ``sharedllm.openai_server.RequestQueue``);
2. it decodes the next token of every running sequence in one ``llama_decode`` (one pass over the mesh for all of
   them: on a mesh every pass pays a round trip per machine, so a batch of B sequences pays it once for B), or in
   balanced groups of at most ``max_batch`` when more would change the kernels
   (:func:`.invariance.invariant_batch`). llama.cpp evaluates several KV streams in one pass only when their
   sequence ids are consecutive, in increasing order (``llama_batch_allocr::split_equal``, sequential: a batch of
   slots 7, 6, ..., 0, 8, ..., 15 is 9 passes, every one a round trip to every machine and a read of all the
   weights). So the slots are kept compact (lowest free slot first), a step's batch is in slot order, and each pass
   is one run of consecutive slots (:func:`passes`); a sequence held back by ``LOOKAHEAD`` between two that are
   decoded is decoded anyway (up to ``LOOKAHEAD_MAX``), since leaving it out would cost a pass;
3. before that, it evaluates the prompts of sequences still reading theirs, the fewest tokens left first
   (:func:`prefill_order`), at most ``prefill_chunk`` tokens in all per step, and while sequences are decoding no
   more than keep the step within ``max_stall_ms`` as measured (:class:`StepCost`; in the exact mode in chunks that
   keep a solo request's arithmetic, :mod:`.invariance`), each prompt chunk in its own ``llama_decode``: a long
   prompt takes several steps and never stalls the running streams for long. Evaluating a prompt alone (not mixed
   with other sequences' tokens) keeps its kernels those of a solo request;
4. it samples each new token with the sequence's own native sampler chain (:mod:`.sampling`) and hands it to the
   sequence's consumer.

With a drafter (:mod:`.speculative`), a decoded sequence's pass also holds the drafts its drafter proposed for it, as
many as :func:`~sharedllm.engine.drafting.allocate` finds worth their cost and the pass's rows allow
(``max_rows``: in the exact mode no more than keep each row's arithmetic that of single-token decoding); its rows are
sampled in order up to the first draft the target's token differs from, and the cells after it are removed.

That is the exact mode (``exact_batches``, the default). The fast mode (``unified=True``) is llama-server's: one KV
cache shared by all sequences (``kv_unified = true``), so any mix of sequences and prompt tokens is one pass, and each
step is one ``llama_decode`` of every running sequence's next token and, within ``prefill_chunk`` tokens (and the
context's ``n_batch``), chunks of the waiting prompts: a newcomer's prompt costs the running streams no pass of its
own, and several newcomers' prompts share one. A sequence's attention then spans cells of the others (masked) and
its prompt is evaluated among other rows, so its text may differ from its solo text where the kernels' rounding does.

A consumer is the request's thread in llama-cpp-python's ``create_completion``, whose ``Llama.generate`` is
replaced by :meth:`BatchScheduler.generate`: stop strings, detokenisation, chat templates and the dict shapes stay
llama-cpp-python's own. A consumer more than ``LOOKAHEAD`` tokens behind is skipped by the decode step until it
catches up, and a sequence that reached its ``max_tokens`` is not decoded further unless its consumer asks.
"""

from __future__ import annotations

import collections
import heapq
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sharedllm.engine.cost import StepCost
from sharedllm.engine.drafting import Drafting
from sharedllm.engine.invariance import exact_chunk, solo_last_pass
from sharedllm.engine.logprobs import token_logprobs
from sharedllm.engine.prompt_cache import PromptCache
from sharedllm.engine.sampling import sampler_chain
from sharedllm.engine.sequence import Sequence, decode_rows, passes, prefill_order

logger = logging.getLogger(__name__)

LOOKAHEAD = 4  # tokens a sequence may run ahead of its consumer
LOOKAHEAD_MAX = 16  # ... when holding it back would split a decode step into one more pass
MIN_PREFILL = 32  # prompt tokens a step reads at least, whatever max_stall_ms asks (a prompt always progresses)
STALL_STEPS = 2.0  # ... and a step may take this many decode-only steps' time, when that is longer than max_stall_ms


class QueueFull(Exception):
    """Every slot is taken and ``max_waiting`` sequences already wait."""


class BatchScheduler:
    """The slots, the waiting line and the loop that decodes them (see the module's docstring)."""

    def __init__(self, llm: Any, parallel: int, n_ctx_seq: int, *, prefill_chunk: int = 0, max_waiting: int = 64,
                 max_batch: int = 0, unified: bool = False, max_stall_ms: float = 0.0, min_chunk: int = 0,
                 prompt_cache: bool = True, on_stats: Callable[[dict], None] | None = None, drafter: Any = None,
                 draft_max: int = 0, draft_min: int = 0, max_rows: int = 0,
                 on_measured: Callable[[dict], None] | None = None):
        import llama_cpp

        self.llm = llm
        self.parallel = parallel
        self.n_ctx_seq = n_ctx_seq
        self.prefill_chunk = prefill_chunk or llm.n_batch
        self.unified = unified
        self.max_stall_ms = max_stall_ms
        # Exact mode: prompts may be cut in chunks of at least this many tokens (invariant_chunks); 0: in the passes
        # of a solo request only.
        self.min_chunk = min_chunk
        self._n_ubatch = llm.context_params.n_ubatch
        self.cost = StepCost()
        self.max_waiting = max_waiting
        self.on_stats = on_stats
        self._lib = llama_cpp
        self._ctx = llm.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._vocab = llm._model.vocab
        self._n_vocab = llm.n_vocab()
        # Speculative decoding: the drafter (None: none) and its drafts (.drafting), and the rows a pass may hold in
        # the exact mode (sharedllm.engine.invariance.invariant_verify).
        self.drafter = drafter
        self.draft_max = draft_max if drafter is not None else 0
        self.drafting = None if drafter is None else Drafting(drafter, self.draft_max, draft_min, n_ctx_seq,
                                                              self._n_vocab)
        self.max_rows = max_rows or parallel * (1 + self.draft_max)
        self.seq_steps = self.step_tokens = 0  # sequences decoded by decode steps, and the tokens that gave
        self._batch = llama_cpp.llama_batch_init(parallel * (1 + self.draft_max) + self.prefill_chunk, 0, 1)
        # Sequences per llama_decode of a decode step; 0: all of them (see invariant_batch).
        self.max_batch = max_batch or parallel
        self._cond = threading.Condition()
        self._free = list(range(parallel))  # free slots (sequence ids), a heap: the lowest is taken first
        self.cache = PromptCache(llama_cpp, self._memory, enabled=prompt_cache, unified=unified, min_chunk=min_chunk,
                                 prefill_chunk=self.prefill_chunk, n_batch=llm.n_batch, n_ubatch=self._n_ubatch,
                                 n_swa=llama_cpp.llama_model_n_swa(llm._model.model))
        self._running: list[Sequence] = []
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._closed = False
        self.steps = 0  # steps of the loop that evaluated anything
        self.passes = 0  # their llama_decode passes (prompt chunks and decodes)
        self._recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=64)  # (sequences, passes)
        # The exact mode's measures still to take while idle (.measuring.Measuring), and who is told when they are.
        self.measuring: Any = None
        self.on_measured = on_measured
        self._stats_at = 0.0
        self._reported: tuple[int, int] | None = None  # (running, waiting) as last reported
        self._thread = threading.Thread(target=self._loop, name="batch-scheduler", daemon=True)
        self._thread.start()

    # --- the consumers' side ----------------------------------------------------------------------------------

    def generate(self, tokens: list[int], *, seed: int, logit_bias: dict | None, stopped: Callable[[], bool],
                 max_tokens: int | None = None, on_admit: Callable[[int], None] | None = None,
                 logprobs: tuple[int, list] | None = None, draft_max: int | None = None,
                 **sampling: Any) -> Iterator[int]:
        """``Llama.generate`` for one request: submit its sequence, yield its tokens as the scheduler samples them.
        ``max_tokens`` (> 0): the consumer takes no more (llama-cpp-python's ``max_tokens``), so the sequence is not
        decoded further ahead of it. ``on_admit``: called with the prompt tokens found in the cache when the
        sequence gets its slot. ``logprobs``: ``(k, records)``, a list to which each sampled token's record goes
        (:func:`sharedllm.engine.logprobs.token_logprobs`), in order. ``draft_max``: the most drafts a step of this
        sequence takes (None: the load's; 0: none)."""
        prompt = list(tokens)
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.n_ctx_seq:
            raise ValueError(f"Requested tokens ({len(prompt)}) exceed context window of {self.n_ctx_seq}")
        limit = min(max_tokens, self.n_ctx_seq - len(prompt)) if max_tokens and max_tokens > 0 else None
        seq = Sequence(prompt, sampler_chain(self.llm, seed=seed, logit_bias=logit_bias, **sampling), stopped, limit)
        seq.on_admit, seq.logprobs, seq.draft_max = on_admit, logprobs, draft_max
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closing")
            if not self._free and len(self._waiting) >= self.max_waiting:
                seq.sampler.close()
                raise QueueFull(f"all {self.parallel} sequences of this model are running and {len(self._waiting)} "
                                "request(s) already wait; retry later, or load the model with a larger parallel")
            self._waiting.append(seq)
            self._cond.notify_all()
        return self._tokens(seq)

    def _tokens(self, seq: Sequence) -> Iterator[int]:
        try:
            while True:
                with self._cond:
                    while not seq.pending and not seq.ended:
                        if not seq.wanting:
                            seq.wanting = True
                            self._cond.notify_all()  # past its limit it is decoded only now
                        self._cond.wait(0.5)
                        if seq.stopped() and not seq.pending:  # cancelled while it waits for a slot or a token
                            self._cond.notify_all()
                            return
                    if not seq.pending:
                        if seq.error is not None:
                            raise RuntimeError(seq.error)
                        return
                    seq.wanting = False
                    token = seq.pending.popleft()
                    self._cond.notify_all()  # it may have been held back by LOOKAHEAD
                yield token
        finally:
            with self._cond:
                seq.left = True
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for seq in [*self._running, *self._waiting]:
                seq.ended = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)

    # --- the scheduler ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    self._reap()
                    self._admit()
                    decode = self._decoded()
                    reading = [s for s in self._running if not s.prefilled and not s.ended]
                    budget = self._prefill_budget(len(decode), len(reading))
                    if self.unified:  # one pass: the prompt chunks and the decoded tokens fit n_batch together
                        budget = min(budget, self.llm.n_batch - len(decode))
                    prefills = self._prefills(reading, budget, cut=self.unified)
                    if self._closed:
                        return
                    if not decode and not prefills:
                        self._report_stats()
                        if self.measuring is None or self._running or self._waiting:
                            self._cond.wait(0.5)
                            continue
                if not decode and not prefills:  # idle, with measures to take: they use every slot's cells
                    self._measure()
                    continue
                groups = [decode] if self.unified else passes(decode, self.max_batch)
                if self.drafting is not None and decode:
                    self._propose(groups, sum(len(c) for _, c in prefills))
                started = time.monotonic()
                rows = sum(1 + len(s.draft) for s in decode)
                if self.drafter is not None:
                    self.drafter.ahead(decode)  # the client waits on the mesh: the drafter guesses on meanwhile
                try:
                    n = self._mixed_step(decode, prefills) if self.unified else self._separate_steps(groups, prefills)
                finally:
                    # what the pass cost, without the wait for the drafter's guess in flight: that is drafting's
                    # cost (its guesses are the next drafts), not the rows' (RowCost)
                    ms = (time.monotonic() - started) * 1000
                    if self.drafter is not None:
                        self.drafter.wait()
                self.cost.observe(ms, sum(len(c) for _, c in prefills), len(decode))
                if logger.isEnabledFor(logging.DEBUG):
                    logger.debug("step: prompt chunks %s, %d decoded (%d rows), %d passes, %.1f ms",
                                 [len(c) for _, c in prefills], len(decode), rows, n, ms)
                if decode and not prefills and self.drafting is not None:
                    self.drafting.row_cost.observe(rows, ms)
                with self._cond:
                    self.steps += 1
                    self.passes += n
                    self._recent.append((len(decode), n))
                self._report_stats()
        except Exception as exc:  # a bug here must not leave every consumer waiting for ever
            logger.exception("the batch scheduler failed")
            with self._cond:
                self._closed = True
                for seq in [*self._running, *self._waiting]:
                    seq.error, seq.ended = f"the batch scheduler failed: {type(exc).__name__}: {exc}", True
                self._cond.notify_all()

    def measure_while_idle(self, measuring: Any) -> None:
        """Take ``measuring``'s measures (a :class:`.measuring.Measuring`) whenever no sequence runs or waits."""
        with self._cond:
            self.measuring = measuring
            self._cond.notify_all()

    def _measure(self) -> None:
        """Take the measures still to take until work arrives (:mod:`.measuring`), in this thread, the context's
        only user; once all are had, tell ``on_measured`` (which may widen the steps: :meth:`limit`)."""
        self.cache.forget()
        try:
            if not self.measuring.run(lambda: bool(self._waiting) or self._closed):
                return
        except Exception:  # a measure is not worth the engine: it serves on as it did, one sequence a step
            logger.exception("measuring the kernels failed; decode steps stay at one sequence, without drafts")
            self.measuring = None
            return
        measuring, self.measuring = self.measuring, None
        logger.info("measured the kernels in %d passes while idle: %s", measuring.passes_run, measuring.result)
        if self.on_measured is not None:
            self.on_measured(measuring.result)

    def limit(self, max_batch: int, min_chunk: int, max_rows: int) -> None:
        """Set what the exact mode allows (in the loop's thread, or before it runs): sequences per decode pass,
        the least prompt chunk (0: a solo request's passes) and rows per verification pass (1: no drafts)."""
        self.max_batch, self.min_chunk, self.cache.min_chunk = max_batch, min_chunk, min_chunk
        self.max_rows = max_rows
        if self.drafting is not None:
            self.drafting.reset_costs()

    def _reap(self) -> None:
        """Free the slots of sequences whose consumer left or that were cancelled; drop cancelled waiting ones."""
        for seq in [s for s in self._running if s.left or s.stopped()]:
            self._running.remove(seq)
            seq.ended = True
            self.cache.release(seq)
            if self.drafter is not None:
                self.drafter.release(seq)
            heapq.heappush(self._free, seq.slot)
            seq.sampler.close()
        for seq in [s for s in self._waiting if s.left or s.stopped()]:
            self._waiting.remove(seq)
            seq.ended = True
            seq.sampler.close()

    def _separate_steps(self, groups: list[list[Sequence]], prefills: list[tuple[Sequence, list[int]]]) -> int:
        """The exact mode's step: each prompt chunk in a pass of its own (new prompts first: their time to first
        token), then the decoded sequences in their passes (``groups``, :func:`passes`). Returns the passes."""
        for seq, chunk in prefills:
            if seq.reusable == seq.n_past and self.cache.solo_pass(len(chunk)):
                seq.reusable += len(chunk)
            last = seq.n_past + len(chunk) >= len(seq.prompt)
            self._step([(tok, seq.n_past + i, seq) for i, tok in enumerate(chunk)],
                       [(seq, [len(chunk) - 1])] if last else [])
        for group in groups:
            tokens: list[tuple[int, int, Sequence]] = []
            sampled = [(s, decode_rows(s, tokens)) for s in group]
            self._step(tokens, sampled)
        return len(prefills) + len(groups)

    def _mixed_step(self, decode: list[Sequence], prefills: list[tuple[Sequence, list[int]]]) -> int:
        """The fast mode's step: one pass of the decoded sequences' next tokens (and drafts) and the prompt chunks;
        a sequence whose prompt ends in it gets its first token. Returns the passes (1)."""
        tokens: list[tuple[int, int, Sequence]] = []
        sampled = [(s, decode_rows(s, tokens)) for s in decode]
        for seq, chunk in prefills:
            tokens += [(tok, seq.n_past + i, seq) for i, tok in enumerate(chunk)]
            if seq.n_past + len(chunk) >= len(seq.prompt):
                sampled.append((seq, [len(tokens) - 1]))
        self._step(tokens, sampled)
        return 1

    def _propose(self, groups: list[list[Sequence]], prompt_rows: int) -> None:
        """Each decoded sequence's drafts for this step (:meth:`.drafting.Drafting.propose`), within each pass's rows
        (the exact mode's ``max_rows``; the fast mode's one pass: ``n_batch`` less the prompt rows it reads)."""
        free = {g: (self.llm.n_batch - prompt_rows if self.unified else max(self.max_rows, len(group))) - len(group)
                for g, group in enumerate(groups)}
        self.drafting.propose(groups, free, self.cost.decode_ms or 0.0, self.cost.token_ms)

    def _decoded(self) -> list[Sequence]:
        """The sequences whose next token this step decodes, in slot order: every running one that has read its
        prompt and is less than ``LOOKAHEAD`` tokens ahead of its consumer, and those up to ``LOOKAHEAD_MAX`` ahead
        whose slot lies between two of them in the exact mode (see the module's docstring; in the fast mode any
        sequences are one pass)."""
        ready = [s for s in self._running
                 if s.prefilled and s.next_input is not None and not s.ended and s.wants_more()]
        due = [s for s in ready if len(s.pending) < LOOKAHEAD]
        if not due or self.unified:
            return due
        lo, hi = min(s.slot for s in due), max(s.slot for s in due)
        held = [s for s in ready if LOOKAHEAD <= len(s.pending) < LOOKAHEAD_MAX and lo < s.slot < hi]
        return sorted(due + held, key=lambda s: s.slot)

    def _prefill_budget(self, decoding: int, reading: int) -> int:
        """Prompt tokens this step may read: ``prefill_chunk``; while at least as many sequences are decoding as are
        reading their prompts (``reading``) and ``max_stall_ms`` is set, no more than keep the step (and so their next
        token) within it, or within ``STALL_STEPS`` decode-only steps where those take longer (behind a link a decode
        step alone may take most of ``max_stall_ms``, and the newcomers would wait step after step for their
        prompts), as measured (:class:`StepCost`), and at least ``MIN_PREFILL``. Fewer decoding than reading (a
        burst of requests, of which the first few started a step earlier): every step of theirs the bound saves
        would cost more newcomers a step each, so the prompts go first."""
        if not decoding or decoding < reading or self.max_stall_ms <= 0 or self.cost.token_ms is None:
            return self.prefill_chunk
        decode_ms = self.cost.decode_ms or 0.0
        fits = (max(self.max_stall_ms, STALL_STEPS * decode_ms) - decode_ms) / max(self.cost.token_ms, 1e-3)
        return max(MIN_PREFILL, min(self.prefill_chunk, int(fits)))

    def _prefills(self, reading: list[Sequence], budget: int, cut: bool) -> list[tuple[Sequence, list[int]]]:
        """The prompt chunks of this step: of ``reading`` (the sequences still reading their prompt), in
        :func:`prefill_order`, up to ``budget`` tokens in all. ``cut`` (fast mode): the last chunk is cut to what is
        left of the budget. Else (exact mode) each chunk is evaluated alone (its own ``llama_decode``), as a solo
        request's prompt is, at least one: chunks of ``prefill_chunk`` tokens, or with ``min_chunk`` (the kernels
        allow it: ``invariant_chunks``) chunks within the budget cut by
        :func:`~sharedllm.engine.invariance.exact_chunk`."""
        out: list[tuple[Sequence, list[int]]] = []
        for seq in prefill_order(reading, time.monotonic()):
            if budget <= 0:
                break
            if cut:
                size = min(self.prefill_chunk, budget)
            elif self.min_chunk:
                final = solo_last_pass(len(seq.prompt), self.llm.n_batch, self._n_ubatch)
                size = exact_chunk(len(seq.prompt) - seq.n_past, final, budget,
                                   min(self.prefill_chunk, self._n_ubatch), self.min_chunk)
            else:
                size = self.prefill_chunk
            chunk = seq.prompt[seq.n_past:seq.n_past + size]
            if out and len(chunk) > budget:
                break
            out.append((seq, chunk))
            budget -= len(chunk)
            if budget <= 0:
                break
        return out

    def _admit(self) -> None:
        while self._free and self._waiting:
            seq = self._waiting.popleft()
            slot, reuse, source = self.cache.choose(seq.prompt, self._free, self._running)
            self._free.remove(slot)
            heapq.heapify(self._free)
            seq.slot = slot
            seq.n_past = seq.reusable = seq.cached = self.cache.take(slot, len(seq.prompt), reuse, source)
            if self.drafting is not None:
                seq.draft_length = self.drafting.new_length()
            self._running.append(seq)
            if seq.on_admit is not None:
                seq.on_admit(seq.cached)

    def _step(self, tokens: list[tuple[int, int, Sequence]], sampled: list[tuple[Sequence, list[int]]]) -> None:
        """One ``llama_decode`` of ``tokens`` (token, position, sequence); then, for each ``(sequence, rows)`` of
        ``sampled``, its next token sampled from the logits of batch row ``rows[0]`` and, while that token is the
        draft ``rows[1]`` was evaluated with, the next from the next row (speculative decoding: the rows are the
        sequence's drafts, the tokens accepted are those the target samples). The cells of the drafts that were not
        accepted are removed."""
        batch = self._batch
        want = {row for _, rows in sampled for row in rows}
        for i, (tok, pos, seq) in enumerate(tokens):
            batch.token[i] = tok
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq.slot
            batch.logits[i] = i in want
        batch.n_tokens = len(tokens)
        rc = self._lib.llama_decode(self._ctx, batch)
        if rc != 0:
            with self._cond:
                for seq in {id(s): s for _, _, s in tokens}.values():
                    seq.error, seq.ended = f"llama_decode failed with status {rc}", True
                self._cond.notify_all()
            return
        new = []
        for seq, rows in sampled:
            got = []
            for j, row in enumerate(rows):
                tok = self._lib.llama_sampler_sample(seq.sampler.sampler, self._ctx, row)
                if seq.logprobs is not None:  # from the logits row it was sampled from, before the next decode
                    k, records = seq.logprobs
                    records.append(token_logprobs(self._lib, self._ctx, row, self._n_vocab, tok, k))
                got.append(tok)
                if j >= len(seq.draft) or tok != seq.draft[j] or self._lib.llama_vocab_is_eog(self._vocab, tok):
                    break
            base = tokens[rows[0]][1]
            if len(got) < len(rows):  # the cells of the drafts not accepted
                self._lib.llama_memory_seq_rm(self._memory, seq.slot, base + len(got), -1)
            new.append((seq, got, base + len(got)))
        now = time.monotonic()
        with self._cond:
            for _, pos, seq in tokens:
                seq.n_past = max(seq.n_past, pos + 1)
            for seq, got, n_past in new:
                seq.n_past = n_past
                if seq.draft:
                    self.drafting.verified(seq, got)
                if seq.prefilled and seq.next_input is not None:  # a decode step's, not a prompt's first token
                    self.seq_steps += 1
                    self.step_tokens += len(got)
                seq.draft = []
                for tok in got:
                    seq.sampled += 1
                    seq.outputs.append(tok)
                    seq.pending.append(tok)
                    seq.next_input = tok
                    if seq.first_token_at is None:
                        seq.first_token_at = now
                    if self._lib.llama_vocab_is_eog(self._vocab, tok) or seq.n_past >= self.n_ctx_seq:
                        seq.ended = True
            self._cond.notify_all()

    def _report_stats(self) -> None:
        """Send the statistics when the running or waiting sequences changed, and every half second while busy."""
        if self.on_stats is None:
            return
        now = time.monotonic()
        counts = (len(self._running), len(self._waiting))
        if counts == self._reported and (now - self._stats_at < 0.5 or not counts[0]):
            return
        self._reported, self._stats_at = counts, now
        recent = list(self._recent)
        n = len(recent) or 1
        self.on_stats({"running": counts[0], "waiting": counts[1], "parallel": self.parallel, "steps": self.steps,
                       "passes": self.passes, "batch": sum(r[0] for r in recent) / n,
                       "passes_per_step": sum(r[1] for r in recent) / n, "prompt_tokens": self.cache.prompt_tokens,
                       "cached_tokens": self.cache.cached_tokens, **self.draft_stats()})

    def draft_stats(self) -> dict:
        """Speculative decoding so far: ``{"draft": {drafter, drafted, accepted, steps, tokens}}`` (the drafts
        verified and accepted; the sequences' decode steps and the tokens they gave), or nothing without a drafter."""
        if self.drafting is None:
            return {}
        return {"draft": {"drafter": self.drafter.name, "drafted": self.drafting.drafted,
                          "accepted": self.drafting.accepted, "steps": self.seq_steps, "tokens": self.step_tokens}}
