# SPDX-License-Identifier: AGPL-3.0-or-later
"""Tool calls (OpenAI's ``tools`` and ``tool_choice``) for any chat model, through the model's own chat template.

The model is told the tools in the system message and answers either in text or with one JSON object,
``{"tool_calls": [{"name": ..., "arguments": {...}}]}``. With ``tool_choice`` ``"required"`` or a named function its
answer is held to that object by a grammar made from the tools' parameter schemas (a link of llama.cpp's sampler
chain, batched or not): the arguments always parse and match the schema. With ``"auto"`` (the default) it may answer
in text; an answer that is such an object (alone, or in a ```json fence) becomes tool calls. With ``"none"`` the
tools are not offered. Earlier turns' tool calls and tool results are written back as those turns' text (the
assistant's object; the result as a user turn naming the tool), so every template renders them.

A streamed answer that is tool calls comes as one chunk whose delta holds the calls, whole, then the finish reason
``tool_calls``; a text answer streams as any other.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sharedllm import effects
from sharedllm.effects import Core

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class ToolError(ValueError):
    """A request's ``tools``, ``tool_choice`` or tool messages are malformed; ``param`` names which."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Tools:
    """The tools a request offers and how it lets the model use them (see the module's docstring)."""

    def __init__(self, tools: list[dict], choice: str, forced: str | None = None, parallel: bool = False):
        self.tools = tools  # OpenAI's function definitions: {"name", "description", "parameters"}
        self.choice = choice  # "auto" or "required" ("none" offers no tools: parse() returns None then)
        self.forced = forced  # the function tool_choice names, if it names one
        self.parallel = parallel  # an answer may call several functions (else one: a grammar holds it to one)

    @classmethod
    def parse(cls, tools: list[dict] | None, tool_choice: Any, parallel: bool | None = None) -> Tools | None:
        """The request's tools, checked; None when it offers none (no tools, or ``tool_choice: "none"``).
        ``parallel`` (``parallel_tool_calls``): whether an answer may call several functions; not unless asked, as
        llama-server (a small model held to a list of calls by a grammar tends to call on until ``max_tokens``)."""
        if not tools:
            if tool_choice not in (None, "none", "auto"):
                raise ToolError("tool_choice needs tools", "tool_choice")
            return None
        specs: list[dict] = []
        for i, tool in enumerate(tools):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
                raise ToolError(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -", "tools")
            if any(s["name"] == name for s in specs):
                raise ToolError(f"tools[{i}]: a second function named {name!r}", "tools")
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            if not isinstance(params, dict):
                raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
            specs.append({"name": name, "description": str(fn.get("description") or ""), "parameters": params})
        parallel = bool(parallel)
        if tool_choice in (None, "auto"):
            return cls(specs, "auto", parallel=parallel)
        if tool_choice == "none":
            return None
        if tool_choice == "required":
            return cls(specs, "required", parallel=parallel)
        named = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
        if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not named:
            raise ToolError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                            '{"name": ...}}', "tool_choice")
        if not any(s["name"] == named for s in specs):
            raise ToolError(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
        return cls(specs, "required", forced=named, parallel=parallel)

    # --- the request ------------------------------------------------------------------------------------------

    def schema(self) -> dict:
        """The JSON schema of an answer that calls tools (the grammar of a ``required`` or named choice)."""
        calls = [{"type": "object", "properties": {"name": {"const": s["name"]}, "arguments": s["parameters"]},
                  "required": ["name", "arguments"]}
                 for s in self.tools if self.forced in (None, s["name"])]
        item = calls[0] if len(calls) == 1 else {"anyOf": calls}
        array = {"type": "array", "items": item, "minItems": 1, **({} if self.parallel else {"maxItems": 1})}
        return {"type": "object", "properties": {"tool_calls": array}, "required": ["tool_calls"]}

    def instructions(self) -> str:
        listing = json.dumps(self.tools, ensure_ascii=False)
        some = "one or more of them" if self.parallel else "one of them"
        if self.forced:
            how = f"Call the function {self.forced}: answer with only a JSON object"
        elif self.choice == "required":
            how = f"Call {some}: answer with only a JSON object"
        else:
            how = f"To call {some}, answer with only a JSON object"
        text = (f"You can call these functions:\n{listing}\n{how} of the form "
                '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}.')
        if self.choice == "auto":
            text += " Otherwise answer in plain text."
        return text

    def messages(self, messages: list[dict]) -> list[dict]:
        """``messages`` with the tools in the system message and earlier tool turns as text (:func:`as_text`)."""
        out = as_text(messages)
        if out and out[0]["role"] == "system":
            return [{**out[0], "content": f"{_content(out[0])}\n\n{self.instructions()}".strip()}, *out[1:]]
        return [{"role": "system", "content": self.instructions()}, *out]

    # --- the answer -------------------------------------------------------------------------------------------

    def calls(self, text: str) -> list[dict] | None:
        """OpenAI's ``tool_calls`` when ``text`` is an answer that calls tools, else None."""
        text = text.strip()
        if (fence := _FENCE.match(text)) is not None:
            text = fence.group(1)
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        calls = obj.get("tool_calls") if isinstance(obj, dict) else None
        names = {s["name"] for s in self.tools}
        if not isinstance(calls, list) or not calls or not all(
                isinstance(c, dict) and c.get("name") in names and isinstance(c.get("arguments", {}), dict)
                for c in calls):
            return None
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}}
                for c in calls]

    def completion(self, result: dict) -> dict:
        """A chat completion whose answer calls tools, as OpenAI's: ``message.tool_calls``, no content."""
        choice = result["choices"][0]
        if (calls := self.calls(choice["message"].get("content") or "")) is not None:
            choice["message"] = {"role": "assistant", "content": None, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
        return result

    def completed(self, core: Core[dict]) -> Core[dict]:
        """A chat completion's core (:mod:`sharedllm.effects`), its answer read back (:meth:`completion`)."""
        return self.completion((yield from core))

    def streamed(self, core: Core[None]) -> Core[None]:
        """A streamed chat completion's core: text as it comes, unless it may be tool calls (``required``, or an
        answer that starts with ``{`` or a fence): then held to the end and sent as one chunk of calls, or as the
        text. However this stream ends (a client that hung up), the generation's ends with it."""
        held = _Held(self)
        chunks = effects.Nested(core)
        try:
            while (chunk := (yield from chunks.next())) is not effects.END:
                yield from held.feed(chunk)
        finally:
            chunks.close()

    def chunks(self, chunks: Iterator[dict]) -> Iterator[dict]:
        """:meth:`streamed` over a stream of chunks."""
        return effects.iterate(self.streamed(effects.each(chunks)))

    def achunks(self, chunks: AsyncIterator[dict]) -> AsyncIterator[dict]:
        """:meth:`streamed` over an asyncio stream of chunks."""
        return effects.aiterate(self.streamed(effects.aeach(chunks)))


class _Held:
    """The state of one streamed answer for :meth:`Tools.chunks`."""

    def __init__(self, tools: Tools):
        self.tools = tools
        self.holding: bool | None = True if tools.choice == "required" else None  # None: not known yet
        self.text = ""
        self.held: list[dict] = []  # the chunks held back while it is not known whether the answer calls tools

    def feed(self, chunk: dict) -> list[dict]:
        choice = chunk["choices"][0] if chunk.get("choices") else None
        if choice is None:
            return [chunk]
        delta = choice.get("delta") or {}
        piece = delta.get("content") or ""
        if self.holding is None and (self.text + piece).strip():
            self.holding = (self.text + piece).lstrip()[:1] in ("{", "`")
        if self.holding is False:
            out, self.held = [*self.held, chunk], []
            return out
        self.held.append(chunk)
        self.text += piece
        if choice.get("finish_reason") is None:
            return []
        # The end: the calls, or the text held back, and the finish (with the usage the engine put on it).
        head = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        role = next(((c["choices"][0].get("delta") or {}).get("role") for c in self.held
                     if (c["choices"][0].get("delta") or {}).get("role")), "assistant")
        calls = self.tools.calls(self.text)
        if calls is None:
            body = {"role": role, "content": self.text} if self.text else {"role": role}
            reason = choice["finish_reason"]
        else:
            body = {"role": role, "content": None,
                    "tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
            reason = "tool_calls"
        last = {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}]}
        if "usage" in chunk:
            last["usage"] = chunk["usage"]
        return [{**head, "choices": [{"index": 0, "delta": body, "logprobs": None, "finish_reason": None}]}, last]


