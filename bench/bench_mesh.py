# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: SharedLLM's mesh against raw llama.cpp RPC and a plain local model, on the same rpc-servers.

    .venv/bin/python bench/bench_mesh.py [--tokens 128] [--repeats 3] [--machines 2] [--out bench/results/latest.json]

Setups, all on Gemma 3 270M Q4_K_M, n_ctx 2048, the same prompt and greedy parameters:

- ``local``: ``llama_cpp.Llama`` in this process, every core, ``use_extra_bufts=False`` (the CPU kernels an
  rpc-server uses, so its greedy text is the oracle). ``local (default kernels)`` is the same with llama.cpp's default
  repacked weights, for information only.
- ``raw-rpc``: llama.cpp RPC driven by hand in a fresh process that imports llama_cpp and ctypes only (never
  sharedllm): ``ggml_backend_rpc_add_server`` for each endpoint, ``llama_model_params.devices`` and ``tensor_split``
  copied from the mesh's topology, ``n_gpu_layers=-1``. Its rpc-servers are those of the direct mesh below, used
  while no mesh session holds them.
- ``mesh (direct)``: ``LocalMesh(machines=N, insecure_direct_rpc=True)``, ``mesh.load("gemma-3-270m", n_ctx=2048)``
  and a streamed completion: llama.cpp connects to the rpc-servers themselves. Against ``raw-rpc``, the cost of
  SharedLLM's own machinery (engine process, leases, streaming).
- ``mesh``: the same on ``LocalMesh(machines=N)``, the default: llama.cpp connects to local relay endpoints, which
  tunnel to each machine's relay (TLS, a pinned certificate, a lease token), which forwards to the rpc-server on
  loopback. Against ``mesh (direct)``, the cost of the tunnel.

Gemma ties its embeddings, so by default (``--output-layer auto``) the mesh runs the output layer on the client: the
last machine returns a hidden state per token instead of 1 MiB of logits. raw-rpc then gets the same placement (the
same ``tensor_buft_overrides``), so that it stays the same computation; ``--output-layer mesh`` measures all three
with the output layer on the last machine, as plain llama.cpp RPC places it.

Repeats are interleaved (every setup once, then again) and the medians are reported. The table goes to stdout; the
raw numbers go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

# Nothing from sharedllm at module level: the raw-rpc child runs this file and must not import it.
from bench import common

logger = logging.getLogger("bench_mesh")

RAW_RESULT_PREFIX = "BENCH_RAW_RPC_RESULT "
LOCAL, LOCAL_DEFAULT, RAW, MESH, DIRECT = "local", "local (default kernels)", "raw-rpc", "mesh", "mesh (direct)"
SETUPS = (LOCAL, RAW, DIRECT, MESH, LOCAL_DEFAULT)
ORACLE_SETUPS = (LOCAL, RAW, DIRECT, MESH)  # same kernels, so the same greedy text
TARGET_RATIO = 0.95  # mesh (direct) / raw-rpc
TUNNEL_TARGET = 0.90  # mesh (tunnel) / mesh (direct)


# --- one model, built and timed (in this process and in the raw-rpc child) ------------------------------------------


def run_llama(model_path: str, llama_kwargs: dict[str, Any], tokens: int, *, devices: list[int] | None,
              use_extra_bufts: bool, cpu_buft: int | None = None) -> dict[str, Any]:
    """Build a ``llama_cpp.Llama`` (timed: the load), stream one completion, free the model."""
    import llama_cpp

    t0 = time.perf_counter()
    with common.patched_model_params(devices, use_extra_bufts, cpu_buft) as dev_array:
        llm = llama_cpp.Llama(model_path=model_path, **llama_kwargs)
    llm._bench_keepalive = dev_array
    load_s = time.perf_counter() - t0
    try:
        res = common.timed_stream(lambda: llm.create_completion(
            common.PROMPT, stream=True, **common.completion_kwargs(tokens)))
    finally:
        llm.close()
    res["load_s"] = load_s
    res["plan_ms"] = None
    return res


# --- raw-rpc: runs in a fresh process that never imports sharedllm ----------------------------------------------


