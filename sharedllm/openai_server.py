# SPDX-License-Identifier: AGPL-3.0-or-later
"""An OpenAI-compatible HTTP API in front of one loaded model: ``sharedllm serve`` runs it with uvicorn.

    app = create_app(llm, model_id="gemma-3-270m-q4_k_m", api_keys={"sk-..."}, max_queue=16, queue_timeout=60)

Routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` answers with server-sent events, ``data: {chunk}`` lines closed by ``data: [DONE]``),
``GET /health`` and the OpenAPI schema at ``/openapi.json``. Every error is an OpenAI error object
``{"error": {"message", "type", "param", "code"}}``.

The model is a ``MeshModel`` (or ``Replicas`` of them, or anything with ``create_completion``/
``create_chat_completion``). It serves its ``parallel`` requests at once (sequences of one batch in its engine); the
others pass a bounded queue, clients in turn: a full queue answers 429 and a wait longer than ``queue_timeout``
answers 503, both with ``Retry-After``. A streamed answer is forwarded chunk by chunk: from a
``MeshModel`` through its asyncio API (``acreate_*``), the engine's pipe read in the event loop itself, with no thread
in between; from a model with a blocking API only, through a thread. Non-streamed calls run in threads. A client that
hangs up stops the generation in the engine. A streamed answer's headers go out once the engine accepted the request
(its checks done, the prompt being evaluated): errors before that have their status code, later ones come in-band as
an error event, as OpenAI's do.

Sampling parameters the client leaves out take ``llama_cpp.Llama``'s defaults, so a request behaves like the same
call through the Python API (OpenAI's own defaults differ: temperature 1, and a chat answer without ``max_tokens``
runs to the end of the context). The mesh's rate limits answer 429 with ``Retry-After``; a failed engine answers 503
and turns ``/health`` to 503. Not supported: ``n`` > 1, tools and function calling, usage chunks in streams.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sharedllm.errors import ClientBanned, EngineError, MeshBusy, MeshError, ModelBusy, RateLimited
from sharedllm.tool_calls import ToolError, Tools, prepare

logger = logging.getLogger(__name__)

CONTEXT_LENGTH_EXCEEDED = "exceed context window"  # llama-cpp-python's ValueError for a prompt longer than n_ctx
MAX_RETRY_AFTER = 60  # seconds; the openai package honours Retry-After up to 60 s


# --- errors ------------------------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered as an OpenAI error object with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The OpenAI error object, with this error's status and headers."""
        return _error_response(self.status, self.message, type=self.type, param=self.param, code=self.code,
                               headers=self.headers)


def _error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, type, param, code), status_code=status, headers=headers)


def _status_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def map_exception(exc: BaseException, *, param: str) -> APIError:
    """Turn what the model raised into the OpenAI error a client should see (``param``: the prompt's field)."""
    if isinstance(exc, ValueError):  # llama-cpp-python's own argument checks, forwarded by the engine
        if CONTEXT_LENGTH_EXCEEDED in str(exc):
            return APIError(400, f"This model's maximum context length is exceeded: {exc}. Shorten the {param} or "
                            "lower max_tokens.", param=param, code="context_length_exceeded")
        return APIError(400, str(exc) or "invalid request")
    if isinstance(exc, RateLimited):  # the mesh's per-client limits
        retry = str(max(1, min(MAX_RETRY_AFTER, math.ceil(exc.retry_after))))
        return APIError(429, f"Rate limit reached: {exc}", type="requests", code="rate_limit_exceeded",
                        headers={"Retry-After": retry})
    if isinstance(exc, ClientBanned):  # the mesh's operator banned the server's client: no retry helps
        return APIError(403, f"This server cannot use the mesh: {exc}", type="permission_error",
                        code="client_banned")
    if isinstance(exc, ModelBusy):  # every sequence of the model runs and its own queue is full
        return APIError(429, f"The model is busy: {exc}", type="requests", code="rate_limit_exceeded",
                        headers={"Retry-After": "2"})
    if isinstance(exc, MeshBusy):  # a lost machine, and the rest of the mesh is leased by other sessions
        return APIError(503, f"the mesh is busy: {exc}", type="server_error", code="mesh_busy",
                        headers={"Retry-After": "10"})
    if isinstance(exc, EngineError):
        return APIError(503, f"the model's engine failed: {exc}. The server cannot answer until it is restarted with "
                        "the model loaded again.", type="server_error", code="engine_failed")
    if isinstance(exc, MeshError):
        return APIError(503, f"the mesh cannot serve the model now: {exc}", type="server_error", code="mesh_error",
                        headers={"Retry-After": "5"})
    logger.error("unexpected error from the model", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


# --- the request queue -------------------------------------------------------------------------------------------


class QueueFull(Exception):
    """No room left in the request queue."""

    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


class QueueTimeout(Exception):
    """A request waited longer than the queue timeout."""

    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after}s")
        self.retry_after = retry_after


