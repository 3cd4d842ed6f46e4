# SPDX-License-Identifier: AGPL-3.0-or-later
"""Machines behind NAT cost little: decode through the relay hub against direct relays, on the same kind of
namespaced machines, in one run.

    .venv/bin/python bench/bench_nat.py [--repeats 4] [--tokens 64] [--markdown] [--out bench/results/nat.json]

Needs root, iproute2 and nftables (``sharedllm.netlab``). Four machines, each in a network namespace of its own on
one bridge: ``direct-1`` and ``direct-2`` take inbound connections; ``nat-1`` and ``nat-2`` sit behind a firewall
that drops every new inbound connection and run ``--no-inbound`` (their workers listen on loopback, their relays dial
out to the scheduler's relay hub). Each repeat loads Gemma 3 270M on one pair and streams a greedy completion, then
on the other (the order alternating, ABBA). Per pair: load seconds, first token ms, decode tokens/s; the ratio is the
hub pair's over the direct pair's. The texts must be equal (and equal across pairs).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

log = logging.getLogger("bench.nat")
PAIRS = {"direct relays": ["direct-1", "direct-2"], "through the hub": ["nat-1", "nat-2"]}


def one(mesh, machines: list[str], tokens: int) -> dict:
    t0 = time.perf_counter()
    with mesh.load(common.MODEL_NAME, n_ctx=common.N_CTX, machines=machines, max_recoveries=0) as llm:
        load_s = time.perf_counter() - t0
        endpoints = llm.topology.endpoints
        stats = common.timed_stream(lambda: llm.create_completion(common.PROMPT, stream=True,
                                                                  **common.completion_kwargs(tokens)))
    return {"load_s": load_s, "ttft_ms": stats["ttft_ms"], "decode_tps": stats["decode_tps"],
            "gap_p50_ms": stats["gap_p50_ms"], "endpoints": endpoints, "text": stats["text"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", default="bench/results/nat.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    from sharedllm.local import LocalMesh
    from sharedllm.netlab import unavailable

    if (why := unavailable()) is not None:
        log.error("cannot run: %s", why)
        return 2
    started = time.time()
    runs: dict[str, list[dict]] = {k: [] for k in PAIRS}
    with LocalMesh(machines=0, netlab=True, behind_nat=PAIRS["through the hub"],
                   no_inbound=PAIRS["through the hub"]) as lm:
        for machines in PAIRS.values():
            for m in machines:
                lm.add_machine(m)
        mesh = lm.mesh()
        mesh.wait_for_machines(4, timeout=120)
        for machines in PAIRS.values():
            one(mesh, machines, 4)  # warm: each machine's tensor cache, the page cache
        for r in range(args.repeats):
            order = list(PAIRS) if r % 2 == 0 else list(reversed(PAIRS))
            for name in order:
                run = one(mesh, PAIRS[name], args.tokens)
                runs[name].append(run)
                log.info("repeat %d %s: load %.2f s, ttft %.0f ms, %.1f tok/s", r + 1, name, run["load_s"],
                         run["ttft_ms"], run["decode_tps"])
        drops = {m: lm.lab.drops(m) for m in PAIRS["through the hub"]}
    med = {name: {k: statistics.median(x[k] for x in rs) for k in ("load_s", "ttft_ms", "decode_tps", "gap_p50_ms")}
           for name, rs in runs.items()}
    hub, direct = med["through the hub"], med["direct relays"]
    ratio = {"decode_tps": hub["decode_tps"] / direct["decode_tps"], "ttft_ms": hub["ttft_ms"] / direct["ttft_ms"],
             "load_s": hub["load_s"] / direct["load_s"]}
    per_repeat = [a["decode_tps"] / b["decode_tps"] for a, b in zip(runs["through the hub"], runs["direct relays"],
                                                                      strict=True)]
    texts = {x["text"] for rs in runs.values() for x in rs}
    rows = [["machines", "load s", "TTFT ms", "decode tok/s", "token gap p50 ms"]]
    for name in PAIRS:
        m = med[name]
        rows.append([name, common.fmt(m["load_s"], 2), common.fmt(m["ttft_ms"], 0), common.fmt(m["decode_tps"], 1),
                     common.fmt(m["gap_p50_ms"], 1)])
    rows.append(["hub / direct", common.fmt(ratio["load_s"], 3), common.fmt(ratio["ttft_ms"], 3),
                 common.fmt(ratio["decode_tps"], 3), ""])
    result = {"command": " ".join(["bench/bench_nat.py", *(argv if argv is not None else sys.argv[1:])]),
              "repeats": args.repeats, "tokens": args.tokens, "runs": runs, "median": med, "ratio": ratio,
              "decode_ratio_per_repeat": per_repeat, "firewall_drops": drops, "texts_match": len(texts) == 1,
              "machine": common.machine_info(), "total_seconds": time.time() - started,
              "date": time.strftime("%Y-%m-%d")}
    return common.finish(result, args.out, common.render(rows, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
