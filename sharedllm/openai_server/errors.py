# SPDX-License-Identifier: AGPL-3.0-or-later
"""The OpenAI error objects, and the mesh's exceptions as HTTP errors."""

from __future__ import annotations

import logging
import math
import re

from fastapi.responses import JSONResponse

from sharedllm.errors import ClientBanned, EngineError, MeshBusy, MeshError, ModelBusy, NotAuthorized, RateLimited

logger = logging.getLogger(__name__)


CONTEXT_LENGTH_EXCEEDED = "exceed context window"  # llama-cpp-python's ValueError for a prompt longer than n_ctx
MAX_RETRY_AFTER = 60  # seconds; the openai package honours Retry-After up to 60 s


class APIError(Exception):
    """An error answered as an OpenAI error object with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The OpenAI error object, with this error's status and headers."""
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code,
                               headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                    code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def status_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def map_exception(exc: BaseException, *, param: str) -> APIError:
    """Turn what the model raised into the OpenAI error a client should see (``param``: the prompt's field)."""
    if isinstance(exc, ValueError):  # llama-cpp-python's own argument checks, forwarded by the engine
        if CONTEXT_LENGTH_EXCEEDED in str(exc):
            # Raised for the prompt alone (a max_tokens beyond what fits is capped, as llama-cpp-python does).
            sizes = re.search(r"\((\d+)\) exceed context window of (\d+)", str(exc))
            what = (f"the {param} has {sizes[1]} tokens, the context {sizes[2]}" if sizes else str(exc))
            return APIError(400, f"This model's maximum context length is exceeded: {what}. Shorten the {param}.",
                            param=param, code="context_length_exceeded")
        return APIError(400, str(exc) or "invalid request")
    if isinstance(exc, RateLimited):  # the mesh's per-client limits
        retry = str(max(1, min(MAX_RETRY_AFTER, math.ceil(exc.retry_after))))
        return APIError(429, f"Rate limit reached: {exc}", type="requests", code="rate_limit_exceeded",
                        headers={"Retry-After": retry})
    if isinstance(exc, ClientBanned):  # the mesh's operator banned this user (or the server's): no retry helps
        return APIError(403, f"The mesh refuses this user: {exc}", type="permission_error", code="client_banned")
    if isinstance(exc, NotAuthorized):
        return APIError(403, f"Not allowed: {exc}", type="permission_error", code="not_authorized")
    if isinstance(exc, ModelBusy):  # every sequence of the model runs and its own queue is full
        return APIError(429, f"The model is busy: {exc}", type="requests", code="rate_limit_exceeded",
                        headers={"Retry-After": "2"})
    if isinstance(exc, MeshBusy):  # a lost machine, and the rest of the mesh is leased by other sessions
        return APIError(503, f"the mesh is busy: {exc}", type="server_error", code="mesh_busy",
                        headers={"Retry-After": "10"})
    if isinstance(exc, EngineError):
        return APIError(503, f"the model's engine failed: {exc}. The server cannot answer until it is restarted with "
                        "the model loaded again.", type="server_error", code="engine_failed")
    if isinstance(exc, MeshError):
        return APIError(503, f"the mesh cannot serve the model now: {exc}", type="server_error", code="mesh_error",
                        headers={"Retry-After": "5"})
    logger.error("unexpected error from the model", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
