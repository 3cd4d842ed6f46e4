# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm plan MODEL``: which machines of a mesh would hold which layers of a model, before anything moves.

MODEL is a path, a URL or a catalog name. For a URL (or catalog entry) that is not in the model cache, only the
remote file's GGUF header is read (HTTP ``Range``, a few MB): a model too large for the mesh is refused with the
shortfall before a byte of its weights is downloaded or uploaded. ``--json`` prints the topology as data.
"""

from __future__ import annotations

import dataclasses
import json

import click

from sharedllm.cli.common import friendly_errors, open_mesh, scheduler_option


@click.command()
@click.argument("model")
@scheduler_option
@click.option("--n-ctx", default=2048, show_default=True, help="context per sequence")
@click.option("--parallel", default=1, show_default=True, help="sequences served at once (KV cache for each)")
@click.option("--machine", "machines", multiple=True, help="plan on these machines only, repeatable")
@click.option("--strategy", type=click.Choice(["spread", "pack"]), default="spread", show_default=True)
@click.option("--max-devices", type=int, default=None, help="at most this many devices")
@click.option("--output-layer", type=click.Choice(["auto", "client", "mesh"]), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="the topology as JSON")
@friendly_errors
def plan(model: str, scheduler: str, n_ctx: int, parallel: int, machines: tuple[str, ...], strategy: str,
         max_devices: int | None, output_layer: str, as_json: bool) -> None:
    """Plan MODEL on the mesh: the machines, layers and memory each would hold (nothing is loaded)."""
    from sharedllm.options import LoadOptions

    with open_mesh(scheduler) as mesh:
        topo = mesh.plan(model, options=LoadOptions(n_ctx=n_ctx, strategy=strategy, machines=machines or None,
                                                    max_devices=max_devices, output_layer=output_layer,
                                                    parallel=parallel))
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(topo), "machines": topo.machines,
                               "total_bytes": topo.total_bytes}, indent=1))
    else:
        click.echo(str(topo))
