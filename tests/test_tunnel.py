# SPDX-License-Identifier: AGPL-3.0-or-later
"""The tunnel in the mesh: rpc-servers on loopback behind their machines' relays, tokens per lease.

Against the shared loopback mesh (real scheduler, workers, rpc-servers and relays). The rpc-server's own log is the
witness that a refused connection never reached it: llama.cpp prints ``Accepted client connection`` per client.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import psutil
import pytest

from sharedllm.relay import ClientRelay, TokenError, parse_endpoint
from tests.helpers import ACCEPTED, HELLO, N_CTX, PROMPT, everything_until_closed, machine, wait_for

pytestmark = pytest.mark.mesh



def _server_log(mesh_cluster, machine_id: str, name: str) -> Path:
    logs = sorted((mesh_cluster.workdir / machine_id).rglob(f"sharedllm-{machine_id}/{name}"),
                  key=lambda p: p.stat().st_mtime)
    assert logs, f"no {name} for {machine_id} under {mesh_cluster.workdir}"
    return logs[-1]


def _count(path: Path, text: str) -> int:
    return path.read_text(errors="replace").count(text)


def test_rpc_servers_listen_on_loopback_behind_relays(mesh, model_path):
    for m in mesh.machines():
        rpc = m["rpc"]
        assert rpc["state"] == "ready" and not rpc["direct"], rpc
        assert rpc["relay"] and rpc["relay"]["fingerprint"].startswith("sha256:"), rpc
        assert rpc["relay"]["target"] == rpc["endpoint"]
        listening = {c.laddr for c in psutil.Process(rpc["pid"]).net_connections(kind="tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening  # never a routable address
    # Placement hands out the relays, not the rpc-servers.
    relays = {m["rpc"]["relay"]["endpoint"] for m in mesh.machines()}
    assert set(mesh.plan(model_path, n_ctx=512).endpoints) <= relays


def test_raw_socket_to_a_relay_gets_nothing_from_the_rpc_server(mesh_cluster, mesh):
    m = machine(mesh, "machine-1")
    host, port = parse_endpoint(m["rpc"]["relay"]["endpoint"])
    server_log = _server_log(mesh_cluster, "machine-1", "rpc-server.log")
    relay_log = _server_log(mesh_cluster, "machine-1", "relay.log")
    accepted, refused = _count(server_log, ACCEPTED), _count(relay_log, "refused relay connection")
    for payload in (HELLO, b"GET / HTTP/1.0\r\n\r\n", b""):
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(payload)
            answer = everything_until_closed(s)
        assert answer == b"" or answer[:1] == b"\x15", answer[:32]  # nothing, or a TLS alert: never an RPC answer
    wait_for(lambda: _count(relay_log, "refused relay connection") >= refused + 3, timeout=30,
             what="the relay to log the refusals")
    time.sleep(0.5)
    assert _count(server_log, ACCEPTED) == accepted  # not a single connection reached the rpc-server


def test_a_leases_token_opens_nothing_after_it(mesh, model_path):
    with mesh.load(model_path, n_ctx=512) as llm:
        assert llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
        lease_a = llm._lease_relays
        assert set(lease_a) == set(llm.topology.machines)
        first = sorted(lease_a)[0]
        a = lease_a[first]
        # While lease A holds the machine, its token opens it.
        ClientRelay(a["endpoint"], a["token"], fingerprint=a["fingerprint"]).check()
        # A token is for one machine: machine-1's token does not open machine-2's relay.
        if len(lease_a) > 1:
            other = lease_a[sorted(lease_a)[1]]
            with pytest.raises(TokenError, match=r"bad MAC|wrong machine"):
                ClientRelay(other["endpoint"], a["token"], fingerprint=other["fingerprint"]).check()
    # Lease A has ended: its token (not expired) opens nothing.
    with pytest.raises(TokenError) as err:
        ClientRelay(a["endpoint"], a["token"], fingerprint=a["fingerprint"]).check()
    assert err.value.reason == "lease mismatch"
    with mesh.load(model_path, n_ctx=512) as llm:
        lease_b = llm._lease_relays
        assert first in lease_b and lease_b[first]["token"] != a["token"]
        with pytest.raises(TokenError) as err:
            ClientRelay(a["endpoint"], a["token"], fingerprint=a["fingerprint"]).check()
        assert err.value.reason == "lease mismatch"  # lease B's machine, lease A's token
        b = lease_b[first]
        ClientRelay(b["endpoint"], b["token"], fingerprint=b["fingerprint"]).check()
        assert llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]


def test_insecure_direct_rpc_is_a_switch_with_a_warning(local_greedy, model_path):
    """``--insecure-direct-rpc``: the rpc-server itself serves clients, no relay; the worker warns at start."""
    from sharedllm.local import LocalMesh

    with LocalMesh(machines=1, insecure_direct_rpc=True, dashboard=False) as lm:
        mesh = lm.mesh()
        (m,) = mesh.machines()
        assert m["rpc"]["direct"] and m["rpc"]["relay"] is None
        assert "WITHOUT the relay" in next(p for p in lm.workers).log.read_text()
        with mesh.load(model_path, n_ctx=2048) as llm:
            assert llm.topology.endpoints == [m["rpc"]["endpoint"]]
            assert llm._lease_relays == {}
            out = llm.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"]
    assert out == local_greedy["completion"]


def test_output_layer_on_the_client_keeps_the_logits_off_the_wire(mesh, local_greedy):
    """Gemma ties its embeddings: by default the client runs the output layer, and the last machine's relay sends back
    a hidden state per token instead of 1 MiB of logits. Both placements give the local greedy text."""
    two = ["machine-1", "machine-2"]
    relay = psutil.Process(machine(mesh, "machine-2")["rpc"]["relay"]["pid"])
    sent, topologies = {}, {}
    for where in ("auto", "mesh"):
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=two, output_layer=where) as llm:
            topologies[where] = llm.topology
            before = relay.io_counters().write_chars
            out = llm.create_completion(PROMPT, max_tokens=64, temperature=0)
            sent[where] = relay.io_counters().write_chars - before
            assert out["choices"][0]["text"] == local_greedy["completion"], where
    client, on_mesh = topologies["auto"], topologies["mesh"]
    assert client.output_on_client and not on_mesh.output_on_client
    logits = 262_144 * 4  # Gemma 3's vocabulary, float32, per token
    assert sent["mesh"] > 64 * logits  # each token's logits cross the relay (to the client, and encrypted)
    assert sent["auto"] < 64 * logits / 20
    # The mesh holds neither the projection (a copy of token_embd) nor the logits' compute buffer.
    assert on_mesh.total_bytes - client.total_bytes > 150 << 20
    assert all(not s.describe_layers().endswith("output") for s in client.stages)
    with pytest.raises(ValueError, match="output_layer"):
        mesh.load("gemma-3-270m", n_ctx=N_CTX, output_layer="gpu")
