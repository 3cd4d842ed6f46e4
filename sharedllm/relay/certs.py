# SPDX-License-Identifier: AGPL-3.0-or-later
"""Certificates and TLS contexts of the relays: self-signed machine certificates, pinned by fingerprint."""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from pathlib import Path

logger = logging.getLogger("sharedllm.relay")  # one name for the package, and when run as python -m sharedllm.relay

INSECURE_DIRECT_FLAG = "--insecure-direct-rpc"


def make_self_signed(directory: str | os.PathLike, hosts: list[str] | None = None,
                     days: int = 365) -> tuple[str, str, str]:
    """Write a small CA and a relay certificate signed by it into ``directory``; return ``(cert, key, ca)`` paths.

    The certificate names 127.0.0.1 and localhost (plus ``hosts``: IP addresses or DNS names). For tests and local
    meshes; real machines pin each other's fingerprints (:func:`cert_fingerprint`) and need no CA at all.
    Requires the ``cryptography`` package.
    """
    from sharedllm.tls import write_ca_and_cert

    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("make_self_signed needs the 'cryptography' package; pip install cryptography") from exc
    return write_ca_and_cert(directory, ca_name="sharedllm relay test CA", cert_name="sharedllm relay",
                             cert_file="relay.pem", key_file="relay-key.pem", hosts=hosts, days=days)


def cert_fingerprint(cert: str | os.PathLike | bytes) -> str:
    """``sha256:HEX`` of a certificate (a PEM file path, PEM bytes or DER bytes): what a client relay pins."""
    if isinstance(cert, bytes):
        data = cert
    else:
        data = Path(cert).read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        data = ssl.PEM_cert_to_DER_cert(data.decode("ascii"))
    return "sha256:" + hashlib.sha256(data).hexdigest()


def normalize_fingerprint(fp: str) -> bytes:
    text = fp.strip().lower()
    if text.startswith("sha256:"):
        text = text[7:]
    text = text.replace(":", "")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"certificate fingerprint {fp!r} is not sha256:<64 hex digits>; see cert_fingerprint()")
    return raw


def server_context(certfile: str | os.PathLike, keyfile: str | os.PathLike) -> ssl.SSLContext:
    """The server relay's TLS context: TLS 1.2 or newer, no client certificates (the token authenticates)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(certfile), str(keyfile))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load the relay certificate {certfile} / key {keyfile}: {exc}") from exc
    return ctx


def client_context(cafile: str | os.PathLike | None = None) -> ssl.SSLContext:
    """The client relay's TLS context: verifies against ``cafile`` with hostname checks, else (pinning) nothing here.

    With pinning the certificate is checked after the handshake against the fingerprint, before the token is sent.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cafile:
        ctx.load_verify_locations(cafile=str(cafile))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def warn_insecure_direct(where: str) -> None:
    """Log the warning that ``--insecure-direct-rpc`` must print at every start (worker, client, ``sharedllm up``)."""
    logger.warning(
        "%s: %s is set: llama.cpp RPC runs WITHOUT the relay (no authentication, no encryption). Anyone who can "
        "reach the rpc-server port can read the model and prompts and run code paths with known memory-safety "
        "bugs; use it only on a trusted LAN", where, INSECURE_DIRECT_FLAG)
