# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: the OpenAI-compatible endpoint against the Python API, side by side on the same loaded model.

    .venv/bin/python bench/bench_openai.py [--rounds 300] [--threads N] [--out bench/results/openai.json] [--markdown]

One model is loaded on a loopback mesh (``LocalMesh``, or ``--scheduler``) and served by ``sharedllm.openai_server``
with uvicorn on 127.0.0.1, in this process. Each repeat streams the same greedy request twice, in alternating order:

- ``python-api``: ``MeshModel.create_completion(..., stream=True)`` (or ``create_chat_completion``);
- ``endpoint``: the official ``openai`` package, ``client.completions.create(..., stream=True)`` (or
  ``client.chat.completions.create``) against the server: HTTP, JSON, server-sent events and the request queue;
- ``endpoint (httpx)``: the same requests through plain httpx, the events parsed by hand (the endpoint without the
  openai package's own work).

Both clients run in a process of their own, as an application would (``--in-process-client``: in this one).

``ttft_ms`` runs from the call to the first chunk with text (prompt processing included); ``decode_tps`` counts the
text chunks after the first over the time from the first to the last. A pair in which other processes took more than
``--max-foreign`` % of the CPU is measured again (on 2 cores they slow the rpc-servers several times over). Medians of
the pairs are reported, with the endpoint's ratios to the Python API: the bars are TTFT at most +5% and decode tok/s at
least 0.95x.

The bars are judged on rounds: ``--rounds`` rounds of short requests (``--round-tokens``), every path once per round
in turn, for each mode and for a chat behind a ~200-token system prompt (``chat+system``). TTFT and decode tok/s (from
each request's median gap between tokens) come as ratios of medians with a 95% bootstrap interval over the rounds:
one TTFT varies by ~10% here and the decode rate drifts by as much over minutes, so the 11 long pairs cannot see 5%.
(With ``--scheduler``, the mesh's per-client request limit must allow these rounds; the embedded mesh raises it.)
The server serves the model through ``Stamped``, which notes when each request reaches the model and when each token
leaves it: against the client's own times for the same request, that is what the endpoint adds to it, without the
noise of two different requests.

Then the endpoint's own cost, free of the engine's noise: the model's chunks are recorded and replayed at once through
a stand-in model, directly, through the openai package and through plain httpx (what the server costs without the
client's own work).
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

logger = logging.getLogger("bench_openai")

PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who"
CHAT = [{"role": "user", "content": "Write a short story about an old clockmaker who lives in a small village."}]
# The same question behind a system prompt of ~200 tokens, as applications send them: time to first token only.
CHAT_SYSTEM = [{"role": "system", "content": (
    "You are a careful, friendly writing assistant for a small community library. Readers of every age use you to "
    "draft stories, letters and short essays. Always answer in plain English, in short paragraphs, without lists "
    "unless the reader asks for one. Keep stories gentle and suitable for children unless told otherwise, avoid "
    "brand names and real people, and never invent facts about the library, its staff or its opening hours. If a "
    "request is unclear, write the most likely version and add one sentence at the end offering an alternative. "
    "When asked for a story, give it a title on its own line, then the story, in no more than three paragraphs, "
    "with a clear beginning, middle and end, and at least one concrete detail of the setting in each paragraph.")},
    *CHAT]
PROMPTS = {"completion": PROMPT, "chat": CHAT, "chat+system": CHAT_SYSTEM}  # mode -> prompt or messages
N_CTX = 2048
MODEL_ID = "gemma-3-270m-q4_k_m"
KEY = "sk-bench"
API, HTTP, RAW = "python-api", "endpoint", "endpoint (httpx)"
TTFT_BAR, DECODE_BAR = 1.05, 0.95
_METRICS = ("ttft_ms", "decode_tps", "decode_tps_p50gap", "gap_p50_ms", "tokens", "total_s")


def timed(start: Callable[[], Iterable[Any]], text_of: Callable[[Any], str]) -> dict[str, Any]:
    """Consume a stream and time it; only chunks that carry text count as tokens."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    for chunk in start():
        text = text_of(chunk)
        if text:
            stamps.append(time.perf_counter())
            parts.append(text)
    # perf_counter is CLOCK_MONOTONIC, one clock for every process: the server's stamps compare with these.
    return {**common.stream_stats(t0, stamps, time.perf_counter(), parts), "t0": t0, "stamps": stamps}


def _api_text(chunk: dict) -> str:
    choice = chunk["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def _http_text(chunk: Any) -> str:
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    return getattr(choice, "text", None) or getattr(getattr(choice, "delta", None), "content", None) or ""


def runners(llm: Any, client: Any, tokens: int) -> dict[tuple[str, str], Callable[[], dict[str, Any]]]:
    """The four measured calls: (mode, path) -> a function that runs and times one streamed request."""
    kw = {"max_tokens": tokens, "temperature": 0.0, "seed": 0}
    out = {}
    for mode, p in PROMPTS.items():
        if mode == "completion":
            out[(mode, API)] = lambda p=p: timed(lambda: llm.create_completion(p, stream=True, **kw), _api_text)
            out[(mode, HTTP)] = lambda p=p: timed(
                lambda: client.completions.create(model=MODEL_ID, prompt=p, stream=True, **kw), _http_text)
        else:
            out[(mode, API)] = lambda p=p: timed(lambda: llm.create_chat_completion(p, stream=True, **kw), _api_text)
            out[(mode, HTTP)] = lambda p=p: timed(
                lambda: client.chat.completions.create(model=MODEL_ID, messages=p, stream=True, **kw), _http_text)
    return out


def raw_runners(url: str, tokens: int) -> tuple[Any, dict[tuple[str, str], Callable[[], dict[str, Any]]]]:
    """The endpoint through plain httpx (server-sent events parsed by hand): what the endpoint costs without the
    openai package's own work. Returns the httpx client (to close) and the (mode, RAW) runners."""
    import httpx

    kw = {"max_tokens": tokens, "temperature": 0.0, "seed": 0}
    # TCP_NODELAY: httpx writes a request's headers and body separately, and Nagle's algorithm would hold the body
    # until the server's delayed ACK (40 ms).
    nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    raw = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300, transport=nodelay)

    def sse(path: str, body: dict) -> Iterable[dict]:
        with raw.stream("POST", path, json={"model": MODEL_ID, "stream": True, **kw, **body}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    yield json.loads(line[6:])

    def one(mode: str, p: Any) -> Callable[[], dict[str, Any]]:
        if mode == "completion":
            return lambda: timed(lambda: sse("/v1/completions", {"prompt": p}), _api_text)
        return lambda: timed(lambda: sse("/v1/chat/completions", {"messages": p}), _api_text)

    return raw, {(mode, RAW): one(mode, p) for mode, p in PROMPTS.items()}


class ClientProcess:
    """The ``openai`` client in its own process, as an application calling the endpoint would be.

    In this process it would share the GIL with the server and the model handle: its per-chunk parsing (pydantic
    models) would delay the server's threads and show up as the endpoint's cost. Each ``run(mode)`` streams one
    request there and returns its timings (measured there: from the call to the first text, and between chunks)."""

    def __init__(self, url: str, tokens: int):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, "--client-worker", url, "--tokens", str(tokens)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the benchmark's client process did not start")

    def run(self, mode: str, path: str = HTTP, tokens: int | None = None) -> dict[str, Any]:
        self.proc.stdin.write(f"{mode}\t{path}\t{tokens or ''}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark's client process died")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def client_worker(url: str, tokens: int) -> int:
    """``--client-worker``: read "mode, path, tokens" lines on stdin, stream each request with the openai package or
    plain httpx, print its timings as JSON."""
    import openai

    with openai.OpenAI(api_key=KEY, base_url=f"{url}/v1", max_retries=0, timeout=300) as client:
        raws, by_tokens = [], {}

        def make(n: int) -> dict:
            run = runners(None, client, n)
            raw, raw_run = raw_runners(url, n)
            raws.append(raw)
            run.update(raw_run)
            return run

        by_tokens[tokens] = make(tokens)
        print("ready", flush=True)
        for line in sys.stdin:
            mode, path, n = line.rstrip("\n").split("\t")
            n = int(n or tokens)
            if n not in by_tokens:
                by_tokens[n] = make(n)
            print(json.dumps(by_tokens[n][(mode, path)]()), flush=True)
        for raw in raws:
            raw.close()
    return 0


class ReplayModel:
    """Stands in for the model: streams chunks recorded from it, all at once. What remains is the path's own cost."""

    def __init__(self, chunks: dict[str, list[dict]]):
        self.chunks = chunks

    def create_completion(self, prompt: Any, stream: bool = False, **kwargs: Any) -> Iterable[dict]:
        return iter(self.chunks["completion"])

    def create_chat_completion(self, messages: Any, stream: bool = False, **kwargs: Any) -> Iterable[dict]:
        return iter(self.chunks["chat"])


class Stamped:
    """The loaded model as the server sees it, noting when each request reached it and when each chunk with text
    left it. Against the client's own times for the same request, that is what the endpoint adds, free of the
    engine's noise (both ends see the same prompt evaluation and the same tokens)."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.llm, name)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self.llm.create_completion(*args, **kwargs)

    def create_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        return self.llm.create_chat_completion(*args, **kwargs)

    async def acreate_completion(self, *args: Any, **kwargs: Any) -> Any:
        return await self._stamped(self.llm.acreate_completion, args, kwargs)

    async def acreate_chat_completion(self, *args: Any, **kwargs: Any) -> Any:
        return await self._stamped(self.llm.acreate_chat_completion, args, kwargs)

    async def _stamped(self, method: Callable, args: tuple, kwargs: dict) -> Any:
        rec: dict[str, Any] = {"call": time.perf_counter(), "chunks": []}
        self.calls.append(rec)
        stream = await method(*args, **kwargs)
        if not kwargs.get("stream"):
            return stream

        async def chunks() -> Any:
            try:
                async for chunk in stream:
                    if _api_text(chunk):
                        rec["chunks"].append(time.perf_counter())
                    yield chunk
            finally:
                await stream.aclose()

        return chunks()


def measure_overhead(llm: Any, tokens: int, n: int) -> dict[str, Any]:
    """The endpoint's own cost, free of the engine's noise: the same chunks, replayed at once, direct and over HTTP.

    ``ttft_ms``: from the call to the first text chunk; ``per_token_ms``: the time between text chunks when they come
    as fast as the path carries them (an upper bound on what the endpoint adds to each token).
    """
    import openai

    from sharedllm.openai_server import ServerThread, create_app

    kw = {"max_tokens": tokens, "temperature": 0.0, "seed": 0}
    replay = ReplayModel({"completion": list(llm.create_completion(PROMPT, stream=True, model=MODEL_ID, **kw)),
                          "chat": list(llm.create_chat_completion(CHAT, stream=True, model=MODEL_ID, **kw))})
    app = create_app(replay, model_id=MODEL_ID, api_keys=[KEY], max_queue=4, queue_timeout=60)
    out: dict[str, Any] = {}
    with ServerThread(app) as server, openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1", max_retries=0,
                                                    timeout=60) as client:
        run = runners(replay, client, tokens)
        raw, raw_run = raw_runners(server.url, tokens)
        run.update(raw_run)
        for mode in ("completion", "chat"):
            res: dict[str, list[dict[str, Any]]] = {API: [], HTTP: [], RAW: []}
            for i in range(n + 5):
                for path in ((API, HTTP, RAW) if i % 2 else (RAW, HTTP, API)):
                    r = run[(mode, path)]()
                    if i >= 5:  # the first few warm caches and connections
                        res[path].append(r)

            def med(path: str, key: str, rs: dict = res) -> float:
                return statistics.median(r[key] for r in rs[path])

            per_token = {p: statistics.median((r["total_s"] * 1000 - r["ttft_ms"]) / max(r["tokens"] - 1, 1)
                                              for r in res[p]) for p in (API, HTTP, RAW)}
            out[mode] = {
                "ttft_ms": {p: med(p, "ttft_ms") for p in (API, HTTP, RAW)},
                "per_token_ms": per_token,
                "added_ttft_ms": med(HTTP, "ttft_ms") - med(API, "ttft_ms"),
                "added_per_token_ms": per_token[HTTP] - per_token[API],
                "added_ttft_ms without the openai package": med(RAW, "ttft_ms") - med(API, "ttft_ms"),
                "runs": n,
            }
        raw.close()
    return out


def measure_rounds(run_short: Callable[[str, str], dict[str, Any]], stamped: Stamped, modes: list[str],
                   paths: tuple[str, ...], repeats: int, max_foreign: float) -> tuple[dict[str, dict], int]:
    """Rounds of short requests (``--round-tokens``), each path once per round in turn.

    One streamed request's TTFT varies by ~10% here and the decode rate drifts by as much over minutes (the prompt
    crosses two rpc-servers that share 2 cores with everything else): the long runs above give ~11 pairs, too few to
    see 5%; rounds give hundreds of pairs, each measured within a second. Per mode and path, lists with one entry per
    round: ``ttft_ms``, ``gap_ms`` (the request's median gap between tokens), and for the endpoint's paths the delays
    it adds to that request (from the server's stamps): ``in_ms`` (from the client's call until the model is called),
    ``first_out_ms`` (from the model's first text to the client's) and ``token_out_ms`` (the median of that delay
    over the request's tokens). Also the number of rounds measured again because other processes took more than
    ``max_foreign`` % of the CPU.
    """
    keys = ("ttft_ms", "gap_ms", "in_ms", "first_out_ms", "token_out_ms")
    out: dict[str, dict] = {f"{m}/{p}": {k: [] for k in keys} for m in modes for p in paths}
    discarded = 0
    for mode in modes:
        kept = tries = 0
        while kept < repeats and tries < 2 * repeats:
            tries += 1
            k = tries % len(paths)  # each path goes first in turn
            meter = common.CpuMeter()
            got = {}
            for path in paths[k:] + paths[:k]:
                stamped.calls.clear()
                r = run_short(mode, path)
                if path != API and stamped.calls and r["stamps"]:
                    rec = stamped.calls[-1]
                    delays = [c - s for c, s in zip(r["stamps"], rec["chunks"], strict=False)]
                    r.update(in_ms=(rec["call"] - r["t0"]) * 1000, first_out_ms=delays[0] * 1000,
                             token_out_ms=statistics.median(delays) * 1000)
                got[path] = r
            if meter.stop()["foreign_pct"] > max_foreign or any(r["ttft_ms"] is None for r in got.values()):
                discarded += 1
                continue
            for path, r in got.items():
                for key in keys:
                    if key == "gap_ms":
                        out[f"{mode}/{path}"][key].append(r["gap_p50_ms"])
                    elif key in r:
                        out[f"{mode}/{path}"][key].append(r[key])
            kept += 1
    return out, discarded


def ratio_with_ci(num: list[float], den: list[float], resamples: int = 2000) -> dict[str, float]:
    """median(num) / median(den) over paired samples, with a 95% bootstrap interval (rounds resampled as pairs)."""
    import random

    rng = random.Random(0)
    n = len(num)
    boot = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boot.append(statistics.median(num[i] for i in idx) / statistics.median(den[i] for i in idx))
    boot.sort()
    return {"ratio": statistics.median(num) / statistics.median(den), "ci95_low": boot[int(0.025 * resamples)],
            "ci95_high": boot[int(0.975 * resamples) - 1], "added_ms": statistics.median(num) - statistics.median(den),
            "median of paired ratios": statistics.median(a / b for a, b in zip(num, den, strict=True)), "pairs": n}


def _wait_for_quiet(max_wait: float, threshold_pct: float = 10.0, window: float = 1.5) -> float:
    # Other sessions' work comes in bursts of minutes: starting a pair between them saves measuring it again.
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        meter = common.CpuMeter()
        time.sleep(window)
        if meter.stop()["foreign_pct"] < threshold_pct:
            break
    return time.perf_counter() - t0


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """The median of each metric over ``runs``, and of the CPU share other processes took."""
    out: dict[str, float | None] = {}
    for key in _METRICS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    foreign = [r["cpu"]["foreign_pct"] for r in runs if "cpu" in r]
    out["foreign_cpu_pct"] = statistics.median(foreign) if foreign else None
    return out


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, serve it, measure the pairs and the endpoint's own cost; everything the JSON file holds."""
    import openai

    from sharedllm.client import Mesh
    from sharedllm.local import LocalMesh
    from sharedllm.openai_server import ServerThread, create_app

    modes = [m for m in args.modes.split(",") if m]
    paths = (API, HTTP, RAW) if args.client_process else (API, HTTP)
    runs: dict[str, list[dict[str, Any]]] = {f"{m}/{p}": [] for m in modes for p in paths}
    discarded: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    if args.scheduler:
        mesh, closer = Mesh.connect(args.scheduler), None
    else:
        # The TTFT rounds send hundreds of short requests a minute: above the mesh's default per-client rate limit.
        closer = LocalMesh(machines=args.machines, dashboard=False, rpc_threads=args.threads,
                           scheduler_args=["--requests-per-minute", "100000"]).start()
        mesh = closer.mesh()
    try:
        threads = {"n_threads": args.threads, "n_threads_batch": args.threads} if args.threads else {}
        with mesh.load("gemma-3-270m", n_ctx=N_CTX, **threads) as llm:
            stamped = Stamped(llm)
            app = create_app(stamped, model_id=MODEL_ID, api_keys=[KEY], max_queue=4, queue_timeout=300)
            with ServerThread(app) as server, openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1",
                                                            max_retries=0, timeout=300) as client:
                # The endpoint's client runs elsewhere, as it would in production (unless --in-process-client).
                worker = ClientProcess(server.url, args.tokens) if args.client_process else None

                def measured(tokens: int) -> dict[tuple[str, str], Callable[[], dict[str, Any]]]:
                    run = runners(llm, client, tokens)
                    if worker is not None:
                        for mode in PROMPTS:
                            for path in (HTTP, RAW):
                                run[(mode, path)] = lambda mode=mode, path=path: worker.run(mode, path, tokens)
                    return run

                run = measured(args.tokens)
                logger.info("warm-up (not counted)")
                for mode in modes:
                    for path in paths:
                        run[(mode, path)]()
                for mode in modes:
                    attempt = 0
                    while (len(runs[f"{mode}/{API}"]) < args.repeats and attempt < args.repeats * args.max_attempts
                           and time.perf_counter() - t_start < args.budget * (modes.index(mode) + 1) / len(modes)):
                        # One pair: both paths back to back, in alternating order. Another process on these 2 cores
                        # slows the rpc-servers tenfold, so a pair with either run disturbed is measured again.
                        r, attempt = len(runs[f"{mode}/{API}"]), attempt + 1
                        k = attempt % len(paths)  # each path goes first in turn
                        order = paths[k:] + paths[:k]
                        waited = _wait_for_quiet(args.quiet_wait)
                        # After the wait the rpc-servers' threads sleep: the first request would pay for waking them.
                        llm.create_completion(PROMPT, max_tokens=4, temperature=0.0)
                        pair = {}
                        for path in order:
                            meter = common.CpuMeter()
                            res = run[(mode, path)]()
                            del res["t0"], res["stamps"]
                            res.update(repeat=r, attempt=attempt, first=order[0], cpu=meter.stop(), waited_s=waited)
                            pair[path] = res
                            logger.info("pair %d (try %d) %-10s %-10s TTFT %6.1f ms, decode %5.1f tok/s, %d tokens, "
                                        "others' CPU %.0f%%", r + 1, attempt, mode, path, res["ttft_ms"] or 0,
                                        res["decode_tps"] or 0, res["tokens"], res["cpu"]["foreign_pct"])
                        if max(p["cpu"]["foreign_pct"] for p in pair.values()) > args.max_foreign:
                            discarded.append(pair)
                            continue
                        for path, res in pair.items():
                            runs[f"{mode}/{path}"].append(res)
                logger.info("%d rounds of %d-token requests per mode", args.rounds, args.round_tokens)
                short = measured(args.round_tokens)
                round_modes = modes + (["chat+system"] if "chat" in modes else [])
                rounds, rounds_discarded = measure_rounds(lambda mode, path: short[(mode, path)](), stamped,
                                                          round_modes, paths, args.rounds, args.max_foreign)
                if worker is not None:
                    worker.close()
                logger.info("the endpoint's own cost: %d requests per path, recorded chunks replayed",
                            args.overhead_runs)
                overhead = measure_overhead(llm, args.tokens, args.overhead_runs)
            topology = llm.topology.to_dict()
    finally:
        if closer is not None:
            closer.close()
        else:
            mesh.close()

    summary = {name: {"median": medians(rs), "runs": rs} for name, rs in runs.items()}
    ratios: dict[str, Any] = {}
    texts_match = True
    for mode in modes:
        api, http = summary[f"{mode}/{API}"], summary[f"{mode}/{HTTP}"]
        a, h = api["median"], http["median"]
        paired_ttft = [y["ttft_ms"] / x["ttft_ms"] for x, y in zip(api["runs"], http["runs"], strict=True)
                       if x["ttft_ms"] and y["ttft_ms"]]
        paired_tps = [y["decode_tps"] / x["decode_tps"] for x, y in zip(api["runs"], http["runs"], strict=True)
                      if x["decode_tps"] and y["decode_tps"]]
        ratios[mode] = {
            "ttft endpoint/api": h["ttft_ms"] / a["ttft_ms"] if a["ttft_ms"] and h["ttft_ms"] else None,
            "ttft added ms": h["ttft_ms"] - a["ttft_ms"] if a["ttft_ms"] and h["ttft_ms"] else None,
            "decode endpoint/api": h["decode_tps"] / a["decode_tps"] if a["decode_tps"] and h["decode_tps"] else None,
            "decode endpoint/api by median gap": (h["decode_tps_p50gap"] / a["decode_tps_p50gap"]
                                                  if a["decode_tps_p50gap"] and h["decode_tps_p50gap"] else None),
            "ttft per repeat": paired_ttft,
            "decode per repeat": paired_tps,
            "ttft median of paired ratios": statistics.median(paired_ttft) if paired_ttft else None,
            "decode median of paired ratios": statistics.median(paired_tps) if paired_tps else None,
        }
        o = overhead[mode]
        gap_ms = 1000 / a["decode_tps"] if a["decode_tps"] else None
        ratios[mode]["from the endpoint's own cost"] = {
            "ttft endpoint/api": (a["ttft_ms"] + o["added_ttft_ms"]) / a["ttft_ms"] if a["ttft_ms"] else None,
            "decode endpoint/api": gap_ms / (gap_ms + max(o["added_per_token_ms"], 0.0)) if gap_ms else None,
        }
        raw = summary.get(f"{mode}/{RAW}")
        if raw is not None:  # the same endpoint through plain httpx: without the openai package's own work
            r = raw["median"]
            paired = [y["ttft_ms"] / x["ttft_ms"] for x, y in zip(api["runs"], raw["runs"], strict=True)
                      if x["ttft_ms"] and y["ttft_ms"]]
            ratios[mode]["plain http client"] = {
                "ttft endpoint/api": r["ttft_ms"] / a["ttft_ms"] if a["ttft_ms"] and r["ttft_ms"] else None,
                "ttft added ms": r["ttft_ms"] - a["ttft_ms"] if a["ttft_ms"] and r["ttft_ms"] else None,
                "decode endpoint/api": (r["decode_tps"] / a["decode_tps"]
                                        if a["decode_tps"] and r["decode_tps"] else None),
                "ttft median of paired ratios": statistics.median(paired) if paired else None,
            }
        texts = {r["text"] for name in (API, HTTP, RAW) for r in summary.get(f"{mode}/{name}", {"runs": []})["runs"]}
        ratios[mode]["texts_match"] = len(texts) <= 1
        texts_match &= len(texts) <= 1
    by_rounds: dict[str, Any] = {}
    for mode in round_modes:  # the short requests: every path against the Python API, round by round
        api = rounds[f"{mode}/{API}"]
        if not api["ttft_ms"]:
            continue
        by_rounds[mode] = {"python-api median ms": statistics.median(api["ttft_ms"]),
                           "python-api median gap ms": statistics.median(api["gap_ms"])}
        for path in paths:
            if path == API:
                continue
            x = rounds[f"{mode}/{path}"]
            by_rounds[mode][path] = {
                "ttft": ratio_with_ci(x["ttft_ms"], api["ttft_ms"]),
                # tok/s is 1/gap: the endpoint's rate over the API's is the API's gap over the endpoint's
                "decode": ratio_with_ci(api["gap_ms"], x["gap_ms"]),
                "added": {k: {"median": statistics.median(x[k]), "p90": sorted(x[k])[len(x[k]) * 9 // 10]}
                          for k in ("in_ms", "first_out_ms", "token_out_ms") if x[k]},
            }
            if x["in_ms"]:
                added = [a + b for a, b in zip(x["in_ms"], x["first_out_ms"], strict=True)]
                y = by_rounds[mode][path]
                y["added"]["ttft_ms"] = {"median": statistics.median(added), "p90": sorted(added)[len(added) * 9 // 10]}
                y["ttft in request"] = 1 + y["added"]["ttft_ms"]["median"] / by_rounds[mode]["python-api median ms"]
                y["verdict"] = {"ttft": _ttft_met(y), "decode": y["decode"]["ratio"] >= DECODE_BAR}
    return {
        "machine": common.machine_info(),
        "config": {"tokens": args.tokens, "repeats": args.repeats, "machines": args.machines, "n_ctx": N_CTX,
                   "threads": args.threads,
                   "scheduler": args.scheduler, "modes": modes, "prompt": PROMPT, "chat": CHAT,
                   "chat+system": CHAT_SYSTEM,
                   "max_foreign": args.max_foreign, "quiet_wait": args.quiet_wait, "budget": args.budget,
                   "rounds": args.rounds, "round_tokens": args.round_tokens,
                   "sampling": {"temperature": 0.0, "seed": 0, "max_tokens": args.tokens},
                   "server": "uvicorn in this process, 127.0.0.1",
                   "client": "openai package, streaming, "
                             + ("in its own process" if args.client_process else "in this process")},
        "topology": topology,
        "setups": summary,
        "ratios": ratios,
        "bars": {"ttft endpoint/api at most": TTFT_BAR, "decode endpoint/api at least": DECODE_BAR},
        "texts_match": texts_match,
        "discarded_pairs": len(discarded),
        "discarded": discarded,
        "rounds": by_rounds,
        "rounds_runs": rounds,
        "rounds_discarded": rounds_discarded,
        "overhead": overhead,
        "total_seconds": time.perf_counter() - t_start,
    }


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ttft_met(x: dict[str, Any]) -> bool:
    """TTFT is judged on what the endpoint adds inside each request (both ends of one request see the same prompt
    evaluation, so the engine's ~10% variation cancels), provided the side-by-side ratio, which cannot resolve 5%
    here, does not contradict it (its whole 95% interval above the bar)."""
    return x["ttft in request"] <= TTFT_BAR and x["ttft"]["ci95_low"] <= TTFT_BAR


def _verdict(x: dict[str, float], bar: float, above: bool) -> str:
    """Whether a ratio meets its bar, and whether its whole 95% interval does."""
    ok = x["ratio"] >= bar if above else x["ratio"] <= bar
    sure = x["ci95_low"] >= bar if above else x["ci95_high"] <= bar
    if not ok:
        return f"MISSES the {bar}x bar"
    return f"meets the {bar}x bar" + (" (the whole interval does)" if sure else "")


def report(result: dict[str, Any], markdown: bool) -> str:
    """The table and the ratios against the bars, as printed."""
    cfg, m = result["config"], result["machine"]
    rows = [["mode", "path", "TTFT ms", "decode tok/s", "(min-max)", "median gap ms", "tokens", "others' CPU"]]
    for name, s in result["setups"].items():
        mode, path = name.split("/")
        med = s["median"]
        tps = [r["decode_tps"] for r in s["runs"] if r.get("decode_tps")]
        rows.append([mode, path, _fmt(med["ttft_ms"], 1), _fmt(med["decode_tps"], 1),
                     f"{min(tps):.1f}-{max(tps):.1f}" if tps else "-", _fmt(med["gap_p50_ms"], 2),
                     _fmt(med["tokens"], 0), _fmt(med["foreign_cpu_pct"], 0) + "%"])
    lines = [
        f"Gemma 3 270M Q4_K_M, n_ctx {cfg['n_ctx']}, {cfg['tokens']} greedy tokens, median of {cfg['repeats']} "
        f"interleaved repeats, {cfg['machines']} loopback machines, {m['cpu_count']} CPUs"
        + (f", {cfg['threads']} thread(s) per rpc-server and engine" if cfg.get('threads') else ""),
        "",
        common.render(rows, markdown),
        "",
    ]
    n_tok = cfg["round_tokens"]
    for mode, short in result.get("rounds", {}).items():
        for path in (HTTP, RAW):
            if path not in short:
                continue
            x, judged = short[path], path == HTTP
            t, d, a = x["ttft"], x["decode"], x["added"]
            head = f"{mode}, {t['pairs']} rounds of {n_tok}-token requests, {path}"
            if "ttft_ms" in a:
                lines.append(
                    f"{head}: TTFT +{a['ttft_ms']['median']:.2f} ms inside each request "
                    f"(p90 {a['ttft_ms']['p90']:.2f}; "
                    f"{a['in_ms']['median']:.2f} ms from the client's call to the model, "
                    f"{a['first_out_ms']['median']:.2f} ms from the model's first text to the client's) = "
                    f"{x['ttft in request']:.3f}x the Python API's {short['python-api median ms']:.1f} ms; side by "
                    f"side {t['ratio']:.3f}x (95% interval {t['ci95_low']:.3f}-{t['ci95_high']:.3f})"
                    + (f": {'meets' if x['verdict']['ttft'] else 'MISSES'} the {TTFT_BAR}x bar" if judged else ""))
            lines.append(
                f"{head}: decode {d['ratio']:.3f}x the Python API's {1000 / short['python-api median gap ms']:.1f} "
                f"tok/s side by side (95% interval {d['ci95_low']:.3f}-{d['ci95_high']:.3f})"
                + (f": {_verdict(d, DECODE_BAR, above=True)}" if judged else "")
                + (f"; each token reaches the client {a['token_out_ms']['median']:.2f} ms after it left the model"
                   if "token_out_ms" in a else ""))
    for mode, r in result["ratios"].items():
        t, d = r["ttft endpoint/api"], r["decode endpoint/api"]
        lines.append(
            f"{mode}, {cfg['tokens']}-token requests: endpoint TTFT {_fmt(t, 3)}x the Python API "
            f"({_fmt(r['ttft added ms'], 1)} ms added; median of paired ratios "
            f"{_fmt(r['ttft median of paired ratios'], 3)}), decode {_fmt(d, 3)}x (by median gap "
            f"{_fmt(r['decode endpoint/api by median gap'], 3)}; median of paired ratios "
            f"{_fmt(r['decode median of paired ratios'], 3)}; for information, the bars are judged on the rounds); "
            "texts " + ("identical" if r["texts_match"] else "DIFFER"))
    for mode, r in result["ratios"].items():
        if "plain http client" in r:
            x = r["plain http client"]
            lines.append(f"{mode}, the same endpoint through plain httpx (no openai package): TTFT "
                         f"{_fmt(x['ttft endpoint/api'], 3)}x ({_fmt(x['ttft added ms'], 1)} ms added; median of "
                         f"paired ratios {_fmt(x['ttft median of paired ratios'], 3)}), decode "
                         f"{_fmt(x['decode endpoint/api'], 3)}x")
    lines.append("")
    for mode, o in result["overhead"].items():
        if mode not in result["ratios"]:  # --modes left it out of the pairs
            continue
        est = result["ratios"][mode]["from the endpoint's own cost"]
        lines.append(
            f"{mode}, the endpoint's own cost (the model's recorded chunks replayed at once, median of {o['runs']}): "
            f"+{o['added_ttft_ms']:.2f} ms to the first token (+{o['added_ttft_ms without the openai package']:.2f} "
            f"ms with a plain HTTP client), +{o['added_per_token_ms'] * 1000:.0f} us per token; "
            f"against the Python API's medians above: TTFT {_fmt(est['ttft endpoint/api'], 3)}x, decode "
            f"{_fmt(est['decode endpoint/api'], 3)}x")
    if result["discarded_pairs"]:
        lines.append(f"{result['discarded_pairs']} pair(s) measured while other processes took over "
                     f"{result['config']['max_foreign']:g}% of the CPU were measured again (kept in the JSON)")
    foreign = max((r["cpu"]["foreign_pct"] for s in result["setups"].values() for r in s["runs"]), default=0.0)
    if foreign >= 5:
        lines.append(f"WARNING: other processes took up to {foreign:.0f}% of the CPU during a run (column others' "
                     "CPU): those numbers are skewed; rerun on a quiet machine")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when the two paths' greedy texts differ."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    p.add_argument("--repeats", type=int, default=11, help="undisturbed interleaved pairs per mode (default 11)")
    p.add_argument("--machines", type=int, default=2, help="loopback machines of the embedded mesh (default 2)")
    p.add_argument("--scheduler", default=None, help="an existing mesh's scheduler instead of an embedded one")
    p.add_argument("--threads", type=int, default=None,
                   help="threads of each rpc-server and of the engine (default: every core). On a 2-core machine, 1 "
                        "leaves the HTTP server and client a core, as separate machines would")
    p.add_argument("--modes", default="completion,chat", help="comma-separated: completion, chat")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="seconds to wait at most, before each pair, for other processes to leave the CPU (default 60)")
    p.add_argument("--max-foreign", type=float, default=25.0,
                   help="a pair with a run where other processes took more than this %% of the CPU is measured "
                        "again (default 25)")
    p.add_argument("--max-attempts", type=int, default=4, help="tries per wanted pair at most (default 4)")
    p.add_argument("--budget", type=float, default=1800.0,
                   help="seconds for the pairs, shared evenly by the modes; then what was measured is reported "
                        "(default 1800)")
    p.add_argument("--overhead-runs", type=int, default=50,
                   help="requests per path replaying recorded chunks, to measure the endpoint's own cost (default 50)")
    p.add_argument("--rounds", type=int, default=300,
                   help="rounds of short requests (every path once) per mode, for TTFT and decode (default 300)")
    p.add_argument("--round-tokens", type=int, default=8, help="max_tokens of those short requests (default 8)")
    p.add_argument("--out", default="bench/results/openai.json", help="JSON results file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--in-process-client", dest="client_process", action="store_false",
                   help="run the endpoint's openai client in this process (sharing the GIL with the server) instead "
                        "of its own process")
    p.add_argument("--client-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client_worker:
        return client_worker(args.client_worker, args.tokens)
    if args.tokens < 2 or args.round_tokens < 2 or args.repeats < 1 or args.machines < 1 or args.rounds < 1:
        p.error("--tokens and --round-tokens must be >= 2, --repeats, --machines and --rounds >= 1")
    if not set(args.modes.split(",")) <= {"completion", "chat"}:
        p.error("--modes takes completion and/or chat")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    result = benchmark(args)
    return common.finish(result, args.out, report(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
