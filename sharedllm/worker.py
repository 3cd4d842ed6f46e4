# SPDX-License-Identifier: AGPL-3.0-or-later
"""Worker preload: ``dask worker ADDR --preload-nanny sharedllm.nanny --preload sharedllm.worker [--machine-id ID]``.

Thin adapter: it installs ``MachineReporter``, which reports this machine's resources and its rpc-server's state to the
scheduler with every heartbeat, and gives the per-machine actor a place to live.

The rpc-server binds loopback; clients reach it through the machine's TLS relay on ``--rpc-host:--relay-port``, with a
token of their lease. ``--insecure-direct-rpc`` binds the rpc-server itself to ``--rpc-host`` instead (trusted LANs
only; it warns at every start).

Every option can also come from the environment, as ``SHAREDLLM_`` and the option's name (``--rpc-threads 4``:
``SHAREDLLM_RPC_THREADS=4``; repeatable ones space-separated: ``SHAREDLLM_LABELS="zone=eu gpu=a100"``), and the
preload itself from Dask's configuration, so that dask-jobqueue, dask-kubernetes or a ``SpecCluster`` start SharedLLM
workers without a new command line::

    export DASK_DISTRIBUTED__WORKER__PRELOAD='["sharedllm.worker"]'
    export DASK_DISTRIBUTED__WORKER__PRELOAD_ARGV='["--rpc-threads", "4"]'   # or SHAREDLLM_RPC_THREADS=4
    export DASK_DISTRIBUTED__NANNY__PRELOAD='["sharedllm.nanny"]'

The worker's and nanny's own ports serve this host only (:mod:`sharedllm.machine.door`): a worker under a nanny
without ``sharedllm.nanny`` refuses to start.
"""

from __future__ import annotations

import logging
import os

import click
from distributed import WorkerPlugin
from distributed.comm.addressing import get_address_host

from sharedllm import resources, settings
from sharedllm.dataplane import DEFAULT_ORPHAN_TIMEOUT
from sharedllm.machine.actor import CALL as ACTOR_CALL
from sharedllm.machine.agent import MachineAgent
from sharedllm.machine.state import RPCServerConfig

logger = logging.getLogger(__name__)

EXTENSION = "sharedllm"


