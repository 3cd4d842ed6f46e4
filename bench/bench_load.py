# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: cold against warm model load through the mesh (the rpc-servers' tensor cache).

    .venv/bin/python bench/bench_load.py [--repeats 3] [--link-mbps 0 --link-mbps 1000] [--out bench/results/load.json]
    .venv/bin/python bench/bench_load.py --model /tmp/synth-big/llama3-8b-full-Q4_K_M.gguf --repeats 1 \
        --rpc-path tunnel --link-mbps 0 --out bench/results/load-8b.json

(default links: loopback, then 1000 and 100 Mbit/s emulated)

``--model`` (default Gemma 3 270M Q4_K_M; a path or a catalog name), ``--n-ctx`` (default 2048), an embedded
``LocalMesh(machines=2)``. Each repeat starts a fresh mesh whose
rpc-servers get empty tensor caches (``XDG_CACHE_HOME`` points the workers at a new temporary directory; the default
cache is ``$XDG_CACHE_HOME/sharedllm/tensor-cache/<machine>``), then times:

- ``cold``: the first ``mesh.load`` (lease, plan, probe, engine start, llama.cpp load with every weight uploaded;
  weights over the client's hash threshold, 1 MiB in our build (10 MiB upstream), are also written to the server's
  cache);
- ``warm``: the same load again on the same rpc-servers (llama.cpp sends each big weight's hash, and the server reads
  it from its cache instead of receiving it).

Both load the same model file, which is read once before timing so that the page cache is warm for both. Each load
also generates 4 greedy tokens: cold and warm must give the same text, or the cache served wrong weights.

