# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: the architecture x quantization matrix on a loopback mesh: greedy text and memory against the estimate.

    .venv/bin/python bench/bench_matrix.py [--machines 2] [--n-ctx 1024] [--arch A ...] [--quant Q ...] [--markdown]
                                           [--models DIR] [--out bench/results/matrix.json]
    .venv/bin/python bench/bench_matrix.py --machines 3 4 [--output-layer client mesh] [--out ...-nway.json]

Every cell is a synthetic model (bench/synth_gguf.py, the ``tiny`` shapes of a real configuration, quantized by
llama.cpp) loaded through ``Mesh.load`` on an embedded ``LocalMesh``, spread over every machine. A cell is green when

- the load succeeds and the mesh's greedy text (``--tokens`` tokens) equals local llama-cpp-python's with the
  rpc-server's CPU kernels (``use_extra_bufts=False``);
- on every rpc-server, what llama.cpp allocated there (its model, KV and compute buffers, as the engine's llama.cpp
  log reports them per device) is at most the placement's estimate for that stage, and the estimate at most 15%
  above it. The column shows the worst stage's error, ``estimate / allocated - 1``.

N-way splits (``--machines 3 4``: one embedded mesh per count, the model spread over all of its machines, one run
per ``--output-layer``): every stage is named by its kind, ``first`` (its input comes from the client), ``middle``
(it receives the hidden state from a machine and sends it on to the next) or ``last`` (the last layers, and the
output layer unless it runs on the client), and the table gives each cell's worst error per kind. Those results
go to ``bench/results/matrix-nway.json`` unless ``--out`` says otherwise; a single 2-machine run with the default
output layer keeps ``bench/results/matrix.json``'s format.

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
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common, synth_gguf

log = logging.getLogger("bench.matrix")


KINDS = ("first", "middle", "last")


def stage_kind(i: int, n: int) -> str:
    """``first``, ``middle`` or ``last`` for stage ``i`` of ``n`` (a single stage is ``last``: it holds the output
    slot, and its input comes from the client)."""
    return "last" if i == n - 1 else "first" if i == 0 else "middle"


def run_cell(mesh, machines: list[str], path: Path, n_ctx: int, tokens: int, pids: dict[str, int],
             output_layer: str = "auto") -> dict:
    import psutil

    from sharedllm.engine import build_llama

    cell: dict = {"model": path.name, "file_mib": path.stat().st_size / common.MiB}
    llm = build_llama(str(path), n_ctx=n_ctx, n_threads=2, use_extra_bufts=False)
    try:
        local = llm.create_completion(common.SYNTH_PROMPT, max_tokens=tokens, temperature=0)
    finally:
        llm.close()
    cell["local_text"] = local["choices"][0]["text"]
    rss0 = {m: psutil.Process(pid).memory_info().rss for m, pid in pids.items()}
    t0 = time.perf_counter()
    try:
        with mesh.load(str(path), n_ctx=n_ctx, machines=machines, verbose=True, output_layer=output_layer) as h:
            cell["load_s"] = time.perf_counter() - t0
            out = h.create_completion(common.SYNTH_PROMPT, max_tokens=tokens, temperature=0)
            rss1 = {m: psutil.Process(pid).memory_info().rss for m, pid in pids.items()}
            devices, client = common.engine_buffers(Path(h._engine.log_path).read_text(errors="replace"))
            stages = list(h.topology.stages)
            estimate = h.estimate
    except Exception as exc:  # a cell that fails is reported, the matrix goes on
        cell.update(ok=False, load_ok=False, why=f"{type(exc).__name__}: {exc}"[:500])
        return cell
    cell["mesh_text"] = out["choices"][0]["text"]
    cell["same_text"] = cell["mesh_text"] == cell["local_text"]
    if len(devices) != len(stages):
        cell.update(ok=False, load_ok=False, why=f"the engine log names {len(devices)} RPC devices for "
                                                 f"{len(stages)} stages")
        return cell
    cell["stages"] = [common.stage_report(s, b) for s, b in zip(stages, devices, strict=True)]
    for i, st in enumerate(cell["stages"]):
        st["kind"] = stage_kind(i, len(stages))
        st["rss_growth"] = rss1[st["machine"]] - rss0[st["machine"]]
    cell["output_on_client"] = estimate.output_on_client
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


def worst_by_kind(cell: dict) -> dict[str, float]:
    """The worst error (farthest from zero) of each stage kind present in ``cell``."""
    worst: dict[str, float] = {}
    for st in cell.get("stages") or []:
        k = st.get("kind")
        if k is not None and (k not in worst or abs(st["error"]) > abs(worst[k])):
            worst[k] = st["error"]
    return {k: worst[k] for k in KINDS if k in worst}


