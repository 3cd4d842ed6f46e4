# SPDX-License-Identifier: AGPL-3.0-or-later
"""The user port costs nothing: a load and a generation through it against the operator's Dask path, in one run.

    .venv/bin/python bench/bench_userport.py [--repeats 8] [--tokens 64] [--markdown]
                                             [--out bench/results/userport.json]

One embedded 2-machine mesh (a cluster secret: the Dask port locked down). Each repeat loads Gemma 3 270M through
each path, alternating the order (ABBA), and streams ``STREAMS`` greedy completions on each load: through the user
port (``Mesh(HOST:PORT, key=...)``, the way users come in) and through Dask's port
(``Mesh(distributed.Client(..., security=admin_security(key)))``, the operator's way and the only way before the user
port). Per path: the load's seconds (lease, engine start, weights), the first token's milliseconds and decode
tokens/s (the median of a load's streams), and a state call's milliseconds. The ratio is the user port's over
Dask's (load: lower is better; tokens/s: higher).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

log = logging.getLogger("bench.userport")
PATHS = ("user port", "dask port")
STREAMS = 3  # requests per load (their median): a first token is a few ms, and noisy


def one(mesh, tokens: int) -> dict:
    t0 = time.perf_counter()
    with mesh.load(common.MODEL_NAME, n_ctx=common.N_CTX, machines=["machine-1", "machine-2"]) as llm:
        load_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        streams = [common.timed_stream(lambda: llm.create_completion(common.PROMPT, stream=True,
                                                                     **common.completion_kwargs(tokens)))
                   for _ in range(STREAMS)]
        request_s = (time.perf_counter() - t1) / STREAMS
        stats = {"ttft_ms": statistics.median(x["ttft_ms"] for x in streams),
                 "decode_tps": statistics.median(x["decode_tps"] for x in streams), "text": streams[0]["text"]}
        t2 = time.perf_counter()
        mesh.state()
        state_ms = (time.perf_counter() - t2) * 1000
    return {"load_s": load_s, "plan_ms": llm.plan_ms, "ttft_ms": stats["ttft_ms"], "decode_tps": stats["decode_tps"],
            "request_s": request_s, "state_ms": state_ms, "text": stats["text"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", default="bench/results/userport.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    from sharedllm.client import Mesh
    from sharedllm.local import LocalMesh

    started = time.time()
    runs: dict[str, list[dict]] = {k: [] for k in PATHS}
    with LocalMesh(machines=2) as lm:
        user = lm.mesh()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            dask = Mesh(lm.client())
        one(user, 4)  # warm: the tensor caches, the page cache, the first engine
        for r in range(args.repeats):
            order = PATHS if r % 2 == 0 else tuple(reversed(PATHS))
            for path in order:
                run = one(user if path == "user port" else dask, args.tokens)
                runs[path].append(run)
                log.info("repeat %d %s: load %.2f s, ttft %.0f ms, %.1f tok/s", r + 1, path, run["load_s"],
                         run["ttft_ms"], run["decode_tps"])
    med = {path: {k: statistics.median(x[k] for x in rs) for k in ("load_s", "plan_ms", "ttft_ms", "decode_tps",
                                                                    "state_ms")}
           for path, rs in runs.items()}
    texts = {x["text"] for rs in runs.values() for x in rs}
    ratio = {"load_s": med["user port"]["load_s"] / med["dask port"]["load_s"],
             "decode_tps": med["user port"]["decode_tps"] / med["dask port"]["decode_tps"],
             "ttft_ms": med["user port"]["ttft_ms"] / med["dask port"]["ttft_ms"]}
    rows = [["path", "load s", "plan ms", "TTFT ms", "decode tok/s", "state call ms"]]
    for path in PATHS:
        m = med[path]
        rows.append([path, common.fmt(m["load_s"], 2), common.fmt(m["plan_ms"], 1), common.fmt(m["ttft_ms"], 0),
                     common.fmt(m["decode_tps"], 1), common.fmt(m["state_ms"], 1)])
    rows.append(["user port / dask port", common.fmt(ratio["load_s"], 3), "", common.fmt(ratio["ttft_ms"], 3),
                 common.fmt(ratio["decode_tps"], 3), ""])
    result = {"command": " ".join(["bench/bench_userport.py", *(argv if argv is not None else sys.argv[1:])]),
              "repeats": args.repeats, "tokens": args.tokens, "runs": runs, "median": med, "ratio": ratio,
              "texts_match": len(texts) == 1, "machine": common.machine_info(),
              "total_seconds": time.time() - started, "date": time.strftime("%Y-%m-%d")}
    return common.finish(result, args.out, common.render(rows, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