Each load also records its progress reports (``sharedllm.engine.LoadProgress``: bytes of tensor data done, which
must never decrease and must end at the file's total) and the client's memory: this process and the engine child
with its client relays (the mesh's own processes, rpc-servers included, are left out), sampled every 50 ms from
the start of ``mesh.load`` to the handle being ready. Anonymous resident memory (``rss - shared``: heap and
buffers, where a second copy of the weights would have to live) and resident file pages (the mapped model: page
cache shared with every other reader, not a copy) are reported apart, with the engine's own peak RSS (``VmHWM``),
against the file's size.

``--rpc-path`` (repeatable): ``tunnel``, the mesh's default (llama.cpp's bytes cross the machines' TLS relays), and
``direct`` (``--insecure-direct-rpc``: llama.cpp connects to the rpc-servers themselves). Each gets its own meshes.

``--link-mbps N`` (repeatable; 0 is plain loopback) emulates a network link of N Mbit/s between the client and the
machines: every endpoint of the leased topology (a relay, or an rpc-server when direct) is replaced by a local TCP
proxy that paces both directions to that rate. Lease, planning, the RPC probe and the engine are the mesh's own;
only the byte path is slowed. On loopback, uploads cost little, so the cache saves little; on a real link, the
upload dominates. The table goes to stdout; the raw numbers go to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common

logger = logging.getLogger("bench_load")

N_CTX = 2048  # the default --n-ctx
PROMPT = "Once upon a time"
TARGET = 2.0  # warm at least 2x faster than cold


# --- an emulated link: a paced TCP proxy in front of each rpc-server ------------------------------------------------


class PacedProxy:
    """Listen on a loopback port and forward every connection to ``target``, each direction paced to ``mbps``."""

    def __init__(self, target: str, mbps: float):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.rate = mbps * 1e6 / 8  # bytes per second
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = False
        self.forwarded = 0  # bytes paced through, both directions: 0 after a load means the load went around us
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.endpoint}").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        t0, sent = time.monotonic(), 0
        try:
            while data := src.recv(256 << 10):
                dst.sendall(data)
                sent += len(data)
                self.forwarded += len(data)
                ahead = sent / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
                elif ahead < -0.05:  # idle gaps do not bank credit for later bursts
                    t0, sent = time.monotonic(), 0
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@contextlib.contextmanager
def routed_through(proxies: dict[str, str]) -> Iterator[None]:
    """Make the client's topologies use the proxy endpoints (the bench's only intrusion into the library)."""
    from sharedllm.placement import Topology

    original = Topology.__dict__["from_dict"]

    def from_dict(cls, d: dict) -> Topology:
        topo = original.__func__(cls, d)
        stages = tuple(dataclasses.replace(s, endpoint=proxies.get(s.endpoint, s.endpoint)) for s in topo.stages)
        return dataclasses.replace(topo, stages=stages)

    Topology.from_dict = classmethod(from_dict)
    try:
        yield
    finally:
        Topology.from_dict = original


# --- measuring -----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class ClientMemory:
    """The client's resident memory while a load runs, sampled every ``interval`` seconds in a thread: this process
    plus every ``python -m sharedllm.engine`` child and its descendants (the engine's client relays). Not the
    mesh's processes (scheduler, workers, rpc-servers), although ``LocalMesh`` starts them as children too.

    ``anon`` is ``rss - shared`` (anonymous pages: heap, buffers, a copy of the weights if one were made), ``file``
    is ``shared`` (resident pages of mapped files: the model mmapped, the libraries; page cache, not a copy).
    """

    def __init__(self, interval: float = 0.05):
        import psutil

        self.me = psutil.Process()
        self.interval = interval
        self.peak = {"anon": 0, "file": 0, "rss": 0, "engine_anon": 0, "engine_rss": 0}
        self.samples = 0
        self.engine_pid: int | None = None
        self.after: dict[str, int] = {}
        self._stop = threading.Event()
        self.base = self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True, name="client-memory")

    def _procs(self) -> tuple[list, list]:
        engines = []
        for child in self.me.children():
            with contextlib.suppress(Exception):
                if "sharedllm.engine" in child.cmdline():
                    engines.append(child)
        tree = list(engines)
        for e in engines:
            with contextlib.suppress(Exception):
                tree += e.children(recursive=True)
        return [self.me, *tree], engines

    def _sample(self) -> dict[str, int]:
        procs, engines = self._procs()
        got = {"anon": 0, "file": 0, "rss": 0, "engine_anon": 0, "engine_rss": 0}
        for p in procs:
            try:
                mi = p.memory_info()
            except Exception:  # a relay or the engine that just exited
                continue
            got["anon"] += mi.rss - mi.shared
            got["file"] += mi.shared
            got["rss"] += mi.rss
            if p in engines:
                self.engine_pid = p.pid
                got["engine_anon"] += mi.rss - mi.shared
                got["engine_rss"] += mi.rss
        return got

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._sample()
            self.samples += 1
            for k, v in got.items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(self.interval)

    def __enter__(self) -> ClientMemory:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.after = self._sample()  # once loaded: llama.cpp unmaps the file ranges no CPU buffer uses

    def __exit__(self, *exc) -> None:
        self.stop()

    def report(self, file_bytes: int, engine_hwm: int | None) -> dict[str, Any]:
        anon_growth = self.peak["anon"] - self.base["anon"]
        return {"samples": self.samples, "interval_s": self.interval, "before": self.base, "peak": self.peak,
                "after": self.after,
                "peak_anon_growth": anon_growth, "peak_anon_growth_over_file": anon_growth / file_bytes,
                "peak_rss_growth_over_file": (self.peak["rss"] - self.base["rss"]) / file_bytes,
                "engine_vm_hwm": engine_hwm, "engine_vm_hwm_over_file": engine_hwm / file_bytes if engine_hwm else None}


