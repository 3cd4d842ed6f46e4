# SPDX-License-Identifier: AGPL-3.0-or-later
"""The user's way to the scheduler: a connection to its user port (:mod:`sharedllm.userwire`) that proves the user's
key, carries SharedLLM's operations and nothing else, and reconnects by itself when the scheduler restarts.

    mesh = sharedllm.Mesh("scheduler-host:8789", key="slk_...")     # or SHAREDLLM_KEY / SHAREDLLM_KEY_FILE

The connection lives on an event loop of its own, in a thread (as a Dask client's does): blocking calls wait for it
from the caller's thread, asyncio calls await it from theirs.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import secrets
import ssl
import threading
import time
import weakref
from typing import Any

from sharedllm import effects, security
from sharedllm.client.control import Control
from sharedllm.effects import Core
from sharedllm.errors import AuthenticationFailed, SchedulerUnreachable, from_refusal
from sharedllm.userwire import PROTOCOL, WireError, read_message, write_message

logger = logging.getLogger("sharedllm.client")

DEFAULT_PORT = 8789


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``sharedllm://HOST:PORT``, ``[v6]:PORT``; the port defaults to 8789) as a pair."""
    text = address.removeprefix("sharedllm://").strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    if not host:
        raise ValueError(f"a user port address is HOST:PORT, got {address!r}")
    try:
        return host, int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"a user port address is HOST:PORT, got {address!r}") from None


