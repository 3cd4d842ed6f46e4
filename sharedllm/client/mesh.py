# SPDX-License-Identifier: AGPL-3.0-or-later
"""``Mesh``: the cluster as a user sees it (its machines, plans, models, loads)."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

from sharedllm import gguf, models
from sharedllm.client.control import Control, DaskControl, admin_security
from sharedllm.client.model import MeshModel
from sharedllm.client.session import SessionChannel
from sharedllm.engine import LoadProgress
from sharedllm.errors import NoMachines, SchedulerUnreachable, gib
from sharedllm.models import Model
from sharedllm.options import OUTPUT_LAYERS, LoadOptions
from sharedllm.placement import Topology

logger = logging.getLogger(__name__)

__all__ = ["OUTPUT_LAYERS", "MachineTable", "Mesh"]


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
        serving directly; reached directly or through the relay hub, as the scheduler has found). The same test as
        placement's, so a machine counted here is one ``load`` can use."""
        from sharedllm.machine.state import public_endpoint

        return [m for m in self if (rpc := m.get("rpc") or {}).get("state") == "ready" and public_endpoint(rpc)
                and m.get("reach", "direct") in ("direct", "hub")]


class Mesh:
    """A SharedLLM mesh (synchronous API; loaded models also have asyncio methods).

    ``Mesh("HOST:PORT", key=...)`` reaches the scheduler's user port with a user's key (else ``SHAREDLLM_KEY`` or
    ``SHAREDLLM_KEY_FILE``; ``tls_ca_file``: the mesh's CA, for a mesh with certificates; ``tls=True``: TLS with
    the system's CAs, for a scheduler whose certificate a public CA signed). ``Mesh(control)`` goes
    through any :class:`~sharedllm.client.control.Control`. ``Mesh(distributed.Client(...))`` is the operator's way,
    through Dask's own port (deprecated for users: on a mesh with a cluster secret it takes only the admin
    credential, :func:`~sharedllm.client.control.admin_security`)."""

    def __init__(self, target: Any, *, key: str | None = None, key_file: str | None = None,
                 tls_ca_file: str | None = None, tls: bool = False, timeout: float = 30.0):
        self._owns_control = not isinstance(target, Control)  # a control given is its giver's to close
        if isinstance(target, Control):
            self.control = target
        elif isinstance(target, str):
            from sharedllm.client.userport import UserControl

            self.control = UserControl(target, key, key_file=key_file, tls_ca_file=tls_ca_file, tls=tls,
                                       timeout=timeout)
        else:
            warnings.warn("Mesh(distributed.Client) reaches the mesh through Dask's port, which is the operator's: "
                          "users connect with Mesh('HOST:PORT', key=...) to the scheduler's user port",
                          DeprecationWarning, stacklevel=2)
            self.control = DaskControl(target, timeout=timeout)
        self.timeout = timeout

    @property
    def client(self):
        """The ``distributed.Client`` of a mesh reached through Dask (None otherwise)."""
        return getattr(self.control, "client", None)

    @classmethod
    def connect(cls, address: str, *, key: str | None = None, key_file: str | None = None,
                tls_ca_file: str | None = None, tls: bool = False, timeout: float = 10.0, **client_kwargs) -> Mesh:
        """Connect to a scheduler by address; ``SchedulerUnreachable`` if nothing answers within ``timeout``.

        ``HOST:PORT`` is its user port (``key``, else ``SHAREDLLM_KEY``/``SHAREDLLM_KEY_FILE``: a user's key).
        A Dask address (``tcp://``, ``tls://``) goes through Dask's port, the operator's way: with an admin key there,
        its connections prove it (a mesh with a cluster secret takes nothing else)."""
        if "://" not in address or address.startswith("sharedllm://"):
            from sharedllm.client.userport import UserControl

            mesh = cls(UserControl(address, key, key_file=key_file, tls_ca_file=tls_ca_file, tls=tls,
                                   timeout=max(timeout, 30), connect_timeout=timeout))
            mesh._owns_control = True
            return mesh
        from distributed import Client

        from sharedllm import security

        admin_key = security.load_user_key(key, key_file)
        if admin_key is not None:
            client_kwargs["security"] = admin_security(admin_key, client_kwargs.get("security"))
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
        mesh = cls(DaskControl(client, owns_client=True))
        mesh._owns_control = True
        mesh.state()  # fails early when the scheduler lacks the preload
        return mesh

    def close(self) -> None:
        if self._owns_control:
            self.control.close()

    def whoami(self) -> dict:
        """Who this connection is, as the scheduler knows it: ``name``, ``role``, ``via``."""
        return self.control.call("whoami")

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scheduler_host(self) -> str:
        """The scheduler's host as this client reaches it (where its relay hub is, unless it advertises another)."""
        return self.control.scheduler_host()

    def state(self) -> dict:
        """The raw mesh state from the scheduler."""
        return self.control.call("state")

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

    def catalog(self) -> dict:
        """The scheduler's model catalog (``{"models": [...]}``)."""
        return self.control.call("catalog", action="list")

    def _catalog_for(self, model: str | os.PathLike) -> dict | None:
        """The catalog, read only when ``model`` is a name that needs it."""
        return self.catalog() if models.needs_catalog(model) else None

    def source(self, model: str | os.PathLike) -> models.ModelSource:
        """Where ``model`` (a path, a URL or a name of the scheduler's catalog) comes from; nothing is downloaded."""
        return models.locate(model, self._catalog_for(model))

    def model(self, model: str | os.PathLike | Model) -> Model:
        """``model`` as a :class:`~sharedllm.models.Model`: a local file (a URL or catalog entry downloaded into the
        model cache and verified first) with its parsed header. Load it as many times as you like: it is resolved
        once."""
        return model if isinstance(model, Model) else self.source(model).fetch()

    def resolve(self, model: str | os.PathLike) -> os.PathLike:
        """A local GGUF for ``model``: a path, a URL (``URL#sha256=HEX``, downloaded and verified) or a name from
        the scheduler's catalog (downloaded into the model cache on first use)."""
        return self.source(model).path()

    def plan(self, model: str | os.PathLike | Model, n_ctx: int | None = None, *, options: LoadOptions | None = None,
             **kwargs: Any) -> Topology:
        """Plan a topology for ``model`` without loading it (``Mesh.load``'s options). Raises ``ModelTooLarge`` when
        the mesh cannot hold it.

        Nothing is downloaded: for a URL or catalog entry not in the model cache yet, only the remote file's GGUF
        header is read (HTTP ``Range``, a few MB), so a model too large for the mesh is refused before a byte of its
        weights moves."""
        opts = LoadOptions.build(options, **({"n_ctx": n_ctx} if n_ctx is not None else {}), **kwargs)
        header = model.header if isinstance(model, Model) else self.source(model).header()
        return self._plan(header, opts)

    def _plan(self, header: gguf.GGUFFile, opts: LoadOptions) -> Topology:
        from sharedllm.ggml import build_info

        estimate, on_client = gguf.placement_estimates(header, opts.context, opts.output_layer)
        d = self.control.call("plan", estimate=estimate.to_dict(),
                              estimate_client=on_client.to_dict() if on_client else None,
                              build=build_info(), **opts.placement())
        return Topology.from_dict(d)

    def load(
        self,
        model: str | os.PathLike | Model,
        n_ctx: int | None = None,
        *,
        options: LoadOptions | None = None,
        on_progress: Callable[[LoadProgress], None] | None = None,
        **kwargs: Any,
    ) -> MeshModel:
        """Load ``model`` across the mesh and return a handle with ``llama_cpp.Llama``'s completion methods.

        ``model``: a path, a URL, a name of the scheduler's catalog, or a :class:`~sharedllm.models.Model` from
        :meth:`model`. The options (:class:`~sharedllm.options.LoadOptions`) come as ``options=`` or as keyword
        arguments; keyword arguments that are not options go to ``llama_cpp.Llama`` in the engine (``n_threads``,
        ``n_batch``, ``seed``, ``chat_format``, ...).

        The session leases its machines: no other session uses them until it closes (or its client disconnects).
        When every machine that could hold the model is leased, ``load`` waits up to ``wait_timeout`` seconds in a
        FIFO queue, then raises ``MeshBusy``. When a machine dies mid-generation, the handle reloads the model on
        the remaining machines and replays the request, up to ``max_recoveries`` times; the caller's stream goes on.
        For that the handle keeps a standby engine process (interpreter up, llama-cpp-python imported, ~50 MB, idle)
        unless ``max_recoveries=0``. Errors: ``ModelNotFound``/``InvalidModel`` for the file,
        ``ModelTooLarge``/``NoMachines`` for the mesh, ``MeshBusy`` after waiting, ``WorkerLost`` when a machine is
        lost and recovery is exhausted, ``RateLimited`` over the client's limits, ``SchedulerUnreachable`` for the
        scheduler.

        Sensitive requests: ``privacy="trusted"`` places the model only on machines out of probation with a trust
        score of at least 0.7; ``min_trust`` sets a minimum score; ``labels`` (e.g. ``{"owner": "alice"}``) must
        match the machines' ``--label``s. When no machine qualifies the load fails; it never goes elsewhere, and
        recoveries keep the same restrictions.

        ``output_layer``: where the output layer (final norm and vocabulary projection) runs. ``"client"``: on this
        machine's CPU, so the mesh sends back n_embd floats a token instead of n_vocab logits (1 MiB a token for
        Gemma's 262k vocabulary) and holds neither the projection nor the logits buffer; this machine computes the
        projection. ``"mesh"``: on the last machine, as plain llama.cpp RPC does. ``"auto"`` (default): the scheduler
        chooses as it places the model: ``"client"`` when the model ties its embeddings (this machine maps that
        matrix for the input embeddings anyway) and the machines it may use serve CPUs only (a GPU does the
        projection faster than this machine's CPU), otherwise ``"mesh"``.

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
        ``draft``: speculative decoding (``sharedllm.engine.speculative``): ``"lookup"`` (n-gram prompt lookup: the
        context's earlier tokens propose the continuation; no model) or a draft model (a path, URL or catalog name
        of a small GGUF with the target's vocabulary, run on this machine's CPU, never on the mesh). Each step the
        mesh verifies a sequence's next token and its drafts in one pass, as many drafts (up to ``draft_max``) as
        its running acceptance and the measured cost of a step make worth it (none when drafting does not pay). The
        text is the text without drafts: greedy and seeded alike (flash attention is on with a draft: the oracle is
        the model loaded with ``flash_attn=True``). ``engine_stats["draft"]``: drafts verified and accepted.
        ``tunnel_hook``: for benchmarks, something between the engine and every machine (``bench/linkem.py``'s
        ``hook(rtt_ms=20, mbit=100)``: an emulated link).
        """
        from sharedllm.ggml import build_info

        opts = LoadOptions.build(options, **({"n_ctx": n_ctx} if n_ctx is not None else {}), **kwargs)
        build_info()  # measured once per library build and cached; not part of planning time
        if not isinstance(model, Model):
            source = self.source(model)  # the catalog, read once
            if source.downloads:  # a model too large for the mesh is refused before the download
                self._plan(source.header(), opts)
            model = source.fetch()
        if isinstance(opts.draft, (str, os.PathLike)) and opts.draft != "lookup":
            opts = opts.replace(draft=self.model(opts.draft))  # downloaded and checked here, run by the engine
        handle = MeshModel(SessionChannel(self.control), model, opts, on_progress=on_progress)
        try:
            handle.open()
        except BaseException:
            handle.drop_standby()  # started beside the load that failed: nobody will recover into it
            raise
        return handle
