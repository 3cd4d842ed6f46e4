# SPDX-License-Identifier: AGPL-3.0-or-later
"""How a ``MeshModel`` survives the loss of a machine: what was lost (the engine's failure, the machines' heartbeats,
or the model itself when it made an rpc-server abort), one reload for every request it broke, and the move off
machines that drain."""

from __future__ import annotations

import logging
import time

from sharedllm import effects
from sharedllm.effects import Core
from sharedllm.engine import Engine
from sharedllm.errors import (
    EngineError,
    InvalidModel,
    MeshBusy,
    MeshError,
    ModelClosed,
    ModelTooLarge,
    NoMachines,
)

logger = logging.getLogger("sharedllm.client.model")


class Recovery:
    """Part of ``MeshModel``: losses, recoveries and moves."""

    def _recover(self, exc: EngineError, attempt: int) -> None:
        """Replace a failed engine: lease a topology without the lost machine and load the model there.

        Not when the model itself made an rpc-server abort (see :func:`sharedllm.machine.state.model_fault`): it would
        abort the next machines too. That is ``InvalidModel``, and no machine is blamed for it."""
        t0, started = time.perf_counter(), time.monotonic()
        if (err := self._invalid_model(exc)) is not None:
            raise err from exc
        lost = getattr(exc, "machine", None) or self._find_lost()
        self._release(f"failed: {exc}")
        if lost:
            self._lost_at[lost] = time.monotonic()
        if attempt or not lost:  # backoff: the mesh may still be noticing the loss (a machine known lost is excluded)
            time.sleep(min(0.25 * 2**attempt, 4.0))
        logger.warning("recovering %s after: %s (attempt %d of %d)", self.path.name, exc, attempt + 1,
                       self.max_recoveries)
        try:
            self._open()
        except (ModelTooLarge, NoMachines, MeshBusy) as err:
            self._failed = type(err)(f"lost machine {lost or '?'} ({exc}); the remaining mesh cannot take over: {err}")
            raise self._failed from err
        except BaseException as err:  # the handle has no engine now: later requests say so instead of crashing
            self._failed = err
            raise
        self.recoveries.append({"lost": lost, "reason": str(exc), "seconds": time.perf_counter() - t0,
                                "started": started, "machines": self.topology.machines})
        self._channel.report(self.session_id, tokens=0, seconds=0.0, recovered=True, lost=lost)

    def _invalid_model(self, exc: BaseException) -> InvalidModel | None:
        """``InvalidModel`` when the engine was lost (``exc``) because the model made an rpc-server of this session
        abort (:meth:`_model_fault`); the handle has failed then, its session ended saying so. None otherwise."""
        # A machine the watchdog found stopped or cut off did not crash: there is no exit to diagnose.
        if not isinstance(exc, EngineError) or isinstance(exc, ModelClosed) or getattr(exc, "alive", False):
            return None
        fault = self._model_fault(getattr(exc, "machine", None))
        if fault is None:
            return None
        machine, assertion = fault
        err = InvalidModel(
            f"{self.path}: this model made machine {machine}'s rpc-server abort ({assertion}); it was not loaded "
            "elsewhere and no machine is blamed: the file is damaged or malformed, get it again from its source",
            str(self.path))
        self._failed = err
        self._release(f"failed: invalid model: {assertion}")
        return err

    def _recover_shared(self, exc: EngineError, attempt: int, generation: int) -> None:
        """``_recover`` once for every request of the lost engine: the first request to get here reloads; the
        others, broken by the same loss, find a newer engine and replay on it (or the handle failed: they say so)."""
        with self._recovery_lock:
            if self._generation == generation:
                try:
                    self._recover(exc, attempt)
                finally:
                    self._generation += 1
                return
        self._check_usable()

    def _current(self) -> tuple[Engine, int]:
        """The engine to run a request on and its generation; waits for a recovery in progress."""
        with self._recovery_lock:
            engine, generation = self._engine, self._generation
        if engine is None:
            self._check_usable()
            raise ModelClosed("the model was closed; load it again")
        return engine, generation

    def _currently(self) -> Core[tuple[Engine, int]]:
        """``_current`` as a core: without a recovery in progress, at once; during one, an asyncio caller waits for
        it in a thread."""
        if self._recovery_lock.acquire(blocking=False):
            self._recovery_lock.release()
            if self._engine is not None:
                return self._engine, self._generation
        return (yield effects.in_thread(self._current))

    def _model_fault(self, suspect: str | None = None, settle: float = 1.5) -> tuple[str, str] | None:
        """(machine, assertion) when an rpc-server of this session aborted on a ggml assertion, else None.

        Machines report their server's exit with their heartbeats: while the machine the engine blamed (``suspect``;
        None: any) still reports our server as running, wait up to ``settle`` seconds for news. A machine gone from
        the table is no model's fault."""
        from sharedllm.machine.state import model_fault

        deadline = time.monotonic() + settle
        while self._channel.reachable():  # the scheduler away: nothing to learn (and no recovery without it either)
            try:
                now = {m["machine_id"]: m.get("rpc") or {} for m in self._channel.machines()}
            except MeshError:
                return None
            unsettled = False
            for mid, pid in self._servers_seen.items():
                rpc = now.get(mid) or {}
                last = rpc.get("last_exit") or {}
                if pid is not None and last.get("pid") == pid:
                    if (assertion := model_fault(last)) is not None:
                        return mid, assertion
                elif rpc.get("pid") == pid and rpc.get("state") == "ready" and suspect in (None, mid):
                    unsettled = True
            if not unsettled or time.monotonic() > deadline:
                return None
            time.sleep(0.1)
        return None

    def _suspect(self) -> tuple[str, str] | None:
        """The engine's watchdog, asked while a request waits on the mesh for seconds: (machine, why) when a machine
        of this session is known to be gone or stuck, from the machines' heartbeats; None when nothing is known (a
        slow machine is not suspect, nor is one while the scheduler is away)."""
        if not self._channel.reachable():
            return None
        try:
            now = {m["machine_id"]: m for m in self._channel.machines(timeout=2.0)}
        except Exception as exc:
            logger.debug("watchdog: no machine table (%s)", exc)
            return None
        for mid, pid in self._servers_seen.items():
            m = now.get(mid)
            if m is None:  # its worker restarting (a machine that is really gone breaks the engine's connection)
                continue
            rpc = m.get("rpc") or {}
            # Not a mere "starting": a new worker of the machine may be adopting the server.
            exited = (rpc.get("last_exit") or {}).get("pid") == pid
            if exited or (rpc.get("state") == "ready" and rpc.get("pid") != pid):
                return mid, "lost its rpc-server (it exited)"
            if rpc.get("stopped"):
                return mid, f"has its {' and '.join(rpc['stopped'])} stopped (SIGSTOP or a debugger)"
            if m.get("heartbeat_age", 0) > m.get("heartbeat_limit", float("inf")):
                return mid, f"sent no heartbeat for {m['heartbeat_age']:.0f}s (frozen, or cut off from the mesh)"
        return None

    def _excluded(self) -> list[str]:
        """The machines a new lease leaves out: those this handle lost in the last ``EXCLUDE_FOR`` seconds. Not for
        ever: a machine that comes back (its supervisor restarted it, or its owner did) is good again, and a handle
        that excluded every machine it ever lost would, after a few losses, have nowhere left to go."""
        now = time.monotonic()
        return [m for m, t in self._lost_at.items() if now - t < self.EXCLUDE_FOR]

    def _find_lost(self) -> str | None:
        """The machine of our topology that is gone, not ready, or whose rpc-server restarted since we leased it
        (its supervisor can bring it back before the engine's failure is probed)."""
        try:
            now = {m["machine_id"]: m.get("rpc") or {} for m in self._channel.machines()}
        except MeshError:
            return None
        for mid, pid in self._servers_seen.items():
            rpc = now.get(mid)
            if rpc is None or rpc.get("state") != "ready" or rpc.get("pid") != pid:
                return mid
        return None

    def _move_off(self, draining: list[str]) -> None:
        """Some machines of this session drain (their operator takes them out, to upgrade them): between two
        requests, lease a topology without them, taking this session's other machines over, and load the model
        there; nothing is replayed, nothing fails. When the rest of the mesh cannot take the model now, stay (and
        ask again in ``MOVE_RETRY`` seconds): the drain waits for this session."""
        if time.monotonic() < self._move_retry_at:
            return
        if self._engine is not None and self._engine.in_flight:
            # Other requests run on this engine: moving now would cut them. The next request between them moves.
            logger.info("%s: machine(s) %s drain; moving once no request runs", self.path.name, ", ".join(draining))
            return
        with self._recovery_lock:
            self._move_off_now(draining)
            self._generation += 1

    def _move_off_now(self, draining: list[str]) -> None:
        old = self._engine, self.session_id, self.topology, self._servers_seen, self._lease_relays
        self._engine = None
        try:
            self._open(replaces=self.session_id, wait_timeout=0)
        except (MeshBusy, NoMachines, ModelTooLarge) as exc:  # the old session holds on
            self._engine, self.session_id, self.topology, self._servers_seen, self._lease_relays = old
            self._move_retry_at = time.monotonic() + self.MOVE_RETRY
            logger.warning("cannot move %s off draining machine(s) %s now: %s", self.path.name, ", ".join(draining),
                           exc)
            return
        except BaseException as exc:
            old[0].close()  # the scheduler ended the old session for the new one, which failed to load
            self._failed = exc
            raise
        old[0].close()
        logger.info("moved %s off draining machine(s) %s: now on %s", self.path.name, ", ".join(draining),
                    ", ".join(self.topology.machines))

    def _give_up_unless_recoverable(self, exc: EngineError | InvalidModel, attempt: int) -> None:
        """After a failed attempt of a non-streamed request: raise ``exc`` (the handle has failed) unless a recovery
        can replay the request (a model that made llama.cpp abort cannot be replayed anywhere)."""
        if isinstance(exc, InvalidModel) or not self._recoverable(exc, attempt):
            self._failed = exc
            raise exc

    def _recoverable(self, exc: EngineError, attempt: int) -> bool:
        # A diverged replay would diverge again, and a closed handle stays closed: the request is over.
        return (attempt < self.max_recoveries and not self._closed and not isinstance(exc, ModelClosed)
                and "diverged" not in str(exc))