def render(cells: dict, archs: list[str], quants: list[str], markdown: bool, by_kind: bool = False) -> str:
    """The arch x quant table; ``by_kind``: each cell's worst error per stage kind (f/m/l) instead of overall."""
    def mark(c: dict | None) -> str:
        if c is None:
            return "-"
        if not c.get("load_ok"):
            return "FAIL load"
        text = "ok" if c["same_text"] else "TEXT"
        if by_kind:
            est = " ".join(f"{k[0]}{e:+.1%}" for k, e in worst_by_kind(c).items())
        else:
            est = f"{c['error']:+.1%}"
        est += "" if c["estimate_ok"] else " OVER BAR"
        return f"{'✅' if c['ok'] else '❌'} {text} {est}" if markdown else f"{text} {est}"

    rows = [["architecture", *quants]] + [[a, *(mark(cells.get(f"{a}/{q}")) for q in quants)] for a in archs]
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def run_matrix(n_machines: int, archs: list[str], quants: list[str], args, output_layer: str) -> dict:
    """Every cell on one embedded mesh of ``n_machines`` machines, spread over all of them."""
    from sharedllm.local import LocalMesh

    cells: dict[str, dict] = {}
    with LocalMesh(machines=n_machines, dashboard=False) as lm:
        mesh = lm.mesh()
        table = mesh.wait_for_machines(n_machines, timeout=180)
        machines = sorted(m["machine_id"] for m in table)
        pids = {m["machine_id"]: m["rpc"]["pid"] for m in table}
        for arch in archs:
            for quant in quants:
                path = synth_gguf.synthesize(arch, quant, args.models)
                cell = run_cell(mesh, machines, path, args.n_ctx, args.tokens, pids, output_layer)
                cells[f"{arch}/{quant}"] = cell
                kinds = " ".join(f"{k} {e:+.1%}" for k, e in worst_by_kind(cell).items())
                print(f"{n_machines}-way {output_layer:<6} {arch:<18} {quant:<7} {'ok' if cell['ok'] else 'FAIL'} "
                      f"{cell.get('error', float('nan')):+.1%} ({kinds}) {cell.get('why', '')}",
                      file=sys.stderr, flush=True)
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", action="append", choices=sorted(synth_gguf.ARCHS), help="repeatable")
    ap.add_argument("--quant", action="append", choices=list(synth_gguf.QUANTS), help="repeatable")
    ap.add_argument("--machines", type=int, nargs="+", default=[2],
                    help="machines per mesh; several counts (3 4) run the matrix once per count")
    ap.add_argument("--output-layer", nargs="+", default=["auto"], choices=("auto", "client", "mesh"),
                    help="where the output layer runs (Mesh.load's output_layer); several run the matrix once each")
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--models", default=os.path.expanduser("~/.cache/sharedllm/synth"))
    ap.add_argument("--out", help="default: bench/results/matrix.json for one 2-machine run with the default "
                                  "output layer, else bench/results/matrix-nway.json")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    if min(args.machines) < 1:
        ap.error("--machines must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    archs = args.arch or list(synth_gguf.MATRIX_ARCHS)
    quants = args.quant or list(synth_gguf.QUANTS)
    classic = args.machines == [2] and args.output_layer == ["auto"]
    if args.out is None:
        args.out = "bench/results/matrix.json" if classic else "bench/results/matrix-nway.json"

    t0 = time.perf_counter()
    runs = []
    for n in args.machines:
        for output_layer in args.output_layer:
            cells = run_matrix(n, archs, quants, args, output_layer)
            runs.append({"machines": n, "output_layer": output_layer, "cells": cells})
    all_bad = []
    for run in runs:
        cells = run["cells"]
        if not classic:
            print(f"\n{run['machines']} machines, output layer {run['output_layer']} "
                  "(worst error per stage kind: f first, m middle, l last)")
        print(render(cells, archs, quants, args.markdown, by_kind=not classic))
        bad = [k for k, c in cells.items() if not c["ok"]]
        all_bad += [f"{run['machines']}-way/{run['output_layer']}/{k}" for k in bad]
        worst = {}
        for c in cells.values():
            for k, e in worst_by_kind(c).items():
                if k not in worst or abs(e) > abs(worst[k]):
                    worst[k] = e
        run["worst_by_kind"] = {k: worst[k] for k in KINDS if k in worst}
        failing = f"; failing: {', '.join(bad)}" if bad else ""
        kinds = ", ".join(f"{k} {e:+.1%}" for k, e in run["worst_by_kind"].items())
        print(f"\n{len(cells) - len(bad)}/{len(cells)} cells green on {run['machines']} machines "
              f"(output layer {run['output_layer']}), n_ctx {args.n_ctx}, {args.tokens} greedy tokens; worst per "
              f"stage kind: {kinds}{failing}")
    print(f"\n{time.perf_counter() - t0:.0f}s in all")
    config = {**vars(args), "machines": args.machines[0]} if classic else vars(args)
    meta = {"config": config, "host": platform.node(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    body = {"cells": runs[0]["cells"], **meta} if classic else {"runs": runs, **meta}
    Path(args.out).write_text(json.dumps(body, indent=1))
    return 0 if not all_bad else 1

if __name__ == "__main__":
    sys.exit(main())
