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

_HEADER = struct.Struct("<I")


def _write_frame(fd: int, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = _HEADER.pack(len(data)) + data
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


class _FrameReader:
    """Reads frames from a pipe with an optional deadline; ``EOFError`` when the other side is gone.

    ``read`` blocks its thread; ``aread`` waits in the running event loop (no thread between the pipe and the loop).
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

    def read(self, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (msg := self._take()) is _NO_FRAME:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                    raise TimeoutError
            self._append(os.read(self.fd, 65536))
        return msg

    async def aread(self, timeout: float | None = None) -> Any:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (msg := self._take()) is _NO_FRAME:
            readable = loop.create_future()
            loop.add_reader(self.fd, _resolve, readable)
            try:
                await asyncio.wait_for(readable, None if deadline is None else max(deadline - time.monotonic(), 0))
            finally:
                loop.remove_reader(self.fd)
            self._append(os.read(self.fd, 65536))  # readable: returns at once
        return msg

    def ready(self) -> bool:
        return len(self.buf) >= _HEADER.size or bool(select.select([self.fd], [], [], 0)[0])


_NO_FRAME = object()


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