class MachineReporter(WorkerPlugin):
    """Reports the machine (CPUs, RAM, every GPU through NVML) and its rpc-server to the scheduler."""

    name = "sharedllm-machine"
    idempotent = True

    def __init__(
        self,
        machine_id: str | None = None,
        rpc_host: str | None = None,
        rpc_port: int = 0,
        rpc_threads: int | None = None,
        rpc_devices: tuple[str, ...] = (),
        cache_dir: str | None = None,
        cache_cap: int = 10 << 30,
        labels: dict[str, str] | None = None,
        relay_port: int = 0,
        insecure_direct_rpc: bool = False,
        state_dir: str | None = None,
        orphan_timeout: float | None = None,
        inbound: bool = True,
        max_memory: dict[str, int] | None = None,
    ):
        self.machine_id = resources.machine_id(machine_id)  # validates an override, raises ValueError
        if cache_cap < 0:
            raise ValueError(f"cache_cap must be >= 0 bytes, got {cache_cap}")
        self.cache_cap = cache_cap
        self.labels = dict(labels or {})
        if rpc_threads is not None and rpc_threads < 1:
            raise ValueError(f"rpc_threads must be at least 1, got {rpc_threads}")
        if not 0 <= rpc_port < 65536:
            raise ValueError(f"rpc_port must be 0..65535, got {rpc_port}")
        if not 0 <= relay_port < 65536:
            raise ValueError(f"relay_port must be 0..65535, got {relay_port}")
        self.relay_port = relay_port
        self.insecure_direct_rpc = insecure_direct_rpc
        self.inbound = inbound
        self.max_memory = dict(max_memory or {})
        if any(v <= 0 for v in self.max_memory.values()):
            raise ValueError(f"max_memory must be positive, got {self.max_memory}")
        self.rpc_host = rpc_host
        self.rpc_port = rpc_port
        self.rpc_threads = rpc_threads
        self.rpc_devices = tuple(rpc_devices)
        self.cache_dir = cache_dir
        self.state_dir = state_dir
        if orphan_timeout is not None and not orphan_timeout > 0:
            raise ValueError(f"orphan_timeout must be > 0 seconds, got {orphan_timeout}")
        self.orphan_timeout = orphan_timeout or DEFAULT_ORPHAN_TIMEOUT

    def tensor_cache_dir(self) -> str | None:
        """Where the rpc-server keeps its tensor cache; None with ``cache_cap == 0`` (no cache: llama.cpp's
        rpc-server writes every big tensor it receives to its cache during a load, whatever the cap, so a machine
        short of disk for a 40 GB model turns it off)."""
        if self.cache_cap == 0:
            return None
        return self.cache_dir or str(settings.cache_root() / "tensor-cache" / self.machine_id)

    def setup(self, worker) -> None:
        host = self.rpc_host or get_address_host(worker.address)
        cache = self.tensor_cache_dir()
        if self.insecure_direct_rpc:
            from sharedllm.relay import warn_insecure_direct

            warn_insecure_direct(f"machine {self.machine_id}")  # at every start, as documented
            rpc_host, relay_host = host, host
        else:
            # The rpc-server answers loopback only; the relay (TLS + lease token) is the machine's door.
            rpc_host, relay_host = "127.0.0.1", host
        config = RPCServerConfig(
            host=rpc_host, port=self.rpc_port, threads=self.rpc_threads, devices=self.rpc_devices, cache_dir=cache,
            cache_cap=self.cache_cap, relay=not self.insecure_direct_rpc, relay_host=relay_host,
            relay_port=self.relay_port, machine_id=self.machine_id, orphan_timeout=self.orphan_timeout,
            inbound=self.inbound,
        )
        if not self.inbound:
            self._no_inbound(worker)
        agent = MachineAgent(worker, self.machine_id, config, self.labels, self.state_dir, self.max_memory)
        _note_close_reason(worker, agent)
        worker.extensions[EXTENSION] = agent
        worker.startup_information[EXTENSION] = agent.report
        worker.metrics[EXTENSION] = agent.report
        worker.stream_handlers[ACTOR_CALL] = agent.on_actor_call  # the scheduler's calls, on the worker's own stream
        logger.info("sharedllm: worker %s belongs to machine %s", worker.address, self.machine_id)

    def _no_inbound(self, worker) -> None:
        """A machine that takes no inbound connection opens no port to the network: its worker listens on loopback
        (``dask worker --host 127.0.0.1``, which binds its nanny there too), and nobody dials it (the scheduler calls
        its actor over the worker's own connection). It registers under an address of its own that nothing can
        reach, ``[100::/64]`` (RFC 6666's discard prefix): two machines listening on the same loopback port stay two
        workers at the scheduler."""
        listening = getattr(getattr(worker, "listener", None), "listen_address", None) or worker.address
        if not _loopback(get_address_host(listening)):  # a donor who asked for no open port gets none, or no worker
            raise click.UsageError(f"--no-inbound, but this worker listens on {listening}, open to its network: "
                                   "start it with `dask worker ... --host 127.0.0.1 --no-inbound` (its nanny too)")
        if not _loopback(get_address_host(worker.scheduler.address)) and worker.contact_address is None:
            worker.contact_address = unreachable_address(self.machine_id, worker.address)
            logger.info("sharedllm: no inbound connections: worker %s registers as %s", worker.address,
                        worker.contact_address)

    async def teardown(self, worker) -> None:
        agent = worker.extensions.pop(EXTENSION, None)
        if agent is not None:
            await agent.close()


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def unreachable_address(machine_id: str, listen: str) -> str:
    """A worker address unique to this machine and worker that routes nowhere (``100::/64``, RFC 6666)."""
    import hashlib

    port = listen.rpartition(":")[2]
    h = hashlib.sha256(f"{machine_id}|{os.getpid()}|{listen}".encode()).hexdigest()
    return f"tcp://[100::{h[0:4]}:{h[4:8]}:{h[8:12]}:{h[12:16]}]:{port}"


