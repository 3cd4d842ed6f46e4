# SPDX-License-Identifier: AGPL-3.0-or-later
"""What the benchmarks share (``from bench import common``): the model and prompt they run, how one streamed
completion is timed, llama.cpp driven by hand (raw RPC clients, the engine's placement of the output layer), many
streams at once, llama.cpp's buffers against the placement's estimate, a load's progress reports, the machine and its
CPU, tables and results files.

Nothing from sharedllm at module level: the raw-rpc children of ``bench_mesh.py`` and ``bench_link.py`` import this
module and must not import sharedllm.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import itertools
import json
import logging
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


# --- the model, the prompt, greedy sampling ---------------------------------------------------------------------


PROMPT = (
    "Once upon a time, in a small village at the edge of a great forest, there lived an old clockmaker who"
)
N_CTX = 2048
MODEL_NAME = "gemma-3-270m"


def completion_kwargs(tokens: int) -> dict[str, Any]:
    """The one set of sampling parameters every setup uses: greedy, ``tokens`` tokens."""
    return {"max_tokens": tokens, "temperature": 0.0, "top_k": 1, "top_p": 1.0, "repeat_penalty": 1.0, "seed": 0}


# --- measuring one streamed completion (in the benchmark and in its raw-rpc children) ---------------------------


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


def timed_text(start: Callable[[], Iterator[str | None]]) -> tuple[dict[str, Any], list[float]]:
    """Consume a stream of text pieces and time it from the call: :func:`stream_stats` (a piece without text is no
    token: a token a streaming decoder holds back, a closing chunk), and the time of each token."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    parts: list[str] = []
    for piece in start():
        if piece:
            stamps.append(time.perf_counter())
            parts.append(piece)
    return stream_stats(t0, stamps, time.perf_counter(), parts), stamps


# --- llama.cpp by hand: raw RPC clients and the engine's placement (never imports sharedllm) --------------------


def _llama_cpp_lib_dir() -> Path:
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


# sharedllm.engine.OUTPUT_ON_CLIENT, repeated because raw-rpc children must not import sharedllm (bench_mesh.py's
# main checks it).
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


# --- many streams at once (bench_concurrency.py, bench_stall.py, gpu/batch_check.py) ----------------------------


PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest,",
    "The history of the printing press begins",
    "Here is a recipe for a simple tomato soup:",
    "The three laws of motion, explained for a child:",
    "Dear neighbour, I am writing to you about",
    "A short guide to planting tomatoes in spring:",
    "The lighthouse keeper looked out at the storm and",
    "Why is the sky blue? The answer lies in",
    "In the year 2200, cities will",
    "The best advice my grandmother ever gave me was",
    "A travel diary, day one: we arrived in Lisbon",
    "Photosynthesis is the process by which",
    "The old clockmaker opened his shop at dawn and",
    "Ten things to do on a rainy afternoon:",
    "The mountain trail was steep, and",
    "Chess openings for beginners start with",
]
STREAM_N_CTX = 512  # per sequence: prompt + 128 tokens fit


def consume(start: Callable[[], Iterator[str]], t0: float) -> dict[str, Any]:
    """Time one stream of text pieces from the common start ``t0``."""
    stamps: list[float] = []
    text = ""
    for piece in start():
        if piece:
            stamps.append(time.perf_counter())
            text += piece
    return {"start": t0, "stamps": stamps, "text": text, "end": time.perf_counter()}


def python_stream(llm, prompt: str, tokens: int) -> Iterator[str]:
    for chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0, stream=True):
        yield chunk["choices"][0]["text"]


def released_together(n: int, work: Callable[[int], Any]) -> tuple[list[Any], float]:
    """``work(i)`` for i in 0..n-1, one thread each, released together: their results and when they were released;
    ``RuntimeError`` naming the first failure when any failed."""
    results: list[Any] = [None] * n
    gate = threading.Barrier(n + 1)

    def one(i: int) -> None:
        gate.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    gate.wait()
    for t in threads:
        t.join()
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {n} streams failed: {failed[0]!r}")
    return results, t0


def run_level(n: int, stream: Callable[[str], Iterator[str]]) -> dict[str, Any]:
    """N streams at once, one thread each, released together."""
    results, t0 = released_together(
        n, lambda i: consume(lambda: stream(PROMPTS[i % len(PROMPTS)]), time.perf_counter()))
    end = max(r["end"] for r in results)
    ttfts = sorted((r["stamps"][0] - r["start"]) * 1000 for r in results if r["stamps"])
    gaps = [(b - a) * 1000 for r in results for a, b in itertools.pairwise(r["stamps"])]
    tokens = sum(len(r["stamps"]) for r in results)
    return {
        "streams": n, "tokens": tokens, "wall_s": end - t0, "tok_s": tokens / (end - t0),
        "ttft_p50_ms": statistics.median(ttfts), "ttft_p95_ms": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
        "itl_p50_ms": statistics.median(gaps) if gaps else None,
        "texts": [r["text"] for r in results],
    }


