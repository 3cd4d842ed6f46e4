# SPDX-License-Identifier: AGPL-3.0-or-later
"""Replicas: one model loaded R times on disjoint machines of the mesh, each request sent to the least loaded.

    with Replicas.load(mesh, "gemma-3-270m", replicas=2, parallel=4) as llm:
        llm.create_completion("Once upon a time", max_tokens=32)

Each replica is a :class:`sharedllm.client.MeshModel` with its own lease (sessions lease their machines alone, so
the replicas never share one) and its own engine. A request goes to the replica with the fewest requests in flight
(ties: the first). When a replica loses a machine, its handle recovers as a single one does (its requests replay on
its new topology) while the others keep serving; a replica whose recovery failed is left out, and the set fails only
when every replica has.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sharedllm.errors import EngineError

logger = logging.getLogger(__name__)


class Replicas:
    """R loaded copies of one model behind ``llama_cpp.Llama``'s completion API (see the module's docstring)."""

    streams_acceptance = True

    def __init__(self, handles: list[Any]):
        if not handles:
            raise ValueError("Replicas needs at least one loaded model")
        self.handles = list(handles)
        self._load = [0] * len(self.handles)  # requests in flight per replica
        self._lock = threading.Lock()

    @classmethod
    def load(cls, mesh: Any, model: str, replicas: int = 2, **load_kwargs: Any) -> Replicas:
        """Load ``model`` ``replicas`` times (``Mesh.load``'s arguments); each takes machines no other one holds.
        When the mesh cannot hold them all, the ones loaded are closed and the error says how many fitted."""
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if "max_devices" not in load_kwargs and replicas > 1:
            # Placement spreads a model over every machine it may use: each replica takes its share of them.
            pool = [m for m in mesh.machines().ready()
                    if not load_kwargs.get("machines") or m["machine_id"] in load_kwargs["machines"]]
            load_kwargs["max_devices"] = max(1, len(pool) // replicas)
        handles: list[Any] = []
        try:
            for i in range(replicas):
                try:
                    handles.append(mesh.load(model, **load_kwargs))
                except Exception as exc:
                    if i == 0:
                        raise
                    raise type(exc)(f"the mesh holds {i} replica(s) of {model}, not {replicas}: {exc}") from exc
                logger.info("replica %d of %d on %s", i + 1, replicas, ", ".join(handles[-1].topology.machines))
        except BaseException:
            for h in handles:
                with contextlib.suppress(Exception):
                    h.close()
            raise
        return cls(handles)

    # --- what the server and the dashboard read ---------------------------------------------------------------

    @property
    def parallel(self) -> int:
        """Requests the replicas run at once, all together."""
        return sum(getattr(h, "parallel", 1) for h in self.handles)

    @property
    def failure(self) -> BaseException | None:
        """Why the set cannot serve (every replica failed), else None."""
        failures = [getattr(h, "failure", None) for h in self.handles]
        return failures[-1] if all(f is not None for f in failures) else None

    def n_vocab(self) -> int | None:
        return self.handles[0].n_vocab()

    def n_ctx(self) -> int:
        return self.handles[0].n_ctx()

    @property
    def topology(self) -> str:
        return "\n".join(f"replica {i + 1}:\n{h.topology}" for i, h in enumerate(self.handles))

    def close(self) -> None:
        for h in self.handles:
            h.close()

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Replicas x{len(self.handles)} {self.handles[0]!r}>"

    # --- requests -----------------------------------------------------------------------------------------------

    def _pick(self) -> int:
        """The least loaded replica that can serve; counts the request in."""
        with self._lock:
            usable = [i for i, h in enumerate(self.handles) if getattr(h, "failure", None) is None]
            if not usable:
                raise EngineError(f"every replica failed; the last: {self.failure}; load the model again")
            i = min(usable, key=lambda j: self._load[j])
            self._load[i] += 1
            return i

    def _done(self, i: int) -> None:
        with self._lock:
            self._load[i] -= 1

    def _run(self, method: str, args: tuple, kwargs: dict) -> Any:
        i = self._pick()
        try:
            out = getattr(self.handles[i], method)(*args, **kwargs)
        except BaseException:
            self._done(i)
            raise
        if kwargs.get("stream"):
            return self._counted(out, i)
        self._done(i)
        return out

    def _counted(self, chunks: Iterator[dict], i: int) -> Iterator[dict]:
        try:
            yield from chunks
        finally:
            self._done(i)

    async def _arun(self, method: str, args: tuple, kwargs: dict) -> Any:
        i = self._pick()
        try:
            out = await getattr(self.handles[i], method)(*args, **kwargs)
        except BaseException:
            self._done(i)
            raise
        if kwargs.get("stream"):
            return self._acounted(out, i)
        self._done(i)
        return out

    async def _acounted(self, chunks: AsyncIterator[dict], i: int) -> AsyncIterator[dict]:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._done(i)
            with contextlib.suppress(Exception):
                await chunks.aclose()

    def create_completion(self, prompt: str | list[int], **kwargs: Any) -> dict | Iterator[dict]:
        return self._run("create_completion", (prompt,), kwargs)

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], **kwargs: Any) -> dict | Iterator[dict]:
        return self._run("create_chat_completion", (messages,), kwargs)

    async def acreate_completion(self, prompt: str | list[int], **kwargs: Any) -> dict | AsyncIterator[dict]:
        return await self._arun("acreate_completion", (prompt,), kwargs)

    async def acreate_chat_completion(self, messages: list[dict], **kwargs: Any) -> dict | AsyncIterator[dict]:
        return await self._arun("acreate_chat_completion", (messages,), kwargs)
