# SPDX-License-Identifier: AGPL-3.0-or-later
"""Server-sent events: a generation (a thread's or the event loop's) bridged to the response."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from sharedllm.openai_server.admission import Slot
from sharedllm.openai_server.errors import error_body, map_exception

logger = logging.getLogger(__name__)


class Threads:
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


class ThreadGeneration(_Generation):
    """Runs a model's blocking stream in a thread and hands each chunk to the event loop as it comes.

    The thread owns the model's iterator from start to end (a generator cannot be closed from another thread while
    it runs). ``cancel()`` makes it close the iterator after the chunk in flight, which cancels the generation in the
    engine.
    """

    def __init__(self, start: Callable[[], Iterator[dict]], slot: Slot, threads: Threads):
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


class TaskGeneration(_Generation):
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


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _last_event(kind: str, value: Any, param: str) -> bytes:
    """The event that ends a stream: ``[DONE]``, or the error in-band (the status line has gone out), as OpenAI does."""
    if kind == "done":
        return b"data: [DONE]\n\n"
    err = map_exception(value, param=param)
    return _sse(error_body(err.message, err.type, err.param, err.code))


class EventStream(Response):
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



DISCONNECTED = object()


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``, unless the client hangs up first: then cancel it (``MeshModel.acreate_*`` stops generating in
    the engine and waits until the engine is idle) and return ``DISCONNECTED``."""
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
        return DISCONNECTED
    return task.result()


async def _disconnected(receive) -> None:
    """Return when the client has hung up (the request's body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def prune(gens: list[_Generation]) -> None:
    gens[:] = [g for g in gens if not g.finished.is_set()]
