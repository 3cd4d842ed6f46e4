# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: many users at once on one model, batched, one at a time, and llama-cpp-python's own server.

    .venv/bin/python bench/bench_concurrency.py [--levels 1,2,4,8,16] [--tokens 128] [--markdown]
                                                [--out bench/results/concurrency.json] [--no-llama-server]

Gemma 3 270M on an embedded 2-machine loopback mesh (``LocalMesh``). For each number of concurrent streams N, N
different greedy prompts are streamed at once (``max_tokens=--tokens``), through:

- ``batched``: one handle loaded with ``parallel=max(levels)``: the N requests are N sequences of one batch, in
  decode passes of at most the batch that keeps each sequence's text exact (``exact_batches``, measured at load);
- ``batched (fast)``: the same with ``exact_batches=False``: one KV cache for all sequences (llama-server's way), one
  pass per step with the new prompts in it;
- ``one at a time``: the same mesh, a handle with ``parallel=1``: the requests queue behind each other (what every
  version of SharedLLM before continuous batching did, and what llama-cpp-python's server does);
- ``llama_cpp.server``: ``python -m llama_cpp.server`` on this machine (local, no mesh: the thing our users would run
  otherwise), with ``--interrupt_requests False`` so that a new request does not cut the running one.

each through the Python API (threads calling ``create_completion(stream=True)``; not for ``llama_cpp.server``) and
over HTTP (``sharedllm.openai_server`` / the llama-cpp-python server, streamed with httpx, one thread per stream).
Then the batched handles again (Python API; 1, 8 and the most streams) with an emulated link of ``--rtt`` ms to
every machine (``bench/linkem.py``, each in its own process, on the wire between the client relay and the machine's
relay, as in ``bench_link.py``): the mesh's machines are not on one computer.

Per run: aggregate tokens/s (every stream's tokens over the wall time from the common start to the last token), p50
and p95 time to first token (from each request's start), p50 inter-token latency (every gap of every stream). Runs
of one setup go level by level in one process, side by side, so the ratios compare like with like: the bars are the
batched aggregate tokens/s at 8 streams over 1 stream (>= 3x) and the batched p50 TTFT at 8 streams over 1 stream
(<= 3x), for each batched setup. ``passes/step``: the engine's llama_decode passes per step (each a round trip
to every machine) over the run. The texts of the exact batched runs are checked against the one-at-a-time texts
(the oracle: the same text alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common, linkem

logger = logging.getLogger("bench_concurrency")

MODEL_ID = "gemma"
BAR_THROUGHPUT, BAR_TTFT = 3.0, 3.0


def http_stream(url: str, prompt: str, tokens: int) -> Iterator[str]:
    import httpx

    body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True}
    with httpx.Client(timeout=600) as h, h.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])["choices"][0]["text"]


def _link(rtt: float) -> tuple | None:
    """The emulated link of ``rtt`` ms to each machine: a process of its own (threads in the engine would share its
    GIL with the engine's loop) on the wire (what crosses a real link: TLS, after the client relay's coalescing and
    prefetching)."""
    return linkem.hook(rtt_ms=rtt, process=True, wire=True) if rtt else None


def _idle_stats(llm, before: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """The engine's statistics once it reported the end of the run (running 0, more steps than ``before``); with
    ``parallel=1`` (no batch scheduler, no steps) at once."""
    deadline = time.monotonic() + timeout
    while "steps" in before:
        stats = llm.engine_stats  # not load_stats: its running is 0 once the calls return, before the last report
        if (stats.get("running") == 0 and stats.get("steps", 0) > before["steps"]) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)
    return llm.load_stats


def mesh_setups(args: argparse.Namespace, mesh) -> dict[str, dict[str, Any]]:
    """The handles on the loopback mesh: batched (exact and fast) and one at a time, through the Python API and
    HTTP; then batched on the emulated link of each ``--rtt``, through the Python API."""
    from sharedllm.openai_server import ServerThread, create_app

    top = max(args.levels)
    setups = [("batched", top, True, 0, ("python", "http")), ("batched (fast)", top, False, 0, ("python",)),
              ("one at a time", 1, True, 0, ("python", "http"))]
    for rtt in args.rtt:
        setups += [(f"batched, rtt {rtt:g} ms", top, True, rtt, ("python",)),
                   (f"batched (fast), rtt {rtt:g} ms", top, False, rtt, ("python",))]
    out: dict[str, dict[str, Any]] = {}
    for name, parallel, exact, rtt, apis in setups:
        # The levels send the same prompts again: without the prompt cache, each reads its prompt as at first.
        with mesh.load("gemma-3-270m", n_ctx=common.STREAM_N_CTX, machines=["machine-1", "machine-2"],
                       parallel=parallel, exact_batches=exact, tunnel_hook=_link(rtt), prompt_cache=False) as llm:
            llm.measured()  # exact batches as wide as measured (a first load measures while idle)
            llm.create_completion(common.PROMPTS[0], max_tokens=8, temperature=0)  # warm up
            app = create_app(llm, model_id=MODEL_ID, max_queue=256, queue_timeout=3600)
            with ServerThread(app) as server:
                for api, stream in (("python", lambda p, llm=llm: common.python_stream(llm, p, args.tokens)),
                                    ("http", lambda p, url=server.url: http_stream(url, p, args.tokens))):
                    if api not in apis:
                        continue
                    for n in args.levels if not rtt else [n for n in args.levels if n in (1, 8, top)]:
                        logger.info("%s, %s: %d stream(s)", name, api, n)
                        before = llm.engine_stats or llm.load_stats
                        run = common.run_level(n, stream)
                        after = _idle_stats(llm, before)
                        steps = after.get("steps", 0) - before.get("steps", 0)
                        out[f"{name}|{api}|{n}"] = {
                            "setup": name, "api": api, "max_batch": llm.max_batch, **run, "decode_steps": steps,
                            "passes_per_step": (after["passes"] - before["passes"]) / steps if steps > 0 else None}
    return out


def llama_server_setup(args: argparse.Namespace, model_path: Path) -> dict[str, dict[str, Any]]:
    """The same levels against ``python -m llama_cpp.server`` (local)."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias", MODEL_ID,
         "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 1), "--port", str(port), "--host", "127.0.0.1",
         "--interrupt_requests", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    out: dict[str, dict[str, Any]] = {}
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("python -m llama_cpp.server did not start (is llama-cpp-python's [server] extra "
                                   "installed? pip install sse-starlette starlette-context pydantic-settings)")
            time.sleep(0.5)
        list(http_stream(url, common.PROMPTS[0], 8))  # warm up
        for n in args.levels:
            logger.info("llama_cpp.server: %d stream(s)", n)
            out[f"llama_cpp.server|http|{n}"] = {"setup": "llama_cpp.server", "api": "http",
                                                 **common.run_level(n, lambda p: http_stream(url, p, args.tokens))}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The bars, from the batched runs; and whether every batched text equals its one-at-a-time text."""
    out: dict[str, Any] = {"bars": {}}
    for setup, api in dict.fromkeys((r["setup"], r["api"]) for r in runs.values() if r["setup"].startswith("batched")):
        one, eight = runs.get(f"{setup}|{api}|1"), runs.get(f"{setup}|{api}|8")
        if one and eight:
            out["bars"][f"{setup}, {api}"] = {
                "throughput_8_over_1": eight["tok_s"] / one["tok_s"],
                "ttft_p50_8_over_1": eight["ttft_p50_ms"] / one["ttft_p50_ms"],
            }
            bar = out["bars"][f"{setup}, {api}"]
            bar["pass"] = bar["throughput_8_over_1"] >= BAR_THROUGHPUT and bar["ttft_p50_8_over_1"] <= BAR_TTFT
    mismatches = []
    for key, run in runs.items():
        setup, api, n = key.split("|")
        ref = runs.get(f"one at a time|{api}|{n}")
        if setup.startswith("batched") and "fast" not in setup and ref is not None and run["texts"] != ref["texts"]:
            mismatches.append(key)
    out["texts_match"] = not mismatches
    out["mismatches"] = mismatches
    return out


def report(result: dict[str, Any], markdown: bool) -> str:
    rows = [["setup", "api", "streams", "tokens", "agg tok/s", "x vs 1 stream", "TTFT p50 ms", "TTFT p95 ms",
             "ITL p50 ms", "passes/step"]]
    runs = result["runs"]
    for r in runs.values():
        base = runs.get(f"{r['setup']}|{r['api']}|1")
        rows.append([r["setup"], r["api"], str(r["streams"]), str(r["tokens"]), f"{r['tok_s']:.1f}",
                     f"{r['tok_s'] / base['tok_s']:.2f}" if base else "-", f"{r['ttft_p50_ms']:.0f}",
                     f"{r['ttft_p95_ms']:.0f}", "-" if r["itl_p50_ms"] is None else f"{r['itl_p50_ms']:.1f}",
                     "-" if r.get("passes_per_step") is None else f"{r['passes_per_step']:.2f}"])
    lines = [common.render(rows, markdown), ""]
    for api, bar in result["summary"]["bars"].items():
        lines.append(f"bar ({api}): 8 streams give {bar['throughput_8_over_1']:.2f}x the tokens/s of 1 "
                     f"(>= {BAR_THROUGHPUT:g}x), p50 TTFT {bar['ttft_p50_8_over_1']:.2f}x (<= {BAR_TTFT:g}x): "
                     f"{'PASS' if bar['pass'] else 'FAIL'}")
    lines.append("batched texts equal one-at-a-time texts: " + ("yes" if result["summary"]["texts_match"]
                                                                else f"NO ({result['summary']['mismatches']})"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--levels", default="1,2,4,8,16", help="concurrent streams, comma-separated (default 1,2,4,8,16)")
    p.add_argument("--tokens", type=int, default=128, help="tokens per stream (default 128)")
    p.add_argument("--out", default="bench/results/concurrency.json", help="JSON results file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--no-llama-server", action="store_true", help="skip python -m llama_cpp.server")
    p.add_argument("--rtt", default="20", help="emulated round-trip times to every machine, ms, comma-separated, for "
                   "the batched handle at 1, 8 and the most streams (default 20; '' for none)")
    p.add_argument("--from-json", default=None, metavar="PATH", help="print the table of an earlier results file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.from_json:
        print(report(json.loads(Path(args.from_json).read_text()), args.markdown))
        return 0
    args.levels = sorted({int(x) for x in args.levels.split(",")})
    args.rtt = [float(x) for x in args.rtt.split(",") if x.strip()]
    if max(args.levels) > len(common.PROMPTS):
        p.error(f"at most {len(common.PROMPTS)} streams (one prompt each)")

    from sharedllm.local import LocalMesh
    from sharedllm.models import default_model_path

    t0 = time.perf_counter()
    with LocalMesh(machines=2, dashboard=False, scheduler_args=["--requests-per-minute", "100000"]) as lm:
        runs = mesh_setups(args, lm.mesh())
    if not args.no_llama_server:
        runs.update(llama_server_setup(args, default_model_path()))
    result = {"machine": common.machine_info(), "tokens": args.tokens, "levels": args.levels,
              "n_ctx_per_sequence": common.STREAM_N_CTX, "runs": runs}
    result["summary"] = summarize(runs)
    result["texts_match"] = result["summary"]["texts_match"]
    result["total_seconds"] = time.perf_counter() - t0
    return common.finish(result, args.out, report(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
