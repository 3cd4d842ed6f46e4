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
import ctypes
import datetime
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Nothing from sharedllm at module level: the raw-rpc child runs this file and must not import it.

logger = logging.getLogger("bench_mesh")

PROMPT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who"
)
N_CTX = 2048
MODEL_NAME = "gemma-3-270m"
RAW_RESULT_PREFIX = "BENCH_RAW_RPC_RESULT "
LOCAL, LOCAL_DEFAULT, RAW, MESH, DIRECT = "local", "local (default kernels)", "raw-rpc", "mesh", "mesh (direct)"
SETUPS = (LOCAL, RAW, DIRECT, MESH, LOCAL_DEFAULT)
ORACLE_SETUPS = (LOCAL, RAW, DIRECT, MESH)  # same kernels, so the same greedy text
TARGET_RATIO = 0.95  # mesh (direct) / raw-rpc
TUNNEL_TARGET = 0.90  # mesh (tunnel) / mesh (direct)


def completion_kwargs(tokens: int) -> dict[str, Any]:
    """The one set of sampling parameters every setup uses: greedy, ``tokens`` tokens."""
    return {"max_tokens": tokens, "temperature": 0.0, "top_k": 1, "top_p": 1.0, "repeat_penalty": 1.0, "seed": 0}


# --- measuring one streamed completion (shared by this process and the raw-rpc child) ------------------------------


def timed_stream(start: Callable[[], Iterator[dict]]) -> dict[str, Any]:
    """Consume a streamed completion and time it.

    ``ttft_ms``: from the request to the first token chunk (prompt processing included). ``decode_tps``: tokens after
    the first over the time from the first token chunk to the last. The closing chunk llama-cpp-python sends after the
    last token (empty text, a finish_reason) is not a token.
    """
    t0 = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    finish = None
    for chunk in start():
        now = time.perf_counter()
        choice = chunk["choices"][0]
        if choice.get("finish_reason") is not None and not choice.get("text"):
            finish = choice["finish_reason"]
            continue
        stamps.append(now)
        parts.append(choice.get("text") or "")
        finish = choice.get("finish_reason") or finish
    return {**stream_stats(t0, stamps, time.perf_counter(), parts), "finish_reason": finish}


