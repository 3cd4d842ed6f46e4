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
