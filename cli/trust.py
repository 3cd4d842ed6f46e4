# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm trust list | ban MACHINE | unban MACHINE`` and ``sharedllm clients list | ban | unban``."""

from __future__ import annotations

import json
import time

import click

from sharedllm.cli.common import friendly_errors, scheduler_call, scheduler_option

_scheduler = scheduler_option


@click.group()
def trust() -> None:
    """The trust registry: every machine's record and score; bans."""


@trust.command("list")
@_scheduler
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly_errors
def trust_list(scheduler: str, as_json: bool) -> None:
    """Every machine the mesh has vouched for, with its trust score."""
    rows = scheduler_call(scheduler, "trust")["machines"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'MACHINE':<20} {'SCORE':>5}  {'STATE':<10} {'SESSIONS':>8} {'TOKENS':>9} {'FAILURES':>8}  "
               f"{'LAST SEEN':<19} LABELS")
    for r in rows:
        state = "banned" if r["banned"] else "probation" if r["probation"] else "trusted" if r["score"] >= 0.7 else "-"
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_seen"]))
        labels = ",".join(f"{k}={v}" for k, v in r["labels"].items()) or "-"
        click.echo(f"{r['machine_id']:<20} {r['score']:>5.2f}  {state:<10} {r['sessions']:>8} {r['tokens']:>9} "
                   f"{r['failures']:>8}  {seen:<19} {labels}")


@trust.command("ban")
@click.argument("machine")
@_scheduler
@friendly_errors
def trust_ban(machine: str, scheduler: str) -> None:
    """Never place anything on MACHINE again (until unbanned)."""
    scheduler_call(scheduler, "trust", action="ban", machine=machine)
    click.echo(f"{machine} is banned: it will not be placed")


@trust.command("unban")
@click.argument("machine")
@_scheduler
@friendly_errors
def trust_unban(machine: str, scheduler: str) -> None:
    """Allow MACHINE in placement again."""
    scheduler_call(scheduler, "trust", action="unban", machine=machine)
    click.echo(f"{machine} is no longer banned")


@click.group()
def clients() -> None:
    """Clients of the mesh and their leases; bans."""


@clients.command("list")
@_scheduler
@friendly_errors
def clients_list(scheduler: str) -> None:
    """Connected (and banned) clients with their sessions."""
    for c in scheduler_call(scheduler, "clients")["clients"]:
        strikes = f"  invalid models (last hour): {c['strikes']}" if c.get("strikes") else ""
        click.echo(f"{c['client']}  {'banned' if c['banned'] else 'ok'}  sessions: {', '.join(c['sessions']) or '-'}"
                   f"{strikes}")


@clients.command("ban")
@click.argument("client")
@_scheduler
@friendly_errors
def clients_ban(client: str, scheduler: str) -> None:
    """Refuse CLIENT's requests and end its sessions."""
    scheduler_call(scheduler, "clients", action="ban", client=client)
    click.echo(f"client {client} is banned")


@clients.command("unban")
@click.argument("client")
@_scheduler
@friendly_errors
def clients_unban(client: str, scheduler: str) -> None:
    """Accept CLIENT's requests again."""
    scheduler_call(scheduler, "clients", action="unban", client=client)
    click.echo(f"client {client} is no longer banned")
