# SPDX-License-Identifier: AGPL-3.0-or-later
"""A mesh strangers can share: users reach it through the user port with their own keys, every party proves who it
is, and every action checks its role (issue: "users are not Dask clients"). On the shared loopback mesh, which has a
cluster secret, as the README's secure set-up does:

- from a plain Dask client without credentials, from a connection holding only the cluster secret, and from a user's
  connection, every attempt to run code (on the scheduler, on workers, as tasks, as plugins) or to do an admin's
  action (catalog changes, bans, unbans, drains, users) is refused, and nothing changes;
- anonymous connections are refused; a banned user reconnecting with the same key is still banned, a rate-limited one
  still limited; a report for another user's session is refused;
- the admin does each action, and each appears in the audit trail.
"""

from __future__ import annotations

import asyncio
import pickle

import pytest

from sharedllm.errors import AuthenticationFailed, ClientBanned, NotAuthorized, RateLimited
from sharedllm.security import HandshakeCredential
from tests.helpers import PROMPT, TWO, wait_for

pytestmark = pytest.mark.mesh


def _mark(path: str) -> None:  # what an attacker's code would do: leave a trace
    open(path, "w").close()


async def _attempts(address: str, connection_args: dict, marker: str) -> dict[str, str]:
    """Every attempt of the issue, each over a connection with ``connection_args``; what each raised (or 'DONE' if
    one went through)."""
    from distributed.core import rpc

    pickled = pickle.dumps((_mark, (marker,)))
    attempts = {
        "run on the scheduler": ("run_function", {"function": pickle.dumps(_mark), "args": pickle.dumps((marker,)),
                                                  "kwargs": pickle.dumps({})}),
        "run on every worker": ("broadcast", {"msg": {"op": "run", "function": pickle.dumps(_mark),
                                                      "args": pickle.dumps((marker,))}}),
        "submit a task (a client's stream)": ("register-client", {"client": "intruder", "versions": {}}),
        "register a scheduler plugin": ("register_scheduler_plugin", {"plugin": pickled, "name": "evil"}),
        "register a worker plugin": ("register_worker_plugin", {"plugin": pickled, "name": "evil"}),
        "feed": ("feed", {"function": pickle.dumps(_mark), "interval": 1}),
        "a connection stream": ("connection_stream", {}),
        "catalog add": ("sharedllm_catalog", {"action": "add", "entry": {
            "name": "gemma-3-270m-q4_k_m", "url": "https://evil.example/x.gguf", "sha256": "0" * 64}}),
        "catalog remove": ("sharedllm_catalog", {"action": "remove", "name": "gemma-3-270m-q4_k_m"}),
        "ban a machine": ("sharedllm_trust", {"action": "ban", "machine": "machine-1"}),
        "unban a machine": ("sharedllm_trust", {"action": "unban", "machine": "machine-1"}),
        "drain a machine": ("sharedllm_drain", {"machine": "machine-1"}),
        "ban a client": ("sharedllm_clients", {"action": "ban", "client": "admin"}),
        "unban a client": ("sharedllm_clients", {"action": "unban", "client": "banned-one"}),
        "add a user": ("sharedllm_users", {"action": "add", "name": "intruder", "role": "admin"}),
        "read the audit trail": ("sharedllm_audit", {}),
    }
    out = {}
    for what, (op, kwargs) in attempts.items():
        r = rpc(address, connection_args=dict(connection_args), timeout=5)
        try:
            await asyncio.wait_for(getattr(r, op)(**kwargs), 15)
            out[what] = "DONE"
        except Exception as exc:
            out[what] = f"{type(exc).__name__}: {exc}"
        finally:
            await r.close_rpc()
    return out


def _refused_everything(results: dict[str, str]) -> None:
    done = [k for k, v in results.items() if v == "DONE"]
    assert not done, f"these went through: {done}\n{results}"