class Slot:
    """The right to use the engine, held by one request; ``release()`` is idempotent and must run on the loop."""

    __slots__ = ("_queue", "_released", "started", "waited")

    def __init__(self, queue: RequestQueue, waited: bool = False):
        self._queue = queue
        self._released = False
        self.started = time.monotonic()
        self.waited = waited  # whether it came after a wait in the queue

    def release(self) -> None:
        """Give the engine to the next request in line (or back to the queue); a second call does nothing."""
        if not self._released:
            self._released = True
            self._queue._release(time.monotonic() - self.started)


class RequestQueue:
    """A bounded queue in front of a model that serves ``concurrency`` requests at once (its ``parallel``
    sequences, over all its replicas).

    ``acquire(client)`` returns a ``Slot`` at once when a sequence is free, else waits in line; ``QueueFull`` when
    ``max_queue`` requests already wait, ``QueueTimeout`` after ``timeout`` seconds of waiting. A freed slot goes to
    the waiting clients in turn (round robin; first come first served within one client): a client that sends many
    requests at once cannot keep the others waiting behind all of them. Asyncio only: every method runs on the
    event loop.
    """

    def __init__(self, max_queue: int, timeout: float, concurrency: int = 1):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if not timeout > 0:
            raise ValueError(f"queue_timeout must be > 0 seconds, got {timeout}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.max_queue = max_queue
        self.timeout = timeout
        self.concurrency = concurrency
        self._free = concurrency
        self._waiters: dict[str, collections.deque[asyncio.Future]] = {}  # client -> its requests in line
        self._turns: collections.deque[str] = collections.deque()  # the clients with requests in line, in turn
        self._service_s = 2.0  # moving average of how long a request holds the engine, for Retry-After
        self.served = 0
        self.rejected = 0
        self.timed_out = 0

    @property
    def running(self) -> int:
        """Requests holding the engine now."""
        return self.concurrency - self._free

    @property
    def waiting(self) -> int:
        """Requests waiting in line."""
        return sum(1 for line in self._waiters.values() for f in line if not f.done())

    def retry_after(self) -> int:
        """Seconds until a new request would likely be served: the queue ahead of it times the mean service time."""
        ahead = self.waiting + self.running
        return max(1, min(MAX_RETRY_AFTER, math.ceil(self._service_s * ahead / self.concurrency)))

    async def acquire(self, client: str = "") -> Slot:
        """Wait for a sequence of the model, clients in turn; ``QueueFull`` or ``QueueTimeout`` instead of waiting
        long."""
        if self._free > 0 and not self.waiting:
            self._free -= 1
            return Slot(self)
        if self.waiting >= self.max_queue:
            self.rejected += 1
            raise QueueFull(self.retry_after())
        fut = asyncio.get_running_loop().create_future()
        line = self._waiters.setdefault(client, collections.deque())
        if not line:
            self._turns.append(client)
        line.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                Slot(self).release()  # the slot came just as we gave up: hand it on
            else:
                fut.cancel()
            with contextlib.suppress(ValueError):
                line.remove(fut)
            if not line and self._waiters.get(client) is line:
                del self._waiters[client]
                with contextlib.suppress(ValueError):
                    self._turns.remove(client)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self.timed_out += 1
            raise QueueTimeout(self.retry_after()) from None
        return Slot(self, waited=True)

    def _release(self, held_s: float) -> None:
        self.served += 1
        self._service_s = 0.8 * self._service_s + 0.2 * held_s
        while self._turns:
            client = self._turns.popleft()
            line = self._waiters.get(client) or collections.deque()
            while line:
                fut = line.popleft()
                if not fut.done():
                    if line:
                        self._turns.append(client)  # its next request waits for its next turn
                    else:
                        del self._waiters[client]
                    fut.set_result(None)  # the slot passes straight to the next client in line
                    return
            self._waiters.pop(client, None)
        self._free += 1


# --- streaming: a generation thread bridged to the event loop ----------------------------------------------------


class _Threads:
    """Daemon threads for generations, kept for the next request.

    ``Thread.start()`` waits until the new thread runs: on every streamed request the event loop would pay for that
    hand-over of the GIL, in the time to the first token. A kept thread only needs waking.
    """

    def __init__(self, name: str):
        self._name = name
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job that no submitted job has claimed yet

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.put(job)
            if self._idle > 0:
                self._idle -= 1
                return
        threading.Thread(target=self._work, name=self._name, daemon=True).start()

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                job()
            except BaseException:
                logger.exception("a generation thread failed")
            with self._lock:
                self._idle += 1


class _Generation:
    """A streamed generation whose chunks the response takes in the event loop: ``next()``, ``ready()``.

    Subclasses run it: in a thread for a model with a blocking API, or as a task of the event loop for a model with
    an asyncio one. Either way, ``cancel()`` stops the generation in the engine, and the slot is released only when
    the engine is free again.
    """

    def __init__(self, slot: Slot):
        self._slot = slot
        self._items: asyncio.Queue = asyncio.Queue()
        self.chunks = 0
        self.finished = threading.Event()

    def accepted(self) -> None:
        """The model checked the request and starts on the prompt (``on_accepted``, see ``MeshModel``)."""
        self._put(("accepted", None))

    def _put(self, item: tuple) -> None:
        self._items.put_nowait(item)

    async def next(self) -> tuple[str, Any]:
        return await self._items.get()

    def ready(self) -> tuple[str, Any] | None:
        """The next item if it has come already, else None."""
        try:
            return self._items.get_nowait()
        except asyncio.QueueEmpty:
            return None

    def start(self) -> None:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


class _ThreadGeneration(_Generation):
    """Runs a model's blocking stream in a thread and hands each chunk to the event loop as it comes.

    The thread owns the model's iterator from start to end (a generator cannot be closed from another thread while
    it runs). ``cancel()`` makes it close the iterator after the chunk in flight, which cancels the generation in the
    engine.
    """

    def __init__(self, start: Callable[[], Iterator[dict]], slot: Slot, threads: _Threads):
        super().__init__(slot)
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self._start, self._threads = start, threads

    def start(self) -> None:
        self._threads.submit(self._run)

    def _run(self) -> None:
        try:
            it = self._start()
            try:
                for chunk in it:
                    self.chunks += 1
                    self._put(("chunk", chunk))
                    if self._stop.is_set():
                        break
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            self._put(("done", None))
        except BaseException as exc:
            self._put(("error", exc))
        finally:
            self._call(self._slot.release)
            self.finished.set()

    def _put(self, item: tuple) -> None:
        self._call(self._items.put_nowait, item)

    def _call(self, fn: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            pass

    def cancel(self) -> None:
        self._stop.set()


class _TaskGeneration(_Generation):
    """Runs a model's asyncio stream (``MeshModel.acreate_*``) as a task of the event loop.

    The chunks go from the engine's pipe to the response with no thread in between: on a machine whose cores are
    busy with the model, each hand-over from one thread to another waits for a core, in every token's latency.
    ``cancel()`` cancels the task; its stream then cancels the generation in the engine before the slot is released.
    """

    def __init__(self, start: Callable[[], Awaitable[AsyncIterator[dict]]], slot: Slot):
        super().__init__(slot)
        self._start = start
        self._task: asyncio.Future | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            stream = await self._start()
            try:
                async for chunk in stream:
                    self.chunks += 1
                    self._put(("chunk", chunk))
            finally:
                await stream.aclose()
            self._put(("done", None))
        except asyncio.CancelledError:
            self._put(("done", None))  # the response ended and cancelled us: nobody reads this
        except Exception as exc:
            self._put(("error", exc))
        finally:
            self._slot.release()
            self.finished.set()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _role_only(chunk: dict) -> bool:
    """A chat chunk whose delta names the role and nothing else (no text, no end)."""
    choices = chunk.get("choices") or []
    return (chunk.get("object") == "chat.completion.chunk" and len(choices) == 1
            and set(choices[0].get("delta") or {}) == {"role"} and not choices[0].get("finish_reason"))


def _mergeable(chunk: dict) -> bool:
    """A chat chunk of one choice whose delta has no role of its own: the role chunk's delta can join it."""
    choices = chunk.get("choices") or []
    return (chunk.get("object") == "chat.completion.chunk" and len(choices) == 1
            and isinstance(choices[0].get("delta"), dict) and "role" not in choices[0]["delta"])


def _usage(req: _Request) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options: {"include_usage": true}``)."""
    return bool(req.stream and (req.stream_options or {}).get("include_usage"))


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _last_event(kind: str, value: Any, param: str) -> bytes:
    """The event that ends a stream: ``[DONE]``, or the error in-band (the status line has gone out), as OpenAI does."""
    if kind == "done":
        return b"data: [DONE]\n\n"
    err = map_exception(value, param=param)
    return _sse(_error_body(err.message, err.type, err.param, err.code))


class _EventStream(Response):
    """Server-sent events; however the response ends (done, error, client gone), the generation is cancelled.

    A bare ASGI response rather than Starlette's ``StreamingResponse``, which runs an anyio task group per response
    (to watch for a disconnect beside the stream): ~0.2-0.3 ms more to the first event, measured with uvicorn here.
    One asyncio task watches for the disconnect instead.
    """

    media_type = "text/event-stream"

    def __init__(self, generation: _Generation, first: dict | None, param: str, include_usage: bool = False):
        self._generation = generation
        self._include_usage = include_usage
        self._body = self._events(first, param)
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # no body: no Content-Length

    async def _events(self, first: dict | None, param: str) -> AsyncIterator[bytes]:
        # Chunks that came together leave in one write; a chunk with text is never held back waiting for the next.
        # A chat's first chunk carries only the role (llama-cpp-python sends it together with the first token): it
        # goes out in the first token's delta, one event less for the client to parse before the first text.
        if first is None:  # the headers went out when the model accepted the request; the first chunk comes now
            kind, first = await self._generation.next()
            if kind != "chunk":
                yield _last_event(kind, first, param)
                return
        pending = None  # an item taken early, to go next
        if _role_only(first):
            kind, value = pending = await self._generation.next()
            if kind == "chunk" and _mergeable(value):
                value["choices"][0]["delta"] = {**first["choices"][0]["delta"], **value["choices"][0]["delta"]}
                first, pending = value, None
        batch = [self._sse(first)]
        while True:
            item, pending = pending or self._generation.ready(), None
            if item is None:
                if batch:
                    yield b"".join(batch)
                    batch = []
                item = await self._generation.next()
            kind, value = item
            if kind == "chunk":
                batch.append(self._sse(value))
                continue
            batch.append(_last_event(kind, value, param))
            yield b"".join(batch)
            return

    def _sse(self, chunk: dict) -> bytes:
        """The chunk's event; the engine puts the request's usage on its last chunk: with ``include_usage`` it
        follows in a chunk of its own, with no choices (OpenAI's ``stream_options``), else it is left out."""
        usage = chunk.pop("usage", None)
        if not (usage and self._include_usage):
            return _sse(chunk)
        tail = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        return _sse(chunk) + _sse({**tail, "choices": [], "usage": usage})

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self._body:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self._generation.cancel()

    async def _cancel_on_disconnect(self, receive) -> None:
        # The client hung up: stop generating (the stream then ends after the chunk in flight; the server drops what
        # is sent to a closed connection).
        await _disconnected(receive)
        self._generation.cancel()


# --- request and response schemas --------------------------------------------------------------------------------


class _Request(BaseModel):
    # Fields of the OpenAI API this server does not use (user, metadata, store, service_tier...) are accepted and
    # ignored, as clients send them freely.
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The model id, as listed by GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences where generation stops.")
    stream: bool | None = Field(False, description="Answer with server-sent events, one per token.")
    stream_options: dict[str, Any] | None = Field(
        None, description="{\"include_usage\": true}: a last chunk, before [DONE], with the usage and no choices.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) to a bias from -100 to 100.")
    n: int | None = Field(1, ge=1, le=1, description="Only 1 is supported.")
    # llama.cpp sampling extensions, as llama.cpp's own server names them.
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    # Below 0.5 the penalty rewards repetition so much that byte-fallback tokens repeat, and llama-cpp-python then
    # generates past max_tokens while its text is incomplete UTF-8: the engine is stuck until the context is full.
    repeat_penalty: float | None = Field(None, ge=0.5, le=2.0)


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, or token ids; a list of several prompts is not supported.")
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class JSONSchemaFormat(BaseModel):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="llama-cpp-python's json_object schema")


class ChatCompletionRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(
        None, description="Functions the model may call (sharedllm.tool_calls: any chat model, through its template).")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"auto" (with tools, the default), "none", "required" or {"type": "function", "function": '
                          '{"name": ...}}; "required" and a named function hold the answer to a call by a grammar.')
    parallel_tool_calls: bool | None = Field(
        None, description="true: an answer may call several functions; else one (as llama-server's default).")
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated by OpenAI: use tools.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sharedllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "failed"]
    model: str
    running: int
    waiting: int
    max_queue: int
    error: str | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Any | None = None
    finish_reason: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens found in the engine's prompt cache (not read again)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description='[{"id", "type": "function", "function": {"name", "arguments": a JSON string}}]')


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Any | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


