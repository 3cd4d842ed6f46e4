# SPDX-License-Identifier: AGPL-3.0-or-later
"""A machine behind NAT on a real loopback mesh: its relay listens on no port and dials out to the scheduler's relay
hub; sessions reach it through the hub with the oracle's greedy text; the hub forwards nothing without a lease; a
hub killed mid-generation is recovered like a lost machine."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest

from sharedllm import relay
from sharedllm.relay.hub import KIND_CONNECT
from tests.helpers import N_CTX, PROMPT, everything_until_closed, wait_for

pytestmark = [pytest.mark.mesh, pytest.mark.timeout(600)]
BOTH = ["direct-1", "nat-1"]


@pytest.fixture(scope="module")
def nat_mesh():
    from sharedllm.local import LocalMesh

    lm = LocalMesh(machines=0, no_inbound=["nat-1"])
    lm.start()
    lm.add_machine("direct-1")
    lm.add_machine("nat-1")
    mesh = lm.mesh()
    wait_for(lambda: len(mesh.machines().ready()) == 2 and "nat-1" in (mesh.state()["hub"] or {}).get("machines", {}),
             timeout=120,
             what="both machines ready, the NAT machine registered at the hub")
    yield lm
    lm.close()


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process ``pid`` listens on (its socket inodes against /proc/net/tcp{,6}
    in LISTEN state; an IPv4 address dotted, an IPv6 one as the kernel's hex)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addr, _, port = fields[1].rpartition(":")
                host = ".".join(str(b) for b in bytes.fromhex(addr)[::-1]) if len(addr) == 8 else addr
                out.add((host, int(port, 16)))
    return out


def _listening_tcp_ports(pid: int) -> set[int]:
    return {port for _, port in _listening(pid)}


def test_a_machine_behind_nat_serves_through_the_hub(nat_mesh, local_greedy):
    mesh = nat_mesh.mesh()
    machines = {m["machine_id"]: m for m in mesh.machines()}
    nat, direct = machines["nat-1"], machines["direct-1"]
    assert nat["reach"] == "hub" and direct["reach"] == "direct"
    assert nat["rpc"]["relay"]["endpoint"] == "hub/nat-1" and nat["rpc"]["relay"]["inbound"] is False
    assert _listening_tcp_ports(nat["rpc"]["relay"]["pid"]) == set()  # the NAT machine's relay listens nowhere
    assert _listening_tcp_ports(direct["rpc"]["relay"]["pid"])  # the other one does
    # The embedded mesh's scheduler listens on loopback: its hub too, not on every interface.
    hub = mesh.state()["hub"]
    assert _listening(hub["pid"]) == {("127.0.0.1", hub["port"])}
    forwarded = mesh.state()["hub"]["forwarded"]
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=BOTH) as llm:
        assert sorted(llm.topology.machines) == BOTH
        assert "hub/nat-1" in llm.topology.endpoints
        out = llm.create_completion(PROMPT, max_tokens=64, temperature=0)
        assert out["choices"][0]["text"] == local_greedy["completion"]
        hub_token = llm._lease_relays["nat-1"]["hub"]
    # The session ended: the hub refuses its hub token from now on (the machine refuses its lease too).
    def refused() -> bytes:
        with socket.create_connection((mesh.scheduler_host(), hub_token["port"]), timeout=10) as s:
            relay.send_frame(s, KIND_CONNECT, json.dumps({"machine": "nat-1", "token": hub_token["token"]}).encode())
            return everything_until_closed(s)

    assert b"has ended" in wait_for(lambda: b"has ended" in (answer := refused()) and answer, 20,
                                    what="the hub to refuse the ended lease")
    hub = wait_for(lambda: (h := mesh.state()["hub"])["forwarded"] > forwarded and h, 10, what="hub figures")
    assert hub["machines"]["nat-1"]["bytes_to"] > 100_000  # the layers went to the NAT machine through the hub
    assert hub["machines"]["nat-1"]["bytes_from"] > 0
    assert "direct-1" not in hub["machines"] or hub["machines"]["direct-1"]["connections"] == 0


def test_the_hub_forwards_nothing_without_a_lease(nat_mesh):
    mesh = nat_mesh.mesh()
    hub = mesh.state()["hub"]
    before = (hub["forwarded"], hub["machines"]["nat-1"]["connections"])
    endpoint = (mesh.scheduler_host(), hub["port"])
    with socket.create_connection(endpoint, timeout=10) as s:  # raw bytes: no handshake
        s.sendall(b"\x00" * 64)
        assert everything_until_closed(s).startswith(b"SLR1\x01")
    forged = relay.mint_token(b"x" * 32, "s1-1", "nat-1", 60)  # a token not minted with the hub's key
    with socket.create_connection(endpoint, timeout=10) as s:
        relay.send_frame(s, KIND_CONNECT, json.dumps({"machine": "nat-1", "token": forged}).encode())
        assert b"bad MAC" in everything_until_closed(s)
    # the scheduler reads the hub's figures every few seconds
    hub = wait_for(lambda: (h := mesh.state()["hub"]) and sum(h["refused"].values()) >= 2 and h, 20,
                   what="the hub's refusals in the scheduler's state")
    assert (hub["forwarded"], hub["machines"]["nat-1"]["connections"]) == before


def test_a_hub_killed_mid_generation_is_recovered_like_a_lost_machine(nat_mesh, local_greedy):
    mesh = nat_mesh.mesh()
    pid = mesh.state()["hub"]["pid"]
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=BOTH) as llm:
        it = llm.create_completion(PROMPT, max_tokens=64, temperature=0, stream=True)
        text = next(it)["choices"][0]["text"]
        os.kill(pid, signal.SIGKILL)  # every connection through the hub breaks at once
        text += "".join(c["choices"][0]["text"] for c in it)
        assert text == local_greedy["completion"]  # no duplicated or missing text
        assert len(llm.recoveries) >= 1
    state = wait_for(lambda: (h := mesh.state()["hub"])["pid"] not in (None, pid) and "nat-1" in h["machines"]
                     and h, 60, what="the hub restarted and the NAT machine registered again")
    assert state["restarts"] >= 1
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=BOTH) as llm:  # and the NAT machine serves again
        assert "hub/nat-1" in llm.topology.endpoints
        assert llm.create_completion(PROMPT, max_tokens=64, temperature=0)["choices"][0]["text"] == \
            local_greedy["completion"]
