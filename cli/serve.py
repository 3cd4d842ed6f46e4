# SPDX-License-Identifier: AGPL-3.0-or-later
"""``sharedllm serve``: one model of a mesh behind an OpenAI-compatible HTTP API.

    sharedllm serve --scheduler tcp://host:8786 --model gemma-3-270m --api-key sk-local-1
    curl -H 'Authorization: Bearer sk-local-1' http://127.0.0.1:8000/v1/models
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Iterable
from pathlib import Path

import click

from sharedllm import settings
from sharedllm.cli.common import draft_options, friendly_errors, open_mesh, output_layer_option, scheduler_option

logger = logging.getLogger("sharedllm.cli.serve")

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def load_api_keys(keys: Iterable[str], keys_file: str | os.PathLike | None) -> list[str]:
    """The accepted keys: those given, then one per line of ``keys_file`` (blank lines and ``#`` comments skipped)."""
    out = [k.strip() for k in keys if k.strip()]
    if keys_file is not None:
        lines = Path(keys_file).read_text().splitlines()
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
        if not from_file:
            raise click.UsageError(f"the API keys file {keys_file} holds no key (one key per line)")
        out += from_file
    bad = [k for k in out if any(c.isspace() for c in k)]
    if bad:
        raise click.UsageError("an API key cannot contain whitespace")
    return list(dict.fromkeys(out))


def _root_option(name: str):
    """An option of the ``sharedllm`` group itself (``--tls-ca-file``, ``--key-file``...)."""
    ctx = click.get_current_context(silent=True)
    return ((ctx.find_root().obj if ctx is not None else None) or {}).get(name)


def _bind(host: str, port: int) -> socket.socket:
    from sharedllm.openai_server import listen_socket

    try:
        return listen_socket(host, port)
    except OSError as exc:
        why = exc.strerror or exc
        raise OSError(f"cannot listen on {host}:{port} ({why}); pick another --port or --host") from None


@click.command()
@scheduler_option
@click.option("--model", "model_ref", required=True,
              help="a .gguf path, a URL, a catalog name or 'gemma-3-270m'")
@click.option("--model-name", default=None, help="the model id clients ask for  [default: the GGUF file name stem]")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port")
@click.option("--api-key", "api_keys", multiple=True, envvar=settings.env("api-key"), show_envvar=True,
              help="a key clients must send as 'Authorization: Bearer KEY' (repeatable; env SHAREDLLM_API_KEY)")
@click.option("--api-keys-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="a file of accepted keys, one per line")
@click.option("--insecure-no-auth", is_flag=True, help="allow serving without keys on a non-loopback address")
@click.option("--max-queue", default=16, show_default=True, type=click.IntRange(min=0),
              help="requests that may wait for the model; more are answered 429")
@click.option("--queue-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="seconds a request may wait for the model; longer is answered 503")
@click.option("--n-ctx", default=2048, show_default=True, help="context length in tokens, per sequence")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(min=1),
              help="requests each replica runs at once, decoded together (continuous batching)")
@click.option("--exact-batches/--fast-batches", default=True, show_default=True,
              help="with --parallel: exact, each request gets the text it gets alone (llama.cpp's kernels change with "
                   "the batch: decode passes stay small, prompts are read one at a time); fast, llama-server's way "
                   "(one KV cache, one pass per step with the new prompts in it: more tokens/s, first tokens sooner)")
@click.option("--max-stall-ms", default=500.0, show_default=True, type=click.FloatRange(min=0),
              help="with --parallel: while requests are generating, a step reads no more of new prompts than keeps "
                   "their next token within this many ms, or two decode steps' time when longer (a long prompt does "
                   "not freeze them; 0: n_batch tokens)")
@click.option("--prompt-cache/--no-prompt-cache", default=True, show_default=True,
              help="a request keeps the KV cells its prompt shares with an earlier one's and reads only the rest (a "
                   "chat's history is not read again every turn), where that leaves its text what it is alone")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1),
              help="copies of the model on disjoint machines; each request goes to the least loaded")
