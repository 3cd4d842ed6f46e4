# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm``: the command line. Also reachable as ``dask sharedllm``.

    sharedllm up --machines 2                      # an embedded local mesh, until Ctrl-C
    sharedllm generate MODEL "Once upon a time"    # stream tokens (embedded mesh unless --scheduler)
    sharedllm status --scheduler tcp://host:8786   # machines, resources, rpc-servers
    sharedllm demo                                 # the quick-start demo on an embedded mesh
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import click

from sharedllm import settings
from sharedllm.cli.common import connect, draft_options, friendly_errors, output_layer_option

logger = logging.getLogger("sharedllm.cli")


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    fmt = "%(asctime)s %(name)s %(levelname)s %(message)s"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=fmt)
    logging.getLogger("sharedllm").setLevel(level if verbose else logging.INFO)
    # Dask's own chatter (comm retries, closing clients) is noise for a command-line user.
    logging.getLogger("distributed").setLevel(logging.DEBUG if verbose > 1 else logging.ERROR)


@click.group(name="sharedllm", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="more log output (-vv for debug)")
@click.option("--tls-ca-file", envvar=settings.env("tls.ca-file"), show_envvar=True, default=None,
              help="CA of a TLS mesh (tls://)")
@click.option("--tls-cert", envvar=settings.env("tls.cert"), show_envvar=True, default=None,
              help="client certificate for a TLS mesh")
@click.option("--tls-key", envvar=settings.env("tls.key"), show_envvar=True, default=None,
              help="client key for a TLS mesh (Dask's port)")
@click.option("--key", envvar=settings.env("key"), show_envvar=True, default=None,
              help="your user key for the mesh's user port (prefer --key-file: a command line is visible to others)")
@click.option("--key-file", envvar=settings.env("key-file"), show_envvar=True, default=None,
              help="a file holding your user key")
@click.version_option(package_name="sharedllm")
@click.pass_context
def cli(ctx: click.Context, verbose: int, tls_ca_file: str | None, tls_cert: str | None, tls_key: str | None,
        key: str | None, key_file: str | None) -> None:
    """SharedLLM: run one GGUF model split across the machines of a mesh.

    Commands reach a mesh at --scheduler HOST:PORT, its user port, with your key (--key-file, or SHAREDLLM_KEY_FILE);
    a Dask address (tcp://, tls://) goes through Dask's port, which on a mesh with a cluster secret takes only the
    admin's key."""
    _setup_logging(verbose)
    ctx.obj = {"key": key, "key_file": key_file, "tls_ca_file": tls_ca_file}
    if tls_cert or tls_key:
        if not (tls_ca_file and tls_cert and tls_key):
            raise click.UsageError("a TLS mesh needs --tls-ca-file, --tls-cert and --tls-key together")
        import dask

        # Every Dask client made below (Mesh.connect) picks these up, as `dask` itself does.
        dask.config.set({"distributed.comm.tls.ca-file": tls_ca_file, "distributed.comm.tls.client.cert": tls_cert,
                         "distributed.comm.tls.client.key": tls_key, "distributed.comm.require-encryption": True})


@cli.command()
@click.option("--machines", default=2, show_default=True, help="emulated machines (one worker and rpc-server each)")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--state-path", envvar=settings.env("state-path"), show_envvar=True, default=None,
              help="SQLite file keeping the scheduler's registry across restarts")
@click.option("--tls", is_flag=True, help="Dask comms over TLS, with a temporary CA made for this mesh")
@click.option("--insecure-direct-rpc", is_flag=True,
              help="rpc-servers serve clients directly, without the TLS relay and tokens: trusted LANs only")
