# SPDX-License-Identifier: AGPL-3.0-or-later
"""A machine's data plane outlives its control plane: the files through which a restarted worker adopts them.

The rpc-server and the relay of a machine serve its leases; the Dask worker that supervises them comes and goes (it
exits when it loses the scheduler, and systemd or the nanny starts another). So they run in sessions of their own,
write where they are into a state directory, and stay up while their supervisor is gone; the next supervisor on the
machine adopts them (see ``RPCServerSupervisor``) instead of starting new ones, and the leases they serve go on.

Files in a machine's state directory (``dask worker --preload sharedllm.worker --state-dir DIR``):

- ``rpc-server.json`` / ``relay.json``: written by each process once it serves (pid, endpoint, log offset...);
- ``supervisor.alive``: touched by the supervisor every few seconds. A process whose supervisor has not touched it
  for ``--orphan-timeout`` seconds exits: a machine whose worker never comes back does not serve forever.
- ``relay.sock``: the relay's control socket (lease changes), so that a new supervisor can reach an adopted relay.
  A Unix socket's path is limited to about 100 bytes, and batch systems and test runners give workers long
  directories: beyond that the socket lives in a private short directory named after the state directory
  (:func:`control_socket_path`).

It also starts and stops these processes (``spawn_process``, ``wait_ready_file``, ``terminate``; an adopted one is
no child of ours: ``DataPlaneProcess`` waits on its pidfd), for the actor's rpc-server and relay and the scheduler's
relay hub.

No Dask here, and nothing that imports llama.cpp: the rpc-server and the relay import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

ALIVE_FILE = "supervisor.alive"
SERVER_FILE = "rpc-server.json"
RELAY_FILE = "relay.json"
DEFAULT_ORPHAN_TIMEOUT = 900.0  # seconds a data plane serves on without a supervisor (a scheduler restart fits)
TOUCH_EVERY = 5.0  # seconds between the supervisor's touches of the alive file


_UNIX_PATH_MAX = 100  # sun_path holds 108 bytes on Linux, 104 on macOS; keep a margin


def control_socket_path(state_dir: str | os.PathLike, name: str = "relay.sock") -> Path:
    """Where the control socket of the machine with ``state_dir`` lives: in it when the path is short enough for a
    Unix socket, else in ``$TMPDIR/sharedllm-UID`` (mode 0700) under a name derived from the state directory, so that
    every supervisor of that machine finds the same one."""
    path = Path(state_dir) / name
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        return path
    import tempfile

    short = Path(tempfile.gettempdir()) / f"sharedllm-{os.getuid()}"
    short.mkdir(mode=0o700, exist_ok=True)
    if short.stat().st_uid != os.getuid() or short.stat().st_mode & 0o077:
        raise PermissionError(f"{short} is not a private directory of this user; remove it, or give the worker a "
                              "shorter --state-dir")
    digest = hashlib.sha256(os.fsencode(Path(state_dir).resolve())).hexdigest()[:24]
    return short / f"{digest}-{name}"


DEAD_SOCKET_AGE = 60.0  # seconds a control socket nobody listens on is left, before it is swept away


def sweep_dead_sockets(directory: Path, min_age: float = DEAD_SOCKET_AGE) -> list[Path]:
    """Remove the control sockets in ``directory`` that nobody listens on (their process was killed before it
    could unlink them) and that are older than ``min_age`` seconds (a socket just bound may not listen yet): in
    ``$TMPDIR/sharedllm-UID`` each machine that ever ran there left one. Called where a control socket is bound
    (:func:`serve_control`), once a relay. Returns those removed."""
    import socket
    import stat

    removed = []
    for path in directory.glob("*.sock"):
        try:
            st = path.lstat()
            if not stat.S_ISSOCK(st.st_mode) or time.time() - st.st_mtime < min_age:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(str(path))
        except ConnectionRefusedError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        except OSError:  # gone meanwhile, or busy: left alone
            continue
    return removed


def serve_control(answer, path: str | os.PathLike, stop: threading.Event) -> None:
    """Serve control commands on the Unix socket ``path`` (owner only) until ``stop``: one JSON answer line per
    command line, ``answer(line)`` (None: no answer). Listening when this returns; a thread serves each client. The
    other end is :func:`control_call`."""
    import socket

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sweep_dead_sockets(Path(path).parent)  # those of relays killed before they could unlink theirs
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        srv.bind(str(path))
    finally:
        os.umask(old)
    srv.listen(8)

    def serve(conn: socket.socket) -> None:
        with conn, conn.makefile("rw") as f:
            for line in f:
                if (reply := answer(line)) is not None:
                    f.write(json.dumps(reply) + "\n")
                    f.flush()

    def accept() -> None:
        with srv:
            while not stop.is_set():
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(conn,), name="control", daemon=True).start()

    threading.Thread(target=accept, name="control-accept", daemon=True).start()


async def control_call(path: str | os.PathLike, command: str, timeout: float = 10.0) -> dict | None:
    """Send one command line to a data-plane process's control socket (a relay, the relay hub) and return its JSON
    answer line; None when it cannot be reached or does not answer in ``timeout`` seconds."""
    import asyncio

    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"{command}\n".encode())
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        return json.loads(line) if line else None
    except (OSError, ValueError, asyncio.TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Replace ``path`` with ``data`` as JSON, atomically (a reader sees the old or the new file, never half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> dict | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def touch(path: str | os.PathLike) -> None:
    Path(path).touch()


def process_state(pid: int) -> str | None:
    """The process's state letter in ``/proc`` (R, S, D, T stopped, Z zombie...); None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def process_runs(pid: int | None, module: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process running ``python -m module``: a recorded pid may have been
    reused by another program since."""
    if not pid or process_state(pid) in (None, "Z"):
        return False
    try:
        return module.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


def watch_alive_file(path: str | os.PathLike, timeout: float, on_orphan, interval: float = 5.0) -> threading.Thread:
    """Call ``on_orphan()`` once ``path`` has not been touched for ``timeout`` seconds (or is gone that long).

    The process that watches was started by a supervisor that touches the file; when the supervisor dies and no
    other adopts the process, the file grows old."""
    path = Path(path)
    started = time.time()

    def run() -> None:
        while True:
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                age = time.time() - started
            if age > timeout:
                logger.warning("no supervisor for %.0fs (%s is that old): stopping", age, path)
                on_orphan()
                return
            time.sleep(min(interval, max(timeout / 4, 0.1)))

    thread = threading.Thread(target=run, name="sharedllm-orphan-watch", daemon=True)
    thread.start()
    return thread


HUB_FILE = "hub.json"  # the scheduler's relay hub records itself so in its own state directory
_RECORDS = ((SERVER_FILE, "sharedllm.rpc_server"), (RELAY_FILE, "sharedllm.relay"), (HUB_FILE, "sharedllm.relay"))


def recorded(state_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(pid, module) of the data-plane processes recorded in ``state_dir``."""
    out = []
    for name, module in _RECORDS:
        pid = (read_json(Path(state_dir) / name) or {}).get("pid")
        if pid:
            out.append((pid, module))
    return out


