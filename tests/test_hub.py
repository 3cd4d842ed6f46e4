# SPDX-License-Identifier: AGPL-3.0-or-later
"""The relay hub (machines behind NAT), at the relay level: a real rpc-server behind a relay that listens on no port,
registered at a hub; clients through the hub, and everything the hub must refuse.

The rpc-server's log is the witness, as in ``test_relay``: a connection the hub refused leaves no
``Accepted client connection`` line."""

from __future__ import annotations

import json
import logging
import os
import socket

import pytest

from sharedllm import relay
from sharedllm.ggml import rpc_hello
from sharedllm.relay import ClientRelay, RelayError, ServerRelay, TokenError, machine_key, mint_token
from sharedllm.relay.hub import KIND_CONNECT, KIND_DATA, RelayHub, hub_client_key, hub_machine_key
from tests.helpers import RPCServer, everything_until_closed, wait_for

pytestmark = pytest.mark.mesh  # a real rpc-server, and the hub as a process

MASTER = b"0123456789abcdef0123456789abcdef"
HUB_KEY = b"hub-key-0123456789abcdef-0123456"
M1 = "machine-nat"
K1 = machine_key(MASTER, M1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    cert, key, _ca = relay.make_self_signed(tmp_path_factory.mktemp("hub-certs"))
    return {"cert": cert, "key": key, "fingerprint": relay.cert_fingerprint(cert)}


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory):
    server = RPCServer(tmp_path_factory.mktemp("hub-rpc-server") / "rpc-server.log")
    yield server
    server.stop()


@pytest.fixture
def hub():
    h = RelayHub("127.0.0.1", 0, HUB_KEY, max_connections_per_machine=2, handshake_timeout=2.0, open_timeout=5.0)
    h.start()
    yield h
    h.stop()


def nat_relay(rpc_server, certs, hub_endpoint: str, credential: bytes = hub_machine_key(HUB_KEY, M1)) -> ServerRelay:
    sr = ServerRelay("127.0.0.1", 0, rpc_server.endpoint, certfile=certs["cert"], keyfile=certs["key"], secret=K1,
                     machine_id=M1, hub=hub_endpoint, hub_credential=credential, inbound=False).start()
    sr.set_lease("lease-A")
    return sr


@pytest.fixture
def registered(rpc_server, certs, hub):
    """A machine that listens nowhere, registered at ``hub``."""
    sr = nat_relay(rpc_server, certs, hub.endpoint)
    try:
        wait_for(sr.hub_link.connected.is_set, 10, what="the machine's registration at the hub")
        yield sr
    finally:
        sr.stop()


def hub_token(lease: str = "lease-A", machine: str = M1, ttl: float = 60, **kw) -> str:
    return mint_token(hub_client_key(HUB_KEY), lease, machine, ttl, **kw)


def client_through(hub: RelayHub, certs, *, token: str | None = None, htoken: str | None = None,
                   remote: str = f"hub/{M1}") -> ClientRelay:
    return ClientRelay(remote, token or mint_token(K1, "lease-A", M1, 60), fingerprint=certs["fingerprint"],
                       connect_timeout=5.0, hub={"endpoint": hub.endpoint, "machine": M1,
                                                 "token": htoken or hub_token()})


def test_a_machine_that_listens_nowhere_serves_through_the_hub(rpc_server, certs, hub):
    before = rpc_server.accepted()
    sr = nat_relay(rpc_server, certs, hub.endpoint)
    try:
        assert sr.endpoint == f"hub/{M1}" and sr._listener is None and sr.port == 0  # no port to reach
        wait_for(sr.hub_link.connected.is_set, 10, what="the machine's registration at the hub")
        assert hub.machines() == [M1]
        with client_through(hub, certs).start() as cr:
            assert rpc_hello(cr.endpoint) == rpc_server.version  # llama.cpp's HELLO, through hub and TLS
            assert rpc_hello(cr.endpoint) == rpc_server.version
        stats = hub.stats()["machines"][M1]
        assert stats["connections"] == 2 and hub.forwarded == 2
        assert stats["bytes_to"] > 500 and stats["bytes_from"] > 500  # TLS handshakes and records: ciphertext
        assert rpc_server.wait_accepted(before + 2) == before + 2
        # TLS is end to end: the machine's relay checks its own token, which the hub never sees.
        with pytest.raises(TokenError, match="lease mismatch"):
            client_through(hub, certs, token=mint_token(K1, "lease-B", M1, 60)).check()
    finally:
        sr.stop()


