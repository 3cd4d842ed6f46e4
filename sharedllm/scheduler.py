# SPDX-License-Identifier: AGPL-3.0-or-later
"""Scheduler preload: ``dask scheduler --preload sharedllm.scheduler``. Thin adapter that installs ``MeshPlugin``."""

from __future__ import annotations

import click

from sharedllm.scheduler_plugins import MeshPlugin


@click.command()
@click.option("--reconcile-interval", type=float, default=0.5, show_default=True,
              help="seconds between checks that every machine has its rpc-server actor")
def dask_setup(scheduler, reconcile_interval):
    # The scheduler calls start() on every plugin added before it finishes starting (see NOTES).
    scheduler.add_plugin(MeshPlugin(reconcile_interval=reconcile_interval))
