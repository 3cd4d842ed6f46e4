# SPDX-License-Identifier: AGPL-3.0-or-later
"""What a step of the batch engine costs, measured as it goes: a decode step and each prompt token on top
(:class:`StepCost`), and a decode-only step by the rows it holds (:class:`RowCost`: what verified drafts cost)."""

from __future__ import annotations

import bisect
from collections.abc import Callable


class StepCost:
    """What a step costs, measured as the scheduler goes (exponential averages): ``decode_ms``, a step that only
    decodes (what the running sequences' next token costs: passes, round trips, the weights read) and ``token_ms``,
    each prompt token a step reads on top of that (None until a step has read ``SAMPLE`` prompt tokens or more)."""

    SAMPLE = 16
    ALPHA = 0.3

    def __init__(self) -> None:
        self.decode_ms: float | None = None
        self.token_ms: float | None = None

    def observe(self, ms: float, prompt_tokens: int, decoded: int) -> None:
        if not prompt_tokens:
            if decoded:
                self.decode_ms = self._avg(self.decode_ms, ms)
        elif prompt_tokens >= self.SAMPLE:
            # A step that reads prompts only still pays what a pass costs whatever it holds (round trips to every
            # machine, a read of the weights): behind a link, most of a short prompt's step. Not a cost per token.
            extra = ms - (self.decode_ms or 0.0)
            self.token_ms = self._avg(self.token_ms, max(extra, 0.0) / prompt_tokens)

    def _avg(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.ALPHA * (new - old)


class RowCost:
    """What a decode-only step costs by the rows it holds (one per decoded sequence, and each draft it verifies),
    measured as the scheduler goes: a level, what a step of the fewest rows seen costs (its exponential average: a
    pass's round trips, which the link's latency changes for every row count alike), and for more rows what they
    cost over it (the compute they add; exponential averages, each moved only by steps of its count).

    Not a line through them. On a CPU the output layer's matrix product for two or three rows takes another kernel
    than for one (Gemma 3 270M on 2 cores, the output layer on the client: 15 ms a step of one row, 35 of two, 46 of
    three, 63 of nine), and behind a link a pass pays its round trips whatever it holds. A row count not measured yet
    is read off those that were: between two, on the line through them; past the largest, ``PRIOR`` of the smallest
    one's cost per row more (a guess that the next drafts then measure); below the smallest, as much less. The
    offsets never fall as rows are added: a count that cost more than a larger one (noise, a slow moment) is taken
    at the larger one's cost, so one bad step cannot keep drafts from being tried again."""

    PRIOR = 0.3
    ALPHA = 0.3

    def __init__(self) -> None:
        self.base: int | None = None  # the fewest rows a step had: its cost is the level
        self.level = 0.0
        self._offset: dict[int, float] = {}  # rows -> what a step of that many costs over the level

    def observe(self, rows: int, ms: float) -> None:
        if self.base is None or rows < self.base:  # the new base: the others' offsets kept as costs
            old = self.level
            self._offset = {r: old + v - ms for r, v in self._offset.items()}
            self.base, self.level = rows, ms
            self._offset[rows] = 0.0
        elif rows == self.base:
            self.level += self.ALPHA * (ms - self.level)
        else:
            offset = self._offset.get(rows)
            self._offset[rows] = ms - self.level if offset is None else offset + self.ALPHA * (ms - self.level - offset)

    def ms(self, rows: int, unknown: float = 0.0) -> float:
        """The estimated cost of a decode-only step of ``rows`` rows; ``unknown`` before any step was measured."""
        return self.curve(unknown)(rows)

    def curve(self, unknown: float = 0.0) -> Callable[[int], float]:
        """:meth:`ms` as a function of the rows, with the estimates as they are now (one step's allocation asks
        it many times)."""
        if self.base is None:
            return lambda rows: unknown
        level = self.level
        envelope: list[tuple[int, float]] = []  # the running minimum from the largest count down: never falling
        lowest = float("inf")
        for r, v in sorted(self._offset.items(), reverse=True):
            lowest = min(lowest, level + v)
            envelope.append((r, lowest))
        envelope.reverse()
        r0, v0 = envelope[0]
        r1, v1 = envelope[-1]
        slope = self.PRIOR * v0 / r0

        def ms(rows: int) -> float:
            if rows <= r0:
                return max(v0 - slope * (r0 - rows), v0 * self.PRIOR)
            if rows >= r1:
                return v1 + slope * (rows - r1)
            i = bisect.bisect_left(envelope, (rows, -1.0))
            (ra, va), (rb, vb) = envelope[i - 1], envelope[i]
            return va + (vb - va) * (rows - ra) / (rb - ra)

        return ms
