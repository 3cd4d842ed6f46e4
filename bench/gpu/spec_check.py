# SPDX-License-Identifier: AGPL-3.0-or-later
"""GPU check: speculative decoding with the target on a CUDA rpc-server and the drafter on the client's CPU.

    python bench/gpu/spec_check.py [--model gemma-3-270m] [--rtt 0 20] [--tokens 96] [--out $OUT/spec_check.json]

A mesh of one CUDA machine behind the link emulator (``bench/linkem.py``) at each RTT; drafters none, lookup and a
Q2_K quantization of the target (``sharedllm.models.quantized``) on the client. Per cell: decode tokens/s, its ratio
to none, the acceptance, and whether the greedy text equals the same mesh's without drafts with flash attention on. On
CUDA a pass of several rows of one sequence may take other kernels than a pass of one (the engine measures it at load:
``invariance.verify_rows``; 1 means no drafts are verified there, and the check says so).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("distributed").setLevel(logging.WARNING)
log = logging.getLogger("gpu-spec-check")

PASSAGE = ("The committee met on Tuesday to discuss the new budget. After a long debate, the members agreed to "
           "increase funding for public libraries by ten percent, to reduce spending on road maintenance, and to "
           "create a new fund for small businesses affected by the flood.")
WORKLOADS = {"rewrite": f"Repeat the following passage word for word.\n\n{PASSAGE}",
             "chat": "What should I pack for a week-long hiking trip in the mountains?"}


def run(llm, workload: str, tokens: int) -> dict:
    t0, stamps, text = time.perf_counter(), [], ""
    for ch in llm.create_chat_completion([{"role": "user", "content": WORKLOADS[workload]}], max_tokens=tokens,
                                         temperature=0, stream=True):
        piece = ch["choices"][0]["delta"].get("content")
        if piece:
            stamps.append(time.perf_counter())
            text += piece
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"text": text, "tok_s": tps, "ttft_ms": (stamps[0] - t0) * 1e3 if stamps else None}


def main(argv: list[str] | None = None) -> int:
    from bench.linkem import LinkControl, hook
    from sharedllm import models
    from sharedllm.local import LocalMesh

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--rtt", type=float, nargs="+", default=[0.0, 20.0])
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "spec_check.json"))
    args = ap.parse_args(argv)
    path = models.default_model_path() if args.model == "gemma-3-270m" else Path(args.model)
    drafters = {"none": {"flash_attn": True}, "lookup": {"draft": "lookup"},
                "model": {"draft": str(models.quantized(path, "Q2_K"))}}
    res: dict = {"cells": [], "verify_rows": {}}
    with tempfile.TemporaryDirectory() as work, LocalMesh(machines=0, dashboard=False) as lm:
        lm.add_machine("gpu-box", rpc_devices=("CUDA0",))
        mesh = lm.mesh()
        log.info("mesh:\n%s", mesh.wait_for_machines(1, timeout=120))
        base: dict = {}
        for name, opts in drafters.items():
            control = Path(work) / name
            link = {"rtt_ms": 0.0, "process": True, "wire": True, "control_dir": str(control)}
            with mesh.load(str(path), n_ctx=2048, tunnel_hook=hook(**link), **opts) as llm:
                res["verify_rows"][name] = (llm.measured(600) or {}).get("verify_rows")
                links = LinkControl.find(control)
                run(llm, "chat", 8)  # warm-up
                for rtt in args.rtt:
                    for lk in links:
                        lk.set(rtt)
                    for workload in WORKLOADS:
                        out = run(llm, workload, args.tokens)
                        key = (rtt, workload)
                        if name == "none":
                            base[key] = out
                        ref = base.get(key, {})
                        cell = {"drafter": name, "rtt_ms": rtt, "workload": workload, "tok_s": out["tok_s"],
                                "ratio": out["tok_s"] / ref["tok_s"] if ref.get("tok_s") and out["tok_s"] else None,
                                "text_equal": out["text"] == ref.get("text"), "draft": llm.engine_stats.get("draft")}
                        res["cells"].append(cell)
                        log.info("%s", cell)
    Path(args.out).write_text(json.dumps(res, indent=2))
    ok = all(c["text_equal"] for c in res["cells"])
    log.info("verify rows %s; texts %s", res["verify_rows"], "equal" if ok else "DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
