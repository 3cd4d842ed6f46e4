# SPDX-License-Identifier: AGPL-3.0-or-later
"""llama.cpp's RPC protocol as a client relay reads it: where requests end, and which reply answers which request.

A request is ``| cmd (1 byte) | size (8, little endian) | payload |``; a reply ``| size (8) | payload |``, in the
order of the requests that get one (ggml-rpc.cpp, protocol 7 in llama-cpp-python 0.3.36). A connection serves one
client, in order, and its buffers and tensors are its own.

Three uses, all in the client relay (:func:`sharedllm.relay.wire.splice`):

- :class:`RpcFrames` finds where requests end, so requests that only set state are held and sent with the next one
  that makes the machine work or answer: one TLS burst per step.
- :class:`Prefetch` removes round trips. When a pipeline stage hands its output to the next stage, llama.cpp fetches
  the stage's output tensors one by one (``GET_TENSOR``; a Gemma 3 stage hands over two), and each fetch is a round
  trip on the link, while the same fetches recur at every decode step. The relay learns which fetch follows which
  on its connection and, when a learned fetch is sent, sends the one that followed it last time right behind it. If
  the client's next request on this connection is exactly that fetch, its reply is already on its way (or here) and
  the request never crosses the link; if anything else comes, the early reply is dropped when it arrives.
- :class:`Prefetch` also answers, for a CPU device of the machine, the allocation sizes llama.cpp asks for
  (``GET_ALLOC_SIZE``): its RPC client asks the machine for the size of every matrix product (and a few other ops)
  of a shape it has not seen yet, a round trip each, before the graph of a new prompt length or context size can
  run: 2 to 6 per machine for a new prompt length, on a WAN tens of milliseconds each before the first token. On a
  CPU device the machine's answer is ``ggml_nbytes`` of the tensor as the request describes it (the CPU buffer type
  has no size function of its own; ggml-rpc.cpp ``rpc_server::get_alloc_size``), which the relay computes from the
  same bytes: only for a tensor without a buffer (the machine then asks the device's default buffer type) and of a
  type of one element per block (F32, F16, BF16, I32: what those ops produce), only when no reply is due before it
  (replies keep their order), and only for the devices the engine says are CPUs (:class:`~sharedllm.relay.ClientRelay`
  ``cpu_devices``). Anything else is asked of the machine as before.

Why the early reply is the reply the client would get: a fetch only reads, the machine serves this connection alone
and in order, and the client's very next request on it must be that same fetch (same tensor, offset and size), so
nothing reached the machine between the early fetch and the moment the client asked. Why the early fetch is always
valid on the machine (an invalid one makes the rpc-server drop the connection): it is byte for byte a request the
machine served before on this connection, and every buffer it could point into is still allocated, because
everything learned is forgotten at any ``ALLOC_BUFFER`` or ``FREE_BUFFER``. Only a connection that starts with
``HELLO`` and whose machine answers protocol 7 is prefetched on; any other speaks a protocol this table may not
describe, and its bytes pass untouched.
"""

from __future__ import annotations

import logging
from collections import deque

logger = logging.getLogger("sharedllm.relay")

PROTOCOL_MAJOR = 7
ALLOC_BUFFER, FREE_BUFFER, SET_TENSOR, GET_TENSOR, GRAPH_COMPUTE, HELLO, GRAPH_RECOMPUTE = 0, 4, 6, 8, 10, 14, 16
GET_ALLOC_SIZE = 13
CMD_COUNT = 19  # RPC_CMD_COUNT: a larger command makes the rpc-server drop the connection
# Requests that get no reply in protocol 7: FREE_BUFFER, BUFFER_CLEAR, SET_TENSOR, GRAPH_COMPUTE, INIT_TENSOR,
# GRAPH_RECOMPUTE, MEMSET_TENSOR. Every other command gets exactly one.
NO_REPLY = frozenset({4, 5, 6, 10, 12, 16, 17})
GET_REQUEST = 9 + 296 + 16  # header, rpc_tensor, offset and size
TENSOR = 296  # sizeof(rpc_tensor), packed
ALLOC_SIZE_REQUEST = 9 + 4 + TENSOR * 11  # header, device, the tensor and its GGML_MAX_SRC sources
# Bytes per element of the ggml types of one element per block that an allocation size is answered for here:
# GGML_TYPE_F32, F16, I32, BF16 (ggml.h).
_ELEMENT_BYTES = {0: 4, 1: 2, 26: 4, 30: 2}
PREFETCH_MAX = 192 * 1024  # the largest fetch asked for early: hidden states of a decode step (8 of an 8B), not logits
_LEARNED_MAX = 256

