# SPDX-License-Identifier: AGPL-3.0-or-later
"""Vouching with the cluster secret, the trust registry, route-sensitive placement and rate limits."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from sharedllm import security
from sharedllm.errors import ClientBanned, MeshError, NoMachines, RateLimited
from sharedllm.scheduler_plugins.trust import Admission, RateLimiter, TrustRecord, TrustRegistry
from tests.helpers import N_CTX, PROMPT, admin_env, machine, run_cli, wait_for

# --- unit ------------------------------------------------------------------------------------------------------


def test_admission_accepts_the_right_secret_once():
    secret = security.generate_secret().encode()
    adm = Admission(secret)
    nonce = adm.challenge()
    good = {"nonce": nonce, "machine_id": "m1", "proof": security.worker_proof(secret, nonce, "m1")}
    assert adm.check(good, "tcp://a") is None
    assert "already used" in adm.check(good, "tcp://b")  # a replayed answer
    n2 = adm.challenge()
    wrong = {"nonce": n2, "machine_id": "m1", "proof": security.worker_proof(b"x" * 32, n2, "m1")}
    assert "wrong cluster secret" in adm.check(wrong, "tcp://c")
    n3 = adm.challenge()
    other = {"nonce": n3, "machine_id": "m2", "proof": security.worker_proof(secret, n3, "m1")}
    assert "wrong cluster secret" in adm.check(other, "tcp://d")  # a proof is bound to its machine id
    assert "no cluster-secret proof" in adm.check(None, "tcp://e")
    assert len(adm.refused) == 4


def test_secret_loading(tmp_path, monkeypatch):
    monkeypatch.delenv(security.ENV_SECRET, raising=False)
    monkeypatch.delenv(security.ENV_SECRET_FILE, raising=False)
    assert security.load_secret() is None
    monkeypatch.setenv(security.ENV_SECRET, "short")
    with pytest.raises(security.SecretError, match="too short"):
        security.load_secret()
    f = tmp_path / "secret"
    f.write_text("s" * 40 + "\n")
    assert security.load_secret(f) == b"s" * 40
    with pytest.raises(security.SecretError, match="cannot read"):
        security.load_secret(tmp_path / "missing")


def test_trust_scores_and_qualification():
    reg = TrustRegistry()
    reg.seen("a", {"owner": "alice"})
    assert reg.records["a"].probation and reg.records["a"].score == 0.5
    assert "not trusted" in reg.qualifies("a", "trusted")
    for _ in range(TrustRecord.PROBATION_SESSIONS):
        reg.served(["a"], tokens=100)
    assert not reg.records["a"].probation and reg.records["a"].score >= 0.7
    assert reg.qualifies("a", "trusted") is None
    assert reg.qualifies("a", labels={"owner": "alice"}) is None
    assert "label owner" in reg.qualifies("a", labels={"owner": "bob"})
    reg.failed("a")
    reg.failed("a")
    assert reg.records["a"].score < 0.7 and "not trusted" in reg.qualifies("a", "trusted")
    reg.set_banned("a", True)
    assert reg.qualifies("a") == "banned"
    copy = TrustRegistry()
    copy.load(reg.to_dict())
    assert copy.records["a"].banned and copy.records["a"].failures == 2


def test_rate_limiter_trips_and_recovers(monkeypatch):
    from sharedllm.scheduler_plugins import trust as trust_mod

    now = [1000.0]
    monkeypatch.setattr(trust_mod.time, "monotonic", lambda: now[0])
    rl = RateLimiter(trust_mod.Limits(requests_per_minute=3, tokens_per_minute=100, concurrent_leases=1))
    assert all(rl.check_request("c") is None for _ in range(3))
    why, wait = rl.check_request("c")
    assert "requests/minute" in why and 0 < wait <= 20
    now[0] += wait + 0.01
    assert rl.check_request("c") is None
    rl.charge_tokens("c", 500)
    assert "tokens/minute" in rl.check_request("c")[0]
    assert "leases" in rl.check_request("d", leases=1, new_lease=True)[0]
    # Models that made rpc-servers abort: at the limit, no new lease until the oldest strike is an hour old.
    rl = RateLimiter()
    for n in range(1, 4):
        assert rl.check_request("f", new_lease=True) is None
        assert rl.strike("f") == n
    why, wait = rl.check_request("f", new_lease=True)
    assert "3 models in the last hour that made rpc-servers abort" in why and wait == pytest.approx(3600, abs=1)
    assert rl.check_request("f") is None  # requests on a lease it holds go on
    now[0] += 3601
    assert rl.check_request("f", new_lease=True) is None


# --- on a real mesh --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_mesh():
    """A 2-machine mesh with a cluster secret and tight rate limits, machine-2 labelled owner=alice."""
    from sharedllm.local import LocalMesh

    lm = LocalMesh(machines=0, dashboard=False, scheduler_args=["--requests-per-minute", "6"])
    lm.start()
    lm.add_machine("machine-1")
    lm.add_machine("machine-2", labels={"owner": "alice"})
    lm.mesh().wait_for_machines(2, timeout=120)
    yield lm
    lm.close()


def _intruder(lm, env_secret: str | None, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHAREDLLM_CLUSTER_SECRET")}
    if env_secret:
        env[security.ENV_SECRET] = env_secret
    return subprocess.run(
        [sys.executable, "-m", "dask", "worker", lm.address, "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
         "--preload", "sharedllm.worker", "--machine-id", "intruder"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )


@pytest.mark.mesh
def test_wrong_or_missing_secret_is_refused(guarded_mesh, tmp_path):
    # Each intruder is refused (its worker exits, saying why) and never becomes a machine of the mesh. Without a
    # secret its connection is anonymous: it is told to give the cluster secret. With a wrong one, it is told so.
    for secret, why in [(None, "give it the cluster secret"), ("w" * 40, "wrong cluster secret")]:
        out = _intruder(guarded_mesh, secret, tmp_path)
        assert out.returncode != 0
        refusal = [ln for ln in out.stderr.splitlines() if "SharedLLM refused this worker: " in ln]
        assert refusal and why in refusal[0], out.stderr[-3000:]
        assert machine(guarded_mesh.mesh(), "intruder") is None
    log = guarded_mesh.scheduler.log.read_text()
    assert "refused: 'register-worker' on the Dask port" in log  # the anonymous one: one line, its role named
    assert "wrong cluster secret for machine intruder" in log  # the operator sees which machine has a wrong secret


@pytest.mark.mesh
def test_a_replayed_registration_is_refused(guarded_mesh):
    from distributed.core import connect

    client = guarded_mesh.client()
    addr = machine(guarded_mesh.mesh(), "machine-1")["workers"][0]
    # The proof machine-1's worker sent when it joined (its nonce is spent).
    proof = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.workers[addr].extra["sharedllm_auth"])

    async def replay(**connection_args):
        comm = await connect(guarded_mesh.address, **connection_args)
        await comm.write({"op": "register-worker", "address": "tcp://127.0.0.1:9", "extra": {"sharedllm_auth": proof},
                          "reply": True})
        answer = await comm.read()
        await comm.close()
        return answer

    # Over a connection that proves nothing, the registration is refused before its proof is read: an anonymous
    # connection may not register a worker at all.
    answer = client.sync(replay)
    assert answer["status"] == "error" and "needs the" in answer["message"], answer
    # Over a connection that proves the cluster secret afresh (a machine's), the registration's own proof is checked:
    # its nonce was spent when machine-1 joined.
    credential = security.HandshakeCredential(secret=guarded_mesh.secret.encode(), machine_id="machine-1")
    answer = client.sync(replay, handshake_overrides=credential)
    assert answer["status"] == "error" and "already used nonce" in answer["message"], answer
    assert machine(guarded_mesh.mesh(), "machine-1")["workers"] == [addr]  # the replay registered nothing


@pytest.mark.mesh
def test_banned_machine_is_never_placed_and_labels_route(guarded_mesh):
    mesh = guarded_mesh.mesh()  # the admin (bans are the admin's), through the user port
    est_kwargs = {"n_ctx": N_CTX, "wait_timeout": 5}
    with pytest.raises(MeshError, match="no machine 'machine-l' in the mesh"):  # a typo bans nobody
        mesh.control.call("trust", action="ban", machine="machine-l")
    mesh.control.call("trust", action="ban", machine="machine-1")
    try:
        with mesh.load("gemma-3-270m", **est_kwargs) as llm:
            assert llm.topology.machines == ["machine-2"]
        with pytest.raises(NoMachines, match="banned"):
            mesh.load("gemma-3-270m", machines=["machine-1"], **est_kwargs)
    finally:
        mesh.control.call("trust", action="unban", machine="machine-1")
    with mesh.load("gemma-3-270m", labels={"owner": "alice"}, **est_kwargs) as llm:
        assert llm.topology.machines == ["machine-2"]
    rows = {r["machine_id"]: r for r in mesh.control.call("trust")["machines"]}
    assert rows["machine-2"]["sessions"] >= 2 and rows["machine-2"]["labels"] == {"owner": "alice"}


@pytest.mark.mesh
def test_sensitive_request_refused_on_untrusted_machines(guarded_mesh):
    mesh = guarded_mesh.mesh()
    # Both machines have room, but both are new (on probation): nothing qualifies, nothing is placed elsewhere.
    with pytest.raises(NoMachines, match="no machine qualifies for this request") as err:
        mesh.load("gemma-3-270m", n_ctx=N_CTX, privacy="trusted", wait_timeout=5)
    assert "not trusted" in str(err.value) and "not placed elsewhere" in str(err.value)


@pytest.mark.mesh
def test_rate_limit_trips_then_recovers(guarded_mesh):
    key = guarded_mesh.add_user("rate-limited")  # a fresh user: a fresh bucket of 6 requests/minute
    with guarded_mesh.user_mesh(key) as mesh:
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, wait_timeout=5) as llm:  # 1 request (the lease)
            with pytest.raises(RateLimited) as err:
                for _ in range(10):
                    llm.create_completion(PROMPT, max_tokens=1, temperature=0)
            assert 0 < err.value.retry_after <= 15 and "requests/minute" in str(err.value)
            # The message rounds the wait up: never "retry in 0s".
            assert f"retry in {math.ceil(err.value.retry_after)}s" in str(err.value)
            assert "retry in 0s" not in str(err.value)
            time.sleep(err.value.retry_after + 0.5)
            assert llm.create_completion(PROMPT, max_tokens=1, temperature=0)["choices"][0]["text"]


@pytest.mark.mesh
def test_refusals_are_typed_and_logged_without_a_traceback(guarded_mesh):
    admin = guarded_mesh.mesh().control
    with guarded_mesh.user_mesh(guarded_mesh.add_user("refused-user")) as mesh:
        listed = {x["client"] for x in admin.call("clients")["clients"]}
        assert "refused-user" in listed and "fire-and-forget" not in listed  # Dask's own client uses no model
        admin.call("clients", action="ban", client="refused-user")
        try:
            with pytest.raises(ClientBanned, match=r"client refused-user is banned.*sharedllm clients unban") as err:
                mesh.load("gemma-3-270m", n_ctx=N_CTX, wait_timeout=5)
            assert not isinstance(err.value, RateLimited)  # no retry helps a ban
        finally:
            admin.call("clients", action="unban", client="refused-user")
        with pytest.raises(NoMachines, match="no machine qualifies"):
            mesh.load("gemma-3-270m", n_ctx=N_CTX, privacy="trusted", wait_timeout=5)
    log = (guarded_mesh.workdir / "scheduler.log").read_text()
    assert "Traceback" not in log and "Exception while handling op" not in log
    # one line each (over the user port as over the Dask port, where they are "sharedllm_acquire refused: ...")
    assert "acquire refused: ClientBanned" in log and "acquire refused: NoMachines" in log


@pytest.mark.mesh
def test_status_shows_trust(guarded_mesh):
    wait_for(lambda: all("trust" in m for m in guarded_mesh.mesh().machines()), what="trust records")
    m = machine(guarded_mesh.mesh(), "machine-2")
    assert m["labels"] == {"owner": "alice"} and 0 <= m["trust"]["score"] <= 1


@pytest.mark.mesh
def test_tls_mesh_generates_the_same_greedy_text(local_greedy):
    from sharedllm.local import LocalMesh

    with LocalMesh(machines=2, dashboard=False, tls=True) as lm:
        assert lm.address.startswith("tls://")
        with lm.mesh().load("gemma-3-270m", n_ctx=N_CTX) as llm:
            out = llm.create_completion(PROMPT, max_tokens=64, temperature=0)
        assert out["choices"][0]["text"] == local_greedy["completion"]
        # The CLI reaches a TLS mesh with the --tls-* options (and only with them): a user at the user port with the
        # mesh's CA, the operator at the Dask port with the CA, a certificate and a key (and the admin's key).
        admin = admin_env(lm)
        ok = run_cli("--tls-ca-file", str(lm.tls.ca), "status", "--scheduler", lm.user_address, "--json", env=admin)
        assert ok.returncode == 0, ok.stderr
        assert "machine-1" in ok.stdout
        ok = run_cli("--tls-ca-file", str(lm.tls.ca), "--tls-cert", str(lm.tls.cert), "--tls-key", str(lm.tls.key),
                     "status", "--scheduler", lm.address, "--json", env=admin)
        assert ok.returncode == 0, ok.stderr
        assert "machine-1" in ok.stdout
        # Without them: one line (it was a 60-line TypeError), which says what is missing.
        bare = run_cli("status", "--scheduler", lm.user_address, env=admin)
        assert bare.returncode == 1 and "Traceback" not in bare.stderr, bare.stderr
        assert bare.stderr.strip().count("\n") == 0, bare.stderr
        bare = run_cli("status", "--scheduler", lm.address, env=admin)
        assert bare.returncode == 1 and "Traceback" not in bare.stderr, bare.stderr
        assert "speaks TLS" in bare.stderr and "--tls-ca-file" in bare.stderr
