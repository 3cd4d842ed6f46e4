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
    one's cost per row more, but no more than ``ROW_TOKENS`` prompt tokens' (``token_ms``, where the caller measured
    it: what a row's compute costs, link aside) (a guess that the next drafts then measure); below the smallest, as
    much less. (The smallest count's cost is mostly round trips behind a link: at RTT 20 ms its ``PRIOR`` made a draft
    row of Gemma 3 270M look like 19 ms, and a draft model at its prior acceptance did not pay. A prompt token
    alone is too cheap a guess: at RTT 0 the always-wrong drafter then probed twice as often, 0.91x of no drafts.) The
    offsets never fall as rows are added: a count that cost more than a larger one (noise, a slow moment) is taken
    at the larger one's cost, and a count seen once is taken halfway between that step and the guess for it (the
    first step of a count pays for what starts with it: a draft model's first guesses ahead), so one bad step
    cannot keep drafts from being tried again: a count found too dear is not tried, and so not measured, again."""

    PRIOR = 0.3
    ALPHA = 0.3
    ROW_TOKENS = 3.0  # a decode row's compute in prompt tokens' (rows of a small pass take the per-row kernels, a
    # prompt the tiled ones: Gemma 3 270M on 2 cores, about 4 ms a row past the third against 1.5 a prompt token)

    def __init__(self) -> None:
        self.base: int | None = None  # the fewest rows a step had: its cost is the level
        self.level = 0.0
        self.last = 0.0  # the latest step of the fewest rows
        self._offset: dict[int, float] = {}  # rows -> what a step of that many costs over the level
        self._seen: dict[int, int] = {}  # rows -> the steps of that many measured

    def observe(self, rows: int, ms: float) -> None:
        if self.base is None or rows < self.base:  # the new base: the others' offsets kept as costs
            old = self.level
            self._offset = {r: old + v - ms for r, v in self._offset.items()}
            self.base, self.level = rows, ms
            self._offset[rows] = 0.0
            self._seen[rows] = 1
        elif rows == self.base:
            self.level += self.ALPHA * (ms - self.level)
        else:
            # Over the level, or over the latest step of the fewest rows where the level still climbs to it (the
            # link got slower): an offset taken over a level that lags would count the link's new latency as the
            # rows' cost, and a count found too dear is not tried again (at RTT 20 ms after a warm-up at RTT 0,
            # one draft looked 81 ms dear, 58 of it over the new steps).
            level = max(self.level, self.last)
            offset, seen = self._offset.get(rows, 0.0), self._seen.get(rows, 0) + 1
            # the mean of its first steps, then an exponential average
            self._offset[rows] = offset + max(1.0 / seen, self.ALPHA) * (ms - level - offset)
            self._seen[rows] = seen
        if rows == self.base:
            self.last = ms

    def ms(self, rows: int, unknown: float = 0.0, token_ms: float | None = None) -> float:
        """The estimated cost of a decode-only step of ``rows`` rows; ``unknown`` before any step was measured;
        ``token_ms``: what a prompt token costs a step, if measured (:attr:`StepCost.token_ms`)."""
        return self.curve(unknown, token_ms)(rows)

    def curve(self, unknown: float = 0.0, token_ms: float | None = None) -> Callable[[int], float]:
        """:meth:`ms` as a function of the rows, with the estimates as they are now (one step's allocation asks
        it many times)."""
        if self.base is None:
            return lambda rows: unknown
        level, r0 = self.level, self.base
        slope = self.PRIOR * level / r0
        if token_ms is not None:
            slope = min(slope, self.ROW_TOKENS * token_ms)
        envelope: list[tuple[int, float]] = []  # the running minimum from the largest count down: never falling
        lowest = float("inf")
        for r, v in sorted(self._offset.items(), reverse=True):
            if self._seen.get(r, 0) < 2 and r > r0:  # seen once: halfway to the guess
                v = (v + slope * (r - r0)) / 2
            lowest = min(lowest, level + v)
            envelope.append((r, lowest))
        envelope.reverse()
        v0 = envelope[0][1]
        r1, v1 = envelope[-1]

        def ms(rows: int) -> float:
            if rows <= r0:
                return max(v0 - slope * (r0 - rows), v0 * self.PRIOR)
            if rows >= r1:
                return v1 + slope * (rows - r1)
            i = bisect.bisect_left(envelope, (rows, -1.0))
            (ra, va), (rb, vb) = envelope[i - 1], envelope[i]
            return va + (vb - va) * (rows - ra) / (rb - ra)

        return ms
