# SPDX-License-Identifier: AGPL-3.0-or-later
"""A donor's Dask ports open to its own host only.

A Dask worker and its nanny listen for anyone, and both run what they are sent: a pickled function for ``run``, a
task, a plugin. A machine of the mesh needs none of it from another host: the scheduler reaches its actor over the
worker's own connection (``sharedllm.machine.actor``), clients reach its rpc-server through its relay, and the nanny
and its worker talk on this host. So :func:`local_only` makes a worker's or nanny's listener drop every connection
from another host as it arrives, before a byte of it is decoded (a pickled handshake included), and counts it. The
worker's preload (``sharedllm.worker``) closes the worker's door; the nanny's (``--preload-nanny sharedllm.nanny``)
closes the nanny's, and tells the worker it did (``SHAREDLLM_NANNY_DOOR`` in the environment the worker inherits).

What this costs the operator: the scheduler cannot dial the machine's worker or nanny (``Client.run`` on it, a
restart after its heartbeats stop): the machine's own nanny restarts a worker that died, the agent its rpc-server.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

NANNY_DOOR = "SHAREDLLM_NANNY_DOOR"  # set by the nanny's preload, read by its worker's
ATTRIBUTE = "_sharedllm_local_only"
refused: collections.Counter = collections.Counter()  # peer host -> connections dropped
_addresses: tuple[float, set[str]] = (0.0, set())
_installed = False


def local_only(server: Any) -> None:
    """Drop every connection to ``server`` (a Dask worker or nanny) from another host (see the module)."""
    _install()
    setattr(server, ATTRIBUTE, True)


def is_local(host: str) -> bool:
    """Whether ``host`` (an IP address) is this host: loopback, or an address of one of its interfaces."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback):
        return True
    return str(ip) in _own_addresses() or str(ip) in _own_addresses(refresh=True)


def _own_addresses(refresh: bool = False) -> set[str]:
    global _addresses
    at, known = _addresses
    if refresh and time.monotonic() - at < 10.0:
        return known  # asked again within seconds: the interfaces have not changed
    if refresh or not at:
        import psutil

        known = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family.name in ("AF_INET", "AF_INET6")}
        _addresses = (time.monotonic(), known)
    return known


def _install() -> None:
    global _installed
    import distributed.comm.core as comm_core
    from distributed.comm.addressing import get_address_host

    if _installed:
        return
    _installed = True
    original = comm_core.BaseListener.on_connection

    async def on_connection(self, comm, handshake_overrides=None):
        server = getattr(getattr(self, "comm_handler", None), "__self__", None)
        if getattr(server, ATTRIBUTE, False):
            try:
                host = get_address_host(comm.peer_address)
            except ValueError:
                host = ""
            if not is_local(host):
                refused[host] += 1
                if refused[host] in (1, 10, 100, 1000):
                    logger.warning("refused a connection to this machine's %s from %s (%d so far): its Dask ports "
                                   "serve this host only", type(server).__name__.lower(), host, refused[host])
                comm.abort()
                return None
        return await original(self, comm, handshake_overrides)

    comm_core.BaseListener.on_connection = on_connection