@click.option("--machine", "machines", multiple=True, help="place the model only on these machines (repeatable)")
@output_layer_option
@draft_options
@friendly_errors
def serve(scheduler, model_ref, model_name, host, port, api_keys, api_keys_file, insecure_no_auth, max_queue,
          queue_timeout, n_ctx, parallel, exact_batches, max_stall_ms, prompt_cache, replicas, machines,
          output_layer, draft, draft_max, draft_min) -> None:
    """Serve a model of the mesh with an OpenAI-compatible API (/v1/completions, /v1/chat/completions, ...)."""
    import uvicorn

    from sharedllm import models
    from sharedllm.client.userport import UserControl
    from sharedllm.openai_server import create_app
    from sharedllm.openai_server.auth import MeshUsers
    from sharedllm.options import LoadOptions

    keys = load_api_keys(api_keys, api_keys_file)
    through_user_port = "://" not in scheduler or scheduler.startswith("sharedllm://")  # mesh users' keys work too
    if not keys and not through_user_port:
        if not is_loopback(host) and not insecure_no_auth:
            raise click.UsageError(f"refusing to serve without an API key on {host}, which other machines can reach; "
                                   "pass --api-key or --api-keys-file (or --insecure-no-auth if you mean it)")
        click.echo(f"WARNING: serving WITHOUT authentication on {host}: anyone who can reach it can use the model. "
                   "Pass --api-key to require a key.", err=True)
    if not models.needs_catalog(model_ref):
        models.locate(model_ref)  # a bad path or URL fails here, before anything connects (nothing is downloaded)
    sock = _bind(host, port)  # fail on a taken port before the model is loaded
    verbose = click.get_current_context().find_root().params.get("verbose", 0)
    with contextlib.ExitStack() as stack:
        stack.callback(sock.close)
        mesh = open_mesh(scheduler)
        stack.callback(mesh.close)
        model = mesh.model(model_ref)  # resolved once: a catalog name or a URL becomes a local file here
        model_id = model_name or model.path.stem
        click.echo(f"loading {model.name} across the mesh at {scheduler}...", err=True)
        # Shared: the mesh's users send their own keys as API keys, and their requests run under their own limits.
        options = LoadOptions(n_ctx=n_ctx, machines=machines or None, output_layer=output_layer, parallel=parallel,
                              exact_batches=exact_batches, max_stall_ms=max_stall_ms, prompt_cache=prompt_cache,
                              shared=True, draft=draft, draft_max=draft_max, draft_min=draft_min)
        if draft is not None and draft != "lookup":
            options = options.replace(draft=mesh.model(draft))  # resolved once, for every replica
        if replicas > 1:
            from sharedllm.replicas import Replicas

            llm = Replicas.load(mesh, model, replicas=replicas, options=options.replace(wait_timeout=0))
        else:
            llm = mesh.load(model, options=options)
        stack.callback(llm.close)
        click.echo(str(llm.topology), err=True)
        # The name it was served by is an id clients may use too (`--model gemma-3-270m` serves gemma-3-270m-q4_k_m)
        users = None
        if isinstance(mesh.control, UserControl):  # the mesh's users' own keys are API keys too
            users = MeshUsers(mesh.control.address, tls_ca_file=_root_option("tls_ca_file"))
            stack.callback(users.close)
        app = create_app(llm, model_id=model_id, api_keys=keys, max_queue=max_queue, queue_timeout=queue_timeout,
                         aliases=[model_ref] if models.needs_catalog(model_ref) else [], users=users)
        if not keys and users is None and is_loopback(host):
            # Unauthenticated on loopback: answer only requests addressed to this machine, so that a web page cannot
            # reach the API through DNS rebinding.
            from starlette.middleware.trustedhost import TrustedHostMiddleware

            app.add_middleware(TrustedHostMiddleware, allowed_hosts=["localhost", "127.0.0.1", "[::1]"])
        from sharedllm.relay import join_endpoint

        url = f"http://{join_endpoint(host, sock.getsockname()[1])}/v1"
        click.echo(f"serving model '{model_id}' at {url} (API schema: /openapi.json, docs: /docs; "
                   f"{len(keys)} API key(s); {parallel} request(s) at once per replica"
                   f"{', exact batches' if exact_batches else ', fast batches'}); Ctrl-C stops", err=True)
        config = uvicorn.Config(app, log_config=None, access_log=verbose > 0, timeout_graceful_shutdown=10,
                                log_level="info" if verbose else "warning")
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the previous handler:
        # these ones only note it, so that the model is closed and the command exits 0.
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        click.echo("stopping: closing the model...", err=True)
