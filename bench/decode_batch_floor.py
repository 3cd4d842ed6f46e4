# SPDX-License-Identifier: AGPL-3.0-or-later
"""What batching can give on this machine without any mesh: llama.cpp's decode time for 1..N sequences in one process.

    .venv/bin/python bench/decode_batch_floor.py [--max 16] [--repeats 5] [--out bench/results/decode-batch-floor.json]

The model is loaded with ``parallel=max`` (one KV stream per sequence, as the engine does, CPU kernels of an
rpc-server), each sequence reads a short prompt, then one decode step of k sequences (one token each, logits for
all) is timed for k = 1, 2, 4, ... (best of ``--repeats``). A step that costs k times one sequence's is compute-bound:
batching then cannot multiply throughput, on a mesh or not; one that costs about the same is latency- or
memory-bound, and batching pays.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max", type=int, default=16, help="most sequences in a step (default 16)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    p.add_argument("--out", default="bench/results/decode-batch-floor.json")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)

    import os

    import llama_cpp

    from sharedllm.engine import build_llama
    from sharedllm.models import default_model_path

    llm = build_llama(str(default_model_path()), n_ctx=256, parallel=args.max, n_threads=args.threads or os.cpu_count())
    ctx, memory = llm.ctx, llama_cpp.llama_get_memory(llm.ctx)
    batch = llama_cpp.llama_batch_init(64 * args.max, 0, 1)

    def decode(items: list[tuple[int, int, int]]) -> None:
        for i, (tok, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, True
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    prompt = llm.tokenize(b"Once upon a time")
    for s in range(args.max):
        decode([(tok, i, s) for i, tok in enumerate(prompt)])
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64, args.max) if k <= args.max})
    rows, out = [["sequences", "step ms", "ms per token", "tokens/s", "x one sequence"]], []
    for k in ks:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            decode([(100, len(prompt), s) for s in range(k)])
            best = min(best, time.perf_counter() - t0)
            for s in range(k):
                llama_cpp.llama_memory_seq_rm(memory, s, len(prompt), -1)
        out.append({"sequences": k, "step_ms": best * 1000, "tok_s": k / best})
        rows.append([str(k), f"{best * 1000:.1f}", f"{best * 1000 / k:.1f}", f"{k / best:.1f}",
                     f"{(k / best) / out[0]['tok_s']:.2f}"])
    table = common.render(rows, args.markdown)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": common.machine_info(), "runs": out}, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