def vm_hwm(pid: int) -> int | None:
    """A process's peak resident set size (``VmHWM``, kernel-kept: no sampling gap), in bytes."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def timed_load(mesh, model_path: str, output_layer: str = "auto", n_ctx: int = N_CTX) -> dict[str, Any]:
    """One ``mesh.load``: wall seconds to a usable handle, and where they went, its progress reports and the
    client's memory; then 4 greedy tokens."""
    reports: list[tuple[float, Any]] = []
    file_bytes = os.path.getsize(model_path)
    mem = ClientMemory()
    t0 = time.perf_counter()
    # max_recoveries=0: no standby engine process beside the load (it would count in the client's memory; what it
    # costs a load was measured apart: nothing measurable on this host, see the README's recovery section)
    with mem, mesh.load(model_path, n_ctx=n_ctx, output_layer=output_layer, max_recoveries=0,
                        on_progress=lambda p: reports.append((time.perf_counter() - t0, p))) as llm:
        wall = time.perf_counter() - t0
        mem.stop()  # the load's peak: the sampling ends with the load
        info = (llm._engine.info or {}) if llm._engine else {}
        hwm = vm_hwm(info["pid"]) if info.get("pid") else None
        engine_s = info.get("load_seconds")
        text = llm.create_completion(PROMPT, max_tokens=4, temperature=0)["choices"][0]["text"]
        return {"load_s": wall, "handle_load_s": llm.load_seconds, "lease_ms": llm.plan_ms,
                "engine_llama_load_s": engine_s,
                "other_s": wall - engine_s - llm.plan_ms / 1000 if engine_s is not None else None,
                "breakdown_s": breakdown(wall, llm.load_seconds, llm.plan_ms / 1000, info.get("phases") or {}),
                "progress": common.progress_summary(reports), "client_memory": mem.report(file_bytes, hwm),
                "text": text, "machines": llm.topology.machines, "endpoints": llm.topology.endpoints}


# Where one load's wall time goes, in order. The engine_* phases come from the engine child's own timestamps.
PHASES = {
    "client_prepare": "resolve the model, read and validate its GGUF, estimate (client, before the lease)",
    "lease": "sharedllm_acquire: the scheduler plans and leases the topology (Dask round trip)",
    "probe_and_spawn": "list machines, HELLO every rpc-server, start the engine child process",
    "engine_python_start": "engine child: interpreter start, `import sharedllm.engine` and `import llama_cpp` "
                           "(0 for a standby process, started ahead)",
    "engine_import": "engine child: what is left of the imports once the spec came (llama_cpp is imported before)",
    "engine_connect": "engine child: register the rpc-servers (ggml_backend_rpc_add_server)",
    "engine_model_metadata": "llama.cpp: read GGUF metadata, vocab and tokenizer, plan the tensors (before the "
                             "first weight)",
    "engine_weights": "llama.cpp: upload every weight (hash + cache lookup for the big ones)",
    "engine_context": "llama.cpp context and KV cache on the servers, Llama() set-up",
    "engine_invariance": "the engine measures which batches and prompt chunks keep each sequence's arithmetic "
                         "(sharedllm.engine.invariance)",
}


def breakdown(wall: float, handle_s: float, lease_s: float, phases: dict[str, float]) -> dict[str, float]:
    """``wall`` (``mesh.load``) split into ``PHASES``; the engine's phases add up to its Popen-to-ready time."""
    engine = {f"engine_{k}": phases.get(k, 0.0) for k in ("import", "connect", "model_metadata", "weights", "context",
                                                          "invariance")}
    engine["engine_python_start"] = phases.get("spawn", 0.0) + phases.get("wait_init", 0.0)
    out = {"client_prepare": wall - handle_s, "lease": lease_s,
           "probe_and_spawn": handle_s - lease_s - sum(engine.values()), **engine}
    return {k: out[k] for k in PHASES}


def cache_stats(root: Path) -> dict[str, dict[str, int]]:
    from sharedllm import tensor_cache

    base = root / "sharedllm" / "tensor-cache"
    return {d.name: tensor_cache.stats(d) for d in sorted(base.iterdir())} if base.exists() else {}


def one_repeat(model_path: str, mbps: float, machines: int, direct: bool = False, output_layer: str = "auto",
               n_ctx: int = N_CTX) -> dict[str, Any]:
    from sharedllm.local import LocalMesh
    from sharedllm.machine.state import public_endpoint

    root = Path(tempfile.mkdtemp(prefix="sharedllm-bench-load-"))
    try:
        # The workers (and so their rpc-servers) take their default cache directory from XDG_CACHE_HOME.
        lm = LocalMesh(machines=machines, dashboard=False, insecure_direct_rpc=direct)
        try:
            with environ(XDG_CACHE_HOME=str(root)):
                lm.start()  # not `with lm:`, whose __enter__ would start a second mesh outside this environment
            mesh = lm.mesh()
            empty = cache_stats(root)
            proxies: dict[str, PacedProxy] = {}
            if mbps:
                for m in mesh.machines():
                    ep = public_endpoint(m["rpc"])  # where clients connect: the relay, or the server when direct
                    proxies[ep] = PacedProxy(ep, mbps)
            route = routed_through({k: p.endpoint for k, p in proxies.items()}) if proxies else contextlib.nullcontext()
            try:
                with route:
                    cold = timed_load(mesh, model_path, output_layer, n_ctx)
                    after_cold = cache_stats(root)
                    warm = timed_load(mesh, model_path, output_layer, n_ctx)
            finally:
                for p in proxies.values():
                    p.close()
        finally:
            lm.close()
        return {"cold": cold, "warm": warm, "cache_before": empty, "cache_after_cold": after_cold,
                "proxied_bytes": sum(p.forwarded for p in proxies.values()) if mbps else None}
    finally:
        shutil.rmtree(root, ignore_errors=True)