def _note_close_reason(worker, agent: MachineAgent) -> None:
    # Dask tells plugins nothing about why a worker closes; its close() takes the reason. It is called as an
    # attribute, and as the handler of the scheduler's "close" message (bound when the worker was made).
    original = worker.close

    async def close(*args, **kwargs):
        agent.close_reason = agent.close_reason or kwargs.get("reason")
        return await original(*args, **kwargs)

    worker.close = close
    for handlers in (worker.stream_handlers, worker.handlers):
        if handlers.get("close") == original:
            handlers["close"] = close


@click.command(context_settings={"auto_envvar_prefix": "SHAREDLLM", "show_default": True})
@click.option("--machine-id", envvar=settings.env("machine-id"), default=None,
              help="machine identity (default: the host's)")
@click.option("--rpc-host", default=None,
              help="address clients reach this machine's relay on (default: the worker's address)")
@click.option("--rpc-port", type=int, default=0, show_default=True,
              help="rpc-server port on loopback (0: a free one); with --insecure-direct-rpc, the public port")
@click.option("--relay-port", type=int, default=0, show_default=True,
              help="port of the TLS relay in front of the rpc-server (0: a free one, kept across restarts)")
@click.option("--no-inbound", is_flag=True,
              help="this machine accepts no inbound connection (behind NAT): its relay listens on no port and dials "
                   "out to the scheduler's relay hub, through which clients reach it")
@click.option("--insecure-direct-rpc", is_flag=True,
              help="serve llama.cpp RPC directly on --rpc-host, without TLS or tokens: trusted LANs only")
@click.option("--rpc-threads", type=int, default=None, help="rpc-server CPU threads (default: every core)")
@click.option("--rpc-device", "rpc_devices", multiple=True, help="device to serve, repeatable (default: GPUs or CPU)")
@click.option("--cache-dir", default=None, help="rpc-server tensor cache directory")
@click.option("--cache-cap", default="10GiB", show_default=True,
              help="tensor cache size cap; least recently used files are evicted beyond it (0: no cache; a load "
                   "writes every weight over llama.cpp's hash threshold to the cache first, whatever the cap: "
                   "1 MiB in SharedLLM's build, 10 MiB upstream)")
@click.option("--max-memory", "max_memory", multiple=True,
              help="memory this machine gives the mesh: SIZE for each device it serves, or DEVICE=SIZE for one "
                   "(CPU=12GiB, CUDA0=20GiB), repeatable; placement never plans more there (default: all free memory)")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE label for route-sensitive placement, repeatable")
@click.option("--secret-file", envvar=settings.env("cluster-secret-file"), default=None,
              help="file holding the cluster secret (else $SHAREDLLM_CLUSTER_SECRET)")
@click.option("--state-dir", default=None,
              help="where the machine's rpc-server and relay record themselves, for the next worker to adopt them "
                   "(default: sharedllm-MACHINE beside the worker's directory)")
@click.option("--orphan-timeout", type=float, default=DEFAULT_ORPHAN_TIMEOUT, show_default=True,
              help="seconds the rpc-server and relay serve on without a worker (the scheduler restarting)")
async def dask_setup(worker, **options) -> None:
    """The preload: a worker whose SharedLLM options are wrong does not run without SharedLLM (Dask would log the
    preload's failure and go on): it says why in one line and stops, its nanny too."""
    from sharedllm.logs import follow_dask_logging

    follow_dask_logging()
    try:
        await _setup(worker, **options)
    except click.ClickException as exc:
        logger.error("sharedllm: %s", exc.format_message())
        if worker.nanny is not None:  # the nanny would start the worker again, and again: it stops too
            import signal

            os.kill(os.getppid(), signal.SIGTERM)
        worker.loop.add_callback(worker.close, reason=f"sharedllm: {exc.format_message()}", nanny=True)


