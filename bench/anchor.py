# SPDX-License-Identifier: AGPL-3.0-or-later
"""The anchor, driven by hand: upstream's ``llama-server`` and ``llama-batched-bench`` (built by
``scripts/build_anchor.sh``) against the rpc-servers of a mesh, ``sharedllm serve`` as a subprocess, link emulators in
front of rpc-servers, and the clients that time streamed completions in processes of their own.

Used by ``bench/bench_anchor.py``. Every process started here is remembered and stopped by its pid
(:func:`stop_all`). Client processes run this file::

    python bench/anchor.py client URL            # JSON lines on stdin: {"op": "one"|"many", ...}; timings on stdout
    python bench/anchor.py api-client SPEC_JSON  # the same ops through the Python API (mesh.load in that process)
    python bench/anchor.py serve-linked RTT_MS -- SERVE_ARGS...   # `sharedllm serve` with an emulated link per machine

Nothing from sharedllm at module level (the HTTP client process never imports it).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

logger = logging.getLogger("bench.anchor")

ROOT = Path(__file__).resolve().parents[1]
READY = "BENCH_ANCHOR_READY "
MODEL_ID = "gemma"
API_KEY = "sk-bench-anchor"  # both servers are started with it; the same client sends it to both
_STARTED: dict[int, subprocess.Popen] = {}  # pid -> every process this module started and has not reaped yet


# --- the build ------------------------------------------------------------------------------------------------------


def anchor_bin() -> Path:
    """The folder of the anchor's executables (``scripts/build_anchor.sh``: seconds when cached, minutes else)."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_anchor.sh")], stdout=subprocess.PIPE, text=True,
                         check=True)
    path = Path(out.stdout.strip().splitlines()[-1])
    if not (path / "llama-server").exists():
        raise RuntimeError(f"scripts/build_anchor.sh printed {path}, which holds no llama-server")
    return path


def version_of(bin_dir: Path) -> str:
    out = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout + out.stderr).strip().splitlines()[-1] if (out.stdout + out.stderr).strip() else "?"


# --- processes ------------------------------------------------------------------------------------------------------


def spawn(cmd: list[str], log: Path | None, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
    """Start ``cmd`` (output to ``log``, or a pipe when None), remembered for :func:`stop_all`."""
    env = {**os.environ, **(env or {})}
    if log is not None:
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, **kw)
    else:
        proc = subprocess.Popen(cmd, env=env, **kw)
    _STARTED[proc.pid] = proc
    return proc


def stop(proc: subprocess.Popen | None, grace: float = 20.0) -> int | None:
    """SIGTERM (SIGINT for the servers that shut down gracefully on it is the caller's choice), then SIGKILL."""
    if proc is None:
        return None
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    _STARTED.pop(proc.pid, None)
    return proc.returncode


def stop_all() -> None:
    """Stop every process this module started and did not stop yet (by pid)."""
    for proc in list(_STARTED.values()):
        stop(proc, grace=5.0)


