# SPDX-License-Identifier: AGPL-3.0-or-later
"""Recovery benchmark: the longest stall the caller sees after a machine fails mid-stream (kill to next token).

    .venv/bin/python bench/bench_recovery.py [--repeats 3] [--tokens 128] [--kill-after 16] [--markdown]
                                             [--out bench/results/recovery.json]

An embedded 2-machine mesh streams a greedy completion; after ``--kill-after`` chunks machine-2 fails, one of:

- ``rpc-server``: its rpc-server is killed (SIGKILL). The machine's actor starts a new one; the client notices the
  broken session, leases the surviving machine, reloads the model there, replays the request and goes on;
- ``worker``: its ``dask worker`` process alone is killed (SIGKILL). The machine's data plane (rpc-server and relay)
  outlives it and the nanny's new worker adopts it: the stream must go on with **no** recovery and no stall;
- ``power cut``: every process of the machine is killed (``LocalMesh.stop_machine(SIGKILL)``): recovered as for the
  rpc-server; the machine is started again before the next run.

The text must equal a run without the fault. Per run: kill -> next token (the longest gap the caller saw after the
kill), and for a recovery its parts: kill -> the client's recovery begins (noticing the loss, and checking that the
model was not what made the server abort), the reload (lease + engine start on the remaining machine), and the
replay (the prompt and the tokens already delivered, read again) up to the next new token.

``--standby both`` (default) runs each recovering fault twice per repeat, side by side: with the standby engine
process the handle keeps (``sharedllm.engine.Standby``: the reload loads into a process started ahead) and without
(the reload starts its own, as before it existed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import sys
import time
from pathlib import Path

from sharedllm.local import LocalMesh

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

log = logging.getLogger("bench.recovery")
PROMPT = "Once upon a time"
FAULTS = ("rpc-server", "worker", "power cut")
MID = "machine-2"


def machine(mesh, mid):
    return next((m for m in mesh.machines() if m["machine_id"] == mid), None)


def worker_pid(lm, address: str) -> int | None:
    try:
        return lm.client().run(os.getpid, workers=[address])[address]
    except Exception:  # the worker is away (restarting): not yet
        return None


def wait_until(what: str, ready, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := ready()) is not None:
            return got
        time.sleep(0.2)
    raise TimeoutError(f"{what} after {timeout:.0f}s")


def back(lm, mesh, fault: str, rpc_pid: int, killed_worker: int | None) -> dict:
    """Wait until machine-2 serves again; what it runs then."""
    def ready():
        m = machine(mesh, MID)
        if not m or m["rpc"]["state"] != "ready":
            return None
        if fault == "worker":  # a new worker process, answering, with the same data plane
            pid = worker_pid(lm, m["actor_worker"])
            return m if pid not in (None, killed_worker) else None
        return m if m["rpc"]["pid"] != rpc_pid else None
    return wait_until(f"{MID} did not serve again", ready)


def one_run(lm, mesh, fault: str, tokens: int, kill_after: int, reference: str, standby: bool = True) -> dict:
    victim = machine(mesh, MID)
    rpc_pid = victim["rpc"]["pid"]
    killed_worker = worker_pid(lm, victim["actor_worker"]) if fault == "worker" else None
    gaps: list[float] = []
    times: list[float] = []  # each chunk's arrival
    with mesh.load("gemma-3-270m", n_ctx=2048, machines=["machine-1", MID]) as llm:
        if not standby:  # as before the standby existed: a recovery starts its own engine process
            llm.standby = False
            llm.drop_standby()
        text, n, t_kill, after_kill, prev = "", 0, None, None, None
        t0 = time.monotonic()
        for chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True):
            now = time.monotonic()
            times.append(now)
            if prev is not None:
                gaps.append(now - prev)
            if t_kill is not None and after_kill is None:
                after_kill = now
            prev = now
            text += chunk["choices"][0]["text"]
            n += 1
            if n == kill_after:
                if fault == "rpc-server":
                    os.kill(rpc_pid, signal.SIGKILL)
                elif fault == "worker":
                    os.kill(killed_worker, signal.SIGKILL)
                else:
                    lm.stop_machine(MID, signal.SIGKILL)
                t_kill = time.monotonic()
        total = time.monotonic() - t0
        recs = list(llm.recoveries)
    # The longest gap between chunks from the kill on (the first one counts from the kill itself).
    later = gaps[kill_after:]  # gaps[i] ends at chunk i + 2: the gaps after the first chunk after the kill
    stall = max([after_kill - t_kill, *later]) if after_kill is not None else None
    row = {"fault": fault, "standby": standby, "kill_to_next_token_s": stall, "recoveries": len(recs),
           "itl_before_kill_ms": 1000 * statistics.median(gaps[:kill_after - 1]) if kill_after > 2 else None,
           "total_s": total, "chunks": n, "same_text": text == reference}
    if recs:
        rec = recs[0]
        # replay: from the reloaded engine to the first chunk after it (a chunk already under way at the kill may
        # arrive before the loss is noticed)
        reloaded = rec["started"] + rec["seconds"]
        resumed = next((t for t in times if t > reloaded), None)
        row.update(lost=rec["lost"], notice_s=rec["started"] - t_kill, reload_s=rec["seconds"],
                   replay_s=resumed - reloaded if resumed is not None else None)
    if fault == "power cut":
        lm.add_machine(MID)
    m = back(lm, mesh, fault, rpc_pid, killed_worker)
    row["data_plane_kept"] = m["rpc"]["pid"] == rpc_pid
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kill-after", type=int, default=16)
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown")
    ap.add_argument("--out", default="bench/results/recovery.json")
    ap.add_argument("--standby", choices=("both", "on", "off"), default="both",
                    help="recover into the handle's standby engine process, or start one (both: side by side)")
    args = ap.parse_args()
    settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.standby]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    runs = []
    t_start = time.monotonic()
    with LocalMesh(machines=2, dashboard=False) as lm:
        mesh = lm.mesh()
        with mesh.load("gemma-3-270m", n_ctx=2048, machines=["machine-1", MID]) as llm:
            reference = llm.create_completion(PROMPT, max_tokens=args.tokens, temperature=0)["choices"][0]["text"]
        for k in range(args.repeats):
            for fault in FAULTS:
                # a worker's loss recovers nothing; the order alternates (ABBA): a run after another fault's runs
                # finds the machine still settling
                order = settings if k % 2 == 0 else settings[::-1]
                for standby in order if fault != "worker" else settings[:1]:
                    r = one_run(lm, mesh, fault, args.tokens, args.kill_after, reference, standby)
                    runs.append(r)
                    log.warning("run %d, %s, standby %s: %.2fs kill -> next token, %d recoveries, same text %s",
                                k + 1, fault, standby, r["kill_to_next_token_s"] or -1, r["recoveries"],
                                r["same_text"])

    def med(rs, key):
        vals = [r[key] for r in rs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    rows = []
    for fault, standby in dict.fromkeys((r["fault"], r["standby"]) for r in runs):
        rs = [r for r in runs if r["fault"] == fault and r["standby"] == standby]
        rows.append({"fault": fault, "standby": standby, "runs": len(rs),
                     "kill_to_next_token_median_s": med(rs, "kill_to_next_token_s"),
                     "kill_to_next_token_max_s": max(r["kill_to_next_token_s"] or 0 for r in rs),
                     "itl_before_kill_median_ms": med(rs, "itl_before_kill_ms"),
                     "recoveries": sum(r["recoveries"] for r in rs), "notice_median_s": med(rs, "notice_s"),
                     "reload_median_s": med(rs, "reload_s"), "replay_median_s": med(rs, "replay_s"),
                     "data_plane_kept": all(r["data_plane_kept"] for r in rs),
                     "all_same_text": all(r["same_text"] for r in rs)})

    def cell(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    head = ["killed", "standby", "kill -> next token (median)", "(max)", "ITL before (ms)", "recoveries", "notice",
            "reload", "replay", "data plane kept", "text == no fault"]
    lines = [[r["fault"], "yes" if r["standby"] else "no", cell(r["kill_to_next_token_median_s"]) + " s",
              cell(r["kill_to_next_token_max_s"]) + " s",
              cell(r["itl_before_kill_median_ms"], "{:.0f}"), f"{r['recoveries']} of {r['runs']}",
              cell(r["notice_median_s"]), cell(r["reload_median_s"]), cell(r["replay_median_s"]),
              "yes" if r["data_plane_kept"] else "no", "yes" if r["all_same_text"] else "NO"] for r in rows]
    print(common.render([head, *lines], args.markdown))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": common.machine_info(), "config": vars(args), "summary": rows,
                                          "runs": runs, "total_seconds": time.monotonic() - t_start}, indent=1))
    if not all(r["all_same_text"] for r in rows):
        raise SystemExit("a recovered text differs from the run without a fault")
    if any(r["recoveries"] for r in rows if r["fault"] == "worker"):
        raise SystemExit("a killed dask worker broke the session: its data plane should have outlived it")


if __name__ == "__main__":
    main()
