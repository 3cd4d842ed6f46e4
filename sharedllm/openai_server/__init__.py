# SPDX-License-Identifier: AGPL-3.0-or-later
"""An OpenAI-compatible HTTP API in front of one loaded model: ``sharedllm serve`` runs it with uvicorn.

    app = create_app(llm, model_id="gemma-3-270m-q4_k_m", api_keys={"sk-..."}, max_queue=16, queue_timeout=60)

Routes: ``GET /v1/models``, ``GET /v1/models/{model}``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` answers with server-sent events, ``data: {chunk}`` lines closed by ``data: [DONE]``),
``GET /health`` and the OpenAPI schema at ``/openapi.json``. Every error is an OpenAI error object
``{"error": {"message", "type", "param", "code"}}``.

The model is a ``MeshModel`` (or ``Replicas`` of them, or anything with ``create_completion``/
``create_chat_completion``). It serves its ``parallel`` requests at once (sequences of one batch in its engine); the
others pass a bounded queue, clients in turn: a full queue answers 429 and a wait longer than ``queue_timeout``
answers 503, both with ``Retry-After``. A streamed answer is forwarded chunk by chunk: from a
``MeshModel`` through its asyncio API (``acreate_*``), the engine's pipe read in the event loop itself, with no thread
in between; from a model with a blocking API only, through a thread. Non-streamed calls run in threads. A client that
hangs up stops the generation in the engine. A streamed answer's headers go out once the engine accepted the request
(its checks done, the prompt being evaluated): errors before that have their status code, later ones come in-band as
an error event, as OpenAI's do.

Sampling parameters the client leaves out take ``llama_cpp.Llama``'s defaults, so a request behaves like the same
call through the Python API (OpenAI's own defaults differ: temperature 1, and a chat answer without ``max_tokens``
runs to the end of the context). The mesh's rate limits answer 429 with ``Retry-After``; a failed engine answers 503
and turns ``/health`` to 503. Tool calls: :mod:`sharedllm.tool_calls`; ``stream_options.include_usage``: a last chunk
with the usage. Not supported: ``n`` > 1, the deprecated ``functions``.

One module per concern: :mod:`.app` (the routes), :mod:`.admission` (the queue), :mod:`.streaming` (server-sent
events), :mod:`.schemas`, :mod:`.translate` (requests as llama-cpp-python arguments), :mod:`.auth`, :mod:`.errors`
and :mod:`.serve` (sockets, a server in a thread).
"""

from sharedllm.openai_server.admission import QueueFull, QueueTimeout, RequestQueue, Slot
from sharedllm.openai_server.app import create_app
from sharedllm.openai_server.auth import BearerAuth
from sharedllm.openai_server.errors import APIError, map_exception
from sharedllm.openai_server.serve import ServerThread, listen_socket
from sharedllm.openai_server.translate import chat_kwargs, completion_kwargs

__all__ = ["APIError", "BearerAuth", "QueueFull", "QueueTimeout", "RequestQueue", "ServerThread", "Slot",
           "chat_kwargs", "completion_kwargs", "create_app", "listen_socket", "map_exception"]
