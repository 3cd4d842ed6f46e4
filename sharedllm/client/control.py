# SPDX-License-Identifier: AGPL-3.0-or-later
"""The client's one seam to the scheduler: every call a ``Mesh`` or a loaded model makes goes through a
:class:`Control`.

A call is an :mod:`sharedllm.effects` core (``asking``), so the blocking API (``call``) and the asyncio one
(``acall``) are one implementation; it runs on the control's own event loop (a connection belongs to one loop) and
is awaited from any other. The mesh's expected refusals come back as answers and are raised here as the errors they
are (:mod:`sharedllm.errors`); an unreachable scheduler is ``SchedulerUnreachable`` with one line that says so.

:class:`DaskControl` calls the scheduler plugin's handlers through a ``distributed.Client`` (the operator's way in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from sharedllm import effects
from sharedllm.effects import Core
from sharedllm.errors import REFUSAL, MeshError, SchedulerUnreachable, from_refusal

logger = logging.getLogger("sharedllm.client")

REPORT_TIMEOUT = 5.0  # seconds a statistics report may take; a slower scheduler is left alone for a while
NEWER_REPORT_KEYS = ("total_tokens", "total_requests")  # report arguments a scheduler before them refuses


def on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[Any]]) -> effects.Wait:
    """Wait for the coroutine ``make()`` run on ``loop`` (the loop a connection belongs to), from any thread or
    event loop: the blocking side waits for it from another thread, the asyncio side awaits it directly when it runs
    on that loop, else through a future."""

    def block() -> Any:
        if _running_loop() is loop:
            raise RuntimeError("a blocking SharedLLM call was made from the event loop it needs; use the a* methods "
                               "(acreate_completion, ...) in asyncio code")
        return asyncio.run_coroutine_threadsafe(make(), loop).result()

    async def wait() -> Any:
        if asyncio.get_running_loop() is loop:
            return await make()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), loop))

    return effects.Wait(block, wait)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def older_scheduler(exc: Exception, kwargs: dict) -> bool:
    """A report refused by a scheduler of an earlier SharedLLM for an argument it does not know yet."""
    return (isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc)
            and any(k in kwargs for k in NEWER_REPORT_KEYS))


class Control:
    """Calls to the scheduler's SharedLLM operations (``state``, ``plan``, ``acquire``, ``request``,
    ``session_report``, ``session_close``, ``catalog``, ...). Subclasses say how a call travels (``_send``), where
    (``loop``, ``address``) and who this client is (``identity``)."""

    address: str = "?"
    timeout: float = 30.0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        raise NotImplementedError

    @property
    def identity(self) -> str:
        """Who the scheduler knows this client as."""
        raise NotImplementedError

    def reachable(self) -> bool:
        """Whether the connection to the scheduler is up now (not reconnecting after losing it, not closed)."""
        raise NotImplementedError

    def scheduler_host(self) -> str:
        """The scheduler's host as this client reaches it (where its relay hub is, unless it advertises another)."""
        from distributed.comm.addressing import get_address_host

        return get_address_host(self.address)

    async def _send(self, op: str, timeout: float, kwargs: dict) -> Any:
        """Send one operation on the control's loop and return the scheduler's raw answer."""
        raise NotImplementedError

    def _reconnecting(self) -> Core[None]:
        """Connect again when the connection was given up (a core); nothing by default."""
        return
        yield

    def asking(self, op: str, *, timeout: float | None = None, **kwargs: Any) -> Core[Any]:
        """The scheduler's answer to ``op`` (an :mod:`sharedllm.effects` core), its refusals raised as errors."""
        yield from self._reconnecting()
        wait = timeout or self.timeout
        try:
            answer = yield on_loop(self.loop, lambda: self._send(op, wait, kwargs))
        except Exception as exc:
            self._failed(op, exc)
        return self._answered(op, answer)

    def call(self, op: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        """``asking``, blocking the calling thread."""
        return effects.run(self.asking(op, timeout=timeout, **kwargs))

    async def acall(self, op: str, *, timeout: float | None = None, **kwargs: Any) -> Any:
        """``asking``, awaited from any event loop."""
        return await effects.arun(self.asking(op, timeout=timeout, **kwargs))

    def reporting(self, op: str, **kwargs: Any) -> Core[bool | None]:
        """Tell the scheduler something it only records (statistics, a session's end): True when it got it, False
        when it failed or was slow, None when not tried because the connection is down (the scheduler away, this
        client reconnecting). Never raises, never waits longer than ``REPORT_TIMEOUT``."""
        if not self.reachable():
            return None
        try:
            yield from self.asking(op, timeout=REPORT_TIMEOUT, **kwargs)
        except Exception as exc:
            if older_scheduler(exc, kwargs):
                return (yield from self.reporting(op, **{k: v for k, v in kwargs.items()
                                                          if k not in NEWER_REPORT_KEYS}))
            logger.debug("could not report %s: %s", op, exc)
            return False
        return True

    def report(self, op: str, **kwargs: Any) -> bool | None:
        """``reporting``, blocking the calling thread."""
        return effects.run(self.reporting(op, **kwargs))

    def report_soon(self, op: str, done: Callable[[bool | None], None] | None = None, **kwargs: Any) -> None:
        """``reporting`` without waiting for it (a stream closed early cannot wait): ``done`` gets its outcome."""

        async def send() -> None:
            ok = await effects.arun(self.reporting(op, **kwargs))
            if done is not None:
                done(ok)

        try:
            asyncio.run_coroutine_threadsafe(send(), self.loop)
        except RuntimeError:  # the loop is closed: the report is lost, as one to a scheduler that is away
            if done is not None:
                done(None)

    def _failed(self, op: str, exc: Exception) -> NoReturn:
        """Raise for a failed call (from its ``except``): the mesh's own errors as they are, a one-line error for an
        unreachable scheduler or one without SharedLLM, anything else as it is."""
        from distributed.comm.core import CommClosedError

        if isinstance(exc, MeshError):
            raise exc
        if not self.reachable():
            raise SchedulerUnreachable(
                f"the connection to the scheduler at {self.address} is lost and cannot carry {op}; check that the "
                "scheduler runs, then connect again"
            ) from exc
        if isinstance(exc, (OSError, CommClosedError, TimeoutError, asyncio.TimeoutError)):
            raise SchedulerUnreachable(
                f"the scheduler at {self.address} did not answer {op} ({type(exc).__name__}: {exc}); check that it "
                "is running"
            ) from exc
        if isinstance(exc, ValueError) and ("unknown operation" in str(exc).lower() or op in str(exc)):
            raise self._not_sharedllm() from exc
        raise exc

    def _answered(self, op: str, answer: Any) -> Any:
        if answer is None:  # a scheduler without the operation logs "No handler ... found" and answers nothing
            raise self._not_sharedllm()
        if isinstance(answer, dict) and REFUSAL in answer:  # an expected refusal, sent as an answer: raise it here
            raise from_refusal(answer[REFUSAL])
        return answer

    def _not_sharedllm(self) -> SchedulerUnreachable:
        return SchedulerUnreachable(
            f"the Dask scheduler at {self.address} does not run SharedLLM; start it with "
            "`dask scheduler --preload sharedllm.scheduler`"
        )

    def close(self) -> None:
        """Close the connection if this control opened it."""


class DaskControl(Control):
    """The scheduler's SharedLLM handlers (``sharedllm_<op>``) called through a synchronous ``distributed.Client``.

    A Dask client stops reconnecting after its connect timeout and then stays closed: a scheduler that takes longer
    to restart would leave the mesh without one, so a closed client is replaced by a new one to the same address."""

    def __init__(self, client, *, timeout: float = 30.0, owns_client: bool = False):
        if getattr(client, "asynchronous", False):
            raise ValueError("Mesh needs a synchronous distributed.Client (created without asynchronous=True)")
        self.client = client
        self.timeout = timeout
        self.owns_client = owns_client
        self._address = getattr(client.scheduler, "address", None) or getattr(client, "scheduler_file", None)
        self._security = getattr(client, "security", None)

    @property
    def address(self) -> str:
        return getattr(self.client.scheduler, "address", None) or self._address or "?"

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.client.loop.asyncio_loop

    @property
    def identity(self) -> str:
        return getattr(self.client, "id", "")

    def reachable(self) -> bool:
        return self.client.status == "running" and self.client.scheduler is not None

    async def _send(self, op: str, timeout: float, kwargs: dict) -> Any:
        return await asyncio.wait_for(getattr(self.client.scheduler, f"sharedllm_{op}")(**kwargs), timeout)

    def _reconnecting(self) -> Core[None]:
        if self.client.status == "closed":
            yield effects.in_thread(self.revive)

    def revive(self) -> None:
        """Connect a new Dask client to the same scheduler when this one gave up on it (closed)."""
        if self.client.status != "closed" or not self._address:
            return
        from distributed import Client

        try:
            self.client = Client(self._address, timeout=self.timeout, security=self._security, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SchedulerUnreachable(
                f"cannot reach the Dask scheduler at {self._address} ({type(exc).__name__}); check that it is running"
            ) from exc
        self.owns_client = True
        logger.info("connected to the scheduler at %s again (client %s)", self._address, self.client.id)

    def _failed(self, op: str, exc: Exception) -> NoReturn:
        if self.client.scheduler is None or self.client.status in ("closing", "closed"):
            # The Dask client lost its scheduler (killed, restarting): it has no connection left to call through.
            raise SchedulerUnreachable(
                f"the Dask client has lost its scheduler (status {self.client.status}) and cannot call {op}; "
                "check that the scheduler runs, then connect again"
            ) from exc
        super()._failed(op, exc)

    def close(self) -> None:
        if self.owns_client:
            self.client.close()


def admin_security(key: str, security=None):
    """A ``distributed.security.Security`` for an operator's Dask client on a locked-down mesh: ``security``'s TLS
    settings (if any), and every connection proving the admin ``key`` in its handshake."""
    from distributed.security import Security

    from sharedllm.security import HandshakeCredential, parse_user_key

    parse_user_key(key)  # a malformed key: said now, not at the scheduler's refusal
    base = security or Security()

    class AdminSecurity(type(base)):
        def __init__(self) -> None:  # a copy of ``base`` (Security keeps its settings in slots)
            for cls in type(base).__mro__:
                for name in getattr(cls, "__slots__", ()):
                    if hasattr(base, name):
                        object.__setattr__(self, name, getattr(base, name))

        def get_connection_args(self, role):
            args = super().get_connection_args(role)
            args["handshake_overrides"] = HandshakeCredential(key=key)
            return args

    assert issubclass(AdminSecurity, Security)
    return AdminSecurity()
