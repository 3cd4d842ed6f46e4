# SPDX-License-Identifier: AGPL-3.0-or-later
"""The process that serves one machine's devices over llama.cpp's RPC protocol.

    python -m sharedllm.rpc_server --host 127.0.0.1 --port 50052 --threads 8 --device CPU --cache-dir DIR

llama-cpp-python ships no rpc-server executable; calling ``ggml_backend_rpc_start_server`` through ctypes makes this
small process one. It prints one machine-readable line, ``SHAREDLLM_RPC_SERVER {json}``, before it starts serving, so
a supervisor learns the endpoint and devices; readiness is then confirmed with a HELLO probe (``ggml.rpc_hello``).
With ``--ready-file`` it also writes that JSON to a file, and with ``--alive-file`` it serves on while its supervisor is
gone, until the file is ``--orphan-timeout`` seconds old (see ``sharedllm.dataplane``): a new supervisor adopts it.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
import threading
import time

logger = logging.getLogger("sharedllm.rpc_server")

READY_PREFIX = "SHAREDLLM_RPC_SERVER "
EXIT_PORT_IN_USE = 3
EXIT_BAD_ARGS = 2
EXIT_SERVER_FAILED = 4


def free_port(host: str) -> int:
    """Ask the kernel for a free TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Raise ``OSError`` with a clear message when ``host:port`` cannot be bound (taken, or not our address)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"port {port} on {host} is already in use; pick another with --port") from exc
            raise OSError(exc.errno, f"cannot listen on {host}:{port} ({exc.strerror}); check --host") from exc


def _watch_parent(parent_pid: int) -> None:
    # The RPC server loop never returns, and a supervisor killed with SIGKILL cannot stop us: exit with the parent.
    while True:
        if os.getppid() != parent_pid:
            logger.warning("supervisor %d is gone; stopping the rpc-server", parent_pid)
            os._exit(0)
        time.sleep(0.5)


def _stderr_offset() -> int:
    """Where this process's lines start in its log (stderr appends to a file shared with earlier runs)."""
    try:
        return os.fstat(2).st_size
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharedllm.rpc_server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50052, help="TCP port; 0 picks a free one (default 50052)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all cores)")
    p.add_argument(
        "--device", action="append", default=None, help="device to serve, repeatable (default: every GPU, else CPU)"
    )
    p.add_argument("--cache-dir", default=None, help="tensor cache directory (skips re-sending large weights)")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the supervisor) dies")
    p.add_argument("--ready-file", default=None, help="write the ready JSON here too (for a supervisor to adopt us)")
    p.add_argument("--alive-file", default=None,
                   help="exit when no supervisor has touched this file for --orphan-timeout seconds")
    p.add_argument("--orphan-timeout", type=float, default=None, help="seconds (default: 900)")
    p.add_argument("--list-devices", action="store_true", help="print this machine's devices as JSON and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)

    from sharedllm import ggml

    if not ggml.supports_rpc():
        logger.error("llama-cpp-python was built without RPC; rebuild it with scripts/setup.sh")
        return EXIT_BAD_ARGS
    devices = ggml.local_devices()
    if args.list_devices:
        print(json.dumps([d.to_dict() for d in devices]))
        return 0
    if args.threads < 1:
        logger.error("--threads must be at least 1, got %d", args.threads)
        return EXIT_BAD_ARGS
    names = args.device or ggml.default_server_devices(devices)
    unknown = [n for n in names if n not in {d.name for d in devices}]
    if unknown:
        logger.error("unknown device %s; this machine has %s", ", ".join(unknown), ", ".join(d.name for d in devices))
        return EXIT_BAD_ARGS
    port = args.port or free_port(args.host)
    try:
        check_port(args.host, port)
    except OSError as exc:
        logger.error("%s", exc.strerror)
        return EXIT_PORT_IN_USE
    if args.cache_dir:
        os.makedirs(args.cache_dir, exist_ok=True)
    endpoint = f"{args.host}:{port}"  # llama.cpp parses HOST:PORT at the first colon, so IPv4 or names only
    served = [d for d in devices if d.name in names]
    for d in served:
        logger.info("serving %s: %s (%d MiB, %d MiB free)", d.name, d.description, d.memory_total >> 20,
                    d.memory_free >> 20)
    logger.info("rpc-server listening on %s with %d threads, cache %s", endpoint, args.threads, args.cache_dir or "off")
    ready = {"endpoint": endpoint, "pid": os.getpid(), "threads": args.threads,
             "devices": [d.to_dict() for d in served], "log_offset": _stderr_offset(), "python": sys.executable}
    if args.ready_file:
        from sharedllm.dataplane import write_json

        write_json(args.ready_file, ready)
    print(READY_PREFIX + json.dumps(ready), flush=True)
    if args.parent_pid:
        threading.Thread(target=_watch_parent, args=(args.parent_pid,), daemon=True).start()
    if args.alive_file:
        from sharedllm.dataplane import DEFAULT_ORPHAN_TIMEOUT, watch_alive_file

        watch_alive_file(args.alive_file, args.orphan_timeout or DEFAULT_ORPHAN_TIMEOUT, lambda: os._exit(0))
    ggml.start_server(endpoint, names, args.threads, args.cache_dir)
    # start_server only returns when it could not serve (socket creation or backend init failed).
    logger.error("rpc-server on %s stopped: llama.cpp could not create the server socket or a device backend", endpoint)
    return EXIT_SERVER_FAILED


if __name__ == "__main__":
    sys.exit(main())
