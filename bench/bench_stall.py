# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: a long prompt joins running streams. How long do they wait for their next token, and how long does it
wait for its first?

    .venv/bin/python bench/bench_stall.py [--streams 4] [--prompt-tokens 1500] [--stall-ms 0,500] [--markdown]
                                          [--out bench/results/stall.json]

Gemma 3 270M on an embedded 2-machine loopback mesh (``LocalMesh``), one handle per (batches, ``max_stall_ms``):
``--streams`` greedy streams run (long generations); once each has delivered tokens, a request with a prompt of
about ``--prompt-tokens`` tokens (and ``max_tokens=1``) arrives. Reported: the running streams' gaps between tokens
while that prompt is read (max and p50, every stream), the tokens they got meanwhile, the long request's time to its
first token, and the running streams' gaps before it came (the baseline). ``max_stall_ms=0``: a step reads up to
``n_batch`` prompt tokens (llama-server's way, and SharedLLM's before the bound); the default, 500: no more than
keep the step within 500 ms, as measured. Fast batches cut the prompt to the budget; exact batches cut it only in
chunks that keep its arithmetic (``sharedllm.engine.invariance``: measured at load; else whole chunks of ``n_batch``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

logger = logging.getLogger("bench_stall")

RUNNERS = common.PROMPTS[:8]  # bench_concurrency's: different greedy prompts
SENTENCE = "The committee met on Tuesday to review the budget, the schedule and the list of open questions. "


def run_case(llm, streams: int, prompt: str) -> dict[str, Any]:
    """``streams`` running streams, then the long prompt; the gaps and the long request's first token."""
    stamps: list[list[float]] = [[] for _ in range(streams)]
    stop = threading.Event()

    def run(i: int) -> None:
        with contextlib.suppress(Exception):
            for _ in llm.create_completion(RUNNERS[i % len(RUNNERS)], max_tokens=400, temperature=0, stream=True):
                stamps[i].append(time.perf_counter())
                if stop.is_set():
                    break

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(len(s) for s in stamps) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)  # a benchmark's wait for its streams to be running
    start = time.perf_counter()
    first = None
    for _ in llm.create_completion(prompt, max_tokens=1, temperature=0, stream=True):
        first = first or time.perf_counter()
    stop.set()
    for t in threads:
        t.join(timeout=120)
    during = [b - a for s in stamps for a, b in itertools.pairwise(s) if b > start and a < first]
    before = [b - a for s in stamps for a, b in itertools.pairwise(s) if b <= start]
    return {
        "ttft_ms": (first - start) * 1000,
        "tokens_meanwhile": sum(start < t < first for s in stamps for t in s),
        "gap_max_ms": max(during) * 1000 if during else None,
        "gap_p50_ms": statistics.median(during) * 1000 if during else None,
        "gap_p50_before_ms": statistics.median(before) * 1000 if before else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=4, help="running streams (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=1500, help="about this many tokens in the long prompt")
    p.add_argument("--stall-ms", default="0,500", help="max_stall_ms values, comma-separated (default 0,500)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="bench/results/stall.json")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import llama_cpp

    from sharedllm.local import LocalMesh
    from sharedllm.models import default_model_path

    stalls = [float(x) for x in args.stall_ms.split(",")]
    vocab = llama_cpp.Llama(str(default_model_path()), vocab_only=True, verbose=False)
    per_sentence = len(vocab.tokenize(SENTENCE.encode(), add_bos=False))
    prompt = SENTENCE * max(1, args.prompt_tokens // per_sentence)
    n_prompt = len(vocab.tokenize(prompt.encode()))
    n_ctx = 4096
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    with LocalMesh(machines=2, dashboard=False, scheduler_args=["--requests-per-minute", "100000"]) as lm:
        mesh = lm.mesh()
        for exact in (False, True):
            for stall in stalls:
                name = f"{'exact' if exact else 'fast'} batches, max_stall_ms {stall:g}"
                with mesh.load("gemma-3-270m", n_ctx=n_ctx, machines=["machine-1", "machine-2"],
                               parallel=args.streams + 1, exact_batches=exact, max_stall_ms=stall) as llm:
                    llm.create_completion(RUNNERS[0], max_tokens=8, temperature=0)  # warm up
                    runs = []
                    for r in range(args.repeats):
                        logger.info("%s: repeat %d", name, r + 1)
                        runs.append(run_case(llm, args.streams, prompt))
                results[name] = {"exact": exact, "max_stall_ms": stall, "prompt_tokens": n_prompt, "runs": runs,
                                 **{k: statistics.median(x[k] for x in runs if x[k] is not None)
                                    for k in runs[0]}}
    out = {"machine": common.machine_info(), "streams": args.streams, "results": results,
           "total_seconds": time.perf_counter() - t0}
    rows = [["setup", "prompt tokens", "long prompt TTFT ms", "running streams' tokens meanwhile",
             "their max gap ms", "their p50 gap ms", "p50 gap before ms"]]
    for name, r in results.items():
        rows.append([name, str(r["prompt_tokens"]), f"{r['ttft_ms']:.0f}", f"{r['tokens_meanwhile']:.0f}",
                     f"{r['gap_max_ms']:.0f}", f"{r['gap_p50_ms']:.0f}", f"{r['gap_p50_before_ms']:.0f}"])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(common.render(rows, args.markdown))
    logger.info("wrote %s (%.0f s in all)", path, out["total_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