def measures_kept(timeout: float = 600.0) -> float:
    """Seconds until the measures file holds an entry (:mod:`sharedllm.engine.measures`, emptied before a cold load):
    a first load serves at once and measures its kernels while idle, then keeps them there for the next load."""
    from sharedllm.dataplane import read_json
    from sharedllm.engine import measures

    t0 = time.monotonic()
    while not read_json(measures.path()):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"no measures kept in {measures.path()} after {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_health(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> None:
    """Until ``url/health`` answers 200 (llama-server answers 503 while it loads)."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"the server exited with status {proc.returncode} while loading:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not healthy after {timeout:.0f} s")
        time.sleep(0.05)


# --- llama.cpp's own executables ------------------------------------------------------------------------------------


def llama_args(model: str, rpc: list[str], *, n_ctx: int, parallel: int, threads: int, n_batch: int, n_ubatch: int,
               tensor_split: list[float] | None) -> list[str]:
    """What llama-server and llama-batched-bench share: the model on the RPC devices, the same context and batches."""
    args = ["-m", model, "--rpc", ",".join(rpc), "-ngl", "99", "-t", str(threads), "-tb", str(threads),
            "-b", str(n_batch), "-ub", str(n_ubatch)]
    if tensor_split:
        args += ["-ts", ",".join(f"{x:g}" for x in tensor_split)]
    return args


class LlamaServer:
    """``llama-server --rpc A,B -ngl 99 -np N`` on 127.0.0.1; ``load_s``: from the spawn to ``/health`` 200."""

    def __init__(self, bin_dir: Path, model: str, rpc: list[str], log: Path, *, n_ctx: int, parallel: int,
                 threads: int, n_batch: int, n_ubatch: int, tensor_split: list[float] | None,
                 extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        # -c is the slots' total: each of the -np slots gets n_ctx (-np given: no unified KV, as our exact batches).
        self.cmd = [str(bin_dir / "llama-server"), *llama_args(model, rpc, n_ctx=n_ctx, parallel=parallel,
                                                                threads=threads, n_batch=n_batch, n_ubatch=n_ubatch,
                                                                tensor_split=tensor_split),
                    "-c", str(n_ctx * parallel), "-np", str(parallel), "--host", "127.0.0.1", "--port",
                    str(self.port), "-a", MODEL_ID, "--api-key", API_KEY, *extra]
        self.proc: subprocess.Popen | None = None
        self.load_s: float | None = None

    def start(self, timeout: float = 600.0) -> LlamaServer:
        t0 = time.perf_counter()
        # The engine's environment (sharedllm.engine): OpenMP threads that spin briefly, on a host shared with others.
        self.proc = spawn(self.cmd, self.log, env={"GOMP_SPINCOUNT": "10000"})
        wait_health(self.url, self.proc, timeout, self.log)
        self.load_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        stop(self.proc)
        self.proc = None


def batched_bench(bin_dir: Path, model: str, rpc: list[str], log: Path, *, prompt: int, tokens: int,
                  levels: list[int], threads: int, n_batch: int, n_ubatch: int, tensor_split: list[float] | None,
                  extra: list[str] = (), timeout: float = 600.0) -> list[dict[str, Any]]:
    """``llama-batched-bench``: per level (sequences decoded together), prompt and decode speed (``speed_tg``)."""
    n_kv = max(levels) * (prompt + tokens) + 64
    cmd = [str(bin_dir / "llama-batched-bench"), *llama_args(model, rpc, n_ctx=n_kv, parallel=max(levels),
                                                             threads=threads, n_batch=n_batch, n_ubatch=n_ubatch,
                                                             tensor_split=tensor_split),
           "-c", str(n_kv), "-npp", str(prompt), "-ntg", str(tokens), "-npl", ",".join(map(str, levels)),
           "--output-format", "jsonl", *extra]
    with open(log, "ab") as f:
        f.write((" ".join(cmd) + "\n").encode())
        f.flush()
        proc = spawn(cmd, None, env={"GOMP_SPINCOUNT": "10000"}, stdout=subprocess.PIPE, stderr=f, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            stop(proc)
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith('{"n_kv_max"')]
    if proc.returncode != 0 or not rows:
        raise RuntimeError(f"llama-batched-bench failed (status {proc.returncode}); see {log}")
    return rows


# --- sharedllm serve, as a user starts it ---------------------------------------------------------------------------


class SharedServe:
    """``sharedllm serve`` on the mesh at ``scheduler`` (its user port); ``load_s``: from the spawn to ``/health``
    200 after it printed its URL (the model is loaded by then). ``rtt_ms``: the same command through
    ``serve-linked`` (an emulated link between the engine's relays and each machine's, in processes of their own)."""

    def __init__(self, scheduler: str, key: str, model: str, log: Path, *, n_ctx: int, parallel: int,
                 rtt_ms: float = 0.0, extra: list[str] = ()):
        self.log = log
        args = ["serve", "--scheduler", scheduler, "--model", model, "--model-name", MODEL_ID, "--port", "0",
                "--api-key", API_KEY, "--n-ctx", str(n_ctx), "--parallel", str(parallel), "--max-queue", "64", *extra]
        if rtt_ms:
            self.cmd = [sys.executable, str(Path(__file__).resolve()), "serve-linked", repr(rtt_ms), "--", *args]
        else:
            self.cmd = [str(Path(sys.executable).with_name("sharedllm")), *args]
        self.env = {"SHAREDLLM_KEY": key, "PYTHONPATH": str(ROOT)}
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.load_s: float | None = None

    def start(self, timeout: float = 600.0) -> SharedServe:
        t0 = time.perf_counter()
        self.proc = spawn(self.cmd, self.log, env=self.env)
        deadline = time.monotonic() + timeout
        while self.url is None:
            text = self.log.read_text(errors="replace")
            m = re.search(r"serving model '[^']*' at (http://127\.0\.0\.1:\d+)/v1", text)
            if m:
                self.url = m.group(1)
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"sharedllm serve did not start (status {self.proc.poll()}):\n{tail}")
            time.sleep(0.05)
        wait_health(self.url, self.proc, max(1.0, deadline - time.monotonic()), self.log)
        self.load_s = time.perf_counter() - t0
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # serve closes its model and exits 0 on SIGINT
        stop(self.proc, grace=30.0)
        self.proc = None
        self.url = None


def serve_linked(rtt_ms: float, args: list[str]) -> int:
    """``serve-linked``: ``sharedllm serve ARGS`` whose load options carry a tunnel hook (an emulated link of
    ``rtt_ms`` between the engine's client relays and the machines' server relays, each link in its own process).
    The command is the CLI's own; only ``LoadOptions`` gets the hook, as ``mesh.load(..., tunnel_hook=...)`` would."""
    import dataclasses

    import sharedllm.options as options
    from bench.linkem import hook

    linked = hook(rtt_ms=rtt_ms, process=True, wire=True)

    @dataclasses.dataclass(frozen=True)
    class LinkedLoadOptions(options.LoadOptions):
        tunnel_hook: tuple[str, str | None, dict] | None = linked

    options.LoadOptions = LinkedLoadOptions
    from sharedllm.cli.main import cli

    return cli.main(args=args, prog_name="sharedllm", standalone_mode=True)


