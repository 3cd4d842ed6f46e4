# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: speculative decoding on the mesh (drafts on the client, verified many per pass) over emulated links.

    .venv/bin/python bench/bench_speculative.py [--rtt 0 5 20 50] [--tokens 96] [--repeats 2] [--quick]
        [--low-rtt-runs 5] [--drafters none lookup model] [--workloads rewrite code chat] [--draft-quant Q2_K]
        [--targets gemma synthetic] [--out bench/results/speculative.json] [--markdown]

The target, Gemma 3 270M Q4_K_M, on 2 loopback machines of a ``LocalMesh``, each behind its own link emulator
(``bench/linkem.py``, on the wire between the engine's relays and the machines', every emulator a process of its own),
set live to each RTT in turn. Drafters: ``none`` (the default load: what a user gets without drafting), ``lookup``
(n-gram prompt lookup), ``model`` (a cheaper quantization of the target made by llama.cpp's quantizer,
``sharedllm.models.quantized``, on the client's CPU) and ``wrong`` (a drafter whose every draft is wrong: what
trying costs where drafting does not pay). Workloads, chat completions of ``--tokens`` greedy tokens:
``rewrite`` (repeat a given passage), ``code`` (an edit of a given function, returned whole) and ``chat`` (an open
question). Each repeat loads each drafter once (the models lease the same machines, one at a time) and runs every
RTT and workload on it (``--low-rtt-runs`` times at 5 ms or less, where a run is short and noise is most of a
ratio; each run goes through the workloads in turn, so that no request follows itself: a draft model would draft it
from the answer before); the drafter order rotates between repeats.

Per cell: decode tokens/s (tokens after the first over the time from the first to the last), its ratio to ``none``
in the same RTT, workload, repeat and run (the median of the paired ratios), at RTT 5 ms or less its ratio to the
same load's runs with drafting off for the request (``draft_max=0``, each run paired with one, in alternating order:
what drafting costs or gives, free of the differences between two loads), the acceptance (drafts accepted / drafts
verified), tokens per verification step (per sequence), round trips per token (counted on the emulated links) and
whether the text equals the oracle's: local llama-cpp-python greedy with the same kernels and parameters (flash
attention, the engine's default).

Beside them: ``llama-server --rpc`` on the same rpc-servers with each of its drafting modes, behind emulators of its
own at every RTT (at 0 ms too: ours has its emulators in front at 0 ms as well, and their hop costs a step time), and
the moonshot's rows: the same model run on this machine alone, no mesh and no drafts (llama-cpp-python with its own
fastest kernels and every core), against our best drafter at each RTT.

``--targets synthetic`` (or ``--synthetic``, beside Gemma) runs a 3B-shape target (``bench/synth_gguf.py``'s
``llama3.2-3b-untied`` at full scale, random weights, Q4_K_M, its layers past the second adding nothing: ``shallow``)
and its drafter, the target's first 2 layers copied from its file (``synth_gguf.truncate``: the same greedy tokens),
on the rewrite workload, at the RTTs given: compute and link together.
The table goes to stdout and the numbers to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common
from sharedllm.options import DRAFT_MAX

logger = logging.getLogger("bench.speculative")
LOW_RTT_MS = 5.0
ANCHOR_RUNS = 1  # runs of a workload per llama-server start: its ngram-mod learns across requests (a second identical
# request is answered from the first one's n-grams)

PASSAGE = (
    "The committee met on Tuesday to discuss the new budget. After a long debate, the members agreed to increase "
    "funding for public libraries by ten percent, to reduce spending on road maintenance, and to create a new fund "
    "for small businesses affected by the flood. The chair thanked the volunteers who had collected signatures for "
    "the library petition, and asked the treasurer to publish the revised figures before the next meeting."
)
CODE = '''def total_price(items, tax):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total + total * tax
    return round(total, 2)
'''
WORKLOADS = {
    "rewrite": f"Repeat the following passage word for word.\n\n{PASSAGE}",
    "code": f"Rename the function total_price to order_total in this code and return the whole code.\n\n```python\n"
            f"{CODE}```",
    "chat": "What should I pack for a week-long hiking trip in the mountains?",
}
# A user turn of Gemma 3's chat template: each workload is a completion of the same text on every server (llama-server
# and ours render chat templates each their own way)
GEMMA_TURN = "<start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n"
DRAFTERS = ("none", "lookup", "model", "wrong")
SYNTH_ARCH = "llama3.2-3b-untied"
GEMMA = "gemma-3-270m"


