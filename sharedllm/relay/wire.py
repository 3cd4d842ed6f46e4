# SPDX-License-Identifier: AGPL-3.0-or-later
"""Sockets and the relays' handshake frames: endpoints, framing, and the splice that moves RPC bytes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import ssl
import struct
import time

from sharedllm import settings
from sharedllm.relay.rpc import Prefetch, ProtocolError, RpcFrames
from sharedllm.relay.tokens import MAX_TOKEN_BYTES

__all__ = ["RpcFrames", "join_endpoint", "parse_endpoint", "splice"]

logger = logging.getLogger("sharedllm.relay")  # one name for the package, and when run as python -m sharedllm.relay

MAGIC = b"SLR1"
FRAME = struct.Struct("!4sBH")  # magic, kind/status, payload length
KIND_CONNECT, KIND_PROBE = 1, 2
STATUS_OK, STATUS_REFUSED = 0, 1
_BUFSIZE = 1 << 18  # 256 KiB per direction: a 1 MiB logits tensor crosses in four writes
_RECORD = 16384  # the largest TLS record payload: a shorter read means the peer's burst has ended
_HUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
# SHAREDLLM_RELAY_TRACE=DIR: every splice writes DIR/splice-PID-N.jsonl at its end, one [time, event, bytes] per
# read/write ("pi"/"po": plain in/out, "ti"/"to": TLS in/out, "w": woken by poll), time.monotonic() (one clock for
# every process of a machine): where a round trip spends its time on this hop, for benchmarks and debugging.
_TRACE_DIR = settings.get("relay.trace") or None
_trace_seq = iter(range(1 << 62))
_TRACE_FLUSH = 1024  # events a splice keeps before it appends them to its file


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``HOST:PORT`` into ``(host, port)``, with a clear error."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def join_endpoint(host: str, port: int) -> str:
    """``(host, port)`` into ``HOST:PORT``, an IPv6 host in brackets: the inverse of :func:`parse_endpoint`."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def tune_socket(sock: socket.socket) -> None:
    # Nagle would hold back the many small RPC messages for tens of milliseconds.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def kick(sock: socket.socket | None) -> None:
    """Wake a thread blocked on ``sock`` (poll, recv) from another thread: shut the socket down without closing it."""
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain method, also for an SSLSocket


def close_sockets(*socks: socket.socket | None) -> None:
    for s in socks:
        if s is not None:
            with contextlib.suppress(OSError):
                s.close()


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out")
        sock.settimeout(left)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed by peer")
        buf += chunk
    return bytes(buf)


def send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(FRAME.pack(MAGIC, kind, len(payload)) + payload)


