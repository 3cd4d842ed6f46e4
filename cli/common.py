# SPDX-License-Identifier: AGPL-3.0-or-later
"""What the commands share: one-line errors, common options, and connecting to a mesh."""

from __future__ import annotations

import functools
import sys

import click

from sharedllm import settings
from sharedllm.errors import MeshError
from sharedllm.options import DRAFT_MAX

scheduler_option = click.option("--scheduler", required=True, envvar=settings.env("scheduler"), show_envvar=True,
                                help="the mesh: its user port HOST:PORT (or a Dask address, the operator's way)")

output_layer_option = click.option(
    "--output-layer", type=click.Choice(["auto", "client", "mesh"]), default="auto", show_default=True,
    help="where the vocabulary projection runs: client (no logits on the wire), mesh (the last machine), auto "
         "(client when the model ties its embeddings)")



def draft_options(fn):
    """``--draft`` and ``--draft-max``: speculative decoding (``Mesh.load``'s ``draft`` and ``draft_max``)."""
    fn = click.option("--draft-min", default=0, show_default=True, type=click.IntRange(min=0),
                      help="with --draft: the fewest drafts a request takes per step when there are any, paying or "
                           "not (llama-server's --draft-min)")(fn)
    fn = click.option("--draft-max", default=DRAFT_MAX, show_default=True, type=click.IntRange(min=1),
                      help="with --draft: the most drafts a request takes per step (fewer as they pay)")(fn)
    return click.option("--draft", default=None, metavar="lookup|MODEL",
                        help="speculative decoding: 'lookup' (the context's own earlier tokens propose the next ones; "
                             "for edits, code, summaries) or a small GGUF with the model's vocabulary (a path, URL "
                             "or catalog name), run on this machine; the text is the text without drafts")(fn)


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


def open_mesh(scheduler: str):
    """The mesh at ``scheduler``, with the key and CA the command line was given (``sharedllm --key-file ...``)."""
    from sharedllm.client import Mesh

    ctx = click.get_current_context(silent=True)
    obj = (ctx.find_root().obj if ctx is not None else None) or {}
    return Mesh.connect(scheduler, key=obj.get("key"), key_file=obj.get("key_file"),
                        tls_ca_file=obj.get("tls_ca_file"))


def scheduler_call(scheduler: str, op: str, **kwargs) -> dict:
    """One SharedLLM operation on the scheduler at ``scheduler`` (the admin commands: trust, clients, catalog)."""
    with open_mesh(scheduler) as mesh:
        return mesh.control.call(op, **kwargs)


def connect(scheduler: str | None, machines: int):
    """A (mesh, closer) pair: the scheduler at ``scheduler``, or an embedded local mesh of ``machines`` machines."""
    from sharedllm.local import LocalMesh

    if scheduler:
        mesh = open_mesh(scheduler)
        return mesh, mesh.close
    click.echo(f"starting an embedded mesh of {machines} machine(s) on this host...", err=True)
    lm = LocalMesh(machines=machines).start()
    return lm.mesh(), lm.close