def raw_rpc_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Hand-driven llama.cpp RPC: register the servers, pick their devices, load with the given split, generate."""
    ggml, rpc = common.rpc_libs()

    t0 = time.perf_counter()
    regs: dict[str, int] = {}
    devices: list[int] = []
    for endpoint, index in spec["stages"]:
        if endpoint not in regs:
            regs[endpoint] = rpc.ggml_backend_rpc_add_server(endpoint.encode())
            if not regs[endpoint]:
                raise RuntimeError(f"ggml_backend_rpc_add_server({endpoint}) failed")
        if index >= ggml.ggml_backend_reg_dev_count(regs[endpoint]):
            raise RuntimeError(f"rpc-server {endpoint} has no device {index}")
        devices.append(ggml.ggml_backend_reg_dev_get(regs[endpoint], index))
    connect_s = time.perf_counter() - t0
    # The engine's Llama arguments, nothing more: n_ctx, every layer on the given devices, the mesh's split (threads:
    # llama-cpp-python's defaults, as in the engine).
    kwargs = {"n_ctx": spec["n_ctx"], "n_gpu_layers": -1, "tensor_split": spec["tensor_split"], "verbose": False,
              "flash_attn": spec["flash_attn"]}
    cpu_buft = None
    if spec["output_on_client"]:  # the mesh's placement of the output layer, and its threads, as the engine does
        cpu_buft = common.cpu_buffer_type(ggml)
        kwargs["n_threads"] = os.cpu_count() or 1
    res = run_llama(spec["model_path"], kwargs, spec["tokens"], devices=devices, use_extra_bufts=False,
                    cpu_buft=cpu_buft)
    res["connect_s"] = connect_s
    res["imported_sharedllm"] = any(m == "sharedllm" or m.startswith("sharedllm.") for m in sys.modules)
    return res


def run_raw_rpc(model_path: str, stages: list[tuple[str, int]], tensor_split: list[float], tokens: int,
                output_on_client: bool, timeout: float = 300.0) -> dict[str, Any]:
    """Run :func:`raw_rpc_child` in a fresh interpreter (llama.cpp aborts the process if an rpc-server misbehaves)."""
    from sharedllm.options import FLASH_ATTN  # the engine's default

    spec = {"model_path": model_path, "stages": stages, "tensor_split": tensor_split, "n_ctx": common.N_CTX,
            "tokens": tokens, "output_on_client": output_on_client, "flash_attn": FLASH_ATTN}
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        # The environment the engine gives its child (sharedllm.engine.Engine.start): OpenMP threads that sleep soon
        # between network waits instead of spinning against the rpc-servers on the same cores.
        env = dict(os.environ)
        env.setdefault("GOMP_SPINCOUNT", "10000")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--raw-rpc-child", json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, timeout=timeout, text=True, env=env,
        )
        wall = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RAW_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"raw-rpc child exited with status {proc.returncode}: {stderr.strip()[-2000:]}")
    res = json.loads(lines[-1][len(RAW_RESULT_PREFIX):])
    if res.pop("imported_sharedllm"):
        raise RuntimeError("the raw-rpc child imported sharedllm; it must use llama_cpp and ctypes only")
    res["process_s"] = wall
    return res


# --- local and mesh -------------------------------------------------------------------------------------------


def run_local(model_path: str, tokens: int, use_extra_bufts: bool) -> dict[str, Any]:
    from sharedllm.options import FLASH_ATTN  # the engine's default

    kwargs = {"n_ctx": common.N_CTX, "n_threads": os.cpu_count() or 1, "verbose": False, "flash_attn": FLASH_ATTN}
    return run_llama(model_path, kwargs, tokens, devices=None, use_extra_bufts=use_extra_bufts)


def run_mesh(mesh, tokens: int, output_layer: str) -> tuple[dict[str, Any], Any]:
    """Load the model on the mesh (timed: planning, engine start, upload), stream one completion, close it."""
    t0 = time.perf_counter()
    llm = mesh.load(common.MODEL_NAME, n_ctx=common.N_CTX, output_layer=output_layer)
    load_s = time.perf_counter() - t0
    with llm:
        res = common.timed_stream(lambda: llm.create_completion(
            common.PROMPT, stream=True, **common.completion_kwargs(tokens)))
        res["load_s"] = load_s
        res["plan_ms"] = llm.plan_ms
        engine = getattr(llm, "_engine", None)  # the engine's own Llama() time, for comparison with raw-rpc's load
        res["engine_load_s"] = engine.info.get("load_seconds") if engine is not None else None
        topo = llm.topology
    return res, topo


# --- report ---------------------------------------------------------------------------------------------------

_METRICS = ("decode_tps", "decode_tps_p50gap", "ttft_ms", "load_s", "plan_ms", "tokens")


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in _METRICS:
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    foreign = [r["cpu"]["foreign_pct"] for r in runs if "cpu" in r]
    out["foreign_cpu_pct"] = statistics.median(foreign) if foreign else None
    return out


def table_rows(summary: dict[str, Any]) -> list[list[str]]:
    raw_tps = summary[RAW]["median"]["decode_tps"]
    rows = [["setup", "decode tok/s", "(min-max)", "TTFT ms", "load s", "plan ms", "tokens", "vs raw-rpc",
             "others' CPU"]]
    for name in (n for n in SETUPS if n in summary):  # older result files lack some setups
        runs, med = summary[name]["runs"], summary[name]["median"]
        tps = [r["decode_tps"] for r in runs if r.get("decode_tps")]
        spread = f"{min(tps):.1f}-{max(tps):.1f}" if tps else "-"
        ratio = med["decode_tps"] / raw_tps if med["decode_tps"] and raw_tps else None
        rows.append([
            name, common.fmt(med["decode_tps"], 1), spread, common.fmt(med["ttft_ms"], 0), common.fmt(med["load_s"], 2),
            common.fmt(med["plan_ms"], 0), common.fmt(med["tokens"], 0), "-" if ratio is None else f"{ratio:.2f}x",
            common.fmt(med["foreign_cpu_pct"], 0) + "%",
        ])
    return rows


# --- main -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def mesh_env(assignments: list[str]) -> Iterator[None]:
    """Set ``KEY=VALUE`` environment variables for the duration (while the mesh's processes start)."""
    saved = {}
    for a in assignments:
        key, sep, value = a.partition("=")
        if not sep or not key:
            raise ValueError(f"--rpc-env wants KEY=VALUE, got {a!r}")
        saved.setdefault(key, os.environ.get(key))
        os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_rpc_servers(machines: int, env: list[str]) -> None:
    """Warn when this process does not own exactly one rpc-server per machine, or they lack ``--rpc-env``."""
    import psutil

    servers = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "sharedllm.rpc_server" in p.cmdline():
                servers.append(p)
    if len(servers) != machines:
        logger.warning("found %d rpc-servers under this process, expected %d: numbers will be skewed",
                       len(servers), machines)
    want = dict(a.partition("=")[::2] for a in env)
    for p in servers:
        with contextlib.suppress(psutil.Error):
            got = p.environ()
            missing = {k: v for k, v in want.items() if got.get(k) != v}
            if missing:
                logger.warning("rpc-server %d does not have %s in its environment", p.pid, missing)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from sharedllm import models
    from sharedllm.local import LocalMesh

    model_path = str(models.default_model_path())
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETUPS}
    t_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        meshes, topos = {}, {}
        for name, direct in ((DIRECT, True), (MESH, False)):
            lm = LocalMesh(machines=args.machines, dashboard=False, insecure_direct_rpc=direct)
            stack.callback(lm.close)  # stops every process the mesh started, even when start() fails half-way
            with mesh_env(args.rpc_env):  # the mesh's processes (so its rpc-servers) inherit it; nothing else does
                lm.start()
            meshes[name] = lm.mesh()
        check_rpc_servers(2 * args.machines, args.rpc_env)
        # Warm-up (not counted): page cache, the rpc-servers' tensor caches, and the topology raw-rpc reuses.
        for name, mesh in meshes.items():
            logger.info("warm-up: %s load and %d tokens", name, min(args.tokens, 8))
            _, topos[name] = run_mesh(mesh, min(args.tokens, 8), args.output_layer)
        topo = topos[DIRECT]
        stages = [(s.endpoint, s.device_index) for s in topo.stages]
        split = topo.tensor_split
        logger.info("topology: endpoints %s, tensor_split %s\n%s", topo.endpoints, split, topo)
        for r in range(args.repeats):
            for name in SETUPS:
                waited = common.wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
                logger.info("repeat %d/%d: %s%s", r + 1, args.repeats, name,
                            f" (waited {waited:.1f} s for other processes to calm down)" if waited > 1 else "")
                meter = common.CpuMeter()
                if name == LOCAL:
                    res = run_local(model_path, args.tokens, use_extra_bufts=False)
                elif name == LOCAL_DEFAULT:
                    res = run_local(model_path, args.tokens, use_extra_bufts=True)
                elif name == RAW:
                    res = run_raw_rpc(model_path, stages, split, args.tokens, topo.output_on_client)
                else:
                    res, t = run_mesh(meshes[name], args.tokens, args.output_layer)
                    if t.tensor_split != split or t.endpoints != topos[name].endpoints:
                        logger.warning("repeat %d planned another topology: %s %s", r + 1, t.endpoints, t.tensor_split)
                res["repeat"] = r
                res["cpu"] = meter.stop()
                res["waited_for_quiet_s"] = waited
                runs[name].append(res)
                logger.info("  %s: %.1f tok/s decode (%.1f by median gap), TTFT %.0f ms, load %.2f s, %d tokens, "
                            "%.0f%% of the CPU taken by other processes", name, res["decode_tps"] or 0,
                            res["decode_tps_p50gap"] or 0, res["ttft_ms"] or 0, res["load_s"], res["tokens"],
                            res["cpu"]["foreign_pct"])
    total_s = time.perf_counter() - t_start

    summary = {name: {"runs": runs[name], "median": medians(runs[name])} for name in SETUPS}
    oracle_texts = {r["text"] for name in ORACLE_SETUPS for r in runs[name]}
    texts_match = len(oracle_texts) == 1
    token_counts = {r["tokens"] for name in SETUPS for r in runs[name]}

    def ratio(a: str, b: str, key: str = "decode_tps") -> float | None:
        x, y = summary[a]["median"][key], summary[b]["median"][key]
        return x / y if x and y else None

    def per_repeat(a: str, b: str) -> list[float | None]:
        return [x["decode_tps"] / y["decode_tps"] if x["decode_tps"] and y["decode_tps"] else None
                for x, y in zip(runs[a], runs[b], strict=True)]

    return {
        "machine": common.machine_info(),
        "config": {"tokens": args.tokens, "repeats": args.repeats, "machines": args.machines, "n_ctx": common.N_CTX,
                   "model": model_path, "prompt": common.PROMPT,
                   "completion_kwargs": common.completion_kwargs(args.tokens),
                   "local_threads": os.cpu_count(), "rpc_threads": "every core (LocalMesh default)",
                   "client_threads": "every core with the output layer on the client, else llama-cpp-python's "
                                     "default; in the engine and the raw-rpc child alike",
                   "output_layer": args.output_layer, "output_on_client": topo.output_on_client,
                   "rpc_env": args.rpc_env, "quiet_wait_s": args.quiet_wait},
        "topology": {"endpoints": topo.endpoints, "tensor_split": split, "stages": stages,
                     "plan": topo.to_dict()},
        "setups": summary,
        "ratios": {
            "mesh/raw-rpc decode": ratio(DIRECT, RAW),
            "mesh/raw-rpc decode per repeat": per_repeat(DIRECT, RAW),
            "mesh/raw-rpc decode by median gap": ratio(DIRECT, RAW, "decode_tps_p50gap"),
            "tunnel/direct decode": ratio(MESH, DIRECT),
            "tunnel/direct decode per repeat": per_repeat(MESH, DIRECT),
            "tunnel/direct decode by median gap": ratio(MESH, DIRECT, "decode_tps_p50gap"),
            "tunnel/raw-rpc decode": ratio(MESH, RAW),
            "target tunnel/direct": TUNNEL_TARGET,
            "mesh/local decode": ratio(MESH, LOCAL),
            "raw-rpc/local decode": ratio(RAW, LOCAL),
            "local default/local decode": ratio(LOCAL_DEFAULT, LOCAL),
            "target mesh/raw-rpc": TARGET_RATIO,
        },
        "texts_match": texts_match,
        "texts": {name: runs[name][0]["text"] for name in SETUPS},
        "distinct_oracle_texts": sorted(oracle_texts),
        "same_token_count": len(token_counts) == 1,
        "total_seconds": total_s,
    }


