# SPDX-License-Identifier: AGPL-3.0-or-later
"""The Dask port locked down, by an allowlist: on a mesh with a cluster secret, a connection to the scheduler that has
not proven the admin credential may do only what a vouched machine's worker does to register, report and take its
own work; everything else is refused, whatever Dask adds in a later release.

Dask trusts every connection with everything: a plain ``distributed.Client`` can run code on the scheduler and on
every worker (``run``, ``submit``, ``register_plugin``...), and Dask's decoder unpickles data from any peer before any
handler runs (even in the connection's handshake). So the guard works below the handlers, per connection:

- **Who.** A connection proves a credential in its Dask handshake (``sharedllm-auth``, fresh for each connection: a
  timestamp and a nonce, each nonce taken once): the admin's user key (``role: admin``) or the cluster secret with
  the machine's id (``role: machine``). Without one it is anonymous.
- **No pickle but the admin's.** Every accepted connection decodes without pickle from its handshake on; the admin's
  gets it back once proven (an operator's Dask client sends pickled graphs).
- **What.** The admin: everything. A machine: the operations a worker and its nanny send (register, heartbeat,
  unregister its own workers, log events, the challenge) and a worker's stream messages, none claiming another worker.
  Anonymous: only what a nanny without the preload sends (register itself, unregister a worker of its own host, log
  an event). A refused operation is answered ``NotAuthorized`` naming the role it needs, logged as one line and
  counted; a refused stream message is dropped, and a connection that sends pickle is closed.

Installed by importing :mod:`sharedllm.scheduler` (a scheduler preload is imported before the scheduler listens:
the patches must be in place by then); inert for a scheduler until :func:`enforce` gives it a policy (only a mesh
with a cluster secret gets one). Other schedulers of the same process are left as Dask made them.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import Counter, OrderedDict
from typing import Any

logger = logging.getLogger("sharedllm.scheduler")

AUTH_KEY = "sharedllm-auth"  # the handshake field
SKEW = 300.0  # seconds a proof's timestamp may be off the scheduler's clock
WRONG_SECRET = "wrong-secret:"  # the name of a connection whose machine proof failed (its role: anonymous)
NONCES = 100_000  # nonces remembered (each within SKEW)

# What a worker (and its nanny) sends to the scheduler (distributed 2026.8), and nothing else.
MACHINE_RPC = frozenset({"register-worker", "heartbeat_worker", "register_nanny", "unregister", "log_event",
                         "retire_workers", "sharedllm_challenge", "close"})
MACHINE_STREAM = frozenset({"task-finished", "task-erred", "release-worker-data", "reschedule", "long-running",
                            "add-keys", "request-refresh-who-has", "steal-response", "keep-alive", "log-event",
                            "worker-status-change", "close-stream", "sharedllm-actor-reply"})
NANNY_RPC = frozenset({"register_nanny", "unregister", "log_event", "close"})

PICKLE_OK: contextvars.ContextVar[bool] = contextvars.ContextVar("sharedllm_pickle_ok", default=True)
POLICY = "_sharedllm_lockdown"  # the attribute of a locked-down scheduler that holds its policy
refusals: Counter[tuple[str, str]] = Counter()  # (what, role it needed) -> refusals, for /metrics


class Policy:
    """Who may do what on this scheduler: the cluster secret (machines) and the users registry (admins)."""

    def __init__(self, secret: bytes, users: Any, scheduler: Any):
        self.secret = secret
        self.users = users
        self.scheduler = scheduler
        self._seen: OrderedDict[str, float] = OrderedDict()

    def role_of(self, comm) -> tuple[str, str]:
        """(role, name) a connection proved in its handshake: ``admin``, ``machine`` or ``anonymous``."""
        from sharedllm import security

        auth = (getattr(comm, "remote_info", None) or {}).get(AUTH_KEY)
        if not isinstance(auth, dict):
            return "anonymous", "anonymous"
        ts, nonce, proof, role = auth.get("ts"), auth.get("nonce"), auth.get("proof"), auth.get("role")
        if not (isinstance(ts, (int, float)) and isinstance(nonce, str) and isinstance(proof, str)
                and 16 <= len(nonce) <= 128 and abs(time.time() - ts) <= SKEW):
            return "anonymous", "anonymous"
        if not self._fresh(nonce, ts):
            logger.warning("refused a replayed credential from %s", getattr(comm, "peer_address", "?"))
            return "anonymous", "anonymous"
        if role == "admin" and isinstance(auth.get("key_id"), str):
            message = security.auth_message("dask", auth["key_id"], str(ts), nonce)
            user = self.users.verify(auth["key_id"], message, proof)
            if user is not None and user.role == "admin":
                return "admin", user.name
            logger.warning("refused an admin credential that does not verify from %s",
                           getattr(comm, "peer_address", "?"))
        elif role == "machine" and isinstance(auth.get("machine"), str):
            if security.check_machine_proof(self.secret, auth["machine"], ts, nonce, proof):
                return "machine", auth["machine"]
            logger.warning("wrong cluster secret for machine %s (from %s): its connection is anonymous",
                           auth["machine"][:64], getattr(comm, "peer_address", "?"))
            return "anonymous", WRONG_SECRET + auth["machine"][:64]
        return "anonymous", "anonymous"

    def _fresh(self, nonce: str, ts: float) -> bool:
        now = time.time()
        while self._seen and (len(self._seen) > NONCES or next(iter(self._seen.values())) < now - 2 * SKEW):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True

    def worker_machine(self, address: Any) -> str | None:
        """The machine a registered worker reported, else None."""
        ws = self.scheduler.workers.get(address) if isinstance(address, str) else None
        report = (ws.metrics.get("sharedllm") or ws.extra.get("sharedllm")) if ws is not None else None
        return (report or {}).get("machine_id")


def enforce(policy: Policy) -> None:
    """Lock ``policy.scheduler``'s Dask port down with ``policy`` (each scheduler of a process has its own)."""
    setattr(policy.scheduler, POLICY, policy)


