# SPDX-License-Identifier: AGPL-3.0-or-later
"""Running the app: a listening socket, and a server in a thread (tests, benchmarks, the CLI)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port=0``: any free port) for uvicorn's ``sockets=``.

    It is made with ``IPPROTO_TCP`` and ``TCP_NODELAY``: asyncio disables Nagle's algorithm only on connections of
    sockets that name their protocol, and with it on, each server-sent event after the headers would wait for the
    client's delayed ACK (40 ms on Linux). It listens at once: a client that connects before the server has started
    (``sharedllm serve`` prints its URL first) waits in the backlog instead of being refused.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)  # uvicorn's default backlog; it listens again with its own when it starts
    except OSError:
        sock.close()
        raise
    return sock


class ServerThread:
    """Serve an ASGI app with uvicorn in a background thread (tests, benchmarks): ``with ServerThread(app) as s:``.

    ``port=0`` picks a free port; ``s.url`` is the base URL once started.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any):
        import uvicorn

        self._sock = listen_socket(host, port)
        self.host, self.port = host, self._sock.getsockname()[1]
        config.setdefault("log_level", "warning")
        self.server = uvicorn.Server(uvicorn.Config(app, **config))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="sharedllm-openai-server", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