def _tunnel_line(ratios: dict[str, Any]) -> str:
    t = ratios.get("tunnel/direct decode")
    if t is None:
        return "mesh (tunnel)/mesh (direct): n/a"
    verdict = "meets" if t >= TUNNEL_TARGET else "BELOW"
    return (f"mesh (tunnel)/mesh (direct) decode tok/s: {t:.3f} ({verdict} the {TUNNEL_TARGET} target; per repeat "
            + ", ".join("-" if x is None else f"{x:.2f}" for x in ratios["tunnel/direct decode per repeat"])
            + f"; by median gap {common.fmt(ratios['tunnel/direct decode by median gap'], 3)})")


def report(result: dict[str, Any], markdown: bool) -> str:
    cfg, m, ratios = result["config"], result["machine"], result["ratios"]
    rows = table_rows(result["setups"])
    r = ratios["mesh/raw-rpc decode"]
    verdict = "meets" if r is not None and r >= TARGET_RATIO else "BELOW"
    split = result["topology"]["tensor_split"]
    lines = [
        f"Gemma 3 270M Q4_K_M, n_ctx {cfg['n_ctx']}, {cfg['tokens']} greedy tokens, median of {cfg['repeats']} "
        f"interleaved repeats, {cfg['machines']} loopback machines (tensor_split {split}), "
        f"{m['cpu_count']} CPUs, llama-cpp-python {m['llama_cpp_python']}, output layer on the "
        + ("client" if cfg.get("output_on_client") else "last machine")
        + (f", rpc-server env {' '.join(cfg['rpc_env'])}" if cfg["rpc_env"] else ""),
        "",
        common.render(rows, markdown),
        "",
        f"mesh (direct)/raw-rpc decode tok/s: {r:.3f} ({verdict} the {TARGET_RATIO} target; per repeat "
        + ", ".join("-" if x is None else f"{x:.2f}" for x in ratios["mesh/raw-rpc decode per repeat"]) + ")"
        if r is not None else "mesh (direct)/raw-rpc decode tok/s: n/a",
        f"mesh (direct)/raw-rpc by median inter-token gap (robust to short stalls): "
        f"{common.fmt(ratios['mesh/raw-rpc decode by median gap'], 3)}",
        _tunnel_line(ratios),
        "greedy texts of local (use_extra_bufts=False), raw-rpc and both meshes: "
        + ("identical" if result["texts_match"] else f"DIFFER ({len(result['distinct_oracle_texts'])} variants)"),
        "local (default kernels) text: "
        + ("same" if result["texts"][LOCAL_DEFAULT] == result["texts"][LOCAL] else "differs (expected: other kernels)"),
    ]
    foreign = max((r["cpu"]["foreign_pct"] for s in result["setups"].values() for r in s["runs"]), default=0.0)
    if foreign >= 5:
        lines.append(f"WARNING: other processes took up to {foreign:.0f}% of the CPU during a run (column "
                     "others' CPU): those numbers are skewed; rerun on a quiet machine")
    if not result["same_token_count"]:
        lines.append("WARNING: the setups generated different numbers of tokens")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate per run (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per setup (default 3)")
    p.add_argument("--machines", type=int, default=2, help="loopback machines in the mesh (default 2)")
    p.add_argument("--out", default="bench/results/latest.json", help="JSON results file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--quiet-wait", type=float, default=5.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to leave the CPU (default 5; "
                        "0: never wait)")
    p.add_argument("--rpc-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the mesh's processes and so its rpc-servers, repeatable "
                        "(e.g. GOMP_SPINCOUNT=10000); local runs and engines do not get it")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="print the table of an earlier results file instead of running the benchmark")
    p.add_argument("--output-layer", choices=("auto", "client", "mesh"), default="auto",
                   help="mesh.load(output_layer=...): where the vocabulary projection runs; raw-rpc follows the "
                        "mesh's placement (default auto: the client, for Gemma's tied embeddings)")
    p.add_argument("--raw-rpc-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.raw_rpc_child is not None:
        res = raw_rpc_child(json.loads(args.raw_rpc_child))
        print(RAW_RESULT_PREFIX + json.dumps(res), flush=True)
        return 0

    if args.from_json is not None:
        print(report(json.loads(Path(args.from_json).read_text()), args.markdown))
        return 0

    if args.tokens < 2 or args.repeats < 1 or args.machines < 1:
        p.error("--tokens must be >= 2, --repeats and --machines >= 1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from sharedllm.engine import OUTPUT_ON_CLIENT as engine_pattern

    if common.OUTPUT_ON_CLIENT != engine_pattern:
        raise SystemExit("bench.common.OUTPUT_ON_CLIENT must match sharedllm.engine.OUTPUT_ON_CLIENT")
    result = benchmark(args)
    return common.finish(result, args.out, report(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
