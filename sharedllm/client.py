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

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from sharedllm import gguf, models
from sharedllm.engine import Engine, EngineSpec, EngineStage
from sharedllm.errors import EngineError, MeshError, NoMachines, SchedulerUnreachable, WorkerLost, gib
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
        return [m for m in self if (m.get("rpc") or {}).get("state") == "ready"]


class Mesh:
    """A SharedLLM mesh reached through a Dask client (synchronous API)."""

    def __init__(self, client, *, timeout: float = 30.0):
        if getattr(client, "asynchronous", False):
            raise ValueError("Mesh needs a synchronous distributed.Client (created without asynchronous=True)")
        self.client = client
        self.timeout = timeout

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

    def _call(self, handler: str, **kwargs) -> Any:
        from distributed.comm.core import CommClosedError

        addr = getattr(self.client.scheduler, "address", "?")
        try:
            result = self.client.sync(getattr(self.client.scheduler, handler), **kwargs, callback_timeout=self.timeout)
        except MeshError:
            raise
        except (OSError, CommClosedError, TimeoutError) as exc:
            raise SchedulerUnreachable(
                f"the Dask scheduler at {addr} did not answer {handler} ({type(exc).__name__}: {exc}); check that it "
                "is running"
            ) from exc
        except ValueError as exc:
            if "unknown operation" in str(exc).lower() or handler in str(exc):
                raise SchedulerUnreachable(
                    f"the Dask scheduler at {addr} does not run SharedLLM; start it with "
                    "`dask scheduler --preload sharedllm.scheduler`"
                ) from exc
            raise
        if result is None:  # a scheduler without the handler logs "No handler ... found" and answers nothing
            raise SchedulerUnreachable(
                f"the Dask scheduler at {addr} does not run SharedLLM; start it with "
                "`dask scheduler --preload sharedllm.scheduler`"
            )
        return result

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

    def plan(
        self,
        model: str | os.PathLike,
        n_ctx: int = 2048,
        *,
        strategy: str = "spread",
        headroom: float = 0.10,
        machines: list[str] | None = None,
        max_devices: int | None = None,
    ) -> Topology:
        """Plan a topology for ``model`` without loading it. Raises ``ModelTooLarge`` when the mesh cannot hold it."""
        path = models.resolve(model)
        estimate = gguf.estimate_memory(gguf.read_gguf(path), n_ctx)
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
        load_timeout: float = 600.0,
        token_timeout: float = 120.0,
        on_progress: Callable[[float], None] | None = None,
        **llama_kwargs,
    ) -> MeshModel:
        """Load ``model`` across the mesh and return a handle with ``llama_cpp.Llama``'s completion methods.

        ``llama_kwargs`` go to ``llama_cpp.Llama`` in the engine (``n_threads``, ``n_batch``, ``seed``, ``chat_format``,
        ...). Errors: ``ModelNotFound``/``InvalidModel`` for the file, ``ModelTooLarge``/``NoMachines`` for the mesh,
        ``WorkerLost`` when a machine cannot be reached, ``SchedulerUnreachable`` for the scheduler.
        """
        from sharedllm.ggml import build_info

        build_info()  # measured once per library build and cached; not part of planning time
        t0 = time.perf_counter()
        topo = self.plan(model, n_ctx, strategy=strategy, headroom=headroom, machines=machines,
                         max_devices=max_devices)
        plan_ms = (time.perf_counter() - t0) * 1000
        logger.info("topology for %s (planned in %.0f ms):\n%s", topo.model, plan_ms, topo)
        _check_reachable(topo)
        spec = EngineSpec(
            model_path=str(models.resolve(model)),
            stages=[EngineStage(s.endpoint, s.device_index, s.machine_id) for s in topo.stages],
            tensor_split=topo.tensor_split,
            llama_kwargs={"n_ctx": n_ctx, **llama_kwargs},
        )
        engine = Engine(spec, load_timeout=load_timeout, token_timeout=token_timeout,
                        on_progress=on_progress or _log_progress(topo.model))
        info = engine.start()
        logger.info("loaded %s on %d machine(s) in %.1fs", topo.model, len(topo.machines), info["load_seconds"])
        session = self._call("sharedllm_session_open", model=os.path.basename(topo.model), topology=topo.to_dict(),
                             client=getattr(self.client, "id", ""))["session_id"]
        return MeshModel(engine, topo, plan_ms=plan_ms, load_seconds=time.perf_counter() - t0, mesh=self,
                         session_id=session)

    def _report(self, handler: str, **kwargs) -> None:
        # Statistics for the dashboard: never let a slow or gone scheduler break generation.
        try:
            self._call(handler, **kwargs)
        except Exception as exc:
            logger.debug("could not report %s: %s", handler, exc)