def kill_recorded(state_dir: str | os.PathLike, sig: int) -> list[int]:
    """Send ``sig`` to the data-plane processes recorded in ``state_dir`` that still run; their pids."""
    return kill_running(recorded(state_dir), sig)


def kill_running(processes: list[tuple[int, str]], sig: int) -> list[int]:
    """Send ``sig`` to those of ``processes`` ((pid, module) pairs) that still run them; their pids."""
    killed = []
    for pid, module in set(processes):
        if process_runs(pid, module):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                killed.append(pid)
    return killed


# --- starting and stopping data-plane processes (the actor's rpc-server and relay, the scheduler's hub) ---------


class DataPlaneProcess:
    """A data-plane process: a child this supervisor started, or one it adopted from the supervisor before it (a
    worker that exited: the process is no child of ours, so its exit status is unknown)."""

    def __init__(self, pid: int, child: asyncio.subprocess.Process | None = None):
        self.pid, self.child = pid, child
        self.returncode: int | None = None  # set once it exited (None for an adopted one: unknown)
        self.exited = False

    async def wait(self) -> int | None:
        """Wait until the process exits; its status (None when adopted)."""
        if self.child is not None:
            self.returncode = await self.child.wait()
        else:
            await _wait_pid(self.pid)
        self.exited = True
        return self.returncode

    def send(self, sig: int) -> None:
        if not self.exited:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


async def _wait_pid(pid: int) -> None:
    """Wait for a process that is not our child to exit (a pidfd where the kernel has them, else polling)."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        while _alive(pid):
            await asyncio.sleep(0.2)
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z")


async def terminate(proc: DataPlaneProcess, grace: float = 5.0) -> None:
    """Stop a process: SIGTERM, then SIGKILL after ``grace`` seconds (at once with ``grace=0``); wait for it."""
    proc.send(signal.SIGTERM if grace > 0 else signal.SIGKILL)
    try:
        await asyncio.wait_for(proc.wait(), grace or None)
    except asyncio.TimeoutError:
        proc.send(signal.SIGKILL)
        await proc.wait()


async def spawn_process(cmd: list[str], log: Path, env: dict | None = None) -> DataPlaneProcess:
    """Start a data-plane process in a session of its own (a signal to the worker's process group does not reach
    it), its output appended to ``log``."""
    with open(log, "ab") as f:
        child = await asyncio.create_subprocess_exec(*cmd, stdout=f, stderr=f, stdin=asyncio.subprocess.DEVNULL,
                                                     env=env, start_new_session=True)
    return DataPlaneProcess(child.pid, child)


def listens(endpoint: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections on ``endpoint`` (the connection is closed at once, unused)."""
    import socket

    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


async def wait_ready_file(path: Path, proc: DataPlaneProcess, deadline: float) -> dict | None:
    """The JSON a starting process writes to ``path`` once it serves; None if it exits or ``deadline`` passes."""
    while time.monotonic() < deadline:
        info = read_json(path)
        if info and info.get("pid") == proc.pid:
            return info
        if proc.child is not None and proc.child.returncode is not None:
            return None
        await asyncio.sleep(0.05)
    return None
