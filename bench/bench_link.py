# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: raw llama.cpp RPC against the mesh over an emulated link (latency and a bandwidth cap per machine).

    .venv/bin/python bench/bench_link.py [--tokens 32] [--repeats 3] [--rtt 0 1 5 20] [--mbit 1000 100]
        [--quick] [--markdown] [--out bench/results/link.json] [--pin CORES] [--device CPU] [--model PATH]

Gemma 3 270M Q4_K_M, the same prompt, greedy, on 2 loopback machines, each behind its own link emulator
(``bench/linkem.py``, every emulator in a process of its own so that no measured process pays for its threads).
Every link is set to each RTT x bandwidth in turn, live, between runs: each path loads the model once.

- ``mesh``: ``LocalMesh(machines=2)`` (relays, TLS, lease tokens) and
  ``mesh.load(..., tunnel_hook=linkem.hook(...))``. The emulators sit on the wire, between the engine's client relays
  and the machines' server relays (``wire=True``): they carry and count the TLS bytes a real network would.
- ``raw-rpc``: plain llama-cpp-python in a process that never imports sharedllm, whose RPC devices are two
  rpc-servers reached straight through the emulated links (``ggml_backend_rpc_add_server`` on the emulators'
  endpoints), the mesh's layer split (``tensor_split``), ``use_extra_bufts=False``, and the mesh's placement of the
  output layer (on the client for Gemma's tied embeddings: ``tensor_buft_overrides``), so that it is the same
  computation. The bar is judged on mesh/raw-rpc.
- ``raw-rpc (llama.cpp placement)``: the same, but with the output layer on the last machine, where plain llama.cpp
  RPC puts it: what a user of raw llama.cpp RPC gets (the logits cross the link every token). For information.

Per setting and path: decode tokens/s (tokens after the first over the time from the first to the last), TTFT
(prompt included), and, counted on the link, round trips (a burst to a machine followed by a burst back) and bytes
each way per decoded token: the counts of an N-token run less those of a 1-token run of the same path and setting,
over N - 1 (what the request's start and its first token cost is reported apart, as "first token"). Runs are
interleaved: each setting runs every path in turn (the first path rotates), then the next setting, and the whole
sweep again per repeat; mesh/raw-rpc ratios are paired within a setting and repeat. The greedy texts of every run
must be equal (the oracle). The table goes to stdout, the numbers to ``--out``.

``--pin CORES`` (a host with 3 x CORES + 3 cores or more): each emulated machine gets CORES cores of its own (its
rpc-server with CORES threads and its server relay; the raw path's rpc-server of the same stage), the client as many
(the engine with its relay threads, or the raw child; CORES threads), the link emulators two, and the mesh's Dask
processes the rest: machines as real ones are, none waiting for a core another holds. ``--device CPU`` keeps the
rpc-servers on the CPU on a GPU host.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

# Nothing from sharedllm at module level: the raw-rpc child runs this file and must not import it.
from bench import common

logger = logging.getLogger("bench_link")

MESH, RAW, RAW_LLAMA = "mesh", "raw-rpc", "raw-rpc (llama.cpp placement)"
PATHS = (RAW, MESH, RAW_LLAMA)
TARGET_RATIO = 0.95  # mesh / raw-rpc decode tokens/s, at every RTT
RESULT_PREFIX = "BENCH_LINK_RESULT "
READY_PREFIX = "BENCH_LINK_READY "
COUNTS = ("round_trips", "turns", "bytes_up", "bytes_down", "chunks_up", "chunks_down")
TIMES = ("machine_s", "link_s")


# --- raw-rpc: a long-lived child that never imports sharedllm ------------------------------------------------------


def raw_child(spec: dict[str, Any]) -> None:
    """Load the model through the given endpoints, then run one completion per line of stdin (``{"tokens": n}``)."""
    ggml, rpc = common.rpc_libs()
    devices = []
    for endpoint in spec["endpoints"]:
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise RuntimeError(f"ggml_backend_rpc_add_server({endpoint}) failed")
        devices.append(ggml.ggml_backend_reg_dev_get(reg, 0))
    kwargs = {"n_ctx": common.N_CTX, "n_gpu_layers": -1, "tensor_split": spec["tensor_split"], "verbose": False,
              "flash_attn": spec["flash_attn"]}
    cpu_buft = None
    if spec["output_on_client"]:  # as the engine: the output layer on this CPU, every core for its projection
        cpu_buft = common.cpu_buffer_type(ggml)
        kwargs["n_threads"] = spec.get("threads") or os.cpu_count() or 1
    import llama_cpp

    t0 = time.perf_counter()
    with common.patched_model_params(devices, False, cpu_buft) as keep:
        llm = llama_cpp.Llama(model_path=spec["model_path"], **kwargs)
    llm._bench_keepalive = keep
    imported = any(m == "sharedllm" or m.startswith("sharedllm.") for m in sys.modules)
    print(READY_PREFIX + json.dumps({"load_s": time.perf_counter() - t0, "imported_sharedllm": imported}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm.reset()  # a fresh context every request, as the engine (no reuse of the last prompt's cache)
        res = common.timed_stream(lambda n=req["tokens"]: llm.create_completion(
            common.PROMPT, stream=True, **common.completion_kwargs(n)))
        print(RESULT_PREFIX + json.dumps(res), flush=True)
    llm.close()


class RawPath:
    """A raw-rpc child process and the links in front of its rpc-servers."""

    def __init__(self, name: str, links: list, spec: dict[str, Any], log: Path):
        self.name, self.links = name, links
        env = dict(os.environ)
        env.setdefault("GOMP_SPINCOUNT", "10000")  # as the engine's environment (sharedllm.engine.Engine.start)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--raw-child", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env=env, bufsize=1)
        info = self._read(READY_PREFIX, f"{name} did not load; see {log}")
        if info["imported_sharedllm"]:
            raise RuntimeError("the raw-rpc child imported sharedllm; it must use llama_cpp and ctypes only")
        self.load_s = info["load_s"]

    def _read(self, prefix: str, why: str) -> dict[str, Any]:
        while line := self.proc.stdout.readline():
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        raise RuntimeError(why)

    def run(self, tokens: int) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        return self._read(RESULT_PREFIX, f"{self.name} died (status {self.proc.poll()})")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class MeshPath:
    """A model handle on the LocalMesh and the link emulators its engine started (found by their control sockets)."""

    def __init__(self, llm, links: list):
        self.name, self.llm, self.links = MESH, llm, links

    def run(self, tokens: int) -> dict[str, Any]:
        return common.timed_stream(lambda: self.llm.create_completion(
            common.PROMPT, stream=True, **common.completion_kwargs(tokens)))


def link_stats(links: list) -> dict[str, Any]:
    """Counters of every link of a path, summed (and each link's own)."""
    each = [lk.stats() for lk in links]
    total = {"round_trips": sum(s["round_trips"] for s in each), "turns": sum(s["turns"] for s in each),
             "bytes_up": sum(s["bytes"][0] for s in each), "bytes_down": sum(s["bytes"][1] for s in each),
             "chunks_up": sum(s["chunks"][0] for s in each), "chunks_down": sum(s["chunks"][1] for s in each)}
    return {**total, "links": [{k: s[k] for k in ("round_trips", "bytes", "chunks")} for s in each]}


def trace_times(events: list[list]) -> dict[str, float]:
    """Where one link's round trips spent their time, from its chunk trace (see ``LinkEmulator.trace``).

    ``machine_s``: from the last byte of a request passed on to the machine to the first byte of its answer back
    (the machine's side: its rpc-server, and its server relay on the mesh). ``link_s``: from the first byte of each
    burst read to its last byte passed on (the emulated latency and bandwidth, and the emulator's own hop).
    """
    machine = link = 0.0
    burst_dir, burst_first_r, last_up_s = None, 0.0, None
    last_s = 0.0
    for t, _conn, direction, _size, kind in sorted(events, key=lambda e: e[0]):
        if kind == "r":
            if direction != burst_dir:
                if burst_dir is not None:
                    link += last_s - burst_first_r
                if direction == 1 and last_up_s is not None:
                    machine += t - last_up_s
                burst_dir, burst_first_r = direction, t
        else:
            last_s = t
            if direction == 0:
                last_up_s = t
    if burst_dir is not None:
        link += last_s - burst_first_r
    return {"machine_s": machine, "link_s": link}


def counted_run(path, tokens: int) -> dict[str, Any]:
    """One completion on ``path``; what crossed its links during it (the counters after it less before it)."""
    before = link_stats(path.links)
    for lk in path.links:
        lk.trace(True)
    res = path.run(tokens)
    # Every answer has reached the client when its last token did; nothing crosses the link after a completion.
    times = [trace_times(lk.trace(False)["events"]) for lk in path.links]
    after = link_stats(path.links)
    res["link"] = {k: after[k] - before[k] for k in COUNTS}
    res["link"]["machine_s"] = sum(x["machine_s"] for x in times)
    res["link"]["link_s"] = sum(x["link_s"] for x in times)
    res["link"]["per_link_round_trips"] = [a["round_trips"] - b["round_trips"]
                                           for a, b in zip(after["links"], before["links"], strict=True)]
    return res


# --- the rig --------------------------------------------------------------------------------------------------------


class Rig:
    """Every process and link of the benchmark, stopped on exit whatever happens."""

    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.rpc_pids: dict[str, int] = {}

    def rpc_server(self, log: Path, threads: int | None = None, device: str | None = None) -> str:
        """A ``python -m sharedllm.rpc_server`` as the LocalMesh starts its own (every core, quiet OpenMP)."""
        from sharedllm.ggml import rpc_hello
        from sharedllm.rpc_server import free_port

        port = free_port("127.0.0.1")
        env = dict(os.environ, GOMP_SPINCOUNT="10000")
        threads = threads or len(os.sched_getaffinity(0))
        with open(log, "wb") as f:
            proc = subprocess.Popen([sys.executable, "-m", "sharedllm.rpc_server", "--host", "127.0.0.1", "--port",
                                     str(port), "--threads", str(threads), "--parent-pid", str(os.getpid()),
                                     *(["--device", device] if device else [])],
                                    stdin=subprocess.DEVNULL, stdout=f, stderr=f, env=env)
        self.stack.callback(_stop, proc)
        endpoint = f"127.0.0.1:{port}"
        self.rpc_pids[endpoint] = proc.pid
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc_hello(endpoint, timeout=2.0)
                return endpoint
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rpc-server {endpoint} did not start; see {log}") from None
                time.sleep(0.1)

    def link(self, target: str):
        from bench.linkem import LinkEmulator

        return self.stack.enter_context(LinkEmulator(target, process=True))

    def close(self) -> None:
        self.stack.close()


# --- --pin: each emulated machine on cores of its own ------------------------------------------------------------


def core_groups(per_machine: int, machines: int) -> dict[str, list[int]] | None:
    """Cores for the client (the engine or raw child, with its relay threads), each machine (its rpc-server and
    server relay), the link emulators, and the rest (Dask, this process); None when the host has too few."""
    cores = sorted(os.sched_getaffinity(0))
    need = per_machine * (machines + 1) + 2 + 1
    if len(cores) < need:
        return None
    groups, i = {"client": cores[:per_machine]}, per_machine
    for m in range(machines):
        groups[f"machine-{m}"] = cores[i:i + per_machine]
        i += per_machine
    groups["links"], groups["rest"] = cores[i:i + 2], cores[i + 2:]
    return groups


def pin(pid: int, cores: list[int]) -> int:
    """Every thread of ``pid`` (and the threads it starts later) on ``cores``; how many threads were pinned."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(tid), cores)
            n += 1
    return n


def _procs() -> dict[int, str]:
    out = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            with contextlib.suppress(OSError):
                out[int(p)] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return out


def pin_all(groups: dict[str, list[int]], lm, topo, rig: Rig, raw_links: list, mesh_links: list,
            raw_children: list[int]) -> dict[str, Any]:
    """Pin the benchmark's processes to their groups: each stage's machine (the mesh's rpc-server and server relay
    of that machine, the raw path's rpc-server of that stage) on its own cores, both clients on the client's, the
    link emulators on theirs, everything else of the mesh (scheduler, workers) and this process on the rest."""
    procs = _procs()
    done: dict[str, list[int]] = {}

    def put(group: str, pid: int) -> None:
        if pin(pid, groups[group]):
            done.setdefault(group, []).append(pid)

    parent = {}
    for pid in procs:
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    mine, grew = {os.getpid()}, True
    while grew:  # this process and its descendants (the mesh's scheduler, workers, their children, the clients)
        new = {pid for pid, pp in parent.items() if pp in mine} - mine
        mine |= new
        grew = bool(new)
    for pid in mine:  # first everything on the rest, then the specific ones where they belong
        put("rest", pid)
    for i, stage in enumerate(topo.stages):
        for pid, cmd in procs.items():
            if f"/{stage.machine_id}/" in cmd and ("sharedllm.rpc_server" in cmd or "sharedllm.relay server" in cmd):
                put(f"machine-{i}", pid)
    for i, lk in enumerate(raw_links):  # each raw path has one rpc-server per stage
        put(f"machine-{i % len(topo.stages)}", rig.rpc_pids[lk.target_endpoint])
    for lk in [*raw_links, *mesh_links]:
        put("links", lk.pid if hasattr(lk, "target") else lk.info()["pid"])
    for pid, cmd in procs.items():
        if "sharedllm.engine" in cmd and str(os.getpid()) in cmd:
            put("client", pid)
    for pid in raw_children:
        put("client", pid)
    return {"groups": groups, "pinned": done}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _frame_echo() -> tuple[socket.socket, str]:
    """A tiny request/response server for measuring the emulated round trip itself."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    while data := conn.recv(64):
                        conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server, f"127.0.0.1:{server.getsockname()[1]}"


def measure_rtt(link, pings: int) -> dict[str, float]:
    """The round trip the emulator really gives a 32-byte message (its sleeps overshoot; Python adds a hop)."""
    host, port = link.endpoint.rsplit(":", 1)
    times = []
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(pings):
            t0 = time.perf_counter()
            s.sendall(b"x" * 32)
            got = 0
            while got < 32:
                got += len(s.recv(64))
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": times[len(times) // 2] * 1e3, "p90_ms": times[len(times) * 9 // 10] * 1e3}


# --- the benchmark --------------------------------------------------------------------------------------------------


def _setting_name(rtt: float, mbit: float) -> str:
    bw = f"{mbit / 1000:g} Gbit/s" if mbit >= 1000 else f"{mbit:g} Mbit/s"
    return f"rtt {rtt:g} ms, {bw}"


def run_once(path, tokens: int, args: argparse.Namespace) -> dict[str, Any]:
    """One timed run on a quiet machine if possible (a run that shared the CPU with others is rerun)."""
    discarded = []
    while True:
        waited = common.wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
        meter = common.CpuMeter()
        res = counted_run(path, tokens)
        res["cpu"] = meter.stop()
        res["waited_for_quiet_s"] = waited
        res["noisy"] = res["cpu"]["foreign_pct"] > args.max_foreign
        if not res["noisy"] or len(discarded) >= args.retries:
            res["discarded_noisy"] = discarded
            return res
        discarded.append({k: res[k] for k in ("decode_tps", "ttft_ms", "cpu")})


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from bench.linkem import LinkControl, hook
    from sharedllm import models
    from sharedllm.local import LocalMesh
    from sharedllm.options import FLASH_ATTN  # the mesh's default: the raw path loads as the engine does

    model_path = args.model or str(models.default_model_path())
    settings = [(rtt, mbit) for mbit in args.mbit for rtt in args.rtt]
    t_start = time.perf_counter()
    rig = Rig()
    with tempfile.TemporaryDirectory(prefix="bench-link-") as workdir, contextlib.closing(rig):
        work = Path(workdir)
        groups = core_groups(args.pin, 2) if args.pin else None
        if args.pin and groups is None:
            raise SystemExit(f"--pin {args.pin} needs {args.pin * 3 + 3} cores; this host has "
                             f"{len(os.sched_getaffinity(0))}")
        if args.device:  # the mesh's workers read their options from SHAREDLLM_<OPTION> too
            os.environ["SHAREDLLM_RPC_DEVICES"] = args.device
        lm = rig.stack.enter_context(contextlib.closing(LocalMesh(machines=2, dashboard=False,
                                                                  rpc_threads=args.threads or None,
                                                                  insecure_direct_rpc=args.no_relays)))
        lm.start()
        control_dir = work / "mesh-links"
        logger.info("mesh: loading %s behind link emulators on the wire", args.model or common.MODEL_NAME)
        t0 = time.perf_counter()
        threads = {"n_threads": args.threads} if args.threads else {}
        link = {"rtt_ms": 0.0, "process": True, "wire": not args.no_relays, "control_dir": str(control_dir)}
        llm = lm.mesh().load(args.model or common.MODEL_NAME, n_ctx=common.N_CTX, tunnel_hook=hook(**link), **threads)
        rig.stack.callback(llm.close)
        mesh_load_s = time.perf_counter() - t0
        topo = llm.topology
        mesh_links = LinkControl.find(control_dir)
        if len(mesh_links) != len(topo.stages):
            raise RuntimeError(f"found {len(mesh_links)} link emulators of the mesh's engine, expected "
                               f"{len(topo.stages)}")
        paths: dict[str, Any] = {MESH: MeshPath(llm, mesh_links)}
        split = topo.tensor_split
        logger.info("topology: %s, tensor_split %s, output layer on the %s", topo.endpoints, split,
                    "client" if topo.output_on_client else "last machine")
        loads = {MESH: mesh_load_s}
        for name, on_client in ((RAW, topo.output_on_client), (RAW_LLAMA, False)):
            if name == RAW_LLAMA and (args.no_llama_placement or not topo.output_on_client):
                continue  # the mesh already places the output layer as llama.cpp does: raw-rpc is that path
            servers = [rig.rpc_server(work / f"{name[:7]}-{i}.log", args.threads, args.device)
                       for i in range(len(topo.stages))]
            links = [rig.link(ep) for ep in servers]
            spec = {"model_path": model_path, "endpoints": [lk.endpoint for lk in links], "tensor_split": split,
                    "output_on_client": on_client, "threads": args.threads, "flash_attn": FLASH_ATTN}
            logger.info("%s: loading through the links", name)
            path = RawPath(name, links, spec, work / f"{name[:7]}-child.log")
            rig.stack.callback(path.close)
            paths[name], loads[name] = path, path.load_s
        names = [n for n in PATHS if n in paths]
        all_links = [lk for p in paths.values() for lk in p.links]

        probe_server, probe_target = _frame_echo()
        rig.stack.callback(probe_server.close)
        probe = rig.link(probe_target)

        pinned = None
        if groups:
            pinned = pin_all(groups, lm, topo, rig, [lk for n in names if n != MESH for lk in paths[n].links],
                             mesh_links, [paths[n].proc.pid for n in names if n != MESH])
            logger.info("pinned: %s", pinned)
        for name in names:  # warm-up, not counted
            paths[name].run(min(8, args.tokens))
        runs: dict[str, dict[str, list]] = {_setting_name(*s): {n: [] for n in names} for s in settings}
        first: dict[str, dict[str, Any]] = {_setting_name(*s): {} for s in settings}
        link_rtt: dict[str, dict[str, float]] = {}
        for r in range(args.repeats):
            for si, (rtt, mbit) in enumerate(settings):
                key = _setting_name(rtt, mbit)
                for lk in [*all_links, probe]:
                    lk.set(rtt, mbit)
                if r == 0:
                    link_rtt[key] = measure_rtt(probe, args.pings)
                    for name in names:  # the request's start and its first token, to subtract from the runs
                        first[key][name] = counted_run(paths[name], 1)
                order = names[(r + si) % len(names):] + names[:(r + si) % len(names)]
                for name in order:
                    res = run_once(paths[name], args.tokens, args)
                    res["repeat"] = r
                    runs[key][name].append(res)
                    logger.info("repeat %d/%d %-22s %-30s %5.1f tok/s, TTFT %4.0f ms, %d round trips, others "
                                "%.0f%% CPU", r + 1, args.repeats, key, name, res["decode_tps"] or 0,
                                res["ttft_ms"] or 0, res["link"]["round_trips"], res["cpu"]["foreign_pct"])
    total_s = time.perf_counter() - t_start
    result = summarize(args, runs, first, link_rtt, loads, topo, model_path, total_s)
    result["config"]["pin"] = pinned
    return result


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def median_interval(values: list[float], level: float = 0.9, resamples: int = 2000) -> list[float] | None:
    """A bootstrap interval of the median of ``values`` (paired ratios): how far the noise of this host moves it
    (fixed seed: the same runs give the same interval). None for fewer than 3 values."""
    if len(values) < 3:
        return None
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    lo = meds[int((1 - level) / 2 * resamples)]
    hi = meds[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return [lo, hi]


def summarize(args, runs, first, link_rtt, loads, topo, model_path, total_s) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    texts: set[str] = set()
    firsts: set[str] = set()  # the 1-token runs' texts: the first token of the others
    for key, by_path in runs.items():
        out: dict[str, Any] = {"link_rtt_measured": link_rtt.get(key), "paths": {}}
        for name, rs in by_path.items():
            texts.update(x["text"] for x in rs)
            firsts.add(first[key][name]["text"])
            one = first[key][name]["link"]
            per_token = {}
            for c in COUNTS:
                vals = [(x["link"][c] - one[c]) / (x["tokens"] - 1) for x in rs if x["tokens"] > 1]
                per_token[c] = _median(vals)
            for c in TIMES:  # in ms per decoded token
                vals = [(x["link"][c] - one[c]) * 1000 / (x["tokens"] - 1) for x in rs if x["tokens"] > 1]
                per_token[c.replace("_s", "_ms")] = _median(vals)
            gap = [1000 / x["decode_tps"] for x in rs if x["decode_tps"]]
            per_token["ms"] = _median(gap)
            if per_token["ms"] is not None and per_token["machine_ms"] is not None:
                per_token["client_ms"] = per_token["ms"] - per_token["machine_ms"] - per_token["link_ms"]
            per_token["distinct_round_trips"] = sorted({round((x["link"]["round_trips"] - one["round_trips"])
                                                             / (x["tokens"] - 1), 3) for x in rs})
            out["paths"][name] = {
                "decode_tps": _median([x["decode_tps"] for x in rs]),
                "decode_tps_p50gap": _median([x["decode_tps_p50gap"] for x in rs]),
                "ttft_ms": _median([x["ttft_ms"] for x in rs]),
                "foreign_cpu_pct": _median([x["cpu"]["foreign_pct"] for x in rs]),
                "per_token": per_token,
                "first_token": {c: one[c] for c in (*COUNTS, *TIMES)},
                "runs": rs,
            }
        p = out["paths"]
        if RAW in p and MESH in p:
            pairs = [m["decode_tps"] / w["decode_tps"] if m["decode_tps"] and w["decode_tps"] else None
                     for m, w in zip(p[MESH]["runs"], p[RAW]["runs"], strict=True)]
            out["mesh/raw decode per repeat"] = pairs
            out["mesh/raw decode"] = _median(pairs)
            out["mesh/raw decode, 90% interval"] = median_interval([x for x in pairs if x is not None])
            out["mesh/raw decode, ratio of medians"] = (p[MESH]["decode_tps"] / p[RAW]["decode_tps"]
                                                        if p[MESH]["decode_tps"] and p[RAW]["decode_tps"] else None)
            out["mesh/raw TTFT"] = (p[MESH]["ttft_ms"] / p[RAW]["ttft_ms"]
                                    if p[MESH]["ttft_ms"] and p[RAW]["ttft_ms"] else None)
        settings[key] = out
    ratios = [s.get("mesh/raw decode") for s in settings.values()]
    return {
        "machine": common.machine_info(),
        "config": {"tokens": args.tokens, "repeats": args.repeats, "rtt_ms": args.rtt, "mbit": args.mbit,
                   "model": model_path, "prompt": common.PROMPT, "n_ctx": common.N_CTX,
                   "completion_kwargs": common.completion_kwargs(args.tokens), "quiet_wait_s": args.quiet_wait,
                   "max_foreign_pct": args.max_foreign, "retries": args.retries, "pings": args.pings,
                   "threads": args.threads or None, "mesh_relays": not args.no_relays,
                   "link": "bench/linkem.py, one process per link; mesh: on the wire (TLS), raw: in front of the "
                           "rpc-server"},
        "topology": {"endpoints": topo.endpoints, "tensor_split": topo.tensor_split,
                     "output_on_client": topo.output_on_client},
        "load_s": loads,
        "settings": settings,
        "target": TARGET_RATIO,
        "meets_target": all(x is not None and x >= TARGET_RATIO for x in ratios),
        "worst_ratio": min((x for x in ratios if x is not None), default=None),
        "texts_match": len(texts) == 1 and all(t.startswith(f) for t in texts for f in firsts),
        "distinct_texts": sorted(texts),
        "total_seconds": total_s,
    }


# --- report ---------------------------------------------------------------------------------------------------------


def _kib(v: float | None) -> str:
    return "-" if v is None else (f"{v / 1024:.1f} KiB" if v >= 1024 else f"{v:.0f} B")


def report(result: dict[str, Any], markdown: bool) -> str:
    cfg, m = result["config"], result["machine"]
    rows = [["link (set; measured p50 RTT)", "path", "decode tok/s", "TTFT ms", "mesh/raw [90% interval]",
             "round trips/token", "bytes/token up", "bytes/token down", "ms/token: machines, link, client",
             "first token: round trips, down", "others' CPU"]]
    for key, s in result["settings"].items():
        measured = s.get("link_rtt_measured") or {}
        label = f"{key}; {common.fmt(measured.get('p50_ms'), 2)} ms"
        for name, p in s["paths"].items():
            pt, ft = p["per_token"], p["first_token"]
            ratio = ""
            if name == MESH and s.get("mesh/raw decode") is not None:
                ratio = f"{s['mesh/raw decode']:.3f}"
                if s.get("mesh/raw decode, 90% interval"):
                    ratio += " [{:.2f}, {:.2f}]".format(*s["mesh/raw decode, 90% interval"])
            rows.append([label, name, common.fmt(p["decode_tps"], 1), common.fmt(p["ttft_ms"], 0), ratio,
                         common.fmt(pt["round_trips"], 2), _kib(pt["bytes_up"]), _kib(pt["bytes_down"]),
                         f"{common.fmt(pt.get('machine_ms'), 1)}, {common.fmt(pt.get('link_ms'), 1)}, "
                         f"{common.fmt(pt.get('client_ms'), 1)}",
                         f"{ft['round_trips']}, {_kib(ft['bytes_down'])}", common.fmt(p["foreign_cpu_pct"], 0) + "%"])
            label = ""
    worst = result["worst_ratio"]
    lines = [
        f"Gemma 3 270M Q4_K_M, {cfg['tokens']} greedy tokens, median of {cfg['repeats']} interleaved repeats, "
        f"2 loopback machines (tensor_split {result['topology']['tensor_split']}, output layer on the "
        + ("client" if result["topology"]["output_on_client"] else "last machine")
        + f"), {m['cpu_count']} CPUs; one emulated link per machine (its own process)"
        + ("" if cfg.get("mesh_relays", True) else "; the mesh WITHOUT its relays (--no-relays)")
        + (f"; {cfg['threads']} thread(s) per machine and client" if cfg.get("threads") else ""),
        "",
        common.render(rows, markdown),
        "",
        f"mesh/raw-rpc decode (median of paired repeats), worst setting: {common.fmt(worst, 3)} ("
        + ("meets" if result["meets_target"] else "BELOW") + f" the {TARGET_RATIO} bar at every setting)",
        "settings whose 90% interval holds the bar (this host's noise cannot tell): "
        + (", ".join(k for k, s in result["settings"].items() if (iv := s.get("mesh/raw decode, 90% interval"))
                     and iv[0] <= TARGET_RATIO <= iv[1]) or "none"),
        "greedy texts of every run and path: " + ("identical" if result["texts_match"]
                                                 else f"DIFFER ({len(result['distinct_texts'])} variants)"),
    ]
    foreign = max((x["cpu"]["foreign_pct"] for s in result["settings"].values() for p in s["paths"].values()
                   for x in p["runs"]), default=0.0)
    if foreign >= 10:
        lines.append(f"WARNING: other processes took up to {foreign:.0f}% of the CPU during a run: numbers are noisy")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32, help="tokens per timed run (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="sweeps over every setting (default 3)")
    p.add_argument("--rtt", type=float, nargs="+", default=[0.0, 1.0, 5.0, 20.0], help="RTTs in ms (0 1 5 20)")
    p.add_argument("--mbit", type=float, nargs="+", default=[1000.0, 100.0], help="bandwidths, Mbit/s (1000 100)")
    p.add_argument("--quick", action="store_true", help="16 tokens, 1 repeat, RTT 0 and 20 ms at 1 Gbit/s")
    p.add_argument("--no-llama-placement", action="store_true",
                   help="skip raw-rpc with llama.cpp's own placement of the output layer")
    p.add_argument("--pings", type=int, default=30, help="round trips to measure each link setting with (30)")
    p.add_argument("--device", default=None, help="what every rpc-server serves (CPU on a GPU host; default: "
                                                    "its default, GPUs or CPU)")
    p.add_argument("--model", default=None, help="the Gemma 3 270M file (default: from its package, as the mesh's)")
    p.add_argument("--pin", type=int, default=0, metavar="CORES",
                   help="give each emulated machine CORES cores of its own, the client as many, the links two "
                        "(taskset-style affinity of every process and thread; rpc-servers and the client with CORES "
                        "threads): machines as real ones are, on a host with 3 x CORES + 3 cores or more")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="CPU threads of every rpc-server and of the client (default: every core; --pin sets it)")
    p.add_argument("--no-relays", action="store_true",
                   help="the mesh without its relays (--insecure-direct-rpc machines, the link in front of each "
                        "rpc-server): what the relays cost, apart from the engine")
    p.add_argument("--quiet-wait", type=float, default=2.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to leave the CPU (default 2)")
    p.add_argument("--max-foreign", type=float, default=15.0, metavar="PCT",
                   help="rerun a run during which other processes took more than PCT%% of the CPU (default 15)")
    p.add_argument("--retries", type=int, default=1, help="reruns of a noisy run before keeping it (default 1)")
    p.add_argument("--out", default="bench/results/link.json", help="JSON results file")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--from-json", default=None, metavar="PATH", help="print the table of an earlier results file")
    p.add_argument("--raw-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.raw_child is not None:
        raw_child(json.loads(args.raw_child))
        return 0
    if args.from_json is not None:
        print(report(json.loads(Path(args.from_json).read_text()), args.markdown))
        return 0
    if args.quick:
        args.tokens, args.repeats, args.rtt, args.mbit = 16, 1, [0.0, 20.0], [1000.0]
    if args.pin:
        args.threads = args.pin
    if args.tokens < 2 or args.repeats < 1:
        p.error("--tokens must be >= 2 and --repeats >= 1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("distributed", "sharedllm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = benchmark(args)
    return common.finish(result, args.out, report(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
