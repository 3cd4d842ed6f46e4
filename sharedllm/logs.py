# SPDX-License-Identifier: AGPL-3.0-or-later
"""Logging for the preloads: SharedLLM's lines go where Dask's own go."""

from __future__ import annotations

import logging


def follow_dask_logging() -> None:
    """Give the ``sharedllm`` loggers the handlers Dask set up for ``distributed`` (the scheduler's or the worker's
    log), at INFO, unless the operator configured them already. Without it only warnings would show, bare."""
    ours = logging.getLogger("sharedllm")
    if ours.handlers:
        return
    for handler in logging.getLogger("distributed").handlers:
        ours.addHandler(handler)
    if ours.handlers:
        ours.propagate = False  # the root logger (if anything set it up) would print every line a second time
        if ours.level == logging.NOTSET:
            ours.setLevel(logging.INFO)
