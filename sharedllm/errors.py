# SPDX-License-Identifier: AGPL-3.0-or-later
"""Errors users can catch. Each message names the thing that failed and the way out."""

from __future__ import annotations


class MeshError(Exception):
    """Base class of every SharedLLM error."""


class ModelError(MeshError):
    """A model file is missing, unreadable or not a usable GGUF. ``path`` names the file."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path

    def __reduce__(self):  # keep the attributes across pickling (Dask RPC, the engine pipe)
        return (type(self), (str(self), self.path))


class ModelNotFound(ModelError):
    """The model reference does not point at an existing file."""


class InvalidModel(ModelError):
    """The file exists but is not a valid GGUF model (bad magic, truncated, out-of-bounds tensor data...)."""


class ModelTooLarge(MeshError):
    """The mesh does not have the memory the model needs. Raised before any byte is uploaded."""

    def __init__(self, message: str, needed: int = 0, available: int = 0):
        super().__init__(message)
        self.needed = needed
        self.available = available

    def __reduce__(self):
        return (type(self), (str(self), self.needed, self.available))


class MeshBusy(MeshError):
    """Every machine that could hold the model is leased by other sessions, and the wait timed out."""


class ModelBusy(MeshBusy):
    """Every sequence of a loaded model runs and its queue of waiting requests is full: retry later, or load the
    model with a larger ``parallel``."""


class RateLimited(MeshError):
    """This client is over one of the mesh's limits; ``retry_after`` says when to try again (seconds)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):
        return (type(self), (str(self), self.retry_after))


class ClientBanned(MeshError):
    """The mesh's operator banned this client: no retry helps (the operator lifts it: ``sharedllm clients unban``)."""


class NotAuthorized(MeshError):
    """The operation needs a role this connection does not hold (``sharedllm users grant`` gives a user the admin
    role), or the session is another user's."""


class AuthenticationFailed(MeshError):
    """The scheduler refused this connection's credential (a wrong, removed or rotated key; anonymous users not
    allowed), or the scheduler could not prove it holds the key's verifiers (not the mesh you meant)."""


class NoMachines(MeshError):
    """The mesh has no machine with a ready rpc-server."""


class SchedulerUnreachable(MeshError):
    """The Dask scheduler cannot be reached, or it does not run the SharedLLM preload."""


class RPCServerError(MeshError):
    """An rpc-server could not be started, or does not answer."""


class EngineError(MeshError):
    """The engine process (which holds the llama.cpp context) failed."""


class ModelClosed(EngineError):
    """The model handle was closed (by another thread or task) while this request ran; load the model again."""


class WorkerLost(EngineError):
    """A machine of the session's topology died or stopped answering. ``machine`` and ``endpoint`` name it."""

    def __init__(self, message: str, machine: str | None = None, endpoint: str | None = None):
        super().__init__(message)
        self.machine = machine
        self.endpoint = endpoint

    def __reduce__(self):
        return (type(self), (str(self), self.machine, self.endpoint))


# Expected refusals (a rate limit, a ban, a busy mesh...) travel from the scheduler as answers, not as exceptions that
# Dask would log with a traceback: ``{REFUSAL: to_refusal(exc)}``, raised again on the client by ``from_refusal``.
REFUSAL = "sharedllm_refusal"


def to_refusal(exc: MeshError) -> dict:
    """A ``MeshError`` as plain data: its class name and constructor arguments (its ``__reduce__``)."""
    return {"type": type(exc).__name__, "args": list(exc.__reduce__()[1])}


def from_refusal(d: dict) -> MeshError:
    """The error a refusal describes; only classes of this module are rebuilt."""
    cls = globals().get(str(d.get("type")))
    args = list(d.get("args") or ())
    if isinstance(cls, type) and issubclass(cls, MeshError):
        try:
            return cls(*args)
        except TypeError:
            pass
    return MeshError(f"the scheduler refused the request: {args[0] if args else d}")


def gib(n: float) -> str:
    """Format a byte count for humans (``1.23 GiB``, ``512.0 MiB``)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