def wrong_drafter(spec: Any) -> Any:
    """A drafter whose every draft is wrong (a hook for ``draft=``, built in the engine): what trying costs when
    drafting does not pay, the adaptive length's worst case."""
    from sharedllm.engine.speculative import Drafter

    class Wrong(Drafter):
        name = "wrong"

        def available(self, seq: Any, most: int) -> list[int]:
            last = seq.outputs[-1] if seq.outputs else seq.prompt[-1]
            return [(last + 7919 * (i + 1)) % 120_000 for i in range(max(most, 0))]

        def draft(self, wanted: list[tuple[Any, int]]) -> dict[int, list[int]]:
            return {id(seq): seq.draft_offer[:k] for seq, k in wanted}

    return Wrong()


@dataclasses.dataclass
class Target:
    """A target model and its draft model: what a row of the table runs."""

    name: str
    path: str
    draft_path: str
    n_ctx: int = common.N_CTX
    chat: bool = True  # the prompts in Gemma's chat template


def prompt_of(workload: str, target: Target) -> str:
    return GEMMA_TURN.format(WORKLOADS[workload]) if target.chat else WORKLOADS[workload]


def oracle(target: Target, workloads: list[str], tokens: int) -> dict[str, str]:
    """Local llama-cpp-python's greedy text of each workload, with the engine's parameters (flash attention)."""
    from sharedllm.engine import build_llama

    llm = build_llama(target.path, n_ctx=target.n_ctx, use_extra_bufts=False)
    try:
        return {w: llm.create_completion(prompt_of(w, target), **common.completion_kwargs(tokens))["choices"][0]["text"]
                for w in workloads}
    finally:
        llm.close()


def local_speed(target: Target, workloads: list[str], tokens: int, runs: int) -> dict[str, list[float]]:
    """Decode tok/s of each workload on this machine alone, no mesh and no drafts: what the moonshot compares with
    (the link with drafts against the same model run locally). llama-cpp-python as a user would run it for speed:
    its own kernels (repacked weights, ``use_extra_bufts``), every core, the engine's other parameters."""
    import os

    from sharedllm.engine import build_llama

    llm = build_llama(target.path, n_ctx=target.n_ctx, use_extra_bufts=True, n_threads=os.cpu_count() or 1)
    out: dict[str, list[float]] = {}
    try:
        llm.create_completion(prompt_of(workloads[0], target), **common.completion_kwargs(8))  # warm-up
        for _ in range(runs):
            for workload in workloads:
                common.wait_for_quiet(5.0)
                prompt = prompt_of(workload, target)
                res, _ = common.timed_text(lambda p=prompt: (c["choices"][0].get("text") for c in llm.create_completion(
                    p, stream=True, **common.completion_kwargs(tokens))))
                out.setdefault(workload, []).append(res["decode_tps"] or 0.0)
                logger.info("%s local, no mesh, %s: %.1f tok/s", target.name, workload, res["decode_tps"] or 0)
    finally:
        llm.close()
    return out


def _idle_draft_counts(llm: Any, after_steps: float) -> dict[str, float]:
    """The engine's draft counts once it reported the run's last step (nothing running); {} without a drafter."""
    deadline = time.monotonic() + 10.0
    while True:
        stats = llm.engine_stats or {}
        draft = stats.get("draft")
        if draft is None and "draft" not in stats and stats.get("running", 0) == 0:
            return {}
        if draft is not None and stats.get("running", 0) == 0 and draft.get("steps", 0) > after_steps:
            return draft
        if time.monotonic() > deadline:
            return draft or {}
        time.sleep(0.05)


