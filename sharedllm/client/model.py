# SPDX-License-Identifier: AGPL-3.0-or-later
"""``MeshModel``: one loaded model, its engine, its recoveries, and the delivery of its streams."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from sharedllm import effects, gguf, tool_calls
from sharedllm.client.delivery import Delivery
from sharedllm.client.recovery import Recovery
from sharedllm.client.reports import Reports
from sharedllm.client.session import SessionChannel
from sharedllm.effects import Core
from sharedllm.engine import Engine, EngineSpec, EngineStage, LoadProgress, Standby, measures
from sharedllm.errors import EngineError, InvalidModel, ModelClosed, WorkerLost, gib
from sharedllm.ggml import kernels_fingerprint
from sharedllm.models import Model
from sharedllm.options import LoadOptions
from sharedllm.placement import Topology

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


class MeshModel(Recovery):
    """A model loaded across the mesh. Mirrors ``llama_cpp.Llama``'s completion API; use as a context manager.

    The handle owns a lease on its machines and an engine process. If a machine dies during a request, the handle
    leases a new topology without it, starts a new engine and replays the request: greedy (or seeded) decoding
    regenerates exactly the tokens already delivered, which are checked and skipped, and the stream goes on.
    """

    REPORT_EVERY = 2.0  # seconds between throughput reports to the scheduler during a long stream
    MOVE_RETRY = 30.0  # seconds before a session that could not move off draining machines tries again
    EXCLUDE_FOR = 60.0  # seconds a machine this handle lost is left out of its new leases

    def __init__(self, channel: SessionChannel, model: Model, options: LoadOptions,
                 on_progress: Callable[[LoadProgress], None] | None = None):
        self._channel = channel
        self.model = model
        self.options = options
        self.path = model.path
        self.parallel = options.parallel
        self.max_waiting = options.max_waiting
        self.max_recoveries = options.max_recoveries
        self._on_progress = on_progress
        # What the session needs on the mesh: with the output layer on the mesh, and (auto) on the client; the
        # scheduler chooses as it places the model, and ``estimate`` is the one it chose.
        self._estimates = gguf.placement_estimates(model.header, options.context, options.output_layer)
        self.estimate: gguf.ModelEstimate = self._estimates[0]
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
        self._reports = Reports()
        self._move_retry_at = 0.0
        self._servers_seen: dict[str, int | None] = {}
        # What an engine of this handle measured of its machines' kernels (sharedllm.engine.invariance), and on which
        # machines: a recovery onto some of them takes it instead of measuring again before its replay.
        self._measured: tuple[frozenset[str], dict] | None = None
        # One recovery for all the requests a lost machine broke: the first to get there reloads, the others find
        # the engine replaced (a new ``_generation``) and replay on it.
        self._recovery_lock = threading.Lock()
        self._generation = 0
        # The engine process the next recovery (or move) loads into, started ahead (see Standby).
        self._standby: Standby | None = None
        self.standby = options.max_recoveries > 0  # keep a standby engine process (set False to do without)
        self._standby_lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Lease a topology and load the model there (``Mesh.load`` does it)."""
        self._open()

    def _open(self, replaces: str | None = None, wait_timeout: float | None = None) -> None:
        """Lease a topology (excluding machines lost earlier), check every server answers, start the engine.

        ``replaces``: this handle's session, which the new one takes over (see ``_move_off``)."""
        t0 = time.perf_counter()
        name = self.model.name
        on_mesh, on_client = self._estimates
        d = self._channel.acquire(
            estimate=on_mesh.to_dict(), estimate_client=on_client.to_dict() if on_client else None, model=name,
            wait_timeout=self.options.wait_timeout if wait_timeout is None else wait_timeout,
            placement=self.options.placement(), exclude=self._excluded(), replaces=replaces,
            shared=self.options.shared)
        self.plan_ms = (time.perf_counter() - t0) * 1000
        self.session_id = d["session_id"]
        self._reports.new_session()
        topo = self.topology = Topology.from_dict(d["topology"])
        self.estimate = on_client if on_client is not None and topo.output_on_client else on_mesh
        # Which rpc-server process each machine ran when we leased it: a later restart betrays a lost machine.
        table = [m for m in self._channel.machines() if m["machine_id"] in topo.machines]
        self._servers_seen = {m["machine_id"]: (m.get("rpc") or {}).get("pid") for m in table}
        logger.info("leased %s for %s (planned in %.0f ms)", ", ".join(topo.machines), name, self.plan_ms)
        logger.debug("topology for %s:\n%s", name, topo)  # the CLI prints it; llm.topology has it
        try:
            # llama.cpp reaches each machine through its relay (TLS + this lease's token), tunnelled from the engine;
            # machines that serve RPC directly (--insecure-direct-rpc) are connected as they are.
            self._lease_relays = d.get("relays") or {}  # machine -> relay endpoint, fingerprint, this lease's token
            stages = _engine_stages(topo, self._lease_relays, self._channel.scheduler_host())
            _check_reachable(stages)
            spec = EngineSpec(
                model_path=str(self.path),
                stages=stages,
                tensor_split=topo.tensor_split,
                llama_kwargs=self.options.llama_kwargs(),
                output_on_client=self.estimate.output_on_client,
                invariance=self._measures_for(topo.machines),
                tensor_bytes=self.model.tensor_bytes,
                **self.options.engine_options(),
            )
            spec.measures_key = measures.key(spec, kernels_fingerprint(),  # once per process: a hash of its libraries
                                             {m["machine_id"]: _kernels_of(m) for m in table})
            with self._standby_lock:
                standby, self._standby = self._standby, None
            self._spare()  # the next one, for the next recovery: started beside this load
            self._engine = Engine(spec, load_timeout=self.options.load_timeout,
                                  token_timeout=self.options.token_timeout,
                                  on_progress=self._on_progress or _log_progress(name), watchdog=self._suspect,
                                  standby=standby)
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
        if self.options.draft is not None and (info.get("invariance") or {}).get("verify_rows", 2) < 2:
            logger.warning("%s: no drafts will be verified on these machines: a pass of several rows of one sequence "
                           "takes other kernels than one row there (a llama.cpp build without SharedLLM's patches?); "
                           "load without draft=", name)
        if info.get("measured_by") == "measuring":
            logger.info("%s: a first load on these machines; the engine measures their kernels while idle, with steps "
                        "of one sequence and no drafts until then (llm.measured() waits for them)", name)
        self.load_seconds = time.perf_counter() - t0
        logger.info("loaded %s on %d machine(s) in %.1fs", name, len(topo.machines), self.load_seconds)

    def _spare(self) -> None:
        """Start the standby engine process that the next recovery (or move) takes; none with ``standby=False``.

        Started as a load begins, beside it: the load waits on the network and on one core (the vocabulary), the
        standby's interpreter start and imports (~0.4 s of a core) take another, and are done before requests come.
        A standby started after the load would slow the first requests, or a recovery's replay, on a small host."""
        with self._standby_lock:
            if not self.standby or self._standby is not None or self._closed:
                return
            try:
                self._standby = Standby()
            except OSError as exc:  # a recovery then starts its own process, as without a standby
                logger.warning("could not start a standby engine process: %s", exc)

    def drop_standby(self) -> None:
        """Stop the standby engine process (a failed load's: nobody will recover into it)."""
        with self._standby_lock:
            standby, self._standby = self._standby, None
        if standby is not None:
            standby.close()

    def _release(self, reason: str) -> None:
        if self._engine is not None:
            # After a failure, the other requests of the engine take its failure and recover on the next one.
            self._engine.close(replaced=reason.startswith("failed") and not self._closed)
            self._engine = None
        if self.session_id:
            self._reports.quiet_until = 0.0  # the session's last counts go with its end
            effects.run(self._reporting(0, 0.0, None, done=False))
            # After a failure, do not wait for the lost machine's relay to drop the lease: a recovery is waiting.
            self._channel.close(self.session_id, reason, wait=not reason.startswith("failed"))
            self.session_id = None

    def close(self) -> None:
        """Stop the engine and give the lease back; the rpc-servers are free for the next session."""
        if not self._closed:
            self._closed = True
            self._release(f"failed: {self._failed}" if self._failed else "closed")
        self.drop_standby()

    def __enter__(self) -> MeshModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        # Only stop the child: no scheduler call from a finalizer (it may run at interpreter shutdown).
        for part in (getattr(self, "_engine", None), getattr(self, "_standby", None)):
            if part is not None:
                try:
                    part.close()
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

    def measured(self, timeout: float = 120.0) -> dict | None:
        """What the engine measured of its machines' kernels for exact batches (``max_batch``, ``batch_min_chunk``,
        ``verify_rows``: :mod:`sharedllm.engine.invariance`). A first load of a model on some machines serves at
        once and takes them while idle, with steps of one sequence and no drafts until then: this waits up to
        ``timeout`` seconds for them (None if they are not had by then, or the load is not exact)."""
        engine = self._engine
        return (engine.measured(timeout) if engine is not None else None) or None

    def _measures_for(self, machines: list[str]) -> dict | None:
        """An earlier engine's measures, for a new engine on ``machines`` (a recovery onto some of them takes them
        instead of measuring again)."""
        engine = self._engine  # the engine being replaced: its measures may have come while it was idle
        if engine is not None and engine.info.get("invariance"):
            self._measured = (frozenset(st.machine_id for st in engine.spec.stages), engine.info["invariance"])
        return self._measured[1] if self._measured and set(machines) <= self._measured[0] else None

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
        if kwargs.get("temperature", 0.8) > 0 and kwargs.get("seed") is None and "seed" not in self.options.llama:
            # A replay after a lost machine must draw the same random numbers: fix the seed now.
            kwargs["seed"] = random.randrange(2**31)
        return bool(kwargs.pop("stream", False)), kwargs.pop("on_accepted", None)

    def _admitting(self, user: SessionChannel | None = None) -> Core[None]:
        """The scheduler's admission of a request (``RateLimited`` over the client's limits; see
        ``SessionChannel.admitting``; ``user``: another user's channel, for a shared session), and the move off
        machines that drain, between two requests."""
        answer = yield from (user or self._channel).admitting(self.session_id)
        if answer and answer.get("draining"):
            yield effects.in_thread(self._move_off, answer["draining"], shield=True)

    def _request(self, method: str, kwargs: dict) -> Core[tuple[bool, Core]]:
        """A request admitted: whether it streams, and its core (``_streaming`` or ``_calling``; a chat that offers
        tools: read back as :mod:`sharedllm.tool_calls` says).

        ``admit_as`` (a keyword of the request): the :class:`~sharedllm.client.control.Control` of another user of
        the mesh, for whom a shared model (``shared=True``: a server's) generates: the request is admitted under
        that user's limits and bans, and its tokens are charged to them."""
        self._check_usable()
        admit_as = kwargs.pop("admit_as", None)
        user = SessionChannel(admit_as) if admit_as is not None else None
        tools = None
        if method == "create_chat_completion":
            kwargs, tools = tool_calls.prepare(kwargs)
        yield from self._admitting(user)
        stream, on_accepted = self._prepare(kwargs)
        if stream:
            core = self._streaming(method, kwargs, on_accepted, user)
            return True, tools.streamed(core) if tools else core
        core = self._calling(method, kwargs, user)
        return False, tools.completed(core) if tools else core

    def _run(self, method: str, kwargs: dict) -> dict | Iterator[dict]:
        stream, core = effects.run(self._request(method, kwargs))
        return effects.iterate(core) if stream else effects.run(core)

    async def _arun(self, method: str, kwargs: dict) -> dict | AsyncIterator[dict]:
        # Read in the event loop like a stream: cancelling the awaiting task stops the generation in the engine.
        stream, core = await effects.arun(self._request(method, kwargs))
        return effects.aiterate(core) if stream else await effects.arun(core)

    def _calling(self, method: str, kwargs: dict, user: SessionChannel | None = None) -> Core[dict]:
        for attempt in range(self.max_recoveries + 1):
            t0 = time.perf_counter()
            engine, generation = yield from self._currently()
            try:
                out = yield from engine.calling(method, kwargs)
            except (EngineError, InvalidModel) as exc:
                self._give_up_unless_recoverable(exc, attempt)
                yield effects.in_thread(self._recover_shared, exc, attempt, generation, shield=True)
                continue
            tokens = (out.get("usage") or {}).get("completion_tokens", 0)
            if user is not None:
                user.usage_soon(self.session_id, tokens)
            yield from self._reporting(tokens, time.perf_counter() - t0, None, done=True)
            return out
        raise AssertionError("unreachable")

    def _streaming(self, method: str, kwargs: dict, on_accepted: Callable[[], None] | None = None,
                   user: SessionChannel | None = None) -> Core[None]:
        delivery = Delivery(self.REPORT_EVERY)
        closed = False
        try:
            for attempt in range(self.max_recoveries + 1):
                delivery.replay()
                try:
                    generated = 0
                    engine, generation = yield from self._currently()
                    chunks = effects.Nested(engine.streaming(method, kwargs, on_accepted if attempt == 0 else None))
                    try:
                        while (item := (yield from chunks.next())) is not effects.END:
                            chunk, generated = item
                            if (chunk := delivery.take(chunk, generated)) is not None:
                                if delivery.report_due():
                                    yield from self._reporting(*delivery.report(), done=False)
                                yield chunk
                    finally:
                        chunks.close()
                    delivery.finish(generated)
                    return
                except EngineError as exc:
                    if not self._recoverable(exc, attempt):
                        raise
                    yield effects.in_thread(self._recover_shared, exc, attempt, generation, shield=True)
        except GeneratorExit:
            closed = True
            raise
        except (EngineError, InvalidModel) as exc:  # InvalidModel: the model made llama.cpp abort
            self._failed = exc
            raise
        finally:
            if user is not None:
                user.usage_soon(self.session_id, delivery.tokens)
            if closed:  # the caller stopped reading: a closing stream cannot wait, its counts go without it
                self._report_soon(*delivery.report(), done=True)
            else:
                yield from self._reporting(*delivery.report(), done=True)

    def _reporting(self, tokens: int, seconds: float, ttft_ms: float | None, done: bool) -> Core[None]:
        if self.session_id and (report := self._reports.add(tokens, seconds, ttft_ms, done)) is not None:
            self._reports.sent((yield from self._channel.reporting(self.session_id, load=self.load_stats, **report)),
                               report)

    def _report_soon(self, tokens: int, seconds: float, ttft_ms: float | None, done: bool) -> None:
        if self.session_id and (report := self._reports.add(tokens, seconds, ttft_ms, done)) is not None:
            self._channel.report_soon(self.session_id, lambda ok: self._reports.sent(ok, report),
                                      load=self.load_stats, **report)

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
        return self._run("create_chat_completion", {"messages": messages, **kwargs})

    # The same for asyncio, in the manner of openai.AsyncOpenAI: ``await llm.acreate_completion(...)`` returns the
    # result, or with ``stream=True`` an async iterator of chunks (``async for chunk in await ...``). A stream's
    # chunks are read from the engine in the event loop itself, with no thread in between (sharedllm serve uses it).

    async def acreate_completion(self, prompt: str | list[int], **kwargs) -> dict | AsyncIterator[dict]:
        """``create_completion`` for asyncio."""
        return await self._arun("create_completion", {"prompt": prompt, **kwargs})

    async def acreate_chat_completion(self, messages: list[dict], **kwargs) -> dict | AsyncIterator[dict]:
        """``create_chat_completion`` for asyncio."""
        return await self._arun("create_chat_completion", {"messages": messages, **kwargs})


def _kernels_of(machine: dict) -> dict:
    """What of a machine the engine's measures depend on (sharedllm.engine.measures): its kernels' fingerprint (none
    from a machine of an older SharedLLM: measured), its devices and its rpc-server's threads."""
    rpc = machine.get("rpc") or {}
    return {"kernels": (machine.get("build") or {}).get("kernels"), "threads": rpc.get("threads"),
            "devices": [[d.get("name"), d.get("description"), d.get("kind")] for d in rpc.get("devices") or []]}
