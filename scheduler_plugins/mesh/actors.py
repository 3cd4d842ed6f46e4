# SPDX-License-Identifier: AGPL-3.0-or-later
"""The scheduler's calls to the machines' actors, over each worker's own connection to the scheduler.

A worker opens its connection to the scheduler and keeps it (Dask's batched stream); the scheduler never opens one to
a worker here, so a machine behind a NAT, whose worker's port nobody can reach, is pinned and driven like any other.
A call is a message on that stream (``sharedllm-actor``: a call id, the machine, the method and its arguments) and
its answer comes back on it (``sharedllm-actor-reply``, matched by id and by the worker it came from). The worker's
side is :meth:`sharedllm.machine.agent.MachineAgent.on_actor_call`. Messages are msgpack: plain dicts, lists, strings
and numbers only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

from sharedllm.machine.actor import CALL, REPLY

logger = logging.getLogger("sharedllm.scheduler")



class ActorError(RuntimeError):
    """An actor's method raised on its worker (the message says what)."""


class ActorChannel:
    """The scheduler's end of every actor call: sends them on the workers' streams, matches their answers."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self._calls: dict[int, tuple[str, asyncio.Future]] = {}
        self._ids = itertools.count(1)
        scheduler.stream_handlers[REPLY] = self._reply

    async def call(self, worker: str, machine: str, method: str, timeout: float, **kwargs: Any) -> Any:
        """``method(**kwargs)`` of the actor of ``machine`` on ``worker``; ``ConnectionError`` when the worker is gone
        (or leaves before it answers), ``TimeoutError`` after ``timeout`` seconds, ``ActorError`` when it raised."""
        stream = self.scheduler.stream_comms.get(worker)
        if stream is None or stream.closed():
            raise ConnectionError(f"worker {worker} of machine {machine} is not connected")
        call = next(self._ids)
        done = asyncio.get_running_loop().create_future()
        self._calls[call] = (worker, done)
        try:
            stream.send({"op": CALL, "call": call, "machine": machine, "method": method, "kwargs": kwargs})
            return await asyncio.wait_for(done, timeout)
        finally:
            self._calls.pop(call, None)

    def _reply(self, worker: str | None = None, call: int | None = None, ok: bool = False, result: Any = None,
               error: str | None = None, **_: Any) -> None:
        entry = self._calls.get(call)
        if entry is None or entry[0] != worker or entry[1].done():
            return  # late (timed out), or from another worker than the one called: not an answer
        if ok:
            entry[1].set_result(result)
        else:
            entry[1].set_exception(ActorError(error or "the actor failed"))

    def worker_left(self, worker: str) -> None:
        """``worker`` left: its calls in flight fail now instead of at their timeout."""
        for w, done in list(self._calls.values()):
            if w == worker and not done.done():
                done.set_exception(ConnectionError(f"worker {worker} left"))


class ActorRef:
    """The actor of one machine, pinned on one of its workers: what the plugin calls."""

    def __init__(self, channel: ActorChannel, worker: str, machine: str, timeout: float = 90.0):
        self.channel, self.worker, self.machine, self.timeout = channel, worker, machine, timeout

    def _call(self, method: str, **kwargs: Any):
        return self.channel.call(self.worker, self.machine, method, self.timeout, **kwargs)

    async def pin(self) -> dict:
        """Create the actor on its worker (a worker of another machine refuses)."""
        return await self._call("pin")

    async def start(self, relay_key: str | None = None, hub: dict | None = None) -> dict:
        return await self._call("start", relay_key=relay_key, hub=hub)

    async def set_lease(self, lease: str | None, seq: int) -> dict:
        return await self._call("set_lease", lease=lease, seq=seq)

    async def maintain_cache(self) -> dict:
        return await self._call("maintain_cache")

    async def status(self) -> dict:
        return await self._call("status")

    async def stop(self) -> dict:
        return await self._call("stop")
