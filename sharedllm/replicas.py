# SPDX-License-Identifier: AGPL-3.0-or-later
"""Replicas: one model loaded R times on disjoint machines of the mesh, each request sent to the least loaded.

    with Replicas.load(mesh, "gemma-3-270m", replicas=2, parallel=4) as llm:
        llm.create_completion("Once upon a time", max_tokens=32)

Each replica is a :class:`sharedllm.client.MeshModel` with its own lease (sessions lease their machines alone, so
the replicas never share one) and its own engine. A request goes to the replica with the fewest requests in flight
(ties: the first), unless it continues an earlier request (a chat's next turn, a prompt that extends an earlier one):
then it goes where that one went, whose prompt cache holds its prefix, as long as that replica has no more than
``AFFINITY_SLACK`` requests in flight beyond the least loaded one (:class:`Affinity`). When a replica loses a
machine, its handle recovers as a single one does (its requests replay on its new topology) while the others keep
serving; a replica whose recovery failed is left out, and the set fails only when every replica has.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from sharedllm import effects
from sharedllm.effects import Core
from sharedllm.errors import EngineError
from sharedllm.options import LoadOptions

logger = logging.getLogger(__name__)

AFFINITY_SLACK = 1  # requests in flight a replica may have beyond the least loaded one and still get a continuation


class Affinity:
    """Which replica served the requests whose text a new request's text continues.

    A request's text is its prompt, or its chat messages one after the other (a chat's next turn: the last turn's
    messages, the answer and a new message; its text starts with the last turn's). Every ``STEP`` characters of a
    request's text, the hash of the text so far is remembered with the replica that served it (the last ``SIZE``
    of them); a new request goes where the longest of those that starts its text went. Only hashes are kept, in
    memory."""

    STEP = 256
    SIZE = 16384

    def __init__(self) -> None:
        self._seen: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    @staticmethod
    def text(args: tuple) -> str:
        """The text of a request's first argument: a prompt (or its tokens), or chat messages."""
        first = args[0] if args else ""
        if isinstance(first, str):
            return first
        if first and isinstance(first[0], dict):
            return "".join(json.dumps(m, sort_keys=True, default=str) for m in first)
        return " ".join(map(str, first))

    def _marks(self, text: str) -> list[bytes]:
        h = hashlib.blake2b(digest_size=16)
        out = []
        for start in range(0, len(text) - len(text) % self.STEP, self.STEP):
            h.update(text[start:start + self.STEP].encode("utf-8", "surrogatepass"))
            out.append(h.copy().digest())
        return out

    def where(self, text: str) -> int | None:
        """The replica that served the longest remembered text that starts ``text``; None when none does."""
        for mark in reversed(self._marks(text)):
            if (i := self._seen.get(mark)) is not None:
                return i
        return None

    def served(self, text: str, i: int) -> None:
        for mark in self._marks(text):
            self._seen[mark] = i
            self._seen.move_to_end(mark)
        while len(self._seen) > self.SIZE:
            self._seen.popitem(last=False)


class Counted:
    """A replica's stream (blocking or asyncio) that counts its request out once: at its end, when closed, or when
    dropped, also if it was never iterated (a generator's ``finally`` would not run then, and the replica would look
    busy for good)."""

    def __init__(self, chunks: Iterator[dict] | AsyncIterator[dict], done: Callable[[], None]):
        self._chunks, self._done = chunks, done

    def _count_out(self) -> Callable[[], None] | None:
        done, self._done = self._done, None
        return done

    def __iter__(self) -> Counted:
        return self

    def __next__(self) -> dict:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if (done := self._count_out()) is not None:
            try:
                if (close := getattr(self._chunks, "close", None)) is not None:
                    close()
            finally:
                done()

    def __aiter__(self) -> Counted:
        return self

    async def __anext__(self) -> dict:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if (done := self._count_out()) is not None:
            try:
                with contextlib.suppress(Exception):
                    await self._chunks.aclose()
            finally:
                done()

    def __del__(self) -> None:
        # The stream itself is closed by its own finaliser.
        if (done := self._count_out()) is not None:
            done()