def _hub_answer(hub: RelayHub, kind: int, msg: dict | bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", hub.port), timeout=5) as s:
        relay.send_frame(s, kind, msg if isinstance(msg, bytes) else json.dumps(msg).encode())
        got = b""
        while chunk := s.recv(4096):
            got += chunk
        return got


def test_the_hub_forwards_nothing_without_proof(rpc_server, certs, hub, registered, caplog):
    before = rpc_server.accepted()
    with caplog.at_level(logging.WARNING, logger="sharedllm.relay"):
        # a raw socket with bytes that are no handshake, and one that sends nothing
        with socket.create_connection(("127.0.0.1", hub.port)) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert everything_until_closed(s).startswith(b"SLR1\x01")  # refused: not a relay frame
        with socket.create_connection(("127.0.0.1", hub.port)) as s:
            assert everything_until_closed(s) == b""  # closed after the handshake timeout
        refusals = {
            "the machine's own token is no hub token": (KIND_CONNECT, {"machine": M1,
                                                                      "token": mint_token(K1, "lease-A", M1, 60)}),
            "expired": (KIND_CONNECT, {"machine": M1, "token": hub_token(ttl=1, now=0)}),
            "another machine's token": (KIND_CONNECT, {"machine": M1, "token": hub_token(machine="other")}),
            "not connected": (KIND_CONNECT, {"machine": "other", "token": hub_token(machine="other")}),
            "no such connection": (KIND_DATA, {"machine": M1, "conn": "0" * 32, "proof": "x"}),
            "no machine": (KIND_CONNECT, b"not json"),
        }
        answers = {why: _hub_answer(hub, kind, msg) for why, (kind, msg) in refusals.items()}
    for why, answer in answers.items():
        assert answer.startswith(b"SLR1\x01"), (why, answer)  # a refusal frame, then the hub closed
    assert b"bad MAC" in answers["the machine's own token is no hub token"]
    assert b"expired" in answers["expired"]
    assert b"wrong machine" in answers["another machine's token"]
    assert b"is not connected to this hub" in answers["not connected"]
    assert b"unknown connection id" in answers["no such connection"]
    assert b"malformed handshake" in answers["no machine"]
    # a machine without the credential cannot register (nor take over the registered one)
    impostor = nat_relay(rpc_server, certs, hub.endpoint, credential=b"x" * 32)
    try:
        wait_for(lambda: impostor.hub_link.last_error, 10, what="the impostor's refusal")
        assert "not vouched for" in impostor.hub_link.last_error
        assert not impostor.hub_link.connected.is_set() and hub.machines() == [M1]
    finally:
        impostor.stop()
    assert hub.forwarded == 0
    assert rpc_server.accepted() == before, "a refused connection reached the rpc-server"
    assert "hub refused" in caplog.text



def test_hub_limits_connections_per_machine(rpc_server, certs, hub, registered):
    cr = client_through(hub, certs)
    held = [cr.open(), cr.open()]  # the hub's limit in this test is 2
    try:
        with pytest.raises(RelayError, match="too many connections to machine"):
            cr.open()
    finally:
        for t in held:
            t.close()
    wait_for(lambda: hub.stats()["machines"][M1]["active"] == 0, 10, what="the held connections to end")
    cr.open().close()  # room again
    assert hub.stats()["refused"].get("too many connections to machine machine-nat") == 1



def test_unreachable_direct_endpoint_falls_back_to_the_hub_and_a_new_hub_gets_the_machine_back(rpc_server, certs):
    from sharedllm.rpc_server import free_port

    port = free_port("127.0.0.1")
    hub = RelayHub("127.0.0.1", port, HUB_KEY).start()
    sr = nat_relay(rpc_server, certs, hub.endpoint)
    try:
        wait_for(sr.hub_link.connected.is_set, 10, what="the machine's registration at the hub")
        closed = f"127.0.0.1:{free_port('127.0.0.1')}"  # a direct endpoint nobody listens on
        cr = client_through(hub, certs, remote=closed)
        assert not cr.via_hub
        with cr.start():
            assert rpc_hello(cr.endpoint) == rpc_server.version
            assert cr.via_hub  # remembered: later connections go to the hub at once
        hub.stop()  # the hub restarts on its port: the machine registers again by itself
        wait_for(lambda: not sr.hub_link.connected.is_set(), 10, what="the machine to notice the hub is gone")
        hub = RelayHub("127.0.0.1", port, HUB_KEY).start()
        wait_for(sr.hub_link.connected.is_set, 15, what="the machine's registration at the new hub")
        with client_through(hub, certs).start() as cr:
            assert rpc_hello(cr.endpoint) == rpc_server.version
    finally:
        sr.stop()
        hub.stop()


def test_an_ended_lease_is_cut_and_refused_at_the_hub(rpc_server, certs, hub, registered):
    cr = client_through(hub, certs)
    live = cr.open()
    try:
        assert hub.revoke("lease-A") == 1  # the live connection of the lease is closed...
        live.settimeout(5)
        assert everything_until_closed(live) == b""
    finally:
        live.close()
    with pytest.raises(TokenError, match="lease lease-A has ended"):  # ... and its tokens refused from now on
        cr.open()
    other = client_through(hub, certs, htoken=hub_token("lease-B"), token=mint_token(K1, "lease-B", M1, 60))
    with pytest.raises(TokenError, match="lease mismatch"):  # another lease passes the hub; the machine decides
        other.check()


def test_the_schedulers_hub_process_listens_where_told_and_leaves_no_folder():
    """The hub the scheduler preload runs (``HubProcess``) without a state file: in a folder of its own under /tmp,
    which goes with it (embedded meshes left one behind per run)."""
    import asyncio

    from sharedllm.scheduler_plugins.hub import HubProcess

    async def run():
        process = HubProcess(HUB_KEY, host="127.0.0.1")
        port = await process.start()
        try:
            assert (process.workdir / "hub.key").exists()
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        finally:
            await process.close()
        return process

    process = asyncio.run(run())
    assert not process.workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(process.pid, 0)
