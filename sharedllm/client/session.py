# SPDX-License-Identifier: AGPL-3.0-or-later
"""What a loaded model asks of the scheduler, and nothing more: its lease, each request's admission, its reports
and its end, and the machine table (to tell a lost machine from a slow one). ``MeshModel`` holds one of these, not
the ``Mesh``: the model knows the scheduler only through this narrow, public seam."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sharedllm.client.control import Control
from sharedllm.effects import Core
from sharedllm.errors import SchedulerUnreachable

logger = logging.getLogger("sharedllm.client")


class SessionChannel:
    """A loaded model's calls to the scheduler (through ``control``, see :mod:`sharedllm.client.control`)."""

    def __init__(self, control: Control):
        self.control = control

    @property
    def identity(self) -> str:
        """Who the scheduler knows this client as (its sessions, limits and bans are this identity's)."""
        return self.control.identity

    def reachable(self) -> bool:
        """Whether the scheduler can be asked now (not while the connection is down)."""
        return self.control.reachable()

    def scheduler_host(self) -> str:
        return self.control.scheduler_host()

    def acquire(self, *, estimate: dict, model: str, wait_timeout: float, placement: dict[str, Any],
                exclude: list[str] | None = None, replaces: str | None = None,
                estimate_client: dict | None = None, shared: bool = False) -> dict:
        """Lease a topology for a new session (``sharedllm_acquire``): its id, topology and relay tokens. Waits up
        to ``wait_timeout`` seconds in the scheduler's queue when the machines are busy."""
        from sharedllm.ggml import build_info

        return self.control.call(
            "acquire", estimate=estimate, estimate_client=estimate_client, model=model, client=self.identity,
            wait_timeout=wait_timeout, exclude=exclude or None, build=build_info(), replaces=replaces, **placement,
            **({"shared": True} if shared else {}), timeout=wait_timeout + self.control.timeout,  # it may queue us
        )

    def admitting(self, session_id: str) -> Core[dict | None]:
        """The scheduler's admission of a request (``RateLimited`` over the client's limits): its answer (which
        machines of the session drain), or None when the scheduler is away and the request goes ahead on the lease
        the session holds (the machines still serve it; a restarted scheduler counts it once it is back)."""
        if not self.reachable():
            logger.info("the scheduler is away: request admitted on this handle's lease %s", session_id)
            return None
        try:
            return (yield from self.control.asking("request", session_id=session_id))
        except SchedulerUnreachable as exc:
            logger.warning("request admitted on lease %s without the scheduler: %s", session_id, exc)
            return None

    def reporting(self, session_id: str, **counts: Any) -> Core[bool | None]:
        """A session's statistics (``sharedllm_session_report``; see ``Control.reporting``: never raises)."""
        return self.control.reporting("session_report", session_id=session_id, client=self.identity, **counts)

    def report(self, session_id: str, **counts: Any) -> bool | None:
        return self.control.report("session_report", session_id=session_id, client=self.identity, **counts)

    def report_soon(self, session_id: str, done: Callable[[bool | None], None], **counts: Any) -> None:
        """``reporting`` without waiting for it: ``done`` gets its outcome."""
        self.control.report_soon("session_report", done, session_id=session_id, client=self.identity, **counts)

    def usage_soon(self, session_id: str, tokens: int) -> None:
        """Charge this channel's user the tokens a request of theirs took on a shared session (not waited for)."""
        self.control.report_soon("usage", None, session_id=session_id, tokens=tokens)

    def close(self, session_id: str, reason: str, wait: bool = True) -> bool | None:
        """End a session; with ``wait``, once its machines' relays refuse its tokens."""
        return self.control.report("session_close", session_id=session_id, reason=reason, wait=wait)

    def machines(self, timeout: float | None = None) -> list[dict]:
        """The mesh's machines, as the scheduler reports them."""
        return self.control.call("state", timeout=timeout)["machines"]