def stream_stats(t0: float, stamps: list[float], t_end: float, parts: list[str]) -> dict[str, Any]:
    """Timings of a stream that started at ``t0``, produced a token at each of ``stamps`` and ended at ``t_end``."""
    n = len(stamps)
    decode_s = stamps[-1] - stamps[0] if n > 1 else 0.0
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    gap_p50 = gaps[len(gaps) // 2] if gaps else None
    return {
        "tokens": n,
        "ttft_ms": (stamps[0] - t0) * 1000 if n else None,
        "decode_tps": (n - 1) / decode_s if decode_s > 0 else None,
        # The median gap between tokens shrugs off a few slow tokens (another process took the CPU for a moment).
        "gap_p50_ms": gap_p50 * 1000 if gap_p50 else None,
        "gap_p90_ms": gaps[len(gaps) * 9 // 10] * 1000 if gaps else None,
        "gap_max_ms": gaps[-1] * 1000 if gaps else None,
        "decode_tps_p50gap": 1 / gap_p50 if gap_p50 else None,
        "decode_s": decode_s,
        "total_s": t_end - t0,
        "text": "".join(parts),
    }


def _llama_cpp_lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


# sharedllm.engine.OUTPUT_ON_CLIENT, repeated because the raw-rpc child must not import sharedllm (checked in main).
OUTPUT_ON_CLIENT = r"^(output|output_norm|token_embd)\.weight$"


class _Override(ctypes.Structure):  # struct llama_model_tensor_buft_override
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@contextlib.contextmanager
def patched_model_params(devices: list[int] | None, use_extra_bufts: bool, cpu_buft: int | None = None
                         ) -> Iterator[Any]:
    """While ``Llama()`` is constructed, make ``llama_model_default_params`` carry our devices and buffer choice.

    The Python ``Llama`` class exposes neither ``devices`` nor ``use_extra_bufts``; sharedllm.engine injects them the
    same way. ``devices`` are raw ggml device handles (a NULL-terminated array is built here); None leaves the default.
    ``cpu_buft``: the CPU buffer type, to keep the output layer on this process's CPU as the engine does.
    """
    import llama_cpp.llama_cpp as lib

    dev_array = (ctypes.c_void_p * (len(devices) + 1))(*devices, None) if devices else None
    overrides = None
    if cpu_buft is not None:
        overrides = (_Override * 2)(_Override(OUTPUT_ON_CLIENT.encode(), cpu_buft), _Override(None, None))
    original = lib.llama_model_default_params

    def patched():
        params = original()
        if dev_array is not None:
            params.devices = ctypes.cast(dev_array, ctypes.c_void_p)
        if overrides is not None:
            params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        params.use_extra_bufts = use_extra_bufts
        return params

    lib.llama_model_default_params = patched
    try:
        yield (dev_array, overrides)  # the caller keeps them alive as long as the model (the engine does the same)
    finally:
        lib.llama_model_default_params = original


def run_llama(model_path: str, llama_kwargs: dict[str, Any], tokens: int, *, devices: list[int] | None,
              use_extra_bufts: bool, cpu_buft: int | None = None) -> dict[str, Any]:
    """Build a ``llama_cpp.Llama`` (timed: the load), stream one completion, free the model."""
    import llama_cpp

    t0 = time.perf_counter()
    with patched_model_params(devices, use_extra_bufts, cpu_buft) as dev_array:
        llm = llama_cpp.Llama(model_path=model_path, **llama_kwargs)
    llm._bench_keepalive = dev_array
    load_s = time.perf_counter() - t0
    try:
        res = timed_stream(lambda: llm.create_completion(PROMPT, stream=True, **completion_kwargs(tokens)))
    finally:
        llm.close()
    res["load_s"] = load_s
    res["plan_ms"] = None
    return res


# --- raw-rpc: runs in a fresh process that never imports sharedllm ----------------------------------------------


def rpc_libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    """llama-cpp-python's ggml and ggml-rpc libraries, with the functions raw RPC clients call typed."""
    lib_dir = _llama_cpp_lib_dir()
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(str(lib_dir / "libggml-rpc.so"), mode=ctypes.RTLD_GLOBAL)
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return ggml, rpc


def cpu_buffer_type(ggml: ctypes.CDLL) -> int:
    """This process's CPU buffer type: where the engine keeps the output layer when it runs on the client."""
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    ggml.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    return ggml.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_by_type(0))  # 0: GGML_BACKEND_DEVICE_TYPE_CPU


def raw_rpc_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Hand-driven llama.cpp RPC: register the servers, pick their devices, load with the given split, generate."""
    ggml, rpc = rpc_libs()

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
    kwargs = {"n_ctx": spec["n_ctx"], "n_gpu_layers": -1, "tensor_split": spec["tensor_split"], "verbose": False}
    cpu_buft = None
    if spec["output_on_client"]:  # the mesh's placement of the output layer, and its threads, as the engine does
        cpu_buft = cpu_buffer_type(ggml)
        kwargs["n_threads"] = os.cpu_count() or 1
    res = run_llama(spec["model_path"], kwargs, spec["tokens"], devices=devices, use_extra_bufts=False,
                    cpu_buft=cpu_buft)
    res["connect_s"] = connect_s
    res["imported_sharedllm"] = any(m == "sharedllm" or m.startswith("sharedllm.") for m in sys.modules)
    return res


def run_raw_rpc(model_path: str, stages: list[tuple[str, int]], tensor_split: list[float], tokens: int,
                output_on_client: bool, timeout: float = 300.0) -> dict[str, Any]:
    """Run :func:`raw_rpc_child` in a fresh interpreter (llama.cpp aborts the process if an rpc-server misbehaves)."""
    spec = {"model_path": model_path, "stages": stages, "tensor_split": tensor_split, "n_ctx": N_CTX, "tokens": tokens,
            "output_on_client": output_on_client}
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
    kwargs = {"n_ctx": N_CTX, "n_threads": os.cpu_count() or 1, "verbose": False}
    return run_llama(model_path, kwargs, tokens, devices=None, use_extra_bufts=use_extra_bufts)


def run_mesh(mesh, tokens: int, output_layer: str) -> tuple[dict[str, Any], Any]:
    """Load the model on the mesh (timed: planning, engine start, upload), stream one completion, close it."""
    t0 = time.perf_counter()
    llm = mesh.load(MODEL_NAME, n_ctx=N_CTX, output_layer=output_layer)
    load_s = time.perf_counter() - t0
    with llm:
        res = timed_stream(lambda: llm.create_completion(PROMPT, stream=True, **completion_kwargs(tokens)))
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


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


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
            name, _fmt(med["decode_tps"], 1), spread, _fmt(med["ttft_ms"], 0), _fmt(med["load_s"], 2),
            _fmt(med["plan_ms"], 0), _fmt(med["tokens"], 0), "-" if ratio is None else f"{ratio:.2f}x",
            _fmt(med["foreign_cpu_pct"], 0) + "%",
        ])
    return rows


def render(rows: list[list[str]], markdown: bool) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    numeric = [i > 0 for i in range(len(rows[0]))]
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |",
               "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(out)

    def line(r: list[str]) -> str:
        cells = [c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, numeric, strict=True)]
        return "  ".join(cells).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])])


class CpuMeter:
    """Over one run: CPU seconds the whole machine used, and how much of that was not this benchmark's processes.

    ``foreign`` is the noise: another session's tests, a compiler... This benchmark's processes are this one and its
    descendants (the mesh's scheduler, workers, rpc-servers, engines, the raw-rpc child), reaped ones included.
    """

    def __init__(self) -> None:
        self.wall0, self.busy0, self.ours0 = time.perf_counter(), self._busy(), self._ours()

    @staticmethod
    def _busy() -> float:
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait; steal counts

    @staticmethod
    def _ours() -> float:
        import psutil

        me = psutil.Process()
        t = me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                ct = child.cpu_times()
                total += ct.user + ct.system
        return total

    def stop(self) -> dict[str, float]:
        wall, busy, ours = time.perf_counter() - self.wall0, self._busy() - self.busy0, self._ours() - self.ours0
        foreign = max(0.0, busy - ours)
        return {"wall_s": wall, "cpu_busy_s": busy, "cpu_ours_s": ours, "cpu_foreign_s": foreign,
                "foreign_pct": 100 * foreign / (wall * (os.cpu_count() or 1)) if wall > 0 else 0.0}


def wait_for_quiet(max_wait: float, threshold_pct: float = 10.0, window: float = 0.5) -> float:
    """Wait (at most ``max_wait`` seconds) until other processes use under ``threshold_pct`` of the machine.

    Other sessions' work comes in bursts; starting a run between them saves a repeat. Returns the seconds waited.
    """
    t0 = time.perf_counter()
    while True:
        meter = CpuMeter()
        time.sleep(window)
        if meter.stop()["foreign_pct"] < threshold_pct or time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0


def machine_info() -> dict[str, Any]:
    import distributed
    import llama_cpp

    cpu_model = ""
    with contextlib.suppress(OSError):
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu_model = ln.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "distributed": distributed.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": os.getloadavg(),
    }


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
                waited = wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
                logger.info("repeat %d/%d: %s%s", r + 1, args.repeats, name,
                            f" (waited {waited:.1f} s for other processes to calm down)" if waited > 1 else "")
                meter = CpuMeter()
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
        "machine": machine_info(),
        "config": {"tokens": args.tokens, "repeats": args.repeats, "machines": args.machines, "n_ctx": N_CTX,
                   "model": model_path, "prompt": PROMPT, "completion_kwargs": completion_kwargs(args.tokens),
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
            + f"; by median gap {_fmt(ratios['tunnel/direct decode by median gap'], 3)})")


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
        render(rows, markdown),
        "",
        f"mesh (direct)/raw-rpc decode tok/s: {r:.3f} ({verdict} the {TARGET_RATIO} target; per repeat "
        + ", ".join("-" if x is None else f"{x:.2f}" for x in ratios["mesh/raw-rpc decode per repeat"]) + ")"
        if r is not None else "mesh (direct)/raw-rpc decode tok/s: n/a",
        f"mesh (direct)/raw-rpc by median inter-token gap (robust to short stalls): "
        f"{_fmt(ratios['mesh/raw-rpc decode by median gap'], 3)}",
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


def finish(result: dict[str, Any], out: str, table: str) -> int:
    """Write ``result`` to ``out`` as JSON, print the table; the exit status says whether the texts matched."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    logger.info("wrote %s (%.0f s in all)", path, result["total_seconds"])
    return 0 if result["texts_match"] else 1


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

    if OUTPUT_ON_CLIENT != engine_pattern:
        raise SystemExit("bench_mesh.OUTPUT_ON_CLIENT must match sharedllm.engine.OUTPUT_ON_CLIENT")
    result = benchmark(args)
    return finish(result, args.out, report(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
