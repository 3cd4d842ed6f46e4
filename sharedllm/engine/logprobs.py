# SPDX-License-Identifier: AGPL-3.0-or-later
"""Log-probabilities of the generated tokens, for the requests that ask (``logprobs``, chat ``top_logprobs``).

llama-cpp-python computes them from ``logits_all`` scores: a ``n_ctx x n_vocab`` array of every position's logits
(2 GiB for a 262k vocabulary and 2048 tokens), and per token a Python list of the whole vocabulary, sorted; and a
batch of sequences has no such array at all. Here the engine reads, as each token is sampled, the logits row
llama.cpp holds for it in place (a numpy view, not a copy): its log-softmax gives the token's log-probability and
the ``k`` most likely tokens' (:func:`token_logprobs`, the arithmetic of ``Llama.logits_to_logprobs``). The request's
``create_completion`` runs without ``logprobs`` and :class:`Trail` puts the object back on its result or on each of
its chunks, in llama-cpp-python's shape (``tokens``, ``text_offset``, ``token_logprobs``, ``top_logprobs``), which
its chat completions turn into OpenAI's ``logprobs.content``. Raw logits, as llama-cpp-python's: before temperature,
penalties and ``logit_bias``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

Record = tuple[float, list[tuple[int, float]]]  # the token's log-probability, the top k (token, log-probability)


def token_logprobs(lib: Any, ctx: Any, row: int, n_vocab: int, token: int, k: int) -> Record:
    """The log-probability of ``token`` and the ``k`` most likely tokens' from the logits of batch row ``row``
    (-1: the last one computed)."""
    logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
    top = float(np.amax(logits))
    shifted = np.subtract(logits, top if np.isfinite(top) else 0.0, dtype=np.single)
    norm = np.log(np.sum(np.exp(shifted)))
    best: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, n_vocab)
        idx = np.argpartition(shifted, n_vocab - k)[n_vocab - k:]
        idx = idx[np.argsort(-shifted[idx], kind="stable")]
        best = [(int(i), float(shifted[i] - norm)) for i in idx]
    return float(shifted[token] - norm), best


class Trail:
    """One request's generated tokens and their records, in order, and the ``logprobs`` objects made of them.

    ``records`` is appended by whoever samples (the batch scheduler, which may sample a few tokens ahead of the
    request; the serial runner as each token comes), ``tokens`` by the request's generator as it hands each token to
    llama-cpp-python; ``records[i]`` belongs to ``tokens[i]``."""

    def __init__(self, k: int, llm: Any, prompt: Any):
        if k < 0:
            raise ValueError(f"logprobs must be >= 0, got {k}")
        self.k = k
        self.records: list[Record] = []
        self.tokens: list[int] = []
        self._llm = llm
        # llama-cpp-python's text_offset counts from the prompt's characters
        self._base = len(prompt) if isinstance(prompt, str) else len(self._text(list(prompt)))
        self._pieces: list[bytes] = []  # each token's bytes, as they are given out
        self._ends: list[int] = []  # each token's end, in bytes of the completion's text
        self._chars = 0  # characters of the tokens given out so far
        self._given = 0
        # The bytes of each token given out and of its alternatives (by their text), for chat's ``bytes``.
        self._given_bytes: list[tuple[bytes, dict[str, bytes]]] = []
        self._chat_at = 0  # chat ``logprobs.content`` entries given their bytes so far

    def _text(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", errors="ignore")

    def _take(self, upto: int) -> dict | None:
        """The ``logprobs`` object of the next tokens not given yet that start within the first ``upto`` bytes of the
        completion's text; None when there are none."""
        while len(self._ends) < len(self.tokens):
            self._pieces.append(self._llm.detokenize([self.tokens[len(self._ends)]]))
            self._ends.append((self._ends[-1] if self._ends else 0) + len(self._pieces[-1]))
        out: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        while self._given < len(self.tokens) and (self._ends[self._given - 1] if self._given else 0) < upto:
            i, self._given = self._given, self._given + 1
            logprob, best = self.records[i]
            piece = self._pieces[i].decode("utf-8", errors="ignore")
            alternatives = {(raw := self._llm.detokenize([t])).decode("utf-8", errors="ignore"): (raw, lp)
                            for t, lp in best}
            top = {text: lp for text, (_, lp) in alternatives.items()}
            top[piece] = logprob  # as llama-cpp-python: the chosen token is always among them
            self._given_bytes.append((self._pieces[i], {text: raw for text, (raw, _) in alternatives.items()}))
            out["tokens"].append(piece)
            out["text_offset"].append(self._base + self._chars)
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(top)
            self._chars += len(piece)
        return out if out["tokens"] else None

    def completion(self, result: dict) -> dict:
        """``result`` (a completion dict) with its choice's ``logprobs``."""
        choice = result["choices"][0]
        choice["logprobs"] = self._take(len((choice.get("text") or "").encode())) or _empty()
        return result

    def chunks(self, chunks: Iterator[dict]) -> Iterator[dict]:
        """``chunks`` (a streamed completion), each with the ``logprobs`` of the tokens its text begins."""
        sent = 0
        for chunk in chunks:
            choice = chunk["choices"][0]
            sent += len((choice.get("text") or "").encode())
            choice["logprobs"] = self._take(sent)
            yield chunk


    def chat(self, chat: dict) -> None:
        """The ``logprobs.content`` entries of a chat completion or chunk made of this trail's tokens, in order, as
        OpenAI gives them: ``bytes`` (llama-cpp-python's conversion leaves None), each token's bytes as llama.cpp
        gives them, whole even for a token that holds part of a character (its ``token`` text cannot say it); and in
        ``top_logprobs`` the ``k`` most likely tokens, no more (llama-cpp-python adds the chosen one when it is not
        among them, as the legacy completions API does: there it stays)."""
        for choice in chat.get("choices") or []:
            for entry in (choice.get("logprobs") or {}).get("content") or []:
                if self._chat_at >= len(self._given_bytes):
                    return
                piece, alternatives = self._given_bytes[self._chat_at]
                self._chat_at += 1
                entry["bytes"] = list(piece)
                entry["top_logprobs"] = (entry.get("top_logprobs") or [])[:self.k]  # the best k come first
                for alt in entry["top_logprobs"]:
                    raw = piece if alt["token"] == entry["token"] else alternatives.get(alt["token"])
                    alt["bytes"] = list(raw if raw is not None else alt["token"].encode())


def _empty() -> dict:
    return {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
