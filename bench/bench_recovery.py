# SPDX-License-Identifier: AGPL-3.0-or-later
"""Recovery benchmark: the longest stall the caller sees after a machine is killed mid-stream (kill to next token).

    .venv/bin/python bench/bench_recovery.py [--repeats 3] [--tokens 128] [--out bench/results/recovery.json]

An embedded 2-machine mesh streams a greedy completion; after ``--kill-after`` chunks one machine is killed (its
rpc-server with SIGKILL, or its whole worker process). The client notices, leases the surviving machine, reloads the
model there, replays the request and goes on. The text must equal a run without the fault.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import time
from pathlib import Path

from sharedllm.local import LocalMesh

log = logging.getLogger("bench.recovery")
PROMPT = "Once upon a time"


def machine(mesh, mid):
    return next((m for m in mesh.machines() if m["machine_id"] == mid), None)


def wait_ready(mesh, mid, old_pid, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = machine(mesh, mid)
        if m and m["rpc"]["state"] == "ready" and m["rpc"]["pid"] != old_pid:
            return m
        time.sleep(0.2)
    raise TimeoutError(f"{mid} did not come back")


def one_run(lm, mesh, fault: str, tokens: int, kill_after: int, reference: str | None) -> dict:
    victim = machine(mesh, "machine-2")
    rpc_pid = victim["rpc"]["pid"]
    target = rpc_pid
    if fault == "worker":
        target = lm.client().run(os.getpid, workers=[victim["actor_worker"]])[victim["actor_worker"]]
    with mesh.load("gemma-3-270m", n_ctx=2048, machines=["machine-1", "machine-2"]) as llm:
        text, n, t_kill, gap, prev = "", 0, None, 0.0, None
        t0 = time.perf_counter()
        for chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
            now = time.perf_counter()
            if t_kill is not None:  # the longest wait the caller saw after the kill
                gap = max(gap, now - max(prev, t_kill))
            prev = now
            text += chunk["choices"][0]["text"]
            n += 1
            if n == kill_after:
                os.kill(target, signal.SIGKILL)
                t_kill = time.perf_counter()
        total = time.perf_counter() - t0
        rec = llm.recoveries[0] if llm.recoveries else {}
    wait_ready(mesh, "machine-2", rpc_pid)
    return {"fault": fault, "kill_to_next_token_s": gap, "reload_s": rec.get("seconds"), "lost": rec.get("lost"),
            "total_s": total, "chunks": n, "same_text": reference is None or text == reference, "text": text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kill-after", type=int, default=16)
    ap.add_argument("--out", default="bench/results/recovery.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    runs = []
    with LocalMesh(machines=2, dashboard=False) as lm:
        mesh = lm.mesh()
        with mesh.load("gemma-3-270m", n_ctx=2048, machines=["machine-1", "machine-2"]) as llm:
            reference = llm.create_completion(PROMPT, max_tokens=args.tokens, temperature=0)["choices"][0]["text"]
        for _ in range(args.repeats):
            for fault in ("rpc-server", "worker"):
                r = one_run(lm, mesh, fault, args.tokens, args.kill_after, reference)
                runs.append(r)
                log.warning("%s: %.2fs kill->next token, same text %s", fault, r["kill_to_next_token_s"],
                            r["same_text"])

    rows = []
    for fault in ("rpc-server", "worker"):
        rs = [r for r in runs if r["fault"] == fault]
        gaps = [r["kill_to_next_token_s"] for r in rs]
        rows.append({"fault": fault, "median_s": statistics.median(gaps), "max_s": max(gaps),
                     "reload_median_s": statistics.median(r["reload_s"] for r in rs),
                     "all_same_text": all(r["same_text"] for r in rs), "runs": len(rs)})
    print(f"{'killed':<12} {'kill->next token (median)':>26} {'(max)':>8} {'reload (median)':>16} "
          f"{'text == no-fault':>17}")
    for row in rows:
        print(f"{row['fault']:<12} {row['median_s']:>25.2f}s {row['max_s']:>7.2f}s {row['reload_median_s']:>15.2f}s "
              f"{row['all_same_text']!s:>17}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": rows, "runs": [{k: v for k, v in r.items() if k != "text"}
                                                                     for r in runs],
                                          "config": vars(args), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                                         indent=1))


if __name__ == "__main__":
    main()
