# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: the architecture x quantization matrix on a loopback mesh: greedy text and memory against the estimate.

    .venv/bin/python bench/bench_matrix.py [--machines 2] [--n-ctx 1024] [--arch A ...] [--quant Q ...] [--markdown]
                                           [--models DIR] [--out bench/results/matrix.json]

Every cell is a synthetic model (bench/synth_gguf.py, the ``tiny`` shapes of a real configuration, quantized by
llama.cpp) loaded through ``Mesh.load`` on an embedded ``LocalMesh``, spread over every machine. A cell is green when

- the load succeeds and the mesh's greedy text (``--tokens`` tokens) equals local llama-cpp-python's with the
  rpc-server's CPU kernels (``use_extra_bufts=False``);
- on every rpc-server, what llama.cpp allocated there (its model, KV and compute buffers, as the engine's llama.cpp
  log reports them per device) is at most the placement's estimate for that stage, and the estimate at most 15%
  above it. The column shows the worst stage's error, ``estimate / allocated - 1``.

Also recorded in the JSON, per stage: the buffers one by one against weight_bytes / kv_bytes / compute_bytes, and
each rpc-server's RSS growth from before the load to after the generation (a lower bound of what it allocated:
pages of the compute buffer the short generation never touched do not count); for the client: its own buffers
(mapped token embeddings, compute, output) against the estimate's ``input_bytes``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import synth_gguf

log = logging.getLogger("bench.matrix")
PROMPT = "Once upon a time"
BAR = 0.15  # the estimate may exceed the allocation by this fraction, never fall below it
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
    ok = total_e + slack >= total_m and total_e <= (1 + BAR) * total_m + slack
    return {"machine": stage.machine_id, "layers": stage.describe_layers(), "measured": measured,
            "estimated": estimated, "error": error, "ok": ok}


def run_cell(mesh, machines: list[str], path: Path, n_ctx: int, tokens: int, pids: dict[str, int]) -> dict:
    import psutil

    from sharedllm.engine import build_llama

    cell: dict = {"model": path.name, "file_mib": path.stat().st_size / MiB}
    llm = build_llama(str(path), n_ctx=n_ctx, n_threads=2, use_extra_bufts=False)
    try:
        local = llm.create_completion(PROMPT, max_tokens=tokens, temperature=0)
    finally:
        llm.close()
    cell["local_text"] = local["choices"][0]["text"]
    rss0 = {m: psutil.Process(pid).memory_info().rss for m, pid in pids.items()}
    t0 = time.perf_counter()
    try:
        with mesh.load(str(path), n_ctx=n_ctx, machines=machines, verbose=True) as h:
            cell["load_s"] = time.perf_counter() - t0
            out = h.create_completion(PROMPT, max_tokens=tokens, temperature=0)
            rss1 = {m: psutil.Process(pid).memory_info().rss for m, pid in pids.items()}
            devices, client = engine_buffers(Path(h._engine.log_path).read_text(errors="replace"))
            stages = list(h.topology.stages)
            estimate = h.estimate
    except Exception as exc:  # a cell that fails is reported, the matrix goes on
        cell.update(ok=False, load_ok=False, why=f"{type(exc).__name__}: {exc}"[:500])
        return cell
    cell["mesh_text"] = out["choices"][0]["text"]
    cell["same_text"] = cell["mesh_text"] == cell["local_text"]
    cell["stages"] = [stage_report(s, b) for s, b in zip(stages, devices, strict=True)]
    for st in cell["stages"]:
        st["rss_growth"] = rss1[st["machine"]] - rss0[st["machine"]]
    client_weights = sum(v for k, v in client.items() if k.startswith("model:"))
    cell["client"] = {"buffers": client, "estimated_weights": estimate.input_bytes,
                      "weights_error": estimate.input_bytes / client_weights - 1 if client_weights else None}
    cell["error"] = max((s["error"] for s in cell["stages"]), key=abs)
    cell["estimate_ok"] = all(s["ok"] for s in cell["stages"])
    cell.update(load_ok=True, ok=cell["same_text"] and cell["estimate_ok"])
    if not cell["same_text"]:
        cell["why"] = f"greedy text differs: mesh {cell['mesh_text']!r} local {cell['local_text']!r}"
    elif not cell["estimate_ok"]:
        cell["why"] = "estimate outside [0, +15%]: " + ", ".join(
            f"{s['machine']} {s['error']:+.1%}" for s in cell["stages"] if not s["ok"])
    return cell


def render(cells: dict, archs: list[str], quants: list[str], markdown: bool) -> str:
    def mark(c: dict | None) -> str:
        if c is None:
            return "-"
        if not c.get("load_ok"):
            return "FAIL load"
        text = "ok" if c["same_text"] else "TEXT"
        est = f"{c['error']:+.1%}" + ("" if c["estimate_ok"] else " OVER BAR")
        return f"{'✅' if c['ok'] else '❌'} {text} {est}" if markdown else f"{text} {est}"

    rows = [["architecture", *quants]] + [[a, *(mark(cells.get(f"{a}/{q}")) for q in quants)] for a in archs]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=sorted(synth_gguf.ARCHS), help="repeatable")
    ap.add_argument("--quant", action="append", choices=list(synth_gguf.QUANTS), help="repeatable")
    ap.add_argument("--machines", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--models", default=os.path.expanduser("~/.cache/sharedllm/synth"))
    ap.add_argument("--out", default="bench/results/matrix.json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    archs = args.arch or list(synth_gguf.MATRIX_ARCHS)
    quants = args.quant or list(synth_gguf.QUANTS)

    from sharedllm.local import LocalMesh

    cells: dict[str, dict] = {}
    t0 = time.perf_counter()
    with LocalMesh(machines=args.machines, dashboard=False) as lm:
        mesh = lm.mesh()
        table = mesh.machines()
        machines = sorted(m["machine_id"] for m in table)
        pids = {m["machine_id"]: m["rpc"]["pid"] for m in table}
        for arch in archs:
            for quant in quants:
                path = synth_gguf.synthesize(arch, quant, args.models)
                cell = run_cell(mesh, machines, path, args.n_ctx, args.tokens, pids)
                cells[f"{arch}/{quant}"] = cell
                print(f"{arch:<18} {quant:<7} {'ok' if cell['ok'] else 'FAIL'} "
                      f"{cell.get('error', float('nan')):+.1%} {cell.get('why', '')}", file=sys.stderr, flush=True)
    print(render(cells, archs, quants, args.markdown))
    bad = [k for k, c in cells.items() if not c["ok"]]
    failing = f"; failing: {', '.join(bad)}" if bad else ""
    print(f"\n{len(cells) - len(bad)}/{len(cells)} cells green on {args.machines} machines, n_ctx {args.n_ctx}, "
          f"{args.tokens} greedy tokens, {time.perf_counter() - t0:.0f}s{failing}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cells": cells, "config": vars(args), "host": platform.node(),
                                          "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
