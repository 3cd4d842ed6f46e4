# SPDX-License-Identifier: AGPL-3.0-or-later
"""A call in the engine child (:mod:`.child`): the frames to the parent, one request around ``Llama.generate``, and
the wrap of ``create_completion`` that records what ``Llama.generate`` is not told (``max_tokens``, logprobs)."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from typing import Any

from sharedllm.engine.batch import QueueFull
from sharedllm.engine.framing import write_frame


class Out:
    """The frames to the parent, written whole by one thread at a time."""

    def __init__(self, fd: int):
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, frame: tuple) -> None:
        with self._lock:
            write_frame(self.fd, frame)


class Call:
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

    def __init__(self, msg: dict, out: Out):
        self.rid = msg["rid"]
        self.method, self.kwargs, self.streamed = msg["method"], dict(msg["kwargs"]), msg["stream"]
        # the most drafts a step of this request's sequence takes (None: the load's draft_max; 0: none), not an
        # argument of llama-cpp-python's: llama-server's per-request speculative.n_max
        self.draft_max = self.kwargs.pop("draft_max", None)
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
            if self.draft_max is not None and (not isinstance(self.draft_max, int) or isinstance(self.draft_max, bool)
                                               or self.draft_max < 0):
                raise ValueError(f"draft_max must be an integer >= 0 (0: no drafts for this request), got "
                                 f"{self.draft_max!r}")
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
                    if finished(chunk):  # the last chunk carries the usage (the OpenAI server may send it on)
                        chunk["usage"] = self.usage()
                    self.out.send(("chunk", self.rid, chunk, self.tokens))
                    if self.stopped():
                        break
                end = ("done", self.rid, self.tokens)
        except QueueFull as exc:
            end = ("error", self.rid, "busy", str(exc))
        except (ValueError, TypeError) as exc:  # bad arguments, prompt longer than the context...
            end = ("error", self.rid, "value", str(exc))
        except Exception as exc:
            end = ("error", self.rid, "engine", f"{type(exc).__name__}: {exc}")
        if self.stop != "close":  # closed mid-call: no answer, the parent takes the exit for the end of the model
            self.out.send(end)


def wrap_create_completion(llm: Any, current: Any, batched: bool) -> None:
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
        call: Call = current()
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


def finished(chunk: Any) -> bool:
    """Whether a streamed chunk is a completion's last (it has a finish reason)."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    return bool(choices) and isinstance(choices[0], dict) and choices[0].get("finish_reason") is not None
