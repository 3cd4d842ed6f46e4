# SPDX-License-Identifier: AGPL-3.0-or-later
"""An authenticated, encrypted tunnel in front of llama.cpp's rpc-server. No Dask.

llama.cpp's RPC protocol has neither authentication nor encryption, so an rpc-server binds to loopback only and is
reached through two relays::

    llama.cpp ──plain, loopback──▶ ClientRelay ══TLS + lease token══▶ ServerRelay ──plain, loopback──▶ rpc-server
    (engine)                       127.0.0.1:P   (client machine)       host:port      (server machine)  127.0.0.1:R

- **Tokens.** The scheduler mints one token per (lease, machine): ``HMAC-SHA256`` over version, lease id, machine id
  and expiry (:func:`mint_token`). Each machine verifies with its own relay key (:func:`machine_key`, derived from a
  scheduler-held master key), so a machine can neither verify nor forge tokens for another machine.
- **Handshake.** On every new connection the server relay completes TLS, then reads one frame carrying the token
  (``SLR1`` magic, a kind byte, a 16-bit length, the token) within ``handshake_timeout`` seconds. It checks the MAC,
  the machine, the expiry and ``allowed(lease_id)`` (the machine's *current* lease: a still-valid token of an ended
  lease is refused). Only then does it connect to the rpc-server; on failure it logs ``refused relay connection from
  ADDR: REASON`` and closes, and the rpc-server never sees the connection. A raw TCP client fails the TLS handshake.
- **Server identity.** The client relay authenticates the server relay by a pinned SHA-256 fingerprint of its
  certificate (:func:`cert_fingerprint`), which the machine reports to the scheduler and the scheduler hands out with
  the lease; no CA is needed for a community mesh of self-signed machines. A CA file with hostname checking is
  supported too (``cafile=``). The token is sent only after the server has been verified.
- **Speed.** llama.cpp makes several small request/response round trips per token, so the relays are built for
  latency: one thread per connection that moves bytes in both directions with non-blocking sockets and ``poll``
  (an ``SSLSocket`` must not be read and written from two threads at once), ``TCP_NODELAY`` on every socket, and
  buffers that coalesce several TLS records into one write. ``bench/bench_tunnel.py`` measures the cost.

``--insecure-direct-rpc`` (:func:`warn_insecure_direct`) skips the tunnel on a trusted LAN; it warns at every start.

Command line, for debugging and for running a relay as its own process::

    python -m sharedllm.relay keygen DIR                       # CA + certificate + key for tests and local meshes
    python -m sharedllm.relay server --listen 0.0.0.0:50100 --target 127.0.0.1:50052 --cert C --key K \\
        --machine-id M --key-file F [--lease ID] [--control-stdin]   # stdin "lease ID" / "lease" change the lease
    python -m sharedllm.relay client --remote HOST:50100 --fingerprint sha256:... --token-file T
    python -m sharedllm.relay mint --key-file F --lease L --machine-id M --ttl 3600
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import hashlib
import hmac
import json
import logging
import os
import select
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

logger = logging.getLogger("sharedllm.relay")  # the same name when run as python -m sharedllm.relay

TOKEN_VERSION = "v1"
MAX_TOKEN_BYTES = 2048
HANDSHAKE_TIMEOUT = 5.0
READY_PREFIX = "SHAREDLLM_RELAY "
INSECURE_DIRECT_FLAG = "--insecure-direct-rpc"

_MAGIC = b"SLR1"
_FRAME = struct.Struct("!4sBH")  # magic, kind/status, payload length
_KIND_CONNECT, _KIND_PROBE = 1, 2
_STATUS_OK, _STATUS_REFUSED = 0, 1
_BUFSIZE = 1 << 18  # 256 KiB per direction: a 1 MiB logits tensor crosses in four writes
_RECORD = 16384  # the largest TLS record payload: a shorter read means the peer's burst has ended
_HUP = select.POLLHUP | select.POLLERR | select.POLLNVAL
_MAC_CONTEXT = b"sharedllm-relay-token"
_KEY_CONTEXT = b"sharedllm-relay-key-v1"


# --- tokens --------------------------------------------------------------------------------------------------------


class TokenError(ValueError):
    """A relay token was refused. ``reason`` is one of: malformed, bad MAC, wrong machine, expired, lease mismatch."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason

    def __reduce__(self):
        return (TokenError, (self.reason, str(self).partition(": ")[2]))


