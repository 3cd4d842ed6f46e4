# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm drain MACHINE``: stop new sessions on a machine, wait for its sessions to leave (each moves to other
machines at its next request), say it can go."""

from __future__ import annotations

import time

import click

from sharedllm.cli.common import friendly_errors, open_mesh, scheduler_option


@click.command()
@click.argument("machine")
@scheduler_option
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait for the machine's sessions")
@click.option("--undo", is_flag=True, help="allow new sessions on the machine again")
@friendly_errors
def drain(machine: str, scheduler: str, timeout: float, undo: bool) -> None:
    """Stop new leases on MACHINE, wait until no session uses it, then report that it can go."""

    with open_mesh(scheduler) as mesh:
        known = {m["machine_id"] for m in mesh.machines()}
        if machine not in known:
            raise ValueError(f"no machine {machine!r} in the mesh (it has {', '.join(sorted(known)) or 'none'}); "
                             "`sharedllm status` lists them")
        if undo:
            mesh.control.call("drain", machine=machine, undrain=True)
            click.echo(f"{machine} accepts new sessions again")
            return
        deadline = time.monotonic() + timeout
        out = mesh.control.call("drain", machine=machine)
        if out["sessions"]:
            click.echo(f"{machine} is draining; waiting for {len(out['sessions'])} session(s) to move off it (at their "
                       f"next request) or end: {', '.join(out['sessions'])}", err=True)
        while out["sessions"]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{machine} still serves {len(out['sessions'])} session(s) after {timeout:.0f}s; "
                                   "it stays drained (no new sessions): wait longer or stop those clients")
            time.sleep(1.0)
            out = mesh.control.call("drain", machine=machine)
        click.echo(f"{machine} is drained: no session uses it and none will be placed on it; it can go "
                   f"(`sharedllm drain {machine} --undo` to take it back)")
