# SPDX-License-Identifier: AGPL-3.0-or-later
"""The relay tunnel: tokens, TLS, the handshake that guards a real rpc-server, leases, and the real model through it.

The rpc-server's own log is the witness: llama.cpp prints ``Accepted client connection`` for every client it serves,
so a connection the relay refused must leave no such line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from sharedllm import relay
from sharedllm.ggml import rpc_hello
from sharedllm.relay import ClientRelay, RelayError, ServerRelay, TokenError, machine_key, mint_token, verify_token
from tests.helpers import HELLO, RPCServer, everything_until_closed

MASTER = b"0123456789abcdef0123456789abcdef"
M1, M2 = "machine-1", "machine-2"
K1, K2 = machine_key(MASTER, M1), machine_key(MASTER, M2)
HELLO_ANSWER = 8 + 4 + 24  # size, version (4 bytes), capabilities
HANDSHAKE_S = 2.0  # the relay's handshake timeout in these tests: short, yet generous on a loaded machine


# --- tokens (pure) -------------------------------------------------------------------------------------------------


def test_token_round_trip():
    token = mint_token(K1, "lease-A", M1, ttl=60)
    assert verify_token(K1, token, M1) == "lease-A"
    assert token.isascii() and " " not in token and "/" not in token and "+" not in token


def test_token_refusals_say_why():
    now = time.time()
    token = mint_token(K1, "lease-A", M1, ttl=60, now=now)
    cases = {
        "malformed": ["", "garbage", "v1.a.b.c", "v2" + token[2:], token + ".x", token.replace(".", "!", 1),
                      "v1.###.bWFjaGluZS0x.123.AAAA"],
        "bad MAC": [
            mint_token(K2, "lease-A", M1, ttl=60),  # another machine's key
            token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),  # altered MAC
            token.replace(token.split(".")[1], relay.b64url_encode(b"lease-B")),  # altered lease
            token.replace(token.split(".")[3], str(int(token.split(".")[3]) + 3600)),  # extended expiry
        ],
        "wrong machine": [mint_token(K1, "lease-A", M2, ttl=60)],  # right key, other machine's name
        "expired": [mint_token(K1, "lease-A", M1, ttl=10, now=now - 100)],
    }
    for reason, tokens in cases.items():
        for t in tokens:
            with pytest.raises(TokenError) as info:
                verify_token(K1, t, M1, now=now)
            assert info.value.reason == reason, (t, str(info.value))
    with pytest.raises(TokenError, match="expired"):
        verify_token(K1, token, M1, now=now + 61)


def test_machine_keys_differ_and_errors_are_clear():
    assert K1 != K2 and len(K1) == 32
    with pytest.raises(ValueError, match="ttl must be positive"):
        mint_token(K1, "a", M1, ttl=0)
    with pytest.raises(ValueError, match="empty"):
        machine_key(b"", M1)
    with pytest.raises(ValueError, match="exactly one of"):
        ClientRelay("127.0.0.1:1", "t")
    with pytest.raises(ValueError, match="not sha256"):
        ClientRelay("127.0.0.1:1", "t", fingerprint="abc")
    with pytest.raises(ValueError, match="HOST:PORT"):
        ClientRelay("nohost", "t", fingerprint="sha256:" + "0" * 64)


def test_insecure_direct_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="sharedllm.relay"):
        relay.warn_insecure_direct("worker machine-1")
    assert "--insecure-direct-rpc" in caplog.text and "WITHOUT the relay" in caplog.text


# --- fixtures: certificates, a real rpc-server with its log, a relay in front of it -------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    cert, key, ca = relay.make_self_signed(tmp_path_factory.mktemp("relay-certs"))
    return {"cert": cert, "key": key, "ca": ca, "fingerprint": relay.cert_fingerprint(cert)}


@pytest.fixture(scope="module")
def rpc_server(tmp_path_factory):
    server = RPCServer(tmp_path_factory.mktemp("rpc-server") / "rpc-server.log")
    yield server
    server.stop()


@pytest.fixture
def server_relay(rpc_server, certs):
    sr = ServerRelay("127.0.0.1", 0, rpc_server.endpoint, certfile=certs["cert"], keyfile=certs["key"], secret=K1,
                     machine_id=M1, handshake_timeout=HANDSHAKE_S).start()
    sr.set_lease("lease-A")
    yield sr
    sr.stop()


def client(sr: ServerRelay, certs: dict, token: str, **kw) -> ClientRelay:
    kw = kw or {"fingerprint": certs["fingerprint"]}
    return ClientRelay(sr.endpoint, token, **kw).start()


def _recv_all(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "the tunnel closed before the whole answer"
        buf += chunk
    return buf


def _read_hello_answer(sock: socket.socket) -> bytes:
    """The rpc-server's whole answer to HELLO: a part left unread would later count as sent after a close."""
    return _recv_all(sock, HELLO_ANSWER)


