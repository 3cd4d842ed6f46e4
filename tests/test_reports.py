# SPDX-License-Identifier: AGPL-3.0-or-later
"""A session's throughput reports (``sharedllm.client.Reports``): deltas that are never lost, totals that put a
restarted scheduler's counts right, and reports an earlier scheduler still takes."""

from __future__ import annotations

from sharedllm.client import Control, Reports


def test_reports_carry_the_sessions_totals():
    r = Reports()
    first = r.add(5, 0.5, 40.0, done=False)
    assert first["tokens"] == 5 and first["total_tokens"] == 5 and first["total_requests"] == 0
    r.sent(False, first)  # not delivered: its counts go with the next report, the totals stay what they are
    second = r.add(3, 0.3, None, done=True)
    assert second is None  # quiet after a failure
    r.quiet_until = 0.0
    third = r.add(0, 0.0, None, done=False)
    assert (third["tokens"], third["total_tokens"], third["total_requests"]) == (8, 8, 1)
    r.sent(True, third)
    r.new_session()  # a recovery's new session starts its own totals
    fourth = r.add(2, 0.1, None, done=True)
    assert (fourth["tokens"], fourth["total_tokens"], fourth["total_requests"]) == (2, 2, 1)


class _FakeControl(Control):
    """A control whose calls go to ``send`` (no scheduler), on a loop of its own thread."""

    def __init__(self, send):
        import asyncio
        import threading

        self.send, self._loop = send, asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    @property
    def loop(self):
        return self._loop

    @property
    def identity(self) -> str:
        return "fake"

    def reachable(self) -> bool:
        return True

    async def _send(self, op, timeout, kwargs):
        return self.send(op, **kwargs)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def test_a_scheduler_without_totals_still_gets_the_report():
    calls: list[dict] = []

    def send(op, **kwargs):
        calls.append(kwargs)
        if "total_tokens" in kwargs:  # what Dask raises in the client for a handler that lacks the argument
            raise TypeError("handle_session_report() got an unexpected keyword argument 'total_tokens'")
        return {"status": "OK"}

    control = _FakeControl(send)
    try:
        assert control.report("session_report", session_id="s", tokens=3, total_tokens=3, total_requests=0)
        assert calls == [{"session_id": "s", "tokens": 3, "total_tokens": 3, "total_requests": 0},
                         {"session_id": "s", "tokens": 3}]

        def broken(op, **kwargs):
            raise TypeError("something else")

        control.send = broken
        assert control.report("session_report", session_id="s", tokens=3, total_tokens=3) is False
    finally:
        control.close()
