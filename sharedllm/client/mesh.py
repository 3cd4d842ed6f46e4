# SPDX-License-Identifier: AGPL-3.0-or-later
"""``Mesh``: the cluster as a user sees it (its machines, plans, models, loads)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from sharedllm import gguf, models
from sharedllm.client.model import MeshModel
from sharedllm.client.reports import REPORT_TIMEOUT, older_scheduler, without_newer
from sharedllm.engine import LoadProgress
from sharedllm.errors import (
    REFUSAL,
    MeshError,
    NoMachines,
    SchedulerUnreachable,
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
        except TypeError as exc:
            if "ssl_context" not in str(exc):
                raise
            raise SchedulerUnreachable(
                f"the scheduler at {address} speaks TLS and this client has no TLS configuration: give it the mesh's "
                "CA, certificate and key (`sharedllm --tls-ca-file CA --tls-cert CERT --tls-key KEY COMMAND ...`, or "
                "Mesh.connect(address, security=distributed.security.Security(tls_ca_file=..., tls_client_cert=..., "
                "tls_client_key=..., require_encryption=True)))"
            ) from None
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
        estimate = self._estimate(parsed, _context(n_ctx, parallel), output_layer, machines)
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
        For that the handle keeps a standby engine process (interpreter up, llama-cpp-python imported, ~50 MB, idle)
        unless ``max_recoveries=0``.

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
        _context(n_ctx, parallel)  # a bad n_ctx or parallel: a clear error before anything moves
        build_info()  # measured once per library build and cached; not part of planning time
        catalog = self._call("sharedllm_catalog", action="list") if models.needs_catalog(model) else None
        if models.needs_download(model, catalog):  # a model too large for the mesh is refused before the download
            self.plan(model, n_ctx, strategy=strategy, headroom=headroom, machines=machines, max_devices=max_devices,
                      output_layer=output_layer, parallel=parallel)
        path = self.resolve(model)
        estimate = self._estimate(path, _context(n_ctx, parallel), output_layer, machines)
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
        try:
            handle._open()
        except BaseException:
            handle._drop_standby()  # started beside the load that failed: nobody will recover into it
            raise
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
            if older_scheduler(exc, kwargs):
                return self._report(handler, **without_newer(kwargs))
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
            if older_scheduler(exc, kwargs):
                return await self._areport(handler, **without_newer(kwargs))
            logger.debug("could not report %s: %s", handler, exc)
            return False
        return True



OUTPUT_LAYERS = ("auto", "client", "mesh")


def _check_parallel(parallel: int) -> int:
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel must be an integer >= 1, got {parallel!r}")
    return parallel


def _context(n_ctx: int, parallel: int) -> int:
    """The tokens of context of all ``parallel`` sequences together, for the memory estimate."""
    if not isinstance(n_ctx, int) or isinstance(n_ctx, bool) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive number of tokens (each sequence's context), got {n_ctx!r}")
    return n_ctx * _check_parallel(parallel)
