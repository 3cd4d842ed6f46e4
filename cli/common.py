# SPDX-License-Identifier: AGPL-3.0-or-later
"""What the commands share: one-line errors, common options, and connecting to a mesh."""

from __future__ import annotations

import functools
import sys

import click

from sharedllm import settings
from sharedllm.errors import MeshError

scheduler_option = click.option("--scheduler", required=True, envvar=settings.env("scheduler"), show_envvar=True,
                                help="scheduler address")

output_layer_option = click.option(
    "--output-layer", type=click.Choice(["auto", "client", "mesh"]), default="auto", show_default=True,
    help="where the vocabulary projection runs: client (no logits on the wire), mesh (the last machine), auto "
         "(client when the model ties its embeddings)")


def friendly_errors(fn):
    """Turn expected failures into one line on stderr and exit status 1 (2 for usage errors)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.exceptions.Exit:
            raise
        except click.ClickException:
            raise
        except (MeshError, ValueError, OSError, TimeoutError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            click.echo(f"error: {msg}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def scheduler_call(scheduler: str, op: str, **kwargs) -> dict:
    """One SharedLLM operation on the scheduler at ``scheduler`` (the admin commands: trust, clients, catalog)."""
    from sharedllm.client import Mesh

    with Mesh.connect(scheduler) as mesh:
        return mesh.control.call(op, **kwargs)


def connect(scheduler: str | None, machines: int):
    """A (mesh, closer) pair: the scheduler at ``scheduler``, or an embedded local mesh of ``machines`` machines."""
    from sharedllm.client import Mesh
    from sharedllm.local import LocalMesh

    if scheduler:
        mesh = Mesh.connect(scheduler)
        return mesh, mesh.close
    click.echo(f"starting an embedded mesh of {machines} machine(s) on this host...", err=True)
    lm = LocalMesh(machines=machines).start()
    return lm.mesh(), lm.close
