# SPDX-License-Identifier: AGPL-3.0-or-later
"""A session's statistics reports to the scheduler: deltas never lost, totals that put a lost delta right."""

from __future__ import annotations

import threading
import time


class Reports:
    """A session's throughput reports. What could not be sent (the scheduler away, restarting, slow) is added to the
    next report, so the scheduler's counts stay whole; after a report that failed or timed out none is tried for
    ``QUIET`` seconds, so a generation never waits on a scheduler that does not answer. Each report also carries the
    session's totals so far (``total_tokens``, ``total_requests``): a scheduler killed after it took a report but
    before it saved it comes back with older counts, and the next report puts them right."""

    QUIET = 30.0

    def __init__(self):
        self.tokens, self.seconds, self.requests, self.ttft_ms = 0, 0.0, 0, None
        self.total_tokens = self.total_requests = 0  # of the current session (``new_session``)
        self.quiet_until = 0.0
        self._lock = threading.Lock()  # the requests of one handle report from many threads
        self._taken_at = time.monotonic()

    def add(self, tokens: int, seconds: float, ttft_ms: float | None, done: bool) -> dict | None:
        """Count a report; the counts to send now (taken out: give them back with ``sent``), or None (nothing new,
        or in a quiet period)."""
        with self._lock:
            self.tokens += tokens
            self.seconds += seconds
            self.requests += int(done)
            self.total_tokens += tokens
            self.total_requests += int(done)
            self.ttft_ms = ttft_ms if ttft_ms is not None else self.ttft_ms
            if time.monotonic() < self.quiet_until or not (self.tokens or self.requests or self.ttft_ms is not None):
                return None
            # Concurrent requests each count their own seconds: the report's are wall time at most, so that the
            # scheduler's tokens/s is the aggregate throughput of the batch.
            now = time.monotonic()
            seconds = min(self.seconds, max(now - self._taken_at, 0.0)) or self.seconds
            self._taken_at = now
            report = {"tokens": self.tokens, "seconds": seconds, "requests": self.requests, "ttft_ms": self.ttft_ms,
                      "total_tokens": self.total_tokens, "total_requests": self.total_requests}
            self.tokens, self.seconds, self.requests, self.ttft_ms = 0, 0.0, 0, None
            return report

    def new_session(self) -> None:
        """The handle has a new session (a load, a recovery): its totals start at zero."""
        with self._lock:
            self.total_tokens = self.total_requests = 0

    def sent(self, ok: bool | None, report: dict) -> None:
        """The outcome of sending ``report`` (see ``Mesh._report``: None, not tried): unless it went, its counts go
        with the next one."""
        if ok:
            return
        with self._lock:
            self.tokens += report["tokens"]
            self.seconds += report["seconds"]
            self.requests += report["requests"]
            self.ttft_ms = self.ttft_ms if self.ttft_ms is not None else report["ttft_ms"]
            if ok is False:
                self.quiet_until = time.monotonic() + self.QUIET
