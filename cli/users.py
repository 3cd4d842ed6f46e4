# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm users add | list | rotate | grant | limit | rm`` and ``sharedllm audit``: the mesh's users and the trail
of its admins' actions (both need the admin role)."""

from __future__ import annotations

import json
import time

import click

from sharedllm.cli.common import friendly_errors, scheduler_call, scheduler_option


def _limits(requests_per_minute: float | None, tokens_per_minute: float | None, max_leases: int | None
            ) -> dict | None:
    out = {k: v for k, v in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute),
                             ("concurrent_leases", max_leases)) if v is not None}
    return out or None


_limit_options = [
    click.option("--requests-per-minute", type=float, default=None, help="the user's own request rate limit"),
    click.option("--tokens-per-minute", type=float, default=None, help="the user's own token rate limit"),
    click.option("--max-leases", type=int, default=None, help="the user's own limit of models loaded at once"),
]


def limit_options(fn):
    for option in reversed(_limit_options):
        fn = option(fn)
    return fn


@click.group()
def users() -> None:
    """The mesh's users: who may reach its user port, with which role and limits (admin)."""


@users.command("add")
@click.argument("name")
@scheduler_option
@click.option("--role", type=click.Choice(["user", "admin"]), default="user", show_default=True)
@limit_options
@friendly_errors
def users_add(name: str, scheduler: str, role: str, requests_per_minute, tokens_per_minute, max_leases) -> None:
    """Add user NAME and print their key, once: the mesh keeps only what verifies it."""
    out = scheduler_call(scheduler, "users", action="add", name=name, role=role,
                         limits=_limits(requests_per_minute, tokens_per_minute, max_leases))
    click.echo(f"user {name} ({role}) added; their key, shown this once (they connect with it as "
               "SHAREDLLM_KEY or --key-file):", err=True)
    click.echo(out["key"])


@users.command("rotate")
@click.argument("name")
@scheduler_option
@friendly_errors
def users_rotate(name: str, scheduler: str) -> None:
    """Give user NAME a new key (printed once); the old one stops working, and their open connections close."""
    out = scheduler_call(scheduler, "users", action="rotate", name=name)
    click.echo(f"user {name}'s new key, shown this once:", err=True)
    click.echo(out["key"])


@users.command("grant")
@click.argument("name")
@click.argument("role", type=click.Choice(["user", "admin"]))
@scheduler_option
@friendly_errors
def users_grant(name: str, role: str, scheduler: str) -> None:
    """Give user NAME the ROLE (user or admin)."""
    scheduler_call(scheduler, "users", action="grant", name=name, role=role)
    click.echo(f"user {name} has the {role} role")


@users.command("limit")
@click.argument("name")
@scheduler_option
@limit_options
@friendly_errors
def users_limit(name: str, scheduler: str, requests_per_minute, tokens_per_minute, max_leases) -> None:
    """Set user NAME's own limits (none given: the mesh's again)."""
    scheduler_call(scheduler, "users", action="limit", name=name,
                   limits=_limits(requests_per_minute, tokens_per_minute, max_leases))
    click.echo(f"user {name}'s limits set")


@users.command("rm")
@click.argument("name")
@scheduler_option
@friendly_errors
def users_rm(name: str, scheduler: str) -> None:
    """Remove user NAME: their key stops working."""
    scheduler_call(scheduler, "users", action="remove", name=name)
    click.echo(f"user {name} removed")


@users.command("list")
@scheduler_option
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly_errors
def users_list(scheduler: str, as_json: bool) -> None:
    """The mesh's users (never their keys)."""
    rows = scheduler_call(scheduler, "users")["users"]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'USER':<24} {'ROLE':<6} {'KEY ID':<13} {'CREATED':<20} LIMITS")
    for u in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(u["created"]))
        limits = ", ".join(f"{k}={v:g}" for k, v in (u.get("limits") or {}).items()) or "the mesh's"
        click.echo(f"{u['name']:<24} {u['role']:<6} {u['key_id']:<13} {created:<20} {limits}")


@click.command()
@scheduler_option
@click.option("--limit", default=50, show_default=True, help="the last N actions")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@friendly_errors
def audit(scheduler: str, limit: int, as_json: bool) -> None:
    """The audit trail: every admin action (and refused attempt at one), who, what, when and from where."""
    entries = scheduler_call(scheduler, "audit", limit=limit)["entries"]
    if as_json:
        click.echo(json.dumps(entries, indent=1))
        return
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["time"]))
        target = f" {e['target']}" if e.get("target") else ""
        click.echo(f"{when}  {e['who']} ({e['role']}, {e['via']} from {e['address'] or '?'}): "
                   f"{e['action']}{target}: {e['outcome']}")
