# SPDX-License-Identifier: AGPL-3.0-or-later
"""The client-side driver: ``Mesh`` (the cluster as a user sees it) and ``MeshModel`` (one loaded model).

    mesh = sharedllm.Mesh(Client("tcp://machine1:8786"))
    with mesh.load("/models/gemma-3-270m-q4_k_m.gguf", n_ctx=2048) as llm:
        llm.create_completion("Once upon a time", max_tokens=64, temperature=0)

The driver reads the model's GGUF metadata, asks the scheduler for a topology, checks every rpc-server answers, then
starts the engine (a child process holding the llama.cpp context). ``MeshModel`` mirrors ``llama_cpp.Llama``'s
``create_completion`` and ``create_chat_completion``, with the same dict shapes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

from sharedllm import gguf, models, tool_calls
from sharedllm.engine import Engine, EngineSpec, EngineStage, LoadProgress, _to_the_end
from sharedllm.errors import (
    REFUSAL,
    EngineError,
    InvalidModel,
    MeshBusy,
    MeshError,
    ModelClosed,
    ModelTooLarge,
    NoMachines,
    SchedulerUnreachable,
    WorkerLost,
    from_refusal,
    gib,
)
from sharedllm.placement import Topology

logger = logging.getLogger(__name__)


class MachineTable(list):
    """The mesh's machines (dicts, as the scheduler reports them), printed as a table."""

    def __str__(self) -> str:
        if not self:
            return "no machines in the mesh"
        rows = [("MACHINE", "WORKERS", "CPUS", "RAM FREE/TOTAL", "GPUS", "RPC-SERVER", "ENDPOINT", "PROTOCOL")]
        for m in self:
            res, rpc = m.get("resources") or {}, m.get("rpc") or {}
            gpus = res.get("gpus") or []
            gpu = ", ".join(f"{g['name']} {gib(g['memory_free'])}/{gib(g['memory_total'])}" for g in gpus) or "-"
            state = rpc.get("state", "?")
            if rpc.get("restarts"):
                state += f" ({rpc['restarts']} restarts)"
            rows.append((
                m["machine_id"], str(len(m.get("workers", []))), str(res.get("cpu_count", "?")),
                f"{gib(res.get('ram_available', 0))}/{gib(res.get('ram_total', 0))}", gpu, state,
                rpc.get("endpoint") or "-", rpc.get("protocol") or "-",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    def ready(self) -> list[dict]:
        """The machines a session can be placed on now: rpc-server ready and reachable (its relay running, or
        serving directly). The same test as placement's, so a machine counted here is one ``load`` can use."""
        from sharedllm.actor import public_endpoint

        return [m for m in self if (rpc := m.get("rpc") or {}).get("state") == "ready" and public_endpoint(rpc)]


class Mesh:
    """A SharedLLM mesh reached through a Dask client (synchronous API)."""

    def __init__(self, client, *, timeout: float = 30.0):
        if getattr(client, "asynchronous", False):
            raise ValueError("Mesh needs a synchronous distributed.Client (created without asynchronous=True)")
        self.client = client
        self.timeout = timeout
        # To connect again when the client gives up on a scheduler that restarts (see _revive).
        self._address = getattr(client.scheduler, "address", None)
        self._security = getattr(client, "security", None)

    def _revive(self) -> None:
        """A Dask client stops reconnecting after its connect timeout, and then stays closed: a scheduler that takes
        longer to restart would leave this mesh without one. Connect a new client to the same scheduler then."""
        if self.client.status != "closed" or not self._address:
            return
        from distributed import Client

        try:
            self.client = Client(self._address, timeout=self.timeout, security=self._security, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise SchedulerUnreachable(
                f"cannot reach the Dask scheduler at {self._address} ({type(exc).__name__}); check that it is running"
            ) from exc
        logger.info("connected to the scheduler at %s again (client %s)", self._address, self.client.id)

    @classmethod
    def connect(cls, address: str, *, timeout: float = 10.0, **client_kwargs) -> Mesh:
        """Connect to a scheduler by address; ``SchedulerUnreachable`` if nothing answers within ``timeout``."""
        from distributed import Client

        try:
            client = Client(address, timeout=timeout, **client_kwargs)
        except (OSError, TimeoutError) as exc:
            raise SchedulerUnreachable(
                f"cannot reach the Dask scheduler at {address} within {timeout:.0f}s ({type(exc).__name__}); check "
                "the address and that `dask scheduler --preload sharedllm.scheduler` runs there"
            ) from exc
        mesh = cls(client)
        mesh._owns_client = True
        mesh.state()  # fails early when the scheduler lacks the preload
        return mesh

    def close(self) -> None:
        if getattr(self, "_owns_client", False):
            self.client.close()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, handler: str, *, timeout: float | None = None, **kwargs) -> Any:
        self._revive()
        try:
            result = self.client.sync(getattr(self.client.scheduler, handler), **kwargs,
                                      callback_timeout=timeout or self.timeout)
        except Exception as exc:
            self._call_failed(handler, exc)
        return self._called(handler, result)

    async def _acall(self, handler: str, *, timeout: float | None = None, **kwargs) -> Any:
        """``_call`` for asyncio: awaitable from any event loop (the request runs on the Dask client's own loop)."""
        if self.client.status == "closed":
            await asyncio.to_thread(self._revive)
        call = asyncio.wait_for(getattr(self.client.scheduler, handler)(**kwargs), timeout or self.timeout)
        loop = self.client.loop.asyncio_loop
        try:
            if asyncio.get_running_loop() is loop:
                result = await call
            else:
                result = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call, loop))
        except Exception as exc:
            self._call_failed(handler, exc)
        return self._called(handler, result)

    def _call_failed(self, handler: str, exc: Exception) -> NoReturn:
        """Raise for a failed scheduler call (from its ``except``): the mesh's own errors as they are, a one-line
        error for an unreachable scheduler or one without SharedLLM, anything else as it is."""
        from distributed.comm.core import CommClosedError

        addr = getattr(self.client.scheduler, "address", None) or getattr(self.client, "scheduler_file", None) or "?"
        if isinstance(exc, MeshError):
            raise exc
        if self.client.scheduler is None or self.client.status in ("closing", "closed"):
            # The Dask client lost its scheduler (killed, restarting): it has no connection left to call through.
            raise SchedulerUnreachable(
                f"the Dask client has lost its scheduler (status {self.client.status}) and cannot call {handler}; "
                "check that the scheduler runs, then connect again"
            ) from exc
        if isinstance(exc, (OSError, CommClosedError, TimeoutError)):
            raise SchedulerUnreachable(
                f"the Dask scheduler at {addr} did not answer {handler} ({type(exc).__name__}: {exc}); check that it "
                "is running"
            ) from exc
        if isinstance(exc, ValueError) and ("unknown operation" in str(exc).lower() or handler in str(exc)):
            raise self._not_sharedllm() from exc
        raise exc

    def _called(self, handler: str, result: Any) -> Any:
        if result is None:  # a scheduler without the handler logs "No handler ... found" and answers nothing
            raise self._not_sharedllm()
        if isinstance(result, dict) and REFUSAL in result:  # an expected refusal, sent as an answer: raise it here
            raise from_refusal(result[REFUSAL])
        return result

    def _not_sharedllm(self) -> SchedulerUnreachable:
        addr = getattr(self.client.scheduler, "address", "?")
        return SchedulerUnreachable(
            f"the Dask scheduler at {addr} does not run SharedLLM; start it with "
            "`dask scheduler --preload sharedllm.scheduler`"
        )

    def scheduler_host(self) -> str:
        """The scheduler's host as this client reaches it (where its relay hub is, unless it advertises another)."""
        from distributed.comm.addressing import get_address_host

        return get_address_host(getattr(self.client.scheduler, "address", None) or self._address)

    def state(self) -> dict:
        """The raw mesh state from the scheduler."""
        return self._call("sharedllm_state")

    def machines(self) -> MachineTable:
        """What each machine has: CPUs, RAM, GPUs, and its rpc-server's state."""
        return MachineTable(self.state()["machines"])

    def wait_for_machines(self, n: int = 1, timeout: float = 120.0) -> MachineTable:
        """Block until ``n`` machines have a ready rpc-server; ``NoMachines`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            table = self.machines()
            if len(table.ready()) >= n:
                return table
            if time.monotonic() > deadline:
                ready = len(table.ready())
                raise NoMachines(f"only {ready} of {n} machine(s) have a ready rpc-server after {timeout:.0f}s; "
                                 f"check the workers' logs:\n{table}")
            time.sleep(0.2)

    def resolve(self, model: str | os.PathLike) -> Path:
        """A local GGUF for ``model``: a path, a URL (``URL#sha256=HEX``, downloaded and verified) or a name from
        the scheduler's catalog (downloaded into the model cache on first use)."""
        catalog = self._call("sharedllm_catalog", action="list") if models.needs_catalog(model) else None
        return models.resolve(model, catalog)

    def plan(
        self,
        model: str | os.PathLike,
        n_ctx: int = 2048,
        *,
        strategy: str = "spread",
        headroom: float = 0.10,
        machines: list[str] | None = None,
        max_devices: int | None = None,
        output_layer: str = "auto",
        parallel: int = 1,
    ) -> Topology:
        """Plan a topology for ``model`` without loading it. Raises ``ModelTooLarge`` when the mesh cannot hold it.

        Nothing is downloaded: for a URL or catalog entry not in the model cache yet, only the remote file's GGUF
        header is read (HTTP ``Range``, a few MB), so a model too large for the mesh is refused before a byte of its
        weights moves."""
        catalog = self._call("sharedllm_catalog", action="list") if models.needs_catalog(model) else None
        parsed = models.header(model, catalog)  # for a remote model: its header only
        estimate = self._estimate(parsed, n_ctx * _check_parallel(parallel), output_layer, machines)
        from sharedllm.ggml import build_info

        d = self._call(
            "sharedllm_plan",
            estimate=estimate.to_dict(),
            strategy=strategy,
            headroom=headroom,
            machines=machines,
            max_devices=max_devices,
            build=build_info(),
        )
        return Topology.from_dict(d)

    def load(
        self,
        model: str | os.PathLike,
        n_ctx: int = 2048,
        *,
        strategy: str = "spread",
        headroom: float = 0.10,
        machines: list[str] | None = None,
        max_devices: int | None = None,
        wait_timeout: float = 60.0,
        load_timeout: float = 600.0,
        token_timeout: float = 60.0,
        max_recoveries: int = 3,
        privacy: str = "any",
        min_trust: float | None = None,
        labels: dict[str, str] | None = None,
        on_progress: Callable[[LoadProgress], None] | None = None,
        output_layer: str = "auto",
        parallel: int = 1,
        max_waiting: int = 64,
        exact_batches: bool = True,
        max_stall_ms: float = 500.0,
        prompt_cache: bool = True,
        link: dict | None = None,
        **llama_kwargs,
    ) -> MeshModel:
        """Load ``model`` across the mesh and return a handle with ``llama_cpp.Llama``'s completion methods.

        The session leases its machines: no other session uses them until it closes (or its client disconnects).
        When every machine that could hold the model is leased, ``load`` waits up to ``wait_timeout`` seconds in a
        FIFO queue, then raises ``MeshBusy``. When a machine dies mid-generation, the handle reloads the model on
        the remaining machines and replays the request, up to ``max_recoveries`` times; the caller's stream goes on.

        ``llama_kwargs`` go to ``llama_cpp.Llama`` in the engine (``n_threads``, ``n_batch``, ``seed``, ``chat_format``,
        ...). Errors: ``ModelNotFound``/``InvalidModel`` for the file, ``ModelTooLarge``/``NoMachines`` for the mesh,
        ``MeshBusy`` after waiting, ``WorkerLost`` when a machine is lost and recovery is exhausted,
        ``RateLimited`` over the client's limits, ``SchedulerUnreachable`` for the scheduler.

        Sensitive requests: ``privacy="trusted"`` places the model only on machines out of probation with a trust
        score of at least 0.7; ``min_trust`` sets a minimum score; ``labels`` (e.g. ``{"owner": "alice"}``) must
        match the machines' ``--label``s. When no machine qualifies the load fails; it never goes elsewhere, and
        recoveries keep the same restrictions.

        ``output_layer``: where the output layer (final norm and vocabulary projection) runs. ``"client"``: on this
        machine's CPU, so the mesh sends back n_embd floats a token instead of n_vocab logits (1 MiB a token for
        Gemma's 262k vocabulary) and holds neither the projection nor the logits buffer; this machine computes the
        projection. ``"mesh"``: on the last machine, as plain llama.cpp RPC does. ``"auto"`` (default): ``"client"``
        when the model ties its embeddings (this machine maps that matrix for the input embeddings anyway) and
        the mesh serves CPUs only (a GPU does the projection faster than this machine's CPU), otherwise ``"mesh"``.

        ``on_progress``: called during the load (and every reload) with a :class:`~sharedllm.engine.LoadProgress`:
        the fraction of the weights loaded, a float, carrying ``done_bytes`` of ``total_bytes``; it never decreases.
        Without it, the load logs every 10% (``sharedllm.client`` at INFO).

        ``parallel``: how many requests the handle runs at once, as sequences of one batch (continuous batching:
        every decode step computes the next token of each running request in one pass over the mesh). Each sequence
        has ``n_ctx`` tokens of context, and the memory estimate counts the KV cache of all of them. Calls from
        threads or asyncio tasks share the handle; beyond ``parallel`` they wait for a sequence, and beyond
        ``max_waiting`` waiting ones a call raises ``ModelBusy``. With ``parallel=1`` (default) requests run one at
        a time through llama-cpp-python's own generation. ``exact_batches`` (default): a decode step holds no more
        sequences than keep each one's greedy text what it is alone (see
        ``sharedllm.engine.invariance.invariant_batch``); False: one pass per step, faster where the kernels change
        with the batch. ``max_stall_ms``: while sequences are generating, a step reads no more of new prompts than
        keeps it (their next token) within this (or two decode steps' time when longer), as measured (at least 32
        tokens a step; exact batches: in chunks that keep a prompt's arithmetic, else whole chunks of ``n_batch``);
        0: ``n_batch`` tokens a step. ``prompt_cache`` (default): a request keeps the KV cells its prompt shares with
        an earlier request's and reads only the rest (a chat's history is not read again every turn), wherever that
        leaves its text what it is alone: with ``parallel=1`` or exact batches only cells written by the passes a
        fresh context makes (whole passes of ``n_batch`` tokens; exact batches: chunks of at least the measured
        size), with fast batches any common prefix. ``engine_stats``: ``prompt_tokens`` and ``cached_tokens``.
        ``link``: for benchmarks, an emulated link to every machine (``{"rtt_ms": 20, "mbit": 100}``, see
        ``sharedllm.linkem``).
        """
        from sharedllm.ggml import build_info

        if max_recoveries < 0:
            raise ValueError(f"max_recoveries must be >= 0, got {max_recoveries}")
        build_info()  # measured once per library build and cached; not part of planning time
        catalog = self._call("sharedllm_catalog", action="list") if models.needs_catalog(model) else None
        if models.needs_download(model, catalog):  # a model too large for the mesh is refused before the download
            self.plan(model, n_ctx, strategy=strategy, headroom=headroom, machines=machines, max_devices=max_devices,
                      output_layer=output_layer, parallel=parallel)
        path = self.resolve(model)
        estimate = self._estimate(path, n_ctx * _check_parallel(parallel), output_layer, machines)
        handle = MeshModel(
            self, path, estimate,
            plan_kwargs={"strategy": strategy, "headroom": headroom, "machines": machines, "max_devices": max_devices,
                         "privacy": privacy, "min_trust": min_trust, "labels": labels},
            llama_kwargs={"n_ctx": n_ctx, **llama_kwargs},
            wait_timeout=wait_timeout, load_timeout=load_timeout, token_timeout=token_timeout,
            max_recoveries=max_recoveries, on_progress=on_progress, parallel=parallel, max_waiting=max_waiting,
            engine_options={"exact_batches": exact_batches, "max_stall_ms": max_stall_ms,
                            "prompt_cache": prompt_cache, "link": link},
        )
        handle._open()
        return handle

    def _estimate(self, model: Path | gguf.GGUFFile, n_ctx: int, output_layer: str, machines: list[str] | None
                  ) -> gguf.ModelEstimate:
        """The model's memory estimate (of a local file, or a header already read), with ``output_layer`` (see
        :meth:`load`) resolved."""
        if output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"output_layer must be one of {', '.join(OUTPUT_LAYERS)}, got {output_layer!r}")
        parsed = model if isinstance(model, gguf.GGUFFile) else gguf.read_gguf(model)
        on_client = output_layer == "client"
        if output_layer == "auto" and gguf.ties_embeddings(parsed):
            on_client = not any(d.get("kind") in ("gpu", "igpu") for m in self.machines()
                                if machines is None or m["machine_id"] in machines
                                for d in (m.get("rpc") or {}).get("devices") or [])
        return gguf.estimate_memory(parsed, n_ctx, output_on_client=on_client)

    def _reachable(self) -> bool:
        """Whether the Dask client is connected now (not reconnecting after losing the scheduler, not closed)."""
        return self.client.status == "running" and self.client.scheduler is not None

    def _report(self, handler: str, **kwargs) -> bool | None:
        """Tell the scheduler something it only records (statistics, a session's end): True when it got it, False
        when it failed or was slow, None when not tried because the Dask client is not connected (the scheduler is
        away, the client reconnecting). Never raises, never waits longer than ``REPORT_TIMEOUT``."""
        if not self._reachable():
            return None
        try:
            self._call(handler, timeout=REPORT_TIMEOUT, **kwargs)
        except Exception as exc:
            if _older_scheduler(exc, kwargs):
                return self._report(handler, **_without_newer(kwargs))
            logger.debug("could not report %s: %s", handler, exc)
            return False
        return True

    async def _areport(self, handler: str, **kwargs) -> bool | None:
        """``_report`` for asyncio."""
        if not self._reachable():
            return None
        try:
            await self._acall(handler, timeout=REPORT_TIMEOUT, **kwargs)
        except Exception as exc:
            if _older_scheduler(exc, kwargs):
                return await self._areport(handler, **_without_newer(kwargs))
            logger.debug("could not report %s: %s", handler, exc)
            return False
        return True


OUTPUT_LAYERS = ("auto", "client", "mesh")
REPORT_TIMEOUT = 5.0  # seconds a statistics report may take; a slower scheduler is left alone for a while
_NEWER_REPORT_KEYS = ("total_tokens", "total_requests")  # report arguments a scheduler before them refuses


def _older_scheduler(exc: Exception, kwargs: dict) -> bool:
    """A report refused by a scheduler of an earlier SharedLLM for an argument it does not know yet."""
    return (isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc)
            and any(k in kwargs for k in _NEWER_REPORT_KEYS))


def _without_newer(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _NEWER_REPORT_KEYS}


def _check_parallel(parallel: int) -> int:
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an integer >= 1, got {parallel!r}")
    return parallel


class _Reports:
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


__all__ = ["MachineTable", "Mesh", "MeshModel"]
