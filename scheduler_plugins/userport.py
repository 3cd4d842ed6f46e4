# SPDX-License-Identifier: AGPL-3.0-or-later
"""The user port: the door users (the Python API, ``sharedllm serve``, the command line) reach the mesh through,
instead of Dask's port. It speaks only SharedLLM's operations, as typed JSON messages (:mod:`sharedllm.userwire`); a
connection proves a user's key before its first operation, and every operation runs with the identity and role the
connection proved (:class:`~sharedllm.scheduler_plugins.mesh.operations.Operations`), never one an argument claims.

It listens on the interface the scheduler listens on, with TLS where the mesh has certificates, and limits the
connections and the handshakes in progress of each address (as the relay hub does): a host that opens many gets
refused, not the mesh slowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections import Counter
from collections.abc import Callable
from typing import Any

from sharedllm import security
from sharedllm.errors import REFUSAL, MeshError, to_refusal
from sharedllm.scheduler_plugins.mesh.operations import Operations
from sharedllm.scheduler_plugins.users import ANONYMOUS, Caller, UserRegistry
from sharedllm.userwire import HANDSHAKE_FRAME, PROTOCOL, WireError, read_message, write_message

logger = logging.getLogger("sharedllm.scheduler")


class UserPort:
    """The listener (see the module's docstring). ``on_opened(caller)``: a user's connection is authenticated (its
    sessions that wait for their client are its own again). ``on_closed(caller, sessions)``: a connection ended,
    with the sessions it opened."""

    def __init__(self, operations: Operations, users: UserRegistry, *, host: str = "0.0.0.0", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None, allow_anonymous: bool = False,
                 on_closed: Callable[[Caller, set[str]], None] | None = None, max_per_address: int = 64,
                 on_opened: Callable[[Caller], None] | None = None,
                 max_handshakes_per_address: int = 8, handshake_timeout: float = 10.0):
        self.operations = operations
        self.users = users
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.allow_anonymous = allow_anonymous
        self.on_closed = on_closed
        self.on_opened = on_opened
        self._writers: dict[str, set[asyncio.StreamWriter]] = {}  # user -> their open connections
        self.max_per_address = max_per_address
        self.max_handshakes_per_address = max_handshakes_per_address
        self.handshake_timeout = handshake_timeout
        self._server: asyncio.Server | None = None
        self._connections: Counter[str] = Counter()
        self._handshakes: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()
        self.refused: Counter[str] = Counter()  # why connections were refused: for the state and /metrics
        self.connected: Counter[str] = Counter()  # user -> connections now

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, ssl=self.ssl_context,
                                                  limit=1 << 16)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("SharedLLM user port on %s:%d (%s)", self.host, self.port,
                    "TLS" if self.ssl_context else "no TLS: the mesh has no certificates")
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        for task in list(self._tasks):
            task.cancel()

    def state(self) -> dict:
        return {"port": self.port, "tls": self.ssl_context is not None, "anonymous": self.allow_anonymous,
                "connections": sum(self._connections.values()), "refused": dict(self.refused)}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("?",))[0]
        task = asyncio.current_task()
        self._tasks.add(task)
        caller = None
        counted = False
        opened: set[str] = set()
        try:
            if self._connections[peer] >= self.max_per_address:
                self.refused["connections per address"] += 1
                await self._refuse(writer, f"too many connections from {peer} (limit {self.max_per_address})")
                return
            if self._handshakes[peer] >= self.max_handshakes_per_address:
                self.refused["handshakes per address"] += 1
                await self._refuse(writer, f"too many handshakes in progress from {peer}")
                return
            self._connections[peer] += 1
            counted = True
            self._handshakes[peer] += 1
            try:
                caller = await asyncio.wait_for(self._handshake(reader, writer, peer), self.handshake_timeout)
            except (asyncio.TimeoutError, WireError, OSError) as exc:
                self.refused["handshake"] += 1
                logger.info("user port: handshake from %s failed: %s", peer, exc or type(exc).__name__)
                return
            finally:
                self._handshakes[peer] -= 1
            if caller is None:
                return
            self.connected[caller.name] += 1
            self._writers.setdefault(caller.name, set()).add(writer)
            if self.on_opened is not None:
                self.on_opened(caller)
            await self._requests(reader, writer, caller, opened)
        finally:
            if caller is not None:
                self.connected[caller.name] -= 1
                self._writers.get(caller.name, set()).discard(writer)
                if self.on_closed is not None:
                    self.on_closed(caller, opened)
            if counted:
                self._connections[peer] -= 1
            writer.close()
            self._tasks.discard(task)

    def disconnect(self, name: str, why: str) -> None:
        """End every open connection of user ``name``, saying ``why`` (their key was rotated or removed)."""
        for writer in list(self._writers.get(name, ())):
            async def end(w: asyncio.StreamWriter = writer) -> None:
                await self._refuse(w, why)
                w.close()

            task = asyncio.ensure_future(end())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refuse(self, writer: asyncio.StreamWriter, why: str, kind: str = "AuthenticationFailed") -> None:
        with contextlib.suppress(Exception):
            await write_message(writer, {"error": {"type": kind, "args": [why]}})

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
                         ) -> Caller | None:
        nonce = secrets.token_hex(16)
        await write_message(writer, {"sharedllm": PROTOCOL, "nonce": nonce})
        hello = await read_message(reader, HANDSHAKE_FRAME)
        if hello.get("anonymous"):
            if not self.allow_anonymous:
                self.refused["anonymous"] += 1
                await self._refuse(writer, "this mesh takes no anonymous users; ask its operator for a key "
                                           "(`sharedllm users add NAME`) and pass it as key= or SHAREDLLM_KEY")
                return None
            caller = Caller(f"{ANONYMOUS}@{peer}", "anonymous", address=peer)
            await write_message(writer, {"ok": True, "user": caller.name, "role": caller.role})
            return caller
        key_id, client_nonce, proof = hello.get("key_id"), hello.get("nonce"), hello.get("proof")
        if not all(isinstance(x, str) for x in (key_id, client_nonce, proof)) or len(client_nonce) < 16:
            self.refused["malformed"] += 1
            await self._refuse(writer, "a malformed handshake; use the sharedllm client of this release")
            return None
        message = security.auth_message("user-port", key_id, client_nonce, nonce)
        user = self.users.verify(key_id, message, proof)
        if user is None:
            self.refused["wrong key"] += 1
            logger.warning("user port: refused a connection from %s: unknown key or wrong proof (key id %s)", peer,
                           key_id)
            await self._refuse(writer, f"the scheduler does not know this key (key id {key_id}): it is wrong, was "
                                       "removed or was rotated; ask the mesh's operator for a key")
            return None
        await write_message(writer, {"ok": True, "user": user.name, "role": user.role,
                                     "signature": security.server_signature(user.server_key, message)})
        return Caller(user.name, user.role, address=peer)

    async def _requests(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: Caller,
                        opened: set[str]) -> None:
        lock = asyncio.Lock()
        running: set[asyncio.Task] = set()
        key_id = self.users.users[caller.name].key_id if caller.name in self.users.users else None
        try:
            while True:
                try:
                    msg = await read_message(reader)
                except WireError:
                    return
                if key_id is not None and (caller.name not in self.users.users
                                           or self.users.users[caller.name].key_id != key_id):
                    await self._refuse(writer, f"user {caller.name}'s key was removed or rotated; connect again "
                                               "with the new key")
                    return
                task = asyncio.ensure_future(self._answer(writer, lock, caller, msg, opened))
                running.add(task)
                task.add_done_callback(running.discard)
        finally:
            for task in running:
                task.cancel()

    async def _answer(self, writer: asyncio.StreamWriter, lock: asyncio.Lock, caller: Caller, msg: dict,
                      opened: set[str]) -> None:
        rid, op, args = msg.get("id"), msg.get("op"), msg.get("args") or {}
        reply: dict[str, Any] = {"id": rid}
        if not isinstance(op, str) or not isinstance(args, dict):
            reply["error"] = "a request needs an op (a string) and args (an object)"
        else:
            try:
                result = await self.operations.call(caller, op, args)
                if isinstance(result, dict) and REFUSAL in result:
                    reply["refusal"] = result[REFUSAL]
                else:
                    reply["result"] = result
                    if op in ("acquire", "session_open") and isinstance(result, dict) and result.get("session_id"):
                        opened.add(result["session_id"])
            except MeshError as exc:
                logger.info("%s refused: %s: %s (%s)", op, type(exc).__name__, exc, caller.describe())
                reply["refusal"] = to_refusal(exc)
            except TypeError as exc:  # arguments the operation does not take
                reply["refusal"] = to_refusal(MeshError(f"bad arguments for {op}: {exc}"))
            except Exception as exc:
                logger.exception("user port: %s by %s failed", op, caller.describe())
                reply["error"] = f"the scheduler failed on {op}: {type(exc).__name__}: {exc}"
        async with lock:
            with contextlib.suppress(Exception):
                await write_message(writer, reply)


def server_ssl_context(scheduler) -> ssl.SSLContext | None:
    """TLS for the user port from the scheduler's own certificate, when the mesh has one (Dask TLS). Users present a
    key, not a certificate: the context asks for none."""
    sec = getattr(scheduler, "security", None)
    cert = getattr(sec, "tls_scheduler_cert", None) or getattr(sec, "tls_cert", None)
    key = getattr(sec, "tls_scheduler_key", None) or getattr(sec, "tls_key", None)
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx

