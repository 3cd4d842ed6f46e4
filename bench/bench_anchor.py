# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: SharedLLM against the anchor, ``llama-server --rpc`` on the same rpc-servers, every serving figure.

    scripts/build_anchor.sh       # once: llama-server and llama-batched-bench from our llama-cpp-python's llama.cpp
    .venv/bin/python bench/bench_anchor.py [--repeats 3] [--rtt 0 20] [--relays tls direct] [--quick]
        [--json bench/results/anchor.json] [--markdown] [--llama-args "..."] [--serve-args "..."]

A user who wants one model over several machines starts an rpc-server on each and ``llama-server --rpc A,B`` on
their own: upstream's answer. Here both run on the same two emulated machines of one ``LocalMesh`` (their
rpc-servers, which speak llama.cpp's RPC protocol: llama-server connects to them directly, at their loopback
endpoints from the mesh's machine table), Gemma 3 270M Q4_K_M, the same requests, in alternating repeats:

- ``llama-server``: ``llama-server --rpc A,B -ngl 99 -np 8 -c 8x2048 -t 2 -b 512 -ub 512 -ts <our split>`` (the
  same context per sequence, threads, batch sizes and layer split as ours; its other options left at their
  defaults, as a user would), requests through its OpenAI ``/v1/completions`` stream;
- ``sharedllm serve``: the CLI, ``--parallel 8 --n-ctx 2048 --no-prompt-cache`` (defaults otherwise: TLS relays,
  exact batches), requests through the same HTTP client code;
- ``python api``: ``mesh.load(..., parallel=8)`` and streamed ``create_completion`` (for information).

Every client runs in a process of its own (``bench/anchor.py client``), never in a server's. Requests are greedy
(temperature 0), ``--tokens`` (96) tokens, no prompt cache on either side (llama-server's ``cache_prompt: false``).
Per server and repeat: a cold load (the rpc-servers' tensor caches emptied first: llama.cpp's ``-c``, which both use),
a warm load (the server started again), one warm-up request, then one stream (TTFT of a short prompt and of a
~1,000-token prompt, decode tok/s of the short one), then 8 streams at once (aggregate tok/s, TTFT p50/p95,
inter-token latency p50/p95). Settings: ``--relays tls`` (our TLS relays, the default mesh) and ``direct``
(``--insecure-direct-rpc``: a second mesh), each at every ``--rtt`` (0: loopback, no emulator; else an emulated link
of that RTT in front of every machine, each link in its own process: between our engine's relay and the machine's,
between llama-server and the rpc-server). Per setting, ``llama-batched-bench`` on the same rpc-servers gives
llama.cpp's own batched decode of 8 sequences (the floor the 8-stream row is judged against).

Each row: the medians over repeats, the ratio (x, >= 1: ours better: tok/s ours/theirs, times theirs/ours), a 90%
interval of the paired per-repeat ratios (t-interval of their logs), and whether the greedy texts are equal. Greedy
texts of llama-server and ours may differ (llama-server's defaults use other kernels): at the first setting, option
variants of llama-server (``--variants``) are tried against our text, and which one makes them equal is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import anchor, common

logger = logging.getLogger("bench_anchor")

LLAMA, SERVE, API = "llama-server", "sharedllm serve", "python api"
OURS = (SERVE, API)
N_CTX, PARALLEL, N_BATCH, N_UBATCH = 2048, 8, 512, 512
# (key, label, higher is better)
ROWS = [
    ("load_cold_s", "cold load s", False),
    ("load_warm_s", "warm load s", False),
    ("ttft_short_ms", "1 stream: TTFT short prompt ms", False),
    ("ttft_long_ms", "1 stream: TTFT ~1000-token prompt ms", False),
    ("decode_tps", "1 stream: decode tok/s", True),
    ("agg_tps", "8 streams: aggregate tok/s", True),
    ("steady_tps", "8 streams: all decoding, tok/s", True),
    ("ttft8_p50_ms", "8 streams: TTFT p50 ms", False),
    ("ttft8_p95_ms", "8 streams: TTFT p95 ms", False),
    ("itl_p50_ms", "8 streams: inter-token p50 ms", False),
    ("itl_p95_ms", "8 streams: inter-token p95 ms", False),
]
# llama-server option sets tried against our greedy text (name, extra arguments)
VARIANTS = [
    ("defaults", []),
    ("--flash-attn off", ["--flash-attn", "off"]),
    ("--ctx-checkpoints 0", ["--ctx-checkpoints", "0"]),
    ("--flash-attn off --ctx-checkpoints 0", ["--flash-attn", "off", "--ctx-checkpoints", "0"]),
    ("--no-repack", ["--no-repack"]),
]
T90 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833, 10: 1.812}


def long_prompt(model: str, target: int = 1000) -> tuple[str, int]:
    """A prompt of about ``target`` tokens (counted with the model's own tokenizer), ending mid-sentence."""
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=model, vocab_only=True, verbose=False)
    paragraphs = [p.rstrip(":,") + "." for p in common.PROMPTS]
    text, i = "", 0
    while True:
        nxt = text + (" " if text else "") + paragraphs[i % len(paragraphs)]
        if len(vocab.tokenize(nxt.encode())) > target - 12:
            break
        text, i = nxt, i + 1
    text += " " + common.PROMPT
    n = len(vocab.tokenize(text.encode()))
    vocab.close()
    return text, n


# --- one server's turn in a repeat ------------------------------------------------------------------------------------


class Setting:
    """One mesh (TLS relays or direct) at one RTT: what each path needs to start, and where its logs go."""

    def __init__(self, args: argparse.Namespace, lm: Any, relays: str, rtt: float, bin_dir: Path, model: str,
                 raw: list[str], split: list[float], cache_dirs: list[Path], work: Path, prompts: dict[str, Any]):
        self.args, self.lm, self.relays, self.rtt, self.bin_dir, self.model = args, lm, relays, rtt, bin_dir, model
        self.raw, self.split, self.cache_dirs, self.work, self.prompts = raw, split, cache_dirs, work, prompts
        self.name = f"{relays}, rtt {rtt:g} ms"
        self.logs = work / f"{relays}-rtt{rtt:g}"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def log(self, what: str) -> Path:
        self.n += 1
        return self.logs / f"{self.n:03d}-{what.replace(' ', '-')}.log"

    def clear_caches(self) -> int:
        """Empty the rpc-servers' tensor caches (no session is connected now) and the engine's measures kept on the
        client (sharedllm.engine.measures: a cold load measures the kernels as a first load does); the files
        removed."""
        from sharedllm.engine import measures

        n = 0
        if measures.path().exists():
            measures.path().unlink()
            n += 1
        for d in self.cache_dirs:
            for p in d.rglob("*"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    # Each start returns (load seconds, a client, a closer).
    def start(self, path: str, extra: list[str] | None = None) -> tuple[float, anchor.ClientProcess, Any]:
        if path == LLAMA:
            links = anchor.Links(self.raw, self.rtt)
            server = anchor.LlamaServer(self.bin_dir, self.model, links.endpoints, self.log("llama-server"),
                                        n_ctx=N_CTX, parallel=PARALLEL, threads=self.args.threads, n_batch=N_BATCH,
                                        n_ubatch=N_UBATCH, tensor_split=self.split,
                                        extra=self.args.llama_args if extra is None else extra)
            try:
                server.start()
                client = anchor.ClientProcess(["client", server.url], self.log("client"))
            except BaseException:
                server.stop()
                links.close()
                raise

            def close() -> None:
                client.close()
                server.stop()
                links.close()

            return server.load_s, client, close
        if path == SERVE:
            server = anchor.SharedServe(self.lm.user_address, self.lm.admin_key, self.model, self.log("serve"),
                                        n_ctx=N_CTX, parallel=PARALLEL, rtt_ms=self.rtt,
                                        extra=["--no-prompt-cache", *self.args.serve_args])
            try:
                server.start()
                client = anchor.ClientProcess(["client", server.url], self.log("client"))
            except BaseException:
                server.stop()
                raise

            def close() -> None:
                client.close()
                server.stop()

            return server.load_s, client, close
        spec = {"scheduler": self.lm.user_address, "model": self.model, "rtt_ms": self.rtt,
                "options": {"n_ctx": N_CTX, "parallel": PARALLEL, "prompt_cache": False, **self.args.api_options}}
        import json

        client = anchor.ClientProcess(["api-client", json.dumps(spec)], self.log("api-client"),
                                      env={"SHAREDLLM_KEY": self.lm.admin_key})
        return client.info["load_s"], client, client.close

    def turn(self, path: str) -> dict[str, Any]:
        """:meth:`measure` on a quiet machine if possible: a turn during which other processes took more than
        ``--max-foreign`` % of the CPU is measured again (at most ``--retries`` times; the discarded ones are kept)."""
        discarded = []
        while True:
            waited = common.wait_for_quiet(self.args.quiet_wait) if self.args.quiet_wait > 0 else 0.0
            res = self.measure(path)
            res["waited_for_quiet_s"] = waited
            foreign = res["cpu"]["foreign_pct"]
            if foreign <= self.args.max_foreign or len(discarded) >= self.args.retries:
                res["discarded_noisy"] = discarded
                res["noisy"] = foreign > self.args.max_foreign
                return res
            logger.info("[%s] %s: other processes took %.0f%% of the CPU; measuring again", self.name, path, foreign)
            discarded.append({k: res.get(k) for k in ("cpu", "decode_tps", "agg_tps", "ttft_short_ms")})

    def measure(self, path: str) -> dict[str, Any]:
        """Cold load, warm load, then the requests, on ``path``."""
        res: dict[str, Any] = {"path": path}
        meter = common.CpuMeter()
        if not self.args.no_cold:
            res["cache_files_removed"] = self.clear_caches()
            load_s, _client, close = self.start(path)
            if path != LLAMA:  # ready at once; the measures taken while idle are kept for the next load
                res["measures_kept_s"] = load_s + anchor.measures_kept()
            close()
            res["load_cold_s"] = load_s
        load_s, client, close = self.start(path)
        res["load_warm_s"] = load_s
        try:
            p, tokens = self.prompts, self.args.tokens
            client.one(common.PROMPTS[1], 8)  # warm-up, not counted
            shorts = [client.one(p["short"], tokens) for _ in range(self.args.short_reps)]
            long_ = client.one(p["long"], tokens)
            batch = client.many(p["batch"], tokens)
            res["cpu"] = meter.stop()
        finally:
            close()
        res.update({
            "ttft_short_ms": statistics.median(r["ttft_ms"] for r in shorts),
            "decode_tps": statistics.median(r["decode_tps"] for r in shorts),
            "ttft_long_ms": long_["ttft_ms"],
            "agg_tps": batch["tok_s"], "steady_tps": batch["steady_tok_s"],
            "ttft8_p50_ms": batch["ttft_p50_ms"], "ttft8_p95_ms": batch["ttft_p95_ms"],
            "itl_p50_ms": batch["itl_p50_ms"], "itl_p95_ms": batch["itl_p95_ms"],
            "tokens": {"short": [r["tokens"] for r in shorts], "long": long_["tokens"], "batch": batch["tokens"]},
            "texts": {"short": shorts[0]["text"], "short_all_equal": len({r["text"] for r in shorts}) == 1,
                      "long": long_["text"], "batch": batch["texts"]},
        })
        return res


def floor(s: Setting) -> dict[str, Any]:
    """llama.cpp's own batched decode of 1 and 8 sequences on the same rpc-servers (and links)."""
    links = anchor.Links(s.raw, s.rtt)
    try:
        rows = anchor.batched_bench(s.bin_dir, s.model, links.endpoints, s.log("batched-bench"), prompt=16,
                                    tokens=s.args.tokens, levels=[1, PARALLEL], threads=s.args.threads,
                                    n_batch=N_BATCH, n_ubatch=N_UBATCH, tensor_split=s.split,
                                    extra=s.args.llama_args)
    finally:
        links.close()
    return {"runs": rows, "tg_tok_s": {str(r["pl"]): r["speed_tg"] for r in rows}}


def variants(s: Setting, ours_text: str, ours_long: str) -> list[dict[str, Any]]:
    """llama-server with each option set of ``VARIANTS``: is its greedy text ours?"""
    out = []
    for name, extra in VARIANTS:
        try:
            _load, client, close = s.start(LLAMA, extra=[*s.args.llama_args, *extra])
            try:
                short = client.one(s.prompts["short"], s.args.tokens)
                long_ = client.one(s.prompts["long"], s.args.tokens)
            finally:
                close()
        except Exception as exc:
            out.append({"variant": name, "error": repr(exc)})
            continue
        out.append({"variant": name, "args": extra, "short_equal": short["text"] == ours_text,
                    "long_equal": long_["text"] == ours_long, "short_text": short["text"][:80],
                    "long_text": long_["text"][:80], "decode_tps": short["decode_tps"],
                    "ttft_short_ms": short["ttft_ms"], "ttft_long_ms": long_["ttft_ms"]})
        logger.info("variant %-36s short %s, long %s; TTFT %.0f/%.0f ms, %.1f tok/s", name,
                    "EQUAL" if out[-1]["short_equal"] else "differs", "EQUAL" if out[-1]["long_equal"] else "differs",
                    short["ttft_ms"], long_["ttft_ms"], short["decode_tps"])
    return out


# --- statistics -------------------------------------------------------------------------------------------------------


def speed_ratio(ours: float | None, theirs: float | None, higher: bool) -> float | None:
    """>= 1: ours better (tok/s ours/theirs; times theirs/ours)."""
    if not ours or not theirs:
        return None
    return ours / theirs if higher else theirs / ours


def interval90(ratios: list[float]) -> tuple[float, float] | None:
    """A 90% t-interval of the geometric mean of paired ratios (None under 2 pairs)."""
    logs = [math.log(r) for r in ratios if r and r > 0]
    if len(logs) < 2:
        return None
    m, sd = statistics.mean(logs), statistics.stdev(logs)
    half = T90.get(len(logs) - 1, 1.645) * sd / math.sqrt(len(logs))
    return math.exp(m - half), math.exp(m + half)


def summarize(turns: list[dict[str, Any]], flo: dict[str, Any] | None) -> dict[str, Any]:
    """A setting's rows: medians per path, ratios to llama-server, 90% intervals over repeats, texts."""
    by = {p: [t for t in turns if t["path"] == p] for p in (LLAMA, SERVE, API)}
    reps = len(by[LLAMA])
    rows = []

    def texts_equal(key: str, path: str) -> bool | None:
        pairs = list(zip(by[LLAMA], by[path], strict=False))
        if not pairs:
            return None
        if key == "batch":
            return all(a["texts"]["batch"] == b["texts"]["batch"] for a, b in pairs)
        return all(a["texts"][key] == b["texts"][key] for a, b in pairs)

    text_of = {"ttft_short_ms": "short", "decode_tps": "short", "ttft_long_ms": "long"}
    for key, label, higher in ROWS:
        row: dict[str, Any] = {"key": key, "row": label, "higher_is_better": higher}
        vals = {p: [t[key] for t in by[p] if t.get(key) is not None] for p in by}
        row["median"] = {p: statistics.median(v) if v else None for p, v in vals.items()}
        for p in OURS:
            paired = [speed_ratio(b.get(key), a.get(key), higher) for a, b in zip(by[LLAMA], by[p], strict=False)]
            paired = [x for x in paired if x]
            row[p] = {"ratio": speed_ratio(row["median"][p], row["median"][LLAMA], higher),
                      "paired": paired, "ci90": interval90(paired)}
            tkey = text_of.get(key, "batch" if key.startswith(("agg", "steady", "ttft8", "itl")) else None)
            row[p]["texts_equal"] = texts_equal(tkey, p) if tkey else None
        rows.append(row)
    if flo is not None:
        # llama-batched-bench's generation speed: every sequence decoding, its prompt read before the clock starts;
        # ours alike: the 8 streams' tokens while all of them decode (steady_tps). The aggregate, which counts the
        # prompts' reading too, stays beside it (aggregate_ratio).
        f8 = flo["tg_tok_s"].get(str(PARALLEL))
        agg = next(r for r in rows if r["key"] == "agg_tps")
        steady = next(r for r in rows if r["key"] == "steady_tps")
        rows.append({"key": "floor", "row": f"llama.cpp batched decode floor, {PARALLEL} seqs tok/s",
                     "higher_is_better": True,
                     "median": {LLAMA: f8, SERVE: steady["median"][SERVE], API: steady["median"][API]},
                     **{p: {"ratio": speed_ratio(steady["median"][p], f8, True), "ci90": None, "texts_equal": None,
                            "aggregate_ratio": speed_ratio(agg["median"][p], f8, True)} for p in OURS},
                     "one_sequence_tok_s": flo["tg_tok_s"].get("1")})
    # Ours among ourselves: the Python API and the endpoint give the same texts, batched texts equal solo ones.
    ours_consistent = all(
        a["texts"]["short"] == b["texts"]["short"] and a["texts"]["batch"] == b["texts"]["batch"]
        for a, b in zip(by[SERVE], by[API], strict=False))
    batched_solo = {p: all(t["texts"]["batch"][0] == t["texts"]["short"] for t in by[p]) for p in by if by[p]}
    first = {p: by[p][0]["texts"] for p in by if by[p]}
    return {"repeats": reps, "rows": rows, "ours_consistent": ours_consistent, "batched_equals_solo": batched_solo,
            "texts_first80": {p: {"short": t["short"][:80], "long": t["long"][:80]} for p, t in first.items()}}


# --- the benchmark ----------------------------------------------------------------------------------------------------


def save_partial(result: dict[str, Any], out: str, t_start: float) -> None:
    """The settings measured so far, in case the run is stopped (the final write replaces it)."""
    import json

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = {**result, "partial": True, "total_seconds": time.perf_counter() - t_start}
    path.write_text(json.dumps(partial, indent=2) + "\n")


def start_mesh(relays: str, work: Path) -> tuple[Any, list[Path]]:
    from sharedllm.local import LocalMesh

    lm = LocalMesh(machines=0, dashboard=False, workdir=work / f"mesh-{relays}",
                   insecure_direct_rpc=(relays == "direct"))
    lm.start()
    caches = []
    for i in (1, 2):
        cache = work / f"mesh-{relays}" / f"tensor-cache-{i}"
        cache.mkdir(parents=True, exist_ok=True)
        caches.append(cache)
        lm.add_machine(f"machine-{i}", worker_args=["--cache-dir", str(cache)])
    lm.mesh().wait_for_machines(2, timeout=180)
    return lm, caches


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from sharedllm import models

    t_start = time.perf_counter()
    t0 = time.perf_counter()
    bin_dir = anchor.anchor_bin()
    build_check_s = time.perf_counter() - t0
    model = str(models.default_model_path())
    long_text, long_tokens = long_prompt(model)
    prompts = {"short": common.PROMPT, "long": long_text,
               # stream 0 reads the single stream's prompt: its batched text must equal its solo text
               "batch": [common.PROMPT, *common.PROMPTS[1:PARALLEL]]}
    result: dict[str, Any] = {
        "machine": common.machine_info(), "anchor": {"bin": str(bin_dir), "version": anchor.version_of(bin_dir),
                                                     "build_check_s": build_check_s},
        "config": {"tokens": args.tokens, "repeats": args.repeats, "rtt_ms": args.rtt, "relays": args.relays,
                   "paths": args.paths, "n_ctx": N_CTX, "parallel": PARALLEL, "n_batch": N_BATCH,
                   "n_ubatch": N_UBATCH, "threads": args.threads, "short_reps": args.short_reps,
                   "llama_args": args.llama_args, "serve_args": args.serve_args, "api_options": args.api_options,
                   "long_prompt_tokens": long_tokens, "prompts": prompts, "quick": args.quick,
                   "sampling": anchor.request_body("<prompt>", args.tokens)},
        "settings": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-anchor-") as tmp, contextlib.ExitStack() as stack:
        stack.callback(anchor.stop_all)
        work = Path(tmp)
        for relays in args.relays:
            logger.info("starting a local mesh of 2 machines (%s)", relays)
            lm, caches = start_mesh(relays, work)
            stack.callback(lm.close)
            mesh = lm.mesh()
            topo = mesh.plan(model, n_ctx=N_CTX, parallel=PARALLEL)
            table = {m["machine_id"]: m for m in mesh.machines()}
            raw = [table[st.machine_id]["rpc"]["endpoint"] for st in topo.stages]
            split = list(topo.tensor_split)
            logger.info("rpc-servers %s, layer split %s (output layer on %s)", raw, split,
                        "the client" if topo.output_on_client else "the last machine")
            for rtt in args.rtt:
                s = Setting(args, lm, relays, rtt, bin_dir, model, raw, split, caches, work, prompts)
                entry: dict[str, Any] = {"setting": s.name, "relays": relays, "rtt_ms": rtt, "rpc_servers": raw,
                                         "tensor_split": split, "topology": str(topo), "turns": []}
                logger.info("[%s] llama-batched-bench: %d tokens, 1 and %d sequences", s.name, args.tokens, PARALLEL)
                try:
                    entry["floor"] = floor(s)
                except Exception as exc:
                    logger.warning("llama-batched-bench failed: %s", exc)
                    entry["floor"] = None
                for rep in range(args.repeats):
                    order = args.paths[rep % len(args.paths):] + args.paths[:rep % len(args.paths)]
                    for path in order:
                        logger.info("[%s] repeat %d/%d: %s", s.name, rep + 1, args.repeats, path)
                        turn = s.turn(path)
                        turn["repeat"] = rep
                        entry["turns"].append(turn)
                        logger.info("[%s] %s: load cold %s s warm %.1f s, TTFT %.0f/%.0f ms, %.1f tok/s, 8 streams "
                                    "%.1f tok/s", s.name, path, common.fmt(turn.get("load_cold_s"), 1),
                                    turn["load_warm_s"], turn["ttft_short_ms"], turn["ttft_long_ms"],
                                    turn["decode_tps"], turn["agg_tps"])
                entry["summary"] = summarize(entry["turns"], entry["floor"])
                if args.variants and not result.get("greedy_variants") and rtt == 0:
                    ours = next((t for t in entry["turns"] if t["path"] in OURS), None)
                    if ours is not None:
                        logger.info("[%s] llama-server option variants against our greedy text", s.name)
                        result["greedy_variants"] = {"setting": s.name, "ours_short": ours["texts"]["short"][:80],
                                                     "ours_long": ours["texts"]["long"][:80],
                                                     "variants": variants(s, ours["texts"]["short"],
                                                                          ours["texts"]["long"])}
                result["settings"].append(entry)
                save_partial(result, args.json, t_start)
            lm.close()
    result["texts_match"] = all(e["summary"]["ours_consistent"] for e in result["settings"])
    result["total_seconds"] = time.perf_counter() - t_start
    return result


# --- the report -------------------------------------------------------------------------------------------------------


def report(result: dict[str, Any], markdown: bool) -> str:
    cfg, m = result["config"], result["machine"]
    lines = [f"Gemma 3 270M Q4_K_M on 2 loopback machines ({m['cpu_count']} CPUs), {cfg['tokens']} greedy tokens, "
             f"median of {cfg['repeats']} alternating repeat(s); x: >= 1 means SharedLLM better (tok/s ours/theirs, "
             f"times theirs/ours); 90%: interval of the paired ratios; llama-server {result['anchor']['version']}",
             ""]
    rows = [["setting", "row", "llama-server", "serve", "x", "90%", "api", "x", "texts equal"]]
    for e in result["settings"]:
        for r in e["summary"]["rows"]:
            med = r["median"]
            digits = 2 if r["key"].endswith("_s") else 1
            ci = r[SERVE]["ci90"]
            eq = r[SERVE]["texts_equal"]
            rows.append([e["setting"], r["row"], common.fmt(med[LLAMA], digits), common.fmt(med[SERVE], digits),
                         common.fmt(r[SERVE]["ratio"], 2), f"{ci[0]:.2f}-{ci[1]:.2f}" if ci else "-",
                         common.fmt(med[API], digits), common.fmt(r[API]["ratio"], 2),
                         "-" if eq is None else ("yes" if eq else "NO")])
    lines.append(common.render(rows, markdown))
    lines.append("")
    for e in result["settings"]:
        s = e["summary"]
        t = s["texts_first80"]
        lines.append(f"{e['setting']}: ours consistent (serve = api, batched = solo): {s['ours_consistent']}, "
                     f"batched = solo {s['batched_equals_solo']}")
        for p, x in t.items():
            lines.append(f"  {p:16s} {x['short'][:80]!r}")
    gv = result.get("greedy_variants")
    if gv:
        lines.append("")
        lines.append(f"llama-server option variants against our greedy text ({gv['setting']}):")
        for v in gv["variants"]:
            if "error" in v:
                lines.append(f"  {v['variant']:36s} failed: {v['error'][:100]}")
            else:
                lines.append(f"  {v['variant']:36s} short {'EQUAL' if v['short_equal'] else 'differs'}, long "
                             f"{'EQUAL' if v['long_equal'] else 'differs'}; TTFT {v['ttft_short_ms']:.0f}/"
                             f"{v['ttft_long_ms']:.0f} ms, {v['decode_tps']:.1f} tok/s  {v['short_text'][:40]!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats per setting (default 3; --quick: 1)")
    p.add_argument("--rtt", type=float, nargs="+", default=None,
                   help="emulated RTTs in ms (default 0 20; --quick: 0)")
    p.add_argument("--relays", nargs="+", default=None, choices=["tls", "direct"],
                   help="our TLS relays and/or --insecure-direct-rpc (a mesh each; default both; --quick: tls)")
    p.add_argument("--paths", nargs="+", default=[LLAMA, SERVE, API], choices=[LLAMA, SERVE, API])
    p.add_argument("--tokens", type=int, default=96, help="greedy tokens per request (default 96)")
    p.add_argument("--short-reps", type=int, default=3, help="short-prompt requests per turn (median; default 3)")
    p.add_argument("--threads", type=int, default=2, help="llama-server's -t/-tb (default 2: every core here)")
    p.add_argument("--llama-args", default="", help="more llama-server options (e.g. '--flash-attn off')")
    p.add_argument("--serve-args", default="", help="more sharedllm serve options (e.g. '--fast-batches')")
    p.add_argument("--no-cold", action="store_true", help="skip the cold loads")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="seconds to wait at most, before each turn, for other processes to leave the CPU (default 30)")
    p.add_argument("--max-foreign", type=float, default=20.0,
                   help="a turn during which other processes took more than this %% of the CPU is measured again "
                        "(default 20)")
    p.add_argument("--retries", type=int, default=2, help="noisy turns measured again at most (default 2)")
    p.add_argument("--no-variants", dest="variants", action="store_false",
                   help="skip the llama-server option variants against our greedy text")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 repeat, TLS relays, RTT 0, 1 short request per turn (unless given)")
    p.add_argument("--json", default=None, help="results file (default bench/results/anchor.json, "
                                                "anchor-quick.json with --quick)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    if args.quick:  # what is given explicitly stays
        args.short_reps = 1
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.rtt = args.rtt if args.rtt is not None else ([0.0] if args.quick else [0.0, 20.0])
    args.relays = args.relays or (["tls"] if args.quick else ["tls", "direct"])
    if LLAMA not in args.paths or not set(args.paths) & set(OURS):
        p.error("--paths needs llama-server and at least one of ours")
    args.llama_args = shlex.split(args.llama_args)
    args.serve_args = shlex.split(args.serve_args)
    args.api_options = {"exact_batches": "--fast-batches" not in args.serve_args}
    args.json = args.json or f"bench/results/anchor{'-quick' if args.quick else ''}.json"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for name in ("distributed", "httpx", "sharedllm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if shutil.which("bash") is None:
        p.error("bash is needed for scripts/build_anchor.sh")
    result = benchmark(args)
    return common.finish(result, args.json, report(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