# What becomes of a reply's bytes: to the client, kept (an early reply), dropped (an early reply nobody asked for)
_FORWARD, _KEEP, _DROP, _KEPT = 0, 1, 2, 3


def _fetch_size(req: bytes) -> int:
    """The bytes a tensor fetch asks for: the last field of its request."""
    return int.from_bytes(req[-8:], "little")


def cpu_alloc_size(req: bytes) -> tuple[int, int] | None:
    """``(device, bytes)``: what a CPU device's rpc-server answers to the ``GET_ALLOC_SIZE`` request ``req`` (header
    included), i.e. ``ggml_nbytes`` of its tensor; None when that is not known here (a tensor in a buffer, a type of
    several elements per block, a request of another size)."""
    if len(req) != ALLOC_SIZE_REQUEST or req[0] != GET_ALLOC_SIZE:
        return None
    device = int.from_bytes(req[9:13], "little")
    t = req[13:13 + TENSOR]  # id u64, type u32, buffer u64, ne u32[4], nb u32[4], ...
    element = _ELEMENT_BYTES.get(int.from_bytes(t[8:12], "little"))
    if element is None or any(t[12:20]):
        return None
    ne = [int.from_bytes(t[20 + 4 * i:24 + 4 * i], "little") for i in range(4)]
    nb = [int.from_bytes(t[36 + 4 * i:40 + 4 * i], "little") for i in range(4)]
    if 0 in ne:
        return device, 0
    return device, element + sum((n - 1) * b for n, b in zip(ne, nb, strict=True))


class ProtocolError(ConnectionError):
    """The replies do not match the requests: the relay cannot tell which bytes are whose."""


class RpcFrames:
    """Where llama.cpp's RPC requests end, in the byte stream a client sends. A client relay holds back the requests
    that only set state on the machine (llama.cpp writes each command as three pieces, and a token's inputs as
    several commands) and sends them with the next one that makes the machine work or answer (a graph to compute, a
    tensor to fetch): one TLS burst per step instead of one per write, so the machine's relay and rpc-server wake
    once, and the graph starts as soon as it would have.

    Held (no reply, no work to start): FREE_BUFFER, BUFFER_CLEAR, SET_TENSOR, INIT_TENSOR, MEMSET_TENSOR. Any other
    command, GRAPH_COMPUTE and one unknown here included, ends a burst at once; and nothing is held longer than
    :data:`sharedllm.relay.wire.HOLD_S` (a command that got a reply in a later protocol costs that much, never a
    stall).

    With ``keep``, every complete request is also listed in :attr:`done` as ``(cmd, start, end, request)``: where it
    lies in the buffer fed (positions as passed to :meth:`feed`; ``start`` is -1 when the request began before
    :meth:`rebase`), and the request's bytes when it is a tensor fetch or an allocation size (else None), for
    :class:`Prefetch`.
    """

    HOLD = NO_REPLY - {GRAPH_COMPUTE, GRAPH_RECOMPUTE}  # no reply, and no work for the machine to start
    _KEPT = {(GET_TENSOR, GET_REQUEST), (GET_ALLOC_SIZE, ALLOC_SIZE_REQUEST)}  # (command, size) of the requests kept
    _HEADER = 9

    def __init__(self, keep: bool = False) -> None:
        self._head = bytearray()  # the current request's header so far
        self._left = 0  # payload bytes of the current request still to come
        self._cmd = -1
        self._start = -1
        self._keep = keep
        self._body: bytearray | None = None  # a tensor fetch's request, whole
        self.reply_due = False  # a request that is not held is complete: send it and what was held
        self.done: list[tuple[int, int, int, bytes | None]] = []

    def feed(self, data: memoryview, base: int = 0) -> None:
        """The next bytes of the stream; ``base`` is the position of ``data[0]`` in the caller's buffer."""
        i, n = 0, len(data)
        while i < n:
            if self._left:
                step = min(self._left, n - i)
                if self._body is not None:
                    self._body += data[i:i + step]
                self._left -= step
                i += step
            else:
                if not self._head:
                    self._start = base + i
                take = min(self._HEADER - len(self._head), n - i)
                self._head += data[i:i + take]
                i += take
                if len(self._head) < self._HEADER:
                    break
                self._cmd = self._head[0]
                self._left = int.from_bytes(self._head[1:], "little")
                if self._keep and (self._cmd, self._left + self._HEADER) in self._KEPT:
                    self._body = bytearray(self._head)
                self._head.clear()
            if not self._left and not self._head:
                if self._cmd not in self.HOLD:
                    self.reply_due = True
                if self._keep:
                    body, self._body = self._body, None
                    self.done.append((self._cmd, self._start, base + i, bytes(body) if body is not None else None))

    def rebase(self) -> None:
        """The caller's buffer starts over (all of it was sent): a request in progress began before it."""
        self._start = -1

    @property
    def inside(self) -> bool:
        """In the middle of a request (its header or payload has more to come)."""
        return bool(self._head or self._left)


