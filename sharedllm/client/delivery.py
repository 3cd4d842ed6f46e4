# SPDX-License-Identifier: AGPL-3.0-or-later
"""The delivery of a stream across the attempts of its request: a replay after a recovery yields the text already
delivered again, checked and skipped."""

from __future__ import annotations

import time

from sharedllm.errors import EngineError


class Delivery:
    """The chunks of one streamed request across its attempts: a replay after a recovery must yield the text already
    delivered, which is checked and skipped; the stream keeps the first attempt's id; throughput is counted."""

    def __init__(self, report_every: float):
        self.report_every = report_every
        self.delivered: list[str] = []  # text of every chunk the caller has seen
        self.ident: tuple | None = None  # id and created of the first attempt, kept across replays
        self.seen = 0  # chunks of the current attempt
        self.t0 = self.last = time.perf_counter()
        self.ttft: float | None = None  # ms, reported once per request
        self.tokens = 0  # tokens generated for the caller (the engine's count), across attempts
        self.mark = 0  # tokens at the last report

    def replay(self) -> None:
        """A new attempt starts: its chunks repeat the delivered ones first."""
        self.seen = 0

    def take(self, chunk: dict, generated: int) -> dict | None:
        """The chunk to deliver, or None for a replayed one. ``generated``: the tokens this attempt's engine has
        generated so far (a replay counts the delivered ones again, hence the maximum)."""
        text = _chunk_text(chunk)
        if self.seen < len(self.delivered):
            if text != self.delivered[self.seen]:
                raise EngineError(
                    f"the replay after a lost machine diverged at chunk {self.seen} ({text!r} instead of "
                    f"{self.delivered[self.seen]!r}); use temperature=0 or an explicit seed"
                )
            self.seen += 1
            return None
        if self.ident is None:
            self.ident = (chunk.get("id"), chunk.get("created"))
        else:
            chunk = {**chunk, "id": self.ident[0], "created": self.ident[1]}
        self.delivered.append(text)
        self.seen += 1
        self.tokens = max(self.tokens, generated)
        if self.ttft is None and len(self.delivered) == 1:
            self.last = time.perf_counter()
            self.ttft = (self.last - self.t0) * 1000
        return chunk

    def report_due(self) -> bool:
        return time.perf_counter() - self.last >= self.report_every

    def finish(self, generated: int) -> None:
        """The attempt ended: the engine's final count (the last chunks may carry no new token)."""
        self.tokens = max(self.tokens, generated)

    def report(self) -> tuple[int, float, float | None]:
        """Tokens and seconds since the last report, and the time to first token if not reported yet."""
        now = time.perf_counter()
        out = (self.tokens - self.mark, now - self.last, self.ttft)
        self.mark, self.last, self.ttft = self.tokens, now, None
        return out


def _chunk_text(chunk: dict) -> str:
    choice = (chunk.get("choices") or [{}])[0]
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return f"{delta.get('role', '')}\x00{delta.get('content') or ''}"