class RelayError(ConnectionError):
    """The client relay could not open the tunnel (unreachable, TLS failure, wrong certificate, refused token)."""


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    if not text or any(c in text for c in "=+/"):
        raise ValueError("not unpadded URL-safe base64")
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def machine_key(master: bytes, machine_id: str) -> bytes:
    """The relay key of one machine, derived from the scheduler's master key.

    Hand each machine only its own key: it can then verify (and mint) tokens for itself and for no other machine.
    """
    if not master:
        raise ValueError("the relay master key is empty; generate one with secrets.token_bytes(32)")
    return hmac.new(master, _KEY_CONTEXT + b"|" + machine_id.encode(), hashlib.sha256).digest()


def _mac(secret: bytes, signed: str) -> bytes:
    return hmac.new(secret, _MAC_CONTEXT + b"|" + signed.encode("ascii"), hashlib.sha256).digest()


def mint_token(secret: bytes, lease_id: str, machine_id: str, ttl: float, now: float | None = None) -> str:
    """A token that opens ``machine_id``'s relay for ``lease_id`` during ``ttl`` seconds.

    ``secret`` is the machine's relay key (:func:`machine_key`). The token is
    ``v1.<lease>.<machine>.<expiry>.<mac>`` with URL-safe base64 fields and the MAC (HMAC-SHA256) over everything
    before it; it is plain ASCII and safe in URLs, environment variables and JSON.
    """
    if not secret:
        raise ValueError("cannot mint a relay token with an empty key")
    if not lease_id or not machine_id:
        raise ValueError("a relay token needs a lease id and a machine id")
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, got {ttl}")
    expiry = int((time.time() if now is None else now) + ttl + 0.999)
    signed = ".".join([TOKEN_VERSION, _b64e(lease_id.encode()), _b64e(machine_id.encode()), str(expiry)])
    token = f"{signed}.{_b64e(_mac(secret, signed))}"
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"relay token would be {len(token)} bytes (max {MAX_TOKEN_BYTES}); shorten the lease id")
    return token


def verify_token(secret: bytes, token: str, machine_id: str, now: float | None = None) -> str:
    """Check ``token`` for ``machine_id`` and return its lease id; raise :class:`TokenError` saying why not.

    The MAC is checked (in constant time) before any field is trusted; then the machine, then the expiry.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise TokenError("malformed", "not a relay token")
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != TOKEN_VERSION:
        raise TokenError("malformed", f"expected {TOKEN_VERSION}.lease.machine.expiry.mac")
    _version, lease_b64, machine_b64, expiry_s, mac_b64 = parts
    try:
        mac = _b64d(mac_b64)
        lease_id = _b64d(lease_b64).decode("utf-8")
        token_machine = _b64d(machine_b64).decode("utf-8")
        if not expiry_s.isdigit():
            raise ValueError("expiry is not a number")
        expiry = int(expiry_s)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenError("malformed", str(exc)) from None
    if not hmac.compare_digest(mac, _mac(secret, ".".join(parts[:4]))):
        raise TokenError("bad MAC", "not minted with this machine's relay key, or altered")
    if token_machine != machine_id:
        raise TokenError("wrong machine", f"token is for machine {token_machine!r}, this is {machine_id!r}")
    now = time.time() if now is None else now
    if now >= expiry:
        raise TokenError("expired", f"expired {now - expiry:.0f}s ago; ask the scheduler for a fresh lease")
    return lease_id


# --- certificates --------------------------------------------------------------------------------------------------


def make_self_signed(directory: str | os.PathLike, hosts: list[str] | None = None,
                     days: int = 365) -> tuple[str, str, str]:
    """Write a small CA and a relay certificate signed by it into ``directory``; return ``(cert, key, ca)`` paths.

    The certificate names 127.0.0.1 and localhost (plus ``hosts``: IP addresses or DNS names). For tests and local
    meshes; real machines pin each other's fingerprints (:func:`cert_fingerprint`) and need no CA at all.
    Requires the ``cryptography`` package.
    """
    from sharedllm.tls import write_ca_and_cert

    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("make_self_signed needs the 'cryptography' package; pip install cryptography") from exc
    return write_ca_and_cert(directory, ca_name="sharedllm relay test CA", cert_name="sharedllm relay",
                             cert_file="relay.pem", key_file="relay-key.pem", hosts=hosts, days=days)


def cert_fingerprint(cert: str | os.PathLike | bytes) -> str:
    """``sha256:HEX`` of a certificate (a PEM file path, PEM bytes or DER bytes): what a client relay pins."""
    if isinstance(cert, bytes):
        data = cert
    else:
        data = Path(cert).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        data = ssl.PEM_cert_to_DER_cert(data.decode("ascii"))
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _normalize_fingerprint(fp: str) -> bytes:
    text = fp.strip().lower()
    if text.startswith("sha256:"):
        text = text[7:]
    text = text.replace(":", "")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"certificate fingerprint {fp!r} is not sha256:<64 hex digits>; see cert_fingerprint()")
    return raw


def server_context(certfile: str | os.PathLike, keyfile: str | os.PathLike) -> ssl.SSLContext:
    """The server relay's TLS context: TLS 1.2 or newer, no client certificates (the token authenticates)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the relay certificate {certfile} / key {keyfile}: {exc}") from exc
    return ctx


