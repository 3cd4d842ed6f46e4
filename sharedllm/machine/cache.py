# SPDX-License-Identifier: AGPL-3.0-or-later
"""The upkeep of a machine's tensor cache (llama.cpp's ``-c``): least recently used files evicted beyond the cap, and
what a crashed rpc-server half-wrote dropped. Part of :class:`sharedllm.machine.server.RPCServerSupervisor`."""

from __future__ import annotations

import contextlib
import logging

from sharedllm.machine.state import RPCServerConfig

logger = logging.getLogger("sharedllm.machine")


class CacheKeeper:
    """The tensor cache of a machine's rpc-server (``config.cache_dir``, capped at ``config.cache_cap``)."""

    def __init__(self, config: RPCServerConfig):
        self.config = config
        self.stats: dict = {}  # files, bytes, cap: as last measured

    def maintain(self) -> dict:
        """Evict least recently used tensor-cache files beyond the cap; refresh the reported cache stats.

        Call it only while no session is loading (before a start, after a session ends): the server writes cache
        files during a load."""
        from sharedllm import tensor_cache

        d = self.config.cache_dir
        if not d:
            return {}
        try:
            evicted = tensor_cache.prune(d, self.config.cache_cap)
            if evicted:
                logger.info("tensor cache %s: evicted %d file(s) beyond %d MiB", d, len(evicted),
                            self.config.cache_cap >> 20)
            self.stats = {**tensor_cache.stats(d), "cap": self.config.cache_cap}
        except OSError as exc:
            logger.warning("could not maintain the tensor cache %s: %s", d, exc)
        return self.stats

    def discard_partial(self, started_at: float | None) -> None:
        # llama.cpp writes cache files with an unchecked ofstream: a crash mid-write leaves a truncated file that a
        # later load would take as a hit (wrong weights). Drop what the dead server wrote.
        from sharedllm import tensor_cache

        if self.config.cache_dir and started_at:
            with contextlib.suppress(OSError):
                dropped = tensor_cache.discard_since(self.config.cache_dir, started_at)
                if dropped:
                    logger.warning("dropped %d tensor-cache file(s) written by the crashed rpc-server", len(dropped))
