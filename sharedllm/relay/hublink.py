# SPDX-License-Identifier: AGPL-3.0-or-later
"""A machine's side of the relay hub (:mod:`sharedllm.relay.hub`): its registration, kept up, and the data
connections the hub asks it to dial for clients. No Dask."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable

from sharedllm.relay.hub import KIND_DATA, KIND_OPEN, KIND_PING, KIND_PROOF, KIND_REGISTER, PING_INTERVAL, hub_proof
from sharedllm.relay.wire import (
    STATUS_OK,
    close_sockets,
    join_endpoint,
    kick,
    parse_endpoint,
    recv_frame,
    send_frame,
    tune_socket,
)

logger = logging.getLogger("sharedllm.relay")


class HubLink:
    """A machine's registration at a hub: one control connection, dialled again with backoff when it drops; each
    connection the hub asks for is dialled and handed to ``on_connection(sock, (\"hub\", id))`` (the relay's TLS side).
    """

    def __init__(self, hub: str, machine_id: str, credential: bytes,
                 on_connection: Callable[[socket.socket, tuple], None], *, connect_timeout: float = 10.0,
                 max_backoff: float = 10.0, ping_interval: float = PING_INTERVAL):
        self.hub = parse_endpoint(hub)
        self.machine_id = machine_id
        self._credential = credential
        self._on_connection = on_connection
        self.connect_timeout = connect_timeout
        self.max_backoff = max_backoff
        self.ping_interval = ping_interval
        self.connected = threading.Event()
        self.last_error: str | None = None
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        return join_endpoint(*self.hub)

    def start(self) -> HubLink:
        self._thread = threading.Thread(target=self._run, name=f"hub-link-{self.machine_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        kick(self._sock)
        if self._thread is not None:
            self._thread.join(timeout)

    def _dial(self, kind: int, msg: dict) -> socket.socket:
        sock = socket.create_connection(self.hub, timeout=self.connect_timeout)
        tune_socket(sock)
        send_frame(sock, kind, json.dumps(msg).encode())
        return sock

    def _register(self) -> socket.socket:
        sock = self._dial(KIND_REGISTER, {"machine": self.machine_id})
        try:
            deadline = time.monotonic() + self.connect_timeout
            status, challenge = recv_frame(sock, deadline)
            if status != STATUS_OK:
                raise ConnectionRefusedError(challenge.decode(errors="replace"))
            send_frame(sock, KIND_PROOF, hub_proof(self._credential, "register|" + challenge.decode()).encode())
            status, answer = recv_frame(sock, deadline)
            if status != STATUS_OK:
                raise ConnectionRefusedError(answer.decode(errors="replace"))
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            return sock
        except BaseException:
            close_sockets(sock)
            raise

    def _run(self) -> None:
        backoff = 0.25
        while not self._stopping.is_set():
            try:
                sock = self._sock = self._register()
            except (OSError, ValueError, struct.error) as exc:
                self.last_error = f"cannot register at hub {self.endpoint}: {exc}"
                logger.warning("%s; again in %.1fs", self.last_error, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            backoff = 0.25
            self.last_error = None
            self.connected.set()
            logger.info("machine %s registered at hub %s", self.machine_id, self.endpoint)
            try:
                self._serve(sock)
            finally:
                self.connected.clear()
                close_sockets(sock)
            if not self._stopping.is_set():
                logger.warning("machine %s lost its hub connection to %s; registering again", self.machine_id,
                               self.endpoint)

    def _serve(self, sock: socket.socket) -> None:
        while not self._stopping.is_set():
            try:  # the hub pings within ping_interval of silence: three without a frame, and it is gone
                kind, payload = recv_frame(sock, time.monotonic() + 3 * self.ping_interval)
            except (TimeoutError, ValueError, ConnectionError, OSError, struct.error):
                return
            if kind == KIND_PING:
                with contextlib.suppress(OSError):
                    send_frame(sock, KIND_PING, b"")
            elif kind == KIND_OPEN:
                threading.Thread(target=self._open, args=(payload.decode("ascii", "replace"),),
                                 name="hub-link-open", daemon=True).start()

    def _open(self, conn_id: str) -> None:
        try:
            sock = self._dial(KIND_DATA, {"machine": self.machine_id, "conn": conn_id,
                                          "proof": hub_proof(self._credential, "data|" + conn_id)})
            status, reason = recv_frame(sock, time.monotonic() + self.connect_timeout)
        except (OSError, ValueError, struct.error) as exc:
            logger.warning("machine %s could not dial the hub back for a client: %s", self.machine_id, exc)
            return
        if status != STATUS_OK:
            logger.warning("hub refused machine %s's data connection: %s", self.machine_id,
                           reason.decode(errors="replace"))
            close_sockets(sock)
            return
        sock.settimeout(None)
        self._on_connection(sock, ("hub", conn_id[:8]))