def client_context(cafile: str | os.PathLike | None = None) -> ssl.SSLContext:
    """The client relay's TLS context: verifies against ``cafile`` with hostname checks, else (pinning) nothing here.

    With pinning the certificate is checked after the handshake against the fingerprint, before the token is sent.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile:
        ctx.load_verify_locations(cafile=str(cafile))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def warn_insecure_direct(where: str) -> None:
    """Log the warning that ``--insecure-direct-rpc`` must print at every start (worker, client, ``sharedllm up``)."""
    logger.warning(
        "%s: %s is set: llama.cpp RPC runs WITHOUT the relay (no authentication, no encryption). Anyone who can "
        "reach the rpc-server port can read the model and prompts and run code paths with known memory-safety "
        "bugs; use it only on a trusted LAN", where, INSECURE_DIRECT_FLAG)


# --- sockets -------------------------------------------------------------------------------------------------------


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


def _tune(sock: socket.socket) -> None:
    # Nagle would hold back the many small RPC messages for tens of milliseconds.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _kick(sock: socket.socket | None) -> None:
    """Wake a thread blocked on ``sock`` (poll, recv) from another thread: shut the socket down without closing it."""
    if sock is None:
        return
    with contextlib.suppress(OSError, ValueError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain method, also for an SSLSocket


def _close(*socks: socket.socket | None) -> None:
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


def _send_frame(sock: socket.socket, kind: int, payload: bytes) -> None:
    sock.sendall(_FRAME.pack(_MAGIC, kind, len(payload)) + payload)


def _recv_frame(sock: socket.socket, deadline: float) -> tuple[int, bytes]:
    magic, kind, size = _FRAME.unpack(_recv_exact(sock, _FRAME.size, deadline))
    if magic != _MAGIC:
        raise ValueError("not a SharedLLM relay frame")
    if size > MAX_TOKEN_BYTES:
        raise ValueError(f"frame of {size} bytes is too long")
    return kind, _recv_exact(sock, size, deadline)


def splice(plain: socket.socket, tls: ssl.SSLSocket) -> tuple[int, int, int]:
    """Move bytes both ways between ``plain`` and ``tls`` until either side closes.

    Returns (bytes plain → TLS, bytes TLS → plain, turns): a turn is a change of direction, so with llama.cpp's
    request/response protocol, turns / 2 is about the number of synchronous round trips.

    One thread, non-blocking sockets and a level-triggered ``poll``: an ``SSLSocket`` is not safe to read and write
    from two threads at once. A hop costs one wake-up and the fewest system calls: a read shorter than the buffer (or
    than a TLS record) is taken as the end of a burst, so no read is retried just to see ``EAGAIN``; poll says when
    more comes. Several TLS records are drained into one buffer before one plain write. Both sockets are closed.
    """
    POLLIN, POLLOUT = select.POLLIN, select.POLLOUT
    plain.setblocking(False)
    tls.setblocking(False)
    up, down = bytearray(_BUFSIZE), bytearray(_BUFSIZE)
    upv, downv = memoryview(up), memoryview(down)
    up_lo = up_hi = down_lo = down_hi = 0  # pending bytes: up[up_lo:up_hi] → tls, down[down_lo:down_hi] → plain
    sent_up = sent_down = turns = 0
    last = 0  # direction of the last bytes moved: 1 up, 2 down
    plain_eof = tls_eof = False
    p_in = p_out = t_in = t_out = True  # may the next read/write on plain/tls make progress (else wait for poll)
    send_waits = recv_waits = 0  # the poll event a blocked TLS write / read waits for (renegotiation, full buffers)
    poller = select.poll()
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
                if up_hi == 0 and p_in and not plain_eof:
                    try:
                        n = plain.recv_into(up)
                    except BlockingIOError:
                        n, p_in = -1, False
                    except OSError:
                        n = 0
                    if n == 0:
                        plain_eof = True
                    elif n > 0:
                        up_lo, up_hi, progress = 0, n, True
                        p_in = n == _BUFSIZE
                        if last != 1:
                            last, turns = 1, turns + 1
                if up_hi and (t_out if send_waits != POLLIN else t_in):
                    try:
                        n = tls.send(upv[up_lo:up_hi])
                    except ssl.SSLWantWriteError:
                        send_waits, t_out = POLLOUT, False
                    except ssl.SSLWantReadError:
                        send_waits, t_in = POLLIN, False
                    except OSError:
                        return sent_up, sent_down, turns  # the remote side is gone
                    else:
                        send_waits, progress = 0, True
                        up_lo += n
                        sent_up += n
                        if up_lo >= up_hi:
                            up_lo = up_hi = 0
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
                        down_lo += n
                        sent_down += n
                        progress = True
                        if down_lo >= down_hi:
                            down_lo = down_hi = 0
            if (tls_eof and down_hi == 0) or (plain_eof and up_hi == 0):
                return sent_up, sent_down, turns
            want_p = (POLLIN if up_hi == 0 and not plain_eof else 0) | (POLLOUT if down_hi and not p_out else 0)
            want_t = ((POLLIN if down_hi < _BUFSIZE and not tls_eof and recv_waits != POLLOUT else 0)
                      | recv_waits | (send_waits if up_hi else 0))
            if want_p != pmask:
                poller.modify(pfd, want_p)
                pmask = want_p
            if want_t != tmask:
                poller.modify(tfd, want_t)
                tmask = want_t
            for fd, ev in poller.poll():
                if ev & select.POLLNVAL:
                    return sent_up, sent_down, turns
                hup = bool(ev & _HUP)
                if fd == pfd:
                    p_in = p_in or hup or bool(ev & POLLIN)
                    p_out = p_out or hup or bool(ev & POLLOUT)
                else:
                    t_in = t_in or hup or bool(ev & POLLIN)
                    t_out = t_out or hup or bool(ev & POLLOUT)
    finally:
        _close(plain, tls)


# --- server side ---------------------------------------------------------------------------------------------------


class _Connections:
    """Live connections of one relay, so that ``stop`` and a lease change can close them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[int, tuple[str | None, list[socket.socket]]] = {}
        self._threads: set[threading.Thread] = set()
        self._next = 0

    def add(self, sock: socket.socket) -> int:
        with self._lock:
            self._next += 1
            self._live[self._next] = (None, [sock])
            self._threads.add(threading.current_thread())
            return self._next

    def attach(self, cid: int, sock: socket.socket, lease: str | None = None) -> None:
        with self._lock:
            old_lease, socks = self._live[cid]
            socks.append(sock)
            self._live[cid] = (lease or old_lease, socks)

    def remove(self, cid: int) -> None:
        with self._lock:
            self._live.pop(cid, None)
            self._threads.discard(threading.current_thread())

    def count(self) -> int:
        with self._lock:
            return len(self._live)

    def kick(self, keep: Callable[[str | None], bool] = lambda _lease: False) -> int:
        with self._lock:
            doomed = [socks for lease, socks in self._live.values() if not keep(lease)]
        for socks in doomed:
            for s in socks:
                _kick(s)
        return len(doomed)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class _Acceptor:
    """What both relays share: a listening socket, a thread that accepts on it, the live connections, and ``stop``.

    Subclasses call :meth:`_listen` from ``start`` and handle each accepted connection in :meth:`_accepted`."""

    _what = "relay"  # for log lines

    def __init__(self) -> None:
        self.port = 0
        self._conns = _Connections()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def _listen(self, listener: socket.socket, thread_name: str) -> None:
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name=f"{thread_name}-{self.port}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening and close every connection."""
        self._stopping.set()
        if self._listener is not None:
            _kick(self._listener)
            _close(self._listener)
        self._conns.kick()
        if self._thread is not None:
            self._thread.join(timeout)
        self._conns.join(timeout)
        self._listener = self._thread = None

    def start(self) -> Self:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._stopping.is_set():
            try:
                conn, addr = listener.accept()
            except OSError as exc:
                if self._stopping.is_set() or exc.errno in (errno.EBADF, errno.EINVAL):
                    return
                logger.warning("%s accept failed: %s", self._what, exc)
                time.sleep(0.1)
                continue
            self._accepted(conn, addr)

    def _accepted(self, conn: socket.socket, addr: tuple) -> None:
        raise NotImplementedError


