# SPDX-License-Identifier: AGPL-3.0-or-later
"""SharedLLM: one GGUF model split across the machines of a mesh (llama.cpp RPC + a Dask actor system).

    import sharedllm

    mesh = sharedllm.Mesh("machine1:8789", key_file="alice.key")   # the scheduler's user port, a user's key
    with mesh.load("/models/gemma-3-270m-q4_k_m.gguf", n_ctx=2048) as llm:
        print(llm.create_completion("Once upon a time", max_tokens=64, temperature=0))
"""

from __future__ import annotations

from importlib import import_module

from sharedllm.errors import (
    AuthenticationFailed,
    ClientBanned,
    EngineError,
    InvalidModel,
    MeshBusy,
    MeshError,
    ModelClosed,
    ModelError,
    ModelNotFound,
    ModelTooLarge,
    NoMachines,
    NotAuthorized,
    RateLimited,
    RPCServerError,
    SchedulerUnreachable,
    WorkerLost,
)

__version__ = "0.1.0"

# Imported lazily: the rpc-server and engine processes import this package and must start without Dask.
_LAZY = {"Mesh": "sharedllm.client", "MeshModel": "sharedllm.client", "LocalMesh": "sharedllm.local",
         "Topology": "sharedllm.placement", "LoadProgress": "sharedllm.engine", "LoadOptions": "sharedllm.options",
         "Model": "sharedllm.models"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sharedllm' has no attribute {name!r}")


__all__ = [
    "AuthenticationFailed", "ClientBanned", "EngineError", "InvalidModel", "LoadOptions", "LoadProgress", "LocalMesh",
    "Mesh", "MeshBusy", "MeshError", "MeshModel", "Model", "ModelClosed", "ModelError", "ModelNotFound",
    "ModelTooLarge", "NoMachines", "NotAuthorized", "RPCServerError", "RateLimited", "SchedulerUnreachable",
    "Topology", "WorkerLost",
]