# --- the handshake guards the rpc-server ----------------------------------------------------------------------------


@pytest.mark.mesh
def test_raw_sockets_never_reach_the_rpc_server(rpc_server, server_relay, certs, caplog):
    before = rpc_server.wait_accepted(rpc_server.accepted())
    with caplog.at_level(logging.WARNING, logger="sharedllm.relay"):
        for payload in (b"GET / HTTP/1.0\r\n\r\n" + os.urandom(64), HELLO, b""):
            with socket.create_connection(("127.0.0.1", server_relay.port)) as s:
                if payload:
                    s.sendall(payload)
                answer = everything_until_closed(s)
            assert answer == b"" or answer[:1] == b"\x15", answer[:16]  # nothing, or a TLS alert record
        # A TLS client that completes the handshake but sends no token, or a bad one.
        ctx = relay.client_context()
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server_relay.port)), server_hostname="x") as t:
            assert everything_until_closed(t) == b""
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", server_relay.port)), server_hostname="x") as t:
            relay.send_frame(t, 1, b"v1.not.a.token.really")
            reply = everything_until_closed(t)
            assert reply.startswith(b"SLR1\x01") and b"malformed" in reply
    assert caplog.text.count("refused relay connection from 127.0.0.1:") == 5, caplog.text
    assert "TLS handshake failed" in caplog.text
    assert f"no TLS handshake within {HANDSHAKE_S:g}s" in caplog.text
    assert f"no token within {HANDSHAKE_S:g}s" in caplog.text
    assert server_relay.refused == 5 and server_relay.accepted == 0
    time.sleep(0.5)
    assert rpc_server.accepted() == before, "a refused connection reached the rpc-server"
    # The witness works: one authenticated connection is one more line.
    with client(server_relay, certs, mint_token(K1, "lease-A", M1, ttl=60)) as cr:
        assert rpc_hello(cr.endpoint) == rpc_server.version
    assert rpc_server.wait_accepted(before + 1) == before + 1


@pytest.mark.mesh
def test_tunnel_carries_rpc(rpc_server, server_relay, certs):
    token = mint_token(K1, "lease-A", M1, ttl=60)
    with client(server_relay, certs, token) as cr:
        info = cr.check()
        assert info["tls"] in ("TLSv1.2", "TLSv1.3") and info["cipher"]
        assert cr.endpoint.startswith("127.0.0.1:")
        assert rpc_hello(cr.endpoint) == rpc_server.version
        assert rpc_hello(cr.endpoint) == rpc_server.version  # every connection is tunnelled afresh
    # A CA file instead of a pinned fingerprint.
    with client(server_relay, certs, token, cafile=certs["ca"]) as cr:
        assert rpc_hello(cr.endpoint) == rpc_server.version
    assert server_relay.accepted == 3


@pytest.mark.mesh
def test_wrong_server_certificate_gets_no_token(rpc_server, server_relay, certs, tmp_path):
    other_cert, _, other_ca = relay.make_self_signed(tmp_path)
    before = rpc_server.accepted()
    token = mint_token(K1, "lease-A", M1, ttl=60)
    with client(server_relay, certs, token, fingerprint=relay.cert_fingerprint(other_cert)) as cr:
        with pytest.raises(RelayError, match="presented certificate"):
            cr.check()
        with pytest.raises(ConnectionError):
            rpc_hello(cr.endpoint)
        assert "refusing to send the token" in cr.last_error
    with client(server_relay, certs, token, cafile=other_ca) as cr, pytest.raises(RelayError, match="TLS handshake"):
        cr.check()
    time.sleep(0.3)
    assert rpc_server.accepted() == before


