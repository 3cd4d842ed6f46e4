# SPDX-License-Identifier: AGPL-3.0-or-later
"""The request and response schemas (pydantic), which the OpenAPI schema shows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class RequestBase(BaseModel):
    # Fields of the OpenAI API this server does not use (user, metadata, store, service_tier...) are accepted and
    # ignored, as clients send them freely.
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The model id, as listed by GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1, description="Tokens to generate at most.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences where generation stops.")
    stream: bool | None = Field(False, description="Answer with server-sent events, one per token.")
    stream_options: dict[str, Any] | None = Field(
        None, description="{\"include_usage\": true}: a last chunk, before [DONE], with the usage and no choices.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        None, description="Token id (as a string) to a bias from -100 to 100.")
    n: int | None = Field(1, ge=1, le=1, description="Only 1 is supported.")
    # llama.cpp sampling extensions, as llama.cpp's own server names them.
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    # Below 0.5 the penalty rewards repetition so much that byte-fallback tokens repeat, and llama-cpp-python then
    # generates past max_tokens while its text is incomplete UTF-8: the engine is stuck until the context is full.
    repeat_penalty: float | None = Field(None, ge=0.5, le=2.0)
    # Speculative decoding (a model loaded with a draft): the most drafts a step of this request takes (0: none).
    draft_max: int | None = Field(None, ge=0, le=1024,
                                  description="The most drafts a step of this request takes, up to the model's "
                                              "draft_max (0: no drafts). llama-server's speculative.n_max.")


class CompletionRequest(RequestBase):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, or token ids; a list of several prompts is not supported.")
    suffix: str | None = None
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    best_of: int | None = Field(None, ge=1, le=1, description="Only 1 is supported.")


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None


class JSONSchemaFormat(BaseModel):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="llama-cpp-python's json_object schema")


class ChatCompletionRequest(RequestBase):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = Field(
        None, description="Functions the model may call (sharedllm.tool_calls: any chat model, through its template).")
    tool_choice: str | dict[str, Any] | None = Field(
        None, description='"auto" (with tools, the default), "none", "required" or {"type": "function", "function": '
                          '{"name": ...}}; "required" and a named function hold the answer to a call by a grammar.')
    parallel_tool_calls: bool | None = Field(
        None, description="true: an answer may call several functions; else one (as llama-server's default).")
    functions: list[dict[str, Any]] | None = Field(None, description="Deprecated by OpenAI: use tools.")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sharedllm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "failed"]
    model: str
    running: int
    waiting: int
    max_queue: int
    error: str | None = None


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Any | None = None
    finish_reason: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens found in the engine's prompt cache (not read again)")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(
        None, description='[{"id", "type": "function", "function": {"name", "arguments": a JSON string}}]')


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Any | None = None
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


def responses_doc(ok: type[BaseModel] | None, *, stream: bool = False, errors: tuple[int, ...] = ()) -> dict:
    out: dict[int | str, dict] = {}
    if ok is not None:
        out[200] = {"model": ok}
        if stream:
            out[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
            out[200]["description"] = "The answer; with stream=true, server-sent events of chunks, then [DONE]."
    descriptions = {400: "Invalid request (malformed JSON, bad parameters, prompt longer than the context)",
                    401: "Missing or wrong API key", 404: "Unknown model", 429: "The request queue is full",
                    503: "Waited too long in the queue, or the engine failed"}
    for status in errors:
        out[status] = {"model": ErrorResponse, "description": descriptions[status]}
    return out
