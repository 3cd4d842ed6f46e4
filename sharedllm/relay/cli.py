# SPDX-License-Identifier: AGPL-3.0-or-later
"""``python -m sharedllm.relay``: a relay as its own process (what a machine's supervisor starts), and tools."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

from sharedllm.dataplane import serve_control
from sharedllm.relay.certs import cert_fingerprint, make_self_signed
from sharedllm.relay.client import ClientRelay
from sharedllm.relay.server import ServerRelay
from sharedllm.relay.tokens import RelayError, TokenError, mint_token, read_key
from sharedllm.relay.wire import parse_endpoint

logger = logging.getLogger("sharedllm.relay")  # one name for the package, and when run as python -m sharedllm.relay

READY_PREFIX = "SHAREDLLM_RELAY "


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    # A supervisor killed with SIGKILL cannot stop us: stop with it (as the rpc-server does).
    while not stop.is_set():
        if os.getppid() != parent_pid:
            logger.warning("supervisor %d is gone; stopping the relay", parent_pid)
            stop.set()
            return
        time.sleep(0.5)


def _control(relay: ServerRelay, line: str) -> dict | None:
    """One control command: ``lease ID`` admits a lease, ``lease`` alone admits none (answered once in force),
    ``status`` says which lease is admitted. The answer, or None for an unknown command."""
    cmd, _, arg = line.strip().partition(" ")
    if cmd == "lease":
        relay.set_lease(arg.strip() or None)
        logger.info("relay now admits lease %s", arg.strip() or "(none)")
        return {"lease": arg.strip() or None}
    if cmd == "status":
        link = relay.hub_link
        hub = None if link is None else {"endpoint": link.endpoint, "connected": link.connected.is_set(),
                                         "error": link.last_error}
        return {"lease": relay.lease, "status": True, "hub": hub}
    if cmd:
        logger.warning("unknown relay control command %r (expected 'lease [ID]' or 'status')", cmd)
    return None


def _control_loop(relay: ServerRelay) -> None:
    # Commands on stdin, answers on stdout; EOF on stdin stops the relay (its supervisor is gone).
    for line in sys.stdin:
        if (answer := _control(relay, line)) is not None:
            print(READY_PREFIX + json.dumps(answer), flush=True)


def _write_ready(ready: dict, ready_file: str | None) -> None:
    if ready_file:
        from sharedllm.dataplane import write_json

        write_json(ready_file, ready)
    print(READY_PREFIX + json.dumps(ready), flush=True)


def _hub_main(args: argparse.Namespace, stop: threading.Event) -> int:
    from sharedllm.relay.hub import RelayHub

    host, port = parse_endpoint(args.listen)
    hub = RelayHub(host, port, read_key(args.key_file), max_connections_per_machine=args.max_connections_per_machine,
                   max_machines=args.max_machines,
                   max_bytes_per_s=args.max_mbit_per_machine * 1e6 / 8 if args.max_mbit_per_machine else None)
    hub.start()
    if args.control_socket:
        def answer(line: str) -> dict | None:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "revoke" and arg.strip():
                return {"revoked": arg.strip(), "closed": hub.revoke(arg.strip())}
            return hub.stats() if cmd == "status" else None

        serve_control(answer, args.control_socket, stop)
    _write_ready({"endpoint": hub.endpoint, "pid": os.getpid(), "control": args.control_socket}, args.ready_file)
    if args.alive_file:
        from sharedllm.dataplane import DEFAULT_ORPHAN_TIMEOUT, watch_alive_file

        watch_alive_file(args.alive_file, args.orphan_timeout or DEFAULT_ORPHAN_TIMEOUT, stop.set)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    hub.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharedllm.relay", description="A SharedLLM relay, or its tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server", help="TLS + token relay in front of a loopback rpc-server")
    s.add_argument("--listen", required=True, help="HOST:PORT to accept relay connections on (port 0: any)")
    s.add_argument("--target", required=True, help="the rpc-server, normally 127.0.0.1:PORT")
    s.add_argument("--cert", required=True)
    s.add_argument("--key", required=True)
    s.add_argument("--machine-id", required=True)
    s.add_argument("--key-file", required=True, help="file holding this machine's relay key (hex or text)")
    s.add_argument("--lease", default=None, help="lease admitted at start (default: none until told)")
    s.add_argument("--control-stdin", action="store_true",
                   help="read 'lease ID' / 'lease' lines on stdin to change the lease; stop at end of input")
    s.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the supervisor) dies")
    s.add_argument("--control-socket", default=None, help="Unix socket for the same commands (a new supervisor)")
    s.add_argument("--ready-file", default=None, help="write the ready JSON here too (for a supervisor to adopt us)")
    s.add_argument("--alive-file", default=None,
                   help="stop when no supervisor has touched this file for --orphan-timeout seconds")
    s.add_argument("--orphan-timeout", type=float, default=None, help="seconds (default: 900)")
    s.add_argument("--hub", default=None, help="HOST:PORT of a relay hub to register at (machines behind NAT)")
    s.add_argument("--hub-key-file", default=None, help="file holding this machine's hub credential (hex)")
    s.add_argument("--no-inbound", action="store_true",
                   help="listen on no port: clients reach this machine through --hub only")
    h = sub.add_parser("hub", help="a relay hub: machines behind NAT dial out to it, clients reach them through it")
    h.add_argument("--listen", required=True, help="HOST:PORT to accept machines and clients on (port 0: any)")
    h.add_argument("--key-file", required=True, help="file holding the hub's key (hex or text, 16 bytes or more)")
    h.add_argument("--max-connections-per-machine", type=int, default=32)
    h.add_argument("--max-machines", type=int, default=10_000)
    h.add_argument("--max-mbit-per-machine", type=float, default=None, help="bandwidth cap, both ways together")
    h.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the scheduler) dies")
    h.add_argument("--control-socket", default=None, help="Unix socket answering 'status' with the hub's figures")
    h.add_argument("--ready-file", default=None, help="write the ready JSON here too")
    h.add_argument("--alive-file", default=None,
                   help="stop when no scheduler has touched this file for --orphan-timeout seconds")
    h.add_argument("--orphan-timeout", type=float, default=None, help="seconds (default: 900)")
    c = sub.add_parser("client", help="loopback endpoint for llama.cpp, tunnelled to a server relay")
    c.add_argument("--remote", required=True, help="HOST:PORT of the server relay")
    c.add_argument("--token-file", required=True)
    group = c.add_mutually_exclusive_group(required=True)
    group.add_argument("--fingerprint", help="sha256:HEX of the server relay's certificate")
    group.add_argument("--cafile", help="CA certificate that signed the server relay's certificate")
    c.add_argument("--check", action="store_true", help="probe the token and certificate, then exit")
    c.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the engine) dies")
    k = sub.add_parser("keygen", help="write a test CA, certificate and key into a directory")
    k.add_argument("dir")
    k.add_argument("--host", action="append", default=[], help="extra IP or DNS name for the certificate")
    m = sub.add_parser("mint", help="mint a token (debugging; the scheduler does this)")
    m.add_argument("--key-file", required=True)
    m.add_argument("--lease", required=True)
    m.add_argument("--machine-id", required=True)
    m.add_argument("--ttl", type=float, default=3600.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)

    if args.cmd == "keygen":
        cert, key, ca = make_self_signed(args.dir, args.host)
        print(json.dumps({"cert": cert, "key": key, "ca": ca, "fingerprint": cert_fingerprint(cert)}))
        return 0
    if args.cmd == "mint":
        print(mint_token(read_key(args.key_file), args.lease, args.machine_id, args.ttl))
        return 0
    stop = threading.Event()
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid, stop), daemon=True).start()
    if args.cmd == "hub":
        return _hub_main(args, stop)
    if args.cmd == "server":
        host, port = parse_endpoint(args.listen)
        relay: ServerRelay | ClientRelay = ServerRelay(
            host, port, args.target, certfile=args.cert, keyfile=args.key, secret=read_key(args.key_file),
            machine_id=args.machine_id, hub=args.hub, inbound=not args.no_inbound,
            hub_credential=read_key(args.hub_key_file) if args.hub_key_file else None)
        relay.set_lease(args.lease)
        relay.start()
        ready = {"endpoint": relay.endpoint, "fingerprint": relay.fingerprint, "pid": os.getpid(),
                 "target": args.target, "control": args.control_socket, "python": sys.executable,
                 "hub": args.hub, "inbound": not args.no_inbound}
        if args.control_socket:
            serve_control(lambda line: _control(relay, line), args.control_socket, stop)
        _write_ready(ready, args.ready_file)
        if args.alive_file:
            from sharedllm.dataplane import DEFAULT_ORPHAN_TIMEOUT, watch_alive_file

            watch_alive_file(args.alive_file, args.orphan_timeout or DEFAULT_ORPHAN_TIMEOUT, stop.set)
        try:
            if args.control_stdin:
                threading.Thread(target=lambda: (_control_loop(relay), stop.set()), daemon=True).start()
            stop.wait()
        except KeyboardInterrupt:
            pass
        relay.stop()
        return 0
    relay = ClientRelay(args.remote, Path(args.token_file).read_text().strip(), fingerprint=args.fingerprint,
                        cafile=args.cafile)
    if args.check:
        try:
            relay.check()
        except (RelayError, TokenError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print("ok")
        return 0
    relay.start()
    print(READY_PREFIX + json.dumps({"endpoint": relay.endpoint, "pid": os.getpid()}), flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    relay.stop()
    return 0

