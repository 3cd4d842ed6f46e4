# SPDX-License-Identifier: AGPL-3.0-or-later
"""A session's throughput reports (``sharedllm.client.Reports``): deltas that are never lost, totals that put a
restarted scheduler's counts right, and reports an earlier scheduler still takes."""

from __future__ import annotations

import types

from sharedllm.client import Mesh, Reports


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


def test_a_scheduler_without_totals_still_gets_the_report():
    calls: list[dict] = []

    def call(handler, timeout, **kwargs):
        calls.append(kwargs)
        if "total_tokens" in kwargs:  # what Dask raises in the client for a handler that lacks the argument
            raise TypeError("handle_session_report() got an unexpected keyword argument 'total_tokens'")

    mesh = Mesh.__new__(Mesh)
    mesh.client = types.SimpleNamespace(status="running", scheduler=object())
    mesh._call = call
    assert mesh._report("sharedllm_session_report", session_id="s", tokens=3, total_tokens=3, total_requests=0)
    assert calls == [{"session_id": "s", "tokens": 3, "total_tokens": 3, "total_requests": 0},
                     {"session_id": "s", "tokens": 3}]

    def broken(handler, timeout, **kwargs):
        raise TypeError("something else")

    mesh._call = broken
    assert mesh._report("sharedllm_session_report", session_id="s", tokens=3, total_tokens=3) is False
