# SPDX-License-Identifier: AGPL-3.0-or-later
"""The engine child (``python -m sharedllm.engine``): builds the ``Llama`` and serves the parent's calls.

The main thread reads the parent's frames (calls, cancels, close); calls run elsewhere, so a cancel reaches a running
call at once. With ``parallel == 1`` one worker thread runs the calls one after the other, each through
llama-cpp-python's own ``Llama.generate`` (today's oracle: the same kernels and the same text as a plain ``Llama``).
With ``parallel > 1`` every call runs in its own thread and its ``Llama.generate`` is the batch scheduler's
(:mod:`.batch`): the sequences of all running calls are decoded together.

Frames to the parent carry the call's id: ``("accepted", rid)``, ``("chunk", rid, chunk, tokens)``,
``("done", rid, tokens)``, ``("result", rid, value)``, ``("error", rid, kind, message)``; and ``("stats", dict)``
from the batch scheduler.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

from sharedllm.engine import measures
from sharedllm.engine.batch_runner import BatchRunner
from sharedllm.engine.calls import Call, Out, wrap_create_completion
from sharedllm.engine.framing import FrameReader
from sharedllm.engine.invariance import exact_chunk, min_chunk, solo_last_pass
from sharedllm.engine.load import build_engine_llama, phase_seconds
from sharedllm.engine.prompt_cache import PromptCache, common_prefix, keeps_prefix
from sharedllm.engine.spec import EngineSpec
from sharedllm.engine.speculative import start_drafter

logger = logging.getLogger(__name__)


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            _drop_own_log()
            os._exit(0)
        time.sleep(0.5)


def _drop_own_log() -> None:
    """The parent is gone (or closed our pipe without a word), and with it whoever would read this process's log (the
    temporary file it made for our stderr, see ``Engine``): remove it, as the parent does when it closes an engine."""
    with contextlib.suppress(OSError):
        path = os.readlink("/proc/self/fd/2")
        if os.path.basename(path).startswith("sharedllm-engine-") and path.endswith(".log"):
            os.unlink(path)


class _SerialRunner:
    """``parallel == 1``: the calls run one after the other in one thread, through llama-cpp-python's own
    ``Llama.generate``, each from the cells of the context its prompt may keep (the prompt cache: see
    :meth:`_generate`)."""

    def __init__(self, llm: Any, spec: EngineSpec, out: Out):
        self.llm, self.spec, self.out = llm, spec, out
        self.calls: dict[int, Call] = {}
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._call: Call | None = None  # the call running
        wrap_create_completion(llm, lambda: self._call, batched=False)
        self._trusted = 0  # leading cells of the context written as a fresh context writes them (see _generate)
        self._rules: PromptCache | None = None  # what a prompt may keep of them, once measured
        self.invariance: dict = {}  # what was measured (or given by spec.invariance), for the "ready" info
        if spec.prompt_cache and not spec.reuse_prompt_cache:  # at load: part of its time, not the first request's
            try:
                self._rules = self._measure()
            except Exception:
                logger.exception("the prompt cache's measure failed; every request reads its whole prompt")
        self.prompt_tokens = self.cached_tokens = 0
        self._thread = threading.Thread(target=self._work, name="calls", daemon=True)
        self._thread.start()

    def submit(self, call: Call) -> None:
        self.calls[call.rid] = call
        self._queue.put(call)

    def _measure(self) -> PromptCache:
        """The prompt cache's rules on these devices: prompts read in chunks of at least ``MIN_PREFILL`` tokens
        where that gives the logits of one pass (:func:`invariant_chunks`, measured once, before any call: it
        uses the context's cells: at load; or as ``spec.invariance`` says), else in whole passes of ``n_batch``."""
        import llama_cpp

        from sharedllm.engine.batch import MIN_PREFILL

        llm = self.llm
        chunk = (self.spec.invariance or {}).get("serial_min_chunk")
        if chunk is None:
            chunk = min_chunk(llm, MIN_PREFILL, llm.n_ctx())
            llm.reset()
        self.invariance = {"serial_min_chunk": chunk}
        return PromptCache(None, None, enabled=True, unified=False, min_chunk=chunk, prefill_chunk=llm.n_batch,
                           n_batch=llm.n_batch, n_ubatch=llm.context_params.n_ubatch,
                           n_swa=llama_cpp.llama_model_n_swa(llm._model.model))

    def _work(self) -> None:
        vocab = self.llm._model.vocab
        while (call := self._queue.get()) is not None:
            try:
                if call.stopped():  # cancelled before it started
                    self.out.send(("done", call.rid, 0) if call.streamed else ("error", call.rid, "cancelled", ""))
                    continue
                self.llm.generate = functools.partial(self._generate, call, self.llm.generate, vocab)
                self._call = call
                try:
                    call.run(self.llm)
                finally:
                    self._call = None
                    self.llm.__dict__.pop("generate", None)
                    self.out.send(("stats", {"prompt_tokens": self.prompt_tokens,
                                             "cached_tokens": self.cached_tokens}))
            finally:
                self.calls.pop(call.rid, None)

    def _generate(self, call: Call, generate: Any, vocab: Any, tokens: Any, *args: Any, **kwargs: Any
                  ) -> Iterator[int]:
        """``Llama.generate`` for ``call``, keeping the cells of the context its prompt may keep with its greedy text
        unchanged: those it shares with the last prompt that were written as a fresh context writes them (passes of
        at least ``min_chunk`` rows, or whole ``n_batch`` passes: not a generated token's cell, nor a prompt's short
        last pass), as many as leave the rest read in passes that keep its arithmetic
        (:meth:`PromptCache.reusable`). The rest is read here in chunks cut as exact batches cut them
        (:func:`exact_chunk`), but for its last chunk, which ``Llama.generate`` reads in one pass as it reads a
        prompt (a solo request's own last pass when that is shorter than ``min_chunk``)."""
        import llama_cpp

        tokens = list(tokens)
        keep, rules, llm = 0, self._rules, self.llm
        if self.spec.reuse_prompt_cache:  # llama-cpp-python's own reuse of any common prefix
            keep = common_prefix(llm._input_ids, tokens)
        elif (rules is not None and (keep := rules.reusable(tokens, llm._input_ids[:self._trusted]))
              and keeps_prefix(llama_cpp, llama_cpp.llama_get_memory(llm.ctx), 0, keep, rules.n_swa)):
            llm.n_tokens = keep
            if rules.min_chunk:  # else Llama.generate reads on in whole passes of n_batch, as a fresh context does
                final = solo_last_pass(len(tokens), llm.n_batch, rules.n_ubatch)
                cap = min(llm.n_batch, rules.n_ubatch)
                while (left := len(tokens) - llm.n_tokens) > (chunk := exact_chunk(left, final, llm.n_batch, cap,
                                                                                   rules.min_chunk)):
                    llm.eval(tokens[llm.n_tokens:llm.n_tokens + chunk])
        else:
            keep = 0
            llm.reset()
        call.cached_tokens = min(keep, len(tokens) - 1)
        call.prompt_tokens = len(tokens)
        self.prompt_tokens += len(tokens)
        self.cached_tokens += call.cached_tokens
        self._trusted = 0
        try:
            yield from call.generated(self._recorded(call, generate(tokens, *args, **kwargs)), vocab)
        finally:
            if rules is not None:
                final = solo_last_pass(len(tokens), llm.n_batch, rules.n_ubatch)
                if not rules.min_chunk:
                    written = len(tokens) - len(tokens) % llm.n_batch
                else:
                    written = len(tokens) - (final if final < rules.min_chunk else 0)
                self._trusted = min(written, llm.n_tokens)

    def _recorded(self, call: Call, tokens: Generator[int, Any, None]) -> Iterator[int]:
        """``tokens``, each with its log-probabilities recorded when ``call`` asked for them: ``Llama.generate``
        yields a token before it evaluates it, so the context's last logits are still those it was sampled from."""
        if call.trail is None:
            yield from tokens
            return
        import llama_cpp

        from sharedllm.engine.logprobs import token_logprobs

        n_vocab = self.llm.n_vocab()
        try:
            for token in tokens:
                call.trail.records.append(token_logprobs(llama_cpp, self.llm.ctx, -1, n_vocab, token, call.trail.k))
                yield token
        finally:
            tokens.close()  # as ``yield from`` would: llama-cpp-python stopped taking them (a stop string, a cancel)

    def close(self) -> None:
        self._queue.put(None)


def child_main(parent_pid: int) -> int:
    # Frames go out on a private copy of stdout; anything else printed (llama.cpp, Python) lands in the log (stderr).
    out = Out(os.dup(1))
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s engine %(levelname)s %(message)s")
    # SHAREDLLM_ENGINE_DEBUG=sharedllm.engine.drafting,...: these loggers at DEBUG in the engine log (diagnostics)
    for name in filter(None, os.environ.get("SHAREDLLM_ENGINE_DEBUG", "").split(",")):
        logging.getLogger(name).setLevel(logging.DEBUG)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    import llama_cpp  # noqa: F401  before the spec comes: a standby process (see Engine) waits with it imported

    started_at = time.monotonic()  # ready for a spec: the parent counts the time to here as the spawn
    reader = FrameReader(0)
    try:
        init = reader.read()
    except EOFError:  # a standby whose parent is gone (or closed it)
        _drop_own_log()
        return 0
    spec: EngineSpec = init["spec"]
    t0 = time.perf_counter()
    init_at = time.monotonic()
    started_at = max(started_at, init.get("sent_at", started_at))  # a standby's wait for its spec is no phase
    marks: dict[str, float] = {}
    try:
        drafter = start_drafter(spec)  # before the target: a draft model that cannot draft for it fails at once
    except ValueError as exc:
        out.send(("error", "value", str(exc)))
        return 1
    measured_by = "session" if spec.invariance else "engine"
    if spec.invariance is None:  # kept from an earlier load of the same things?
        spec.invariance = measures.recall(spec.measures_key)
        measured_by = "disk" if spec.invariance else "engine"
    try:
        llm, devices = build_engine_llama(spec, out.fd, marks)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
        out.send(("error", "model", str(exc)))
        return 1
    except Exception as exc:
        out.send(("error", "engine", f"{type(exc).__name__}: {exc}"))
        return 1
    if spec.parallel > 1 or drafter is not None:
        runner = BatchRunner(llm, spec, out, drafter)
    else:
        runner = _SerialRunner(llm, spec, out)
    # The serial runner measured its prompt chunks here; the batch runner takes its measures while idle, after "ready".
    marks["measured"] = time.monotonic()
    measuring = isinstance(runner, BatchRunner) and runner.measuring
    if measuring:
        measured_by = "measuring"  # while idle, from now on: the "measured" frame says when they are had
    elif measured_by == "engine":
        measures.remember(spec.measures_key, runner.invariance)
    out.send(("ready", {
        "load_seconds": time.perf_counter() - t0,
        "phases": phase_seconds(started_at, init_at, marks),
        "devices": devices,
        "n_ctx": llm._n_ctx,
        "parallel": spec.parallel,
        "max_batch": getattr(runner, "max_batch", 1),
        "invariance": None if measured_by == "measuring" else runner.invariance,
        # engine: measured at this load; session, disk: an earlier load's measures; measuring: being measured
        "measured_by": measured_by,
        "n_vocab": llm.n_vocab(),
        "pid": os.getpid(),
        "metadata": dict(llm.metadata),
    }))
    if measuring:
        runner.measure_when_idle()
    while True:
        try:
            msg = reader.read()
        except EOFError:  # the parent is gone without a word: nobody reads our log
            _drop_own_log()
            msg = {"op": "close"}
        op = msg.get("op")
        if op == "call":
            runner.submit(Call(msg, out))
        elif op == "cancel":  # a late cancel, for a call that already ended, needs no answer
            if (call := runner.calls.get(msg["rid"])) is not None and call.stop is None:
                call.stop = "cancel"
        elif op == "close":
            for call in list(runner.calls.values()):
                call.stop = "close"
            runner.close()
            # Calls may still be inside llama.cpp: leave without the interpreter's teardown (freeing the context
            # under them); the kernel closes the connections to the rpc-servers.
            sys.stderr.flush()
            os._exit(0)