@pytest.mark.mesh
@pytest.mark.parametrize("case", ["other lease", "expired", "other machine", "wrong machine", "tampered"])
def test_refused_tokens(rpc_server, server_relay, certs, case):
    """Lease A's token fails on lease B's machine; so do expired, foreign and altered tokens."""
    server_relay.set_lease("lease-B")
    token, reason = {
        "other lease": (mint_token(K1, "lease-A", M1, ttl=60), "lease mismatch"),
        "expired": (mint_token(K1, "lease-B", M1, ttl=1, now=time.time() - 10), "expired"),
        "other machine": (mint_token(K2, "lease-B", M2, ttl=60), "bad MAC"),  # machine-2's token, machine-1's relay
        "wrong machine": (mint_token(K1, "lease-B", M2, ttl=60), "wrong machine"),
        "tampered": (mint_token(K1, "lease-A", M1, ttl=60).replace(relay.b64url_encode(b"lease-A"),
                                                                    relay.b64url_encode(b"lease-B")), "bad MAC"),
    }[case]
    before = rpc_server.accepted()
    with client(server_relay, certs, token) as cr:
        with pytest.raises(TokenError) as info:
            cr.check()
        assert info.value.reason == reason, str(info.value)
        with pytest.raises(ConnectionError):
            rpc_hello(cr.endpoint)
        assert reason in cr.last_error
    time.sleep(0.3)
    assert rpc_server.accepted() == before
    assert server_relay.accepted == 0
    # The same machine, its current lease: admitted.
    with client(server_relay, certs, mint_token(K1, "lease-B", M1, ttl=60)) as cr:
        assert rpc_hello(cr.endpoint) == rpc_server.version


@pytest.mark.mesh
def test_lease_change_closes_live_connections(rpc_server, server_relay, certs):
    with client(server_relay, certs, mint_token(K1, "lease-A", M1, ttl=60)) as cr:
        host, port = relay.parse_endpoint(cr.endpoint)
        with socket.create_connection((host, port)) as s:
            s.sendall(HELLO)
            s.settimeout(10)
            _read_hello_answer(s)  # the rpc-server answered through the tunnel
            deadline = time.monotonic() + 5
            while server_relay.accepted == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            server_relay.set_lease("lease-B")  # the scheduler gave the machine to another lease
            assert everything_until_closed(s) == b""


@pytest.mark.mesh
def test_allowed_callback(rpc_server, certs):
    leases = {"current": "lease-A"}
    sr = ServerRelay("127.0.0.1", 0, rpc_server.endpoint, certfile=certs["cert"], keyfile=certs["key"], secret=K1,
                     machine_id=M1, allowed=lambda lease: lease == leases["current"]).start()
    try:
        with client(sr, certs, mint_token(K1, "lease-A", M1, ttl=60)) as cr:
            cr.check()
            leases["current"] = "lease-B"
            with pytest.raises(TokenError, match="lease mismatch"):
                cr.check()
    finally:
        sr.stop()


