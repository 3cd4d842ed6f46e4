# SPDX-License-Identifier: AGPL-3.0-or-later
"""A link emulator: a local TCP proxy that adds latency and a bandwidth cap, in user space (no root, no netem).

    with LinkEmulator("127.0.0.1:50052", rtt_ms=20, mbit=100) as link:
        ...  # connect to link.endpoint instead of 127.0.0.1:50052

Each direction of each connection is a one-way link: a chunk read at time t leaves at
``max(t, link free) + size / rate + rtt / 2``, in order. It is how the benchmarks put a real link (a home's uplink, a
LAN across a building) between the engine and a loopback machine: the engine starts one per machine when its spec
asks for it (``EngineSpec.link``), in front of that machine's tunnel. Not for production paths.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import threading
import time

logger = logging.getLogger(__name__)

_CHUNK = 65536


class LinkEmulator:
    """Forward connections on ``endpoint`` to ``target`` over an emulated link (see the module's docstring)."""

    def __init__(self, target: str, rtt_ms: float = 0.0, mbit: float | None = None):
        host, _, port = target.rpartition(":")
        self.target = (host.strip("[]"), int(port))
        self.one_way = max(rtt_ms, 0.0) / 2000.0
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self.bytes = [0, 0]  # forwarded to the target, back from it
        self.chunks = [0, 0]

    def start(self) -> LinkEmulator:
        threading.Thread(target=self._accept, name="linkem-accept", daemon=True).start()
        return self

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for s in [self._listener, *self._socks]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError as exc:
                logger.warning("link emulator: cannot reach %s:%d: %s", *self.target, exc)
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, server]
            self._direction(client, server, 0)
            self._direction(server, client, 1)

    def _direction(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        """One way of one connection: a reader that stamps each chunk with when it arrives, a writer that sends it
        then."""
        line: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()
        free_at = [0.0]  # when the emulated link has sent everything before

        def read() -> None:
            try:
                while data := src.recv(_CHUNK):
                    now = time.monotonic()
                    sent = max(now, free_at[0]) + (len(data) / self.bytes_per_s if self.bytes_per_s else 0.0)
                    free_at[0] = sent
                    self.bytes[index] += len(data)
                    self.chunks[index] += 1
                    with ready:
                        line.append((sent + self.one_way, data))
                        ready.notify()
            except OSError:
                pass
            with ready:
                line.append((0.0, b""))  # the end, after what came before it
                ready.notify()

        def write() -> None:
            try:
                while True:
                    with ready:
                        while not line:
                            ready.wait()
                        due, data = line.popleft()
                    if not data:
                        break
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    dst.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=read, name="linkem-read", daemon=True).start()
        threading.Thread(target=write, name="linkem-write", daemon=True).start()
