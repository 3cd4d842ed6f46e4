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
import inspect
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Generator, Iterator
from typing import Any

from sharedllm.engine import measures
from sharedllm.engine.batch import QueueFull as _BUSY
from sharedllm.engine.framing import FrameReader, write_frame
from sharedllm.engine.invariance import exact_chunk, min_chunk, solo_last_pass
from sharedllm.engine.load import build_engine_llama, phase_seconds
from sharedllm.engine.measuring import Measuring
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


class _Out:
    """The frames to the parent, written whole by one thread at a time."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, frame: tuple) -> None:
        with self._lock:
            write_frame(self.fd, frame)


class _Call:
    """One request in the engine child, around ``Llama.generate`` (which llama-cpp-python's completion methods call
    once per request, after their checks: context length, logprobs...):

    - it writes an ``("accepted", rid)`` frame when generation starts: from then on the request can only fail in the
      engine itself, and the OpenAI endpoint sends its response headers (so the client's work on them overlaps the
      prompt's evaluation);
    - it counts the tokens generated (end-of-generation tokens excluded, as in ``usage.completion_tokens``): the
      parent reports tokens, not stream chunks;
    - between two tokens it stops generating once the parent sent ``cancel`` (or ``close``), streamed or not:
      llama-cpp-python then ends the request as it would at ``max_tokens``.
    """

    def __init__(self, msg: dict, out: _Out):
        self.rid = msg["rid"]
        self.method, self.kwargs, self.streamed = msg["method"], msg["kwargs"], msg["stream"]
        self.out = out
        self.tokens = 0
        self.stop: str | None = None  # "cancel" or "close" once the parent asked
        self.seed: int | None = None  # the seed llama-cpp-python set for this request (batched calls)
        self.max_tokens: int | None = None  # its create_completion's max_tokens (batched calls)
        self.cached_tokens: int | None = None  # its prompt's tokens found in the prompt cache
        self.trail = None  # its tokens' log-probabilities, when it asked for them (sharedllm.engine.logprobs.Trail)
        self.prompt_tokens = 0  # tokens of its prompt (the last generation's, when a chat handler makes several)

    def stopped(self) -> bool:
        return self.stop is not None

    def generated(self, tokens: Iterator[int], vocab: Any) -> Iterator[int]:
        """``tokens`` (a request's generation), announced, counted and stopped on the parent's word."""
        import llama_cpp

        self.out.send(("accepted", self.rid))
        for token in tokens:
            if self.stopped():
                return
            if not llama_cpp.llama_vocab_is_eog(vocab, token):
                self.tokens += 1
            if self.trail is not None:
                self.trail.tokens.append(token)
            yield token

    def usage(self) -> dict:
        """Its usage so far, as a completion's ``usage``."""
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                 "total_tokens": self.prompt_tokens + self.tokens}
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage

    def run(self, llm: Any) -> None:
        """Run the request on ``llm`` and send its chunks and its end (nothing when the engine closes under it)."""
        fn = getattr(llm, self.method)
        if self.method == "create_chat_completion" and self.kwargs.get("logprobs") and \
                self.kwargs.get("top_logprobs") is None:
            # OpenAI's logprobs=True alone: the chosen tokens' (llama-cpp-python would give none without a count)
            self.kwargs = {**self.kwargs, "top_logprobs": 0}
        try:
            if not self.streamed:
                result = fn(**self.kwargs)
                if self.trail is not None and self.method == "create_chat_completion":
                    self.trail.chat(result)
                if isinstance(result, dict) and isinstance(result.get("usage"), dict) and self.cached_tokens:
                    result["usage"]["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}  # OpenAI's
                end = ("result", self.rid, result)
            else:
                for chunk in fn(**self.kwargs, stream=True):
                    if self.trail is not None and self.method == "create_chat_completion":
                        self.trail.chat(chunk)
                    if _finished(chunk):  # the last chunk carries the usage (the OpenAI server may send it on)
                        chunk["usage"] = self.usage()
                    self.out.send(("chunk", self.rid, chunk, self.tokens))
                    if self.stopped():
                        break
                end = ("done", self.rid, self.tokens)
        except _BUSY as exc:
            end = ("error", self.rid, "busy", str(exc))
        except (ValueError, TypeError) as exc:  # bad arguments, prompt longer than the context...
            end = ("error", self.rid, "value", str(exc))
        except Exception as exc:
            end = ("error", self.rid, "engine", f"{type(exc).__name__}: {exc}")
        if self.stop != "close":  # closed mid-call: no answer, the parent takes the exit for the end of the model
            self.out.send(end)


def _wrap_create_completion(llm: Any, current: Any, batched: bool) -> None:
    """Wrap ``llm.create_completion``, which every completion (chat ones too) goes through, for the call that
    ``current()`` runs: it records the call's ``max_tokens`` (``Llama.generate`` is not told them), and when the call
    asks for ``logprobs`` it runs the completion without them and puts them on its result or chunks from the
    log-probabilities recorded as each token was sampled (:mod:`.logprobs`), with or without ``logits_all``. The
    prompt's own log-probabilities (``echo=True``) are llama-cpp-python's (``parallel=1`` and ``logits_all=True``)."""
    from sharedllm.engine.logprobs import Trail

    create, signature = llm.create_completion, inspect.signature(llm.create_completion)

    def create_completion(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        call: _Call = current()
        call.max_tokens = bound.arguments.get("max_tokens")
        k = bound.arguments.get("logprobs")
        if k is None or (bound.arguments.get("echo") and not batched):
            return create(*args, **kwargs)
        if bound.arguments.get("echo"):
            raise ValueError("logprobs with echo=True (the prompt's own log-probabilities) are not available from a "
                             "model loaded with parallel > 1 or a draft; load it with parallel=1, no draft and "
                             "logits_all=True")
        call.trail = trail = Trail(int(k), llm, bound.arguments["prompt"])
        bound.arguments["logprobs"] = None
        out = create(*bound.args, **bound.kwargs)
        return trail.chunks(out) if bound.arguments.get("stream") else trail.completion(out)

    llm.create_completion = create_completion


def _finished(chunk: Any) -> bool:
    """Whether a streamed chunk is a completion's last (it has a finish reason)."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    return bool(choices) and isinstance(choices[0], dict) and choices[0].get("finish_reason") is not None


class _SerialRunner:
    """``parallel == 1``: the calls run one after the other in one thread, through llama-cpp-python's own
    ``Llama.generate``, each from the cells of the context its prompt may keep (the prompt cache: see
    :meth:`_generate`)."""

    def __init__(self, llm: Any, spec: EngineSpec, out: _Out):
        self.llm, self.spec, self.out = llm, spec, out
        self.calls: dict[int, _Call] = {}
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._call: _Call | None = None  # the call running
        _wrap_create_completion(llm, lambda: self._call, batched=False)
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

    def submit(self, call: _Call) -> None:
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

    def _generate(self, call: _Call, generate: Any, vocab: Any, tokens: Any, *args: Any, **kwargs: Any
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

    def _recorded(self, call: _Call, tokens: Generator[int, Any, None]) -> Iterator[int]:
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


class _BatchRunner:
    """``parallel > 1`` or a drafter: every call runs in its own thread; their generations are sequences of one batch
    (:class:`sharedllm.engine.batch.BatchScheduler`)."""

    def __init__(self, llm: Any, spec: EngineSpec, out: _Out, drafter: Any = None):
        from sharedllm.engine.batch import MIN_PREFILL, BatchScheduler

        self.llm, self.out = llm, out
        self.calls: dict[int, _Call] = {}
        self._local = threading.local()  # .call: the call this thread runs
        n_ctx_seq = llm.n_ctx() // spec.parallel
        llm._n_ctx = n_ctx_seq  # llama-cpp-python checks prompts and max_tokens against it: one sequence's context
        self.spec, self.drafter = spec, drafter
        # Exact batches: no more sequences per decode, prompt chunks and drafts than leave each sequence's arithmetic
        # what it is alone, as measured on these machines: by an earlier load (spec.invariance: of the session, or
        # kept on disk), else while idle (.measuring); until then steps of one sequence, no chunks, no drafts.
        exact = spec.exact_batches
        measuring = Measuring(llm, spec.parallel, n_ctx_seq, spec.invariance or {}, batches=exact,
                              chunks_from=MIN_PREFILL if exact and spec.max_stall_ms > 0 else 0,
                              verify_rows=spec.draft_max + 1 if exact and drafter is not None else 0)
        self.measuring = not measuring.done
        max_batch, min_chunk, max_rows = self._limits(measuring.result)
        self.scheduler = BatchScheduler(llm, spec.parallel, n_ctx_seq, prefill_chunk=spec.prefill_chunk,
                                        max_waiting=spec.max_waiting, max_batch=max_batch,
                                        unified=spec.unified_kv, max_stall_ms=spec.max_stall_ms,
                                        min_chunk=min_chunk, prompt_cache=spec.prompt_cache,
                                        on_stats=lambda s: out.send(("stats", s)), drafter=drafter,
                                        draft_max=spec.draft_max, draft_min=spec.draft_min, max_rows=max_rows,
                                        on_measured=self._measured)
        self._measuring = measuring if self.measuring else None
        llm.generate = self._generate
        llm.set_seed = self._set_seed  # the request's seed is its own, not the shared Llama._seed
        _wrap_create_completion(llm, lambda: self._local.call, batched=True)

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
        self.measuring = False
        measures.remember(self.spec.measures_key, self.invariance)
        self.out.send(("measured", {"invariance": self.invariance, "max_batch": self.max_batch}))

    def measure_when_idle(self) -> None:
        """Let the batch scheduler take the measures still to take while idle (once "ready" is sent: the
        "measured" frame comes after it)."""
        if self._measuring is not None:
            self.scheduler.measure_while_idle(self._measuring)

    def _set_seed(self, seed: int) -> None:
        self._local.call.seed = seed

    def _generate(self, tokens: list[int], *, logits_processor: Any = None, **sampling: Any) -> Iterator[int]:
        call: _Call = self._local.call
        # llama-cpp-python turns logit_bias into a Python logits processor; the batch uses llama.cpp's own sampler.
        del logits_processor
        seed = call.seed if call.seed is not None else self.llm._seed
        trail = call.trail
        call.prompt_tokens = len(tokens)
        tokens = self.scheduler.generate(tokens, seed=seed, logit_bias=call.kwargs.get("logit_bias"),
                                         stopped=call.stopped, max_tokens=call.max_tokens,
                                         logprobs=None if trail is None else (trail.k, trail.records),
                                         on_admit=lambda n: setattr(call, "cached_tokens", n), **sampling)
        return call.generated(tokens, self.llm._model.vocab)

    def submit(self, call: _Call) -> None:
        self.calls[call.rid] = call
        threading.Thread(target=self._run, args=(call,), name=f"call-{call.rid}", daemon=True).start()

    def _run(self, call: _Call) -> None:
        self._local.call = call
        try:
            call.run(self.llm)
        finally:
            self.calls.pop(call.rid, None)

    def close(self) -> None:
        self.scheduler.close()


def child_main(parent_pid: int) -> int:
    # Frames go out on a private copy of stdout; anything else printed (llama.cpp, Python) lands in the log (stderr).
    out = _Out(os.dup(1))
    os.dup2(2, 1)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s engine %(levelname)s %(message)s")
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
        runner = _BatchRunner(llm, spec, out, drafter)
    else:
        runner = _SerialRunner(llm, spec, out)
    marks["measured"] = time.monotonic()  # the runner measured what batches and prompt chunks keep exact
    if getattr(runner, "measuring", False):
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
    if isinstance(runner, _BatchRunner):
        runner.measure_when_idle()
    while True:
        try:
            msg = reader.read()
        except EOFError:  # the parent is gone without a word: nobody reads our log
            _drop_own_log()
            msg = {"op": "close"}
        op = msg.get("op")
        if op == "call":
            runner.submit(_Call(msg, out))
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