# --- llama.cpp's buffers against the placement's estimate (bench_matrix.py, bench_big.py, ...) ------------------


SYNTH_PROMPT = "Once upon a time"
ESTIMATE_BAR = 0.15  # the estimate may exceed the allocation by this fraction, never fall below it
MiB = 1 << 20

_BUFFER = re.compile(r"(RPC\d+\[(?P<ep>[^\]]+)\]|(?P<cpu>CPU(?:_Mapped|_REPACK)?))\s+(?P<kind>model|KV|compute|output) "
                     r"buffer size =\s+(?P<mib>[\d.]+) MiB")
_DEVICE = re.compile(r"using device RPC\d+ \((?P<ep>[^)]+)\)")


def engine_buffers(text: str) -> tuple[list[dict[str, int]], dict[str, int]]:
    """The buffers llama.cpp reported in an engine's log: one dict per RPC device in the order the devices were
    given (the topology's stage order), and the client's CPU buffers; values in bytes (the log rounds to 0.01 MiB).
    """
    order = _DEVICE.findall(text)
    by_ep: dict[str, dict[str, int]] = {ep: {} for ep in order}
    client: dict[str, int] = {}
    for m in _BUFFER.finditer(text):
        target = client if m["cpu"] else by_ep.setdefault(m["ep"], {})
        kind = m["kind"] if not m["cpu"] or m["kind"] != "model" else f"model:{m['cpu']}"
        target[kind] = target.get(kind, 0) + round(float(m["mib"]) * MiB)
    return [by_ep[ep] for ep in order], client


def stage_report(stage, buffers: dict[str, int]) -> dict:
    """One stage's buffers against its estimate; ``error`` = estimate / allocated - 1 (the log's 0.01 MiB rounding
    is granted to the estimate)."""
    measured = {"weights": buffers.get("model", 0), "kv": buffers.get("KV", 0), "compute": buffers.get("compute", 0)}
    estimated = {"weights": stage.weight_bytes, "kv": stage.kv_bytes, "compute": stage.compute_bytes}
    total_m, total_e = sum(measured.values()), sum(estimated.values())
    slack = 0.005 * MiB * len(buffers)  # rounding of each printed buffer
    error = total_e / total_m - 1 if total_m else float("inf")
    bound = total_e + slack >= total_m
    ok = bound and total_e <= (1 + ESTIMATE_BAR) * total_m + slack
    return {"machine": stage.machine_id, "layers": stage.describe_layers(), "measured": measured,
            "estimated": estimated, "error": error, "ok": ok, "bound": bound}


# --- a load's progress reports (bench_load.py, bench_big.py) ----------------------------------------------------


def progress_summary(reports: list[tuple[float, Any]]) -> dict[str, Any]:
    """The load's ``LoadProgress`` reports: how many, whether in bytes, never decreasing, ending at the total."""
    done = [p.done_bytes for _, p in reports]
    totals = sorted({p.total_bytes for _, p in reports}, key=str)
    in_bytes = bool(reports) and all(isinstance(d, int) for d in done)
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(reports)]
    return {"reports": len(reports), "in_bytes": in_bytes, "total_bytes": totals,
            "monotone": in_bytes and all(a <= b for a, b in itertools.pairwise(done)),
            "ends_at_total": in_bytes and len(totals) == 1 and done[-1] == totals[0],
            "first_s": reports[0][0] if reports else None, "last_s": reports[-1][0] if reports else None,
            "max_gap_s": max(gaps, default=None),
            # every 10%: (seconds since mesh.load, bytes done)
            "deciles": _deciles(reports)}


def _deciles(reports: list[tuple[float, Any]]) -> list[list[float]]:
    out, last = [], -1
    for t, p in reports:
        if int(p * 10) > last:
            last = int(p * 10)
            out.append([round(t, 2), p.done_bytes])
    return out


# --- the machine and its CPU ------------------------------------------------------------------------------------


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


# --- tables and results files -----------------------------------------------------------------------------------


def fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


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


def finish(result: dict[str, Any], out: str, table: str) -> int:
    """Write ``result`` to ``out`` as JSON, print the table; the exit status says whether the texts matched."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    logger.info("wrote %s (%.0f s in all)", path, result["total_seconds"])
    return 0 if result["texts_match"] else 1
