# SPDX-License-Identifier: AGPL-3.0-or-later
"""An embedded mesh on this host: a real ``dask scheduler`` and one ``dask worker`` per emulated machine.

Each worker gets its own ``--machine-id``, so one host emulates several machines, each with its own rpc-server.
Used by ``sharedllm up``, ``sharedllm generate`` without ``--scheduler``, the demo and the integration tests.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from sharedllm.dataplane import kill_recorded, kill_running, recorded
from sharedllm.errors import MeshError

logger = logging.getLogger(__name__)


# Every emulated machine shares this host's cores, so idle processes must stay off the CPU: the rpc-servers' OpenMP
# threads sleep after 100 spins instead of ~300k (they spin between every RPC call and would starve the other
# machines' servers: two-server decode ran ~40% faster on 2 cores with 10k; ggml's barrier between two nodes of a
# graph is an OpenMP barrier, and with 10k spins a thread waiting there for one that lost its core kept the core
# from it: one stream behind a 20 ms link decoded at 13.0 tok/s, with 100 spins at 16.2, the same at RTT 0; with 0 the
# futex wakes made RTT 0 a third slower: bench/bench_link.py), and the Dask processes sample less often (the worker's
# profiler takes the GIL every 10 ms). Values already in the environment win.
_QUIET_ENV = {
    "GOMP_SPINCOUNT": "100",
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
    "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "1s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s",
}


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    machine_id: str | None = None
    cwd: str | None = None


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop(p: _Proc, sig: int) -> None:
    """SIGTERM to the process alone (its children are its own to stop), SIGKILL to its whole group; wait for it."""
    if sig == signal.SIGKILL:
        _kill_group(p.popen.pid, sig)
    else:
        with contextlib.suppress(ProcessLookupError):
            p.popen.send_signal(sig)
    try:
        p.popen.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill_group(p.popen.pid, signal.SIGKILL)
        p.popen.wait(timeout=30)


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None while the file is missing, empty or half-written."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("address") else None


def _read_json_file(path: Path) -> dict | None:
    """The JSON object in ``path``, or None while it is missing or half-written."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _cleanup(procs: list[_Proc], workdir: Path, data_planes: list[tuple[int, str]] = ()) -> None:
    # Every process was started in its own session: killing the group also stops its engines. The machines' data
    # planes (rpc-servers, relays) run in sessions of their own, so that they outlive their workers: stop them too.
    for p in procs:
        _kill_group(p.popen.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            p.popen.wait(timeout=5)
    for d in state_dirs(workdir):
        kill_recorded(d, signal.SIGKILL)
    kill_running(list(data_planes), signal.SIGKILL)


def state_dirs(workdir: Path, machine_id: str = "*") -> list[Path]:
    """The state directories of the machines' data planes (``sharedllm.machine.agent.default_state_dir``)."""
    return [p.parent for p in workdir.glob(f"{machine_id}/*/sharedllm-{machine_id}/rpc-server.log")]


class LocalMesh:
    """Start a local mesh: ``with LocalMesh(machines=2) as lm: mesh = lm.mesh()``.

    ``host`` is where everything listens (loopback by default). ``nanny=False`` runs workers without a nanny, so a
    killed worker stays dead (fault tests); with a nanny it is restarted, as in production. The rpc-servers are
    reached through their relays (TLS + lease tokens) unless ``insecure_direct_rpc``.
    """

    def __init__(
        self,
        machines: int = 2,
        *,
        host: str = "127.0.0.1",
        nanny: bool = True,
        dashboard: bool = True,
        workdir: str | os.PathLike | None = None,
        rpc_threads: int | None = None,
        start_timeout: float = 120.0,
        state_path: str | os.PathLike | None = None,
        persist_interval: float = 5.0,
        secret: str | None = "auto",
        scheduler_args: list[str] | None = None,
        tls: bool = False,
        insecure_direct_rpc: bool = False,
        no_inbound: tuple[str, ...] | list[str] = (),
        netlab: bool = False,
        behind_nat: tuple[str, ...] | list[str] = (),
    ):
        if machines < 0:
            raise ValueError(f"machines must be >= 0, got {machines}")
        self.n_machines = machines
        self.host = host
        self.nanny = nanny
        self.dashboard = dashboard
        self.rpc_threads = rpc_threads
        self.start_timeout = start_timeout
        self.state_path = state_path
        self.persist_interval = persist_interval
        self._stopped: set[str] = set()  # machines stopped on purpose: supervise() leaves them down
        self.scheduler_args = list(scheduler_args or [])  # extra options for the sharedllm.scheduler preload
        self._want_tls = tls
        self.insecure_direct_rpc = insecure_direct_rpc  # workers serve RPC without the relay (trusted LANs only)
        self.no_inbound = set(no_inbound)  # machines whose relays listen nowhere: reached through the relay hub
        # Each machine on a network stack of its own (sharedllm.netlab), those of ``behind_nat`` behind a firewall that
        # drops every new inbound connection; the scheduler listens on this host's address on the lab's bridge.
        self.lab = None
        self.behind_nat = set(behind_nat)
        if netlab:
            from sharedllm.netlab import NetworkLab

            self.lab = NetworkLab().start()
            self.host = host = self.lab.host_address
        # The cluster secret every process of this mesh gets through its environment ("auto": a fresh one).
        from sharedllm import security

        env_secret = os.environ.get(security.ENV_SECRET)
        self.secret = security.generate_secret() if secret == "auto" and not env_secret else (secret or None)
        if secret == "auto" and env_secret:
            self.secret = env_secret
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="sharedllm-mesh-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls = None
        if self._want_tls:  # Dask comms over TLS with a temporary CA of this mesh
            from sharedllm.tls import make_mesh_ca

            self.tls = make_mesh_ca(self.workdir / "tls", hosts=[host])
        self.scheduler: _Proc | None = None
        self.workers: list[_Proc] = []
        self.address: str | None = None  # Dask's port (the operator's way in)
        self.user_address: str | None = None  # the user port (HOST:PORT): users reach the mesh there
        self.user_port_file = self.workdir / "userport.json"
        # The mesh's first admin, created at its first start: beside the state file when there is one (the mesh keeps
        # its users across restarts, and its admin with them), else in the work directory.
        self.admin_key_file = Path(f"{state_path}.admin.key") if state_path else self.workdir / "admin.key"
        self._user_port = 0
        self._mesh = None
        self.dashboard_link: str | None = None
        self._client = None
        self._procs: list[_Proc] = []  # every process started; the finalizer kills them if close() is never called
        self._data_planes: list[tuple[int, str]] = []  # (pid, module) seen when closing
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self.workdir, self._data_planes)

    # --- processes ---------------------------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], machine_id: str | None = None, cwd: str | None = None) -> _Proc:
        log = self.workdir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key, value in _QUIET_ENV.items():
            env.setdefault(key, value)
        if self.secret:
            from sharedllm import security

            env[security.ENV_SECRET] = self.secret
            env.pop(security.ENV_SECRET_FILE, None)
        with open(log, "ab") as f:
            popen = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True, cwd=cwd)
        proc = _Proc(name, popen, log, machine_id, cwd)
        self._procs.append(proc)
        return proc

    def _start_scheduler(self, port: int = 0, dashboard_port: int = 0) -> None:
        sched_file = self.workdir / "scheduler.json"
        sched_file.unlink(missing_ok=True)
        self.user_port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "dask", "scheduler", "--host", self.host, "--port", str(port),
               "--scheduler-file", str(sched_file)]
        if self.tls:
            cmd += ["--protocol", "tls", *self.tls.dask_args()]
        # The HTTP server (health, metrics) listens even without the dashboard: always on a free port.
        cmd += ["--dashboard-address", f"{self.host}:{dashboard_port}"] + ([] if self.dashboard else ["--no-dashboard"])
        cmd += ["--preload", "sharedllm.scheduler", "--user-port", str(self._user_port),
                "--user-port-file", str(self.user_port_file), "--admin-key-file", str(self.admin_key_file)]
        if self.state_path:
            cmd += ["--state-path", str(self.state_path), "--persist-interval", str(self.persist_interval)]
        cmd += self.scheduler_args
        self.scheduler = self._spawn("scheduler", cmd)
        deadline = time.monotonic() + self.start_timeout
        # Dask creates the file before it has written it: wait for a whole JSON document, not for the file.
        while (info := _read_json(sched_file)) is None:
            if self.scheduler.popen.poll() is not None or time.monotonic() > deadline:
                why = self._tail(self.scheduler)  # read before close() removes the work directory
                self.close()
                raise MeshError(f"the local scheduler did not start: {why}")
            time.sleep(0.1)
        self.address = info["address"]
        port = info.get("services", {}).get("dashboard")
        self.dashboard_link = f"http://{self.host}:{port}/status" if port else None
        while (door := _read_json_file(self.user_port_file)) is None:  # the user port listens after the scheduler
            if self.scheduler.popen.poll() is not None or time.monotonic() > deadline:
                why = self._tail(self.scheduler)
                self.close()
                raise MeshError(f"the local scheduler's user port did not open: {why}")
            time.sleep(0.05)
        self._user_port = int(door["port"])  # a restart opens it on the same port
        self.user_address = f"{self.host}:{door['port']}"
        # A client of the previous scheduler reconnects to this one by itself (sharedllm.client.Mesh keeps it trying).

    def start(self) -> LocalMesh:
        """Start the scheduler and the workers, and wait until every machine's rpc-server is ready."""
        deadline = time.monotonic() + self.start_timeout
        self._start_scheduler()
        for i in range(self.n_machines):
            self.add_machine(f"machine-{i + 1}")
        self.mesh().wait_for_machines(self.n_machines, timeout=max(1.0, deadline - time.monotonic()))
        logger.info("local mesh up: scheduler %s, dashboard %s", self.address, self.dashboard_link)
        return self

    def supervise(self) -> list[str]:
        """Restart what died, as systemd's ``Restart=always`` would: the scheduler on its old port (with its state
        file), then every worker whose process exited (workers exit when their scheduler is lost)."""
        restarted = []
        if self.scheduler is not None and self.scheduler.popen.poll() is not None:
            port = int(self.address.rsplit(":", 1)[1])
            dash = int(self.dashboard_link.split(":")[2].split("/")[0]) if self.dashboard_link else 0
            logger.warning("scheduler exited with status %s; restarting it on port %d",
                           self.scheduler.popen.returncode, port)
            self._start_scheduler(port, dash)
            restarted.append("scheduler")
        for k, p in enumerate(self.workers):
            if p.popen.poll() is not None and p.machine_id not in self._stopped:
                logger.warning("worker of %s exited with status %s; restarting it", p.machine_id, p.popen.returncode)
                self.workers[k] = self._spawn(p.name, p.popen.args, p.machine_id, cwd=p.cwd)
                restarted.append(p.name)
        return restarted

    def add_machine(
        self,
        machine_id: str,
        nworkers: int = 1,
        wait: bool = False,
        rpc_devices: tuple[str, ...] = (),
        labels: dict[str, str] | None = None,
        inbound: bool | None = None,
        worker_args: list[str] | tuple[str, ...] = (),
        python: str | None = None,
    ) -> list[_Proc]:
        """Start ``dask worker --nworkers N`` for one emulated machine (``rpc_devices``: what its server serves;
        ``inbound=False``: a machine behind NAT, its relay listens on no port and serves through the relay hub;
        ``python``: the interpreter of another installation, a donor's, run from outside this checkout)."""
        self._stopped.discard(machine_id)
        no_inbound = inbound is False or (inbound is None and machine_id in self.no_inbound)
        prefix, worker_host = [], self.host
        if self.lab is not None:
            stack = self.lab.hosts.get(machine_id) or self.lab.add(machine_id, firewall=machine_id in self.behind_nat)
            prefix, worker_host = stack.prefix, stack.address
        if no_inbound:
            worker_host = "127.0.0.1"  # its worker and nanny open no port to the network
        cmd = [*prefix, python or sys.executable, "-m", "dask", "worker", self.address, "--host", worker_host,
               "--nthreads", "1",
               "--nworkers", str(nworkers), "--memory-limit", "0", "--no-dashboard",
               "--local-directory", str(self.workdir / machine_id), "--name", machine_id,
               *(["--nanny", "--preload-nanny", "sharedllm.nanny"] if self.nanny else ["--no-nanny"]),
               *(self.tls.dask_args() if self.tls else []),
               "--preload", "sharedllm.worker", "--machine-id", machine_id]
        if self.rpc_threads:
            cmd += ["--rpc-threads", str(self.rpc_threads)]
        if self.insecure_direct_rpc:
            cmd += ["--insecure-direct-rpc"]
        if no_inbound:
            cmd += ["--no-inbound"]
        for dev in rpc_devices:
            cmd += ["--rpc-device", dev]
        for key, value in (labels or {}).items():
            cmd += ["--label", f"{key}={value}"]
        cmd += list(worker_args)  # more options of the sharedllm.worker preload (--max-memory 12GiB, ...)
        # Another installation runs from its own folder: this checkout's sharedllm/ must not shadow it.
        proc = self._spawn(f"worker-{machine_id}-{len(self.workers)}", cmd, machine_id,
                           cwd=str(self.workdir) if python else None)
        self.workers.append(proc)
        if wait:
            self.mesh().wait_for_machines(len({w.machine_id for w in self.workers}), timeout=self.start_timeout)
        return [proc]

    def stop_machine(self, machine_id: str, sig: int = signal.SIGTERM) -> None:
        """Stop an emulated machine. SIGTERM: as ``systemctl stop`` of its worker service does (``KillMode=process``,
        see the README), to the ``dask worker`` process alone, which closes its worker, which stops the machine's
        rpc-server and relay. SIGKILL (a power cut): every process of the machine, its rpc-server and relay too."""
        self._stopped.add(machine_id)
        for p in self.workers:
            if p.machine_id == machine_id and p.popen.poll() is None:
                _stop(p, sig)
        if sig == signal.SIGKILL:
            for d in state_dirs(self.workdir, machine_id):
                kill_recorded(d, sig)

    def _tail(self, p: _Proc, n: int = 5) -> str:
        try:
            return " | ".join(p.log.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return "no log"

    # --- clients -----------------------------------------------------------------------------------------------

    @property
    def admin_key(self) -> str:
        """The mesh's admin key (as the scheduler wrote it at its first start)."""
        return self.admin_key_file.read_text().strip()

    def client(self):
        """A synchronous ``distributed.Client`` for this mesh, the operator's (its connections prove the admin key;
        shared, closed with the mesh)."""
        if self._client is None:
            from distributed import Client

            from sharedllm.client.control import admin_security

            security = admin_security(self.admin_key, self.tls.security() if self.tls else None)
            self._client = Client(self.address, timeout=30, security=security)
        return self._client

    def mesh(self):
        """The mesh through its user port, as its admin (one connection for every call; closed with the mesh)."""
        from sharedllm.client import Mesh

        if self._mesh is None:
            self._mesh = self.user_mesh(self.admin_key)
        return Mesh(self._mesh.control)

    def user_mesh(self, key: str | None):
        """A new ``Mesh`` through the user port with ``key`` (None: anonymous); the caller closes it."""
        from sharedllm.client import Mesh

        return Mesh(self.user_address, key=key, tls_ca_file=str(self.tls.ca) if self.tls else None)

    def add_user(self, name: str, role: str = "user", limits: dict | None = None) -> str:
        """Issue a user of this mesh a key (``sharedllm users add``); returns the key."""
        return self.mesh().control.call("users", action="add", name=name, role=role, limits=limits)["key"]

    def reconnect(self) -> None:
        """Drop the shared user-port connection (the next ``mesh()`` opens a new one)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def close(self) -> None:
        """Stop every process (workers first, so their rpc-servers stop cleanly), then the scheduler."""
        if self._mesh is not None:
            with contextlib.suppress(Exception):
                self._mesh.close()
            self._mesh = None
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close(timeout=10)
            self._client = None
        # What the machines run now: a worker that does not get to stop its data plane leaves it to the finalizer.
        self._data_planes.extend(p for d in state_dirs(self.workdir) for p in recorded(d))
        if self.state_path:  # the relay hub outlives a scheduler with a state file (scheduler_plugins.hub)
            self._data_planes.extend(recorded(f"{self.state_path}.hub"))
        for p in self.workers:  # as `systemctl stop`: each worker stops its machine's rpc-server and relay
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
        for p in self.workers:
            try:
                p.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _kill_group(p.popen.pid, signal.SIGKILL)
        if self.scheduler is not None:
            _kill_group(self.scheduler.popen.pid, signal.SIGTERM)
            try:
                self.scheduler.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                _kill_group(self.scheduler.popen.pid, signal.SIGKILL)
        self._finalizer()  # anything left in the groups (rpc-servers of killed workers)
        if self.lab is not None:
            self.lab.close()
        if self._tmp is not None:
            with contextlib.suppress(Exception):
                self._tmp.cleanup()

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