class Prefetch:
    """Fetches a client relay asks for before the client does; see the module's description.

    The splice calls :meth:`requests` with the requests :class:`RpcFrames` found complete in its outgoing buffer
    (it may strip a fetch answered here and append an early fetch) and :meth:`replies` with every chunk of replies
    it receives (it cuts early replies out). ``saved`` counts the round trips it removed, ``wasted`` the early fetches
    nobody asked for, ``sized`` the allocation sizes answered here for the devices of ``cpu_devices``."""

    def __init__(self, cpu_devices: frozenset[int] | set[int] = frozenset()) -> None:
        self.active = True
        self.saved = 0
        self.wasted = 0
        self.sized = 0
        self.cpu_devices = frozenset(cpu_devices)
        self._next: dict[bytes, bytes] = {}  # a fetch -> the fetch that came right after it, last time
        self._prev: bytes | None = None  # the last request, when it was a fetch
        self._queue: deque[list[int]] = deque()  # one [mode, size] per reply due, in order (size -1: not a fetch)
        self._early: bytes | None = None  # the fetch sent early, until the client's next request
        self._early_entry: list[int] | None = None
        self._kept = bytearray()  # the early fetch's reply, so far
        self._entry: list[int] | None = None  # the reply being received
        self._head = bytearray()  # its size field, so far
        self._left = -1  # its payload bytes still to come (-1: its size field is not complete)
        self._first_request = True  # must be HELLO, or the stream is not llama.cpp's RPC as known here
        self._first_reply = True  # HELLO's: its first payload byte is the protocol's major version
        self._confirmed = False  # the machine answered HELLO with protocol 7: a reply without a request is an error

    # --- the client's side --------------------------------------------------------------------------------------

    def requests(self, done: list[tuple[int, int, int, bytes | None]], buf: memoryview, hi: int,
                 room: int) -> tuple[int, bytes]:
        """Requests complete in ``buf`` (nothing of ``buf[:hi]`` is sent yet, ``hi`` its end), in order. Returns the
        new end of ``buf`` and the bytes to pass to the client first (an early reply, ``room`` at most)."""
        give = b""
        for cmd, start, end, body in done:
            if not self.active:
                break
            req = body if cmd == GET_TENSOR else None  # a tensor fetch
            if cmd >= CMD_COUNT or (self._first_request and cmd != HELLO):
                self.active = False  # the machine drops the connection, or this is not the protocol known here
                break
            self._first_request = False
            if self._early is not None:
                entry, early = self._early_entry, self._early
                self._early = self._early_entry = None
                assert entry is not None
                if req == early and start >= 0 and end == hi and len(self._kept) <= room:
                    hi = start  # answered here: the fetch does not cross the link
                    give += bytes(self._kept)
                    self._kept = bytearray()
                    if entry[0] == _KEEP:
                        entry[0] = _FORWARD  # the rest of the reply goes on to the client as it comes
                    self.saved += 1
                    self._learn(req)
                    hi = self._ask(req, buf, hi)
                    continue
                self.wasted += 1
                if entry[0] == _KEEP:
                    entry[0] = _DROP
                self._kept = bytearray()
            if (cmd == GET_ALLOC_SIZE and body is not None and start >= 0 and end == hi and self._confirmed
                    and not self._queue and self._entry is None and room - len(give) >= 16
                    and (answer := cpu_alloc_size(body)) is not None and answer[0] in self.cpu_devices):
                hi = start  # answered here: no reply is due before it, so this one is next in order
                give += (8).to_bytes(8, "little") + answer[1].to_bytes(8, "little")
                self.sized += 1
                self._learn(None)
                continue
            if cmd not in NO_REPLY:
                self._queue.append([_FORWARD, _fetch_size(req) if req is not None else -1])
            if cmd in (ALLOC_BUFFER, FREE_BUFFER):
                self._next.clear()
            self._learn(req)
            if req is not None and end == hi:
                hi = self._ask(req, buf, hi)
        done.clear()
        return hi, give

    def _learn(self, req: bytes | None) -> None:
        if self._prev is not None:
            if req is not None:
                if len(self._next) >= _LEARNED_MAX:
                    self._next.clear()
                self._next[self._prev] = req
            else:
                self._next.pop(self._prev, None)
        self._prev = req

    def _ask(self, req: bytes, buf: memoryview, hi: int) -> int:
        """After the fetch ``req``, send the one that followed it last time, if any (at ``buf[hi:]``)."""
        nxt = self._next.get(req)
        if nxt is None or hi + len(nxt) > len(buf):
            return hi
        size = _fetch_size(nxt)
        if size + 8 > PREFETCH_MAX:
            return hi
        buf[hi:hi + len(nxt)] = nxt
        entry = [_KEEP, size]
        self._queue.append(entry)
        self._early, self._early_entry = nxt, entry
        return hi + len(nxt)

    # --- the machine's side -------------------------------------------------------------------------------------

    def replies(self, buf: memoryview, start: int, hi: int) -> int:
        """New reply bytes at ``buf[start:hi]``: early replies are cut out (kept, or dropped). Returns the new end.
        Raises :class:`ProtocolError` when a reply cannot be matched to a request."""
        if not self.active and self._entry is None and not self._queue:
            return hi
        out = i = start
        while i < hi:
            if self._entry is None:
                if not self._queue:
                    if self.active and self._confirmed:
                        raise ProtocolError("the machine sent a reply no request asked for")
                    self.active = False  # not the protocol known here, or prefetching stopped: the rest is the client's
                    buf[out:out + hi - i] = bytes(buf[i:hi])
                    return out + hi - i
                self._entry = self._queue.popleft()
                self._head.clear()
                self._left = -1
            if self._left < 0:
                take = min(8 - len(self._head), hi - i)
                self._head += buf[i:i + take]
                if len(self._head) == 8:
                    self._left = int.from_bytes(self._head, "little")
                    if self._entry[1] >= 0 and self._left != self._entry[1]:
                        raise ProtocolError(f"a tensor fetch of {self._entry[1]} bytes got a reply of {self._left}")
            else:
                take = min(self._left, hi - i)
                if self._first_reply and take:
                    self._first_reply = False
                    if buf[i] != PROTOCOL_MAJOR:
                        logger.info("relay: the machine speaks RPC protocol %d, not %d: no prefetching",
                                    buf[i], PROTOCOL_MAJOR)
                        self.active = False
                    self._confirmed = self.active
                self._left -= take
            mode = self._entry[0]
            if mode == _FORWARD:
                if out != i:
                    buf[out:out + take] = bytes(buf[i:i + take])
                out += take
            elif mode == _KEEP:
                self._kept += buf[i:i + take]
            i += take
            if self._left == 0:
                if mode == _KEEP:
                    self._entry[0] = _KEPT
                self._entry = None
        return out