# --- the data path ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def stand_in(certs: dict, serve, **kw):
    """A server relay (lease "L") in front of a stand-in for the rpc-server: ``serve(data, conn)`` for each read of
    its one connection; yields a client relay to it (``kw``: the client relay's options)."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run():
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 16):
                serve(data, conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    sr = ServerRelay("127.0.0.1", 0, f"127.0.0.1:{listener.getsockname()[1]}", certfile=certs["cert"],
                     keyfile=certs["key"], secret=K1, machine_id=M1).start()
    sr.set_lease("L")
    try:
        with client(sr, certs, mint_token(K1, "L", M1, ttl=60), fingerprint=certs["fingerprint"], **kw) as cr:
            yield cr
    finally:
        sr.stop()
        listener.close()
        t.join(5)


def test_splice_moves_bulk_both_ways(certs):
    """Megabytes each way, in uneven pieces, arrive intact and in order (an echo server stands in for llama.cpp)."""
    with stand_in(certs, lambda data, conn: conn.sendall(data)) as cr:
        payload = os.urandom(5 << 20)
        host, port = relay.parse_endpoint(cr.endpoint)
        with socket.create_connection((host, port)) as s:
            s.settimeout(60)
            got = bytearray()

            def reader():
                while len(got) < len(payload):
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    got.extend(chunk)

            rt = threading.Thread(target=reader)
            rt.start()
            pos, size = 0, 1
            while pos < len(payload):
                s.sendall(payload[pos:pos + size])
                pos += size
                size = min(size * 3 + 7, 1 << 20)
            rt.join(60)
        assert bytes(got) == payload


@pytest.mark.mesh
def test_stop_closes_everything(rpc_server, certs):
    sr = ServerRelay("127.0.0.1", 0, rpc_server.endpoint, certfile=certs["cert"], keyfile=certs["key"], secret=K1,
                     machine_id=M1).start()
    sr.set_lease("A")
    cr = client(sr, certs, mint_token(K1, "A", M1, ttl=60))
    host, port = relay.parse_endpoint(cr.endpoint)
    s = socket.create_connection((host, port))
    s.sendall(HELLO)
    s.settimeout(10)
    _read_hello_answer(s)
    before = {t.name for t in threading.enumerate()}
    assert any(n.startswith("relay-") for n in before)
    cr.stop()
    sr.stop()
    assert everything_until_closed(s) == b""
    s.close()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("relay-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("relay-")]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", sr.port), timeout=2).close()


@pytest.mark.mesh
def test_command_line(rpc_server, certs, tmp_path):
    """``python -m sharedllm.relay server --control-stdin`` admits the lease it is told; ``client --check`` probes."""
    key_file, token_file = tmp_path / "key", tmp_path / "token"
    key_file.write_text(K1.hex())
    token_file.write_text(mint_token(K1, "L7", M1, ttl=60))
    proc = subprocess.Popen([sys.executable, "-m", "sharedllm.relay", "server", "--listen", "127.0.0.1:0", "--target",
                             rpc_server.endpoint, "--cert", certs["cert"], "--key", certs["key"], "--machine-id", M1,
                             "--key-file", str(key_file), "--control-stdin"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(relay.READY_PREFIX), proc.stderr.read() if proc.poll() is not None else line
        info = json.loads(line[len(relay.READY_PREFIX):])
        assert info["fingerprint"] == certs["fingerprint"]
        check = [sys.executable, "-m", "sharedllm.relay", "client", "--remote", info["endpoint"], "--token-file",
                 str(token_file), "--fingerprint", info["fingerprint"], "--check"]
        out = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "lease mismatch" in out.stderr
        proc.stdin.write("lease L7\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while True:
            out = subprocess.run(check, capture_output=True, text=True, timeout=60)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
        proc.stdin.close()  # end of input stops the relay
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the real model through the tunnel ------------------------------------------------------------------------------


@pytest.mark.mesh
def test_model_through_the_tunnel_matches_direct(rpc_server, server_relay, certs):
    """Gemma 3 270M on one rpc-server: 32 greedy tokens through the tunnel equal those over a direct connection."""
    from sharedllm.engine import Engine, EngineSpec, EngineStage
    from sharedllm.models import default_model_path

    model = str(default_model_path())
    kwargs = {"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.0}

    def generate(endpoint: str) -> str:
        engine = Engine(EngineSpec(model_path=model, stages=[EngineStage(endpoint=endpoint, machine_id=M1)],
                                   llama_kwargs={"n_ctx": 512}))
        try:
            info = engine.start()
            assert info["devices"][0]["endpoint"] == endpoint
            return engine.call("create_completion", kwargs)["choices"][0]["text"]
        finally:
            engine.close()

    direct = generate(rpc_server.endpoint)
    with client(server_relay, certs, mint_token(K1, "lease-A", M1, ttl=300)) as cr:
        tunnelled = generate(cr.endpoint)
    assert len(direct) > 20
    assert tunnelled == direct
    assert server_relay.accepted >= 1


@pytest.mark.mesh
def test_splice_trace(rpc_server, server_relay, certs, tmp_path, monkeypatch):
    """SHAREDLLM_RELAY_TRACE: each hop of a tunnelled connection writes its reads and writes when the connection
    ends; what came in on one side went out on the other."""
    from sharedllm.relay import wire

    monkeypatch.setattr(wire, "_TRACE_DIR", str(tmp_path))
    with client(server_relay, certs, mint_token(K1, "lease-A", M1, ttl=60)) as cr:
        assert rpc_hello(cr.endpoint) == rpc_server.version
        deadline = time.monotonic() + 20
        while len(list(tmp_path.glob("splice-*.jsonl"))) < 2:  # the client relay's hop and the server relay's
            assert time.monotonic() < deadline, list(tmp_path.iterdir())
            time.sleep(0.05)
    for path in tmp_path.glob("splice-*.jsonl"):
        events = [json.loads(line) for line in path.read_text().splitlines()]
        total = {kind: sum(n for _t, k, n in events if k == kind) for kind in ("pi", "po", "ti", "to")}
        assert total["pi"] == total["to"] > 0 and total["ti"] == total["po"] > 0, (path.name, total)
        assert [e[0] for e in events] == sorted(e[0] for e in events)
        assert any(k == "w" for _t, k, _n in events)


@pytest.mark.mesh
def test_load_progress_counts_bytes_and_never_decreases(rpc_server):
    """Loading onto an rpc-server reports ``LoadProgress``: the fraction llama.cpp gives, a float, carrying the
    bytes of tensor data done out of the file's; the reports never decrease and end at every byte."""
    from sharedllm.engine import Engine, EngineSpec, EngineStage, LoadProgress
    from sharedllm.gguf import read_gguf
    from sharedllm.models import default_model_path

    model = default_model_path()
    total = sum(t.nbytes for t in read_gguf(model).tensors)
    seen: list = []
    engine = Engine(EngineSpec(model_path=str(model), stages=[EngineStage(endpoint=rpc_server.endpoint, machine_id=M1)],
                               llama_kwargs={"n_ctx": 512}), on_progress=seen.append)
    try:
        engine.start()
    finally:
        engine.close()
    assert len(seen) > 100  # one report per tensor (Gemma 3 270M has 236), not a handful
    assert all(isinstance(p, LoadProgress) and p.total_bytes == total for p in seen)
    done = [p.done_bytes for p in seen]
    assert done == sorted(done) and done[0] < total // 100 and done[-1] == total
    assert [float(p) for p in seen] == sorted(float(p) for p in seen) and seen[-1] == 1.0
    assert all(abs(p.done_bytes - p * total) <= 1 for p in seen)
    assert int(seen[-1] * 10) == 10  # still a plain fraction for callbacks written for one


