# SPDX-License-Identifier: AGPL-3.0-or-later
"""An authenticated, encrypted tunnel in front of llama.cpp's rpc-server. No Dask.

llama.cpp's RPC protocol has neither authentication nor encryption, so an rpc-server binds to loopback only and is
reached through two relays::

    llama.cpp ──plain, loopback──▶ ClientRelay ══TLS + lease token══▶ ServerRelay ──plain, loopback──▶ rpc-server
    (engine)                       127.0.0.1:P   (client machine)       host:port      (server machine)  127.0.0.1:R

- **Tokens.** The scheduler mints one token per (lease, machine): ``HMAC-SHA256`` over version, lease id, machine id
  and expiry (:func:`mint_token`). Each machine verifies with its own relay key (:func:`machine_key`, derived from a
  scheduler-held master key), so a machine can neither verify nor forge tokens for another machine.
- **Handshake.** On every new connection the server relay completes TLS, then reads one frame carrying the token
  (``SLR1`` magic, a kind byte, a 16-bit length, the token) within ``handshake_timeout`` seconds. It checks the MAC,
  the machine, the expiry and ``allowed(lease_id)`` (the machine's *current* lease: a still-valid token of an ended
  lease is refused). Only then does it connect to the rpc-server; on failure it logs ``refused relay connection from
  ADDR: REASON`` and closes, and the rpc-server never sees the connection. A raw TCP client fails the TLS handshake.
- **Server identity.** The client relay authenticates the server relay by a pinned SHA-256 fingerprint of its
  certificate (:func:`cert_fingerprint`), which the machine reports to the scheduler and the scheduler hands out with
  the lease; no CA is needed for a community mesh of self-signed machines. A CA file with hostname checking is
  supported too (``cafile=``). The token is sent only after the server has been verified.
- **Speed.** llama.cpp makes several small request/response round trips per token, so the relays are built for
  latency: one thread per connection that moves bytes in both directions with non-blocking sockets and ``poll``
  (an ``SSLSocket`` must not be read and written from two threads at once), ``TCP_NODELAY`` on every socket, and
  buffers that coalesce several TLS records into one write. ``bench/bench_tunnel.py`` measures the cost. The client
  relay reads llama.cpp's RPC framing (:mod:`~sharedllm.relay.rpc`): it sends a step's requests as one burst, and it
  asks for the tensor fetch that always follows another one right behind it, so the handover of a stage's outputs to
  the next stage costs one round trip, not one per tensor (``SHAREDLLM_RELAY_PREFETCH=0`` turns that off).

``--insecure-direct-rpc`` (:func:`warn_insecure_direct`) skips the tunnel on a trusted LAN; it warns at every start.

Command line, for debugging and for running a relay as its own process::

    python -m sharedllm.relay keygen DIR                       # CA + certificate + key for tests and local meshes
    python -m sharedllm.relay server --listen 0.0.0.0:50100 --target 127.0.0.1:50052 --cert C --key K \\
        --machine-id M --key-file F [--lease ID] [--control-stdin]   # stdin "lease ID" / "lease" change the lease
    python -m sharedllm.relay client --remote HOST:50100 --fingerprint sha256:... --token-file T
    python -m sharedllm.relay mint --key-file F --lease L --machine-id M --ttl 3600

Modules: :mod:`~sharedllm.relay.tokens` (lease tokens), :mod:`~sharedllm.relay.certs` (certificates, TLS contexts),
:mod:`~sharedllm.relay.wire` (endpoints, frames, splice), :mod:`~sharedllm.relay.rpc` (llama.cpp's RPC framing:
coalescing and prefetching), :mod:`~sharedllm.relay.server` (``ServerRelay``),
:mod:`~sharedllm.relay.client` (``ClientRelay``), :mod:`~sharedllm.relay.cli` (the command line).
"""

from sharedllm.relay.certs import (
    INSECURE_DIRECT_FLAG,
    cert_fingerprint,
    client_context,
    make_self_signed,
    server_context,
    warn_insecure_direct,
)
from sharedllm.relay.cli import READY_PREFIX, main
from sharedllm.relay.client import ClientRelay
from sharedllm.relay.server import HANDSHAKE_TIMEOUT, ServerRelay
from sharedllm.relay.tokens import (
    MAX_TOKEN_BYTES,
    TOKEN_VERSION,
    RelayError,
    TokenError,
    b64url_decode,
    b64url_encode,
    machine_key,
    mint_token,
    verify_token,
)
from sharedllm.relay.wire import FRAME, MAGIC, join_endpoint, parse_endpoint, recv_frame, send_frame, splice

__all__ = [
    "FRAME",
    "HANDSHAKE_TIMEOUT",
    "INSECURE_DIRECT_FLAG",
    "MAGIC",
    "MAX_TOKEN_BYTES",
    "READY_PREFIX",
    "TOKEN_VERSION",
    "ClientRelay",
    "RelayError",
    "ServerRelay",
    "TokenError",
    "b64url_decode",
    "b64url_encode",
    "cert_fingerprint",
    "client_context",
    "join_endpoint",
    "machine_key",
    "main",
    "make_self_signed",
    "mint_token",
    "parse_endpoint",
    "recv_frame",
    "send_frame",
    "server_context",
    "splice",
    "verify_token",
    "warn_insecure_direct",
]