# --- link emulators in front of rpc-servers (llama-server's way to them) -------------------------------------------


class Links:
    """One emulated link of ``rtt_ms`` in front of each endpoint, each in a process of its own; none at 0 ms unless
    ``always`` (a comparison with a setup that has its emulators in front at 0 ms too: their hop is not free)."""

    def __init__(self, endpoints: list[str], rtt_ms: float, always: bool = False):
        from bench.linkem import LinkEmulator

        on = bool(rtt_ms) or always
        self.links = [LinkEmulator(ep, rtt_ms=rtt_ms, process=True).start() for ep in endpoints] if on else []
        for lk in self.links:
            if lk._proc is not None:
                _STARTED[lk._proc.pid] = lk._proc
        self.endpoints = [lk.endpoint for lk in self.links] if on else list(endpoints)

    def close(self) -> None:
        for lk in self.links:
            pid = lk._proc.pid if lk._proc is not None else None
            lk.close()
            _STARTED.pop(pid, None)
        self.links = []


# --- the clients: one streamed completion, many at once -------------------------------------------------------------


def sse_stream(client: Any, body: dict) -> Iterator[str]:
    """The text pieces of a streamed ``/v1/completions`` (server-sent events, parsed by hand)."""
    with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    yield chunk["choices"][0].get("text") or ""


def timed(start: Callable[[], Iterator[str]]) -> dict[str, Any]:
    """One stream, timed from the call: TTFT, decode tok/s, the gaps between tokens, the text."""
    res, stamps = common.timed_text(start)
    res["gaps_ms"] = [(b - a) * 1000 for a, b in itertools.pairwise(stamps)]
    res["stamps"] = stamps
    return res


def steady_tok_s(streams: list[list[float]]) -> float | None:
    """The streams' tokens per second while all of them decode: from the moment the last one got its first token to
    the moment the first one got its last (what ``llama-batched-bench`` times as its generation speed: every
    sequence decoding, no prompt read); None where they never all decode at once."""
    if not streams or not all(streams):
        return None
    start, end = max(s[0] for s in streams), min(s[-1] for s in streams)
    if end <= start:
        return None
    return sum(1 for s in streams for t in s if start < t <= end) / (end - start)


def many(n: int, prompts: list[str], stream: Callable[[str], Iterator[str]]) -> dict[str, Any]:
    """``n`` streams at once, one thread each, released together: aggregate tok/s, TTFT and inter-token latency."""
    results, t0 = common.released_together(n, lambda i: timed(lambda: stream(prompts[i % len(prompts)])))
    wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft_ms"] for r in results if r["ttft_ms"] is not None)
    gaps = sorted(g for r in results for g in r["gaps_ms"])
    tokens = sum(r["tokens"] for r in results)
    return {"streams": n, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "ttft_p50_ms": statistics.median(ttfts), "ttft_p95_ms": pct(ttfts, 95),
            "itl_p50_ms": statistics.median(gaps) if gaps else None, "itl_p95_ms": pct(gaps, 95),
            "steady_tok_s": steady_tok_s([r["stamps"] for r in results]),
            "texts": [r["text"] for r in results]}


