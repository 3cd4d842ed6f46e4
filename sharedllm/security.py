# SPDX-License-Identifier: AGPL-3.0-or-later
"""The cluster secret and the HMAC proofs built on it. No Dask.

A worker joins only if it proves it knows the cluster secret: the scheduler issues a one-time nonce, the worker
answers ``HMAC-SHA256(secret, "sharedllm-worker-v1|nonce|machine_id")``. The secret never crosses the wire, and a
nonce is consumed on first use, so an old answer cannot be replayed. The secret comes from the environment
(``SHAREDLLM_CLUSTER_SECRET``) or a file (``SHAREDLLM_CLUSTER_SECRET_FILE`` or ``--secret-file``), never from the
command line, where other users of the machine could read it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import time
from collections.abc import Mapping
from pathlib import Path

from sharedllm import settings

logger = logging.getLogger(__name__)

ENV_SECRET = settings.env("cluster-secret")
ENV_SECRET_FILE = settings.env("cluster-secret-file")
MIN_SECRET_BYTES = 16
_PROOF_CONTEXT = b"sharedllm-worker-v1"


class SecretError(ValueError):
    """The cluster secret is missing, unreadable or too weak."""


def generate_secret() -> str:
    """A new random cluster secret (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def load_secret(secret_file: str | os.PathLike | None = None) -> bytes | None:
    """The cluster secret from ``secret_file``, else ``$SHAREDLLM_CLUSTER_SECRET_FILE``, else
    ``$SHAREDLLM_CLUSTER_SECRET``; ``None`` when none is configured."""
    path = secret_file or settings.get("cluster-secret-file")
    if path:
        p = Path(path).expanduser()
        try:
            mode = p.stat().st_mode
            value = p.read_text().strip()
        except OSError as exc:
            raise SecretError(f"cannot read the cluster secret file {p} ({exc.strerror}); check the path") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("cluster secret file %s is readable by other users; chmod 600 it", p)
    else:
        value = (settings.get("cluster-secret") or "").strip()
        if not value:
            return None
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise SecretError(f"the cluster secret is too short ({len(value)} characters, need {MIN_SECRET_BYTES}); "
                          "make one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return value.encode()


def write_private(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a secret (a key, a token) to ``path``, readable by its owner only (0600 from creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def new_nonce() -> str:
    return secrets.token_hex(16)


def worker_proof(secret: bytes, nonce: str, machine_id: str) -> str:
    """The answer a worker gives to a registration challenge."""
    msg = b"|".join([_PROOF_CONTEXT, nonce.encode(), machine_id.encode()])
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()


def check_proof(secret: bytes, nonce: str, machine_id: str, proof: str) -> bool:
    """Constant-time check of a worker's answer."""
    return hmac.compare_digest(worker_proof(secret, nonce, machine_id), str(proof))


# --- user keys (the user port) and the proofs built on them ---------------------------------------------------------
#
# An admin issues a user a key (``sharedllm users add``): ``slk_<key id>_<secret>``, printed once. The scheduler keeps
# only what verifies a proof (SCRAM's StoredKey and ServerKey, RFC 5802): a copy of its state file lets nobody prove
# the key. To connect, a client proves it knows the key with an HMAC over a message that holds a fresh nonce of each
# side (so an answer cannot be replayed), and the scheduler proves it holds the verifiers (so a client does not talk to
# an impostor). The key itself never crosses the wire.

KEY_PREFIX = "slk"


def new_user_key() -> tuple[str, str]:
    """A new user key: ``(key id, key text)``."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def parse_user_key(text: str) -> tuple[str, bytes]:
    """``(key id, secret)`` of a key's text; ``ValueError`` naming the problem for anything else."""
    head, _, rest = text.strip().partition("_")
    key_id, _, secret = rest.partition("_")
    if head != KEY_PREFIX or len(key_id) != 12 or len(secret) < 32:
        raise ValueError("not a SharedLLM user key (they look like slk_<12 hex digits>_<secret>, as `sharedllm users "
                         "add` prints them); check SHAREDLLM_KEY or the key file")
    return key_id, secret.encode()


def _client_key(secret: bytes) -> bytes:
    return hmac.new(secret, b"sharedllm client key", hashlib.sha256).digest()


def key_verifiers(text: str) -> tuple[str, str]:
    """What the scheduler keeps of a key: ``(stored key, server key)``, hex."""
    _, secret = parse_user_key(text)
    stored = hashlib.sha256(_client_key(secret)).hexdigest()
    server = hmac.new(secret, b"sharedllm server key", hashlib.sha256).hexdigest()
    return stored, server


def auth_message(*parts: str) -> bytes:
    """The message a proof signs: what the proof is for, and the nonces that make it fresh."""
    return "|".join(("sharedllm-auth-v1", *parts)).encode()


def user_proof(text: str, message: bytes) -> str:
    """The client's proof that it holds the key ``text``, for ``message``."""
    _, secret = parse_user_key(text)
    client_key = _client_key(secret)
    signature = hmac.new(hashlib.sha256(client_key).digest(), message, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(client_key, signature, strict=True)).hex()


def check_user_proof(stored_key: str, message: bytes, proof: str) -> bool:
    """Whether ``proof`` (``user_proof``) shows the key of ``stored_key``, in constant time."""
    try:
        raw = bytes.fromhex(proof)
        stored = bytes.fromhex(stored_key)
    except (TypeError, ValueError):
        return False
    if len(raw) != 32:
        return False
    signature = hmac.new(stored, message, hashlib.sha256).digest()
    client_key = bytes(a ^ b for a, b in zip(raw, signature, strict=True))
    return hmac.compare_digest(hashlib.sha256(client_key).digest(), stored)


def server_signature(server_key: str, message: bytes) -> str:
    """The scheduler's proof that it holds the verifiers of the key the client proved."""
    return hmac.new(bytes.fromhex(server_key), message, hashlib.sha256).hexdigest()


def check_server_signature(text: str, message: bytes, signature: str) -> bool:
    """The client's check of :func:`server_signature` (it derives the server key from its key)."""
    return hmac.compare_digest(server_signature(key_verifiers(text)[1], message), str(signature))


def load_user_key(key: str | None = None, key_file: str | os.PathLike | None = None) -> str | None:
    """A user key: ``key``, else the file ``key_file``, else ``$SHAREDLLM_KEY``, else ``$SHAREDLLM_KEY_FILE``; None
    when none is given. ``ValueError`` for an unreadable file or a malformed key."""
    text = key
    path = key_file if text is None else None
    if text is None and path is None:
        text = settings.get("key")
        path = None if text else settings.get("key-file")
    if path:
        p = Path(path).expanduser()
        try:
            text = p.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the key file {p} ({exc.strerror}); check the path") from exc
    if not text:
        return None
    parse_user_key(text)
    return text.strip()


# --- credentials in a Dask connection's handshake (the Dask port's lockdown: scheduler_plugins.lockdown) -------------

HANDSHAKE_AUTH = "sharedllm-auth"


def machine_proof(secret: bytes, machine_id: str, ts: float, nonce: str) -> str:
    """A machine's proof of the cluster secret for one connection (``ts`` and ``nonce`` make it fresh)."""
    return hmac.new(secret, auth_message("dask-machine", machine_id, str(ts), nonce), hashlib.sha256).hexdigest()


def check_machine_proof(secret: bytes, machine_id: str, ts: float, nonce: str, proof: str) -> bool:
    return hmac.compare_digest(machine_proof(secret, machine_id, ts, nonce), str(proof))


class HandshakeCredential(Mapping):
    """``handshake_overrides`` for a Dask connection (``connection_args``): every connection reads it anew and gets
    a fresh proof (a timestamp and a nonce the scheduler takes once). Either the admin's user key (``key``) or the
    cluster secret with the machine's id (``secret``, ``machine_id``)."""

    def __init__(self, *, key: str | None = None, secret: bytes | None = None, machine_id: str | None = None):
        if (key is None) == (secret is None):
            raise ValueError("a handshake credential is a user key or the cluster secret with a machine id")
        self.key, self.secret, self.machine_id = key, secret, machine_id

    def proof(self) -> dict:
        ts, nonce = round(time.time(), 3), secrets.token_hex(16)
        if self.key is not None:
            key_id, _ = parse_user_key(self.key)
            message = auth_message("dask", key_id, str(ts), nonce)
            return {"role": "admin", "key_id": key_id, "ts": ts, "nonce": nonce,
                    "proof": user_proof(self.key, message)}
        return {"role": "machine", "machine": self.machine_id, "ts": ts, "nonce": nonce,
                "proof": machine_proof(self.secret, self.machine_id, ts, nonce)}

    def __getitem__(self, name: str) -> dict:
        if name != HANDSHAKE_AUTH:
            raise KeyError(name)
        return self.proof()

    def __iter__(self):
        return iter((HANDSHAKE_AUTH,))

    def __len__(self) -> int:
        return 1