def _responses(ok: type[BaseModel] | None, *, stream: bool = False, errors: tuple[int, ...] = ()) -> dict:
    out: dict[int | str, dict] = {}
    if ok is not None:
        out[200] = {"model": ok}
        if stream:
            out[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
            out[200]["description"] = "The answer; with stream=true, server-sent events of chunks, then [DONE]."
    descriptions = {400: "Invalid request (malformed JSON, bad parameters, prompt longer than the context)",
                    401: "Missing or wrong API key", 404: "Unknown model", 429: "The request queue is full",
                    503: "Waited too long in the queue, or the engine failed"}
    for status in errors:
        out[status] = {"model": ErrorResponse, "description": descriptions[status]}
    return out


# --- translating requests to llama-cpp-python keyword arguments -------------------------------------------------


_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
             "frequency_penalty")


def _common_kwargs(req: _Request, n_vocab: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {k: v for k in _SAMPLING if (v := getattr(req, k)) is not None}
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        if len(stops) > 4:
            raise APIError(400, "stop takes at most 4 sequences", param="stop")
        kw["stop"] = stops
    if req.seed is not None:
        kw["seed"] = req.seed & 0xFFFFFFFF  # llama.cpp seeds are 32-bit
    if req.logit_bias:
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            tok = _int_or_none(key)
            if tok is None or tok < 0 or (n_vocab is not None and tok >= n_vocab):
                raise APIError(400, f"logit_bias key {key!r} is not a token id of this model"
                               + (f" (0 to {n_vocab - 1})" if n_vocab else ""), param="logit_bias")
            bias[tok] = value
        kw["logit_bias"] = bias
    return kw


def _int_or_none(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def _prompt(prompt: str | list, n_vocab: int | None) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported; send the prompts as separate requests",
                           param="prompt")
        return _prompt(prompt[0], n_vocab)
    if not prompt:
        raise APIError(400, "prompt is an empty list of tokens", param="prompt")
    bad = [t for t in prompt if t < 0 or (n_vocab is not None and t >= n_vocab)]
    if bad:
        raise APIError(400, f"prompt has token ids outside this model's vocabulary: {bad[:5]}", param="prompt")
    return list(prompt)


def completion_kwargs(req: CompletionRequest, model_id: str, n_vocab: int | None) -> dict[str, Any]:
    """``create_completion`` keyword arguments for ``req``; only what the client set, as the Python API would get."""
    if req.best_of not in (None, 1) or req.n not in (None, 1):
        raise APIError(400, "only n=1 and best_of=1 are supported", param="n")
    kw = _common_kwargs(req, n_vocab)
    kw["prompt"] = _prompt(req.prompt, n_vocab)
    for k in ("suffix", "echo", "logprobs"):
        if (v := getattr(req, k)) is not None:
            kw[k] = v
    kw["model"] = model_id
    return kw


def _message(m: ChatMessage) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    role = "system" if m.role == "developer" else m.role  # newer OpenAI clients call the system prompt "developer"
    out: dict[str, Any] = {"role": role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    for key in ("tool_calls", "tool_call_id"):  # an assistant's calls, and the call a tool message answers
        if (value := (m.model_extra or {}).get(key)) is not None:
            out[key] = value
    return out


def chat_kwargs(req: ChatCompletionRequest, model_id: str, n_vocab: int | None) -> tuple[dict[str, Any], Tools | None]:
    """``create_chat_completion`` keyword arguments for ``req`` (the chat template is the model's, from the GGUF
    metadata), and the tools it offers the model, which read the answer back (:mod:`sharedllm.tool_calls`)."""
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    kw = _common_kwargs(req, n_vocab)
    if req.max_tokens is None and req.max_completion_tokens is not None:
        kw["max_tokens"] = req.max_completion_tokens
    kw["messages"] = [_message(m) for m in req.messages]
    if req.logprobs:
        kw["logprobs"] = True
        if req.top_logprobs is not None:
            kw["top_logprobs"] = req.top_logprobs
    rf = req.response_format
    if rf is not None and rf.type != "text":
        schema = rf.json_schema.schema_ if rf.type == "json_schema" and rf.json_schema else rf.schema_
        if rf.type == "json_schema" and schema is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        if schema is not None:
            _check_json_schema(schema)
            kw["response_format"] = {"type": "json_object", "schema": schema}
        else:
            kw["response_format"] = {"type": "json_object"}
    kw["model"] = model_id
    for key in ("tools", "tool_choice", "parallel_tool_calls", "functions"):
        if (value := getattr(req, key)) is not None:
            kw[key] = value
    try:
        return prepare(kw)
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


def _check_json_schema(schema: dict) -> None:
    # llama-cpp-python silently falls back to any JSON when it cannot turn a schema into a grammar; say so instead.
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        raise APIError(400, f"response_format schema cannot be turned into a grammar: {type(exc).__name__}: {exc}",
                       param="response_format") from None


# --- authentication ---------------------------------------------------------------------------------------------


class BearerAuth:
    """ASGI middleware: ``/v1/...`` requests need ``Authorization: Bearer KEY`` with one of ``keys``.

    It runs before the body is parsed, so a request without a valid key gets 401 whatever its body.
    """

    def __init__(self, app, keys: Collection[str], prefix: str = "/v1"):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.prefix = prefix

    def _valid(self, header: bytes | None) -> bool:
        if header is None or not header[:7].lower() == b"bearer ":
            return False
        token = header[7:].strip()
        ok = False
        for key in self.keys:  # compare with every key, in constant time
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if self._valid(header):
            return await self.app(scope, receive, send)
        message = ("You didn't provide an API key. Pass it in an Authorization header: Authorization: Bearer KEY."
                   if header is None else "Incorrect API key provided.")
        resp = _error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


# --- the app ----------------------------------------------------------------------------------------------------


def _n_vocab(model: Any) -> int | None:
    fn = getattr(model, "n_vocab", None)
    if callable(fn):
        return int(fn())
    info = getattr(getattr(model, "_engine", None), "info", None) or {}  # MeshModel keeps it with the engine info
    return info.get("n_vocab")


def _client_key(request: Request) -> str:
    """Who sends a request, for taking turns in the queue: a digest of its API key, else its address."""
    auth = request.headers.get("authorization")
    if auth:
        return "key:" + hashlib.sha256(auth.encode()).hexdigest()[:16]
    return "addr:" + (request.client.host if request.client else "")


def create_app(
    model: Any,
    *,
    model_id: str,
    api_keys: Collection[str] = (),
    max_queue: int = 16,
    queue_timeout: float = 60.0,
) -> FastAPI:
    """The FastAPI app serving ``model`` (a loaded ``MeshModel``, or a ``Replicas`` of them) under the id
    ``model_id``.

    ``api_keys``: keys accepted as ``Authorization: Bearer KEY`` on ``/v1``; empty serves without authentication.
    The model serves its ``parallel`` requests at once (1 for a model without that attribute); ``max_queue``:
    requests that may wait beyond them; more get 429. ``queue_timeout``: seconds a request may wait; longer gets
    503. Waiting requests are served clients in turn (a client: its API key, else its address). The model is not
    closed by the app.
    """
    if not model_id:
        raise ValueError("model_id must be a non-empty string")
    if isinstance(api_keys, str):
        raise TypeError("api_keys must be a collection of keys, not one string")
    queue = RequestQueue(max_queue, queue_timeout, concurrency=max(1, int(getattr(model, "parallel", 1) or 1)))
    created = int(time.time())
    n_vocab = _n_vocab(model)
    state: dict[str, Any] = {"failed": None}
    threads = _Threads("sharedllm-openai-stream")

    app = FastAPI(
        title="SharedLLM OpenAI-compatible API",
        version="1",
        description="One GGUF model split across the machines of a SharedLLM mesh, behind the OpenAI API.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.queue = queue
    app.state.model_id = model_id
    app.state.generations = []  # the streamed generations in flight (tests and diagnostics)
    app.state.abandoned = 0  # requests whose client left while they waited in the queue
    if api_keys:
        app.add_middleware(BearerAuth, keys=list(api_keys))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error_response(400, "We could not parse the JSON body of your request. The body must be a JSON "
                                   "object (Content-Type: application/json).")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if param is None:  # the body as a whole: not a JSON object, or not sent as JSON
            return _error_response(400, "The request body must be a JSON object, sent with Content-Type: "
                                   "application/json.")
        return _error_response(400, f"{param}: {first.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
            code = "unknown_url"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            code = "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return _error_response(exc.status_code, message, type=_status_type(exc.status_code), code=code,
                               headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(500, f"internal error: {type(exc).__name__}", type="server_error")

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_id}`.",
                           param="model", code="model_not_found")

    async def admit(request: Request) -> Slot:
        if state["failed"] is not None:
            raise map_exception(state["failed"], param="model")
        try:
            return await queue.acquire(_client_key(request))
        except QueueFull as exc:
            raise APIError(429, f"The server is busy: its queue is full ({queue.waiting} request(s) wait for the "
                           f"model). Retry after {exc.retry_after}s.", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except QueueTimeout as exc:
            raise APIError(503, f"The request waited {queue.timeout:g}s for the model without being served. Retry "
                           f"after {exc.retry_after}s.", type="server_error", code="queue_timeout",
                           headers={"Retry-After": str(exc.retry_after)}) from None

    def failed(exc: BaseException, param: str) -> APIError:
        # The model is unusable from now on (/health says so), unless it says it still serves: replicas serve on
        # while one of them has failed.
        if isinstance(exc, EngineError) and (not hasattr(model, "failure") or model.failure is not None):
            state["failed"] = exc
        return map_exception(exc, param=param)

    async def run(request: Request, method: Callable, kwargs: dict, stream: bool, param: str,
                  include_usage: bool = False, tools: Tools | None = None):
        slot = await admit(request)
        if slot.waited and await request.is_disconnected():  # the client gave up while it waited in the queue
            slot.release()
            app.state.abandoned += 1
            return Response(status_code=499)
        if not stream:
            amethod = getattr(model, f"a{method.__name__}", None)  # MeshModel.acreate_*: cancellable
            try:
                if amethod is None:  # a blocking model: its thread runs to the end whatever the client does
                    out = await run_in_threadpool(lambda: method(**kwargs))
                elif (out := await _unless_disconnected(request, amethod(**kwargs))) is _DISCONNECTED:
                    app.state.abandoned += 1
                    return Response(status_code=499)
            except Exception as exc:
                raise failed(exc, param) from None
            finally:
                slot.release()
            return JSONResponse(tools.completion(out) if tools else out)
        # The status line waits until the model accepted the request (a model that says when: MeshModel), else for
        # the first token: errors before then (bad arguments, a prompt longer than the context, rate limits) get
        # their status code; later ones go in-band.
        extra = {"on_accepted": lambda: gen.accepted()} if getattr(model, "streams_acceptance", False) else {}
        amethod = getattr(model, f"a{method.__name__}", None)  # MeshModel.acreate_*: no thread in between
        if amethod is not None:
            async def start() -> AsyncIterator[dict]:
                chunks = await amethod(**kwargs, stream=True, **extra)
                return tools.achunks(chunks) if tools else chunks

            gen = _TaskGeneration(start, slot)
        else:
            gen = _ThreadGeneration(lambda: (tools.chunks if tools else iter)(method(**kwargs, stream=True, **extra)),
                                    slot, threads)
        app.state.generations.append(gen)
        gen.start()
        try:
            kind, first = await gen.next()
            if kind == "error":
                raise failed(first, param)
            if kind == "done":  # no chunk at all: an empty stream is still a valid one
                return StreamingResponse(iter([b"data: [DONE]\n\n"]), media_type="text/event-stream")
            return _EventStream(gen, first if kind == "chunk" else None, param, include_usage)
        except BaseException:
            gen.cancel()
            raise
        finally:
            _prune(app.state.generations)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["server"])
    async def health() -> JSONResponse:
        """Whether the model can serve, and the queue's state. No API key needed."""
        body = Health(status="failed" if state["failed"] else "ok", model=model_id, running=queue.running,
                      waiting=queue.waiting, max_queue=queue.max_queue,
                      error=str(state["failed"]) if state["failed"] else None)
        return JSONResponse(body.model_dump(), status_code=503 if state["failed"] else 200)

    @app.get("/v1/models", response_model=ModelList, responses=_responses(None, errors=(401,)),
             tags=["openai"])
    async def list_models() -> ModelList:
        """The model this server serves."""
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    @app.get("/v1/models/{model:path}", response_model=ModelCard,
             responses=_responses(None, errors=(401, 404)), tags=["openai"])
    async def retrieve_model(model: str) -> ModelCard:
        """One model by id."""
        check_model(model)
        return ModelCard(id=model_id, created=created)

    @app.post("/v1/completions", tags=["openai"],
              responses=_responses(Completion, stream=True, errors=(400, 401, 404, 429, 503)))
    async def completions(body: CompletionRequest, request: Request):
        """Complete a prompt; ``stream: true`` streams chunks as server-sent events."""
        check_model(body.model)
        kwargs = completion_kwargs(body, model_id, n_vocab)
        return await run(request, model.create_completion, kwargs, bool(body.stream), "prompt", _usage(body))

    @app.post("/v1/chat/completions", tags=["openai"],
              responses=_responses(ChatCompletion, stream=True, errors=(400, 401, 404, 429, 503)))
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Answer a conversation with the model's chat template; ``stream: true`` streams server-sent events."""
        check_model(body.model)
        kwargs, tools = chat_kwargs(body, model_id, n_vocab)
        return await run(request, model.create_chat_completion, kwargs, bool(body.stream), "messages",
                         _usage(body), tools)

    def openapi() -> dict:
        # Validation errors are answered 400 with an OpenAI error object, not FastAPI's 422: say so in the schema.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    if api_keys and path.startswith("/v1"):
                        # BearerAuth checks the key before FastAPI runs: the schema says so here, not with a
                        # Security dependency that would run on every request for nothing.
                        op["security"] = [{"HTTPBearer": []}]
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {"description": "Invalid request",
                                            "content": {"application/json": {
                                                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            if api_keys:
                schema.setdefault("components", {})["securitySchemes"] = {"HTTPBearer": {
                    "type": "http", "scheme": "bearer", "description": "An API key given to `sharedllm serve`"}}
            comps = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                comps.pop(name, None)
            if "ErrorResponse" not in comps:
                comps["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(comps["ErrorResponse"].pop("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


_DISCONNECTED = object()


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, unless the client hangs up first: then cancel it (``MeshModel.acreate_*`` stops generating in
    the engine and waits until the engine is idle) and return ``_DISCONNECTED``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # the engine is idle again before the slot goes to the next request
    if task.cancelled():
        return _DISCONNECTED
    return task.result()


async def _disconnected(receive) -> None:
    """Return when the client has hung up (the request's body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _prune(gens: list[_Generation]) -> None:
    gens[:] = [g for g in gens if not g.finished.is_set()]


# --- running it -----------------------------------------------------------------------------------------------------


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port=0``: any free port) for uvicorn's ``sockets=``.

    It is made with ``IPPROTO_TCP`` and ``TCP_NODELAY``: asyncio disables Nagle's algorithm only on connections of
    sockets that name their protocol, and with it on, each server-sent event after the headers would wait for the
    client's delayed ACK (40 ms on Linux). It listens at once: a client that connects before the server has started
    (``sharedllm serve`` prints its URL first) waits in the backlog instead of being refused.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)  # uvicorn's default backlog; it listens again with its own when it starts
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """Serve an ASGI app with uvicorn in a background thread (tests, benchmarks): ``with ServerThread(app) as s:``.

    ``port=0`` picks a free port; ``s.url`` is the base URL once started.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any):
        import uvicorn

        self._sock = listen_socket(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        config.setdefault("log_level", "warning")
        self.server = uvicorn.Server(uvicorn.Config(app, **config))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="sharedllm-openai-server", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


__all__ = ["APIError", "BearerAuth", "ChatCompletionRequest", "CompletionRequest", "QueueFull", "QueueTimeout",
           "RequestQueue", "ServerThread", "create_app", "listen_socket"]
