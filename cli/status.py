# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm status``: the machines of a mesh, their resources and rpc-servers."""

from __future__ import annotations

import json

import click
from sharedllm.cli.main import friendly_errors


@click.command()
@click.option("--scheduler", required=True, envvar="SHAREDLLM_SCHEDULER", help="scheduler address")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly_errors
def status(scheduler: str, as_json: bool) -> None:
    """Show the machines of a mesh: resources and rpc-servers."""
    from sharedllm.client import Mesh
    from sharedllm.ggml import build_info

    with Mesh.connect(scheduler) as mesh:
        machines = mesh.machines()
        if as_json:
            click.echo(json.dumps({"scheduler": scheduler, "machines": list(machines)}, indent=2, default=str))
            return
        click.echo(str(machines))
        mine = build_info()
        for m in machines:
            proto = (m.get("rpc") or {}).get("protocol")
            if proto and proto.split(".")[0] != mine["rpc_protocol"].split(".")[0]:
                click.echo(f"warning: {m['machine_id']} speaks RPC protocol {proto}, this client "
                           f"{mine['rpc_protocol']}: it will not be placed", err=True)


