# SPDX-License-Identifier: AGPL-3.0-or-later
"""GPU check for real sizes (issue #13): the matrix on CUDA, an 8B shape on two CUDA rpc-servers, a 70B shape on a
capped CUDA rpc-server plus a CPU rpc-server.

    python bench/gpu/big_check.py [--steps matrix,8b,70b] [--models /tmp/big] [--tokens 16] [--out $OUT/big.json]

Prepared for a session that is lent a GPU machine (``bash bench/gpu/checks.sh big_check.py`` after
bench/gpu/build.sh); nothing here runs without CUDA unless ``--device CPU`` (a smoke test of the script). Models are
synthetic (random weights, real shapes and metadata): the tiny matrix models come from bench/synth_gguf.py
(quantized by llama.cpp), the 8B and 70B Q4_K_M from bench/synth_blocks.py (written straight in ggml-quantized
blocks, with the per-tensor types llama.cpp's quantizer picks: about 4.9 and 42.5 GB).

Every machine runs with ``--cache-cap 0`` (no tensor cache: the 70B's weights would be written to disk again).

- ``matrix``: each of ``--archs`` (default: three whose tiny rows are not multiples of 256) x the 7 quantizations,
  on one machine serving ``CUDA0``: greedy text against local llama-cpp-python on CUDA (the same kernels), finite
  log-probabilities, and llama.cpp's buffers against the placement's estimate.
- ``8b``: Llama 3.1 8B-shaped Q4_K_M on two machines serving the same GPU, each capped (``--max-memory CUDA0=...``)
  so that neither holds the model: two stages, greedy text against local CUDA, load time, decode tokens/s, buffers
  against the estimate.
- ``70b``: Llama 3.1 70B-shaped Q4_K_M on a machine serving ``CUDA0`` capped below the model's size (default 30 GiB)
  and a CPU machine: load time, decode tokens/s, finite log-probabilities, and the GPU's memory measured by NVML
  (used after the first tokens less before the load) against the CUDA stage's estimate. No local oracle (too slow).

The JSON (``--out``) gets every step's figures, failures included; a summary table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.gpu"

from bench import common, synth_blocks, synth_gguf

logger = logging.getLogger("big-check")
GiB = 1 << 30
ODD_ROW_ARCHS = ("qwen2.5-7b", "phi3-mini", "llama3-8b")


def nvml_used() -> int | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception as exc:  # reported as missing, the rest of the check goes on
        logger.warning("NVML: %s", exc)
        return None


def greedy(llm, tokens: int) -> dict:
    """A timed greedy stream, then the same with log-probabilities (``logits_all=True``): are they finite?"""
    res = common.timed_stream(lambda: llm.create_completion(
        common.SYNTH_PROMPT, stream=True, **common.completion_kwargs(tokens)))
    lp = llm.create_completion(common.SYNTH_PROMPT, logprobs=1, **common.completion_kwargs(min(tokens, 8)))
    values = lp["choices"][0]["logprobs"]["token_logprobs"]
    res["logprobs_finite"] = bool(values) and all(v is not None and math.isfinite(v) for v in values)
    return res


def local_cuda(path: Path, n_ctx: int, tokens: int) -> dict:
    from sharedllm.engine import build_llama

    t0 = time.perf_counter()
    llm = build_llama(str(path), n_ctx=n_ctx, n_gpu_layers=-1, verbose=False, logits_all=True)
    try:
        return {"load_s": time.perf_counter() - t0, **greedy(llm, tokens)}
    finally:
        llm.close()


def on_mesh(mesh, path: Path, machines: list[str], n_ctx: int, tokens: int) -> dict:
    t0 = time.perf_counter()
    before = nvml_used()
    out: dict = {"machines": machines}
    try:
        with mesh.load(str(path), n_ctx=n_ctx, machines=machines, verbose=True, load_timeout=1800,
                       token_timeout=600, logits_all=True) as h:
            out["load_s"] = time.perf_counter() - t0
            out["topology"] = str(h.topology)
            logger.info("loaded %s in %.1f s\n%s", path.name, out["load_s"], h.topology)
            out.update(greedy(h, tokens))
            after = nvml_used()
            devices, _client = common.engine_buffers(Path(h._engine.log_path).read_text(errors="replace"))
            stages = list(h.topology.stages)
    except Exception as exc:
        out.update(ok=False, why=f"{type(exc).__name__}: {exc}"[:2000])
        return out
    out["ok"] = True
    out["stages"] = ([common.stage_report(s, b) for s, b in zip(stages, devices, strict=True)]
                     if len(devices) == len(stages) else [])
    for st, s in zip(out["stages"], stages, strict=False):
        st["device"] = s.device_name
    if before is not None and after is not None:
        out["nvml_used_growth"] = after - before
    return out


def step_matrix(lm, args) -> list[dict]:
    mesh = lm.mesh()
    rows = []
    for arch in args.archs:
        for quant in args.quants:
            path = synth_gguf.synthesize(arch, quant, args.models / "tiny")
            row = {"arch": arch, "quant": quant, "local_cuda": local_cuda(path, 512, args.tokens),
                   "mesh": on_mesh(mesh, path, ["gpu-a"], 512, args.tokens)}
            row["same_text"] = row["mesh"].get("text") == row["local_cuda"].get("text")
            rows.append(row)
            logger.info("matrix %s %s: same text %s, finite %s", arch, quant, row["same_text"],
                        row["mesh"].get("logprobs_finite"))
    return rows


def step_8b(lm, args) -> dict:
    path = args.models / "llama3-8b-full-Q4_K_M-blocks.gguf"
    if not path.exists():
        synth_blocks.write_blocks("llama3-8b", "Q4_K_M", path, workdir=args.models)
    out = {"model_bytes": path.stat().st_size, "local_cuda": local_cuda(path, args.n_ctx, args.tokens),
           "mesh": on_mesh(lm.mesh(), path, ["gpu-b", "gpu-c"], args.n_ctx, args.tokens)}
    out["same_text"] = out["mesh"].get("text") == out["local_cuda"].get("text")
    out["two_stages"] = len(out["mesh"].get("stages", [])) == 2
    if not args.keep:
        path.unlink()
    return out


def step_70b(lm, args) -> dict:
    path = args.models / "llama3-70b-full-Q4_K_M-blocks.gguf"
    t0 = time.perf_counter()
    if not path.exists():
        synth_blocks.write_blocks("llama3-70b", "Q4_K_M", path, workdir=args.models)
    out = {"model_bytes": path.stat().st_size, "write_s": time.perf_counter() - t0, "gpu_cap": args.gpu_cap,
           "mesh": on_mesh(lm.mesh(), path, ["gpu-a", "cpu-box"], args.n_ctx, args.tokens)}
    cuda = [s for s in out["mesh"].get("stages", []) if args.device in str(s.get("device"))]
    if cuda and "nvml_used_growth" in out["mesh"]:
        est = sum(cuda[0]["estimated"].values())
        out["nvml_vs_estimate"] = {"estimated": est, "nvml_growth": out["mesh"]["nvml_used_growth"],
                                   "error": est / out["mesh"]["nvml_used_growth"] - 1}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="matrix,8b,70b")
    ap.add_argument("--models", type=Path, default=Path("/tmp/big"))
    ap.add_argument("--archs", nargs="+", default=list(ODD_ROW_ARCHS))
    ap.add_argument("--quants", nargs="+", default=list(synth_gguf.QUANTS))
    ap.add_argument("--device", default="CUDA0", help="what the GPU machines serve (CPU: a smoke test of this script)")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--gpu-cap", default="30GiB", help="the CUDA machine's --max-memory in the 70b step")
    ap.add_argument("--small-cap", default="3GiB", help="each CUDA machine's cap in the 8b step")
    ap.add_argument("--keep", action="store_true", help="keep the 8B file (the disk must hold 8B and 70B)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "big_check.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    args.models.mkdir(parents=True, exist_ok=True)
    from sharedllm.local import LocalMesh

    steps = args.steps.split(",")
    result: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "steps": {}}

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    no_cache = ["--cache-cap", "0"]
    with LocalMesh(machines=0, dashboard=False) as lm:
        dev = args.device
        lm.add_machine("gpu-a", rpc_devices=(dev,), worker_args=[*no_cache, "--max-memory", f"{dev}={args.gpu_cap}"])
        names = ["gpu-a"]
        if "8b" in steps:
            for m in ("gpu-b", "gpu-c"):
                cap = ["--max-memory", f"{dev}={args.small_cap}"]
                lm.add_machine(m, rpc_devices=(dev,), worker_args=[*no_cache, *cap])
                names.append(m)
        if "70b" in steps:
            lm.add_machine("cpu-box", rpc_devices=("CPU",), worker_args=no_cache)
            names.append("cpu-box")
        logger.info("mesh:\n%s", lm.mesh().wait_for_machines(len(names), timeout=300))
        for step, fn in (("matrix", step_matrix), ("8b", step_8b), ("70b", step_70b)):
            if step in steps:
                t0 = time.perf_counter()
                try:
                    result["steps"][step] = fn(lm, args)
                except Exception as exc:
                    logger.exception("step %s failed", step)
                    result["steps"][step] = {"ok": False, "why": f"{type(exc).__name__}: {exc}"[:2000]}
                result.setdefault("seconds", {})[step] = round(time.perf_counter() - t0, 1)
                save()
    report(result)
    save()
    return 0


def report(result: dict) -> None:
    s = result["steps"]
    for row in s.get("matrix", []) if isinstance(s.get("matrix"), list) else []:
        m = row["mesh"]
        est = all(x.get("ok") for x in m["stages"]) if m.get("stages") else "-"
        print(f"matrix {row['arch']:<12} {row['quant']:<7} same text {row['same_text']!s:<5} finite "
              f"{m.get('logprobs_finite')!s:<5} estimate ok {est} "
              f"{m.get('why', '')}")
    for name in ("8b", "70b"):
        if name in s:
            m = s[name].get("mesh", {})
            errors = [round(x.get("error", 0), 3) for x in m.get("stages", [])]
            print(f"{name}: load {m.get('load_s', 0):.1f} s, decode {m.get('decode_tps') or 0:.2f} tok/s, TTFT "
                  f"{m.get('ttft_ms') or 0:.0f} ms, finite {m.get('logprobs_finite')}, same text "
                  f"{s[name].get('same_text', '-')}, estimate errors {errors}"
                  f", NVML {s[name].get('nvml_vs_estimate')} {m.get('why', '')}")


if __name__ == "__main__":
    sys.exit(main())
