# SPDX-License-Identifier: AGPL-3.0-or-later
"""Lease tokens: what the scheduler mints for one lease on one machine, and how a machine's relay checks them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from pathlib import Path

logger = logging.getLogger("sharedllm.relay")  # one name for the package, and when run as python -m sharedllm.relay

TOKEN_VERSION = "v1"
MAX_TOKEN_BYTES = 2048
_MAC_CONTEXT = b"sharedllm-relay-token"
_KEY_CONTEXT = b"sharedllm-relay-key-v1"


class TokenError(ValueError):
    """A relay token was refused. ``reason`` is one of: malformed, bad MAC, wrong machine, expired, lease mismatch."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason

    def __reduce__(self):
        return (TokenError, (self.reason, str(self).partition(": ")[2]))


class RelayError(ConnectionError):
    """The client relay could not open the tunnel (unreachable, TLS failure, wrong certificate, refused token)."""


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if not text or any(c in text for c in "=+/"):
        raise ValueError("not unpadded URL-safe base64")
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def machine_key(master: bytes, machine_id: str) -> bytes:
    """The relay key of one machine, derived from the scheduler's master key.

    Hand each machine only its own key: it can then verify (and mint) tokens for itself and for no other machine.
    """
    if not master:
        raise ValueError("the relay master key is empty; generate one with secrets.token_bytes(32)")
    return hmac.new(master, _KEY_CONTEXT + b"|" + machine_id.encode(), hashlib.sha256).digest()


def _mac(secret: bytes, signed: str) -> bytes:
    return hmac.new(secret, _MAC_CONTEXT + b"|" + signed.encode("ascii"), hashlib.sha256).digest()


def mint_token(secret: bytes, lease_id: str, machine_id: str, ttl: float, now: float | None = None) -> str:
    """A token that opens ``machine_id``'s relay for ``lease_id`` during ``ttl`` seconds.

    ``secret`` is the machine's relay key (:func:`machine_key`). The token is
    ``v1.<lease>.<machine>.<expiry>.<mac>`` with URL-safe base64 fields and the MAC (HMAC-SHA256) over everything
    before it; it is plain ASCII and safe in URLs, environment variables and JSON.
    """
    if not secret:
        raise ValueError("cannot mint a relay token with an empty key")
    if not lease_id or not machine_id:
        raise ValueError("a relay token needs a lease id and a machine id")
    if ttl <= 0:
        raise ValueError(f"ttl must be positive, got {ttl}")
    expiry = int((time.time() if now is None else now) + ttl + 0.999)
    signed = ".".join([TOKEN_VERSION, b64url_encode(lease_id.encode()), b64url_encode(machine_id.encode()),
                       str(expiry)])
    token = f"{signed}.{b64url_encode(_mac(secret, signed))}"
    if len(token) > MAX_TOKEN_BYTES:
        raise ValueError(f"relay token would be {len(token)} bytes (max {MAX_TOKEN_BYTES}); shorten the lease id")
    return token


def verify_token(secret: bytes, token: str, machine_id: str, now: float | None = None) -> str:
    """Check ``token`` for ``machine_id`` and return its lease id; raise :class:`TokenError` saying why not.

    The MAC is checked (in constant time) before any field is trusted; then the machine, then the expiry.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES:
        raise TokenError("malformed", "not a relay token")
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != TOKEN_VERSION:
        raise TokenError("malformed", f"expected {TOKEN_VERSION}.lease.machine.expiry.mac")
    _version, lease_b64, machine_b64, expiry_s, mac_b64 = parts
    try:
        mac = b64url_decode(mac_b64)
        lease_id = b64url_decode(lease_b64).decode("utf-8")
        token_machine = b64url_decode(machine_b64).decode("utf-8")
        if not expiry_s.isdigit():
            raise ValueError("expiry is not a number")
        expiry = int(expiry_s)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenError("malformed", str(exc)) from None
    if not hmac.compare_digest(mac, _mac(secret, ".".join(parts[:4]))):
        raise TokenError("bad MAC", "not minted with this machine's relay key, or altered")
    if token_machine != machine_id:
        raise TokenError("wrong machine", f"token is for machine {token_machine!r}, this is {machine_id!r}")
    now = time.time() if now is None else now
    if now >= expiry:
        raise TokenError("expired", f"expired {now - expiry:.0f}s ago; ask the scheduler for a fresh lease")
    return lease_id


def read_key(path: str) -> bytes:
    """A relay or hub key from a file: hex, or the text itself (at least 16 bytes); ``SystemExit`` otherwise."""
    text = Path(path).read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = text.encode()
    if len(key) < 16:
        raise SystemExit(f"error: relay key in {path} is shorter than 16 bytes")
    return key
