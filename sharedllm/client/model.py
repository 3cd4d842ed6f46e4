# SPDX-License-Identifier: AGPL-3.0-or-later
"""``MeshModel``: one loaded model, its engine, its recoveries, and the delivery of its streams."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sharedllm import gguf, tool_calls
from sharedllm.client.reports import _Reports
from sharedllm.engine import Engine, EngineSpec, EngineStage, LoadProgress, _to_the_end
from sharedllm.errors import (
    EngineError,
    InvalidModel,
    MeshBusy,
    MeshError,
    ModelClosed,
    ModelTooLarge,
    NoMachines,
    SchedulerUnreachable,
    WorkerLost,
    gib,
)
from sharedllm.placement import Topology

if TYPE_CHECKING:
    from sharedllm.client.mesh import Mesh

logger = logging.getLogger(__name__)


def _engine_stages(topo: Topology, relays: dict[str, dict], scheduler_host: str = "") -> list[EngineStage]:
    """The topology's stages for the engine, each with its machine's relay token (None: direct RPC) and, for a
    machine registered at the relay hub, the hub's address (``scheduler_host`` when the hub does not advertise one)
    and this lease's hub token."""
    from sharedllm.relay import join_endpoint, warn_insecure_direct

    stages = []
    for st in topo.stages:
        info = relays.get(st.machine_id)
        if info is None and st.device_index == 0:
            warn_insecure_direct(f"machine {st.machine_id} ({st.endpoint})")
        relay = {"token": info["token"], "fingerprint": info["fingerprint"]} if info else None
        if info and info.get("hub"):
            hub = info["hub"]
            relay["hub"] = {"endpoint": join_endpoint(hub.get("host") or scheduler_host, hub["port"]),
                            "token": hub["token"], "machine": hub["machine"]}
            relay["via_hub"] = bool(info.get("via_hub"))
        stages.append(EngineStage(st.endpoint, st.device_index, st.machine_id, cpu=st.device_name == "CPU",
                                  relay=relay))
    return stages


def _check_reachable(stages: list[EngineStage]) -> None:
    # llama.cpp aborts on a failed connect; find out here, with a clear message, before the engine starts. Through a
    # relay, this also proves the token and the relay's certificate.
    from sharedllm.engine import first_failing_stage

    failed = first_failing_stage(stages, timeout=5.0)
    if failed is None:
        return
    st, how, exc = failed
    why = {
        "timeout": "accepted a connection but did not answer in 5s (busy with another session, or hung); retry later",
        "token": f"refused this session's token at the machine's relay ({exc}); load the model again",
        "unreachable": f"is unreachable from this client ({exc}); check the network path",
    }[how]
    raise WorkerLost(f"machine {st.machine_id}'s rpc-server at {st.endpoint} {why}, or leave the machine out "
                     "with machines=[...]", machine=st.machine_id, endpoint=st.endpoint)


def _log_progress(name: str) -> Callable[[LoadProgress], None]:
    last = [-1]

    def report(progress: LoadProgress) -> None:
        step = int(progress * 10)
        if step > last[0]:
            last[0] = step
            if progress.total_bytes:
                logger.info("loading %s: %d%% (%s of %s)", name, step * 10, gib(progress.done_bytes),
                            gib(progress.total_bytes))
            else:
                logger.info("loading %s: %d%%", name, step * 10)

    return report


