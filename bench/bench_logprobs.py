# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: what log-probabilities cost a generation, SharedLLM's engine against llama-cpp-python's own path.

    .venv/bin/python bench/bench_logprobs.py [--tokens 64] [--native-tokens 8] [--repeats 3] [--markdown]
                                             [--out bench/results/logprobs.json]

Gemma 3 270M, local (the log-probabilities are computed where the logits are, in the engine process, whatever
holds the layers). Per setup, greedy ``create_completion`` of ``--tokens`` tokens without ``logprobs`` and with
``logprobs`` = 1, 5 and 20 (the top tokens asked for), interleaved, best of ``--repeats``:

- ``engine, parallel=1``: one request at a time (``sharedllm.engine.Engine``, no ``logits_all``);
- ``engine, parallel=4``: four requests at once (exact batches), aggregate;
- ``llama-cpp-python``: a plain ``Llama`` with ``logits_all=True`` (its ``logprobs`` need it), ``--native-tokens``
  tokens (its path sorts the whole vocabulary in Python for every token).

Per run: ms per token, and the ratio to the same setup without ``logprobs``. The texts and the log-probabilities of
the engine's runs are checked against llama-cpp-python's (its first ``--native-tokens`` tokens).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

logger = logging.getLogger("bench_logprobs")
PROMPTS = ["Once upon a time", "The history of the printing press begins", "Here is a recipe for tomato soup:",
           "Why is the sky blue? The answer lies in"]
LEVELS = (None, 1, 5, 20)
N_CTX = 512


def _run(call, parallel: int, tokens: int, k: int | None) -> tuple[float, list[dict]]:
    """Seconds per token of ``parallel`` concurrent greedy completions (aggregate), and their choices."""
    def one(prompt: str) -> dict:
        args = {"prompt": prompt, "max_tokens": tokens, "temperature": 0}
        if k is not None:
            args["logprobs"] = k
        return call(args)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        outs = list(pool.map(one, PROMPTS[:parallel]))
    n = sum(o["usage"]["completion_tokens"] for o in outs)
    return (time.perf_counter() - t0) / n, [o["choices"][0] for o in outs]


def main(argv: list[str] | None = None) -> int:
    from sharedllm.engine import Engine, EngineSpec, build_llama
    from sharedllm.models import default_model_path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--native-tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--out", default="bench/results/logprobs.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model = str(default_model_path())
    t_start = time.monotonic()
    runs: list[dict] = []

    llm = build_llama(model, n_ctx=N_CTX, use_extra_bufts=False, logits_all=True)
    native: dict[str, dict] = {}
    try:
        def call(a: dict) -> dict:
            llm.reset()  # a fresh context each time: llama-cpp-python would reuse the last prompt's cells
            return llm.create_completion(**a)

        for prompt in PROMPTS:
            native[prompt] = call({"prompt": prompt, "max_tokens": args.native_tokens, "temperature": 0,
                                   "logprobs": 5})["choices"][0]
        for k in (None, 5):
            best = min(_run(call, 1, args.native_tokens, k)[0] for _ in range(max(1, args.repeats - 1)))
            runs.append({"setup": "llama-cpp-python (logits_all)", "parallel": 1, "logprobs": k,
                         "tokens": args.native_tokens, "ms_per_token": 1000 * best})
        scores_mib = llm.scores.nbytes / 2**20
    finally:
        llm.close()

    mismatches: list[str] = []
    for parallel in (1, 4):
        engine = Engine(EngineSpec(model, llama_kwargs={"n_ctx": N_CTX}, parallel=parallel, prompt_cache=False))
        engine.start()
        engine.measured(300)  # exact batches as wide as measured (a first load measures while idle)
        try:
            call = lambda a, e=engine: e.call("create_completion", a)  # noqa: E731
            best: dict[int | None, float] = {}
            for _ in range(args.repeats):
                for k in LEVELS:
                    sec, choices = _run(call, parallel, args.tokens, k)
                    best[k] = min(best.get(k, sec), sec)
                    for prompt, choice in zip(PROMPTS, choices, strict=False):
                        ref = native[prompt]
                        if not choice["text"].startswith(ref["text"]):
                            mismatches.append(f"parallel={parallel}: text of {prompt!r}")
                        if k == 5:
                            got = choice["logprobs"]["token_logprobs"][:args.native_tokens]
                            want = [float(x) for x in ref["logprobs"]["token_logprobs"]]
                            if any(abs(a - b) > 1e-4 for a, b in zip(got, want, strict=False)):
                                mismatches.append(f"parallel={parallel}: logprobs of {prompt!r}")
            for k in LEVELS:
                runs.append({"setup": f"engine, parallel={parallel}", "parallel": parallel, "logprobs": k,
                             "tokens": args.tokens, "ms_per_token": 1000 * best[k]})
        finally:
            engine.close()

    base = {r["setup"]: r["ms_per_token"] for r in runs if r["logprobs"] is None}
    for r in runs:
        r["vs_without"] = r["ms_per_token"] / base[r["setup"]]
    rows = [["setup", "logprobs", "tokens", "ms/token", "vs without"]]
    rows += [[r["setup"], "-" if r["logprobs"] is None else str(r["logprobs"]), str(r["tokens"]),
              f"{r['ms_per_token']:.1f}", f"{r['vs_without']:.2f}x"] for r in runs]
    table = common.render(rows, args.markdown)
    table += (f"\n\nllama-cpp-python's score array (logits_all, n_ctx={N_CTX}): {scores_mib:.0f} MiB; the engine keeps "
              "no such array. Texts and logprobs equal llama-cpp-python's: " + ("yes" if not mismatches else
                                                                                "NO: " + "; ".join(mismatches)))
    result = {"machine": common.machine_info(), "config": vars(args), "runs": runs, "scores_mib": scores_mib,
              "texts_match": not mismatches, "mismatches": mismatches, "total_seconds": time.monotonic() - t_start}
    return common.finish(result, args.out, table)


if __name__ == "__main__":
    sys.exit(main())