def _rpc(cmd: int, payload: bytes) -> bytes:
    return bytes([cmd]) + len(payload).to_bytes(8, "little") + payload


def test_rpc_frames_find_where_requests_that_get_a_reply_end():
    from sharedllm.relay.wire import RpcFrames

    set_tensor, graph_compute, get_tensor, hello, free_buffer = 6, 10, 8, 14, 4
    f = RpcFrames()
    stream = _rpc(set_tensor, b"x" * 1000) + _rpc(set_tensor, b"y" * 300)
    for i in range(0, len(stream), 7):  # in pieces that split headers and payloads
        f.feed(memoryview(stream[i:i + 7]))
        assert not f.reply_due
    assert not f.inside
    graph = _rpc(graph_compute, b"g" * 40)  # the machine's work: it goes at once, with what was held
    f.feed(memoryview(graph[:5]))
    assert f.inside and not f.reply_due
    f.feed(memoryview(graph[5:]))
    assert f.reply_due and not f.inside
    g = RpcFrames()
    g.feed(memoryview(_rpc(hello, bytes(24)) + _rpc(99, b"")))  # a command unknown here may get a reply: it goes
    assert g.reply_due
    h = RpcFrames()
    h.feed(memoryview(_rpc(free_buffer, b"")))  # an empty payload completes with its header
    assert not h.reply_due and not h.inside
    h.feed(memoryview(_rpc(get_tensor, b"t" * 16)))
    assert h.reply_due