def _content(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content or ""


def as_text(messages: list[dict]) -> list[dict]:
    """``messages`` with the tool calls of assistant turns written as the assistant's JSON object and each tool
    result as a user turn that names its function; other messages as they are."""
    names: dict[str, str] = {}  # tool_call_id -> function name
    out: list[dict] = []
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            plain = []
            for c in calls:
                fn = (c or {}).get("function") or {}
                args = fn.get("arguments") or "{}"
                try:  # OpenAI sends a JSON string; some clients send the object itself
                    args = args if isinstance(args, dict) else json.loads(args)
                except (TypeError, ValueError):
                    raise ToolError(f"messages[{i}].tool_calls: arguments must be a JSON string", "messages") from None
                names[str(c.get("id"))] = fn.get("name", "")
                plain.append({"name": fn.get("name", ""), "arguments": args})
            text = json.dumps({"tool_calls": plain}, ensure_ascii=False)
            out.append({"role": "assistant", "content": f"{_content(m)}\n{text}".strip()})
        elif m.get("role") in ("tool", "function"):
            name = m.get("name") or names.get(str(m.get("tool_call_id")), "")
            out.append({"role": "user", "content": f"Result of the function {name}:\n{_content(m)}".strip()})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return out


def prepare(kwargs: dict) -> tuple[dict, Tools | None]:
    """``create_chat_completion`` keyword arguments with OpenAI's ``tools``, ``tool_choice`` and
    ``parallel_tool_calls`` taken out and turned into what llama-cpp-python takes (the messages, and for a required
    call a ``response_format`` grammar), and the :class:`Tools` whose :meth:`Tools.wrap` reads the answer back
    (None when no tools are offered). Raises :class:`ToolError`."""
    kwargs = dict(kwargs)
    tools = Tools.parse(kwargs.pop("tools", None), kwargs.pop("tool_choice", None),
                        kwargs.pop("parallel_tool_calls", None))
    if kwargs.get("functions") or kwargs.get("function_call"):
        raise ToolError("functions (deprecated by OpenAI) are not supported: pass them as tools", "functions")
    kwargs["messages"] = (tools.messages if tools else as_text)(list(kwargs.get("messages") or []))
    if tools is not None and tools.choice == "required":
        if (kwargs.get("response_format") or {}).get("type", "text") != "text":
            raise ToolError("a response_format and a required tool call cannot both hold the answer", "tool_choice")
        schema = tools.schema()
        if (why := grammar_error(schema)) is not None:
            raise ToolError(f"the tools' parameter schemas cannot be turned into a grammar: {why}", "tools")
        kwargs["response_format"] = {"type": "json_object", "schema": schema}
    return kwargs, tools


def grammar_error(schema: dict) -> str | None:
    """Why llama-cpp-python cannot turn the JSON ``schema`` into a grammar, None when it can (given one it cannot, it
    falls back to any JSON without a word: callers say so instead)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
