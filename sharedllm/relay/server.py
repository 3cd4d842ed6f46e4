# SPDX-License-Identifier: AGPL-3.0-or-later
"""The relay next to an rpc-server (:class:`ServerRelay`) and what both relays share (:class:`Acceptor`)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Self

from sharedllm.relay.certs import cert_fingerprint, server_context
from sharedllm.relay.tokens import MAX_TOKEN_BYTES, TokenError, verify_token
from sharedllm.relay.wire import (
    KIND_CONNECT,
    KIND_PROBE,
    STATUS_OK,
    STATUS_REFUSED,
    close_sockets,
    join_endpoint,
    kick,
    parse_endpoint,
    recv_frame,
    send_frame,
    splice,
    tune_socket,
)

logger = logging.getLogger("sharedllm.relay")  # one name for the package, and when run as python -m sharedllm.relay

HANDSHAKE_TIMEOUT = 5.0


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
                kick(s)
        return len(doomed)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


class Acceptor:
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
            kick(self._listener)
            close_sockets(self._listener)
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


class ServerRelay(Acceptor):
    """The relay next to an rpc-server: TLS and a lease token in, plain loopback RPC out.

    ``allowed(lease_id)`` says whether a lease may use this machine now; without it, the relay admits the lease given
    to :meth:`set_lease` (none at first: every token is refused until the scheduler leases the machine).
    ``target`` should be a loopback endpoint. ``start`` returns once the relay listens; ``stop`` closes everything.

    ``hub`` (``HOST:PORT``) and ``hub_credential`` (:func:`sharedllm.relay.hub.hub_machine_key`) register the machine
    at a relay hub too, which then forwards clients that cannot reach it directly (:mod:`sharedllm.relay.hub`); with
    ``inbound=False`` the relay listens on no port at all (a machine behind NAT) and is known as ``hub/MACHINE``.
    """

    def __init__(self, host: str, port: int, target: str, *, certfile: str | os.PathLike, keyfile: str | os.PathLike,
                 secret: bytes, machine_id: str, allowed: Callable[[str], bool] | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, max_pending: int = 32, hub: str | None = None,
                 hub_credential: bytes | None = None, inbound: bool = True):
        if not secret:
            raise ValueError("ServerRelay needs this machine's relay key (machine_key(master, machine_id))")
        if not machine_id:
            raise ValueError("ServerRelay needs the machine id its tokens are minted for")
        if handshake_timeout <= 0 or max_pending < 1:
            raise ValueError("handshake_timeout must be positive and max_pending at least 1")
        if not inbound and not hub:
            raise ValueError("a relay without inbound connections needs a hub to register at (hub=HOST:PORT)")
        if hub and not hub_credential:
            raise ValueError("registering at a hub needs this machine's hub credential (hub_machine_key)")
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
        self.inbound = inbound
        self.hub = hub
        self._hub_credential = hub_credential
        self.hub_link = None

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` the relay listens on (the real port after ``start`` with port 0); ``hub/MACHINE`` when it
        listens nowhere and clients reach it through its hub only."""
        if not self.inbound:
            from sharedllm.relay.hub import via_hub

            return via_hub(self.machine_id)
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
        """Bind, listen and serve in a background thread, and register at the hub if there is one; returns when the
        relay accepts connections (the hub registration goes on in the background, see :attr:`hub_link`)."""
        if self.inbound:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            self._listen(socket.create_server((self.host, self.port), family=family, backlog=64), "relay-server")
            logger.info("relay listening on %s (TLS, %s) for machine %s, forwarding to %s:%d", self.endpoint,
                        self.fingerprint, self.machine_id, *self.target)
        if self.hub:
            from sharedllm.relay.hublink import HubLink

            self._stopping.clear()
            self.hub_link = HubLink(self.hub, self.machine_id, self._hub_credential, self._accepted).start()
            logger.info("relay of machine %s (TLS, %s) registers at hub %s%s", self.machine_id, self.fingerprint,
                        self.hub, "" if self.inbound else " and listens on no port (no inbound connections)")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self.hub_link is not None:
            self.hub_link.stop(timeout)
            self.hub_link = None
        super().stop(timeout)

    def __enter__(self) -> ServerRelay:
        return self.start() if self._listener is None and self.hub_link is None else self

    def _accepted(self, conn: socket.socket, addr: tuple) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        if not self._pending.acquire(blocking=False):
            self.refused += 1
            logger.warning("refused relay connection from %s: too many handshakes in progress", peer)
            close_sockets(conn)
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
            tune_socket(raw)
            deadline = time.monotonic() + self.handshake_timeout
            raw.settimeout(self.handshake_timeout)
            try:
                if not raw.recv(1, socket.MSG_PEEK):  # closed before a byte: the scheduler checking reachability
                    logger.debug("connection from %s closed before sending anything (a reachability check)", peer)
                    return None
                tls = self._ctx.wrap_socket(raw, server_side=True)
            except TimeoutError:
                return self._refuse(peer, f"no TLS handshake within {self.handshake_timeout:g}s")
            except (ssl.SSLError, OSError) as exc:
                return self._refuse(peer, f"TLS handshake failed ({getattr(exc, 'reason', None) or exc})")
            self._conns.attach(cid, tls)
            try:
                kind, payload = recv_frame(tls, deadline)
            except TimeoutError:
                return self._refuse(peer, f"no token within {self.handshake_timeout:g}s")
            except (ValueError, ConnectionError, OSError, struct.error) as exc:
                return self._refuse(peer, f"malformed handshake ({exc})")
            try:
                if kind not in (KIND_CONNECT, KIND_PROBE):
                    raise TokenError("malformed", f"unknown handshake kind {kind}")
                lease = verify_token(self._secret, payload.decode("ascii", "replace"), self.machine_id)
                if not self._is_allowed(lease):
                    raise TokenError("lease mismatch", f"lease {lease} does not hold machine {self.machine_id} now")
            except TokenError as exc:
                self._refuse(peer, str(exc))
                with contextlib.suppress(OSError):
                    send_frame(tls, STATUS_REFUSED, str(exc).encode()[:MAX_TOKEN_BYTES])
                return None
            if kind == KIND_PROBE:
                send_frame(tls, STATUS_OK, b"ok")
                logger.info("relay probe from %s for lease %s: token accepted", peer, lease)
                return None
            try:
                target = socket.create_connection(self.target, timeout=self.handshake_timeout)
            except OSError as exc:
                reason = f"rpc-server {self.target[0]}:{self.target[1]} is unreachable ({exc})"
                logger.warning("relay connection from %s (lease %s): %s", peer, lease, reason)
                with contextlib.suppress(OSError):
                    send_frame(tls, STATUS_REFUSED, reason.encode())
                return None
            tune_socket(target)
            self._conns.attach(cid, target, lease)
            if self._stopping.is_set() or not self._is_allowed(lease):  # stopped or revoked meanwhile
                return None
            send_frame(tls, STATUS_OK, b"ok")
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
            close_sockets(target, tls, raw)
            self._conns.remove(cid)
