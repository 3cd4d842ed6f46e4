# SPDX-License-Identifier: AGPL-3.0-or-later
"""The relay in the client's engine (:class:`ClientRelay`): a loopback endpoint for llama.cpp, tunnelled over TLS."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import ssl
import struct
import threading
import time

from sharedllm import settings
from sharedllm.relay.certs import client_context, normalize_fingerprint
from sharedllm.relay.server import Acceptor
from sharedllm.relay.tokens import RelayError, TokenError
from sharedllm.relay.wire import (
    KIND_CONNECT,
    KIND_PROBE,
    STATUS_OK,
    close_sockets,
    join_endpoint,
    parse_endpoint,
    recv_frame,
    send_frame,
    splice,
    tune_socket,
)

logger = logging.getLogger("sharedllm.relay")  # one name for the package, and when run as python -m sharedllm.relay

_TOKEN_REASONS = ("malformed", "bad MAC", "wrong machine", "expired", "lease mismatch")


def _refusal(reason: bytes, who: str) -> TokenError | RelayError:
    """The error for a refusal frame from ``who`` (a relay, a hub): a refused token, or another reason."""
    text = reason.decode(errors="replace")
    head, _, detail = text.partition(": ")
    if head in _TOKEN_REASONS:
        return TokenError(head, f"{who}: {detail}")
    return RelayError(f"{who} refused the connection: {text}")



class ClientRelay(Acceptor):
    """A loopback endpoint for llama.cpp that tunnels each connection to a remote :class:`ServerRelay`.

    Give exactly one way to check the server: ``fingerprint`` (``sha256:HEX`` of its certificate, recommended) or
    ``cafile`` (then the certificate must name the remote host, or ``server_hostname``). ``token`` is the lease token
    for that machine; :meth:`set_token` replaces it for later connections. ``endpoint`` is what llama.cpp connects to.

    ``hub``: ``{"endpoint": "HOST:PORT", "token": ..., "machine": ...}`` when the machine is registered at a relay hub
    (:mod:`sharedllm.relay.hub`). A ``remote`` of ``hub/MACHINE`` (a machine that accepts no inbound connection) or
    ``via_hub=True`` goes through the hub at once; otherwise the hub is the fallback once the remote is unreachable.
    Either way TLS runs end to end with the machine's relay, as on a direct connection.

    ``cpu_devices``: the indices of the machine's rpc-server devices that are CPUs; the relay answers llama.cpp's
    allocation-size questions about them itself (see :mod:`sharedllm.relay.rpc`), with prefetching on.
    """

    _what = "relay client"

    def __init__(self, remote: str, token: str, *, fingerprint: str | None = None,
                 cafile: str | os.PathLike | None = None, server_hostname: str | None = None,
                 connect_timeout: float = 10.0, listen_host: str = "127.0.0.1", hub: dict | None = None,
                 via_hub: bool = False, coalesce: bool | None = None, prefetch: bool | None = None,
                 cpu_devices: frozenset[int] | set[int] = frozenset()):
        from sharedllm.relay.hub import VIA_HUB_PREFIX

        if (fingerprint is None) == (cafile is None):
            raise ValueError("ClientRelay needs exactly one of fingerprint= (pinned certificate) or cafile=")
        super().__init__()
        # The local side speaks llama.cpp's RPC: one TLS burst per round trip (rpc.RpcFrames), and the tensor fetches
        # that recur at every step asked for early (rpc.Prefetch). Off with SHAREDLLM_RELAY_COALESCE=0 and
        # SHAREDLLM_RELAY_PREFETCH=0: to compare, or should a llama.cpp release break the relay's reading of it.
        self.coalesce = coalesce if coalesce is not None else settings.flag("relay.coalesce")
        self.prefetch = prefetch if prefetch is not None else settings.flag("relay.prefetch")
        # Allocation sizes answered here for the CPU devices (rpc.cpu_alloc_size); SHAREDLLM_RELAY_ALLOC_SIZES=0: asked.
        answer = settings.flag("relay.alloc-sizes")
        self.cpu_devices = frozenset(cpu_devices) if answer else frozenset()
        self._via = remote if remote.startswith(VIA_HUB_PREFIX) else None
        if (self._via or via_hub) and not hub:
            raise ValueError(f"machine {remote} is reached through a relay hub only, and no hub was given")
        self.remote = None if self._via else parse_endpoint(remote)
        self.hub = dict(hub) if hub else None
        self.via_hub = bool(self._via or via_hub)
        self._pin = normalize_fingerprint(fingerprint) if fingerprint else None
        self._ctx = client_context(cafile)
        self._sni = server_hostname or (self.remote[0] if self.remote else "sharedllm-relay")
        self.token = token
        self.connect_timeout = connect_timeout
        self.listen_host = listen_host
        self.last_error: str | None = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:PORT``: give this to llama.cpp (``ggml_backend_rpc_add_server``) instead of the remote."""
        return f"{self.listen_host}:{self.port}"

    @property
    def remote_endpoint(self) -> str:
        if self.remote is None:
            return self._via
        return join_endpoint(*self.remote)

    def _dial(self) -> tuple[socket.socket, str]:
        """A TCP connection that leads to the machine's relay, directly or through its hub; and how, for messages."""
        where = self.remote_endpoint
        if not self.via_hub:
            try:
                return socket.create_connection(self.remote, timeout=self.connect_timeout), where
            except OSError as exc:
                if self.hub is None:
                    raise RelayError(f"relay {where} is unreachable ({exc}); is the machine's relay running?") from exc
                logger.warning("relay %s is unreachable (%s); reaching machine %s through hub %s from now on", where,
                               exc, self.hub.get("machine"), self.hub["endpoint"])
                self.via_hub = True
        return self._dial_hub()

    def _dial_hub(self) -> tuple[socket.socket, str]:
        from sharedllm.relay.hub import KIND_CONNECT

        hub, machine = self.hub["endpoint"], self.hub["machine"]
        where = f"machine {machine} through hub {hub}"
        try:
            raw = socket.create_connection(parse_endpoint(hub), timeout=self.connect_timeout)
        except OSError as exc:
            raise RelayError(f"relay hub {hub} is unreachable ({exc}); is the scheduler's hub running?") from exc
        try:
            tune_socket(raw)
            send_frame(raw, KIND_CONNECT, json.dumps({"machine": machine, "token": self.hub["token"]}).encode())
            try:  # the hub answers once the machine has dialled back (its own open timeout is 10 s)
                status, reason = recv_frame(raw, time.monotonic() + self.connect_timeout + 5.0)
            except (OSError, ValueError, struct.error) as exc:
                raise RelayError(f"relay hub {hub} closed the handshake for machine {machine} ({exc})") from exc
            if status != STATUS_OK:
                raise _refusal(reason, f"relay hub {hub}")
            raw.settimeout(self.connect_timeout)
            return raw, where
        except BaseException:
            close_sockets(raw)
            raise

    def set_token(self, token: str) -> None:
        """Use ``token`` for the connections opened from now on."""
        self.token = token

    def open(self, kind: int = KIND_CONNECT) -> ssl.SSLSocket:
        """Open one authenticated TLS connection to the server relay, ready to carry RPC bytes.

        Raises :class:`RelayError` (unreachable, TLS, certificate mismatch) or :class:`TokenError` (refused token).
        """
        raw, where = self._dial()
        tune_socket(raw)
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            tls = self._ctx.wrap_socket(raw, server_hostname=self._sni)
        except (ssl.SSLError, OSError) as exc:
            close_sockets(raw)
            raise RelayError(f"TLS handshake with relay {where} failed ({exc})") from exc
        try:
            if self._pin is not None:
                got = hashlib.sha256(tls.getpeercert(binary_form=True) or b"").digest()
                if not hmac.compare_digest(got, self._pin):
                    raise RelayError(f"relay {where} presented certificate sha256:{got.hex()}, expected "
                                     f"sha256:{self._pin.hex()}; refusing to send the token (wrong machine?)")
            send_frame(tls, kind, self.token.encode("ascii"))
            try:
                status, reason = recv_frame(tls, time.monotonic() + self.connect_timeout)
            except (OSError, ValueError, struct.error) as exc:
                raise RelayError(f"relay {where} closed the handshake ({exc})") from exc
            if status != STATUS_OK:
                raise _refusal(reason, f"relay {where}")
            return tls
        except BaseException:
            close_sockets(tls)
            raise

    def check(self) -> dict[str, str]:
        """Prove the token and the certificate without touching the rpc-server (a probe handshake).

        Call it before handing :attr:`endpoint` to llama.cpp, which aborts the process when a connection fails.
        Returns the TLS version and cipher agreed; raises like :meth:`open`.
        """
        tls = self.open(KIND_PROBE)
        try:
            cipher = tls.cipher()
            return {"tls": tls.version() or "", "cipher": cipher[0] if cipher else ""}
        finally:
            close_sockets(tls)

    def start(self) -> ClientRelay:
        """Listen on loopback and tunnel every accepted connection; returns when listening."""
        self._listen(socket.create_server((self.listen_host, 0), backlog=16), "relay-client")
        logger.info("relay client on %s tunnels to %s", self.endpoint, self.remote_endpoint)
        return self

    def _accepted(self, conn: socket.socket, addr: tuple) -> None:
        threading.Thread(target=self._serve, args=(conn,), name=f"relay-tunnel-{self.port}", daemon=True).start()

    def _serve(self, local: socket.socket) -> None:
        cid = self._conns.add(local)
        tls = None
        try:
            tune_socket(local)
            try:
                tls = self.open()
            except (RelayError, TokenError) as exc:
                self.last_error = str(exc)
                logger.error("%s", exc)
                return
            self._conns.attach(cid, tls)
            if self._stopping.is_set():
                return
            splice(local, tls, coalesce=self.coalesce, prefetch=self.prefetch, cpu_devices=self.cpu_devices)
        except Exception:
            logger.exception("relay tunnel to %s failed", self.remote_endpoint)
        finally:
            close_sockets(tls, local)
            self._conns.remove(cid)
