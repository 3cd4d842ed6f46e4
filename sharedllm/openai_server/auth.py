# SPDX-License-Identifier: AGPL-3.0-or-later
"""API keys: ``Authorization: Bearer KEY`` on every ``/v1`` route."""

from __future__ import annotations

import hmac
from collections.abc import Collection

from sharedllm.openai_server.errors import error_response


class BearerAuth:
    """ASGI middleware: ``/v1/...`` requests need ``Authorization: Bearer KEY`` with one of ``keys``.

    It runs before the body is parsed, so a request without a valid key gets 401 whatever its body.
    """

    def __init__(self, app, keys: Collection[str], prefix: str = "/v1"):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.prefix = prefix

    def _valid(self, header: bytes | None) -> bool:
        if header is None or not header[:7].lower() == b"bearer ":
            return False
        token = header[7:].strip()
        ok = False
        for key in self.keys:  # compare with every key, in constant time
            ok |= hmac.compare_digest(token, key)
        return ok

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.keys or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if self._valid(header):
            return await self.app(scope, receive, send)
        message = ("You didn't provide an API key. Pass it in an Authorization header: Authorization: Bearer KEY."
                   if header is None else "Incorrect API key provided.")
        resp = error_response(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)