def run_one(llm: Any, links: list[Any], prompt: str, tokens: int, **extra: Any) -> dict[str, Any]:
    """One streamed completion (``extra``: more arguments of the request): its timings, text, the engine's draft
    counts and the links' round trips."""
    before_links = [lk.stats()["round_trips"] for lk in links]
    before = dict((llm.engine_stats or {}).get("draft") or {})
    res, _ = common.timed_text(lambda: (c["choices"][0].get("text") for c in llm.create_completion(
        prompt, stream=True, **common.completion_kwargs(tokens), **extra)))
    trips = sum(lk.stats()["round_trips"] - b for lk, b in zip(links, before_links, strict=True))
    after = _idle_draft_counts(llm, before.get("steps", 0))
    draft = {k: after.get(k, 0) - before.get(k, 0) for k in ("drafted", "accepted", "steps", "tokens")}
    res.update({"round_trips": trips, "round_trips_per_token": trips / max(res["tokens"], 1), **draft})
    return res


def runs_at(rtt: float, args: argparse.Namespace) -> int:
    """Runs of each workload per load at ``rtt``: more where a run is short and this host's noise is most of a
    ratio (RTT 5 ms or less: a 96-token run takes 1-3 s), paired with the runs without drafts by their order."""
    return args.low_rtt_runs if rtt <= LOW_RTT_MS else 1


def measure(target: Target, args: argparse.Namespace, lm: Any, work: Path) -> dict[str, Any]:
    from bench.linkem import LinkControl, hook

    truth = oracle(target, args.workloads, args.tokens)
    runs: dict[tuple, list[dict]] = {}
    loads: dict[str, list[float]] = {}
    local: dict[str, list[float]] = {}
    drafters = list(args.drafters)
    for r in range(args.repeats):
        for workload, tps in local_speed(target, args.workloads, args.tokens, args.low_rtt_runs).items():
            local.setdefault(workload, []).extend(tps)
        order = drafters[r % len(drafters):] + drafters[:r % len(drafters)]
        for drafter in order:
            control = work / f"{target.name}-{drafter}-{r}"
            link = {"rtt_ms": 0.0, "process": True, "wire": True, "control_dir": str(control)}
            draft = {"none": {}, "lookup": {"draft": "lookup"}, "model": {"draft": target.draft_path},
                     "wrong": {"draft": ("bench.bench_speculative:wrong_drafter",
                                         str(Path(__file__).resolve().parents[1]), {})}}[drafter]
            t0 = time.perf_counter()
            with lm.mesh().load(target.path, n_ctx=target.n_ctx, tunnel_hook=hook(**link), **draft) as llm:
                loads.setdefault(drafter, []).append(time.perf_counter() - t0)
                llm.measured(300)  # drafts are verified once measured (a first load measures while idle)
                links = LinkControl.find(control)
                run_one(llm, links, prompt_of(args.workloads[0], target), 8)  # warm-up
                for rtt in args.rtt:
                    for lk in links:
                        lk.set(rtt)
                    # each run goes through the workloads in turn: a draft model's slot keeps the text it was
                    # last told (a later request drafts from their common prefix), and the same request twice in a
                    # row would be drafted from the first one's answer
                    for i in range(runs_at(rtt, args)):
                        for workload in args.workloads:
                            # where runs are short (RTT <= 5 ms) each run of a drafter has its pair in the same
                            # load with drafting off for the request (draft_max=0), in alternating order: the
                            # "x off" column, free of what differs from one load to the next
                            modes = [(drafter, {})]
                            if drafter != "none" and rtt <= LOW_RTT_MS:
                                modes.append((f"{drafter} off", {"draft_max": 0}))
                                modes = modes if i % 2 else modes[::-1]
                            for name, extra in modes:
                                common.wait_for_quiet(5.0)
                                res = run_one(llm, links, prompt_of(workload, target), args.tokens, **extra)
                                res["text_ok"] = res["text"] == truth[workload]
                                runs.setdefault((name, rtt, workload), []).append(res)
                                logger.info("%s %s rtt %s %s: %.1f tok/s, %s drafts, %s accepted, text %s",
                                            target.name, name, rtt, workload, res["decode_tps"] or 0,
                                            res["drafted"], res["accepted"], "ok" if res["text_ok"] else "DIFFERS")
    return {"runs": runs, "loads": loads, "oracle": truth, "local": local}