class MeshModel:
    """A model loaded across the mesh. Mirrors ``llama_cpp.Llama``'s completion API; use as a context manager.

    The handle owns a lease on its machines and an engine process. If a machine dies during a request, the handle
    leases a new topology without it, starts a new engine and replays the request: greedy (or seeded) decoding
    regenerates exactly the tokens already delivered, which are checked and skipped, and the stream goes on.
    """

    REPORT_EVERY = 2.0  # seconds between throughput reports to the scheduler during a long stream
    MOVE_RETRY = 30.0  # seconds before a session that could not move off draining machines tries again
    EXCLUDE_FOR = 60.0  # seconds a machine this handle lost is left out of its new leases

    def __init__(
        self,
        mesh: Mesh,
        path: Path,
        estimate: gguf.ModelEstimate,
        *,
        plan_kwargs: dict,
        llama_kwargs: dict,
        wait_timeout: float,
        load_timeout: float,
        token_timeout: float,
        max_recoveries: int,
        on_progress: Callable[[LoadProgress], None] | None = None,
        parallel: int = 1,
        max_waiting: int = 64,
        engine_options: dict | None = None,
    ):
        self._mesh = mesh
        self._engine_options = engine_options or {}  # more EngineSpec fields
        self.parallel = parallel
        self.max_waiting = max_waiting
        self.path = path
        self.estimate = estimate
        self._plan_kwargs = plan_kwargs
        self._llama_kwargs = llama_kwargs
        self._wait_timeout = wait_timeout
        self._load_timeout = load_timeout
        self._token_timeout = token_timeout
        self.max_recoveries = max_recoveries
        self._on_progress = on_progress
        self._engine: Engine | None = None
        self._lost_at: dict[str, float] = {}  # machine -> when this handle lost it (see _excluded)
        self.topology: Topology | None = None
        self.session_id: str | None = None
        self.plan_ms = 0.0
        self.load_seconds = 0.0
        self.metadata: dict = {}
        # One record per recovery: lost machine, reason, when it began (time.monotonic()), seconds to reload.
        self.recoveries: list[dict] = []
        self._failed: Exception | None = None
        self._closed = False
        self._lease_relays: dict[str, dict] = {}
        self._reports = _Reports()
        self._move_retry_at = 0.0
        self._servers_seen: dict[str, int | None] = {}
        # What an engine of this handle measured of its machines' kernels (sharedllm.engine.invariance), and on which
        # machines: a recovery onto some of them takes it instead of measuring again before its replay.
        self._measured: tuple[frozenset[str], dict] | None = None
        # One recovery for all the requests a lost machine broke: the first to get there reloads, the others find
        # the engine replaced (a new ``_generation``) and replay on it.
        self._recovery_lock = threading.Lock()
        self._generation = 0

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def _open(self, replaces: str | None = None, wait_timeout: float | None = None) -> None:
        """Lease a topology (excluding machines lost earlier), check every server answers, start the engine.

        ``replaces``: this handle's session, which the new one takes over (see ``_move_off``)."""
        from sharedllm.ggml import build_info

        t0 = time.perf_counter()
        name = os.path.basename(str(self.path))
        wait_timeout = self._wait_timeout if wait_timeout is None else wait_timeout
        d = self._mesh._call(
            "sharedllm_acquire",
            estimate=self.estimate.to_dict(), model=name, client=getattr(self._mesh.client, "id", ""),
            wait_timeout=wait_timeout, exclude=self._excluded() or None, build=build_info(), replaces=replaces,
            **self._plan_kwargs, timeout=wait_timeout + self._mesh.timeout,  # the scheduler may queue us
        )
        self.plan_ms = (time.perf_counter() - t0) * 1000
        self.session_id = d["session_id"]
        self._reports.new_session()
        topo = self.topology = Topology.from_dict(d["topology"])
        # Which rpc-server process each machine ran when we leased it: a later restart betrays a lost machine.
        self._servers_seen = {m["machine_id"]: (m.get("rpc") or {}).get("pid") for m in self._mesh.machines()
                              if m["machine_id"] in topo.machines}
        logger.info("topology for %s (planned in %.0f ms):\n%s", name, self.plan_ms, topo)
        try:
            # llama.cpp reaches each machine through its relay (TLS + this lease's token), tunnelled from the engine;
            # machines that serve RPC directly (--insecure-direct-rpc) are connected as they are.
            self._lease_relays = d.get("relays") or {}  # machine -> relay endpoint, fingerprint, this lease's token
            stages = _engine_stages(topo, self._lease_relays, self._mesh.scheduler_host())
            _check_reachable(stages)
            spec = EngineSpec(
                model_path=str(self.path),
                stages=stages,
                tensor_split=topo.tensor_split,
                llama_kwargs=self._llama_kwargs,
                output_on_client=self.estimate.output_on_client,
                parallel=self.parallel,
                max_waiting=self.max_waiting,
                invariance=self._measured[1] if self._measured and set(topo.machines) <= self._measured[0] else None,
                **self._engine_options,
            )
            self._engine = Engine(spec, load_timeout=self._load_timeout, token_timeout=self._token_timeout,
                                  on_progress=self._on_progress or _log_progress(name), watchdog=self._suspect)
            info = self._engine.start()
        except BaseException as exc:
            # The engine decodes at load (its measures of the kernels): a model that makes llama.cpp abort may
            # already have done it.
            if (err := self._invalid_model(exc)) is not None:
                raise err from exc
            self._release(f"failed to load: {exc}")
            raise
        if self._closed:  # closed by another thread while this (re)load ran: the lease goes back at once
            self._release("closed")
            raise ModelClosed("the model was closed while it was being loaded; load it again")
        self.metadata = info.get("metadata", {})
        if spec.invariance is None and info.get("invariance"):
            self._measured = (frozenset(topo.machines), info["invariance"])
        self.load_seconds = time.perf_counter() - t0
        logger.info("loaded %s on %d machine(s) in %.1fs", name, len(topo.machines), self.load_seconds)

    def _release(self, reason: str) -> None:
        if self._engine is not None:
            # After a failure, the other requests of the engine take its failure and recover on the next one.
            self._engine.close(replaced=reason.startswith("failed") and not self._closed)
            self._engine = None
        if self.session_id:
            self._reports.quiet_until = 0.0  # the session's last counts go with its end
            self._stats(0, 0.0, None, done=False)
            # After a failure, do not wait for the lost machine's relay to drop the lease: a recovery is waiting.
            self._mesh._report("sharedllm_session_close", session_id=self.session_id, reason=reason,
                               wait=not reason.startswith("failed"))
            self.session_id = None

    def _recover(self, exc: EngineError, attempt: int) -> None:
        """Replace a failed engine: lease a topology without the lost machine and load the model there.

        Not when the model itself made an rpc-server abort (see :func:`sharedllm.actor.model_fault`): it would
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
        self._mesh._report("sharedllm_session_report", session_id=self.session_id, tokens=0, seconds=0.0,
                           recovered=True, lost=lost)

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

    async def _acurrent(self) -> tuple[Engine, int]:
        """``_current`` for asyncio: a recovery in progress is waited for in a thread."""
        if self._recovery_lock.acquire(blocking=False):
            self._recovery_lock.release()
            if self._engine is not None:
                return self._engine, self._generation
        return await asyncio.to_thread(self._current)

    def _model_fault(self, suspect: str | None = None, settle: float = 1.5) -> tuple[str, str] | None:
        """(machine, assertion) when an rpc-server of this session aborted on a ggml assertion, else None.

        Machines report their server's exit with their heartbeats: while the machine the engine blamed (``suspect``;
        None: any) still reports our server as running, wait up to ``settle`` seconds for news. A machine gone from
        the table is no model's fault."""
        from sharedllm.actor import model_fault

        deadline = time.monotonic() + settle
        while self._mesh._reachable():  # the scheduler away: nothing to learn (and no recovery without it either)
            try:
                now = {m["machine_id"]: m.get("rpc") or {} for m in self._mesh.machines()}
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
        if not self._mesh._reachable():
            return None
        try:
            now = {m["machine_id"]: m for m in self._mesh._call("sharedllm_state", timeout=2.0)["machines"]}
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
            now = {m["machine_id"]: m.get("rpc") or {} for m in self._mesh.machines()}
        except MeshError:
            return None
        for mid, pid in self._servers_seen.items():
            rpc = now.get(mid)
            if rpc is None or rpc.get("state") != "ready" or rpc.get("pid") != pid:
                return mid
        return None

    def close(self) -> None:
        """Stop the engine and give the lease back; the rpc-servers are free for the next session."""
        if not self._closed:
            self._closed = True
            self._release(f"failed: {self._failed}" if self._failed else "closed")

    def __enter__(self) -> MeshModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Only stop the child: no scheduler call from a finalizer (it may run at interpreter shutdown).
        engine = getattr(self, "_engine", None)
        if engine is not None:
            try:
                engine.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        where = f"on {len(self.topology.stages)} device(s)" if self.topology else "(not loaded)"
        return f"<MeshModel {self.path.name} {where}>"

    # --- requests ----------------------------------------------------------------------------------------------

    def n_ctx(self) -> int:
        """Each sequence's context, in tokens."""
        return self._engine.info["n_ctx"]

    def n_vocab(self) -> int:
        return self._engine.info["n_vocab"]

    @property
    def max_batch(self) -> int:
        """Sequences per decode pass (see ``exact_batches``); 1 when requests run one at a time."""
        return self._engine.info.get("max_batch", 1)

    @property
    def failure(self) -> BaseException | None:
        """Why this handle cannot serve any more (closed, or failed for good), else None."""
        if self._failed is not None:
            return self._failed
        return ModelClosed("the model was closed; load it again") if self._closed else None

    @property
    def engine_stats(self) -> dict:
        """The engine's last report as it sent it: ``prompt_tokens`` and ``cached_tokens`` (the prompt tokens of the
        requests since it was loaded, and those found in its prompt cache), and when it batches ``running``,
        ``waiting``, ``steps``, ``passes``... Unlike :attr:`load_stats`, which caps ``running`` by the calls in
        flight, it says 0 running only once the engine reported its last step."""
        engine = self._engine
        return dict(engine.poll_stats()) if engine is not None else {}

    @property
    def load_stats(self) -> dict:
        """The engine's batch: sequences ``running`` and ``waiting`` (requests in flight when it runs one at a
        time), the mean ``batch`` size (sequences) and ``passes_per_step`` (llama_decode passes) of its last decode
        steps, its ``parallel``, and (batched) the ``steps`` and ``passes`` since it started."""
        engine = self._engine
        if engine is None:
            return {"running": 0, "waiting": 0, "batch": 0.0, "parallel": self.parallel}
        if self.parallel == 1:
            n = engine.in_flight
            return {**self.engine_stats, "running": min(n, 1), "waiting": max(n - 1, 0), "batch": float(min(n, 1)),
                    "parallel": 1}
        stats = self.engine_stats
        # The scheduler's last report may be a step behind the requests this handle sees in flight.
        stats["running"] = min(stats.get("running", 0), engine.in_flight)
        stats["waiting"] = max(stats.get("waiting", 0), engine.in_flight - stats["running"])
        return {"batch": 0.0, "parallel": self.parallel, **stats}

    @property
    def devices(self) -> list[dict]:
        """The devices the engine loaded onto, as llama.cpp saw them."""
        return self._engine.info["devices"]

    def _check_usable(self) -> None:
        if self._closed:
            raise EngineError("this model handle is closed; load the model again")
        if self._failed is not None:
            raise EngineError(f"this model handle failed earlier ({self._failed}); load the model again")

    def _prepare(self, kwargs: dict) -> tuple[bool, Callable[[], None] | None]:
        """Fix what a replay needs in ``kwargs``; take out ``stream`` and ``on_accepted``."""
        if kwargs.get("temperature", 0.8) > 0 and kwargs.get("seed") is None and "seed" not in self._llama_kwargs:
            # A replay after a lost machine must draw the same random numbers: fix the seed now.
            kwargs["seed"] = random.randrange(2**31)
        return bool(kwargs.pop("stream", False)), kwargs.pop("on_accepted", None)

    def _admit(self) -> None:
        """The scheduler's admission of a request (``RateLimited`` over the client's limits). While the scheduler is
        away (the Dask client reconnecting) the request goes ahead on the lease this handle holds: the machines still
        serve it, and a restarted scheduler counts what it generated once it is back."""
        if not self._mesh._reachable():
            logger.info("the scheduler is away: request admitted on this handle's lease %s", self.session_id)
            return
        try:
            answer = self._mesh._call("sharedllm_request", session_id=self.session_id)
        except SchedulerUnreachable as exc:
            logger.warning("request admitted on lease %s without the scheduler: %s", self.session_id, exc)
            return
        if answer.get("draining"):
            self._move_off(answer["draining"])

    async def _aadmit(self) -> None:
        """``_admit`` for asyncio."""
        if not self._mesh._reachable():
            logger.info("the scheduler is away: request admitted on this handle's lease %s", self.session_id)
            return
        try:
            answer = await self._mesh._acall("sharedllm_request", session_id=self.session_id)
        except SchedulerUnreachable as exc:
            logger.warning("request admitted on lease %s without the scheduler: %s", self.session_id, exc)
            return
        if answer.get("draining"):
            await _to_the_end(asyncio.to_thread(self._move_off, answer["draining"]))

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

    def _run(self, method: str, kwargs: dict) -> dict | Iterator[dict]:
        self._check_usable()
        self._admit()
        stream, on_accepted = self._prepare(kwargs)
        if stream:
            return self._stream(method, kwargs, on_accepted)
        for attempt in range(self.max_recoveries + 1):
            t0 = time.perf_counter()
            engine, generation = self._current()
            try:
                out = engine.call(method, kwargs)
            except (EngineError, InvalidModel) as exc:
                self._give_up_unless_recoverable(exc, attempt)
                self._recover_shared(exc, attempt, generation)
                continue
            tokens = (out.get("usage") or {}).get("completion_tokens", 0)
            self._stats(tokens, time.perf_counter() - t0, None, done=True)
            return out
        raise AssertionError("unreachable")

    def _stream(self, method: str, kwargs: dict, on_accepted: Callable[[], None] | None = None) -> Iterator[dict]:
        delivery = _Delivery(self.REPORT_EVERY)
        try:
            for attempt in range(self.max_recoveries + 1):
                delivery.replay()
                try:
                    generated = 0
                    engine, generation = self._current()
                    for chunk, generated in engine.stream(method, kwargs, on_accepted if attempt == 0 else None):
                        if (chunk := delivery.take(chunk, generated)) is not None:
                            if delivery.report_due():
                                self._stats(*delivery.report(), done=False)
                            yield chunk
                    delivery.finish(generated)
                    return
                except EngineError as exc:
                    if not self._recoverable(exc, attempt):
                        raise
                    self._recover_shared(exc, attempt, generation)
        except (EngineError, InvalidModel) as exc:  # InvalidModel: the model made llama.cpp abort
            self._failed = exc
            raise
        finally:
            self._stats(*delivery.report(), done=True)

    async def _astream(self, method: str, kwargs: dict, on_accepted: Callable[[], None] | None = None
                       ) -> AsyncIterator[dict]:
        # _stream for asyncio: the engine's chunks are read in the event loop; recovering (leasing and loading
        # again) runs in a thread.
        delivery = _Delivery(self.REPORT_EVERY)
        try:
            for attempt in range(self.max_recoveries + 1):
                delivery.replay()
                try:
                    generated = 0
                    engine, generation = await self._acurrent()
                    async for chunk, generated in engine.astream(method, kwargs, on_accepted if attempt == 0 else None):
                        if (chunk := delivery.take(chunk, generated)) is not None:
                            if delivery.report_due():
                                await self._astats(*delivery.report(), done=False)
                            yield chunk
                    delivery.finish(generated)
                    return
                except EngineError as exc:
                    if not self._recoverable(exc, attempt):
                        raise
                    await _to_the_end(asyncio.to_thread(self._recover_shared, exc, attempt, generation))
        except (EngineError, InvalidModel) as exc:
            self._failed = exc
            raise
        finally:
            await self._astats(*delivery.report(), done=True)

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

    def _stats(self, tokens: int, seconds: float, ttft_ms: float | None, done: bool) -> None:
        if self.session_id and (report := self._reports.add(tokens, seconds, ttft_ms, done)) is not None:
            self._reports.sent(self._mesh._report("sharedllm_session_report", session_id=self.session_id,
                                                  client=self._mesh.client.id, load=self.load_stats, **report), report)

    async def _astats(self, tokens: int, seconds: float, ttft_ms: float | None, done: bool) -> None:
        if self.session_id and (report := self._reports.add(tokens, seconds, ttft_ms, done)) is not None:
            self._reports.sent(await self._mesh._areport("sharedllm_session_report", session_id=self.session_id,
                                                         client=self._mesh.client.id, load=self.load_stats, **report),
                               report)

    # create_completion and create_chat_completion take ``on_accepted`` with ``stream=True``: called (in the caller's
    # thread, once) when the engine has checked the request and starts on the prompt. sharedllm.openai_server sends
    # its response headers then.
    streams_acceptance = True

    def create_completion(self, prompt: str | list[int], **kwargs) -> dict | Iterator[dict]:
        """Same arguments and result as ``llama_cpp.Llama.create_completion``; ``stream=True`` yields chunks."""
        return self._run("create_completion", {"prompt": prompt, **kwargs})

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], **kwargs) -> dict | Iterator[dict]:
        """Same arguments and result as ``llama_cpp.Llama.create_chat_completion`` (chat template from the GGUF);
        OpenAI's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` as :mod:`sharedllm.tool_calls` says."""
        kwargs, tools = tool_calls.prepare({"messages": messages, **kwargs})
        out = self._run("create_chat_completion", kwargs)
        return tools.wrap(out) if tools else out

    # The same for asyncio, in the manner of openai.AsyncOpenAI: ``await llm.acreate_completion(...)`` returns the
    # result, or with ``stream=True`` an async iterator of chunks (``async for chunk in await ...``). A stream's
    # chunks are read from the engine in the event loop itself, with no thread in between (sharedllm serve uses it).

    async def acreate_completion(self, prompt: str | list[int], **kwargs) -> dict | AsyncIterator[dict]:
        """``create_completion`` for asyncio."""
        return await self._arun("create_completion", {"prompt": prompt, **kwargs})

    async def acreate_chat_completion(self, messages: list[dict], **kwargs) -> dict | AsyncIterator[dict]:
        """``create_chat_completion`` for asyncio."""
        kwargs, tools = tool_calls.prepare({"messages": messages, **kwargs})
        out = await self._arun("create_chat_completion", kwargs)
        return tools.wrap(out) if tools else out

    async def _arun(self, method: str, kwargs: dict) -> dict | AsyncIterator[dict]:
        self._check_usable()
        await self._aadmit()
        stream, on_accepted = self._prepare(kwargs)
        if stream:
            return self._astream(method, kwargs, on_accepted)
        # Read in the event loop like a stream: cancelling the awaiting task stops the generation in the engine.
        for attempt in range(self.max_recoveries + 1):
            t0 = time.perf_counter()
            engine, generation = await self._acurrent()
            try:
                out = await engine.acall(method, kwargs)
            except (EngineError, InvalidModel) as exc:
                self._give_up_unless_recoverable(exc, attempt)
                await _to_the_end(asyncio.to_thread(self._recover_shared, exc, attempt, generation))
                continue
            tokens = (out.get("usage") or {}).get("completion_tokens", 0)
            await self._astats(tokens, time.perf_counter() - t0, None, done=True)
            return out
        raise AssertionError("unreachable")


