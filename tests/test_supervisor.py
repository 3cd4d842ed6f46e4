# SPDX-License-Identifier: AGPL-3.0-or-later
"""The rpc-server supervisor on its own (no Dask): start, restart after a crash, crash loop -> failed."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from sharedllm import ggml
from sharedllm.machine.server import RPCServerSupervisor
from sharedllm.machine.state import RPCServerConfig

pytestmark = pytest.mark.mesh  # real rpc-server and relay processes


async def _wait_state(sup: RPCServerSupervisor, want: str, timeout: float = 60.0, reason: str = "", **match) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = sup.status.to_dict()
        if st["state"] == want and reason in (st["reason"] or "") and all(st[k] == v for k, v in match.items()):
            return st
        assert time.monotonic() < deadline, f"supervisor stuck in {st}"
        await asyncio.sleep(0.05)


def test_restarts_a_killed_server_on_the_same_endpoint(tmp_path):
    async def scenario():
        seen = []
        cfg = RPCServerConfig(threads=1, backoff=0.1)
        sup = RPCServerSupervisor(cfg, tmp_path, on_change=lambda s: seen.append(s.state))
        st = (await sup.start()).to_dict()
        assert st["state"] == "ready" and st["protocol"] == ".".join(map(str, ggml.rpc_protocol_version()))
        assert st["devices"][0]["name"] == "CPU"
        os.kill(st["pid"], signal.SIGKILL)
        again = await _wait_state(sup, "ready", restarts=1)
        assert again["endpoint"] == st["endpoint"] and again["pid"] != st["pid"]
        assert await asyncio.to_thread(ggml.rpc_hello, again["endpoint"], 5.0)
        assert "restarting" in seen
        stopped = (await sup.stop()).to_dict()
        assert stopped["state"] == "stopped"
        await asyncio.sleep(0.3)
        try:
            os.kill(again["pid"], 0)
            raise AssertionError("rpc-server still running after stop()")
        except ProcessLookupError:
            pass

    asyncio.run(scenario())


def test_crash_loop_is_marked_failed_with_the_reason(tmp_path):
    async def scenario():
        cfg = RPCServerConfig(threads=1, devices=("NOPE0",), max_restarts=2, backoff=0.05, cooldown=3600,
                              start_timeout=20)
        sup = RPCServerSupervisor(cfg, tmp_path)
        await sup.start()
        st = await _wait_state(sup, "failed", timeout=90, reason="crash loop")
        assert "crash loop" in st["reason"] and "unknown device NOPE0" in st["reason"]
        assert st["restarts"] == 2
        await sup.stop()

    asyncio.run(scenario())


def test_relay_admits_only_the_current_lease_and_comes_back(tmp_path):
    """The supervisor's relay: loopback rpc-server behind it, the lease it is told, restarts on the same port."""
    from sharedllm.relay import ClientRelay, TokenError, machine_key, mint_token

    key = machine_key(b"m" * 32, "box")

    def check(relay: dict, lease: str) -> None:
        token = mint_token(key, lease, "box", ttl=60)
        ClientRelay(relay["endpoint"], token, fingerprint=relay["fingerprint"]).check()

    async def scenario():
        cfg = RPCServerConfig(threads=1, backoff=0.1, machine_id="box")
        sup = RPCServerSupervisor(cfg, tmp_path)
        st = (await sup.start(relay_key=key)).to_dict()
        try:
            assert st["endpoint"].startswith("127.0.0.1:") and not st["direct"]
            relay = st["relay"]
            assert relay["target"] == st["endpoint"] and relay["fingerprint"].startswith("sha256:")
            # Nobody is admitted before the scheduler names a lease.
            try:
                await asyncio.to_thread(check, relay, "A")
                raise AssertionError("a token was admitted before any lease")
            except TokenError as exc:
                assert exc.reason == "lease mismatch"
            await sup.set_lease("A", seq=1)
            await asyncio.to_thread(check, relay, "A")
            await sup.set_lease(None, seq=0)  # an older change arriving late is ignored
            await asyncio.to_thread(check, relay, "A")
            await sup.set_lease("B", seq=2)
            try:
                await asyncio.to_thread(check, relay, "A")
                raise AssertionError("lease A's token opened lease B's machine")
            except TokenError as exc:
                assert exc.reason == "lease mismatch"
            # A killed relay comes back on the same endpoint, still admitting lease B.
            os.kill(relay["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while (sup.status.relay or {}).get("pid") in (None, relay["pid"]):
                assert time.monotonic() < deadline, "the relay was not restarted"
                await asyncio.sleep(0.05)
            assert sup.status.relay["endpoint"] == relay["endpoint"]
            await asyncio.to_thread(check, sup.status.relay, "B")
            pid = sup.status.relay["pid"]
        finally:
            await sup.stop()
        assert sup.status.relay is None
        await asyncio.sleep(0.3)
        try:
            os.kill(pid, 0)
            raise AssertionError("relay still running after stop()")
        except ProcessLookupError:
            pass

    asyncio.run(scenario())


def _gone(pid: int) -> bool:
    from sharedllm.dataplane import process_state

    return process_state(pid) in (None, "Z")  # Z: exited, not reaped yet


def test_a_new_supervisor_adopts_the_running_server_and_relay_with_their_lease(tmp_path):
    """A worker that loses its scheduler detaches; the next one on the machine adopts what still serves."""
    from sharedllm.relay import ClientRelay, machine_key, mint_token

    key = machine_key(b"m" * 32, "box")

    def check(relay: dict, lease: str) -> None:
        ClientRelay(relay["endpoint"], mint_token(key, lease, "box", ttl=60), fingerprint=relay["fingerprint"]).check()

    async def scenario():
        first = RPCServerSupervisor(RPCServerConfig(threads=1, backoff=0.1, machine_id="box"), tmp_path)
        st = (await first.start(relay_key=key)).to_dict()
        await first.set_lease("A", seq=1)
        first.detach()
        assert not _gone(st["pid"]) and not _gone(st["relay"]["pid"])  # still serving, nobody supervising

        second = RPCServerSupervisor(RPCServerConfig(threads=1, backoff=0.1, machine_id="box"), tmp_path)
        try:
            again = (await second.start(relay_key=key)).to_dict()
            assert again["state"] == "ready" and again["pid"] == st["pid"] and again["endpoint"] == st["endpoint"]
            assert again["relay"]["pid"] == st["relay"]["pid"] and again["relay"]["lease"] == "A"
            await asyncio.to_thread(check, again["relay"], "A")  # lease A's client goes on
            await second.set_lease("B", seq=1)  # the new supervisor drives the adopted relay
            await asyncio.to_thread(check, again["relay"], "B")
            # The adopted server is supervised like a child: killed, it is restarted (its status is unknown).
            os.kill(st["pid"], signal.SIGKILL)
            back = await _wait_state(second, "ready", restarts=1)
            assert back["pid"] != st["pid"] and back["endpoint"] == st["endpoint"]
            assert back["last_exit"]["pid"] == st["pid"] and back["last_exit"]["code"] is None
        finally:
            await second.stop()
        deadline = time.monotonic() + 10
        while not (_gone(back["pid"]) and _gone(st["relay"]["pid"])):
            assert time.monotonic() < deadline, "stop() left the adopted relay or the new server running"
            await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_a_data_plane_nobody_adopts_stops_after_the_orphan_timeout(tmp_path):
    async def scenario():
        cfg = RPCServerConfig(threads=1, machine_id="box", orphan_timeout=1.0)
        sup = RPCServerSupervisor(cfg, tmp_path)
        st = (await sup.start(relay_key=b"k" * 32)).to_dict()
        sup.detach()
        deadline = time.monotonic() + 30
        while not (_gone(st["pid"]) and _gone(st["relay"]["pid"])):
            assert time.monotonic() < deadline, "an orphaned rpc-server or relay kept serving"
            await asyncio.sleep(0.1)

    asyncio.run(scenario())


def test_dead_control_sockets_are_swept_and_live_ones_kept(tmp_path):
    """A relay killed with SIGKILL leaves its control socket; the next one to take a socket in that directory
    removes those nobody listens on (old enough not to be one just bound), and leaves a live one."""
    import socket
    import threading

    from sharedllm.dataplane import DEAD_SOCKET_AGE, serve_control, sweep_dead_sockets

    def bound(name: str, listening: bool) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(tmp_path / name))
        if listening:
            s.listen(1)
        return s

    live, dead, fresh = bound("live.sock", True), bound("dead.sock", False), bound("fresh.sock", False)
    dead.close()
    fresh.close()
    old = time.time() - 2 * DEAD_SOCKET_AGE
    for name in ("live.sock", "dead.sock"):
        os.utime(tmp_path / name, (old, old))
    (tmp_path / "note.sock").write_text("not a socket")
    os.utime(tmp_path / "note.sock", (old, old))
    try:
        assert sweep_dead_sockets(tmp_path) == [tmp_path / "dead.sock"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.sock", "live.sock", "note.sock"]
        # A relay binding its control socket sweeps the directory: the dead socket it finds there goes.
        again = bound("dead.sock", False)
        again.close()
        os.utime(tmp_path / "dead.sock", (old, old))
        stop = threading.Event()
        serve_control(lambda line: None, tmp_path / "relay.sock", stop)
        stop.set()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as waker:  # its accept returns, sees stop, closes
            waker.connect(str(tmp_path / "relay.sock"))
        assert not (tmp_path / "dead.sock").exists() and (tmp_path / "live.sock").exists()
    finally:
        live.close()