def pct(sorted_values: list[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank) of sorted values."""
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values) + 0.5) - 1))]


def serve_ops(run_one: Callable[[str, int], Iterator[str]]) -> None:
    """Answer ops on stdin with timings on stdout, one JSON line each."""
    for line in sys.stdin:
        if not line.strip():
            continue
        op = json.loads(line)
        n = op.get("tokens", 0)
        try:
            if op["op"] == "one":
                res = timed(lambda p=op["prompt"], n=n: run_one(p, n))
                res.pop("gaps_ms")
            elif op["op"] == "many":
                res = many(len(op["prompts"]), op["prompts"], lambda p, n=n: run_one(p, n))
            else:
                res = {"error": f"unknown op {op['op']!r}"}
        except Exception as exc:
            res = {"error": repr(exc)}
        print(json.dumps(res), flush=True)


def request_body(prompt: str, tokens: int) -> dict[str, Any]:
    """The one request both servers get: greedy, ``tokens`` tokens, no prompt cache (each request reads its prompt:
    llama-server's per-request switch; ours is ``--no-prompt-cache``, and it ignores the field)."""
    return {"model": MODEL_ID, "prompt": prompt, "max_tokens": tokens, "temperature": 0.0, "top_k": 1, "top_p": 1.0,
            "seed": 0, "stream": True, "cache_prompt": False}


def http_client(url: str) -> int:
    """``client URL``: the same HTTP client code for llama-server and ``sharedllm serve``."""
    import httpx

    # TCP_NODELAY: httpx writes headers and body apart; Nagle would hold the body until the delayed ACK (40 ms).
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(base_url=url, timeout=600, transport=transport, limits=limits,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        print(READY + "{}", flush=True)
        serve_ops(lambda prompt, tokens: sse_stream(client, request_body(prompt, tokens)))
    return 0


def api_client(spec: dict[str, Any]) -> int:
    """``api-client SPEC``: the Python API in this process (``mesh.load``, streamed ``create_completion``)."""
    from sharedllm.client import Mesh

    key = os.environ["SHAREDLLM_KEY"]
    with Mesh(spec["scheduler"], key=key) as mesh:
        kwargs = dict(spec["options"])
        if spec.get("rtt_ms"):
            from bench.linkem import hook

            kwargs["tunnel_hook"] = hook(rtt_ms=spec["rtt_ms"], process=True, wire=True)
        t0 = time.perf_counter()
        llm = mesh.load(spec["model"], **kwargs)
        load_s = time.perf_counter() - t0
        try:
            print(READY + json.dumps({"load_s": load_s, "topology": str(llm.topology)}), flush=True)

            def run_one(prompt: str, tokens: int) -> Iterator[str]:
                kw = {k: v for k, v in request_body(prompt, tokens).items()
                      if k in ("max_tokens", "temperature", "top_k", "top_p", "seed")}
                for chunk in llm.create_completion(prompt, stream=True, **kw):
                    yield chunk["choices"][0].get("text") or ""

            serve_ops(run_one)
        finally:
            llm.close()
    return 0


class ClientProcess:
    """A client in its own process (``client URL`` or ``api-client SPEC``): ``one(...)``/``many(...)``."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 600.0):
        self._err = open(log, "ab")
        self.proc = spawn([sys.executable, str(Path(__file__).resolve()), *args], None,
                          env={"PYTHONPATH": str(ROOT), **(env or {})}, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1)
        self.info = self._read(timeout, ready=True)

    def _read(self, timeout: float, ready: bool = False) -> dict[str, Any]:
        box: list[str] = []

        def reader() -> None:
            while line := self.proc.stdout.readline():
                if not ready or line.startswith(READY):
                    box.append(line)
                    return

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(timeout)
        if not box:
            raise RuntimeError(f"client process {self.proc.pid} gave no answer (status {self.proc.poll()})")
        line = box[0][len(READY):] if ready else box[0]
        res = json.loads(line)
        if "error" in res:
            raise RuntimeError(f"client: {res['error']}")
        return res

    def ask(self, op: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(op) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def one(self, prompt: str, tokens: int) -> dict[str, Any]:
        return self.ask({"op": "one", "prompt": prompt, "tokens": tokens})

    def many(self, prompts: list[str], tokens: int) -> dict[str, Any]:
        return self.ask({"op": "many", "prompts": prompts, "tokens": tokens})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        stop(self.proc)
        self._err.close()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if argv[:1] == ["client"]:
        return http_client(argv[1])
    if argv[:1] == ["api-client"]:
        return api_client(json.loads(argv[1]))
    if argv[:1] == ["serve-linked"]:
        rest = argv[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        return serve_linked(float(argv[1]), rest)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
