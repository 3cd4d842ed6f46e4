# SPDX-License-Identifier: AGPL-3.0-or-later
"""What a worker of a machine holds: which machine it belongs to, the heartbeat payload (resources, the rpc-server's
state, the build), and the rpc-server supervisor when it holds the machine's actor."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from sharedllm import resources
from sharedllm.machine.actor import REPLY, RPCServerActor
from sharedllm.machine.server import RPCServerSupervisor
from sharedllm.machine.state import RPCServerConfig

logger = logging.getLogger("sharedllm.machine")


class MachineAgent:
    """Per-worker state: which machine this worker belongs to, and the rpc-server supervisor if it holds the actor."""

    def __init__(self, worker, machine_id: str, config: RPCServerConfig, labels: dict[str, str] | None = None,
                 state_dir: str | os.PathLike | None = None, max_memory: dict[str, int] | None = None):
        self.worker = worker
        self.machine_id = machine_id
        self.labels = dict(labels or {})
        self.max_memory = dict(max_memory or {})  # device name ("*": each device) -> bytes its owner gives
        self.config = config
        # Where the machine's data plane records itself: the same for every worker of the machine, across restarts.
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(worker, machine_id)
        self.supervisor: RPCServerSupervisor | None = None
        self._build: dict | None = None
        self.close_reason: str | None = None  # why the worker closes (see MachineReporter.setup)
        self.actor: RPCServerActor | None = None  # the machine's actor, when the scheduler pinned it here
        self._calls: set[asyncio.Task] = set()

    def new_supervisor(self, machine_id: str) -> RPCServerSupervisor:
        if machine_id != self.machine_id:
            raise ValueError(f"actor for machine {machine_id} landed on a worker of machine {self.machine_id}")
        if self.supervisor is not None and self.supervisor.status.state not in ("stopped", "failed"):
            return self.supervisor  # the actor was re-created on the same worker: keep the running server
        self.supervisor = RPCServerSupervisor(self.config, self.state_dir)
        return self.supervisor

    def on_actor_call(self, call: int | None = None, machine: str = "", method: str = "", kwargs: dict | None = None,
                      **_: Any) -> None:
        """The scheduler calls this machine's actor (``sharedllm-actor`` on the worker's own stream: the scheduler
        never connects to a worker): ``pin`` creates it here, the others run its methods. Runs inline in the
        worker's stream, which must go on: the call runs in the background and never raises here; its answer goes
        back on the same stream (``sharedllm-actor-reply``)."""
        task = asyncio.get_running_loop().create_task(self._run_call(call, machine, method, dict(kwargs or {})))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _run_call(self, call: int | None, machine: str, method: str, kwargs: dict) -> None:
        from distributed.comm.addressing import get_address_host

        try:
            if machine != self.machine_id:
                raise ValueError(f"a call for machine {machine} reached a worker of machine {self.machine_id}")
            if method == "pin":
                self.actor = RPCServerActor(machine, self.new_supervisor(machine),
                                            get_address_host(self.worker.scheduler.address))
                result: Any = {"machine": machine, "worker": self.worker.address}
            elif method in RPCServerActor.METHODS and self.actor is not None:
                result = await getattr(self.actor, method)(**kwargs)
            else:
                raise ValueError(f"no actor method {method!r} here (pinned: {self.actor is not None})")
            reply = {"op": REPLY, "call": call, "ok": True, "result": result}
        except Exception as exc:
            logger.warning("machine %s: actor call %s failed: %s", self.machine_id, method, exc)
            reply = {"op": REPLY, "call": call, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        self.worker.batched_send(reply)

    def build(self) -> dict:
        if self._build is None:
            import llama_cpp

            from sharedllm.ggml import kernels_fingerprint

            self._build = {"llama_cpp_python": llama_cpp.__version__, "rpc": bool(llama_cpp.llama_supports_rpc()),
                           "kernels": kernels_fingerprint()}
        return self._build

    def report(self, worker=None) -> dict:
        """The heartbeat payload: machine identity, resources, rpc-server state, build."""
        res = resources.probe(self.machine_id)
        sup = self.supervisor
        return {
            "machine_id": self.machine_id,
            "resources": res.to_dict(),
            "rpc": sup.report() if sup else None,
            "build": self.build(),
            "labels": self.labels,
            "max_memory": self.max_memory,
            "pid": os.getpid(),
        }

    async def close(self) -> None:
        if self.supervisor is None:
            return
        if self.close_reason in SCHEDULER_LOST:
            # Not told to stop: the worker lost its scheduler. The sessions on this machine go on; the next worker
            # adopts the rpc-server and the relay (sharedllm.dataplane).
            self.supervisor.detach()
        else:
            await self.supervisor.stop()


# Why a Dask worker closes when its scheduler is gone, killed or stopped (distributed/worker.py, and the close a
# scheduler sends its workers when it shuts down): the machine's data plane stays up for the next worker.
SCHEDULER_LOST = frozenset({"worker-handle-scheduler-connection-broken", "worker-heartbeat-missing",
                            "worker-heartbeat-error", "scheduler-close"})


def default_state_dir(worker, machine_id: str) -> Path:
    """``sharedllm-MACHINE`` beside the worker's own directory: Dask gives each worker process a fresh
    ``worker-XXXX`` directory under its ``--local-directory``, which this one outlives."""
    return Path(worker.local_directory).parent / f"sharedllm-{machine_id}"
