# SPDX-License-Identifier: AGPL-3.0-or-later
"""``parallel > 1`` or a drafter in the engine child (:mod:`.child`): every call runs in its own thread, and their
generations are sequences of one batch (:class:`sharedllm.engine.batch.BatchScheduler`), as wide as the exact mode's
measures allow (:mod:`.measuring`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from sharedllm.engine import measures
from sharedllm.engine.calls import Call, Out, wrap_create_completion
from sharedllm.engine.measuring import Measuring
from sharedllm.engine.spec import EngineSpec

logger = logging.getLogger("sharedllm.engine.child")


class BatchRunner:
    """``parallel > 1`` or a drafter: every call runs in its own thread; their generations are sequences of one batch
    (:class:`sharedllm.engine.batch.BatchScheduler`)."""

    def __init__(self, llm: Any, spec: EngineSpec, out: Out, drafter: Any = None):
        from sharedllm.engine.batch import MIN_PREFILL, BatchScheduler

        self.llm, self.out = llm, out
        self.calls: dict[int, Call] = {}
        self._local = threading.local()  # .call: the call this thread runs
        n_ctx_seq = llm.n_ctx() // spec.parallel
        llm._n_ctx = n_ctx_seq  # llama-cpp-python checks prompts and max_tokens against it: one sequence's context
        self.spec, self.drafter = spec, drafter
        # Exact batches: no more sequences per decode, prompt chunks and drafts than leave each sequence's arithmetic
        # what it is alone, as measured on these machines: by an earlier load (spec.invariance: of the session, or
        # kept on disk), else while idle (.measuring); until then steps of one sequence, no chunks, no drafts.
        exact = spec.exact_batches
        self._measuring = Measuring(llm, spec.parallel, n_ctx_seq, spec.invariance or {}, batches=exact,
                                    chunks_from=MIN_PREFILL if exact and spec.max_stall_ms > 0 else 0,
                                    verify_rows=spec.draft_max + 1 if exact and drafter is not None else 0)
        max_batch, min_chunk, max_rows = self._limits(self._measuring.result)
        self.scheduler = BatchScheduler(llm, spec.parallel, n_ctx_seq, prefill_chunk=spec.prefill_chunk,
                                        max_waiting=spec.max_waiting, max_batch=max_batch,
                                        unified=spec.unified_kv, max_stall_ms=spec.max_stall_ms,
                                        min_chunk=min_chunk, prompt_cache=spec.prompt_cache,
                                        on_stats=lambda s: out.send(("stats", s)), drafter=drafter,
                                        draft_max=spec.draft_max, draft_min=spec.draft_min, max_rows=max_rows,
                                        on_measured=self._measured)
        llm.generate = self._generate
        llm.set_seed = self._set_seed  # the request's seed is its own, not the shared Llama._seed
        wrap_create_completion(llm, lambda: self._local.call, batched=True)

    def _limits(self, measured: dict) -> tuple[int, int, int]:
        """The batch scheduler's ``max_batch``, ``min_chunk`` and ``max_rows`` under the exact mode's measures (those
        of :class:`.measuring.Measuring`; what is not had yet: one sequence a pass, a solo request's passes, no
        drafts); ``invariance`` is what the measures say, for the "ready" info and the measures file."""
        spec = self.spec
        if not spec.exact_batches:
            self.max_batch, self.min_chunk, self.max_rows, self.invariance = spec.parallel, 0, 0, {}
            return self.max_batch, 0, 0
        self.max_batch = measured.get("max_batch", 1)
        self.min_chunk = measured.get("batch_min_chunk") or 0
        self.invariance = {"max_batch": self.max_batch, "batch_min_chunk": self.min_chunk}
        max_rows = 0
        if self.drafter is not None:
            # Drafts are verified in passes of no more rows than keep each row's logits those of one token alone
            # (and of no more sequences than invariant_batch allows, where that is fewer).
            max_rows = measured.get("verify_rows", 1)
            if self.max_batch < spec.parallel:
                max_rows = min(max_rows, self.max_batch)
            self.invariance["verify_rows"] = max_rows
        self.max_rows = max_rows
        return self.max_batch, self.min_chunk, max_rows

    def _measured(self, measured: dict) -> None:
        """The measures are had (in the batch scheduler's thread, idle): widen its steps, keep them, say so."""
        self.scheduler.limit(*self._limits(measured))
        if self.max_batch < self.spec.parallel:
            logger.info("decode steps of at most %d sequences: more change llama.cpp's kernels on these devices",
                        self.max_batch)
        if self.spec.max_stall_ms > 0 and not self.min_chunk:
            logger.info("prompts are read in chunks of n_batch: shorter ones change llama.cpp's kernels on these "
                        "devices (max_stall_ms bounds a step between prompts only)")
        if self.drafter is not None and self.max_rows < 2:
            logger.warning("no drafts: a pass of two rows of one sequence changes llama.cpp's kernels on these "
                           "devices (flash attention off, or a llama.cpp build without SharedLLM's patches)")
        measures.remember(self.spec.measures_key, self.invariance)
        self.out.send(("measured", {"invariance": self.invariance, "max_batch": self.max_batch}))

    @property
    def measuring(self) -> bool:
        """Whether measures are still to take (by the batch scheduler while idle, after :meth:`measure_when_idle`)."""
        return not self._measuring.done

    def measure_when_idle(self) -> None:
        """Let the batch scheduler take the measures still to take while idle (once "ready" is sent: the
        "measured" frame comes after it)."""
        if self.measuring:
            self.scheduler.measure_while_idle(self._measuring)

    def _set_seed(self, seed: int) -> None:
        self._local.call.seed = seed

    def _generate(self, tokens: list[int], *, logits_processor: Any = None, **sampling: Any) -> Iterator[int]:
        call: Call = self._local.call
        # llama-cpp-python turns logit_bias into a Python logits processor; the batch uses llama.cpp's own sampler.
        del logits_processor
        seed = call.seed if call.seed is not None else self.llm._seed
        trail = call.trail
        call.prompt_tokens = len(tokens)
        tokens = self.scheduler.generate(tokens, seed=seed, logit_bias=call.kwargs.get("logit_bias"),
                                         stopped=call.stopped, max_tokens=call.max_tokens, draft_max=call.draft_max,
                                         logprobs=None if trail is None else (trail.k, trail.records),
                                         on_admit=lambda n: setattr(call, "cached_tokens", n), **sampling)
        return call.generated(tokens, self.llm._model.vocab)

    def submit(self, call: Call) -> None:
        self.calls[call.rid] = call
        threading.Thread(target=self._run, args=(call,), name=f"call-{call.rid}", daemon=True).start()

    def _run(self, call: Call) -> None:
        self._local.call = call
        try:
            call.run(self.llm)
        finally:
            self.calls.pop(call.rid, None)

    def close(self) -> None:
        self.scheduler.close()
