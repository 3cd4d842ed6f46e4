# SPDX-License-Identifier: AGPL-3.0-or-later
"""Chat formats for GGUFs that carry no ``tokenizer.chat_template`` (llama-cpp-python would pick llama-2's).

Registered with llama-cpp-python under :data:`GEMMA` when this module is imported (the engine child does).
"""

from __future__ import annotations

from typing import Any

from llama_cpp import llama_chat_format

GEMMA = "sharedllm-gemma"


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts (OpenAI's form)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text") or "" for part in content
                       if isinstance(part, dict) and part.get("type") == "text")
    return ""


@llama_chat_format.register_chat_format(GEMMA)
def format_gemma(messages: list[dict[str, Any]], **kwargs: Any) -> llama_chat_format.ChatFormatterResponse:
    """Gemma's own chat template (the one Google ships with Gemma 2 and 3): a leading system message is the start of
    the first turn, followed by a blank line (llama-cpp-python's ``gemma`` format drops it, and with it every
    instruction an OpenAI client sends as ``system``); ``assistant`` is ``model``; each message's text is trimmed.
    Lenient where the template raises: a later system message is a user turn, and roles need not alternate."""
    prefix = ""
    if messages and messages[0].get("role") == "system":
        prefix = _text(messages[0].get("content")).strip() + "\n\n"
        messages = messages[1:]
    prompt = ""
    for i, message in enumerate(messages):
        role = "model" if message.get("role") == "assistant" else "user"
        text = (prefix if i == 0 else "") + _text(message.get("content")).strip()
        prompt += f"<start_of_turn>{role}\n{text}<end_of_turn>\n"
    if not messages and prefix:  # a system message alone: a user turn of it
        prompt += f"<start_of_turn>user\n{prefix.strip()}<end_of_turn>\n"
    prompt += "<start_of_turn>model\n"
    return llama_chat_format.ChatFormatterResponse(prompt=prompt, stop="<end_of_turn>\n")