# llama-server's modes on the same rpc-servers (scripts/build_anchor.sh's build: the same llama.cpp and patches):
# without drafts, its n-gram drafters (defaults, and ngram-simple with short n-grams) and the draft model on the client
def anchor_modes(draft_path: str, draft_max: int) -> dict[str, list[str]]:
    n = str(draft_max)
    return {
        "llama-server none": [],
        "llama-server ngram-simple": ["--spec-type", "ngram-simple"],
        "llama-server ngram-simple n3": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                                         "--spec-ngram-simple-size-m", n],
        "llama-server ngram-map-k": ["--spec-type", "ngram-map-k"],
        "llama-server ngram-mod": ["--spec-type", "ngram-mod"],
        "llama-server draft model": ["--spec-type", "draft-simple", "--spec-draft-model", draft_path,
                                     "--spec-draft-device", "none", "--spec-draft-n-max", n],
    }


def llama_server_run(url: str, prompt: str, tokens: int, links: list[Any]) -> dict[str, Any]:
    """One streamed ``/v1/completions`` of llama-server: timings, text, its draft counts (``timings``), round trips."""
    import httpx

    from bench import anchor

    before = [lk.stats()["round_trips"] for lk in links]
    body = {**anchor.request_body(prompt, tokens), "timings_per_token": False}
    t0 = time.perf_counter()
    stamps, parts, timings = [], [], {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {anchor.API_KEY}"}, timeout=600) as client, \
            client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise RuntimeError(f"llama-server: HTTP {resp.status_code}: {resp.text[:300]}")
        for line in resp.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            timings = chunk.get("timings") or timings
            text = (chunk.get("choices") or [{}])[0].get("text")
            if text:
                stamps.append(time.perf_counter())
                parts.append(text)
    res = common.stream_stats(t0, stamps, time.perf_counter(), parts)
    trips = sum(lk.stats()["round_trips"] - b for lk, b in zip(links, before, strict=True))
    drafted, accepted = timings.get("draft_n", 0), timings.get("draft_n_accepted", 0)
    counted = trips / max(res["tokens"], 1) if links else None  # no emulator in front: nothing counted
    res.update({"round_trips": trips, "round_trips_per_token": counted, "drafted": drafted,
                "accepted": accepted, "steps": 0, "tokens": res["tokens"], "text_ok": None})
    return res


def measure_anchor(target: Target, args: argparse.Namespace, lm: Any, work: Path) -> dict[tuple, list[dict]]:
    """llama-server's rows: each mode behind each RTT (links of their own in front of the same rpc-servers)."""
    from bench import anchor

    bin_dir = anchor.anchor_bin()
    mesh = lm.mesh()
    topo = mesh.plan(target.path, n_ctx=target.n_ctx)
    table = {m["machine_id"]: m for m in mesh.machines()}
    rpc = [table[st.machine_id]["rpc"]["endpoint"] for st in topo.stages]
    runs: dict[tuple, list[dict]] = {}
    modes = anchor_modes(target.draft_path, DRAFT_MAX)
    for r in range(args.repeats):
        for rtt in args.anchor_rtt:
            # at every RTT, 0 too: ours runs through its emulators at RTT 0 (set live), and so must llama-server
            links = anchor.Links(rpc, rtt, always=True)
            try:
                for mode, extra in modes.items():
                    server = anchor.LlamaServer(bin_dir, target.path, links.endpoints, work / f"llama-{r}-{rtt}.log",
                                                n_ctx=target.n_ctx, parallel=1, threads=2, n_batch=512, n_ubatch=512,
                                                tensor_split=list(topo.tensor_split), extra=extra)
                    server.start()
                    try:
                        llama_server_run(server.url, prompt_of(args.workloads[0], target), 8, links.links)
                        for workload in args.workloads:
                            for _ in range(ANCHOR_RUNS):
                                common.wait_for_quiet(5.0)
                                res = llama_server_run(server.url, prompt_of(workload, target), args.tokens,
                                                       links.links)
                                runs.setdefault((mode, rtt, workload), []).append(res)
                                logger.info("%s rtt %s %s: %.1f tok/s, %s drafts, %s accepted", mode, rtt, workload,
                                            res["decode_tps"] or 0, res["drafted"], res["accepted"])
                    finally:
                        server.stop()
            finally:
                links.close()
    return runs


def summarize(target: Target, measured: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    runs = measured["runs"]
    rows = []
    for rtt in args.rtt:
        for workload in args.workloads:
            for drafter in [*args.drafters, *measured.get("anchor_modes", [])]:
                cell = runs.get((drafter, rtt, workload), [])
                if not cell:
                    continue
                server = drafter.startswith("llama-server")
                base = runs.get(("llama-server none" if server else "none", rtt, workload), [])
                tps = [c["decode_tps"] or 0.0 for c in cell]
                ratios = [c["decode_tps"] / b["decode_tps"] for c, b in zip(cell, base, strict=False)
                          if c["decode_tps"] and b["decode_tps"]]
                off = runs.get((f"{drafter} off", rtt, workload), [])
                paired = [c["decode_tps"] / o["decode_tps"] for c, o in zip(cell, off, strict=False)
                          if c["decode_tps"] and o["decode_tps"]]
                drafted, accepted = sum(c["drafted"] for c in cell), sum(c["accepted"] for c in cell)
                steps, toks = sum(c["steps"] for c in cell), sum(c["tokens"] for c in cell)
                rows.append({
                    "target": target.name, "rtt_ms": rtt, "workload": workload, "drafter": drafter,
                    "tok_s": statistics.median(tps), "tok_s_runs": tps,
                    "ratio": statistics.median(ratios) if ratios and drafter not in ("none", "llama-server none")
                    else (1.0 if ratios else None),
                    # to the same load's runs with drafting off for the request, paired run by run (RTT <= 5 ms)
                    "ratio_off": statistics.median(paired) if paired else None,
                    "tok_s_off": statistics.median(o["decode_tps"] or 0.0 for o in off) if off else None,
                    "acceptance": accepted / drafted if drafted else None,
                    "tokens_per_step": toks / steps if steps else (None if server else 1.0),
                    "round_trips_per_token": statistics.median(c["round_trips_per_token"] for c in cell)
                    if all(c["round_trips_per_token"] is not None for c in cell) else None,
                    "texts_equal": all(c["text_ok"] for c in [*cell, *off]),
                })
                if server:  # its own text without drafts is its oracle; the ratio to ours: ours / its
                    rows[-1]["texts_equal"] = all(c["text"] == base[0]["text"] for c in cell) if base else None
                    ours = [c["decode_tps"] for c in runs.get(("none", rtt, workload), []) if c["decode_tps"]]
                    rows[-1]["ours_none_over_it"] = statistics.median(ours) / rows[-1]["tok_s"] if ours and \
                        rows[-1]["tok_s"] else None
    return rows


def best_against_anchor(rows: list[dict[str, Any]], target: str) -> list[dict[str, Any]]:
    """Per RTT and workload where llama-server ran: our best drafter against its best mode (tok/s, ours / its)."""
    out = []
    keys = {(r["rtt_ms"], r["workload"]) for r in rows if r["target"] == target and r["drafter"].startswith("llama")}
    for rtt, workload in sorted(keys):
        cell = [r for r in rows if r["target"] == target and (r["rtt_ms"], r["workload"]) == (rtt, workload)]
        ours = max((r for r in cell if not r["drafter"].startswith("llama") and r["drafter"] not in ("none", "wrong")),
                   key=lambda r: r["tok_s"] or 0, default=None)
        its = max((r for r in cell if r["drafter"].startswith("llama-server") and r["drafter"] != "llama-server none"),
                  key=lambda r: r["tok_s"] or 0, default=None)
        if ours and its and its["tok_s"]:
            out.append({"target": target, "rtt_ms": rtt, "workload": workload, "drafter": "best / llama-server's best",
                        "ours": ours["drafter"], "its": its["drafter"], "tok_s": ours["tok_s"],
                        "tok_s_runs": [], "ratio": ours["tok_s"] / its["tok_s"], "acceptance": None,
                        "tokens_per_step": None, "round_trips_per_token": None, "texts_equal": ours["texts_equal"],
                        "vs_anchor": True})
    return out


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    out = [["target", "RTT ms", "workload", "drafter", "tok/s", "x none", "x off", "accepted", "tok/step", "RT/tok",
            "text"]]
    for r in rows:
        out.append([r["target"], f"{r['rtt_ms']:g}", r["workload"], r["drafter"], common.fmt(r["tok_s"], 1),
                    common.fmt(r["ratio"], 2), common.fmt(r.get("ratio_off"), 2),
                    "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%",
                    common.fmt(r["tokens_per_step"], 2), common.fmt(r["round_trips_per_token"], 2),
                    {True: "=", False: "DIFFERS", None: "-"}[r["texts_equal"]]])
    return common.render(out, markdown)


def synthetic_target(work: Path) -> Target:
    """The 3B-shape target and its drafter, written once and cached: the target's layers past the second add nothing
    to its residual stream (``synth_gguf.write_f32``'s ``shallow``), and the drafter is those 2 layers with the same
    embedding and output, so its greedy drafts are the target's tokens while the target costs its 28 layers a token;
    neither picks byte tokens a streaming decoder holds back."""
    from bench import synth_gguf as sg
    from sharedllm.models import cache_dir

    out = cache_dir() / "synthetic"
    out.mkdir(parents=True, exist_ok=True)
    src, target = out / f"{SYNTH_ARCH}-shallow2-F32.gguf", out / f"{SYNTH_ARCH}-shallow2-Q4_K_M.gguf"
    draft = out / f"{SYNTH_ARCH}-shallow2-draft-Q4_K_M.gguf"
    if not sg.current(target):
        logger.info("writing the synthetic %s target (~13 GB of F32 source, deleted once quantized)", SYNTH_ARCH)
        sg.write_f32(SYNTH_ARCH, src, scale="full", shallow=2, seed=1)
        sg.quantize(src, target, "Q4_K_M")
        src.unlink(missing_ok=True)
    if not sg.current(draft):
        sg.truncate(target, draft, 2)
    return Target(f"synthetic {SYNTH_ARCH}", str(target), str(draft), n_ctx=1024, chat=False)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from sharedllm import models
    from sharedllm.local import LocalMesh

    t_start = time.perf_counter()
    targets = []
    if "gemma" in args.targets:
        gemma = models.default_model_path()
        targets.append(Target(GEMMA, str(gemma), str(models.quantized(gemma, args.draft_quant))))
    rows: list[dict[str, Any]] = []
    local: list[dict[str, Any]] = []
    detail: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as workdir, \
            contextlib.closing(LocalMesh(machines=2, dashboard=False)) as lm:
        lm.start()
        work = Path(workdir)
        if "synthetic" in args.targets:
            targets.append(synthetic_target(work))
        for target in targets:
            sub = args
            if target.name != GEMMA:  # the big one: fewer tokens, the rewrite workload
                sub = argparse.Namespace(**{**vars(args), "tokens": min(args.tokens, 32), "workloads": ["rewrite"]})
            measured = measure(target, sub, lm, work)
            if args.anchor_rtt and target.name == GEMMA:
                anchor_runs = measure_anchor(target, sub, lm, work)
                measured["runs"].update(anchor_runs)
                measured["anchor_modes"] = list(dict.fromkeys(k[0] for k in anchor_runs))
            rows += summarize(target, measured, sub)
            rows += best_against_anchor(rows, target.name)
            local += against_local(rows, target.name, measured["local"])
            detail[target.name] = {"loads_s": measured["loads"], "oracle": measured["oracle"],
                                   "runs": {"|".join(map(str, k)): v for k, v in measured["runs"].items()}}
    return {"benchmark": "speculative", "machine": common.machine_info(), "args": vars(args), "rows": rows,
            "local": local, "detail": detail, "texts_match": all(r["texts_equal"] for r in rows),
            "total_seconds": time.perf_counter() - t_start}


def against_local(rows: list[dict[str, Any]], target: str, local: dict[str, list[float]]) -> list[dict[str, Any]]:
    """The moonshot's rows: per workload and RTT, our best drafter over the link against the same model run on this
    machine alone without drafts (:func:`local_speed`): tok/s of each, ours / local."""
    out = []
    for workload, tps in local.items():
        base = statistics.median(tps)
        for rtt in sorted({r["rtt_ms"] for r in rows if r["target"] == target}):
            ours = max((r for r in rows if (r["target"], r["rtt_ms"], r["workload"]) == (target, rtt, workload)
                        and r["drafter"] in DRAFTERS and r["drafter"] not in ("none", "wrong")),
                       key=lambda r: r["tok_s"] or 0, default=None)
            if ours and base:
                out.append({"target": target, "workload": workload, "rtt_ms": rtt, "local_tok_s": base,
                            "local_runs": tps, "drafter": ours["drafter"], "tok_s": ours["tok_s"],
                            "ratio": ours["tok_s"] / base})
    return out


def local_table(local: list[dict[str, Any]], markdown: bool) -> str:
    out = [["target", "workload", "RTT ms", "local tok/s (no mesh, no drafts)", "best drafter", "tok/s", "x local"]]
    for r in local:
        out.append([r["target"], r["workload"], f"{r['rtt_ms']:g}", common.fmt(r["local_tok_s"], 1), r["drafter"],
                    common.fmt(r["tok_s"], 1), common.fmt(r["ratio"], 2)])
    return common.render(out, markdown)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rtt", type=float, nargs="+", default=[0, 5, 20, 50])
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--low-rtt-runs", type=int, default=5,
                   help=f"runs of each workload per load at RTT {LOW_RTT_MS:g} ms or less (short, noisy runs)")
    p.add_argument("--drafters", nargs="+", choices=DRAFTERS, default=list(DRAFTERS),
                   help="none, lookup, model (the draft model) and wrong (every draft wrong: what trying costs)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--draft-quant", default="Q2_K", help="the draft model's quantization of Gemma (default Q2_K)")
    p.add_argument("--targets", nargs="+", choices=["gemma", "synthetic"], default=["gemma"],
                   help="gemma (Gemma 3 270M and its Q2_K) and synthetic (the 3B-shape target and its 2-layer drafter, "
                        "written once: ~13 GB while it is made, ~2.5 GB kept)")
    p.add_argument("--synthetic", action="store_true", help="the same as --targets gemma synthetic")
    p.add_argument("--anchor-rtt", type=float, nargs="*", default=[0, 20],
                   help="RTTs at which llama-server --rpc runs on the same rpc-servers (scripts/build_anchor.sh); "
                        "none given: no llama-server rows")
    p.add_argument("--quick", action="store_true", help="RTT 0 and 20, 48 tokens, one repeat")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", default="bench/results/speculative.json")
    args = p.parse_args(argv)
    if args.synthetic:
        args.targets = list(dict.fromkeys([*args.targets, "synthetic"]))
    if args.quick:
        args.rtt, args.tokens, args.repeats, args.low_rtt_runs = [0, 20], 48, 1, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    result = benchmark(args)
    return common.finish(result, args.out, table(result["rows"], args.markdown) + "\n\n"
                         + local_table(result["local"], args.markdown))


if __name__ == "__main__":
    sys.exit(main())