@friendly_errors
def up(machines: int, host: str, state_path: str | None, tls: bool, insecure_direct_rpc: bool) -> None:
    """Start an embedded local mesh: a scheduler and one worker per emulated machine. Ctrl-C stops it.

    Like a service manager, it restarts what dies: the scheduler on its port with its state file, and the workers.
    """
    from sharedllm.local import LocalMesh

    if insecure_direct_rpc:
        from sharedllm.relay import warn_insecure_direct

        warn_insecure_direct("sharedllm up")
    # Ctrl-C stops it even when started from a shell or CI runner that ignores SIGINT for background jobs (a
    # process inherits an ignored SIGINT, and Python then never raises KeyboardInterrupt).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    lm = LocalMesh(machines=machines, host=host, state_path=state_path, tls=tls,
                   insecure_direct_rpc=insecure_direct_rpc)
    click.echo(f"starting {machines} machine(s)...", err=True)
    lm.start()
    try:
        click.echo(f"user port: {lm.user_address}  (users connect here with their keys)")
        click.echo(f"admin key: {lm.admin_key_file}  (the mesh's admin: `sharedllm --key-file THIS users add NAME` "
                   "issues users their keys)")
        click.echo(f"dask port: {lm.address}  (machines and the operator only)")
        click.echo(f"dashboard: {lm.dashboard_link}")
        secret_file = lm.workdir / "cluster-secret"
        from sharedllm.security import write_private

        write_private(secret_file, lm.secret or "")
        click.echo(f"cluster secret: {secret_file} (workers joining from elsewhere need it: --secret-file)")
        tls_option, tls_arg = "", ""
        if lm.tls:
            tls_option = f"--tls-ca-file {lm.tls.ca} "
            tls_arg = f", tls_ca_file=\"{lm.tls.ca}\""
            click.echo(f"tls: the mesh's CA is {lm.tls.ca}")
        click.echo(str(lm.mesh().machines()))
        click.echo(f"\nconnect:  python -c 'import sharedllm; m = sharedllm.Mesh(\"{lm.user_address}\", "
                   f"key=open(\"{lm.admin_key_file}\").read().strip(){tls_arg}); print(m.machines())'")
        click.echo(f"generate: sharedllm {tls_option}--key-file {lm.admin_key_file} generate gemma-3-270m "
                   f"'Once upon a time' --scheduler {lm.user_address}")
        click.echo("Ctrl-C to stop", err=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            time.sleep(0.5)
            for name in lm.supervise():
                click.echo(f"restarted {name}", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("stopping the mesh...", err=True)
        lm.close()


@cli.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--scheduler", default=None, help="scheduler address; without it an embedded mesh is started")
@click.option("--machines", default=2, show_default=True, help="machines of the embedded mesh")
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--seed", default=None, type=int)
@click.option("--n-ctx", default=2048, show_default=True)
@click.option("--chat", is_flag=True, help="treat PROMPT as a user chat message (chat template from the GGUF)")
@output_layer_option
@draft_options
@friendly_errors
def generate(model, prompt, scheduler, machines, max_tokens, temperature, seed, n_ctx, chat, output_layer, draft,
             draft_max, draft_min) -> None:
    """Stream a completion of PROMPT by MODEL (a .gguf path or 'gemma-3-270m') to stdout."""
    from sharedllm import models

    if not models.needs_catalog(model):
        models.locate(model)  # a bad path or URL fails here, before any process starts (nothing is downloaded)
    mesh, close = connect(scheduler, machines)
    try:
        extra = {"seed": seed} if seed is not None else {}
        with mesh.load(model, n_ctx=n_ctx, output_layer=output_layer, draft=draft, draft_max=draft_max,
                       draft_min=draft_min, **extra) as llm:
            click.echo(str(llm.topology), err=True)
            kwargs = {"max_tokens": max_tokens, "temperature": temperature, "stream": True}
            if chat:
                for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], **kwargs):
                    click.echo(chunk["choices"][0]["delta"].get("content", ""), nl=False)
            else:
                click.echo(prompt, nl=False)
                for chunk in llm.create_completion(prompt, **kwargs):
                    click.echo(chunk["choices"][0]["text"], nl=False)
            click.echo()
    finally:
        close()


@cli.command()
@click.option("--machines", default=2, show_default=True)
@click.option("--max-tokens", default=64, show_default=True)
@friendly_errors
def demo(machines: int, max_tokens: int) -> None:
    """The quick start: an embedded mesh, Gemma 3 270M split across it, real tokens streamed."""
    from sharedllm.local import LocalMesh

    click.echo(f"starting an embedded mesh of {machines} machines (a scheduler, {machines} workers, "
               f"{machines} rpc-servers)...", err=True)
    with LocalMesh(machines=machines) as lm:
        mesh = lm.mesh()
        click.echo(f"scheduler {lm.address}, dashboard {lm.dashboard_link}\n")
        click.echo(str(mesh.machines()) + "\n")
        with mesh.load("gemma-3-270m", n_ctx=2048) as llm:
            click.echo(str(llm.topology) + "\n")
            click.echo(f"(planned in {llm.plan_ms:.0f} ms, loaded in {llm.load_seconds:.1f} s)\n")
            prompt = "Once upon a time"
            click.echo(prompt, nl=False)
            t0, n = time.perf_counter(), 0
            for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0, stream=True):
                click.echo(chunk["choices"][0]["text"], nl=False)
                n += 1
                if "usage" in chunk:  # the last chunk says how many tokens (the chunks are one more: the finish)
                    n = chunk["usage"]["completion_tokens"]
            dt = time.perf_counter() - t0
            click.echo(f"\n\n[{n} tokens in {dt:.1f} s, {n / dt:.1f} tok/s across {len(llm.topology.machines)} "
                       "machines]")


def _register() -> None:
    # Commands that live in their own modules.
    from sharedllm.cli.drain import drain
    from sharedllm.cli.models import models
    from sharedllm.cli.plan import plan
    from sharedllm.cli.serve import serve
    from sharedllm.cli.status import status
    from sharedllm.cli.trust import clients, trust
    from sharedllm.cli.users import audit, users

    for command in (status, drain, serve, models, trust, clients, plan, users, audit):
        cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    # Run through the real module (``python -m sharedllm.cli.main``): its command modules import it by name.
    from sharedllm.cli.main import main as _main

    _main()
else:
    _register()
