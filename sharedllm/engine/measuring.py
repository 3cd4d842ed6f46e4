# SPDX-License-Identifier: AGPL-3.0-or-later
"""The exact mode's measures of a loaded model (:mod:`.invariance`), taken while the engine is idle.

A first load of a model on some machines does not wait for them (40-odd passes over the mesh: 2 s of a 3.5 s load of
Gemma 3 270M on two machines here, 5 s behind a 20 ms link). The engine is ready at once and serves with what needs
no measure: decode steps of one sequence, prompts read in a solo request's passes, no drafts. Meanwhile, whenever it
has nothing to do, the batch scheduler takes the measures a unit at a time (one prompt of ``invariant_batch``, one
chunk size, one prompt of ``invariant_verify``: a few passes each). Work that arrives stops the unit at its next pass;
the units done are kept, the one stopped is taken again from its start at the next idle moment. Once all are done
the scheduler widens its steps to what was measured, and the engine keeps the measures for later loads
(:mod:`.measures`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sharedllm.engine.invariance import (
    BATCH_PROMPTS,
    VERIFY_PROMPTS,
    chunk_sizes,
    invariant_batch,
    invariant_chunks,
    invariant_verify,
)


class Interrupted(Exception):
    """Work arrived while a measure ran: the unit is dropped, to be taken again from its start."""


class Measuring:
    """The measures still to take on ``llm`` (``known``: those already had, from disk or an earlier engine):
    ``max_batch`` where ``batches``, ``batch_min_chunk`` where ``chunks_from`` (the least chunk size tried, raised
    above the measured ``max_batch``), ``verify_rows`` where ``verify_rows`` (the most rows a verification pass may
    hold: ``draft_max + 1``)."""

    def __init__(self, llm: Any, parallel: int, n_ctx_seq: int, known: dict, *, batches: bool, chunks_from: int,
                 verify_rows: int):
        self.llm, self.parallel, self.n_ctx_seq = llm, parallel, n_ctx_seq
        self.result = dict(known)
        self.wanted = {name for name, want in (("max_batch", batches), ("batch_min_chunk", chunks_from > 0),
                                               ("verify_rows", verify_rows > 0)) if want and name not in known}
        self._chunks_from = chunks_from
        self._lengths = list(BATCH_PROMPTS)  # invariant_batch's prompts still to measure
        self._batch = parallel  # its answer for the prompts measured so far
        self._sizes: list[int] | None = None  # the chunk sizes still to try, once max_batch is known
        self._prompts = list(VERIFY_PROMPTS)  # invariant_verify's prompts still to measure
        self._rows = verify_rows  # its answer for the prompts measured so far
        self.passes_run = 0  # passes of units done or stopped: what the measures cost

    @property
    def done(self) -> bool:
        return self.wanted <= set(self.result)

    def run(self, busy: Callable[[], bool]) -> bool:
        """Take the units still to take until all are done (True) or ``busy()`` says work waits (False)."""
        def check() -> None:
            if busy():
                raise Interrupted
            self.passes_run += 1

        while (unit := self._next()) is not None:
            try:
                unit(check)
            except Interrupted:
                return False
        return True

    def _next(self) -> Callable[[Callable[[], None]], None] | None:
        """The next unit to take, None when every measure is had."""
        r, llm = self.result, self.llm
        if "max_batch" in self.wanted - set(r):
            def batch_unit(check: Callable[[], None]) -> None:
                self._batch = invariant_batch(llm, self.parallel, (self._lengths[0],), self._batch, check)
                self._lengths.pop(0)
                if not self._lengths:
                    r["max_batch"] = self._batch
            return batch_unit
        if "batch_min_chunk" in self.wanted - set(r):
            if self._sizes is None:
                lo = max(self._chunks_from, r.get("max_batch", self.parallel) + 1)
                self._sizes = chunk_sizes(llm, lo, self.n_ctx_seq)
            if not self._sizes:
                r["batch_min_chunk"] = 0
                return self._next()

            def chunk_unit(check: Callable[[], None]) -> None:
                exact = invariant_chunks(llm, self._sizes[0], check)
                size = self._sizes.pop(0)
                if exact or not self._sizes:
                    r["batch_min_chunk"] = size if exact else 0
            return chunk_unit
        if "verify_rows" in self.wanted - set(r):
            if self._rows < 2 or not self._prompts:
                r["verify_rows"] = self._rows
                return self._next()

            def verify_unit(check: Callable[[], None]) -> None:
                self._rows = invariant_verify(llm, self._rows, self.n_ctx_seq, (self._prompts[0],), check)
                self._prompts.pop(0)
            return verify_unit
        return None