def _check_reachable(topo: Topology) -> None:
    # llama.cpp aborts on a failed connect; find out here, with a clear message, before the engine starts.
    from sharedllm.ggml import rpc_hello

    for st in topo.stages:
        try:
            rpc_hello(st.endpoint, timeout=5.0)
        except TimeoutError:
            raise WorkerLost(
                f"machine {st.machine_id}'s rpc-server at {st.endpoint} accepted a connection but did not answer in "
                "5s (busy with another session, or hung); retry later or leave it out with machines=[...]",
                machine=st.machine_id, endpoint=st.endpoint,
            ) from None
        except OSError as exc:
            raise WorkerLost(
                f"machine {st.machine_id}'s rpc-server at {st.endpoint} is unreachable from this client ({exc}); "
                "check the network path or leave it out with machines=[...]",
                machine=st.machine_id, endpoint=st.endpoint,
            ) from None


def _log_progress(name: str) -> Callable[[float], None]:
    last = [-1]

    def report(fraction: float) -> None:
        step = int(fraction * 10)
        if step > last[0]:
            last[0] = step
            logger.info("loading %s: %d%%", name, step * 10)

    return report


class MeshModel:
    """A model loaded across the mesh. Mirrors ``llama_cpp.Llama``'s completion API; use as a context manager."""

    REPORT_EVERY = 2.0  # seconds between throughput reports to the scheduler during a long stream

    def __init__(
        self,
        engine: Engine,
        topology: Topology,
        *,
        plan_ms: float = 0.0,
        load_seconds: float = 0.0,
        mesh: Mesh | None = None,
        session_id: str | None = None,
    ):
        self._engine = engine
        self.topology = topology
        self.plan_ms = plan_ms
        self.load_seconds = load_seconds
        self.metadata: dict = engine.info.get("metadata", {})
        self.session_id = session_id
        self._mesh = mesh
        self._failed: Exception | None = None

    def n_ctx(self) -> int:
        return self._engine.info["n_ctx"]

    @property
    def devices(self) -> list[dict]:
        """The devices the engine loaded onto, as llama.cpp saw them."""
        return self._engine.info["devices"]

    def _run(self, method: str, kwargs: dict) -> dict | Iterator[dict]:
        if self._failed is not None:
            raise EngineError(f"this model handle failed earlier ({self._failed}); load the model again")
        if self._engine is None:
            raise EngineError("this model handle is closed; load the model again")
        if kwargs.pop("stream", False):
            return self._guard(self._engine.stream(method, kwargs))
        t0 = time.perf_counter()
        try:
            out = self._engine.call(method, kwargs)
        except EngineError as exc:
            self._failed = exc
            raise
        tokens = (out.get("usage") or {}).get("completion_tokens", 0)
        self._stats(tokens, time.perf_counter() - t0, None, done=True)
        return out

    def _guard(self, it: Iterator[dict]) -> Iterator[dict]:
        t0 = time.perf_counter()
        ttft, n, mark, last = None, 0, 0, t0
        try:
            for chunk in it:
                now = time.perf_counter()
                if ttft is None:
                    ttft, last = (now - t0) * 1000, now
                n += 1
                if now - last >= self.REPORT_EVERY:
                    self._stats(n - mark, now - last, ttft, done=False)
                    mark, last, ttft = n, now, None
                yield chunk
        except EngineError as exc:
            self._failed = exc
            raise
        finally:
            self._stats(n - mark, time.perf_counter() - last, ttft, done=True)

    def _stats(self, tokens: int, seconds: float, ttft_ms: float | None, done: bool) -> None:
        if self._mesh is not None and self.session_id:
            self._mesh._report("sharedllm_session_report", session_id=self.session_id, tokens=tokens,
                               seconds=seconds, ttft_ms=ttft_ms, request_done=done)

    def create_completion(self, prompt: str | list[int], **kwargs) -> dict | Iterator[dict]:
        """Same arguments and result as ``llama_cpp.Llama.create_completion``; ``stream=True`` yields chunks."""
        return self._run("create_completion", {"prompt": prompt, **kwargs})

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], **kwargs) -> dict | Iterator[dict]:
        """Same arguments and result as ``llama_cpp.Llama.create_chat_completion`` (chat template from the GGUF)."""
        return self._run("create_chat_completion", {"messages": messages, **kwargs})

    def close(self) -> None:
        """Stop the engine; the rpc-servers are free for the next session."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            if self._mesh is not None and self.session_id:
                reason = f"failed: {self._failed}" if self._failed else "closed"
                self._mesh._report("sharedllm_session_close", session_id=self.session_id, reason=reason)

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
        return f"<MeshModel {self.topology.model} on {len(self.topology.stages)} device(s)>"


__all__ = ["MachineTable", "Mesh", "MeshModel"]
