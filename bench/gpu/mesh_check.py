# SPDX-License-Identifier: AGPL-3.0-or-later
"""GPU check: a CUDA rpc-server, and a mesh of one CUDA machine + one CPU machine generating from Gemma.

    python bench/gpu/mesh_check.py MODEL.gguf          # speed (tokens/s, time to first token)
    LP=1 python bench/gpu/mesh_check.py MODEL.gguf     # with logprobs (slow: numpy over the 262k vocab per token)

Needs a CUDA build of llama-cpp-python with RPC (``SHAREDLLM_CUDA=1 scripts/setup.sh``). Compares greedy text of each
setup with local CPU: CPU and CUDA kernels differ numerically, so only identical backends must agree exactly.
"""

import json
import logging
import os
import sys
import time

from sharedllm.engine import build_llama
from sharedllm.local import LocalMesh

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
logging.getLogger("distributed").setLevel(logging.WARNING)
log = logging.getLogger("gpu-check")

PROMPT, N = "Once upon a time", 128
LP = os.environ.get("LP") == "1"


def run(llm) -> dict:
    t0 = time.perf_counter()
    first, n, text, lps = None, 0, "", []
    for ch in llm.create_completion(PROMPT, max_tokens=N, temperature=0, stream=True, logprobs=1 if LP else None):
        first = first or time.perf_counter()
        n += 1
        text += ch["choices"][0]["text"]
        lp = ch["choices"][0].get("logprobs")
        if lp and lp.get("token_logprobs"):
            lps.append(lp["token_logprobs"][0])
    end = time.perf_counter()
    return {"text": text, "ttft_ms": (first - t0) * 1e3, "decode_tok_s": (n - 1) / (end - first), "n": n, "lps": lps}


def main(model: str) -> None:
    res = {}
    cpu = build_llama(model, n_ctx=2048, n_gpu_layers=0, use_extra_bufts=False, logits_all=LP)
    res["local_cpu"] = run(cpu)
    cpu.close()
    gpu = build_llama(model, n_ctx=2048, n_gpu_layers=-1, logits_all=LP)
    res["local_cuda"] = run(gpu)
    gpu.close()
    with LocalMesh(machines=0, dashboard=False) as lm:
        lm.add_machine("gpu-box", rpc_devices=("CUDA0",))
        lm.add_machine("cpu-box", rpc_devices=("CPU",))
        mesh = lm.mesh()
        log.info("mesh:\n%s", mesh.wait_for_machines(2, timeout=120))
        for name, machines in [("mesh_cuda+cpu", ["cpu-box", "gpu-box"]), ("mesh_cuda_only", ["gpu-box"])]:
            with mesh.load(model, n_ctx=2048, machines=machines, logits_all=LP) as llm:
                log.info("%s\n%s", llm.topology, llm.devices)
                res[name] = {**run(llm), "load_s": llm.load_seconds, "plan_ms": llm.plan_ms}
    ref = res["local_cpu"]["text"]
    for k, r in res.items():
        same = next((i for i, (a, b) in enumerate(zip(r["text"], ref, strict=False)) if a != b),
                    min(len(r["text"]), len(ref)))
        print(f"{k:16s} decode {r['decode_tok_s']:7.1f} tok/s  ttft {r['ttft_ms']:6.1f} ms  "
              f"same-chars-as-cpu {same:4d}  load {r.get('load_s', 0):.1f}s\n    {r['text'][:120]!r}")
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_results.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