LOCAL_LOAD_CHILD = """
import sys, time
import llama_cpp  # imported before the clock starts, as in the engine
from sharedllm.engine import build_llama
t0 = time.perf_counter()
llm = build_llama(sys.argv[1], n_ctx=int(sys.argv[2]), use_extra_bufts=False)
print(time.perf_counter() - t0)
"""


def local_load_s(model_path: str, n_ctx: int = N_CTX) -> float:
    """The floor: llama.cpp loading the model in one process with no RPC at all (a fresh process each time)."""
    out = subprocess.run([sys.executable, "-c", LOCAL_LOAD_CHILD, model_path, str(n_ctx)], capture_output=True,
                         text=True, check=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def machine_info() -> dict[str, Any]:
    import llama_cpp

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "llama_cpp_python": llama_cpp.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds")}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from sharedllm import models
    from sharedllm.gguf import read_gguf

    model_path = str(models.resolve(args.model) if args.model else models.default_model_path())
    with open(model_path, "rb") as f:  # warm the page cache: both loads read the file from memory
        while f.read(16 << 20):
            pass
    local = [local_load_s(model_path, args.n_ctx) for _ in range(args.repeats)]
    logger.info("llama.cpp loads the model locally, without RPC, in %.2f s (median)", statistics.median(local))
    scenarios = []
    for path, mbps, output in [(path, mbps, output) for mbps in args.link_mbps for path in args.rpc_path
                               for output in args.output_layer]:
        runs = []
        for r in range(args.repeats):
            logger.info("%s, link %s, output layer %s, repeat %d/%d: fresh mesh, empty tensor caches", path,
                        _link(mbps), output, r + 1, args.repeats)
            res = one_repeat(model_path, mbps, args.machines, direct=path == "direct", output_layer=output,
                             n_ctx=args.n_ctx)
            logger.info("  cold %.2f s (llama.cpp load %.2f s), warm %.2f s (llama.cpp load %.2f s); caches after "
                        "cold: %s", res["cold"]["load_s"], res["cold"]["engine_llama_load_s"], res["warm"]["load_s"],
                        res["warm"]["engine_llama_load_s"], res["cache_after_cold"])
            runs.append(res)
        med = {kind: {key: statistics.median(run[kind][key] for run in runs)
                      for key in ("load_s", "engine_llama_load_s", "lease_ms", "other_s")}
               for kind in ("cold", "warm")}
        for kind in ("cold", "warm"):
            med[kind]["breakdown_s"] = {k: statistics.median(run[kind]["breakdown_s"][k] for run in runs)
                                        for k in PHASES}
            med[kind]["peak_anon_growth"] = statistics.median(run[kind]["client_memory"]["peak_anon_growth"]
                                                              for run in runs)
            med[kind]["engine_vm_hwm"] = statistics.median(run[kind]["client_memory"]["engine_vm_hwm"] or 0
                                                           for run in runs)
        cached = [sum(s["bytes"] for s in run["cache_after_cold"].values()) for run in runs]
        scenarios.append({
            "rpc_path": path, "link_mbps": mbps, "output_layer": output, "runs": runs, "median": med,
            "speedup": med["cold"]["load_s"] / med["warm"]["load_s"],
            "speedup_llama_load": med["cold"]["engine_llama_load_s"] / med["warm"]["engine_llama_load_s"],
            "cached_bytes": statistics.median(cached),
            "texts_match": len({run[k]["text"] for run in runs for k in ("cold", "warm")}) == 1,
            "caches_empty_before_cold": all(not any(s["files"] for s in run["cache_before"].values()) for run in runs),
            # An emulated link whose proxies saw no bytes did not slow anything: the topology's endpoints are no
            # longer the rpc-server endpoints the proxies were put in front of (e.g. relays), and the row is void.
            "link_emulated": not mbps or all(run["proxied_bytes"] for run in runs),
            "progress_ok": all(run[k]["progress"]["monotone"] and run[k]["progress"]["ends_at_total"]
                               for run in runs for k in ("cold", "warm")),
        })
    return {"machine": machine_info(),
            "config": {"model": model_path, "file_bytes": os.path.getsize(model_path),
                       # what a load that streams tensor by tensor may hold at once (llama.cpp's RPC client buffers
                       # one tensor's message)
                       "largest_tensor_bytes": max(t.nbytes for t in read_gguf(model_path).tensors),
                       "n_ctx": args.n_ctx,
                       "machines": args.machines, "repeats": args.repeats,
                       "link_mbps": args.link_mbps, "rpc_paths": args.rpc_path, "output_layers": args.output_layer,
                       "target_speedup": TARGET},
            "local_load_s": {"runs": local, "median": statistics.median(local)},
            "scenarios": scenarios}


def _link(mbps: float) -> str:
    return "loopback" if not mbps else f"{mbps:g} Mbit/s (emulated)"


def _name(sc: dict[str, Any]) -> str:
    output = sc.get("output_layer", "mesh")
    return f"{_link(sc['link_mbps'])}, {sc.get('rpc_path', 'direct')}, output layer {output}"


def report(result: dict[str, Any], markdown: bool) -> str:
    from sharedllm.errors import gib

    rows = [["link, RPC path", "cold load s", "warm load s", "speedup", "llama.cpp load cold/warm s",
             "lease+probe+engine start s", "cached"]]
    for sc in result["scenarios"]:
        c, w = sc["median"]["cold"], sc["median"]["warm"]
        rows.append([_name(sc), f"{c['load_s']:.2f}", f"{w['load_s']:.2f}", f"{sc['speedup']:.2f}x",
                     f"{c['engine_llama_load_s']:.2f} / {w['engine_llama_load_s']:.2f}",
                     f"{c['load_s'] - c['engine_llama_load_s']:.2f} / {w['load_s'] - w['engine_llama_load_s']:.2f}",
                     gib(sc["cached_bytes"])])
    cfg, m = result["config"], result["machine"]
    lines = [f"{Path(cfg['model']).name} ({gib(cfg.get('file_bytes') or os.path.getsize(cfg['model']))}) load "
             f"through a {cfg['machines']}-machine mesh, n_ctx {cfg['n_ctx']}, median of "
             f"{cfg['repeats']} repeats (fresh mesh and empty tensor caches each), {m['cpu_count']} CPUs, "
             f"llama-cpp-python {m['llama_cpp_python']}", "", render(rows, markdown), ""]
    lines.append(f"floor: llama.cpp alone loads the model from the same file, without RPC, in "
                 f"{result['local_load_s']['median']:.2f} s (median)")
    lines += ["", "where the time goes (median s of each phase; engine_* from the engine child's timestamps):", ""]
    head = ["phase"] + [f"{_name(sc)} {kind}" for sc in result["scenarios"] for kind in ("cold", "warm")]
    brows = [head]
    for key in PHASES:
        brows.append([key] + [f"{sc['median'][kind]['breakdown_s'][key]:.3f}" for sc in result["scenarios"]
                              for kind in ("cold", "warm")])
    brows.append(["sum"] + [f"{sum(sc['median'][kind]['breakdown_s'].values()):.3f}" for sc in result["scenarios"]
                            for kind in ("cold", "warm")])
    lines.append(render(brows, markdown))
    lines += ["", "load progress and the client's memory (this process + the engine and its relays, sampled every "
              "50 ms during mesh.load; anon = rss - shared; the engine's VmHWM from the kernel), first repeat:", ""]
    mrows = [["load", "progress reports", "in bytes, monotone, ends at total", "longest gap s",
              "client anon before", "client anon peak", "growth / file", "file pages peak", "file pages loaded",
              "engine VmHWM / file"]]
    file_bytes = cfg.get("file_bytes")
    for sc in result["scenarios"]:
        for kind in ("cold", "warm"):
            r = sc["runs"][0][kind]
            pr, cm = r.get("progress"), r.get("client_memory")
            if not pr or not cm:
                continue
            fb = file_bytes or 1
            mrows.append([f"{_name(sc)} {kind}", str(pr["reports"]),
                          "yes" if pr["in_bytes"] and pr["monotone"] and pr["ends_at_total"] else "NO",
                          f"{pr['max_gap_s']:.2f}" if pr["max_gap_s"] is not None else "-",
                          gib(cm["before"]["anon"]), gib(cm["peak"]["anon"]),
                          f"{cm['peak_anon_growth'] / fb:.3f}", gib(cm["peak"]["file"]),
                          gib(cm["after"]["file"]) if cm.get("after") else "-",
                          f"{(cm['engine_vm_hwm'] or 0) / fb:.3f}"])
    if len(mrows) > 1:
        lines.append(render(mrows, markdown))
        if cfg.get("largest_tensor_bytes"):
            lines.append(f"(file {gib(file_bytes)}, its largest tensor {gib(cfg['largest_tensor_bytes'])}; file pages "
                         "are the mapped model, page cache shared with any other reader of the file, not a copy)")
    for sc in result["scenarios"]:
        verdict = "meets" if sc["speedup"] >= TARGET else "BELOW"
        if not sc["cached_bytes"]:
            lines.append(f"{_name(sc)}: warm {sc['speedup']:.2f}x cold; nothing to cache: every tensor this placement "
                         "sends is under llama.cpp's cache threshold (1 MiB in our build), so both loads send the "
                         "same bytes; "
                         f"greedy text cold = warm: {'yes' if sc['texts_match'] else 'NO'}")
            continue
        if not sc.get("link_emulated", True):
            lines.append(f"{_name(sc)}: INVALID, no byte went through the paced proxies (the "
                         "topology's endpoints are not the rpc-servers'); this row measured loopback")
            continue
        lines.append(f"{_name(sc)}: warm is {sc['speedup']:.2f}x faster than cold ({verdict} the "
                     f"{TARGET:g}x target); greedy text cold = warm: {'yes' if sc['texts_match'] else 'NO'}; caches "
                     f"empty before each cold load: {'yes' if sc['caches_empty_before_cold'] else 'NO'}")
    return "\n".join(lines)


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|:---|" + "---:|" * (len(rows[0]) - 1)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows[1:]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r: list[str]) -> str:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        return "  ".join(cells).rstrip()

    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="a GGUF path or catalog name (default: Gemma 3 270M Q4_K_M from its PyPI package)")
    p.add_argument("--n-ctx", type=int, default=N_CTX, help=f"context per load (default {N_CTX})")
    p.add_argument("--repeats", type=int, default=3, help="fresh meshes per link (default 3)")
    p.add_argument("--machines", type=int, default=2, help="loopback machines in the mesh (default 2)")
    p.add_argument("--link-mbps", type=float, action="append", default=None, metavar="MBPS",
                   help="emulated link speed, repeatable; 0 = plain loopback (default: 0, 1000 and 100)")
    p.add_argument("--rpc-path", action="append", choices=["tunnel", "direct"], default=None,
                   help="how clients reach the rpc-servers, repeatable: tunnel (the relays, the default of a mesh) "
                        "or direct (--insecure-direct-rpc); default: both")
    p.add_argument("--output-layer", action="append", choices=["auto", "client", "mesh"], default=None,
                   help="mesh.load(output_layer=...), repeatable (default: auto, the client for Gemma)")
    p.add_argument("--out", default="bench/results/load.json", help="JSON results file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    args.link_mbps = args.link_mbps or [0.0, 1000.0, 100.0]
    args.rpc_path = args.rpc_path or ["tunnel", "direct"]
    args.output_layer = args.output_layer or ["auto"]
    if args.repeats < 1 or args.machines < 1 or any(x < 0 for x in args.link_mbps):
        p.error("--repeats and --machines must be >= 1, --link-mbps >= 0")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    result = benchmark(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
