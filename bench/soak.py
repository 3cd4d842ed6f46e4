# SPDX-License-Identifier: AGPL-3.0-or-later
"""Soak: requests for ``--minutes`` (Python API and HTTP) on an embedded 3-machine mesh, with a random fault of the
matrix every 30-60 s. Counts requests done and failed, texts that differ from their no-fault text, and the memory of
every process at the start and at the end.

    .venv/bin/python bench/soak.py [--minutes 30] [--seed 1] [--out bench/results/soak.json] [--markdown]

Requests run one after the other on one model handle, in turn: a streamed and a plain completion through the Python
API, then the same through ``sharedllm serve``'s HTTP API (in-process, on the same handle), each with one of a few
prompts and a greedy text known from a run without faults. A supervisor thread restarts what dies, every second, as
systemd would (``LocalMesh.supervise``). Faults (see ``bench_faults.py``): ``kill -9`` of an rpc-server, a relay, a
worker, every process of a machine or the scheduler; SIGSTOP of an rpc-server; a frozen machine (relay and workers
stopped); stopped processes are continued after 20 s. Bars (issue 15): 0 failed requests, 0 differing texts, no
memory growth beyond noise.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common
from sharedllm.local import LocalMesh, state_dirs
from sharedllm.openai_server import ServerThread, create_app

logger = logging.getLogger("soak")

N_CTX = 1024
THREE = ["machine-1", "machine-2", "machine-3"]
PROMPTS = ["Once upon a time", "The old lighthouse keeper", "In the year 2150, the first city on Mars",
           "Recipe for a simple tomato soup:"]
TOKENS = 48
FAULTS = ("rpc-server", "relay", "worker", "machine", "sigstop", "freeze", "scheduler")
KEY = "sk-soak"
MODEL_ID = "gemma-3-270m-q4_k_m"


class Soak:
    def __init__(self, lm: LocalMesh, seed: int):
        self.lm = lm
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.lock = threading.Lock()  # LocalMesh is not thread-safe: the supervisor and the faults take turns
        self.faults: list[dict] = []
        self.to_continue: list[tuple[float, list[int], list[int]]] = []  # (when, pids, process groups)

    # --- the supervisor: what systemd does ----------------------------------------------------------------------

    def supervise(self) -> None:
        while not self.stop.wait(1.0):
            with self.lock:
                now = time.monotonic()
                for item in [c for c in self.to_continue if c[0] <= now]:
                    self.to_continue.remove(item)
                    self._signal(item[1], item[2], signal.SIGCONT)
                try:
                    restarted = self.lm.supervise()
                except Exception as exc:  # the scheduler's file not written yet...: next second
                    logger.warning("supervise: %s", exc)
                    restarted = []
                if restarted:
                    logger.info("restarted %s", ", ".join(restarted))

    @staticmethod
    def _signal(pids: list[int], groups: list[int], sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for g in groups:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass

    # --- faults -------------------------------------------------------------------------------------------------

    def inject(self) -> None:
        while not self.stop.wait(self.rng.uniform(30, 60)):
            kind = self.rng.choice(FAULTS)
            victim = self.rng.choice(THREE)
            with self.lock:
                try:
                    what = self._inject(kind, victim)
                except Exception as exc:  # the victim was down already: try another next time
                    what = f"not injected ({type(exc).__name__}: {exc})"
            self.faults.append({"t": time.time(), "fault": kind, "machine": victim, "what": what})
            logger.info("fault %s on %s: %s", kind, victim, what)

    def _inject(self, kind: str, victim: str) -> str:
        lm = self.lm
        if kind == "scheduler":
            os.kill(lm.scheduler.popen.pid, signal.SIGKILL)
            return "scheduler killed"
        if kind == "machine":
            lm.stop_machine(victim, signal.SIGKILL)
            lm._stopped.discard(victim)  # the power comes back: the supervisor restarts its worker
            return "every process killed"
        from sharedllm.dataplane import RELAY_FILE, SERVER_FILE, read_json

        [state_dir] = state_dirs(lm.workdir, victim)
        rpc = (read_json(state_dir / SERVER_FILE) or {}).get("pid")
        relay = (read_json(state_dir / RELAY_FILE) or {}).get("pid")
        groups = [p.popen.pid for p in lm.workers if p.machine_id == victim and p.popen.poll() is None]
        if kind == "rpc-server":
            os.kill(rpc, signal.SIGKILL)
        elif kind == "relay":
            os.kill(relay, signal.SIGKILL)
        elif kind == "worker":
            # The nanny (`dask worker`) runs the worker in a child process of multiprocessing's spawn.
            worker = next(c.pid for g in groups for c in psutil.Process(g).children() if "spawn_main" in " ".join(
                c.cmdline()))
            os.kill(worker, signal.SIGKILL)
        elif kind == "sigstop":
            os.kill(rpc, signal.SIGSTOP)
            self.to_continue.append((time.monotonic() + 20, [rpc], []))
        elif kind == "freeze":
            self._signal([relay], groups, signal.SIGSTOP)
            self.to_continue.append((time.monotonic() + 20, [relay], groups))
        return f"{kind} (pids rpc {rpc}, relay {relay})"


def memory(lm: LocalMesh, llm) -> dict[str, float]:
    """RSS in MiB by role: scheduler, workers (with their nannies), rpc-servers, relays, engine, this client."""
    from sharedllm.dataplane import RELAY_FILE, SERVER_FILE, read_json

    def rss(pids: list[int]) -> float:
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / (1 << 20)

    workers = []
    for p in lm.workers:
        try:
            proc = psutil.Process(p.popen.pid)
            workers += [proc.pid, *(c.pid for c in proc.children(recursive=True))]
        except psutil.NoSuchProcess:
            pass
    dirs = state_dirs(lm.workdir)
    rpcs = [(read_json(d / SERVER_FILE) or {}).get("pid") for d in dirs]
    relays = [(read_json(d / RELAY_FILE) or {}).get("pid") for d in dirs]
    workers = [w for w in workers if w not in rpcs and w not in relays]
    engine = llm._engine._proc.pid if llm._engine is not None and llm._engine._proc is not None else None
    return {"scheduler": rss([lm.scheduler.popen.pid]), "workers": rss(workers),
            "rpc-servers": rss([p for p in rpcs if p]), "relays": rss([p for p in relays if p]),
            "engine": rss([engine] if engine else []), "client": rss([os.getpid()])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="bench/results/soak.json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logger.setLevel(logging.INFO)

    t_all = time.perf_counter()
    counts: dict[str, dict[str, int]] = {}
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp, \
            LocalMesh(machines=3, dashboard=False, state_path=Path(tmp) / "state.sqlite", persist_interval=1.0) as lm:
        mesh = lm.mesh()
        llm = mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=THREE, max_recoveries=5)
        app = create_app(llm, model_id=MODEL_ID, api_keys=[KEY], max_queue=4, queue_timeout=120)
        with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=180,
                                                        headers={"Authorization": f"Bearer {KEY}"}) as http:
            reference = {p: llm.create_completion(p, max_tokens=TOKENS, temperature=0)["choices"][0]["text"]
                         for p in PROMPTS}

            def python_stream(p: str) -> str:
                return "".join(c["choices"][0]["text"] for c in llm.create_completion(
                    p, max_tokens=TOKENS, temperature=0, stream=True))

            def python_plain(p: str) -> str:
                return llm.create_completion(p, max_tokens=TOKENS, temperature=0)["choices"][0]["text"]

            def http_plain(p: str) -> str:
                r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": p, "max_tokens": TOKENS,
                                                       "temperature": 0})
                r.raise_for_status()
                return r.json()["choices"][0]["text"]

            def http_stream(p: str) -> str:
                import json

                text = ""
                with http.stream("POST", "/v1/completions", json={"model": MODEL_ID, "prompt": p, "stream": True,
                                                                  "max_tokens": TOKENS, "temperature": 0}) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            event = json.loads(line[6:])
                            if "error" in event:
                                raise RuntimeError(f"in-band error: {event['error']}")
                            text += event["choices"][0]["text"]
                return text

            kinds = {"python stream": python_stream, "python": python_plain, "http stream": http_stream,
                     "http": http_plain}
            mem_start = memory(lm, llm)
            soak = Soak(lm, args.seed)
            threads = [threading.Thread(target=soak.supervise, daemon=True),
                       threading.Thread(target=soak.inject, daemon=True)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + args.minutes * 60
            i = 0
            while time.monotonic() < deadline:
                name, fn = list(kinds.items())[i % len(kinds)]
                prompt = PROMPTS[(i // len(kinds)) % len(PROMPTS)]
                c = counts.setdefault(name, {"done": 0, "failed": 0, "differ": 0})
                try:
                    text = fn(prompt)
                    c["done"] += 1
                    if text != reference[prompt]:
                        c["differ"] += 1
                        errors.append(f"{name} {prompt!r}: text differs: {text[:60]!r}")
                except Exception as exc:
                    c["failed"] += 1
                    errors.append(f"{name} {prompt!r}: {type(exc).__name__}: {str(exc)[:200]}")
                    logger.warning("request failed: %s", errors[-1])
                i += 1
            soak.stop.set()
            for t in threads:
                t.join(timeout=30)
            with soak.lock:  # everything continued and running again before the last measure
                soak._signal([p for c in soak.to_continue for p in c[1]], [g for c in soak.to_continue for g in c[2]],
                             signal.SIGCONT)
            mem_end = memory(lm, llm)
            recoveries = len(llm.recoveries)
        llm.close()

    total = {k: sum(c[k] for c in counts.values()) for k in ("done", "failed", "differ")}
    table = [["requests", "done", "failed", "text differs"]]
    table += [[k, str(c["done"]), str(c["failed"]), str(c["differ"])] for k, c in counts.items()]
    table.append(["all", str(total["done"]), str(total["failed"]), str(total["differ"])])
    mem = [["process (RSS MiB)", "start", "end"]] + [[k, f"{mem_start[k]:.0f}", f"{mem_end[k]:.0f}"] for k in mem_start]
    faults = ", ".join(f"{k} x{sum(1 for f in soak.faults if f['fault'] == k)}" for k in FAULTS)
    text = (common.render(table, args.markdown) + "\n\n" + common.render(mem, args.markdown)
            + f"\n\n{len(soak.faults)} faults in {args.minutes:g} min ({faults}); {recoveries} engine recoveries")
    if errors:
        text += "\n" + "\n".join(errors[:20])
    result = {"minutes": args.minutes, "requests": counts, "total": total, "memory_start_mib": mem_start,
              "memory_end_mib": mem_end, "faults": soak.faults, "recoveries": recoveries, "errors": errors,
              "texts_match": total["differ"] == 0, "machine": common.machine_info(), "config": vars(args),
              "total_seconds": time.perf_counter() - t_all, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    code = common.finish(result, args.out, text)
    return code if total["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