class _Delivery:
    """The chunks of one streamed request across its attempts: a replay after a recovery must yield the text already
    delivered, which is checked and skipped; the stream keeps the first attempt's id; throughput is counted."""

    def __init__(self, report_every: float):
        self.report_every = report_every
        self.delivered: list[str] = []  # text of every chunk the caller has seen
        self.ident: tuple | None = None  # id and created of the first attempt, kept across replays
        self.seen = 0  # chunks of the current attempt
        self.t0 = self.last = time.perf_counter()
        self.ttft: float | None = None  # ms, reported once per request
        self.tokens = 0  # tokens generated for the caller (the engine's count), across attempts
        self.mark = 0  # tokens at the last report

    def replay(self) -> None:
        """A new attempt starts: its chunks repeat the delivered ones first."""
        self.seen = 0

    def take(self, chunk: dict, generated: int) -> dict | None:
        """The chunk to deliver, or None for a replayed one. ``generated``: the tokens this attempt's engine has
        generated so far (a replay counts the delivered ones again, hence the maximum)."""
        text = _chunk_text(chunk)
        if self.seen < len(self.delivered):
            if text != self.delivered[self.seen]:
                raise EngineError(
                    f"the replay after a lost machine diverged at chunk {self.seen} ({text!r} instead of "
                    f"{self.delivered[self.seen]!r}); use temperature=0 or an explicit seed"
                )
            self.seen += 1
            return None
        if self.ident is None:
            self.ident = (chunk.get("id"), chunk.get("created"))
        else:
            chunk = {**chunk, "id": self.ident[0], "created": self.ident[1]}
        self.delivered.append(text)
        self.seen += 1
        self.tokens = max(self.tokens, generated)
        if self.ttft is None and len(self.delivered) == 1:
            self.last = time.perf_counter()
            self.ttft = (self.last - self.t0) * 1000
        return chunk

    def report_due(self) -> bool:
        return time.perf_counter() - self.last >= self.report_every

    def finish(self, generated: int) -> None:
        """The attempt ended: the engine's final count (the last chunks may carry no new token)."""
        self.tokens = max(self.tokens, generated)

    def report(self) -> tuple[int, float, float | None]:
        """Tokens and seconds since the last report, and the time to first token if not reported yet."""
        now = time.perf_counter()
        out = (self.tokens - self.mark, now - self.last, self.ttft)
        self.mark, self.last, self.ttft = self.tokens, now, None
        return out


def _chunk_text(chunk: dict) -> str:
    choice = (chunk.get("choices") or [{}])[0]
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return f"{delta.get('role', '')}\x00{delta.get('content') or ''}"
