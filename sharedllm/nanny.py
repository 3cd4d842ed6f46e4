# SPDX-License-Identifier: AGPL-3.0-or-later
"""The nanny's preload: ``dask worker SCHEDULER --preload sharedllm.worker --preload-nanny sharedllm.nanny``.

A Dask nanny listens for anyone and runs what it is sent (``run``, plugins, ``instantiate``): this preload makes it
drop every connection from another host (:mod:`sharedllm.machine.door`) and tells its worker so; the worker's preload
refuses to serve under a nanny that did not."""

from __future__ import annotations

import os

from sharedllm.machine.door import NANNY_DOOR, local_only


def dask_setup(nanny) -> None:
    local_only(nanny)
    os.environ[NANNY_DOOR] = "1"  # the worker process, started next, inherits it
