# SPDX-License-Identifier: AGPL-3.0-or-later
"""Scheduler preload: ``dask scheduler --preload sharedllm.scheduler``. Thin adapter that installs ``MeshPlugin``."""

from __future__ import annotations

import click

from sharedllm.scheduler_plugins import MeshPlugin


@click.command()
@click.option("--reconcile-interval", type=float, default=0.5, show_default=True,
              help="seconds between checks that every machine has its rpc-server actor")
@click.option("--state-path", envvar="SHAREDLLM_STATE_PATH", default=None,
              help="SQLite file that keeps the registry across restarts (default: none, state is lost on exit)")
@click.option("--persist-interval", type=float, default=5.0, show_default=True,
              help="seconds between writes of the state file")
def dask_setup(scheduler, reconcile_interval, state_path, persist_interval):
    # The scheduler calls start() on every plugin added before it finishes starting (see NOTES).
    scheduler.add_plugin(MeshPlugin(reconcile_interval=reconcile_interval, state_path=state_path,
                                    persist_interval=persist_interval))
