# SPDX-License-Identifier: AGPL-3.0-or-later
"""One implementation for the blocking and the asyncio API.

A behaviour is written once, as a generator (a *core*) that yields a :class:`Wait` wherever it must wait for
something (a frame from a pipe, an answer from the scheduler, a recovery) and gets the outcome back from ``yield``
(the value, or the exception raised at the ``yield``). Two small drivers run a core: :func:`run` blocks the caller's
thread on each wait, :func:`arun` awaits each one in the running event loop. A streamed core also yields the items
it produces (anything that is not a :class:`Wait`); :func:`iterate` and :func:`aiterate` hand them to the caller.

Neither driver adds a thread between the caller and what it waits for: a blocking stream reads the engine's pipe in
the caller's own thread, an asyncio stream in the event loop, as before the two were one (a hand-over between threads
costs a wake-up, and on a small host a free core). Closing a stream early (``close``/``aclose``, a ``break``, a
cancelled task) runs the core's ``finally`` blocks, as it would run a plain generator's.

    def _answer(self, question):                     # the core
        reply = yield self.link.asking(question)      # a Wait: blocks, or awaits
        return reply.upper()

    def answer(self, question):  return effects.run(self._answer(question))
    async def aanswer(self, question):  return await effects.arun(self._answer(question))
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

Core = Generator[Any, Any, T]  # yields Waits (and, for a stream, items); returns the result


class Wait:
    """Something a core waits for, done either way: ``block()`` in the calling thread, or ``await wait()``."""

    __slots__ = ("block", "wait")

    def __init__(self, block: Callable[[], Any], wait: Callable[[], Awaitable[Any]]):
        self.block = block
        self.wait = wait


def in_thread(fn: Callable[..., T], *args: Any, shield: bool = False) -> Wait:
    """Wait for ``fn(*args)``: called in the caller's thread by the blocking driver, in a worker thread by the asyncio
    one (work that blocks: the network, a reload). ``shield``: a cancelled task still waits for ``fn`` to end (it
    cannot be stopped half-way, a recovery say) before the cancellation goes on."""

    def wait() -> Awaitable[Any]:
        work = asyncio.to_thread(fn, *args)
        return to_the_end(work) if shield else work

    return Wait(lambda: fn(*args), wait)


def done(value: Any = None) -> Wait:
    """A wait that is already over (``value``): for a core whose wait turns out not to be needed."""

    async def wait() -> Any:
        return value

    return Wait(lambda: value, wait)


async def to_the_end(work: Awaitable[T]) -> T:
    """Await ``work`` to its end even if the awaiting task is cancelled meanwhile (then re-raise the cancellation)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
        raise


END = object()  # the end of a stream: what :meth:`Nested.next` (and a driver's step) returns when it has ended


def _step(core: Core, value: Any, error: BaseException | None) -> Any:
    return core.throw(error) if error is not None else core.send(value)


class _Driven:
    """A core as a driver runs it: :meth:`next` resumes it with what its last wait gave (``END`` at its end, its
    result in ``result``); :meth:`settle` keeps a wait's outcome for the next resume. The four drivers below differ
    only in how they wait."""

    def __init__(self, core: Core[Any]):
        self.core = core
        self.result: Any = None
        self._outcome: tuple[Any, BaseException | None] = (None, None)

    def next(self) -> Any:
        (value, error), self._outcome = self._outcome, (None, None)
        try:
            return _step(self.core, value, error)
        except StopIteration as stop:
            self.result = stop.value
            return END

    def settle(self, outcome: tuple[Any, BaseException | None]) -> None:
        self._outcome = outcome

    def close(self) -> None:
        self.core.close()


def _blocked(wait: Wait) -> tuple[Any, BaseException | None]:
    try:
        return wait.block(), None
    except BaseException as exc:  # into the core, whose handlers (or finally blocks) take it
        return None, exc


async def _awaited(wait: Wait) -> tuple[Any, BaseException | None]:
    try:
        return await wait.wait(), None
    except BaseException as exc:
        return None, exc


def run(core: Core[T]) -> T:
    """Run ``core`` to its result, blocking the calling thread on each of its waits."""
    driven = _Driven(core)
    while (wait := driven.next()) is not END:
        driven.settle(_blocked(wait))
    return driven.result


async def arun(core: Core[T]) -> T:
    """Run ``core`` to its result, awaiting each of its waits in the running event loop."""
    driven = _Driven(core)
    while (wait := driven.next()) is not END:
        driven.settle(await _awaited(wait))
    return driven.result


def iterate(core: Core[Any]) -> Iterator[Any]:
    """The items a streamed ``core`` yields, blocking the calling thread on each of its waits."""
    with contextlib.closing(_Driven(core)) as driven:
        while (item := driven.next()) is not END:
            if isinstance(item, Wait):
                driven.settle(_blocked(item))
            else:
                yield item


async def aiterate(core: Core[Any]) -> AsyncIterator[Any]:
    """The items a streamed ``core`` yields, awaiting each of its waits in the running event loop."""
    with contextlib.closing(_Driven(core)) as driven:
        while (item := driven.next()) is not END:
            if isinstance(item, Wait):
                driven.settle(await _awaited(item))
            else:
                yield item


def each(items: Iterable[Any]) -> Core[None]:
    """A streamed core of a plain iterable's items (closed with the core)."""
    try:
        yield from items
    finally:
        if (close := getattr(items, "close", None)) is not None:
            close()


def aeach(items: AsyncIterator[Any]) -> Core[None]:
    """A streamed core of an async iterator's items, for the asyncio driver. Closed early, the iterator is closed
    in the background (a closing core cannot wait)."""
    ended = False
    try:
        while True:
            try:
                item = yield Wait(_asyncio_only, items.__anext__)
            except StopAsyncIteration:
                ended = True
                return
            yield item
    finally:
        if not ended and (aclose := getattr(items, "aclose", None)) is not None:
            asyncio.get_running_loop().create_task(aclose())


def _asyncio_only() -> Any:
    raise RuntimeError("an async iterator can only be read by the asyncio driver (aiterate)")


class Nested:
    """A streamed core read item by item from inside another core: ``item = yield from nested.next()`` passes the
    nested core's waits up to whichever driver runs the outer one and returns its next item (``END`` at its end).
    Closing the outer core closes the nested one."""

    def __init__(self, core: Core[Any]):
        self.core = core

    def next(self) -> Generator[Wait, Any, Any]:
        value, error = None, None
        while True:
            try:
                item = _step(self.core, value, error)
            except StopIteration:
                return END
            if not isinstance(item, Wait):
                return item
            try:
                value, error = (yield item), None
            except BaseException as exc:  # the wait failed, or the outer core is being closed (GeneratorExit)
                value, error = None, exc

    def close(self) -> None:
        self.core.close()