class Replicas:
    """R loaded copies of one model behind ``llama_cpp.Llama``'s completion API (see the module's docstring)."""

    streams_acceptance = True

    def __init__(self, handles: list[Any]):
        if not handles:
            raise ValueError("Replicas needs at least one loaded model")
        self.handles = list(handles)
        self._load = [0] * len(self.handles)  # requests in flight per replica
        self._lock = threading.Lock()
        self._affinity = Affinity()

    @classmethod
    def load(cls, mesh: Any, model: Any, replicas: int = 2, *, options: LoadOptions | None = None,
             **kwargs: Any) -> Replicas:
        """Load ``model`` ``replicas`` times (``Mesh.load``'s options); each takes machines no other one holds. The
        model is resolved once for all of them. When the mesh cannot hold them all, the ones loaded are closed and
        the error says how many fitted."""
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        opts = LoadOptions.build(options, **kwargs)
        if opts.max_devices is None and replicas > 1:
            # Placement spreads a model over every machine it may use: each replica takes its share of them.
            pool = [m for m in mesh.machines().ready() if not opts.machines or m["machine_id"] in opts.machines]
            opts = opts.replace(max_devices=max(1, len(pool) // replicas))
        model = mesh.model(model)
        if isinstance(opts.draft, (str, os.PathLike)) and opts.draft != "lookup":
            opts = opts.replace(draft=mesh.model(opts.draft))
        handles: list[Any] = []
        try:
            for i in range(replicas):
                try:
                    handles.append(mesh.load(model, options=opts))
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

    def _pick(self, args: tuple = ()) -> int:
        """The replica for a request of ``args``: the least loaded that can serve, or the one that served the request
        it continues (:class:`Affinity`) when that one is not much busier; counts the request in."""
        text = Affinity.text(args)
        with self._lock:
            usable = [i for i, h in enumerate(self.handles) if getattr(h, "failure", None) is None]
            if not usable:
                raise EngineError(f"every replica failed; the last: {self.failure}; load the model again")
            i = min(usable, key=lambda j: self._load[j])
            cached = self._affinity.where(text)
            if cached in usable and self._load[cached] <= self._load[i] + AFFINITY_SLACK:
                i = cached
            self._affinity.served(text, i)
            self._load[i] += 1
            return i

    def _done(self, i: int) -> None:
        with self._lock:
            self._load[i] -= 1

    def _request(self, method: str, args: tuple, kwargs: dict) -> Core[Any]:
        """A request on the replica :meth:`_pick` chooses (``method`` of its handle, or ``a`` + ``method`` for
        asyncio); counted in until it ends, or its stream does."""
        i = self._pick(args)
        handle = self.handles[i]
        try:
            out = yield effects.Wait(lambda: getattr(handle, method)(*args, **kwargs),
                                     lambda: getattr(handle, f"a{method}")(*args, **kwargs))
        except BaseException:
            self._done(i)
            raise
        if kwargs.get("stream"):
            return Counted(out, lambda: self._done(i))
        self._done(i)
        return out

    def create_completion(self, prompt: str | list[int], **kwargs: Any) -> dict | Iterator[dict]:
        return effects.run(self._request("create_completion", (prompt,), kwargs))

    __call__ = create_completion

    def create_chat_completion(self, messages: list[dict], **kwargs: Any) -> dict | Iterator[dict]:
        return effects.run(self._request("create_chat_completion", (messages,), kwargs))

    async def acreate_completion(self, prompt: str | list[int], **kwargs: Any) -> dict | AsyncIterator[dict]:
        return await effects.arun(self._request("create_completion", (prompt,), kwargs))

    async def acreate_chat_completion(self, messages: list[dict], **kwargs: Any) -> dict | AsyncIterator[dict]:
        return await effects.arun(self._request("create_chat_completion", (messages,), kwargs))
