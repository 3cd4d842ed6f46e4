# SPDX-License-Identifier: AGPL-3.0-or-later
"""The SharedLLM scheduler plugin: the registry of machines, one rpc-server actor per machine, and planning.

Installed by ``dask scheduler --preload sharedllm.scheduler``. Its operations (``operations``: each with the role it
needs, anonymous, user or admin) are served on the user port (``sharedllm.scheduler_plugins.userport``: users' keys)
and as ``scheduler.handlers["sharedllm_<name>"]`` on Dask's own port, the operator's (locked down by
``sharedllm.scheduler_plugins.lockdown``):

- ``state``: every machine with its workers, resources, rpc-server state and build;
- ``plan(estimate=..., ...)``: a topology for a model estimate, or ``ModelTooLarge`` / ``NoMachines``;
- ``acquire``, ``report``, ``close``...: sessions and their leases; ``users``, ``drain``, ``trust``...: the admin's.

Each machine's actor lives in its worker (``sharedllm.machine.actor``); the scheduler calls it over the connection the
worker opened (``actors``), never dialing a worker.

The tunnel: the plugin holds a relay master key (random per scheduler run) and hands each machine's actor only that
machine's relay key. A lease (``sharedllm_acquire``) tells each leased machine's relay the new lease id before it
answers, and returns one token per machine (minted for that lease and machine), the relay's endpoint and its
certificate fingerprint. When the session ends, the relays admit nobody again and drop its connections.

One module per concern: ``plugin`` (the class, its start and close), ``registry`` (machines, workers, actors),
``sessions`` (sessions and leases), ``planning``, ``guard`` (worker admission, trust, client limits), ``persistence``
(the state file), ``records`` (sessions, actors, constants).
"""

from sharedllm.scheduler_plugins.mesh.plugin import MeshPlugin
from sharedllm.scheduler_plugins.mesh.records import (
    EXTENSION,
    HEARTBEAT_LATE,
    LEASE_PUSH_TIMEOUT,
    LEASE_TOKEN_TTL,
    RECLAIM_GRACE,
    SWEEP_EVERY,
    ActorRecord,
    Session,
    default_catalog,
    validate_catalog_entry,
)

__all__ = [
    "EXTENSION", "HEARTBEAT_LATE", "LEASE_PUSH_TIMEOUT", "LEASE_TOKEN_TTL", "RECLAIM_GRACE", "SWEEP_EVERY",
    "ActorRecord", "MeshPlugin", "Session", "default_catalog", "validate_catalog_entry",
]
