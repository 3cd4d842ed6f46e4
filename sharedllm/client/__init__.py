# SPDX-License-Identifier: AGPL-3.0-or-later
"""The client-side driver: ``Mesh`` (the cluster as a user sees it) and ``MeshModel`` (one loaded model).

    mesh = sharedllm.Mesh(Client("tcp://machine1:8786"))
    with mesh.load("/models/gemma-3-270m-q4_k_m.gguf", n_ctx=2048) as llm:
        llm.create_completion("Once upon a time", max_tokens=64, temperature=0)

The driver reads the model's GGUF metadata, asks the scheduler for a topology, checks every rpc-server answers, then
starts the engine (a child process holding the llama.cpp context). ``MeshModel`` mirrors ``llama_cpp.Llama``'s
``create_completion`` and ``create_chat_completion``, with the same dict shapes.

One module per concern: :mod:`.mesh` (``Mesh``), :mod:`.model` (``MeshModel``: the engine, recoveries, streams) and
:mod:`.reports` (statistics to the scheduler).
"""

from sharedllm.client.mesh import OUTPUT_LAYERS, MachineTable, Mesh
from sharedllm.client.model import MeshModel
from sharedllm.client.reports import REPORT_TIMEOUT, Reports

__all__ = ["OUTPUT_LAYERS", "REPORT_TIMEOUT", "MachineTable", "Mesh", "MeshModel", "Reports"]