class UserControl(Control):
    """A :class:`~sharedllm.client.control.Control` over the scheduler's user port (see the module's docstring).

    ``key``: the user's key (else ``SHAREDLLM_KEY``/``SHAREDLLM_KEY_FILE``; without any, an anonymous connection, which
    only a mesh that allows anonymous users takes). ``tls_ca_file``: the mesh's CA, for a mesh with certificates
    (``tls=True`` trusts the system's CAs instead)."""

    RECONNECT_MAX = 5.0  # seconds between attempts to connect again, at most

    def __init__(self, address: str, key: str | None = None, *, key_file: str | None = None,
                 tls_ca_file: str | None = None, tls: bool = False, timeout: float = 30.0,
                 connect_timeout: float = 10.0):
        self.host, self.port = split_address(address)
        self.address = f"{self.host}:{self.port}"
        self.key = security.load_user_key(key, key_file)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ssl = None
        if tls_ca_file or tls:
            self._ssl = ssl.create_default_context(cafile=tls_ca_file)
        self.user: str | None = None
        self.role: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"sharedllm-{self.address}", daemon=True)
        self._thread.start()
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._connected = threading.Event()
        self._closed = False
        self._refused: AuthenticationFailed | None = None  # the key the scheduler refused at the last reconnect
        self._keeper: asyncio.Future | None = None
        self._lost: asyncio.Event | None = None
        try:
            asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(connect_timeout + 5)
        except BaseException:
            self.close()
            raise
        self._keeper = asyncio.run_coroutine_threadsafe(self._keep_connected(), self._loop)
        _OPEN.add(self)

    # --- Control -------------------------------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    @property
    def identity(self) -> str:
        return self.user or ""

    def reachable(self) -> bool:
        return self._connected.is_set() and not self._closed

    def scheduler_host(self) -> str:
        return self.host

    def _reconnecting(self) -> Core[None]:
        """While the connection is down (the scheduler restarting), a call waits for it to come back, up to the
        call timeout, as a Dask client's calls do; a key the scheduler refused since fails the call at once."""
        if not self._connected.is_set() and not self._closed:
            yield effects.in_thread(self._await_connection, self.timeout)
            if self._refused is not None and not self._connected.is_set():
                raise self._refused

    def _await_connection(self, timeout: float) -> None:
        """Until the connection is back, the key is refused, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.1) and self._refused is None and time.monotonic() < deadline:
            pass

    async def _send(self, op: str, timeout: float, kwargs: dict) -> Any:
        if not self._connected.is_set() or self._writer is None:
            raise ConnectionError(f"not connected to the scheduler at {self.address} (reconnecting)")
        rid = next(self._ids)
        done = self._loop.create_future()
        self._pending[rid] = done
        try:
            await write_message(self._writer, {"id": rid, "op": op, "args": kwargs})
            return await asyncio.wait_for(done, timeout)
        finally:
            self._pending.pop(rid, None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected.clear()

        async def shut() -> None:
            # Every task of this connection's own loop (the keeper, the reply reader): none left pending
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            if self._writer is not None:
                self._writer.close()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    @staticmethod
    def close_all() -> None:
        """Close every connection still open (at exit: a script that never closed its ``Mesh`` leaves no task of
        its connection pending)."""
        for control in list(_OPEN):
            with contextlib.suppress(Exception):
                control.close()

    # --- the connection ------------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        """Connect and authenticate; ``SchedulerUnreachable`` when nothing answers, ``AuthenticationFailed`` when
        the key is refused (or the scheduler cannot prove it knows it)."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self._ssl,
                                        server_hostname=self.host if self._ssl else None, limit=1 << 16),
                self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise SchedulerUnreachable(
                f"cannot reach the scheduler's user port at {self.address} ({type(exc).__name__}: {exc}); check the "
                "address (the scheduler logs 'SharedLLM user port on HOST:PORT') and that it runs"
            ) from exc
        except ssl.SSLError as exc:
            raise SchedulerUnreachable(f"TLS with the scheduler at {self.address} failed ({exc}); give the mesh's CA "
                                       "(tls_ca_file=, --tls-ca-file)") from exc
        try:
            await asyncio.wait_for(self._handshake(reader, writer), self.connect_timeout)
        except (WireError, OSError, asyncio.TimeoutError) as exc:
            writer.close()
            tls = "" if self._ssl else " (if the mesh uses TLS, give its CA: tls_ca_file=, --tls-ca-file)"
            raise SchedulerUnreachable(f"the scheduler at {self.address} broke off the handshake "
                                       f"({exc or type(exc).__name__}); is it a SharedLLM user port of this "
                                       f"release?{tls}") from exc
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        if self._lost is None:
            self._lost = asyncio.Event()
        self._lost.clear()
        self._connected.set()
        self._loop.create_task(self._read_replies(reader, writer))

    async def _handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = await read_message(reader)
        if "error" in hello:
            raise from_refusal(hello["error"])
        if hello.get("sharedllm") != PROTOCOL or not isinstance(hello.get("nonce"), str):
            raise WireError(f"not a SharedLLM user port of protocol {PROTOCOL}: {str(hello)[:100]}")
        if self.key is None:
            await write_message(writer, {"anonymous": True})
            message = None
        else:
            key_id, _ = security.parse_user_key(self.key)
            nonce = secrets.token_hex(16)
            message = security.auth_message("user-port", key_id, nonce, hello["nonce"])
            await write_message(writer, {"key_id": key_id, "nonce": nonce,
                                         "proof": security.user_proof(self.key, message)})
        answer = await read_message(reader)
        if "error" in answer:
            err = from_refusal(answer["error"])
            raise err if isinstance(err, AuthenticationFailed) else AuthenticationFailed(str(err))
        if message is not None and not security.check_server_signature(self.key, message,
                                                                       answer.get("signature", "")):
            raise AuthenticationFailed(f"the scheduler at {self.address} could not prove it knows this key: it is not "
                                       "the mesh that issued it (or an impostor); check the address")
        self.user, self.role = answer.get("user"), answer.get("role")
        logger.debug("connected to %s as %s (%s)", self.address, self.user, self.role)

    async def _read_replies(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                msg = await read_message(reader)
                if "id" not in msg and "error" in msg:  # the scheduler ends the connection, saying why
                    logger.warning("the scheduler at %s closed the connection: %s", self.address,
                                   (msg["error"].get("args") or ["?"])[0])
                    return
                done = self._pending.get(msg.get("id"))
                if done is None or done.done():
                    continue
                if "result" in msg:
                    done.set_result(msg["result"])
                elif "refusal" in msg:
                    done.set_exception(from_refusal(msg["refusal"]))
                else:
                    done.set_exception(RuntimeError(msg.get("error") or "the scheduler failed"))
        except (WireError, OSError):
            pass
        finally:
            if self._writer is writer:
                self._connected.clear()
                self._writer = None
                self._lost.set()
            writer.close()
            for done in list(self._pending.values()):
                if not done.done():
                    done.set_exception(ConnectionError(f"the connection to the scheduler at {self.address} was lost"))

    async def _keep_connected(self) -> None:
        """Connect again whenever the connection is lost (the scheduler restarts), until closed."""
        delay = 0.2
        while not self._closed:
            if self._connected.is_set():
                delay = 0.2
                await self._lost.wait()
                continue
            try:
                await self._connect()
                self._refused = None
                logger.info("connected to the scheduler at %s again (as %s)", self.address, self.user)
            except AuthenticationFailed as exc:
                logger.error("the scheduler at %s refuses this key now: %s", self.address, exc)
                self._refused = exc
                await asyncio.sleep(self.RECONNECT_MAX)
            except Exception as exc:
                logger.debug("reconnecting to %s: %s", self.address, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.RECONNECT_MAX)

    def wait_connected(self, timeout: float) -> bool:
        """Wait until the connection is up (after a loss); whether it is."""
        return self._connected.wait(timeout)


_OPEN: weakref.WeakSet[UserControl] = weakref.WeakSet()
atexit.register(UserControl.close_all)
