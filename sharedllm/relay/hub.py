# SPDX-License-Identifier: AGPL-3.0-or-later
"""The relay hub: machines that accept no inbound connection (behind NAT) dial out to it, and clients reach them
through it. No Dask.

    client relay ══TLS, end to end══▶ hub ◀══ the machine's relay (it dialled out)

- **Machines.** A machine's relay keeps one control connection to the hub (``sharedllm.relay.hublink.HubLink``).
  The hub sends a challenge and the relay answers with ``HMAC(credential, challenge)``; the credential is
  :func:`hub_machine_key` of the hub's key, which the scheduler hands a machine only once the machine has been vouched
  for with the cluster secret (with its relay key). A machine that registers again replaces its old registration.
- **Clients.** A client relay opens a connection to the hub and sends the machine's id and a *hub token*: a lease
  token (:func:`sharedllm.relay.mint_token`) minted with :func:`hub_client_key`, so distinct from the token that opens
  the machine. The hub checks it (MAC, machine, expiry) before anything else; a connection without one gets nothing
  forwarded. Then it sends the machine, over its control connection, a fresh random connection id; the machine dials
  a data connection and proves ``HMAC(credential, id)``; the hub joins the two sockets and answers the client "ok".
- **End to end.** From there the client relay runs TLS with the machine's relay through the hub, exactly as on a
  direct connection: it pins the machine's certificate (from the scheduler) and sends the machine's lease token inside
  TLS, where the machine checks it and its current lease. The hub forwards ciphertext it cannot read; it cannot pose
  as a machine (no certificate key) nor open one (it never sees a machine token).
- **Limits.** Registered machines, handshakes in progress, connections per machine, and bytes per second per machine
  (a token bucket, both directions together); every refusal is logged with its reason and counted in :meth:`stats`.

The scheduler preload starts a hub by default (``--hub-port``), in its own process (``python -m sharedllm.relay
hub``); any public machine can run one for a mesh (``--hub-address`` and ``--hub-key-file`` on the scheduler).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from sharedllm.relay.tokens import TokenError, verify_token
from sharedllm.relay.wire import (
    STATUS_OK,
    STATUS_REFUSED,
    close_sockets,
    join_endpoint,
    kick,
    recv_frame,
    send_frame,
    tune_socket,
)

logger = logging.getLogger("sharedllm.relay")

_CONTEXT = b"sharedllm-hub-v1"
# First frames: a client's connect, a machine's registration and data connections; then the control channel's.
KIND_CONNECT, KIND_REGISTER, KIND_PROOF, KIND_OPEN, KIND_DATA, KIND_PING = 16, 17, 18, 19, 20, 21
_SPLICE_CHUNK = 1 << 18
PING_INTERVAL = 15.0  # the hub pings a machine silent this long, and drops it after three; the machine likewise
VIA_HUB_PREFIX = "hub/"  # the endpoint a machine without inbound connections is known by: "hub/MACHINE"


def via_hub(machine_id: str) -> str:
    """The endpoint name of a machine reached only through a hub (not ``HOST:PORT``: nothing dials it)."""
    return VIA_HUB_PREFIX + machine_id


def hub_key(master: bytes) -> bytes:
    """The hub's key, derived from the scheduler's relay master key (a hub of one's own); a separate hub gets a key
    of its own from a file instead. It can mint hub tokens and check machines, and open no machine."""
    return hmac.new(master, _CONTEXT + b"|hub", hashlib.sha256).digest()


def hub_machine_key(key: bytes, machine_id: str) -> bytes:
    """What ``machine_id`` proves itself to the hub with."""
    return hmac.new(key, _CONTEXT + b"|machine|" + machine_id.encode(), hashlib.sha256).digest()


def hub_client_key(key: bytes) -> bytes:
    """What the scheduler mints clients' hub tokens with (:func:`sharedllm.relay.mint_token`)."""
    return hmac.new(key, _CONTEXT + b"|client", hashlib.sha256).digest()


def hub_proof(credential: bytes, what: str) -> str:
    return hmac.new(credential, _CONTEXT + b"|proof|" + what.encode(), hashlib.sha256).hexdigest()


class _Bucket:
    """Bytes per second, shared by both directions of every connection of one machine."""

    def __init__(self, rate: float | None):
        self.rate = rate
        self._level = rate or 0.0
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._level = min(self.rate, self._level + (now - self._stamp) * self.rate) - n
            self._stamp = now
            wait = -self._level / self.rate if self._level < 0 else 0.0
        if wait > 0:
            time.sleep(wait)


@dataclass
class _Machine:
    machine_id: str
    sock: socket.socket
    peer: str
    credential: bytes
    bucket: _Bucket
    since: float = field(default_factory=time.time)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    connections: int = 0
    bytes_to: int = 0  # client -> machine
    bytes_from: int = 0  # machine -> client

    def send(self, kind: int, payload: bytes) -> None:
        with self.send_lock:
            send_frame(self.sock, kind, payload)


@dataclass
class _Waiting:
    machine_id: str
    arrived: threading.Event = field(default_factory=threading.Event)
    sock: socket.socket | None = None


class RelayHub:
    """A hub listening on ``host:port``; ``key`` is :func:`hub_key` (or a separate hub's key from its file)."""

    def __init__(self, host: str, port: int, key: bytes, *, max_connections_per_machine: int = 32,
                 max_machines: int = 10_000, max_pending: int = 64, max_bytes_per_s: float | None = None,
                 handshake_timeout: float = 5.0, open_timeout: float = 10.0, ping_interval: float = PING_INTERVAL):
        if len(key) < 16:
            raise ValueError("the hub key must be at least 16 bytes")
        if max_connections_per_machine < 1 or max_machines < 1 or max_pending < 1:
            raise ValueError("hub limits must be at least 1")
        self.host, self.port = host, port
        self._key = key
        self._client_key = hub_client_key(key)
        self.max_connections_per_machine = max_connections_per_machine
        self.max_machines = max_machines
        self.max_bytes_per_s = max_bytes_per_s
        self.handshake_timeout = handshake_timeout
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval
        self._pending = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._machines: dict[str, _Machine] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._socks: set[socket.socket] = set()
        self._leases: dict[str, set[socket.socket]] = {}  # lease -> its clients' live sockets
        self._revoked: dict[str, float] = {}  # ended leases -> when their tokens expire at the latest
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self.refused: dict[str, int] = {}
        self.forwarded = 0

    @property
    def endpoint(self) -> str:
        return join_endpoint(self.host, self.port)

    def start(self) -> RelayHub:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.create_server((self.host, self.port), family=family, backlog=128)
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name=f"hub-{self.port}", daemon=True).start()
        logger.info("relay hub listening on %s", self.endpoint)
        return self

    def stop(self) -> None:
        self._stopping.set()
        kick(self._listener)
        close_sockets(self._listener)
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            kick(s)

    def __enter__(self) -> RelayHub:
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def machines(self) -> list[str]:
        with self._lock:
            return sorted(self._machines)

    def revoke(self, lease: str, ttl: float = 24 * 3600.0) -> int:
        """The lease ended: refuse its hub tokens from now on and close its live connections; how many closed.
        (The machines refuse it too, inside TLS; this stops the hub from forwarding its handshakes at all.)"""
        now = time.time()
        with self._lock:
            self._revoked = {k: t for k, t in self._revoked.items() if t > now}  # forget what expired anyway
            self._revoked[lease] = now + ttl
            socks = list(self._leases.pop(lease, ()))
        for s in socks:
            kick(s)
        if socks:
            logger.info("hub closed %d connection(s) of lease %s, which ended", len(socks), lease)
        return len(socks)

    def stats(self) -> dict:
        """What the dashboard and the benchmarks read: per machine, since when it is registered, its live and total
        connections and the bytes forwarded each way; the refusals by reason."""
        with self._lock:
            machines = {m: {"since": r.since, "active": r.active, "connections": r.connections,
                            "bytes_to": r.bytes_to, "bytes_from": r.bytes_from, "peer": r.peer}
                        for m, r in self._machines.items()}
            return {"endpoint": self.endpoint, "machines": machines, "refused": dict(self.refused),
                    "forwarded": self.forwarded}

    # --- accepting -------------------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        while not self._stopping.is_set():
            try:
                conn, addr = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            peer = f"{addr[0]}:{addr[1]}"
            if not self._pending.acquire(blocking=False):
                self._refuse(None, peer, "too many handshakes in progress")
                close_sockets(conn)
                continue
            threading.Thread(target=self._first_frame, args=(conn, peer), name=f"hub-conn-{peer}",
                             daemon=True).start()

    def _track(self, sock: socket.socket, add: bool) -> None:
        with self._lock:
            (self._socks.add if add else self._socks.discard)(sock)

    def _refuse(self, sock: socket.socket | None, peer: str, reason: str) -> None:
        key = reason.split(" (")[0].split(":")[0]
        with self._lock:
            self.refused[key] = self.refused.get(key, 0) + 1
        logger.warning("hub refused %s: %s", peer, reason)
        if sock is not None:
            with contextlib.suppress(OSError):
                send_frame(sock, STATUS_REFUSED, reason.encode()[:1024])

    def _first_frame(self, sock: socket.socket, peer: str) -> None:
        released = False
        keep = False
        self._track(sock, True)
        try:
            tune_socket(sock)
            deadline = time.monotonic() + self.handshake_timeout
            try:
                kind, payload = recv_frame(sock, deadline)
                msg = json.loads(payload)
                if not isinstance(msg, dict) or not isinstance(msg.get("machine"), str):
                    raise ValueError("no machine named")
            except TimeoutError:
                return self._refuse(None, peer, f"no handshake within {self.handshake_timeout:g}s")
            except (ValueError, ConnectionError, OSError, struct.error) as exc:
                return self._refuse(sock, peer, f"malformed handshake ({exc})")
            if kind == KIND_DATA:  # a machine dialling back: hand the socket to the client waiting for it
                keep = self._data(sock, peer, msg)
                return None
            self._pending.release()
            released = True
            if kind == KIND_REGISTER:
                self._register(sock, peer, msg["machine"], deadline)
            elif kind == KIND_CONNECT:
                self._connect(sock, peer, msg)
            else:
                self._refuse(sock, peer, f"unknown handshake kind {kind}")
            return None
        except Exception:
            logger.exception("hub connection from %s failed", peer)
            return None
        finally:
            if not released:
                self._pending.release()
            if not keep:
                self._track(sock, False)
                close_sockets(sock)

    # --- machines --------------------------------------------------------------------------------------------------

    def _register(self, sock: socket.socket, peer: str, machine_id: str, deadline: float) -> None:
        credential = hub_machine_key(self._key, machine_id)
        challenge = secrets.token_hex(16)
        send_frame(sock, STATUS_OK, challenge.encode())
        try:
            kind, proof = recv_frame(sock, deadline)
        except (TimeoutError, ValueError, ConnectionError, OSError, struct.error) as exc:
            return self._refuse(None, peer, f"machine {machine_id} gave no proof ({exc})")
        expected = hub_proof(credential, "register|" + challenge).encode()
        if kind != KIND_PROOF or not hmac.compare_digest(proof, expected):
            return self._refuse(sock, peer, f"bad proof: {machine_id} is not vouched for by this mesh's scheduler")
        rec = _Machine(machine_id, sock, peer, credential, _Bucket(self.max_bytes_per_s))
        with self._lock:
            old = self._machines.get(machine_id)
            if old is None and len(self._machines) >= self.max_machines:
                rec = None
            else:
                self._machines[machine_id] = rec
        if rec is None:
            return self._refuse(sock, peer, f"too many machines ({self.max_machines}) registered at this hub")
        if old is not None:
            logger.info("machine %s registered again from %s; dropping its registration from %s", machine_id, peer,
                        old.peer)
            kick(old.sock)
        send_frame(sock, STATUS_OK, b"registered")
        logger.info("machine %s registered at the hub from %s", machine_id, peer)
        try:
            self._control_loop(rec)
        finally:
            with self._lock:
                if self._machines.get(machine_id) is rec:
                    del self._machines[machine_id]
            logger.info("machine %s left the hub", machine_id)

    def _control_loop(self, rec: _Machine) -> None:
        """Keep the machine's control connection: ping when idle, drop it when the machine stays silent."""
        silent_since = time.monotonic()
        while not self._stopping.is_set():
            try:
                kind, _payload = recv_frame(rec.sock, time.monotonic() + self.ping_interval)
            except TimeoutError:
                if time.monotonic() - silent_since > 3 * self.ping_interval:
                    logger.warning("machine %s is silent on the hub for %.0fs; dropping it", rec.machine_id,
                                   time.monotonic() - silent_since)
                    return
                with contextlib.suppress(OSError):
                    rec.send(KIND_PING, b"")
                continue
            except (ValueError, ConnectionError, OSError, struct.error):
                return
            silent_since = time.monotonic()
            if kind != KIND_PING:
                logger.warning("machine %s sent an unexpected frame %d on its hub control connection", rec.machine_id,
                               kind)

    def _data(self, sock: socket.socket, peer: str, msg: dict) -> bool:
        """A machine's data connection for a waiting client; True when the client thread took the socket."""
        conn_id, machine_id = str(msg.get("conn", "")), msg["machine"]
        with self._lock:
            waiting = self._waiting.get(conn_id)
            rec = self._machines.get(machine_id)
        if waiting is None or rec is None or waiting.machine_id != machine_id:
            self._refuse(sock, peer, f"unknown connection id for machine {machine_id}")
            return False
        expected = hub_proof(rec.credential, "data|" + conn_id).encode()
        if not hmac.compare_digest(str(msg.get("proof", "")).encode(), expected):
            self._refuse(sock, peer, f"bad proof on a data connection of {machine_id}")
            return False
        with self._lock:
            if self._waiting.pop(conn_id, None) is None:  # the client gave up meanwhile
                return False
        sock.settimeout(None)
        send_frame(sock, STATUS_OK, b"ok")
        waiting.sock = sock
        waiting.arrived.set()
        return True

    # --- clients ---------------------------------------------------------------------------------------------------

    def _connect(self, sock: socket.socket, peer: str, msg: dict) -> None:
        machine_id = msg["machine"]
        try:
            lease = verify_token(self._client_key, str(msg.get("token", "")), machine_id)
        except TokenError as exc:
            return self._refuse(sock, peer, f"{exc}")
        with self._lock:
            ended = lease in self._revoked
            if not ended:
                self._leases.setdefault(lease, set()).add(sock)
        if ended:
            return self._refuse(sock, peer, f"lease mismatch: lease {lease} has ended")
        try:
            self._join(sock, peer, machine_id, lease)
        finally:
            with self._lock:
                live = self._leases.get(lease)
                if live is not None:
                    live.discard(sock)
                    if not live:
                        del self._leases[lease]

    def _join(self, sock: socket.socket, peer: str, machine_id: str, lease: str) -> None:
        """Ask the machine for a data connection and splice the client's socket to it."""
        with self._lock:
            rec = self._machines.get(machine_id)
            if rec is not None and rec.active >= self.max_connections_per_machine:
                full = True
            else:
                full = False
                if rec is not None:
                    rec.active += 1
                    rec.connections += 1
        if rec is None:
            return self._refuse(sock, peer, f"machine {machine_id} is not connected to this hub")
        if full:
            return self._refuse(sock, peer, f"too many connections to machine {machine_id} "
                                            f"({self.max_connections_per_machine})")
        conn_id = secrets.token_hex(16)
        waiting = _Waiting(machine_id)
        with self._lock:
            self._waiting[conn_id] = waiting
        try:
            try:
                rec.send(KIND_OPEN, conn_id.encode())
            except OSError as exc:
                return self._refuse(sock, peer, f"machine {machine_id} is unreachable on its hub connection ({exc})")
            if not waiting.arrived.wait(self.open_timeout) or waiting.sock is None:
                return self._refuse(sock, peer, f"machine {machine_id} did not dial back within "
                                                f"{self.open_timeout:g}s")
            machine_sock = waiting.sock
            try:
                sock.settimeout(None)
                send_frame(sock, STATUS_OK, b"ok")
                with self._lock:
                    self.forwarded += 1
                logger.info("hub joined %s (lease %s) to machine %s", peer, lease, machine_id)
                self._splice(sock, machine_sock, rec)
            finally:
                self._track(machine_sock, False)
                close_sockets(machine_sock)
            return None
        finally:
            with self._lock:
                self._waiting.pop(conn_id, None)
                rec.active -= 1

    def _splice(self, client: socket.socket, machine: socket.socket, rec: _Machine) -> None:
        """Move bytes both ways until either side closes; one thread per direction (this one: client -> machine)."""

        def pump(src: socket.socket, dst: socket.socket, to_machine: bool) -> None:
            try:
                while data := src.recv(_SPLICE_CHUNK):
                    rec.bucket.take(len(data))
                    dst.sendall(data)
                    if to_machine:
                        rec.bytes_to += len(data)
                    else:
                        rec.bytes_from += len(data)
            except OSError:
                pass
            finally:
                kick(dst)
                kick(src)

        back = threading.Thread(target=pump, args=(machine, client, False), name="hub-splice", daemon=True)
        back.start()
        pump(client, machine, True)
        back.join()