def _unchanged(mesh) -> None:
    admin = mesh.control
    entry = {e["name"]: e for e in admin.call("catalog")["models"]}["gemma-3-270m-q4_k_m"]
    assert entry["url"].startswith("pypi://"), "the catalog entry was replaced"
    trust = {r["machine_id"]: r for r in admin.call("trust")["machines"]}
    assert not trust.get("machine-1", {}).get("banned"), "machine-1 was banned"
    assert "machine-1" not in mesh.state()["draining"], "machine-1 was drained"
    assert "intruder" not in {u["name"] for u in admin.call("users")["users"]}


@pytest.mark.parametrize("who", ["no credential", "the cluster secret only"])
def test_the_dask_port_refuses_everything_but_a_workers_part(mesh_cluster, mesh, tmp_path, who):
    args = {}
    if who == "the cluster secret only":
        args["handshake_overrides"] = HandshakeCredential(secret=mesh_cluster.secret.encode(), machine_id="machine-1")
    marker = tmp_path / "pwned"
    results = asyncio.run(_attempts(mesh_cluster.address, args, str(marker)))
    _refused_everything(results)
    assert not marker.exists(), "code ran on the scheduler or a worker"
    _unchanged(mesh)
    # The refusal names the role it needs (where the connection lived to hear it).
    named = [v for v in results.values() if "needs the admin role" in v]
    assert named, results


def test_a_plain_dask_client_cannot_even_connect(mesh_cluster):
    from distributed import Client

    with pytest.raises(Exception, match="needs the admin role"):
        Client(mesh_cluster.address, timeout=10)


def test_a_user_may_use_the_mesh_and_nothing_more(mesh_cluster, mesh):
    key = mesh_cluster.add_user("alice")
    with mesh_cluster.user_mesh(key) as alice:
        assert alice.whoami() == {"name": "alice", "role": "user", "via": "user-port"}
        assert alice.machines().ready()  # reads: the machines, the catalog, the trust records
        assert alice.catalog()["models"]
        alice.control.call("trust")
        admin_actions = [("catalog", {"action": "add", "entry": {"name": "x", "url": "https://e.example/x.gguf"}}),
                         ("catalog", {"action": "remove", "name": "gemma-3-270m-q4_k_m"}),
                         ("trust", {"action": "ban", "machine": "machine-1"}),
                         ("trust", {"action": "unban", "machine": "machine-1"}),
                         ("drain", {"machine": "machine-1"}), ("clients", {"action": "ban", "client": "admin"}),
                         ("clients", {"action": "unban", "client": "alice"}), ("clients", {}),
                         ("users", {"action": "add", "name": "mallory", "role": "admin"}), ("users", {}),
                         ("audit", {}), ("session_open", {"model": "m", "topology": {}})]
        for op, kwargs in admin_actions:
            with pytest.raises(NotAuthorized, match="needs the admin role; you are user 'alice'"):
                alice.control.call(op, **kwargs)
        for op in ("run_function", "broadcast", "update-graph", "register_worker_plugin"):
            with pytest.raises(Exception, match="unknown operation"):  # the user port speaks SharedLLM only
                alice.control.call(op)
    _unchanged(mesh)
    trail = mesh.control.call("audit", limit=100)["entries"]
    refused = [e for e in trail if e["who"] == "alice" and e["outcome"].startswith("refused")]
    assert {"catalog add", "trust ban", "drain", "users add"} <= {e["action"] for e in refused}


def test_anonymous_connections_are_refused(mesh_cluster, monkeypatch):
    monkeypatch.delenv("SHAREDLLM_KEY", raising=False)
    monkeypatch.delenv("SHAREDLLM_KEY_FILE", raising=False)
    with pytest.raises(AuthenticationFailed, match="no anonymous users"):
        mesh_cluster.user_mesh(None)
    wrong = mesh_cluster.add_user("wrong")
    mesh_cluster.mesh().control.call("users", action="rotate", name="wrong")  # the key it had stops working
    with pytest.raises(AuthenticationFailed, match="does not know this key"):
        mesh_cluster.user_mesh(wrong)


