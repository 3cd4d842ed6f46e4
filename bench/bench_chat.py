# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: multi-turn chats, with and without the prompt cache. How long does each turn wait for its first token?

    .venv/bin/python bench/bench_chat.py [--turns 6] [--answer-tokens 32] [--markdown] [--out bench/results/chat.json]

Gemma 3 270M on an embedded 2-machine loopback mesh (``LocalMesh``). Two users chat with the same model, taking
turns (A1, B1, A2, B2, ...), with the same long system prompt (a document of about 600 tokens, as assistants carry)
and their own questions; every answer is greedy, ``--answer-tokens`` long, and becomes part of the next turn's
prompt. Each setup is a handle: one request at a time (``parallel=1``), exact batches and fast batches
(``parallel=4``), each with ``prompt_cache`` off and on. Reported per setup: the time to first token of the first
turns and the mean over the later ones, the prompt tokens read and found in the cache, and whether the texts with the
cache are the texts without it (one at a time and exact batches must keep them).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

logger = logging.getLogger("bench_chat")

DOCUMENT = ("The village council meets on the first Monday of every month in the old school hall. Its members are "
            "elected for three years; the chair is chosen among them each spring. The council looks after the roads, "
            "the library, the market square and the footbridge over the river, and it sets the fees of the weekly "
            "market. Residents may speak at any meeting for up to five minutes after registering at the desk. ") * 6
SYSTEM = "You answer questions about the village's rules, briefly, using only this document:\n\n" + DOCUMENT
QUESTIONS = {
    "A": ["When does the council meet?", "Where?", "How long are members elected for?", "Who chooses the chair?",
          "What does the council look after?", "Can I speak at a meeting?", "For how long?", "What must I do first?"],
    "B": ["What are the market fees set by?", "Is there a library?", "What crosses the river?",
          "When is the chair chosen?", "How often are meetings held?", "Who may speak?", "Where is the desk?",
          "Is the market weekly?"],
}


def chat_turn(llm, messages: list[dict], tokens: int) -> tuple[str, float]:
    """One streamed greedy turn: its answer, and the time to its first content token (ms)."""
    start, first, text = time.perf_counter(), None, ""
    for chunk in llm.create_chat_completion(messages=messages, max_tokens=tokens, temperature=0, stream=True):
        piece = chunk["choices"][0]["delta"].get("content") or ""
        if piece and first is None:
            first = time.perf_counter()
        text += piece
    return text, ((first or time.perf_counter()) - start) * 1000


def run_chats(llm, turns: int, tokens: int) -> dict[str, Any]:
    """The two users' chats, taking turns; each turn's TTFT and answer, and the prompt tokens read and cached."""
    before = llm.engine_stats
    chats = {user: [{"role": "system", "content": SYSTEM}] for user in QUESTIONS}
    out: list[dict[str, Any]] = []
    for turn in range(turns):
        for user, messages in chats.items():
            messages.append({"role": "user", "content": QUESTIONS[user][turn % len(QUESTIONS[user])]})
            answer, ttft = chat_turn(llm, messages, tokens)
            messages.append({"role": "assistant", "content": answer})
            out.append({"user": user, "turn": turn + 1, "ttft_ms": ttft, "answer": answer})
    deadline = time.monotonic() + 30
    while (after := llm.engine_stats).get("running", 0) and time.monotonic() < deadline:
        time.sleep(0.05)  # a benchmark's wait for the engine's last report
    read = after.get("prompt_tokens", 0) - before.get("prompt_tokens", 0)
    cached = after.get("cached_tokens", 0) - before.get("cached_tokens", 0)
    first = [t["ttft_ms"] for t in out if t["turn"] == 1]
    later = [t["ttft_ms"] for t in out if t["turn"] > 1]
    return {"turns": out, "first_turn_ttft_ms": statistics.mean(first), "later_ttft_ms": statistics.mean(later),
            "last_turn_ttft_ms": statistics.mean(t["ttft_ms"] for t in out if t["turn"] == turns),
            "prompt_tokens": read, "cached_tokens": cached}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=6, help="turns of each user (default 6)")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--out", default="bench/results/chat.json")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from sharedllm.local import LocalMesh

    setups = [("one at a time", 1, True), ("exact batches", 4, True), ("fast batches", 4, False)]
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    with LocalMesh(machines=2, dashboard=False, scheduler_args=["--requests-per-minute", "100000"]) as lm:
        mesh = lm.mesh()
        for name, parallel, exact in setups:
            for cache in (False, True):
                key = f"{name}, prompt cache {'on' if cache else 'off'}"
                logger.info("%s", key)
                with mesh.load("gemma-3-270m", n_ctx=4096, machines=["machine-1", "machine-2"], parallel=parallel,
                               exact_batches=exact, prompt_cache=cache) as llm:
                    llm.measured()  # exact batches as wide as measured (a first load measures while idle)
                    llm.create_completion("Once upon a time", max_tokens=4, temperature=0)  # warm up
                    results[key] = {"setup": name, "prompt_cache": cache, **run_chats(llm, args.turns,
                                                                                      args.answer_tokens)}
    for name, _, exact in setups:
        off, on = results[f"{name}, prompt cache off"], results[f"{name}, prompt cache on"]
        on["texts_match_without_cache"] = [t["answer"] for t in on["turns"]] == [t["answer"] for t in off["turns"]]
        on["later_ttft_speedup"] = off["later_ttft_ms"] / on["later_ttft_ms"]
        on["must_match"] = exact
    out = {"machine": common.machine_info(), "turns": args.turns, "answer_tokens": args.answer_tokens,
           "results": results, "total_seconds": time.perf_counter() - t0}
    rows = [["setup", "TTFT turn 1 ms", "TTFT later turns ms", f"TTFT turn {args.turns} ms", "prompt tokens",
             "of which cached", "later turns' speed-up", "texts = without cache"]]
    for key, r in results.items():
        rows.append([key, f"{r['first_turn_ttft_ms']:.0f}", f"{r['later_ttft_ms']:.0f}",
                     f"{r['last_turn_ttft_ms']:.0f}", str(r["prompt_tokens"]), str(r["cached_tokens"]),
                     f"{r['later_ttft_speedup']:.2f}x" if "later_ttft_speedup" in r else "",
                     ("yes" if r["texts_match_without_cache"] else "NO" + ("" if r["must_match"] else " (fast)"))
                     if "texts_match_without_cache" in r else ""])
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(common.render(rows, args.markdown))
    logger.info("wrote %s (%.0f s in all)", path, out["total_seconds"])
    return 0 if all(r.get("texts_match_without_cache", True) or not r.get("must_match") for r in results.values()) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
