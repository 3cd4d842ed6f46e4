# SPDX-License-Identifier: AGPL-3.0-or-later
"""The user port's wire format, shared by the scheduler's listener and the client: typed JSON messages, each a frame
of a 4-byte big-endian length and UTF-8 JSON. No pickle, no code: a message is data, and the scheduler reads only the
fields each operation declares. No Dask.

A connection starts with the handshake (the scheduler's ``hello`` with its nonce; the client's key id, nonce and
proof, or a request to be anonymous; the scheduler's answer, with its own proof), then carries requests
``{"id": N, "op": NAME, "args": {...}}`` answered ``{"id": N, "result": ...}``, ``{"id": N, "refusal": {...}}`` (an
expected refusal, as :func:`sharedllm.errors.to_refusal` writes it) or ``{"id": N, "error": "..."}``.
"""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

PROTOCOL = 1
MAX_FRAME = 64 << 20  # bytes; the mesh state of thousands of machines fits many times over
HANDSHAKE_FRAME = 4096  # bytes a peer may send before it is authenticated
_HEADER = struct.Struct(">I")


class WireError(ConnectionError):
    """The peer broke the protocol (a frame too large, not JSON, not an object) or closed the connection."""


def encode(message: dict) -> bytes:
    data = json.dumps(message, separators=(",", ":"), default=_plain).encode()
    if len(data) > MAX_FRAME:
        raise WireError(f"a message of {len(data)} bytes is larger than the user port takes ({MAX_FRAME})")
    return _HEADER.pack(len(data)) + data


def _plain(value: Any) -> Any:
    """What JSON has no type for: sets and tuples as lists, bytes as hex, anything else as its text."""
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


async def read_message(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> dict:
    """The next message; ``WireError`` for a frame over ``limit``, malformed JSON, or a closed connection."""
    try:
        head = await reader.readexactly(_HEADER.size)
        (size,) = _HEADER.unpack(head)
        if size > limit:
            raise WireError(f"a frame of {size} bytes is larger than allowed here ({limit})")
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise WireError("the connection was closed") from exc
    try:
        message = json.loads(data)
    except ValueError as exc:
        raise WireError("a frame that is not JSON") from exc
    if not isinstance(message, dict):
        raise WireError("a frame that is not a JSON object")
    return message


async def write_message(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(encode(message))
    await writer.drain()
