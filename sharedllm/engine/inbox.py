# SPDX-License-Identifier: AGPL-3.0-or-later
"""A call's inbox in the parent: the frames the child sent for it, put by whichever call reads the pipe, taken by the
call's thread or event loop (see :mod:`.process`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading

from sharedllm import effects

END_OF_PIPE = ("eof",)  # put in every inbox when the child's pipe closes


class Inbox:
    """The frames of one call (without their call id), put by the reader thread, taken by the caller's thread or
    by its event loop."""

    def __init__(self):
        self._items: collections.deque[tuple] = collections.deque()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._poked = False

    def put(self, msg: tuple) -> None:
        with self._cond:
            self._items.append(msg)
            self._cond.notify()
            loop, event = self._loop, self._event
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(event.set)

    def _take(self) -> tuple | None:
        if not self._items:
            return None
        msg = self._items.popleft()
        if msg is END_OF_PIPE:
            self._items.appendleft(msg)  # every later read sees the end too
            raise EOFError
        return msg

    def take(self) -> tuple | None:
        """The next frame if one has come (``EOFError`` at the end of the pipe), else None."""
        with self._cond:
            return self._take()

    def wait(self, timeout: float) -> None:
        """Wait until a frame comes or the pipe is handed to this call (``poke``), at most ``timeout`` seconds."""
        with self._cond:
            if not self._items and not self._poked:
                self._cond.wait(timeout)
            self._poked = False

    async def await_(self, timeout: float) -> None:
        """``wait`` in the running event loop."""
        if self._loop is None:
            self._loop, self._event = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            if self._items or self._poked:
                self._poked = False
                return
            self._event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout)
        with self._cond:
            self._poked = False

    def waiting(self, timeout: float) -> effects.Wait:
        """``wait`` (blocking) or ``await_`` (asyncio), for a core (:mod:`sharedllm.effects`)."""
        return effects.Wait(lambda: self.wait(timeout), lambda: self.await_(timeout))

    def poke(self) -> None:
        """Wake the call: the pipe has no reader now, it may take it."""
        with self._cond:
            self._poked = True
            self._cond.notify()
            loop, event = self._loop, self._event
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
