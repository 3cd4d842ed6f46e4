# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: the first token of a prompt length the engine has not seen, with the client relay answering
llama.cpp's allocation-size questions and without.

    .venv/bin/python bench/bench_first_token.py [--rtt 20] [--lengths 8] [--repeats 2] [--markdown]
                                                [--out bench/results/first-token.json]

Gemma 3 270M on an embedded 2-machine loopback mesh (``LocalMesh``), each machine behind an emulated link of
``--rtt`` ms (``bench/linkem.py``, its own process, on the wire as in ``bench_link.py``). Before a graph of a new
shape runs, llama.cpp's RPC client asks each machine for the allocation size of every matrix product of a shape it
has not seen (``GET_ALLOC_SIZE``, a round trip each; cached per shape in the engine process). For a CPU machine the
client relay answers them itself (``sharedllm.relay.rpc.cpu_alloc_size``); ``SHAREDLLM_RELAY_ALLOC_SIZES=0`` makes it
ask the machine as llama.cpp would. For each setting and each batch mode (exact, fast), a fresh handle (a fresh
engine: an empty cache of shapes) is warmed up with one short request, then streams the first token of
``--lengths`` prompts of new lengths (3, 4, ... words), one at a time. Per run: p50 and mean time to the first token,
and the round trips per machine the first of those requests made (counted on the links). The settings alternate,
repeat by repeat, so the ratios compare like with like.
"""

from __future__ import annotations

import argparse
import logging
import os
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

logger = logging.getLogger("bench_first_token")

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing in the old oak tree near the wide "
         "slow river at dawn").split()


def run(mesh, rtt: float, answer: bool, exact: bool, lengths: int, repeat: int) -> dict[str, Any]:
    from bench.linkem import LinkControl, hook

    os.environ["SHAREDLLM_RELAY_ALLOC_SIZES"] = "1" if answer else "0"  # read by the engine's client relays
    control = tempfile.mkdtemp(prefix="sharedllm-first-token-")
    link = {"rtt_ms": rtt, "process": True, "wire": True, "control_dir": control}
    with mesh.load("gemma-3-270m", n_ctx=512, machines=["machine-1", "machine-2"], parallel=4, exact_batches=exact,
                   tunnel_hook=hook(**link)) as llm:
        llm.measured()  # prompt chunks as measured (a first load measures while idle)
        llm.create_completion("Hello there", max_tokens=2, temperature=0)
        links = LinkControl.find(control)
        times, first_round_trips = [], None
        for n in range(3, 3 + lengths):
            prompt = " ".join(WORDS[repeat % 3:repeat % 3 + n])
            before = [link.stats()["round_trips"] for link in links]
            t0 = time.perf_counter()
            next(iter(llm.create_completion(prompt, max_tokens=1, temperature=0, stream=True)))
            times.append((time.perf_counter() - t0) * 1000)
            if first_round_trips is None:
                first_round_trips = [link.stats()["round_trips"] - b for link, b in zip(links, before, strict=True)]
    return {"times_ms": times, "first_round_trips": first_round_trips}


def report(result: dict[str, Any], markdown: bool) -> str:
    rows = [["relay answers sizes", "batches", "first token p50 ms", "mean ms", "round trips/machine (1st request)"]]
    for r in result["rows"]:
        rows.append(["yes" if r["answer"] else "no (asked)", "exact" if r["exact"] else "fast",
                     f"{r['p50_ms']:.0f}", f"{r['mean_ms']:.0f}", ", ".join(map(str, r["first_round_trips"]))])
    lines = [common.render(rows, markdown), ""]
    for exact, ratio in result["speedup"].items():
        lines.append(f"{exact} batches: first token {ratio:.2f}x sooner with the sizes answered in the relay")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rtt", type=float, default=20.0, help="emulated round trip to each machine, ms (default 20)")
    p.add_argument("--lengths", type=int, default=8, help="new prompt lengths per run (default 8)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting (default 2)")
    p.add_argument("--out", default="bench/results/first-token.json", help="JSON results file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.lengths < 1 or args.lengths > len(WORDS) - 5:
        p.error(f"--lengths must be 1 to {len(WORDS) - 5}")

    from sharedllm.local import LocalMesh

    t0 = time.perf_counter()
    runs: dict[tuple[bool, bool], list[dict[str, Any]]] = {}
    with LocalMesh(machines=2, dashboard=False) as lm:
        mesh = lm.mesh()
        for repeat in range(args.repeats):
            for answer in (True, False):
                for exact in (True, False):
                    logger.info("repeat %d, sizes answered in the relay: %s, exact batches: %s", repeat, answer, exact)
                    runs.setdefault((answer, exact), []).append(run(mesh, args.rtt, answer, exact, args.lengths,
                                                                    repeat))
    rows = []
    for (answer, exact), rs in runs.items():
        times = [t for r in rs for t in r["times_ms"]]
        rows.append({"answer": answer, "exact": exact, "p50_ms": statistics.median(times),
                     "mean_ms": statistics.mean(times), "first_round_trips": rs[0]["first_round_trips"],
                     "times_ms": times})
    p50 = {(r["answer"], r["exact"]): r["p50_ms"] for r in rows}
    result = {"machine": common.machine_info(), "rtt_ms": args.rtt, "lengths": args.lengths, "repeats": args.repeats,
              "rows": rows, "speedup": {("exact" if e else "fast"): p50[(False, e)] / p50[(True, e)]
                                        for e in (True, False)},
              "texts_match": True, "total_seconds": time.perf_counter() - t0}
    return common.finish(result, args.out, report(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
