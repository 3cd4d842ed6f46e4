# SPDX-License-Identifier: AGPL-3.0-or-later
"""The engine: a disposable child process that holds the llama.cpp context.

llama.cpp calls ``GGML_ABORT`` (and the process exits with status 134) when an rpc-server dies, a handshake fails or
a tensor is malformed. So the context never lives in the user's interpreter: ``Engine`` starts
``python -m sharedllm.engine``, talks to it over its stdin/stdout with length-prefixed pickle frames, and turns its
death into a typed exception that names the machine or the file. Tokens are forwarded as the child produces them.

- :mod:`.spec`: what an engine loads and where (``EngineSpec``, ``EngineStage``) and the probes of its servers;
- :mod:`.framing`: the frames between parent and child;
- :mod:`.process`: the parent's ``Engine`` (many calls at once), each call's frames in an inbox (:mod:`.inbox`);
- :mod:`.standby`: the child's start, and a ``Standby`` process started ahead of need;
- :mod:`.child`: the child process (the serial and the batched runners);
- :mod:`.load`: how the child builds its ``Llama`` (``build_llama``, remote devices, load phases);
- :mod:`.batch`: continuous batching, the slots and the decode loop;
- :mod:`.sampling`: one native sampler chain per sequence.

No Dask here: the engine knows endpoints and a tensor split, nothing about the mesh.
"""

from sharedllm.engine.load import OUTPUT_ON_CLIENT, LoadProgress, build_llama
from sharedllm.engine.process import Engine
from sharedllm.engine.spec import EngineSpec, EngineStage, first_failing_stage, probe_stage
from sharedllm.engine.standby import Standby

__all__ = ["OUTPUT_ON_CLIENT", "Engine", "EngineSpec", "EngineStage", "LoadProgress", "Standby",
           "build_llama", "first_failing_stage", "probe_stage"]
