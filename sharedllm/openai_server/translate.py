# SPDX-License-Identifier: AGPL-3.0-or-later
"""Requests as llama-cpp-python keyword arguments."""

from __future__ import annotations

from typing import Any

from sharedllm.openai_server.errors import APIError
from sharedllm.openai_server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, RequestBase
from sharedllm.tool_calls import ToolError, Tools, grammar_error, prepare

_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty",
             "frequency_penalty", "draft_max")


def _common_kwargs(req: RequestBase, n_vocab: int | None) -> dict[str, Any]:
    kw: dict[str, Any] = {k: v for k in _SAMPLING if (v := getattr(req, k)) is not None}
    if req.stop is not None:
        stops = [req.stop] if isinstance(req.stop, str) else req.stop
        if len(stops) > 4:
            raise APIError(400, "stop takes at most 4 sequences", param="stop")
        kw["stop"] = stops
    if req.seed is not None:
        kw["seed"] = req.seed & 0xFFFFFFFF  # llama.cpp seeds are 32-bit
    if req.logit_bias:
        bias: dict[int, float] = {}
        for key, value in req.logit_bias.items():
            tok = _int_or_none(key)
            if tok is None or tok < 0 or (n_vocab is not None and tok >= n_vocab):
                raise APIError(400, f"logit_bias key {key!r} is not a token id of this model"
                               + (f" (0 to {n_vocab - 1})" if n_vocab else ""), param="logit_bias")
            bias[tok] = value
        kw["logit_bias"] = bias
    return kw


def _int_or_none(s: str) -> int | None:
    try:
        return int(s)
    except ValueError:
        return None


def _prompt(prompt: str | list, n_vocab: int | None) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported; send the prompts as separate requests",
                           param="prompt")
        return _prompt(prompt[0], n_vocab)
    if not prompt:
        raise APIError(400, "prompt is an empty list of tokens", param="prompt")
    bad = [t for t in prompt if t < 0 or (n_vocab is not None and t >= n_vocab)]
    if bad:
        raise APIError(400, f"prompt has token ids outside this model's vocabulary: {bad[:5]}", param="prompt")
    return list(prompt)


def completion_kwargs(req: CompletionRequest, model_id: str, n_vocab: int | None) -> dict[str, Any]:
    """``create_completion`` keyword arguments for ``req``; only what the client set, as the Python API would get."""
    if req.best_of not in (None, 1) or req.n not in (None, 1):
        raise APIError(400, "only n=1 and best_of=1 are supported", param="n")
    kw = _common_kwargs(req, n_vocab)
    kw["prompt"] = _prompt(req.prompt, n_vocab)
    for k in ("suffix", "echo", "logprobs"):
        if (v := getattr(req, k)) is not None:
            kw[k] = v
    kw["model"] = model_id
    return kw


def _message(m: ChatMessage) -> dict[str, Any]:
    content = m.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content)
    role = "system" if m.role == "developer" else m.role  # newer OpenAI clients call the system prompt "developer"
    out: dict[str, Any] = {"role": role, "content": content}
    if m.name is not None:
        out["name"] = m.name
    for key in ("tool_calls", "tool_call_id"):  # an assistant's calls, and the call a tool message answers
        if (value := (m.model_extra or {}).get(key)) is not None:
            out[key] = value
    return out


def chat_kwargs(req: ChatCompletionRequest, model_id: str, n_vocab: int | None) -> tuple[dict[str, Any], Tools | None]:
    """``create_chat_completion`` keyword arguments for ``req`` (the chat template is the model's, from the GGUF
    metadata), and the tools it offers the model, which read the answer back (:mod:`sharedllm.tool_calls`)."""
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n")
    kw = _common_kwargs(req, n_vocab)
    if req.max_tokens is None and req.max_completion_tokens is not None:
        kw["max_tokens"] = req.max_completion_tokens
    kw["messages"] = [_message(m) for m in req.messages]
    if req.logprobs:
        kw["logprobs"] = True
        if req.top_logprobs is not None:
            kw["top_logprobs"] = req.top_logprobs
    rf = req.response_format
    if rf is not None and rf.type != "text":
        schema = rf.json_schema.schema_ if rf.type == "json_schema" and rf.json_schema else rf.schema_
        if rf.type == "json_schema" and schema is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        if schema is not None:
            _check_json_schema(schema)
            kw["response_format"] = {"type": "json_object", "schema": schema}
        else:
            kw["response_format"] = {"type": "json_object"}
    kw["model"] = model_id
    for key in ("tools", "tool_choice", "parallel_tool_calls", "functions"):
        if (value := getattr(req, key)) is not None:
            kw[key] = value
    try:
        return prepare(kw)
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


def _check_json_schema(schema: dict) -> None:
    if (why := grammar_error(schema)) is not None:
        raise APIError(400, f"response_format schema cannot be turned into a grammar: {why}", param="response_format")



def wants_usage(req: RequestBase) -> bool:
    """Whether a streamed answer ends with a usage chunk (``stream_options: {"include_usage": true}``)."""
    return bool(req.stream and (req.stream_options or {}).get("include_usage"))