def test_sessions_are_their_users_own(mesh_cluster, mesh):
    alice_key, bob_key = mesh_cluster.add_user("alice2"), mesh_cluster.add_user("bob2")
    with mesh_cluster.user_mesh(alice_key) as alice, mesh_cluster.user_mesh(bob_key) as bob, \
            alice.load("gemma-3-270m", n_ctx=256, machines=TWO, max_recoveries=0) as llm:
        sid = llm.session_id
        assert next(s for s in mesh.state()["sessions"] if s["session_id"] == sid)["client"] == "alice2"
        # Bob sees that a session exists, not whose it is.
        assert next(s for s in bob.state()["sessions"] if s["session_id"] == sid)["client"] == "(another user)"
        for op, kwargs in [("session_report", {"tokens": 10**6, "seconds": 1.0}), ("request", {}),
                           ("session_close", {"reason": "closed"})]:
            with pytest.raises(NotAuthorized, match=f"session {sid} is not yours"):
                bob.control.call(op, session_id=sid, **kwargs)
        # A client argument claims nothing: the session is the connection's.
        out = llm.create_completion(PROMPT, max_tokens=4, temperature=0)
        assert out["choices"][0]["text"]


def test_a_banned_user_stays_banned_and_a_limited_one_limited(mesh_cluster, mesh):
    admin = mesh.control
    carol = mesh_cluster.add_user("carol")
    admin.call("clients", action="ban", client="carol")
    for _ in range(2):  # connecting again with the same key is the same user
        with mesh_cluster.user_mesh(carol) as m, pytest.raises(ClientBanned):
            m.load("gemma-3-270m", n_ctx=256, machines=TWO, max_recoveries=0, wait_timeout=0)
    admin.call("clients", action="unban", client="carol")
    dave = mesh_cluster.add_user("dave", limits={"requests_per_minute": 2})
    with mesh_cluster.user_mesh(dave) as m:
        with m.load("gemma-3-270m", n_ctx=256, machines=TWO, max_recoveries=0) as llm:
            llm.create_completion(PROMPT, max_tokens=1, temperature=0)  # acquire took one request of the two
            with pytest.raises(RateLimited):
                llm.create_completion(PROMPT, max_tokens=1, temperature=0)
    with mesh_cluster.user_mesh(dave) as m, pytest.raises(RateLimited):
        m.load("gemma-3-270m", n_ctx=256, machines=TWO, max_recoveries=0, wait_timeout=0)


def test_the_admin_acts_and_the_audit_trail_keeps_it(mesh_cluster, mesh):
    admin = mesh.control
    entry = {"name": "tiny-audited", "url": "https://example.org/tiny.gguf", "sha256": "1" * 64}
    admin.call("catalog", action="add", entry=entry)
    admin.call("catalog", action="remove", name="tiny-audited")
    admin.call("trust", action="ban", machine="machine-2")
    admin.call("trust", action="unban", machine="machine-2")
    admin.call("drain", machine="machine-2")
    admin.call("drain", machine="machine-2", undrain=True)
    key = admin.call("users", action="add", name="erin")["key"]
    erin = mesh_cluster.user_mesh(key)
    assert erin.whoami()["name"] == "erin"
    admin.call("users", action="rotate", name="erin")
    # Her open connection ends at once (not at its next request), and the old key connects no more.
    wait_for(lambda: not erin.control.reachable(), timeout=10, what="erin's connection to close on rotation")
    with pytest.raises(AuthenticationFailed):
        erin.whoami()
    erin.close()
    admin.call("clients", action="ban", client="erin")
    admin.call("clients", action="unban", client="erin")
    admin.call("users", action="remove", name="erin")
    with pytest.raises(AuthenticationFailed):
        mesh_cluster.user_mesh(key)
    trail = admin.call("audit", limit=50)["entries"]
    mine = [(e["action"], e["target"], e["outcome"]) for e in trail if e["who"] == "admin"]
    for action, target in [("catalog add", None), ("catalog remove", "tiny-audited"), ("trust ban", "machine-2"),
                           ("trust unban", "machine-2"), ("drain", "machine-2"), ("users add", "erin"),
                           ("users rotate", "erin"), ("clients ban", "erin"), ("clients unban", "erin"),
                           ("users remove", "erin")]:
        assert any(a == action and (target is None or t == target) and o == "done" for a, t, o in mine), \
            (action, mine)
    assert all(e["via"] == "user-port" and e["address"] for e in trail if e["who"] == "admin")


