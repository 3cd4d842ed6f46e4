# SPDX-License-Identifier: AGPL-3.0-or-later
"""Who a request is for: ``Authorization: Bearer KEY`` on every ``/v1`` route.

A key is one of the server's own API keys (``--api-key``: its requests are the server's user's), or a mesh user's own
key (``sharedllm users add`` printed it): the server proves it to the scheduler's user port once, with a connection of
that user's own, and each of their requests is admitted under their limits and bans and charged their tokens, as
through the Python API.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from sharedllm.openai_server.errors import error_response

logger = logging.getLogger("sharedllm.openai_server")


@dataclass(frozen=True)
class Principal:
    """The user a request is for: a mesh user (``control``: their connection to the user port), or the holder of
    one of the server's own API keys (``control`` None: the server's own user)."""

    name: str
    control: Any = None


class MeshUsers:
    """Mesh users' keys as API keys: each key is proven to the user port by a connection of its own, made at its
    first request and kept (at most ``max_users``, the least recently used closed first); a refused key is
    remembered for ``refused_for`` seconds, so a client retrying a wrong key does not make the server hammer the
    scheduler."""

    def __init__(self, address: str, *, tls_ca_file: str | None = None, max_users: int = 256,
                 refused_for: float = 30.0):
        self.address = address
        self.tls_ca_file = tls_ca_file
        self.max_users = max_users
        self.refused_for = refused_for
        self._known: OrderedDict[bytes, Principal] = OrderedDict()
        self._refused: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def principal(self, token: str) -> Principal | None:
        """The user whose key ``token`` is, else None (blocking: a first use connects)."""
        from sharedllm import security
        from sharedllm.client.userport import UserControl
        from sharedllm.errors import MeshError

        digest = hashlib.sha256(token.encode()).digest()
        with self._lock:
            if (known := self._known.get(digest)) is not None and known.control.reachable():
                self._known.move_to_end(digest)
                return known
            if time.monotonic() < self._refused.get(digest, 0.0):
                return None
        try:
            security.parse_user_key(token)
            control = UserControl(self.address, key=token, tls_ca_file=self.tls_ca_file)
        except (ValueError, MeshError) as exc:
            logger.info("refused an API key that is no mesh user's (%s)", exc)
            with self._lock:
                self._refused[digest] = time.monotonic() + self.refused_for
            return None
        principal = Principal(control.identity, control)
        with self._lock:
            old = self._known.pop(digest, None)
            self._known[digest] = principal
            while len(self._known) > self.max_users:
                _, evicted = self._known.popitem(last=False)
                evicted.control.close()
        if old is not None:
            old.control.close()
        return principal

    def close(self) -> None:
        with self._lock:
            known, self._known = list(self._known.values()), OrderedDict()
        for p in known:
            with contextlib.suppress(Exception):
                p.control.close()


class BearerAuth:
    """ASGI middleware: ``/v1/...`` requests need ``Authorization: Bearer KEY``, one of ``keys`` or, with
    ``users``, a mesh user's key. The request's :class:`Principal` goes in ``request.state.principal``.

    It runs before the body is parsed, so a request without a valid key gets 401 whatever its body.
    """

    def __init__(self, app, keys: Collection[str], users: MeshUsers | None = None, prefix: str = "/v1"):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.users = users
        self.prefix = prefix

    def _static(self, token: bytes) -> Principal | None:
        ok = False
        for key in self.keys:  # compare with every key, in constant time
            ok |= hmac.compare_digest(token, key)
        return Principal("key:" + hashlib.sha256(token).hexdigest()[:16]) if ok else None

    async def _principal(self, header: bytes | None) -> Principal | None:
        if header is None or not header[:7].lower() == b"bearer ":
            return None
        token = header[7:].strip()
        if (found := self._static(token)) is not None:
            return found
        if self.users is not None and token.startswith(b"slk_"):
            return await run_in_threadpool(self.users.principal, token.decode(errors="replace"))
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix) or not (self.keys or self.users):
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        principal = await self._principal(header)
        if principal is not None:
            scope.setdefault("state", {})["principal"] = principal
            return await self.app(scope, receive, send)
        message = ("You didn't provide an API key. Pass it in an Authorization header: Authorization: Bearer KEY."
                   if header is None else "Incorrect API key provided.")
        resp = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)
