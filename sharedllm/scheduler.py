# SPDX-License-Identifier: AGPL-3.0-or-later
"""Scheduler preload: ``dask scheduler --preload sharedllm.scheduler``. Thin adapter that installs ``MeshPlugin``.

Like the worker's (:mod:`sharedllm.worker`), every option can come from the environment (``SHAREDLLM_`` and the option's
name: ``SHAREDLLM_STATE_PATH``, ``SHAREDLLM_MAX_LEASES``) and the preload from Dask's configuration
(``distributed.scheduler.preload`` and ``distributed.scheduler.preload-argv``).
"""

from __future__ import annotations

import logging
import os

import click

from sharedllm import settings
from sharedllm.scheduler_plugins import MeshPlugin, lockdown

# The Dask port's guard must be in place before the scheduler listens (a preload is imported before that); it stays
# inert unless dask_setup gives it a policy (a mesh with a cluster secret).
lockdown.install()


@click.command(context_settings={"auto_envvar_prefix": "SHAREDLLM", "show_default": True})
@click.option("--reconcile-interval", type=float, default=0.5, show_default=True,
              help="seconds between checks that every machine has its rpc-server actor")
@click.option("--state-path", envvar=settings.env("state-path"), default=None,
              help="SQLite file that keeps the registry across restarts (default: none, state is lost on exit)")
@click.option("--persist-interval", type=float, default=5.0, show_default=True,
              help="seconds between writes of the state file")
@click.option("--secret-file", envvar=settings.env("cluster-secret-file"), default=None,
              help="file holding the cluster secret (else $SHAREDLLM_CLUSTER_SECRET)")
@click.option("--requests-per-minute", type=float, default=120.0, show_default=True, help="per-client rate limit")
@click.option("--tokens-per-minute", type=float, default=60_000.0, show_default=True, help="per-client rate limit")
@click.option("--max-leases", type=int, default=4, show_default=True, help="concurrent leases per client")
@click.option("--hub-port", type=click.IntRange(0, 65535), default=0,
              help="port of the relay hub, through which clients reach machines that take no inbound connections "
                   "(0: any free one, kept across restarts with --state-path; open it in your firewall)")
@click.option("--hub-host", default=None,
              help="address machines and clients reach the hub on (default: the scheduler's, as each reaches it)")
@click.option("--no-hub", is_flag=True, help="run no relay hub: every machine must accept inbound connections")
@click.option("--hub-address", default=None,
              help="HOST:PORT of a relay hub run elsewhere (python -m sharedllm.relay hub), instead of one here")
@click.option("--hub-key-file", default=None, help="the key of the hub given by --hub-address (same file as the hub's)")
@click.option("--hub-max-mbit-per-machine", type=float, default=None,
              help="bandwidth cap through the hub per machine, both ways together (default: none)")
@click.option("--user-port", type=click.IntRange(0, 65535), default=8789, show_default=True,
              help="port of the user port, through which users reach the mesh with their keys (0: any free one)")
@click.option("--no-user-port", is_flag=True, help="open no user port: only the operator's Dask clients use the mesh")
@click.option("--user-port-file", default=None, help="write the user port's address there (JSON) once it listens")
@click.option("--admin-key-file", default=None,
              help="where the mesh's first admin key is written at its first start (default: STATE_PATH.admin.key, "
                   "or ~/.config/sharedllm/admin.key without a state file)")
@click.option("--allow-anonymous", is_flag=True,
              help="let connections without a key use the mesh, with the tightest limits (off by default)")
@click.option("--show-user-names", is_flag=True,
              help="show users the names of other users' sessions, and the dashboard every user's name (else "
                   "pseudonyms)")
def dask_setup(scheduler, reconcile_interval, state_path, persist_interval, secret_file, requests_per_minute,
               tokens_per_minute, max_leases, hub_port, hub_host, no_hub, hub_address, hub_key_file,
               hub_max_mbit_per_machine, user_port, no_user_port, user_port_file, admin_key_file, allow_anonymous,
               show_user_names):
    from sharedllm.logs import follow_dask_logging
    from sharedllm.scheduler_plugins.trust import Limits
    from sharedllm.security import load_secret

    follow_dask_logging()
    try:
        secret = load_secret(secret_file)
    except ValueError:
        # A preload's exception is only logged and the scheduler would run unprotected: fail closed instead.
        logging.getLogger("sharedllm.scheduler").exception("cannot load the cluster secret; stopping")
        os._exit(2)
    limits = Limits(requests_per_minute, tokens_per_minute, max_leases)
    hub = None if no_hub else {"port": hub_port, "host": hub_host, "address": hub_address, "key_file": hub_key_file,
                               "max_mbit_per_machine": hub_max_mbit_per_machine}
    plugin = MeshPlugin(reconcile_interval=reconcile_interval, state_path=state_path,
                        persist_interval=persist_interval, secret=secret, limits=limits, hub=hub,
                        user_port=None if no_user_port else user_port, user_port_file=user_port_file,
                        admin_key_file=admin_key_file, allow_anonymous=allow_anonymous,
                        show_user_names=show_user_names)
    if secret is not None:  # a mesh with a cluster secret: the Dask port is locked down (scheduler_plugins.lockdown)
        lockdown.enforce(lockdown.Policy(secret, plugin.data.users, scheduler))
    # The scheduler calls start() on every plugin added before it finishes starting (see NOTES).
    scheduler.add_plugin(plugin)