async def _setup(worker, machine_id, rpc_host, rpc_port, relay_port, no_inbound, insecure_direct_rpc, rpc_threads,
                 rpc_devices, cache_dir, cache_cap, max_memory, labels, secret_file, state_dir, orphan_timeout):
    from dask.utils import parse_bytes

    pairs = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"--label wants KEY=VALUE, got {item!r}")
        pairs[key] = value
    if no_inbound and insecure_direct_rpc:
        raise click.BadParameter("--no-inbound and --insecure-direct-rpc exclude each other: a machine without "
                                 "inbound connections is reached through the relay hub, over TLS")
    from sharedllm.machine.door import NANNY_DOOR, local_only

    if worker.nanny is not None and os.environ.get(NANNY_DOOR) != "1":
        raise click.UsageError("this worker's nanny takes connections from anyone and runs what they send: start "
                               "the worker with `--preload-nanny sharedllm.nanny` beside `--preload sharedllm.worker` "
                               "(or with --no-nanny)")
    local_only(worker)  # the worker's own port serves this host only (sharedllm.machine.door)
    plugin = MachineReporter(machine_id, rpc_host, rpc_port, rpc_threads, tuple(rpc_devices), cache_dir,
                             parse_bytes(cache_cap), pairs, relay_port=relay_port,
                             insecure_direct_rpc=insecure_direct_rpc, state_dir=state_dir,
                             orphan_timeout=orphan_timeout, inbound=not no_inbound,
                             max_memory=parse_max_memory(max_memory))
    await vouch(worker, plugin.machine_id, secret_file)
    await worker.plugin_add(plugin, catch_errors=False)


def parse_max_memory(items: tuple[str, ...] | list[str]) -> dict[str, int]:
    """``--max-memory`` values (``12GiB``, ``CUDA0=20GiB``) as ``{device name or "*": bytes}``."""
    from dask.utils import parse_bytes

    out: dict[str, int] = {}
    for item in items:
        device, sep, size = item.rpartition("=")
        try:
            value = parse_bytes(size)
        except (ValueError, TypeError):
            raise click.BadParameter(f"--max-memory wants SIZE or DEVICE=SIZE (12GiB, CUDA0=20GiB), got {item!r}"
                                     ) from None
        if value <= 0 or (sep and not device):
            raise click.BadParameter(f"--max-memory wants a positive SIZE or DEVICE=SIZE, got {item!r}")
        out[device or "*"] = value
    return out


async def vouch(worker, machine_id: str, secret_file: str | None) -> None:
    """Answer the scheduler's challenge with the cluster secret; the proof travels with the registration."""
    from sharedllm import security

    secret = security.load_secret(secret_file)
    if secret is None:
        logger.warning("no cluster secret (SHAREDLLM_CLUSTER_SECRET or --secret-file): a scheduler that requires "
                       "one will refuse this worker")
        return
    # Every connection this worker opens to the scheduler proves the secret in its handshake (a locked-down Dask port
    # takes nothing else from a machine); the same dict object is the worker's connection pool's.
    overrides = worker.connection_args.get("handshake_overrides")
    worker.connection_args["handshake_overrides"] = security.HandshakeCredential(secret=secret, machine_id=machine_id)
    if overrides:
        logger.warning("the worker's own handshake overrides %s are replaced by SharedLLM's credential", overrides)
    answer = await worker.scheduler.sharedllm_challenge()
    nonce = (answer or {}).get("nonce")
    if not nonce:
        logger.warning("the scheduler does not check cluster secrets: any worker can join this mesh")
        return
    proof = {"nonce": nonce, "machine_id": machine_id, "proof": security.worker_proof(secret, nonce, machine_id)}
    worker.startup_information["sharedllm_auth"] = lambda _worker: proof