def _policy_of(server: Any) -> Policy | None:
    return getattr(server, POLICY, None)


def install() -> None:
    """Put the guard in place (idempotent): the decoder, the listener's handshake, the scheduler's connections."""
    import distributed.comm.core as comm_core
    import distributed.protocol as protocol
    from distributed.scheduler import Scheduler

    if getattr(protocol.loads, "_sharedllm", False):
        return
    original_loads = protocol.loads

    def loads(frames, deserialize=True, deserializers=None):
        if not PICKLE_OK.get() and frames and b"__Pickled__" in bytes(frames[0]):
            _refuse_pickled(frames[0])
        return original_loads(frames, deserialize=deserialize, deserializers=deserializers)

    loads._sharedllm = True
    protocol.loads = loads

    original_on_connection = comm_core.BaseListener.on_connection

    async def on_connection(self, comm, handshake_overrides=None):
        if _policy_of(getattr(getattr(self, "comm_handler", None), "__self__", None)) is not None:
            PICKLE_OK.set(False)  # the handshake itself is decoded without pickle
        return await original_on_connection(self, comm, handshake_overrides)

    comm_core.BaseListener.on_connection = on_connection

    original_handle_comm = Scheduler.handle_comm

    def handle_comm(self, comm):
        _guard(self, comm)
        return original_handle_comm(self, comm)

    Scheduler.handle_comm = handle_comm


def _refuse_pickled(frame: Any) -> None:
    import msgpack

    def hook(obj: dict) -> dict:
        if "__Pickled__" in obj:
            raise ValueError("SharedLLM: pickled data refused on this connection (only the admin's may carry it)")
        return obj

    msgpack.loads(frame, object_hook=hook, use_list=False, strict_map_key=False, raw=False)


