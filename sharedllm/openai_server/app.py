# SPDX-License-Identifier: AGPL-3.0-or-later
"""The FastAPI app: routes, admission, streamed and whole answers."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sharedllm.errors import EngineError
from sharedllm.openai_server.admission import QueueFull, QueueTimeout, RequestQueue, Slot
from sharedllm.openai_server.auth import BearerAuth, MeshUsers
from sharedllm.openai_server.errors import APIError, error_response, map_exception, status_type
from sharedllm.openai_server.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    responses_doc,
)
from sharedllm.openai_server.streaming import (
    DISCONNECTED,
    EventStream,
    TaskGeneration,
    ThreadGeneration,
    Threads,
    prune,
    unless_disconnected,
)
from sharedllm.openai_server.translate import chat_kwargs, completion_kwargs, wants_usage
from sharedllm.tool_calls import Tools

logger = logging.getLogger(__name__)


def _n_vocab(model: Any) -> int | None:
    fn = getattr(model, "n_vocab", None)
    if callable(fn):
        return int(fn())
    info = getattr(getattr(model, "_engine", None), "info", None) or {}  # MeshModel keeps it with the engine info
    return info.get("n_vocab")


def _client_key(request: Request) -> str:
    """Who sends a request, for taking turns in the queue: the user it is for, else its address."""
    principal = getattr(request.state, "principal", None)
    if principal is not None:
        return principal.name
    return "addr:" + (request.client.host if request.client else "")


def create_app(
    model: Any,
    *,
    model_id: str,
    api_keys: Collection[str] = (),
    max_queue: int = 16,
    queue_timeout: float = 60.0,
    aliases: Collection[str] = (),
    users: MeshUsers | None = None,
) -> FastAPI:
    """The FastAPI app serving ``model`` (a loaded ``MeshModel``, or a ``Replicas`` of them) under the id
    ``model_id``; requests may also name it by one of ``aliases`` (such as the catalog name it was served by).

    ``api_keys``: keys accepted as ``Authorization: Bearer KEY`` on ``/v1``; ``users``: the mesh users' own keys
    accepted too, each user's requests admitted under their limits and bans (a model loaded ``shared=True``); with
    neither, the server serves without authentication.
    The model serves its ``parallel`` requests at once (1 for a model without that attribute); ``max_queue``:
    requests that may wait beyond them; more get 429. ``queue_timeout``: seconds a request may wait; longer gets
    503. Waiting requests are served clients in turn (a client: its API key, else its address). The model is not
    closed by the app.
    """
    if not model_id:
        raise ValueError("model_id must be a non-empty string")
    if isinstance(api_keys, str):
        raise TypeError("api_keys must be a collection of keys, not one string")
    queue = RequestQueue(max_queue, queue_timeout, concurrency=max(1, int(getattr(model, "parallel", 1) or 1)))
    created = int(time.time())
    n_vocab = _n_vocab(model)
    state: dict[str, Any] = {"failed": None}
    threads = Threads("sharedllm-openai-stream")

    app = FastAPI(
        title="SharedLLM OpenAI-compatible API",
        version="1",
        description="One GGUF model split across the machines of a SharedLLM mesh, behind the OpenAI API.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.queue = queue
    app.state.model_id = model_id
    app.state.generations = []  # the streamed generations in flight (tests and diagnostics)
    app.state.abandoned = 0  # requests whose client left while they waited in the queue
    if api_keys or users is not None:
        app.add_middleware(BearerAuth, keys=list(api_keys), users=users)
    admits_as = bool(getattr(model, "streams_acceptance", False))  # MeshModel, Replicas: requests for other users

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "We could not parse the JSON body of your request. The body must be a JSON "
                                   "object (Content-Type: application/json).")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if param is None:  # the body as a whole: not a JSON object, or not sent as JSON
            return error_response(400, "The request body must be a JSON object, sent with Content-Type: "
                                   "application/json.")
        return error_response(400, f"{param}: {first.get('msg', 'invalid value')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"Unknown request URL: {request.method} {request.url.path}."
            code = "unknown_url"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}."
            code = "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return error_response(exc.status_code, message, type=status_type(exc.status_code), code=code,
                               headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")

    names = {model_id, *aliases}

    def check_model(name: str) -> None:
        if name not in names:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{model_id}`.",
                           param="model", code="model_not_found")

    async def admit(request: Request) -> Slot:
        if state["failed"] is not None:
            raise map_exception(state["failed"], param="model")
        try:
            return await queue.acquire(_client_key(request))
        except QueueFull as exc:
            raise APIError(429, f"The server is busy: its queue is full ({queue.waiting} request(s) wait for the "
                           f"model). Retry after {exc.retry_after}s.", type="requests", code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except QueueTimeout as exc:
            raise APIError(503, f"The request waited {queue.timeout:g}s for the model without being served. Retry "
                           f"after {exc.retry_after}s.", type="server_error", code="queue_timeout",
                           headers={"Retry-After": str(exc.retry_after)}) from None

    def failed(exc: BaseException, param: str) -> APIError:
        # The model is unusable from now on (/health says so), unless it says it still serves: replicas serve on
        # while one of them has failed.
        if isinstance(exc, EngineError) and (not hasattr(model, "failure") or model.failure is not None):
            state["failed"] = exc
        return map_exception(exc, param=param)

    async def run(request: Request, method: Callable, kwargs: dict, stream: bool, param: str,
                  include_usage: bool = False, tools: Tools | None = None):
        principal = getattr(request.state, "principal", None)
        if admits_as and principal is not None and principal.control is not None:
            kwargs["admit_as"] = principal.control  # the mesh admits it, and charges it, as that user's
        slot = await admit(request)
        if slot.waited and await request.is_disconnected():  # the client gave up while it waited in the queue
            slot.release()
            app.state.abandoned += 1
            return Response(status_code=499)
        if not stream:
            amethod = getattr(model, f"a{method.__name__}", None)  # MeshModel.acreate_*: cancellable
            try:
                if amethod is None:  # a blocking model: its thread runs to the end whatever the client does
                    out = await run_in_threadpool(lambda: method(**kwargs))
                elif (out := await unless_disconnected(request, amethod(**kwargs))) is DISCONNECTED:
                    app.state.abandoned += 1
                    return Response(status_code=499)
            except Exception as exc:
                raise failed(exc, param) from None
            finally:
                slot.release()
            return JSONResponse(tools.completion(out) if tools else out)
        # The status line waits until the model accepted the request (a model that says when: MeshModel), else for
        # the first token: errors before then (bad arguments, a prompt longer than the context, rate limits) get
        # their status code; later ones go in-band.
        extra = {"on_accepted": lambda: gen.accepted()} if getattr(model, "streams_acceptance", False) else {}
        amethod = getattr(model, f"a{method.__name__}", None)  # MeshModel.acreate_*: no thread in between
        if amethod is not None:
            async def start() -> AsyncIterator[dict]:
                chunks = await amethod(**kwargs, stream=True, **extra)
                return tools.achunks(chunks) if tools else chunks

            gen = TaskGeneration(start, slot)
        else:
            gen = ThreadGeneration(lambda: (tools.chunks if tools else iter)(method(**kwargs, stream=True, **extra)),
                                    slot, threads)
        app.state.generations.append(gen)
        gen.start()
        try:
            kind, first = await gen.next()
            if kind == "error":
                raise failed(first, param)
            if kind == "done":  # no chunk at all: an empty stream is still a valid one
                return StreamingResponse(iter([b"data: [DONE]\n\n"]), media_type="text/event-stream")
            return EventStream(gen, first if kind == "chunk" else None, param, include_usage)
        except BaseException:
            gen.cancel()
            raise
        finally:
            prune(app.state.generations)

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["server"])
    async def health() -> JSONResponse:
        """Whether the model can serve, and the queue's state. No API key needed."""
        body = Health(status="failed" if state["failed"] else "ok", model=model_id, running=queue.running,
                      waiting=queue.waiting, max_queue=queue.max_queue,
                      error=str(state["failed"]) if state["failed"] else None)
        return JSONResponse(body.model_dump(), status_code=503 if state["failed"] else 200)

    @app.get("/v1/models", response_model=ModelList, responses=responses_doc(None, errors=(401,)),
             tags=["openai"])
    async def list_models() -> ModelList:
        """The model this server serves."""
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    @app.get("/v1/models/{model:path}", response_model=ModelCard,
             responses=responses_doc(None, errors=(401, 404)), tags=["openai"])
    async def retrieve_model(model: str) -> ModelCard:
        """One model by id."""
        check_model(model)
        return ModelCard(id=model_id, created=created)

    @app.post("/v1/completions", tags=["openai"],
              responses=responses_doc(Completion, stream=True, errors=(400, 401, 404, 429, 503)))
    async def completions(body: CompletionRequest, request: Request):
        """Complete a prompt; ``stream: true`` streams chunks as server-sent events."""
        check_model(body.model)
        kwargs = completion_kwargs(body, model_id, n_vocab)
        return await run(request, model.create_completion, kwargs, bool(body.stream), "prompt", wants_usage(body))

    @app.post("/v1/chat/completions", tags=["openai"],
              responses=responses_doc(ChatCompletion, stream=True, errors=(400, 401, 404, 429, 503)))
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        """Answer a conversation with the model's chat template; ``stream: true`` streams server-sent events."""
        check_model(body.model)
        kwargs, tools = chat_kwargs(body, model_id, n_vocab)
        return await run(request, model.create_chat_completion, kwargs, bool(body.stream), "messages",
                         wants_usage(body), tools)

    def openapi() -> dict:
        # Validation errors are answered 400 with an OpenAI error object, not FastAPI's 422: say so in the schema.
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    if (api_keys or users is not None) and path.startswith("/v1"):
                        # BearerAuth checks the key before FastAPI runs: the schema says so here, not with a
                        # Security dependency that would run on every request for nothing.
                        op["security"] = [{"HTTPBearer": []}]
                    responses = op.get("responses", {})
                    if responses.pop("422", None) is not None and "400" not in responses:
                        responses["400"] = {"description": "Invalid request",
                                            "content": {"application/json": {
                                                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            if api_keys or users is not None:
                schema.setdefault("components", {})["securitySchemes"] = {"HTTPBearer": {
                    "type": "http", "scheme": "bearer",
                    "description": "An API key given to `sharedllm serve`, or your own key of the mesh"}}
            comps = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                comps.pop(name, None)
            if "ErrorResponse" not in comps:
                comps["ErrorResponse"] = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(comps["ErrorResponse"].pop("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