def recv_frame(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    magic, kind, size = FRAME.unpack(_recv_exact(sock, FRAME.size, deadline))
    if magic != MAGIC:
        raise ValueError("not a SharedLLM relay frame")
    if size > MAX_TOKEN_BYTES:
        raise ValueError(f"frame of {size} bytes is too long")
    return kind, _recv_exact(sock, size, deadline)


HOLD_S = 0.001  # the longest a client relay holds a request (RpcFrames.HOLD)
_HOLD_MAX = _BUFSIZE // 2  # held bytes beyond this go at once (weights streaming during a load)


def splice(plain: socket.socket, tls: ssl.SSLSocket, coalesce: bool = False, prefetch: bool = False,
           cpu_devices: frozenset[int] = frozenset()) -> tuple[int, int, int]:
    """Move bytes both ways between ``plain`` and ``tls`` until either side closes.

    Returns (bytes plain → TLS, bytes TLS → plain, turns): a turn is a change of direction, so with llama.cpp's
    request/response protocol, turns / 2 is about the number of synchronous round trips.

    One thread, non-blocking sockets and a level-triggered ``poll``: an ``SSLSocket`` is not safe to read and write
    from two threads at once. A hop costs one wake-up and the fewest system calls: a read shorter than the buffer (or
    than a TLS record) is taken as the end of a burst, so no read is retried just to see ``EAGAIN``; poll says when
    more comes. Several TLS records are drained into one buffer before one plain write. Both sockets are closed.

    ``coalesce`` (a client relay: ``plain`` is llama.cpp's RPC client): requests that only set state are held until
    the next one that does more, see :class:`RpcFrames`. ``prefetch`` (a client relay too): a tensor fetch that
    followed another one last time is sent right behind it, and answered here when the client asks for it next,
    see :class:`~sharedllm.relay.rpc.Prefetch`; it also answers allocation sizes for the devices of ``cpu_devices``.
    """
    POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
    plain.setblocking(False)
    tls.setblocking(False)
    up, down = bytearray(_BUFSIZE), bytearray(_BUFSIZE)
    upv, downv = memoryview(up), memoryview(down)
    up_lo = up_hi = down_lo = down_hi = 0  # pending bytes: up[up_lo:up_hi] → tls, down[down_lo:down_hi] → plain
    frames = RpcFrames(keep=prefetch) if coalesce or prefetch else None
    early = Prefetch(cpu_devices) if prefetch else None
    hold_until = 0.0  # held requests go by then at the latest
    sent_up = sent_down = turns = 0
    last = 0  # direction of the last bytes moved: 1 up, 2 down
    plain_eof = tls_eof = False
    p_in = p_out = t_in = t_out = True  # may the next read/write on plain/tls make progress (else wait for poll)
    send_waits = recv_waits = 0  # the poll event a blocked TLS write / read waits for (renegotiation, full buffers)
    poller = select.poll()
    ev: list[tuple[float, str, int]] | None = [] if _TRACE_DIR else None
    trace_path: str | None = None
    now = time.monotonic

    def holding() -> bool:
        """Requests that only set state are waiting for the next one (coalesce), and their time is not up."""
        return (coalesce and frames is not None and up_hi > 0 and up_lo == 0 and not plain_eof and not frames.reply_due
                and up_hi < _HOLD_MAX and now() < hold_until)

    pfd, tfd = plain.fileno(), tls.fileno()
    pmask = tmask = POLLIN
    poller.register(pfd, pmask)
    poller.register(tfd, tmask)
    try:
        while True:
            progress = True
            while progress:
                progress = False
                # plain → TLS
                # (more is read into a buffer not yet sent, never under a TLS write that must be retried as it was)
                if up_lo == 0 and up_hi < _BUFSIZE and (up_hi == 0 or not send_waits) and p_in and not plain_eof:
                    try:
                        n = plain.recv_into(upv[up_hi:])
                    except BlockingIOError:
                        n, p_in = -1, False
                    except OSError:
                        n = 0
                    if n == 0:
                        plain_eof = True
                    elif n > 0:
                        if ev is not None:
                            ev.append((now(), "pi", n))
                        if frames is not None:
                            if up_hi == 0:
                                hold_until = now() + HOLD_S
                            frames.feed(upv[up_hi:up_hi + n], up_hi)
                        p_in = n == _BUFSIZE - up_hi
                        up_hi += n
                        if early is not None and frames.done:
                            up_hi, give = early.requests(frames.done, upv, up_hi, _BUFSIZE - down_hi)
                            if give:  # a fetch answered here: its reply, or as much of it as came yet
                                downv[down_hi:down_hi + len(give)] = give
                                down_hi += len(give)
                            if not up_hi:
                                frames.reply_due = False
                        progress = True
                        if last != 1:
                            last, turns = 1, turns + 1
                if up_hi and not holding() and (t_out if send_waits != POLLIN else t_in):
                    try:
                        n = tls.send(upv[up_lo:up_hi])
                    except ssl.SSLWantWriteError:
                        send_waits, t_out = POLLOUT, False
                    except ssl.SSLWantReadError:
                        send_waits, t_in = POLLIN, False
                    except OSError:
                        return sent_up, sent_down, turns  # the remote side is gone
                    else:
                        if ev is not None:
                            ev.append((now(), "to", n))
                        send_waits, progress = 0, True
                        up_lo += n
                        sent_up += n
                        if up_lo >= up_hi:
                            up_lo = up_hi = 0
                            if frames is not None:
                                frames.reply_due = False
                                frames.rebase()
                # TLS → plain: drain the records at hand into the buffer, then write once
                while down_hi < _BUFSIZE and not tls_eof and ((t_in if recv_waits != POLLOUT else t_out)
                                                              or tls.pending()):
                    try:
                        n = tls.recv_into(downv[down_hi:])
                    except ssl.SSLWantReadError:
                        recv_waits, t_in = POLLIN, False
                        break
                    except ssl.SSLWantWriteError:
                        recv_waits, t_out = POLLOUT, False
                        break
                    except (OSError, ValueError):
                        n = 0
                    recv_waits = 0
                    if n == 0:
                        tls_eof = True
                        break
                    if ev is not None:
                        ev.append((now(), "ti", n))
                    if early is not None:
                        try:
                            down_hi = early.replies(downv, down_hi, down_hi + n)
                        except ProtocolError as exc:
                            logger.error("relay: %s; closing the connection", exc)
                            return sent_up, sent_down, turns
                    else:
                        down_hi += n
                    progress = True
                    if last != 2:
                        last, turns = 2, turns + 1
                    if n < _RECORD and not tls.pending():
                        t_in = False  # the burst is over; poll tells if another record is already there
                if down_hi > down_lo and p_out:
                    try:
                        n = plain.send(downv[down_lo:down_hi])
                    except BlockingIOError:
                        p_out = False
                    except OSError:
                        return sent_up, sent_down, turns  # the local side is gone
                    else:
                        if ev is not None:
                            ev.append((now(), "po", n))
                        down_lo += n
                        sent_down += n
                        progress = True
                        if down_lo >= down_hi:
                            down_lo = down_hi = 0
            if (tls_eof and down_hi == 0) or (plain_eof and up_hi == 0):
                return sent_up, sent_down, turns
            want_p = ((POLLIN if up_lo == 0 and up_hi < _BUFSIZE and (up_hi == 0 or not send_waits) and not plain_eof
                       else 0)
                      | (POLLOUT if down_hi and not p_out else 0))
            want_t = ((POLLIN if down_hi < _BUFSIZE and not tls_eof and recv_waits != POLLOUT else 0)
                      | recv_waits | (send_waits if up_hi else 0))
            if want_p != pmask:
                poller.modify(pfd, want_p)
                pmask = want_p
            if want_t != tmask:
                poller.modify(tfd, want_t)
                tmask = want_t
            # Bytes not sent with nothing blocking the TLS write: held, until hold_until at the latest (ms, rounded up;
            # 0 when the hold ran out since the loop looked: they go on the next pass).
            held = coalesce and up_hi > 0 and up_lo == 0 and not send_waits
            ready = poller.poll(max(0.0, hold_until - now()) * 1000 if held else None)
            if ev is not None:
                ev.append((now(), "w", len(ready)))
                if len(ev) >= _TRACE_FLUSH:  # now and then, not only at the end: a process may leave by os._exit
                    trace_path = _write_trace(ev, trace_path)
                    ev.clear()
            for fd, what in ready:
                if what & select.POLLNVAL:
                    return sent_up, sent_down, turns
                hup = bool(what & _HUP)
                if fd == pfd:
                    p_in = p_in or hup or bool(what & POLLIN)
                    p_out = p_out or hup or bool(what & POLLOUT)
                else:
                    t_in = t_in or hup or bool(what & POLLIN)
                    t_out = t_out or hup or bool(what & POLLOUT)
    finally:
        close_sockets(plain, tls)
        if early is not None and (early.saved or early.wasted or early.sized):
            logger.debug("relay: %d tensor fetches answered ahead, %d asked for in vain, %d allocation sizes answered",
                         early.saved, early.wasted, early.sized)
        if ev:
            _write_trace(ev, trace_path)


def _write_trace(events: list[tuple[float, str, int]], path: str | None) -> str | None:
    """Append ``events`` to this splice's trace file (a new one when ``path`` is None); returns its path."""
    path = path or os.path.join(_TRACE_DIR, f"splice-{os.getpid()}-{next(_trace_seq)}.jsonl")
    try:
        with open(path, "a") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)
    except OSError as exc:
        logger.warning("relay trace: cannot write %s: %s", path, exc)
    return path
