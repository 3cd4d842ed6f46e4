# SPDX-License-Identifier: AGPL-3.0-or-later
"""The link emulator the benchmarks put between the engine and the machines: bytes intact, in order, never early."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import pytest

from bench import linkem
from bench.linkem import LinkControl, LinkEmulator


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


def _frame_server() -> tuple[socket.socket, str]:
    """A request/response server, as an rpc-server is: it reads a whole frame (4-byte length, payload), then answers
    it with the same frame."""
    server = socket.create_server(("127.0.0.1", 0))

    def recv_exact(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            if not (chunk := conn.recv(n - len(buf))):
                raise ConnectionError
            buf += chunk
        return buf

    def serve() -> None:
        conn, _ = server.accept()
        with conn, contextlib.suppress(ConnectionError):
            while True:
                head = recv_exact(conn, 4)
                conn.sendall(head + recv_exact(conn, struct.unpack("<I", head)[0]))

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def _exchange(endpoint: str, messages: list[bytes]) -> int:
    """Send each message as a frame in two writes (its length, then its payload, as llama.cpp sends a command) and
    wait for the whole answer before the next: one synchronous round trip each. Returns the bytes each way."""
    host, port = endpoint.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for m in messages:
            s.sendall(struct.pack("<I", len(m)))
            s.sendall(m)
            got = b""
            while len(got) < len(m) + 4:
                chunk = s.recv(65536)
                assert chunk, "the link closed early"
                got += chunk
            assert got[4:] == m
    return sum(len(m) + 4 for m in messages)


def _wait_for(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
    return value


MESSAGES = [bytes([i]) * (10 + 1000 * i) for i in range(6)]


def test_the_link_counts_round_trips_and_bytes_per_direction():
    server, target = _frame_server()
    with server, LinkEmulator(target) as link:
        assert link.trace(True) == {"events": []}
        total = _exchange(link.endpoint, MESSAGES)
        # The last echo may still be on its way back through the writer when the client has it: wait for the count.
        stats = _wait_for(lambda: (st := link.stats())["bytes"] == [total, total] and st)
        events = link.trace(False)["events"]
    # Every chunk read is passed on, in each direction, and the trace follows the bytes.
    for direction in (0, 1):
        for kind in ("r", "s"):
            assert sum(e[3] for e in events if e[2] == direction and e[4] == kind) == total
    assert {e[1] for e in events} == {1}  # one connection
    assert stats["round_trips"] == len(MESSAGES)  # however many reads each burst took
    assert stats["turns"] == 2 * len(MESSAGES) - 1
    assert stats["chunks"][0] >= len(MESSAGES) and stats["chunks"][1] >= len(MESSAGES)
    assert stats["connections"] == 1
    assert (stats["rtt_ms"], stats["mbit"]) == (0.0, None)


def test_the_link_in_its_own_process_counts_and_takes_commands(tmp_path):
    server, target = _frame_server()
    control_dir = tmp_path / "ctl"
    with server, LinkEmulator(target, rtt_ms=2, mbit=1000, process=True, control_dir=control_dir) as link:
        assert link.pid != os.getpid()
        total = _exchange(link.endpoint, MESSAGES)
        stats = _wait_for(lambda: (st := link.stats())["bytes"] == [total, total] and st)
        assert stats["round_trips"] == len(MESSAGES)
        assert (stats["rtt_ms"], stats["mbit"]) == (2.0, 1000)
        # The same emulator through its control socket, as a benchmark reaches the emulators an engine started.
        [control] = LinkControl.find(control_dir)
        assert control.info()["pid"] == link.pid and control.info()["endpoint"] == link.endpoint
        assert control.stats()["round_trips"] == len(MESSAGES)
        assert control.set(0, None)["rtt_ms"] == 0.0
        assert link.stats()["rtt_ms"] == 0.0
        with pytest.raises(ValueError):
            control.ask({"op": "nonsense"})
        proc = link._proc
    assert proc.poll() is not None  # close() ended the child
    assert not list(control_dir.glob("*.sock"))


def test_wire_mode_puts_the_link_between_the_client_relay_and_its_server_relay(tmp_path):
    from sharedllm import relay

    server, target = _frame_server()
    cert, key, _ca = relay.make_self_signed(tmp_path / "certs")
    secret = relay.machine_key(b"k" * 32, "m1")
    sr = relay.ServerRelay("127.0.0.1", 0, target, certfile=cert, keyfile=key, secret=secret,
                           machine_id="m1").start()
    sr.set_lease("lease")
    token = relay.mint_token(secret, "lease", "m1", ttl=600)
    cr = relay.ClientRelay(sr.endpoint, token, fingerprint=relay.cert_fingerprint(cert)).start()
    try:
        with server, LinkEmulator(cr.endpoint, process=True, relay=cr) as link:
            assert link.endpoint == cr.endpoint  # llama.cpp still connects to the relay
            assert cr.remote_endpoint != sr.endpoint  # which reaches its server relay through the link
            total = _exchange(link.endpoint, MESSAGES)
            # TLS on the link: the handshake, the token and a record header and tag per record, both ways.
            stats = _wait_for(lambda: (st := link.stats())["bytes"][1] > total and st)
            assert stats["bytes"][0] > total
            assert stats["round_trips"] >= len(MESSAGES)
    finally:
        cr.stop()
        sr.stop()


def test_the_engines_tunnel_hook_puts_a_link_in_front_of_each_machine():
    """``mesh.load(..., tunnel_hook=linkem.hook(...))``: the engine resolves the hook by name and calls it with its
    endpoint of each machine; llama.cpp then connects to the emulators' endpoints."""
    from sharedllm.engine.load import run_tunnel_hook

    target, path, kwargs = linkem.hook(rtt_ms=2)
    assert (target, kwargs) == ("bench.linkem:emulate", {"rtt_ms": 2})
    server, endpoint = _frame_server()
    try:
        with server:
            local = run_tunnel_hook((target, path, kwargs), {"machine-t": endpoint})
            assert local["machine-t"] != endpoint
            total = _exchange(local["machine-t"], MESSAGES)
            link = linkem._LINKS["machine-t"]
            assert _wait_for(lambda: link.stats()["bytes"] == [total, total])
            assert link.stats()["rtt_ms"] == 2.0
    finally:
        linkem._LINKS.pop("machine-t").close()