def test_client_relay_sends_one_burst_per_round_trip(certs, tmp_path, monkeypatch):
    """A request without a reply written in three pieces, then one with a reply: the machine's relay gets them as
    one TLS record (it and the rpc-server wake once), and the reply comes back. A request without a reply and nothing
    after it still goes, within the hold time. A recorder stands in for the rpc-server."""
    import json

    from sharedllm.relay import wire

    got: list[bytes] = []

    def recorder(data, conn):
        got.append(data)
        if data.endswith(_rpc(15, b"")):  # DEVICE_COUNT: answer it
            conn.sendall((4).to_bytes(8, "little") + (1).to_bytes(4, "little"))

    monkeypatch.setattr(wire, "_TRACE_DIR", str(tmp_path))
    monkeypatch.setattr(wire, "HOLD_S", 0.5)  # longer than the gaps between the pieces below, however loaded the host
    set_tensor = _rpc(6, b"w" * 3000)
    with stand_in(certs, recorder) as cr:
        host, port = relay.parse_endpoint(cr.endpoint)
        with socket.create_connection((host, port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for piece in (set_tensor[:1], set_tensor[1:9], set_tensor[9:], _rpc(15, b"")):  # as llama.cpp writes
                s.sendall(piece)
                time.sleep(0.01)  # not a synchronization: pieces apart in time, as a busy client writes them
            assert int.from_bytes(_recv_all(s, 12)[8:], "little") == 1
            s.sendall(_rpc(6, b"z" * 10))  # no reply, nothing after it: it goes once the hold time is over
            deadline = time.monotonic() + 10
            while b"".join(got) != set_tensor + _rpc(15, b"") + _rpc(6, b"z" * 10):
                assert time.monotonic() < deadline, got
                time.sleep(0.01)
    server_side = [json.loads(line) for p in tmp_path.glob(f"splice-{os.getpid()}-*.jsonl")
                   for line in p.read_text().splitlines()]
    records = [n for _t, k, n in server_side if k == "ti"]
    # The server relay's hop (TLS in): the first burst in one record, then the late one. The client relay's hop
    # writes its own trace too ("pi" from llama.cpp's side): three pieces and a query read, sent as one.
    assert len(set_tensor) + 9 in records and 19 in records, records


# --- prefetching tensor fetches (sharedllm.relay.rpc.Prefetch) ------------------------------------------------------

_SET, _GET, _COMPUTE, _FREE, _HELLO_CMD, _ALLOC_SIZE = 6, 8, 10, 4, 14, 13


def _get(tensor: int, size: int = 64) -> bytes:
    """A GET_TENSOR request as llama.cpp writes it: an rpc_tensor (its id first), offset, size."""
    return _rpc(_GET, tensor.to_bytes(8, "little") + bytes(288) + bytes(8) + size.to_bytes(8, "little"))


class _Machine:
    """Stands in for an rpc-server speaking protocol 7: HELLO, SET_TENSOR (a new value of a tensor), GRAPH_COMPUTE
    (every tensor changes), FREE_BUFFER, GET_TENSOR (a tensor's current value), GET_ALLOC_SIZE (always
    ``ALLOC_SIZE``). Logs each request it serves."""

    ALLOC_SIZE = 777

    def __init__(self) -> None:
        self.buf = bytearray()
        self.values: dict[int, int] = {}
        self.log: list[tuple[int, int]] = []  # (cmd, tensor id or -1), in the order served
        self.reads: list[list[int]] = []  # the commands each read of its connection brought

    def value(self, tensor: int, size: int) -> bytes:
        return (f"{tensor}:{self.values.get(tensor, 0)}:".encode() * size)[:size]

    def __call__(self, data: bytes, conn: socket.socket) -> None:
        self.buf += data
        served = []
        while len(self.buf) >= 9 and len(self.buf) >= 9 + int.from_bytes(self.buf[1:9], "little"):
            cmd, n = self.buf[0], int.from_bytes(self.buf[1:9], "little")
            payload = bytes(self.buf[9:9 + n])
            del self.buf[:9 + n]
            tensor = int.from_bytes(payload[:8], "little") if cmd in (_SET, _GET) else -1
            self.log.append((cmd, tensor))
            served.append(cmd)
            if cmd == _HELLO_CMD:
                conn.sendall((28).to_bytes(8, "little") + bytes([7, 0, 0, 0]) + bytes(24))
            elif cmd == _SET:
                self.values[tensor] = int.from_bytes(payload[8:16], "little")
            elif cmd == _COMPUTE:
                self.values = {t: v + 1000 for t, v in self.values.items()}
            elif cmd == _GET:
                size = int.from_bytes(payload[-8:], "little")
                conn.sendall(size.to_bytes(8, "little") + self.value(tensor, size))
            elif cmd == _ALLOC_SIZE:
                conn.sendall((8).to_bytes(8, "little") + self.ALLOC_SIZE.to_bytes(8, "little"))
        if served:
            self.reads.append(served)


def _ask(s: socket.socket, req: bytes) -> bytes:
    s.sendall(req)
    size = int.from_bytes(_recv_all(s, 8), "little")
    return _recv_all(s, size)


@pytest.mark.parametrize("coalesce", [True, False])
def test_prefetch_answers_the_fetch_that_always_follows_another(certs, coalesce):
    """Through real relays, a stand-in machine, and a client that behaves as llama.cpp handing a stage's two outputs
    to the next stage: set inputs, compute, fetch X, fetch Y, at every step. From the second step on, Y travels with
    X (one round trip, not two) and the client's own fetch of Y never reaches the machine; every answer is the value
    the machine holds when the client asks. A request between X and Y (here one that changes Y) makes the relay drop
    its early answer; a freed buffer makes it forget what it learned. With coalescing on and off."""
    machine = _Machine()
    with stand_in(certs, machine, coalesce=coalesce) as cr:
        assert cr.prefetch and cr.coalesce == coalesce
        host, port = relay.parse_endpoint(cr.endpoint)
        with socket.create_connection((host, port), timeout=20) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assert _ask(s, _rpc(_HELLO_CMD, bytes(24)))[0] == 7

            def step(value: int, between: bytes = b"") -> None:
                s.sendall(_rpc(_SET, (1).to_bytes(8, "little") + value.to_bytes(8, "little")))
                s.sendall(_rpc(_COMPUTE, b"graph"))
                assert _ask(s, _get(1)) == machine.value(1, 64)
                if between:
                    s.sendall(between)
                assert _ask(s, _get(2, 128)) == machine.value(2, 128)

            for v in range(4):
                step(v)
            gets = [t for cmd, t in machine.log if cmd == _GET]
            assert gets == [1, 2, 1, 2, 1, 2, 1, 2], gets  # every fetch served once: Y never twice
            # From the second step on, Y came in the same read as X: asked for before the client did.
            assert sum(r.count(_GET) == 2 for r in machine.reads) == 3, machine.reads

            n = len(machine.log)
            step(10, between=_rpc(_SET, (2).to_bytes(8, "little") + (77).to_bytes(8, "little")))
            # Y was asked for early, then the client changed it: it got the new value, from its own fetch
            assert [t for cmd, t in machine.log[n:] if cmd == _GET] == [1, 2, 2], machine.log[n:]

            s.sendall(_rpc(_FREE, bytes(8)))  # a buffer freed: nothing learned is used any more
            n, reads = len(machine.log), len(machine.reads)
            step(11)
            assert [t for cmd, t in machine.log[n:] if cmd == _GET] == [1, 2], machine.log[n:]
            assert all(r.count(_GET) < 2 for r in machine.reads[reads:]), machine.reads[reads:]


def test_prefetch_keeps_its_hands_off_what_it_does_not_know():
    """Only a stream that starts with HELLO and a machine answering protocol 7 is prefetched on; an early reply is
    cut out of the machine's stream whichever way the stream is cut into reads; a reply no request asked for is an
    error, not a guess."""
    from sharedllm.relay.rpc import Prefetch, ProtocolError, RpcFrames

    def client_side(pf: Prefetch, frames: RpcFrames, data: bytes) -> bytes:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        view[:len(data)] = data
        frames.feed(view[:len(data)], 0)
        hi, give = pf.requests(frames.done, view, len(data), 1 << 16)
        assert give == b""
        return bytes(buf[:hi])

    def machine_side(pf: Prefetch, data: bytes, cut: int) -> bytes:
        out = b""
        for i in range(0, len(data), cut):
            buf = bytearray(data[i:i + cut])
            out += bytes(buf[:pf.replies(memoryview(buf), 0, len(buf))])
        return out

    hello_reply = (28).to_bytes(8, "little") + bytes([7, 0, 0, 0]) + bytes(24)
    for cut in (1, 5, 9, 1000):
        pf, frames = Prefetch(), RpcFrames(keep=True)
        assert client_side(pf, frames, _rpc(_HELLO_CMD, bytes(24))) == _rpc(_HELLO_CMD, bytes(24))
        assert machine_side(pf, hello_reply, cut) == hello_reply
        step = _get(1) + _get(2, 16)
        assert client_side(pf, frames, _get(1)) == _get(1)
        assert client_side(pf, frames, _get(2, 16)) == _get(2, 16)  # learned: 2 follows 1
        assert client_side(pf, frames, _get(1)) == step  # 2 goes with 1
        x, y = (64).to_bytes(8, "little") + b"x" * 64, (16).to_bytes(8, "little") + b"y" * 16
        first = (64).to_bytes(8, "little") + b"a" * 64 + (16).to_bytes(8, "little") + b"b" * 16
        assert machine_side(pf, first + x + y, cut) == first + x  # Y's answer is kept for the client's own fetch
        assert pf.saved == 0 and bytes(pf._kept) == y
    # Not HELLO first, or another protocol: every byte passes untouched, whatever it looks like.
    pf, frames = Prefetch(), RpcFrames(keep=True)
    assert client_side(pf, frames, _get(1) + _get(2)) == _get(1) + _get(2)
    assert not pf.active and machine_side(pf, b"anything at all", 4) == b"anything at all"
    pf, frames = Prefetch(), RpcFrames(keep=True)
    client_side(pf, frames, _rpc(_HELLO_CMD, bytes(24)))
    old = (28).to_bytes(8, "little") + bytes([6, 0, 0, 0]) + bytes(24)
    assert machine_side(pf, old + b"more", 3) == old + b"more" and not pf.active
    pf, frames = Prefetch(), RpcFrames(keep=True)
    client_side(pf, frames, _rpc(_HELLO_CMD, bytes(24)))
    with pytest.raises(ProtocolError):
        machine_side(pf, hello_reply + (4).to_bytes(8, "little") + b"what", 1000)


def _alloc_size(device: int, type_: int, ne: tuple[int, ...], nb: tuple[int, ...] | None = None, *, op: int = 0,
                buffer: int = 0) -> bytes:
    """A GET_ALLOC_SIZE request as llama.cpp writes it: the device, an rpc_tensor (packed: id, type, buffer, ne[4],
    nb[4], op, ...) and its GGML_MAX_SRC sources (none here). ``nb``: contiguous when not given (one byte per
    element for a quantized type: never sent to a real machine)."""
    from sharedllm.relay.rpc import TENSOR

    if nb is None:
        nb = ({0: 4, 1: 2, 26: 4, 30: 2}.get(type_, 1),)
        for n in ne[:-1]:
            nb += (nb[-1] * n,)
    t = (7).to_bytes(8, "little") + type_.to_bytes(4, "little") + buffer.to_bytes(8, "little")
    t += b"".join(n.to_bytes(4, "little") for n in ne) + b"".join(n.to_bytes(4, "little") for n in nb)
    t += op.to_bytes(4, "little")
    t += bytes(TENSOR - len(t))
    return _rpc(_ALLOC_SIZE, device.to_bytes(4, "little") + t + bytes(TENSOR * 10))


# Tensors whose allocation size a CPU device's relay may answer: F32, F16, BF16 and I32, contiguous or not (a
# permuted view's strides), 4-D, empty; with the op of a matrix product (the ops llama.cpp asks about).
_SIZED = [(0, (640, 9, 1, 1), None), (0, (256, 9, 4, 1), None), (1, (64, 512, 4, 2), None), (30, (1024, 3, 1, 1), None),
          (26, (12, 1, 1, 1), None), (0, (9, 640, 1, 1), (2560, 4, 23040, 23040)), (0, (0, 4, 1, 1), None),
          (0, (4096, 32, 8, 1), (4, 16384, 524288, 4194304))]


@pytest.mark.mesh
def test_cpu_allocation_sizes_are_what_a_cpu_rpc_server_answers(rpc_server):
    """The oracle: for each tensor, the size the relay would answer is the real CPU rpc-server's answer."""
    from sharedllm.relay.rpc import cpu_alloc_size

    mul_mat = 29  # GGML_OP_MUL_MAT: one of the ops llama.cpp's RPC client asks about
    host, port = relay.parse_endpoint(rpc_server.endpoint)
    with socket.create_connection((host, port), timeout=20) as s:
        assert _ask(s, _rpc(_HELLO_CMD, bytes(24)))[0] == 7
        for type_, ne, nb in _SIZED:
            req = _alloc_size(0, type_, ne, nb, op=mul_mat)
            real = int.from_bytes(_ask(s, req), "little")
            assert cpu_alloc_size(req) == (0, real), (type_, ne, nb, real)
    # Not answered here: a quantized tensor, one in a buffer, a request of another size.
    assert cpu_alloc_size(_alloc_size(0, 12, (4096, 4, 1, 1))) is None
    assert cpu_alloc_size(_alloc_size(0, 0, (640, 9, 1, 1), buffer=0x5000)) is None
    assert cpu_alloc_size(_alloc_size(0, 0, (640, 9, 1, 1))[:-8]) is None


def test_client_relay_answers_allocation_sizes_of_its_cpu_devices(certs):
    """Through real relays and a stand-in machine: an allocation size for a CPU device is answered by the client
    relay (it never reaches the machine); for another device, a quantized tensor, or while a reply is due (replies
    keep their order), the machine answers."""
    from sharedllm.relay.rpc import cpu_alloc_size

    machine = _Machine()
    with stand_in(certs, machine, cpu_devices={0}) as cr:
        host, port = relay.parse_endpoint(cr.endpoint)
        with socket.create_connection((host, port), timeout=20) as s:
            assert _ask(s, _rpc(_HELLO_CMD, bytes(24)))[0] == 7
            here = _alloc_size(0, 0, (640, 9, 1, 1))
            assert int.from_bytes(_ask(s, here), "little") == cpu_alloc_size(here)[1] == 640 * 9 * 4
            assert int.from_bytes(_ask(s, _alloc_size(1, 0, (640, 9, 1, 1))), "little") == machine.ALLOC_SIZE
            assert int.from_bytes(_ask(s, _alloc_size(0, 12, (4096, 4, 1, 1))), "little") == machine.ALLOC_SIZE
            s.sendall(_get(1) + here)  # a fetch's reply is due: the size must come after it, so from the machine
            assert _recv_all(s, 8 + 64)[8:] == machine.value(1, 64)
            assert int.from_bytes(_ask(s, b""), "little") == machine.ALLOC_SIZE
            assert int.from_bytes(_ask(s, here), "little") == 640 * 9 * 4
    assert [cmd for cmd, _ in machine.log].count(_ALLOC_SIZE) == 3, machine.log