def test_a_state_file_of_the_release_before_opens_and_gets_an_admin(tmp_path):
    """``tests/data/state-v2.sqlite`` is what the release before the user port wrote (its StateStore, schema 2, and
    the policy its plugin kept: no users, no audit): it opens, keeps its policy, and the first start creates the
    admin credential and says where it is."""
    import shutil
    from pathlib import Path

    from sharedllm.local import LocalMesh

    path = tmp_path / "state.sqlite"
    shutil.copyfile(Path(__file__).parent / "data" / "state-v2.sqlite", path)
    with LocalMesh(machines=0, state_path=path, workdir=tmp_path / "mesh") as lm:
        assert lm.admin_key_file.exists() and lm.admin_key_file.stat().st_mode & 0o077 == 0
        assert "created the mesh's admin credential in" in lm.scheduler.log.read_text()
        mesh = lm.mesh()
        assert mesh.whoami()["role"] == "admin"
        assert "tiny" in {e["name"] for e in mesh.catalog()["models"]}
        assert {r["machine_id"]: r for r in mesh.control.call("trust")["machines"]}["machine-1"]["banned"]
        assert "machine-2" in mesh.state()["draining"]
        banned = {c["client"] for c in mesh.control.call("clients")["clients"] if c["banned"]}
        assert "Client-bad" in banned
        assert [u["name"] for u in mesh.control.call("users")["users"]] == ["admin"]
        key = lm.admin_key
    with LocalMesh(machines=0, state_path=path, workdir=tmp_path / "mesh2") as lm:  # the next start keeps that admin
        assert lm.admin_key == key
        assert "created the mesh's admin credential" not in lm.scheduler.log.read_text()
        assert lm.mesh().whoami() == {"name": "admin", "role": "admin", "via": "user-port"}


def test_the_http_server_speaks_for_each_user(mesh_cluster, mesh):
    """``sharedllm serve``'s API keys are the mesh users' own keys: each request is admitted as its user, so a
    user's bans and limits hold through HTTP as through Python; a key the mesh does not know gets 401."""
    import httpx

    from sharedllm.openai_server import ServerThread, create_app
    from sharedllm.openai_server.auth import MeshUsers

    admin = mesh.control
    frank = mesh_cluster.add_user("frank")
    grace = mesh_cluster.add_user("grace", limits={"requests_per_minute": 1})
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
    users = MeshUsers(mesh_cluster.user_address)
    try:
        with mesh.load("gemma-3-270m", n_ctx=256, machines=TWO, max_recoveries=0, shared=True) as llm, \
                ServerThread(create_app(llm, model_id="m", users=users)) as s:
            def post(key: str | None) -> httpx.Response:
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                return httpx.post(f"{s.url}/v1/completions", json=body, headers=headers, timeout=120)

            assert post(frank).status_code == 200
            assert post(None).status_code == 401
            assert post("slk_000000000000_" + "x" * 43).status_code == 401  # a key of no user of this mesh
            assert post(grace).status_code == 200
            limited = post(grace)  # grace has one request a minute: the mesh refuses her second, as hers
            assert limited.status_code == 429 and "grace" in limited.text, limited.text
            assert post(frank).status_code == 200  # ... and frank's go on
            admin.call("clients", action="ban", client="frank")
            banned = post(frank)
            assert banned.status_code == 403 and banned.json()["error"]["code"] == "client_banned"
            admin.call("clients", action="unban", client="frank")
            usage = {c["client"]: c for c in admin.call("clients")["clients"]}
            assert "frank" in usage and "grace" in usage  # connected, each as themselves
    finally:
        users.close()
