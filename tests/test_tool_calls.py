# SPDX-License-Identifier: AGPL-3.0-or-later
"""sharedllm.tool_calls without a model: checking tools, the prompt and grammar they make, reading answers back, and
the streamed form (the real model through the mesh and the server: tests/test_openai.py)."""

from __future__ import annotations

import json

import pytest

from sharedllm.tool_calls import ToolError, Tools, as_text

ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
NOW = {"type": "function", "function": {"name": "now", "description": "the time"}}


def test_tools_and_tool_choice_are_checked():
    assert Tools.parse(None, None) is None and Tools.parse([ADD], "none") is None
    t = Tools.parse([ADD, NOW], None)
    assert (t.choice, t.forced, t.parallel) == ("auto", None, False)
    assert Tools.parse([ADD, NOW], {"type": "function", "function": {"name": "now"}}).forced == "now"
    assert Tools.parse([ADD], "required", parallel=True).parallel
    for tools, choice, param in (([{"type": "function"}], None, "tools"),
                                 ([{"type": "function", "function": {"name": "two words"}}], None, "tools"),
                                 ([ADD, ADD], None, "tools"),
                                 ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], None, "tools"),
                                 ([ADD], "sometimes", "tool_choice"),
                                 ([ADD], {"type": "function", "function": {"name": "now"}}, "tool_choice"),
                                 (None, "required", "tool_choice")):
        with pytest.raises(ToolError) as err:
            Tools.parse(tools, choice)
        assert err.value.param == param


def test_the_grammar_holds_one_call_unless_parallel_calls_are_asked_for():
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    one = Tools.parse([ADD, NOW], "required").schema()
    calls = one["properties"]["tool_calls"]
    assert calls["maxItems"] == 1 and [c["properties"]["name"]["const"] for c in calls["items"]["anyOf"]] == [
        "add", "now"]
    assert calls["items"]["anyOf"][1]["properties"]["arguments"] == {"type": "object", "properties": {}}
    named = Tools.parse([ADD, NOW], {"type": "function", "function": {"name": "add"}}).schema()
    assert named["properties"]["tool_calls"]["items"]["properties"]["name"] == {"const": "add"}
    assert "maxItems" not in Tools.parse([ADD], "required", parallel=True).schema()["properties"]["tool_calls"]
    assert "root ::=" in json_schema_to_gbnf(json.dumps(one))  # llama.cpp's sampler can hold an answer to it


def test_answers_that_call_tools_become_openai_tool_calls():
    t = Tools.parse([ADD, NOW], None)
    for text in ('{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}',
                 '  ```json\n{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}\n```  '):
        [call] = t.calls(text)
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    for text in ("It is 3.", '{"tool_calls": [{"name": "sub", "arguments": {}}]}', '{"tool_calls": []}',
                 '{"tool_calls": [{"name": "add", "arguments": 3}]}', '{"a": 1}', "{not json"):
        assert t.calls(text) is None, text
    result = {"choices": [{"index": 0, "message": {"role": "assistant", "content": '{"tool_calls": [{"name": "now", '
                                                   '"arguments": {}}]}'}, "finish_reason": "stop"}]}
    choice = t.completion(result)["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}


def test_the_history_of_tool_calls_is_text_for_any_template():
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "1+2?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    plain = as_text(history)
    assert plain[2] == {"role": "assistant",
                        "content": '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}'}
    assert plain[3] == {"role": "user", "content": "Result of the function add:\n3"}
    offered = Tools.parse([ADD], None).messages(history)
    assert offered[0]["role"] == "system" and offered[0]["content"].startswith("Be brief.\n\nYou can call")
    assert '"name": "add"' in offered[0]["content"] and offered[1:] == plain[1:]
    assert Tools.parse([ADD], None).messages(history[1:2])[0]["role"] == "system"
    with pytest.raises(ToolError):
        as_text([{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "add", "arguments": "{x"}}]}])
    as_object = [{"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "add",
                                                                               "arguments": {"a": 1, "b": 2}}}]}]
    assert as_text(as_object) == [plain[2]]  # arguments sent as an object, not a string: read the same


def _chunk(content: str | None = None, role: str | None = None, finish: str | None = None) -> dict:
    delta = {k: v for k, v in (("role", role), ("content", content)) if v is not None}
    return {"id": "x", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_a_streamed_answer_passes_text_through_and_sends_calls_whole():
    t = Tools.parse([ADD], None)
    text = [_chunk(role="assistant"), _chunk(" It"), _chunk(" is 3."), _chunk(finish="stop")]
    out = t.chunks(iter(text))
    first = next(out)  # the role chunk went out with the first text, not at the end
    assert first["choices"][0]["delta"] == {"role": "assistant"}
    assert [c["choices"][0]["delta"].get("content") for c in out] == [" It", " is 3.", None]
    call = '{"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}}]}'
    pieces = [_chunk(role="assistant"), *(_chunk(call[i:i + 7]) for i in range(0, len(call), 7)),
              {**_chunk(finish="stop"), "usage": {"total_tokens": 9}}]
    body, last = list(t.chunks(iter(pieces)))
    [streamed] = body["choices"][0]["delta"]["tool_calls"]
    assert streamed["index"] == 0 and streamed["function"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert body["choices"][0]["delta"]["role"] == "assistant" and "usage" not in body
    assert last["choices"][0]["finish_reason"] == "tool_calls" and last["usage"] == {"total_tokens": 9}
    # Held as a possible call, but not one (cut by max_tokens): the text, whole, at the end.
    cut = [_chunk(role="assistant"), _chunk('{"tool_calls": [{"na'), _chunk(finish="length")]
    body, last = list(t.chunks(iter(cut)))
    assert body["choices"][0]["delta"]["content"] == '{"tool_calls": [{"na'
    assert last["choices"][0]["finish_reason"] == "length"
