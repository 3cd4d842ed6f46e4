# SPDX-License-Identifier: AGPL-3.0-or-later
"""The link emulator the benchmarks put between the engine and the machines: bytes intact, in order, never early."""

from __future__ import annotations

import socket
import threading
import time

from sharedllm.linkem import LinkEmulator


def _echo_server() -> tuple[socket.socket, str]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def test_the_link_delays_each_round_trip_and_keeps_the_bytes():
    server, target = _echo_server()
    with server, LinkEmulator(target, rtt_ms=40, mbit=8) as link:
        host, port = link.endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            payload = bytes(range(256)) * 400  # 100 KiB: 0.1 s at 8 Mbit/s each way
            t0 = time.monotonic()
            s.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += s.recv(65536)
            elapsed = time.monotonic() - t0
    assert got == payload  # intact and in order
    # A lower bound only (the emulator waits at least this long): the last byte leaves after the whole payload's
    # time on the link, then takes a round trip (the echo's way back overlaps with the way there).
    assert elapsed >= 0.040 + len(payload) * 8 / 8e6
    assert link.bytes == [len(payload), len(payload)]
