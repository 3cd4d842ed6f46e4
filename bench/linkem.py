# SPDX-License-Identifier: AGPL-3.0-or-later
"""A link emulator: a local TCP proxy that adds latency and a bandwidth cap, in user space (no root, no netem).

    with LinkEmulator("127.0.0.1:50052", rtt_ms=20, mbit=100) as link:
        ...  # connect to link.endpoint instead of 127.0.0.1:50052
        link.stats()  # bytes, chunks, turns and round trips so far

Each direction of each connection is a one-way link: a chunk read at time t leaves at
``max(t, link free) + size / rate + rtt / 2``, in order. It is how the benchmarks put a real link (a home's uplink, a
LAN across a building) between the engine and a loopback machine: the engine starts one per machine through its
tunnel hook (``mesh.load(..., tunnel_hook=linkem.hook(rtt_ms=20))``: :func:`emulate` runs in the engine process, in
front of each machine's tunnel). A benchmark tool, not part of the library.

**Counting.** The emulator counts what crosses it, per direction (0: to the target, 1: back): ``bytes`` and
``chunks`` (reads), ``turns`` (changes of direction within a connection) and ``round_trips`` (a burst to the target
followed by a burst back: with llama.cpp's request/response RPC, the synchronous round trips a client waits for).

**Its own process.** ``process=True`` runs the emulation in a child (``python -m bench.linkem``), so that its
threads do not compete for the GIL with the process whose traffic it carries; :meth:`LinkEmulator.stats` and
:meth:`LinkEmulator.set` then go through the child's stdin. ``control_dir=DIR`` also makes each emulator listen for the
same commands on a Unix socket ``DIR/linkem-PID.sock`` (:class:`LinkControl`), for a benchmark to reach the emulators an
engine started. ``relay=``: a :class:`sharedllm.relay.ClientRelay` of this process (the engine's tunnel to a machine,
whose endpoint is ``target``); the emulated link goes between that relay and its server relay, where a real network
is (the TLS bytes), and :attr:`endpoint` stays the relay's. Command line::

    python -m bench.linkem --target HOST:PORT [--rtt-ms 20] [--mbit 100] [--control-dir DIR]

prints ``SHAREDLLM_LINKEM {"endpoint": ..., "pid": ..., "control": ...}``, then answers JSON lines on stdin
(``{"op": "stats"}``, ``{"op": "set", "rtt_ms": 5, "mbit": 1000}``, ``{"op": "trace", "on": true}``,
``{"op": "info"}``) until stdin closes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CHUNK = 65536
READY_PREFIX = "SHAREDLLM_LINKEM "


class LinkEmulator:
    """Forward connections on ``endpoint`` to ``target`` over an emulated link (see the module's docstring)."""

    def __init__(self, target: str, rtt_ms: float = 0.0, mbit: float | None = None, *, process: bool = False,
                 control_dir: str | os.PathLike | None = None, relay: Any = None):
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"link emulator target must be HOST:PORT, got {target!r}")
        if rtt_ms < 0 or (mbit is not None and mbit < 0):
            raise ValueError(f"link emulator: rtt_ms and mbit must be >= 0, got {rtt_ms!r} and {mbit!r}")
        self.target = (host.strip("[]"), int(port))
        self.process, self.control_dir, self.wire = process, control_dir, relay
        self._set(rtt_ms, mbit)
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()  # the counters, updated from both directions of every connection
        self.bytes = [0, 0]  # forwarded to the target, back from it
        self.chunks = [0, 0]
        self.turns = 0
        self.round_trips = 0
        self.connections = 0
        self._trace: list[tuple] | None = None  # (time, connection, direction, bytes, "r" read / "s" sent) when on
        self._listener: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._proc_lock = threading.Lock()
        self._relay = None
        self.endpoint = ""
        self.pid = os.getpid()
        self.control: str | None = None

    @property
    def target_endpoint(self) -> str:
        host, port = self.target
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _set(self, rtt_ms: float, mbit: float | None) -> None:
        self.rtt_ms, self.mbit = float(rtt_ms), mbit or None
        self.one_way = max(self.rtt_ms, 0.0) / 2000.0
        self.bytes_per_s = mbit * 1e6 / 8 if mbit else None

    # --- life cycle ----------------------------------------------------------------------------------------------

    def start(self) -> LinkEmulator:
        """Listen (here or in the child); returns when :attr:`endpoint` accepts connections."""
        if self.wire is not None:
            self._relay = self.wire
            if not self._relay.remote:
                raise ValueError("link emulator: relay= needs a client relay that connects to its server relay "
                                 "itself (not through a hub)")
            self.target = tuple(self._relay.remote)  # emulate between the relay and its server relay
        if self.process:
            self._spawn()
        else:
            self._listener = socket.create_server(("127.0.0.1", 0))
            self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
            threading.Thread(target=self._accept, name="linkem-accept", daemon=True).start()
            if self.control_dir is not None:
                self.control = _serve_control(self, Path(self.control_dir), self._stop)
        if self._relay is not None:
            host, _, port = self.endpoint.rpartition(":")
            self._relay.remote = (host, int(port))
            self.endpoint = self._relay.endpoint
        return self

    def __enter__(self) -> LinkEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()  # the child exits at the end of its stdin
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for s in [self._listener, *self._socks]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        if self._proc is None and self.control:
            with contextlib.suppress(OSError):
                os.unlink(self.control)

    # --- control: the same commands here, in the child and on the control socket --------------------------------

    def stats(self) -> dict[str, Any]:
        """What crossed the link so far: ``bytes`` and ``chunks`` per direction (to the target, back), ``turns``,
        ``round_trips``, ``connections``; and the link's ``rtt_ms`` and ``mbit``."""
        if self._proc is not None:
            return self._ask({"op": "stats"})
        with self._lock:
            return {"bytes": list(self.bytes), "chunks": list(self.chunks), "turns": self.turns,
                    "round_trips": self.round_trips, "connections": self.connections, "rtt_ms": self.rtt_ms,
                    "mbit": self.mbit}

    def set(self, rtt_ms: float, mbit: float | None = None) -> dict[str, Any]:
        """Change the link for the chunks read from now on (those already on it keep their times); its stats."""
        if rtt_ms < 0 or (mbit is not None and mbit < 0):
            raise ValueError(f"link emulator: rtt_ms and mbit must be >= 0, got {rtt_ms!r} and {mbit!r}")
        if self._proc is not None:
            return self._ask({"op": "set", "rtt_ms": rtt_ms, "mbit": mbit})
        self._set(rtt_ms, mbit)
        return self.stats()

    def trace(self, on: bool) -> dict[str, Any]:
        """Start (``on``) or stop recording every chunk: ``{"events": [[time, connection, direction, bytes, kind],
        ...]}`` since the last call, ``kind`` "r" when the emulator read it, "s" when it passed it on; times are
        ``time.monotonic()`` (the same clock in every process of the machine)."""
        if self._proc is not None:
            return self._ask({"op": "trace", "on": on})
        with self._lock:
            events, self._trace = self._trace or [], ([] if on else None)
        return {"events": events}

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One control command (a decoded JSON line) and its answer."""
        op = msg.get("op")
        try:
            if op == "stats":
                return self.stats()
            if op == "set":
                return self.set(float(msg.get("rtt_ms", 0.0)), msg.get("mbit"))
            if op == "trace":
                return self.trace(bool(msg.get("on", False)))
            if op == "info":
                return {"endpoint": self.endpoint, "target": self.target_endpoint, "pid": self.pid,
                        "control": self.control}
        except (TypeError, ValueError) as exc:
            return {"error": str(exc)}
        return {"error": f"unknown op {op!r}; use stats, set, trace or info"}

    def _spawn(self) -> None:
        cmd = [sys.executable, "-m", "bench.linkem", "--target", self.target_endpoint,
               "--rtt-ms", repr(self.rtt_ms)]
        if self.mbit:
            cmd += ["--mbit", repr(self.mbit)]
        if self.control_dir is not None:
            cmd += ["--control-dir", str(self.control_dir)]
        # The child imports this module as bench.linkem from the repository, whatever the working directory.
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                      env=env)
        line = self._proc.stdout.readline()
        if not line.startswith(READY_PREFIX):
            self._proc.kill()
            self._proc.wait()
            raise RuntimeError(f"the link emulator process did not start (said {line.strip()!r})")
        info = json.loads(line[len(READY_PREFIX):])
        self.endpoint, self.pid, self.control = info["endpoint"], info["pid"], info["control"]

    def _ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self._proc_lock:
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise ConnectionError(f"the link emulator process {self.pid} is gone")
        answer = json.loads(line)
        if "error" in answer:
            raise ValueError(answer["error"])
        return answer

    # --- the emulation ---------------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError as exc:
                logger.warning("link emulator: cannot reach %s:%d: %s", *self.target, exc)
                client.close()
                continue
            server.settimeout(None)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [client, server]
            with self._lock:
                self.connections += 1
                conn = self.connections
            last = [-1]  # the direction of this connection's last chunk
            self._direction(client, server, 0, last, conn)
            self._direction(server, client, 1, last, conn)

    def _count(self, index: int, size: int, last: list[int], conn: int, now: float) -> None:
        with self._lock:
            if self._trace is not None and len(self._trace) < 1_000_000:
                self._trace.append((now, conn, index, size, "r"))
            self.bytes[index] += size
            self.chunks[index] += 1
            if last[0] != index:
                if last[0] >= 0:
                    self.turns += 1
                    if index == 1:
                        self.round_trips += 1
                last[0] = index

    def _sent(self, index: int, size: int, conn: int) -> None:
        if self._trace is not None:
            with self._lock:
                if self._trace is not None:
                    self._trace.append((time.monotonic(), conn, index, size, "s"))

    def _direction(self, src: socket.socket, dst: socket.socket, index: int, last: list[int], conn: int) -> None:
        """One way of one connection: a reader that stamps each chunk with when it arrives, a writer that sends it
        then. With no latency, a chunk that finds the line empty is sent by the reader itself (no hand-over)."""
        line: collections.deque[tuple[float, bytes]] = collections.deque()
        ready = threading.Condition()
        free_at = [0.0]  # when the emulated link has sent everything before
        busy = [False]  # the writer is sending a chunk it took from the line

        def read() -> None:
            try:
                while data := src.recv(_CHUNK):
                    now = time.monotonic()
                    rate, one_way = self.bytes_per_s, self.one_way
                    sent = max(now, free_at[0]) + (len(data) / rate if rate else 0.0)
                    free_at[0] = sent
                    self._count(index, len(data), last, conn, now)
                    with ready:
                        direct = one_way == 0.0 and not line and not busy[0]
                        if not direct:
                            line.append((sent + one_way, data))
                            ready.notify()
                    if direct:  # only this thread adds to the line, so nothing can overtake this chunk
                        if (wait := sent - time.monotonic()) > 0:
                            time.sleep(wait)
                        self._sent(index, len(data), conn)  # before: the peer may have it as soon as it is sent
                        dst.sendall(data)
            except OSError:
                pass
            with ready:
                line.append((0.0, b""))  # the end, after what came before it
                ready.notify()

        def write() -> None:
            try:
                while True:
                    with ready:
                        while not line:
                            ready.wait()
                        due, data = line.popleft()
                        busy[0] = True
                    if not data:
                        break
                    if (wait := due - time.monotonic()) > 0:
                        time.sleep(wait)
                    self._sent(index, len(data), conn)
                    dst.sendall(data)
                    with ready:
                        busy[0] = False
            except OSError:
                pass
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        threading.Thread(target=read, name="linkem-read", daemon=True).start()
        threading.Thread(target=write, name="linkem-write", daemon=True).start()


class LinkControl:
    """A client of one emulator's control socket (``control_dir=``): the same ``stats``/``set``/``info``."""

    def __init__(self, path: str | os.PathLike, timeout: float = 10.0):
        self.path = str(path)
        self.timeout = timeout

    @classmethod
    def find(cls, control_dir: str | os.PathLike) -> list[LinkControl]:
        """The emulators listening in ``control_dir`` now."""
        return [cls(p) for p in sorted(Path(control_dir).glob("linkem-*.sock"))]

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(self.timeout)
            s.connect(self.path)
            s.sendall(json.dumps(msg).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    raise ConnectionError(f"link emulator at {self.path} closed the control connection")
                buf += chunk
        answer = json.loads(buf)
        if "error" in answer:
            raise ValueError(answer["error"])
        return answer

    def stats(self) -> dict[str, Any]:
        return self.ask({"op": "stats"})

    def set(self, rtt_ms: float, mbit: float | None = None) -> dict[str, Any]:
        return self.ask({"op": "set", "rtt_ms": rtt_ms, "mbit": mbit})

    def trace(self, on: bool) -> dict[str, Any]:
        return self.ask({"op": "trace", "on": on})

    def info(self) -> dict[str, Any]:
        return self.ask({"op": "info"})


def hook(**link: Any) -> tuple[str, str, dict]:
    """``mesh.load(..., tunnel_hook=hook(rtt_ms=20, mbit=100))``: an emulated link between the engine and every
    machine (:func:`emulate`, in the engine process; ``process=True`` puts each emulator in a process of its own,
    ``wire=True`` on the wire between the engine's relay and the machine's)."""
    return "bench.linkem:emulate", str(Path(__file__).resolve().parents[1]), link


_LINKS: dict[str, LinkEmulator] = {}  # machine endpoint -> its emulator, for the life of the engine process


def emulate(endpoints: dict[str, str], relays: dict[str, Any], *, wire: bool = False, **link: Any) -> dict[str, str]:
    """The engine's tunnel hook (``EngineSpec.tunnel_hook``): put a :class:`LinkEmulator` in front of every
    machine's local endpoint (``wire``: between the engine's client relay and the machine's server relay)."""
    out = dict(endpoints)
    for machine, local in endpoints.items():
        if machine not in _LINKS:
            _LINKS[machine] = LinkEmulator(local, relay=relays.get(machine) if wire else None, **link).start()
        out[machine] = _LINKS[machine].endpoint
    return out


def _serve_control(link: LinkEmulator, control_dir: Path, stop: threading.Event) -> str:
    """Answer JSON lines on ``control_dir/linkem-PID.sock`` (one emulator per process, or the first of them)."""
    control_dir.mkdir(parents=True, exist_ok=True)
    path = control_dir / f"linkem-{os.getpid()}.sock"
    if path.exists():
        path = control_dir / f"linkem-{os.getpid()}-{id(link):x}.sock"
    from sharedllm.dataplane import serve_control

    serve_control(lambda line: _answer(link, line), path, stop)
    return str(path)


def _answer(link: LinkEmulator, raw: bytes | str) -> dict[str, Any]:
    try:
        msg = json.loads(raw)
    except ValueError:
        return {"error": "not a JSON line"}
    return link.command(msg) if isinstance(msg, dict) else {"error": "not a JSON object"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.linkem", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add, in ms (default 0)")
    p.add_argument("--mbit", type=float, default=None, help="bandwidth cap per direction, Mbit/s (default none)")
    p.add_argument("--control-dir", default=None, help="also answer commands on DIR/linkem-PID.sock")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    link = LinkEmulator(args.target, rtt_ms=args.rtt_ms, mbit=args.mbit, control_dir=args.control_dir).start()
    try:
        print(READY_PREFIX + json.dumps({"endpoint": link.endpoint, "pid": os.getpid(), "control": link.control}),
              flush=True)
        for raw in sys.stdin:  # until the parent closes it (or dies)
            if raw.strip():
                print(json.dumps(_answer(link, raw)), flush=True)
    finally:
        link.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