class ServerRelay(_Acceptor):
    """The relay next to an rpc-server: TLS and a lease token in, plain loopback RPC out.

    ``allowed(lease_id)`` says whether a lease may use this machine now; without it, the relay admits the lease given
    to :meth:`set_lease` (none at first: every token is refused until the scheduler leases the machine).
    ``target`` should be a loopback endpoint. ``start`` returns once the relay listens; ``stop`` closes everything.
    """

    def __init__(self, host: str, port: int, target: str, *, certfile: str | os.PathLike, keyfile: str | os.PathLike,
                 secret: bytes, machine_id: str, allowed: Callable[[str], bool] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, max_pending: int = 32):
        if not secret:
            raise ValueError("ServerRelay needs this machine's relay key (machine_key(master, machine_id))")
        if not machine_id:
            raise ValueError("ServerRelay needs the machine id its tokens are minted for")
        if handshake_timeout <= 0 or max_pending < 1:
            raise ValueError("handshake_timeout must be positive and max_pending at least 1")
        self.target = parse_endpoint(target)
        if not (self.target[0] in ("localhost", "::1") or self.target[0].startswith("127.")):
            logger.warning("relay target %s is not a loopback address: bind the rpc-server to 127.0.0.1, or anyone "
                           "on the network can bypass the relay", target)
        super().__init__()
        self.host, self.port = host, port
        self._ctx = server_context(certfile, keyfile)
        self.fingerprint = cert_fingerprint(certfile)
        self._secret = secret
        self.machine_id = machine_id
        self._allowed = allowed
        self._lease: str | None = None
        self.handshake_timeout = handshake_timeout
        self._pending = threading.BoundedSemaphore(max_pending)
        self.refused = 0
        self.accepted = 0

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` the relay listens on (the real port after ``start`` with port 0)."""
        return join_endpoint(self.host, self.port)

    @property
    def lease(self) -> str | None:
        """The lease admitted now (None: nobody)."""
        return self._lease

    def set_lease(self, lease_id: str | None) -> None:
        """Admit ``lease_id`` (None: nobody) and close live connections of any other lease."""
        self._lease = lease_id
        self.recheck()

    def recheck(self) -> int:
        """Close the live connections whose lease is no longer allowed; return how many."""
        # Connections still in their handshake (no lease yet) check the lease themselves once they have one.
        n = self._conns.kick(keep=lambda lease: lease is None or self._is_allowed(lease))
        if n:
            logger.info("closed %d relay connection(s) of a lease that ended", n)
        return n

    def _is_allowed(self, lease_id: str) -> bool:
        if self._allowed is not None:
            try:
                return bool(self._allowed(lease_id))
            except Exception:
                logger.exception("the relay's allowed() callback failed; refusing lease %s", lease_id)
                return False
        return lease_id == self._lease

    def start(self) -> ServerRelay:
        """Bind, listen and serve in a background thread; returns when the relay accepts connections."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listen(socket.create_server((self.host, self.port), family=family, backlog=64), "relay-server")
        logger.info("relay listening on %s (TLS, %s) for machine %s, forwarding to %s:%d", self.endpoint,
                    self.fingerprint, self.machine_id, *self.target)
        return self

    def _accepted(self, conn: socket.socket, addr: tuple) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        if not self._pending.acquire(blocking=False):
            self.refused += 1
            logger.warning("refused relay connection from %s: too many handshakes in progress", peer)
            _close(conn)
            return
        threading.Thread(target=self._serve, args=(conn, peer), name=f"relay-conn-{peer}", daemon=True).start()

    def _refuse(self, peer: str, reason: str) -> None:
        self.refused += 1
        logger.warning("refused relay connection from %s: %s", peer, reason)

    def _serve(self, raw: socket.socket, peer: str) -> None:
        cid = self._conns.add(raw)
        tls: ssl.SSLSocket | None = None
        target: socket.socket | None = None
        released = False
        try:
            _tune(raw)
            deadline = time.monotonic() + self.handshake_timeout
            raw.settimeout(self.handshake_timeout)
            try:
                tls = self._ctx.wrap_socket(raw, server_side=True)
            except TimeoutError:
                return self._refuse(peer, f"no TLS handshake within {self.handshake_timeout:g}s")
            except (ssl.SSLError, OSError) as exc:
                return self._refuse(peer, f"TLS handshake failed ({getattr(exc, 'reason', None) or exc})")
            self._conns.attach(cid, tls)
            try:
                kind, payload = _recv_frame(tls, deadline)
            except TimeoutError:
                return self._refuse(peer, f"no token within {self.handshake_timeout:g}s")
            except (ValueError, ConnectionError, OSError, struct.error) as exc:
                return self._refuse(peer, f"malformed handshake ({exc})")
            try:
                if kind not in (_KIND_CONNECT, _KIND_PROBE):
                    raise TokenError("malformed", f"unknown handshake kind {kind}")
                lease = verify_token(self._secret, payload.decode("ascii", "replace"), self.machine_id)
                if not self._is_allowed(lease):
                    raise TokenError("lease mismatch", f"lease {lease} does not hold machine {self.machine_id} now")
            except TokenError as exc:
                self._refuse(peer, str(exc))
                with contextlib.suppress(OSError):
                    _send_frame(tls, _STATUS_REFUSED, str(exc).encode()[:MAX_TOKEN_BYTES])
                return None
            if kind == _KIND_PROBE:
                _send_frame(tls, _STATUS_OK, b"ok")
                logger.info("relay probe from %s for lease %s: token accepted", peer, lease)
                return None
            try:
                target = socket.create_connection(self.target, timeout=self.handshake_timeout)
            except OSError as exc:
                reason = f"rpc-server {self.target[0]}:{self.target[1]} is unreachable ({exc})"
                logger.warning("relay connection from %s (lease %s): %s", peer, lease, reason)
                with contextlib.suppress(OSError):
                    _send_frame(tls, _STATUS_REFUSED, reason.encode())
                return None
            _tune(target)
            self._conns.attach(cid, target, lease)
            if self._stopping.is_set() or not self._is_allowed(lease):  # stopped or revoked meanwhile
                return None
            _send_frame(tls, _STATUS_OK, b"ok")
            self.accepted += 1
            logger.info("relay connection from %s for lease %s forwarded to the rpc-server", peer, lease)
            self._pending.release()
            released = True
            t0 = time.monotonic()
            up, down, turns = splice(target, tls)
            logger.info("relay connection from %s closed after %.1fs (%d bytes out, %d in, %d turns)", peer,
                        time.monotonic() - t0, up, down, turns)
            return None
        except Exception:
            logger.exception("relay connection from %s failed", peer)
            return None
        finally:
            if not released:
                self._pending.release()
            _close(target, tls, raw)
            self._conns.remove(cid)


# --- client side ---------------------------------------------------------------------------------------------------


class ClientRelay(_Acceptor):
    """A loopback endpoint for llama.cpp that tunnels each connection to a remote :class:`ServerRelay`.

    Give exactly one way to check the server: ``fingerprint`` (``sha256:HEX`` of its certificate, recommended) or
    ``cafile`` (then the certificate must name the remote host, or ``server_hostname``). ``token`` is the lease token
    for that machine; :meth:`set_token` replaces it for later connections. ``endpoint`` is what llama.cpp connects to.
    """

    _what = "relay client"

    def __init__(self, remote: str, token: str, *, fingerprint: str | None = None,
                 cafile: str | os.PathLike | None = None, server_hostname: str | None = None,
                 connect_timeout: float = 10.0, listen_host: str = "127.0.0.1"):
        if (fingerprint is None) == (cafile is None):
            raise ValueError("ClientRelay needs exactly one of fingerprint= (pinned certificate) or cafile=")
        super().__init__()
        self.remote = parse_endpoint(remote)
        self._pin = _normalize_fingerprint(fingerprint) if fingerprint else None
        self._ctx = client_context(cafile)
        self._sni = server_hostname or self.remote[0]
        self.token = token
        self.connect_timeout = connect_timeout
        self.listen_host = listen_host
        self.last_error: str | None = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``: give this to llama.cpp (``ggml_backend_rpc_add_server``) instead of the remote."""
        return f"{self.listen_host}:{self.port}"

    @property
    def remote_endpoint(self) -> str:
        return join_endpoint(*self.remote)

    def set_token(self, token: str) -> None:
        """Use ``token`` for the connections opened from now on."""
        self.token = token

    def open(self, kind: int = _KIND_CONNECT) -> ssl.SSLSocket:
        """Open one authenticated TLS connection to the server relay, ready to carry RPC bytes.

        Raises :class:`RelayError` (unreachable, TLS, certificate mismatch) or :class:`TokenError` (refused token).
        """
        where = self.remote_endpoint
        try:
            raw = socket.create_connection(self.remote, timeout=self.connect_timeout)
        except OSError as exc:
            raise RelayError(f"relay {where} is unreachable ({exc}); is the machine's relay running?") from exc
        _tune(raw)
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            tls = self._ctx.wrap_socket(raw, server_hostname=self._sni)
        except (ssl.SSLError, OSError) as exc:
            _close(raw)
            raise RelayError(f"TLS handshake with relay {where} failed ({exc})") from exc
        try:
            if self._pin is not None:
                got = hashlib.sha256(tls.getpeercert(binary_form=True) or b"").digest()
                if not hmac.compare_digest(got, self._pin):
                    raise RelayError(f"relay {where} presented certificate sha256:{got.hex()}, expected "
                                     f"sha256:{self._pin.hex()}; refusing to send the token (wrong machine?)")
            _send_frame(tls, kind, self.token.encode("ascii"))
            try:
                status, reason = _recv_frame(tls, time.monotonic() + self.connect_timeout)
            except (OSError, ValueError, struct.error) as exc:
                raise RelayError(f"relay {where} closed the handshake ({exc})") from exc
            if status != _STATUS_OK:
                text = reason.decode(errors="replace")
                head, _, detail = text.partition(": ")
                if head in ("malformed", "bad MAC", "wrong machine", "expired", "lease mismatch"):
                    raise TokenError(head, f"relay {where}: {detail}")
                raise RelayError(f"relay {where} refused the connection: {text}")
            return tls
        except BaseException:
            _close(tls)
            raise

    def check(self) -> dict[str, str]:
        """Prove the token and the certificate without touching the rpc-server (a probe handshake).

        Call it before handing :attr:`endpoint` to llama.cpp, which aborts the process when a connection fails.
        Returns the TLS version and cipher agreed; raises like :meth:`open`.
        """
        tls = self.open(_KIND_PROBE)
        try:
            cipher = tls.cipher()
            return {"tls": tls.version() or "", "cipher": cipher[0] if cipher else ""}
        finally:
            _close(tls)

    def start(self) -> ClientRelay:
        """Listen on loopback and tunnel every accepted connection; returns when listening."""
        self._listen(socket.create_server((self.listen_host, 0), backlog=16), "relay-client")
        logger.info("relay client on %s tunnels to %s", self.endpoint, self.remote_endpoint)
        return self

    def _accepted(self, conn: socket.socket, addr: tuple) -> None:
        threading.Thread(target=self._serve, args=(conn,), name=f"relay-tunnel-{self.port}", daemon=True).start()

    def _serve(self, local: socket.socket) -> None:
        cid = self._conns.add(local)
        tls = None
        try:
            _tune(local)
            try:
                tls = self.open()
            except (RelayError, TokenError) as exc:
                self.last_error = str(exc)
                logger.error("%s", exc)
                return
            self._conns.attach(cid, tls)
            if self._stopping.is_set():
                return
            splice(local, tls)
        except Exception:
            logger.exception("relay tunnel to %s failed", self.remote_endpoint)
        finally:
            _close(tls, local)
            self._conns.remove(cid)


# --- command line --------------------------------------------------------------------------------------------------


def _read_key(path: str) -> bytes:
    text = Path(path).read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = text.encode()
    if len(key) < 16:
        raise SystemExit(f"error: relay key in {path} is shorter than 16 bytes")
    return key


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    # A supervisor killed with SIGKILL cannot stop us: stop with it (as the rpc-server does).
    while not stop.is_set():
        if os.getppid() != parent_pid:
            logger.warning("supervisor %d is gone; stopping the relay", parent_pid)
            stop.set()
            return
        time.sleep(0.5)


def _control(relay: ServerRelay, line: str) -> dict | None:
    """One control command: ``lease ID`` admits a lease, ``lease`` alone admits none (answered once in force),
    ``status`` says which lease is admitted. The answer, or None for an unknown command."""
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "lease":
        relay.set_lease(arg.strip() or None)
        logger.info("relay now admits lease %s", arg.strip() or "(none)")
        return {"lease": arg.strip() or None}
    if cmd == "status":
        return {"lease": relay.lease, "status": True}
    if cmd:
        logger.warning("unknown relay control command %r (expected 'lease [ID]' or 'status')", cmd)
    return None


def _control_loop(relay: ServerRelay) -> None:
    # Commands on stdin, answers on stdout; EOF on stdin stops the relay (its supervisor is gone).
    for line in sys.stdin:
        if (answer := _control(relay, line)) is not None:
            print(READY_PREFIX + json.dumps(answer), flush=True)


def _control_socket(relay: ServerRelay, path: str, stop: threading.Event) -> None:
    """Serve control commands on a Unix socket (owner only), one JSON answer line per command: a new supervisor
    reaches a relay it adopted here, as stdin belonged to the one that started it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    srv.listen(4)

    def serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rw") as f:
            for line in f:
                if (answer := _control(relay, line)) is not None:
                    f.write(json.dumps(answer) + "\n")
                    f.flush()

    while not stop.is_set():
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), name="relay-control", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharedllm.relay", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server", help="TLS + token relay in front of a loopback rpc-server")
    s.add_argument("--listen", required=True, help="HOST:PORT to accept relay connections on (port 0: any)")
    s.add_argument("--target", required=True, help="the rpc-server, normally 127.0.0.1:PORT")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--machine-id", required=True)
    s.add_argument("--key-file", required=True, help="file holding this machine's relay key (hex or text)")
    s.add_argument("--lease", default=None, help="lease admitted at start (default: none until told)")
    s.add_argument("--control-stdin", action="store_true",
                   help="read 'lease ID' / 'lease' lines on stdin to change the lease; stop at end of input")
    s.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the supervisor) dies")
    s.add_argument("--control-socket", default=None, help="Unix socket for the same commands (a new supervisor)")
    s.add_argument("--ready-file", default=None, help="write the ready JSON here too (for a supervisor to adopt us)")
    s.add_argument("--alive-file", default=None,
                   help="stop when no supervisor has touched this file for --orphan-timeout seconds")
    s.add_argument("--orphan-timeout", type=float, default=None, help="seconds (default: 900)")
    c = sub.add_parser("client", help="loopback endpoint for llama.cpp, tunnelled to a server relay")
    c.add_argument("--remote", required=True, help="HOST:PORT of the server relay")
    c.add_argument("--token-file", required=True)
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("--fingerprint", help="sha256:HEX of the server relay's certificate")
    group.add_argument("--cafile", help="CA certificate that signed the server relay's certificate")
    c.add_argument("--check", action="store_true", help="probe the token and certificate, then exit")
    c.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the engine) dies")
    k = sub.add_parser("keygen", help="write a test CA, certificate and key into a directory")
    k.add_argument("dir")
    k.add_argument("--host", action="append", default=[], help="extra IP or DNS name for the certificate")
    m = sub.add_parser("mint", help="mint a token (debugging; the scheduler does this)")
    m.add_argument("--key-file", required=True)
    m.add_argument("--lease", required=True)
    m.add_argument("--machine-id", required=True)
    m.add_argument("--ttl", type=float, default=3600.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)

    if args.cmd == "keygen":
        cert, key, ca = make_self_signed(args.dir, args.host)
        print(json.dumps({"cert": cert, "key": key, "ca": ca, "fingerprint": cert_fingerprint(cert)}))
        return 0
    if args.cmd == "mint":
        print(mint_token(_read_key(args.key_file), args.lease, args.machine_id, args.ttl))
        return 0
    stop = threading.Event()
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    if args.cmd == "server":
        host, port = parse_endpoint(args.listen)
        relay: ServerRelay | ClientRelay = ServerRelay(
            host, port, args.target, certfile=args.cert, keyfile=args.key, secret=_read_key(args.key_file),
            machine_id=args.machine_id)
        relay.set_lease(args.lease)
        relay.start()
        ready = {"endpoint": relay.endpoint, "fingerprint": relay.fingerprint, "pid": os.getpid(),
                 "target": args.target, "control": args.control_socket, "python": sys.executable}
        if args.control_socket:
            threading.Thread(target=_control_socket, args=(relay, args.control_socket, stop), daemon=True).start()
        if args.ready_file:
            from sharedllm.dataplane import write_json

            write_json(args.ready_file, ready)
        print(READY_PREFIX + json.dumps(ready), flush=True)
        if args.alive_file:
            from sharedllm.dataplane import DEFAULT_ORPHAN_TIMEOUT, watch_alive_file

            watch_alive_file(args.alive_file, args.orphan_timeout or DEFAULT_ORPHAN_TIMEOUT, stop.set)
        try:
            if args.control_stdin:
                threading.Thread(target=lambda: (_control_loop(relay), stop.set()), daemon=True).start()
            stop.wait()
        except KeyboardInterrupt:
            pass
        relay.stop()
        return 0
    relay = ClientRelay(args.remote, Path(args.token_file).read_text().strip(), fingerprint=args.fingerprint,
                        cafile=args.cafile)
    if args.check:
        try:
            relay.check()
        except (RelayError, TokenError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print("ok")
        return 0
    relay.start()
    print(READY_PREFIX + json.dumps({"endpoint": relay.endpoint, "pid": os.getpid()}), flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    relay.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
