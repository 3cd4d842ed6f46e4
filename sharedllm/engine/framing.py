# SPDX-License-Identifier: AGPL-3.0-or-later
"""Length-prefixed pickle frames between the engine's parent and its child, over the child's stdin/stdout."""

from __future__ import annotations

import asyncio
import os
import pickle
import select
import struct
import time
from typing import Any

from sharedllm import effects
from sharedllm.effects import Core

_HEADER = struct.Struct("<I")


def write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = _HEADER.pack(len(data)) + data
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


class FrameReader:
    """Reads frames from a pipe with an optional deadline; ``EOFError`` when the other side is gone.

    ``read`` blocks its thread; ``aread`` waits in the running event loop (no thread between the pipe and the loop);
    both run one core, ``reading``.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()

    def _take(self) -> Any:
        """The next whole frame in the buffer, or ``_NO_FRAME``."""
        if len(self.buf) < _HEADER.size:
            return _NO_FRAME
        (size,) = _HEADER.unpack_from(self.buf)
        if len(self.buf) < _HEADER.size + size:
            return _NO_FRAME
        data = bytes(self.buf[_HEADER.size : _HEADER.size + size])
        del self.buf[: _HEADER.size + size]
        return pickle.loads(data)

    def _append(self, data: bytes) -> None:
        if not data:
            raise EOFError
        self.buf += data

    def reading(self, timeout: float | None = None) -> Core[Any]:
        """The next frame (an :mod:`sharedllm.effects` core): ``TimeoutError`` after ``timeout`` seconds,
        ``EOFError`` when the other side is gone."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (msg := self._take()) is _NO_FRAME:
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not (yield self._readable(left)):
                raise TimeoutError
            self._append(os.read(self.fd, 65536))  # readable: returns at once
        return msg

    def read(self, timeout: float | None = None) -> Any:
        return effects.run(self.reading(timeout))

    async def aread(self, timeout: float | None = None) -> Any:
        return await effects.arun(self.reading(timeout))

    def _readable(self, timeout: float | None) -> effects.Wait:
        """Wait until the pipe is readable (True), at most ``timeout`` seconds (False)."""

        async def wait() -> bool:
            loop = asyncio.get_running_loop()
            readable = loop.create_future()
            loop.add_reader(self.fd, _resolve, readable)
            try:
                await asyncio.wait_for(readable, timeout)
            except asyncio.TimeoutError:
                return False
            finally:
                loop.remove_reader(self.fd)
            return True

        return effects.Wait(lambda: bool(select.select([self.fd], [], [], timeout)[0]), wait)

    def ready(self) -> bool:
        return len(self.buf) >= _HEADER.size or bool(select.select([self.fd], [], [], 0)[0])


_NO_FRAME = object()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