def _guard(scheduler, comm) -> None:
    """Decide the connection's role at its first read (the policy is in place by then: a preload sets it before the
    scheduler serves) and filter what it sends."""
    original_read = comm.read
    decided: list[tuple[str, str, Policy | None]] = []

    async def read(deserializers=None):
        if not decided:
            policy = _policy_of(scheduler)
            decided.append((*policy.role_of(comm), policy) if policy is not None else ("admin", "dask", None))
            comm.sharedllm_role, comm.sharedllm_name = decided[0][:2]
        role, name, policy = decided[0]
        PICKLE_OK.set(role == "admin")
        while True:
            msg = await original_read(deserializers)
            if role == "admin":
                return msg
            if isinstance(msg, dict):
                op = msg.get("op")
                why = _refused_rpc(policy, role, name, op, msg, comm)
                if why is None:
                    return msg
                await _answer_refusal(comm, msg, why, op, role, name)
                continue
            if isinstance(msg, (list, tuple)):
                kept = [m for m in msg if _stream_allowed(role, m, comm)]
                return type(msg)(kept) if len(kept) != len(msg) else msg
            return msg

    comm.read = read


def _refused_rpc(policy: Policy, role: str, name: str, op: Any, msg: dict, comm) -> str | None:
    """Why ``op`` is refused to this connection, else None."""
    if op is None:
        return None  # not an operation (a reply inside an exchange, as a nanny's registration status)
    allowed = MACHINE_RPC if role == "machine" else NANNY_RPC
    if op not in allowed:
        return "machine" if role != "machine" and op in MACHINE_RPC else "admin"
    if op in ("unregister", "heartbeat_worker"):
        address = msg.get("address")
        if role == "machine":
            machine = policy.worker_machine(address)
            if machine is not None and machine != name:
                return "admin"  # another machine's worker
        elif not _same_host(address, getattr(comm, "peer_address", "")):
            return "admin"  # a worker of another host
    if op == "retire_workers" and role == "machine":
        workers = msg.get("workers") or ()
        if any(policy.worker_machine(w) != name for w in workers) or not workers:
            return "admin"
    if op == "register-worker" and role == "machine":
        proof = (msg.get("extra") or {}).get("sharedllm_auth") or {}
        if proof.get("machine_id") not in (None, name):
            return "admin"
    return None


def _stream_allowed(role: str, m: Any, comm) -> bool:
    if not isinstance(m, dict):
        return True  # not a message (the end of a batch)
    op = m.get("op")
    if role == "machine" and op in MACHINE_STREAM and "worker" not in m and "client" not in m:
        return True
    refusals[f"stream {op}", "admin"] += 1
    logger.warning("refused stream message %r from %s (%s): it needs the admin role", op,
                   getattr(comm, "peer_address", "?"), role)
    return False


async def _answer_refusal(comm, msg: dict, need: str, op: Any, role: str, name: str) -> None:
    from distributed.protocol import pickle

    from sharedllm.errors import NotAuthorized

    if role == "machine":
        who = f"machine {name!r}"
    elif name.startswith(WRONG_SECRET):
        who = f"machine {name[len(WRONG_SECRET):]!r} with a wrong cluster secret"
    else:
        who = "an anonymous connection"
    why = f"{op!r} on the Dask port needs the {need} role; you are {who}"
    refusals[str(op), need] += 1
    logger.warning("refused: %s (from %s)", why, getattr(comm, "peer_address", "?"))
    if op == "register-worker":  # a worker reads its registration's answer (sent with reply=False): it exits on this
        fix = "give it the mesh's cluster secret" if name.startswith(WRONG_SECRET) else "give it the cluster secret"
        await comm.write({"status": "error", "message": f"SharedLLM refused this worker: {why} ({fix}: "
                                                        "SHAREDLLM_CLUSTER_SECRET or --secret-file)",
                          "time": time.time()})
    elif msg.get("reply", True):
        await comm.write({"status": "uncaught-error", "exception": pickle.dumps(NotAuthorized(why)),
                          "traceback": None, "exception_text": f"NotAuthorized: {why}", "traceback_text": ""})


def _same_host(address: Any, peer: str) -> bool:
    from distributed.comm.addressing import get_address_host

    try:
        return isinstance(address, str) and get_address_host(address) == get_address_host(peer)
    except ValueError:
        return False
