# SPDX-License-Identifier: AGPL-3.0-or-later
"""What a step of the batch engine costs, measured as it goes: a decode step and each prompt token on top
(:class:`StepCost`), and each row more in a decode pass (:class:`RowCost`, a verified draft)."""

from __future__ import annotations


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
    """What one more row costs a decode pass (a verified draft), measured: an exponentially weighted least-squares
    line through the decode-only steps' (rows, milliseconds). Until the rows have varied, a prior: ``PRIOR`` of a
    one-row step per extra row."""

    PRIOR = 0.3
    ALPHA = 0.05

    def __init__(self) -> None:
        self._n = self._x = self._y = self._xx = self._xy = 0.0
        self.single_ms: float | None = None  # a step of one row per sequence (exponential average)

    def observe(self, rows: int, sequences: int, ms: float) -> None:
        extra = rows - sequences
        if extra == 0:
            self.single_ms = ms if self.single_ms is None else self.single_ms + 0.3 * (ms - self.single_ms)
        keep = 1.0 - self.ALPHA
        self._n = self._n * keep + 1.0
        self._x = self._x * keep + extra
        self._y = self._y * keep + ms
        self._xx = self._xx * keep + extra * extra
        self._xy = self._xy * keep + extra * ms

    @property
    def row_ms(self) -> float:
        if self._n >= 4:
            mx, my = self._x / self._n, self._y / self._n
            var = self._xx / self._n - mx * mx
            if var > 0.2:
                slope = (self._xy / self._n - mx * my) / var
                return max(0.0, min(slope, self.single_ms or slope))
        return self.PRIOR * (self.single_ms or 0.0)
