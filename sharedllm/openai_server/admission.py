# SPDX-License-Identifier: AGPL-3.0-or-later
"""Admission: the bounded request queue that serves clients in turn, and its slots."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time

from sharedllm.openai_server.errors import MAX_RETRY_AFTER


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
