# SPDX-License-Identifier: AGPL-3.0-or-later
"""The client-side driver: ``Mesh`` (the cluster as a user sees it) and ``MeshModel`` (one loaded model).

    mesh = sharedllm.Mesh("machine1:8789", key_file="alice.key")   # the scheduler's user port, a user's key
    with mesh.load("/models/gemma-3-270m-q4_k_m.gguf", n_ctx=2048) as llm:
        llm.create_completion("Once upon a time", max_tokens=64, temperature=0)

The driver reads the model's GGUF metadata, asks the scheduler for a topology, checks every rpc-server answers, then
starts the engine (a child process holding the llama.cpp context). ``MeshModel`` mirrors ``llama_cpp.Llama``'s
``create_completion`` and ``create_chat_completion``, with the same dict shapes.

One module per concern: :mod:`.mesh` (``Mesh``), :mod:`.control` (the one seam to the scheduler: every call goes
through a ``Control``; :mod:`.userport`'s over the user port, the operator's ``DaskControl`` over Dask's),
:mod:`.session` (the narrow part of it a loaded model uses), :mod:`.model` (``MeshModel``: the engine and its
requests), :mod:`.recovery` (losses, recoveries, moves), :mod:`.delivery` (a stream across replays) and
:mod:`.reports` (statistics to the scheduler).
"""

from sharedllm.client.control import REPORT_TIMEOUT, Control, DaskControl
from sharedllm.client.mesh import OUTPUT_LAYERS, MachineTable, Mesh
from sharedllm.client.model import MeshModel
from sharedllm.client.reports import Reports
from sharedllm.client.session import SessionChannel

__all__ = ["OUTPUT_LAYERS", "REPORT_TIMEOUT", "Control", "DaskControl", "MachineTable", "Mesh", "MeshModel", "Reports",
           "SessionChannel"]
