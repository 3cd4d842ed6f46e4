# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: a real-sized model that no N-1 of N emulated machines can hold (default: Llama 3.2 3B on three).

    PYTHONPATH=. .venv/bin/python bench/bench_big.py [--models /tmp/synth-big] [--n-ctx 512] [--tokens 16]
                                                     [--share 0.42] [--markdown] [--out bench/results/big.json]
    PYTHONPATH=. .venv/bin/python bench/bench_big.py --arch llama3-8b --machines 2 --tokens 16 \
                                                     --out bench/results/big-8b.json

The model is synthetic (bench/synth_gguf.py ``--arch ARCH --scale full``, default ``llama3.2-3b``: the real model's
metadata, tensor names and shapes, random weights, quantized to Q4_K_M by llama.cpp), written once under ``--models``
and reused. Writing it takes the F32 source first (4 bytes a weight: about 13 GB for 3B, 32 GB for Llama 3.1 8B),
which is deleted once the Q4_K_M file exists.

An embedded ``LocalMesh`` starts ``--machines`` N machines (default 3), each with the worker option ``--max-memory``
set so that its usable capacity (after the placement's 10% headroom and its compute buffer) is ``--share`` of what
the model needs on the mesh (weights, KV cache for ``--n-ctx``, the last stage's extra compute), a share in
(1/N, 1/(N-1)): 3 x 0.42 holds it, 2 x 0.42 does not; 2 x 0.75 holds it, 1 x 0.75 does not. Before loading,
``Mesh.plan`` is asked for every set of N-1 machines and must refuse each one. Then:

- local llama-cpp-python (``build_llama(..., use_extra_bufts=False)``: the rpc-servers' CPU kernels) loads the model
  and streams ``--tokens`` greedy tokens: the oracle, and the local speed;
- ``Mesh.load`` on the N machines: the topology must have N stages, one per machine; the same greedy stream must
  give the same text;
- per machine: the placement's estimate for its stage (weights, KV, compute) against what llama.cpp allocated there
  (the engine's log, read as bench/bench_matrix.py does), and the rpc-server's RSS growth from before the load to
  after the generation (a lower bound: pages of the compute buffer a short generation never touches do not count);
- load time (with the engine's phases and the mesh's load progress), time to first token and decode tokens/s.

The table goes to stdout (``--markdown`` for the README); everything, failures included, to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import common, synth_gguf

log = logging.getLogger("bench.big")
ARCH, QUANT = "llama3.2-3b", "Q4_K_M"
MACHINES = 3  # the default --machines
HEADROOM = 0.10  # Mesh.load's default: the fraction of each device's free memory placement leaves alone
MiB = 1 << 20
GiB = 1 << 30


def ensure_model(models: Path, arch: str = ARCH, scale: str = "full", blocks: bool = False) -> tuple[Path, dict]:
    """The Q4_K_M file under ``models``, synthesized (F32 source, quantize, F32 deleted) unless already there;
    ``blocks``: written straight in quantized blocks by bench/synth_blocks.py (llama.cpp's per-tensor types, ggml's
    quantization of random rows; seconds instead of minutes, no F32 source)."""
    models.mkdir(parents=True, exist_ok=True)
    if blocks:
        from bench import synth_blocks

        dst = models / f"{arch}-full-{QUANT}-blocks.gguf"
        if dst.exists():
            return dst, {"reused": True, "writer": "synth_blocks"}
        t0 = time.perf_counter()
        synth_blocks.write_blocks(arch, QUANT, dst, workdir=models)
        return dst, {"reused": False, "writer": "synth_blocks", "write_s": time.perf_counter() - t0}
    dst = models / f"{arch}-{scale}-{QUANT}.gguf"  # the names synth_gguf.synthesize uses
    src = models / f"{arch}-{scale}-F32.gguf"
    if synth_gguf.current(dst):
        return dst, {"reused": True}
    f32_bytes = synth_gguf.n_params(arch, scale) * 4
    free = shutil.disk_usage(models).free
    need = f32_bytes + f32_bytes // 6 + 2 * GiB  # the F32 source, the Q4_K_M file (about 4.8 bits a weight), margin
    if not synth_gguf.current(src) and free < need:
        raise SystemExit(f"{models} has {free / GiB:.1f} GiB free; writing {arch} in F32 then {QUANT} needs about "
                         f"{need / GiB:.1f} GiB: free some space or pass --models on a larger disk")
    info: dict = {"reused": False, "disk_free_gib": free / GiB}
    t0 = time.perf_counter()
    if not synth_gguf.current(src):
        print(f"writing {src} ({f32_bytes / GiB:.1f} GiB) ...", file=sys.stderr, flush=True)
        synth_gguf.write_f32(arch, src, scale=scale)
    info["f32_s"] = time.perf_counter() - t0
    info["f32_bytes"] = src.stat().st_size
    t0 = time.perf_counter()
    print(f"quantizing to {dst} ...", file=sys.stderr, flush=True)
    synth_gguf.quantize(src, dst, QUANT)
    info["quantize_s"] = time.perf_counter() - t0
    src.unlink()  # 4 bytes a weight: the Q4_K_M file is what is kept
    return dst, info


def caps_for(estimate, share: float) -> tuple[int, int]:
    """(``--max-memory`` per machine, what the model needs on the mesh): the cap whose usable capacity after the
    placement's headroom and a compute buffer is ``share`` of the need."""
    need = estimate.device_bytes + estimate.output_compute_bytes
    cap = int((share * need + estimate.compute_bytes) / (1 - HEADROOM))
    return cap, need


def rss(pids: dict[str, int]) -> dict[str, int]:
    import psutil

    return {m: psutil.Process(pid).memory_info().rss for m, pid in pids.items()}


def run_local(path: Path, n_ctx: int, tokens: int) -> dict:
    """The oracle: local llama-cpp-python with the rpc-servers' CPU kernels; its load and decode timed."""
    from sharedllm.engine import build_llama

    t0 = time.perf_counter()
    llm = build_llama(str(path), n_ctx=n_ctx, n_threads=os.cpu_count() or 1, use_extra_bufts=False, verbose=False)
    load_s = time.perf_counter() - t0
    try:
        res = common.timed_stream(lambda: llm.create_completion(
            common.SYNTH_PROMPT, stream=True, **common.completion_kwargs(tokens)))
    finally:
        llm.close()
    return {"load_s": load_s, **res}


def default_share(machines: int) -> float:
    """A capacity share that N machines hold and N-1 do not: halfway between 1/N and 1/(N-1)."""
    return round((1 / machines + 1 / (machines - 1)) / 2, 2)


def run_mesh(mesh, path: Path, n_ctx: int, tokens: int, pids: dict[str, int], load_timeout: float) -> dict:
    """Load on every machine, stream the greedy tokens, read the buffers llama.cpp allocated per device."""
    out: dict = {"progress": []}
    t0 = time.perf_counter()
    last = [-1]
    reports: list = []  # (seconds since the load began, LoadProgress)

    def progress(p) -> None:  # a sharedllm.engine.LoadProgress: the fraction, carrying done_bytes of total_bytes
        reports.append((time.perf_counter() - t0, p))
        step = int(p * 10)
        if step > last[0]:
            last[0] = step
            out["progress"].append([round(time.perf_counter() - t0, 2), round(p, 3), p.done_bytes])
            print(f"  loading: {step * 10:3d}% ({(p.done_bytes or 0) / MiB:7.0f} of {(p.total_bytes or 0) / MiB:.0f} "
                  f"MiB) at {time.perf_counter() - t0:6.1f}s", file=sys.stderr, flush=True)

    rss0 = rss(pids)
    try:
        with mesh.load(str(path), n_ctx=n_ctx, machines=list(pids), verbose=True, on_progress=progress,
                       load_timeout=load_timeout, token_timeout=300.0) as h:
            out["load_s"] = time.perf_counter() - t0
            out["phases"] = {k: round(v, 3) for k, v in (h._engine.info.get("phases") or {}).items()}
            out["topology"] = str(h.topology)
            print(f"loaded in {out['load_s']:.1f}s\n{h.topology}", file=sys.stderr, flush=True)
            out.update(common.timed_stream(lambda: h.create_completion(
                common.SYNTH_PROMPT, stream=True, **common.completion_kwargs(tokens))))
            rss1 = rss(pids)
            devices, client = common.engine_buffers(Path(h._engine.log_path).read_text(errors="replace"))
            stages = list(h.topology.stages)
            estimate = h.estimate
    except Exception as exc:  # reported, not raised: the JSON records what happened
        out.update(load_ok=False, why=f"{type(exc).__name__}: {exc}"[:2000],
                   after_s=time.perf_counter() - t0)
        return out
    out["load_ok"] = True
    out["progress_bytes"] = {**common.progress_summary(reports),
                             "last_bytes": reports[-1][1].done_bytes if reports else None}
    out["n_stages"] = len(stages)
    out["stage_machines"] = [s.machine_id for s in stages]
    out["n_way"] = len(stages) == len(pids) and len(set(out["stage_machines"])) == len(pids)
    out["output_on_client"] = estimate.output_on_client
    out["estimate"] = {"device_bytes": estimate.device_bytes, "compute_bytes": estimate.compute_bytes,
                       "output_compute_bytes": estimate.output_compute_bytes, "input_bytes": estimate.input_bytes}
    if len(devices) != len(stages):
        out["stages"] = []
        out["why"] = f"the engine log names {len(devices)} RPC devices for {len(stages)} stages"
        return out
    out["stages"] = [common.stage_report(s, b) for s, b in zip(stages, devices, strict=True)]
    for st in out["stages"]:
        st["rss_growth"] = rss1[st["machine"]] - rss0[st["machine"]]
    client_weights = sum(v for k, v in client.items() if k.startswith("model:"))
    out["client"] = {"buffers": client, "estimated_weights": estimate.input_bytes,
                     "weights_error": estimate.input_bytes / client_weights - 1 if client_weights else None}
    out["estimate_ok"] = all(s["ok"] for s in out["stages"])
    return out


def render(result: dict, markdown: bool) -> str:
    """The per-machine table and a summary."""
    mesh = result.get("mesh") or {}
    caps = result.get("caps") or {}
    head = ["machine", "layers", "cap MiB", "est weights", "est KV", "est compute", "est total", "alloc weights",
            "alloc KV", "alloc compute", "alloc total", "est/alloc-1", "RSS growth"]
    rows = []
    for st in mesh.get("stages") or []:
        e, m = st["estimated"], st["measured"]
        rows.append([st["machine"], st["layers"], f"{caps.get('cap_bytes', 0) / MiB:.0f}",
                     *(f"{e[k] / MiB:.1f}" for k in ("weights", "kv", "compute")), f"{sum(e.values()) / MiB:.1f}",
                     *(f"{m[k] / MiB:.1f}" for k in ("weights", "kv", "compute")), f"{sum(m.values()) / MiB:.1f}",
                     f"{st['error']:+.1%}" + ("" if st["ok"] else " OVER BAR"), f"{st['rss_growth'] / MiB:.1f}"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        table = [head, *rows]
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in table]
    if not rows:
        lines.append("(no per-machine figures: " + (mesh.get("why") or "the mesh run did not happen") + ")")
    local = result.get("local") or {}
    model = result.get("model") or {}
    synth = model.get("synth") or {}
    made = "reused" if synth.get("reused") else (
        f"written in quantized blocks by synth_blocks in {synth.get('write_s', 0):.0f}s"
        if synth.get("writer") == "synth_blocks" else
        f"synthesized: F32 {synth.get('f32_s', 0):.0f}s, quantize {synth.get('quantize_s', 0):.0f}s")
    n = result["config"]["machines"]
    summary = [
        f"model: {model.get('name')} ({model.get('file_mib', 0):.0f} MiB, {made}), n_ctx {result['config']['n_ctx']}",
        f"caps: --max-memory {caps.get('cap_bytes', 0) / MiB:.0f} MiB per machine; the mesh needs "
        f"{caps.get('need_bytes', 0) / MiB:.0f} MiB + a compute buffer per machine; sets of {n - 1} machine(s) "
        f"refused by the placement: {caps.get('smaller_refused', '?')}/{n}",
    ]
    if mesh.get("load_ok"):
        ph = mesh.get("phases") or {}
        pb = mesh.get("progress_bytes") or {}
        summary += [
            f"topology: {mesh['n_stages']} stages on {', '.join(mesh['stage_machines'])} "
            f"({f'{n}-way split' if mesh['n_way'] else f'NOT a {n}-way split'}), output layer on the "
            f"{'client' if mesh['output_on_client'] else 'mesh'}",
            f"load: mesh {mesh['load_s']:.1f}s (weights {ph.get('weights', 0):.1f}s, "
            f"context {ph.get('context', 0):.1f}s), local {local.get('load_s', 0):.1f}s",
            f"load progress: {pb.get('reports')} reports in bytes, "
            f"{'never decreasing' if pb.get('monotone') else 'NOT MONOTONE'}, the last "
            f"{(pb.get('last_bytes') or 0) / MiB:.0f} MiB of {'/'.join(str(t) for t in pb.get('total_bytes', []))} "
            f"bytes; every 10%: " + ", ".join(f"{f:.0%} at {t:.1f}s" for t, f, *_ in mesh["progress"]),
            f"decode: mesh {_tps(mesh)} tok/s (first token {_ms(mesh)}), local {_tps(local)} tok/s (first token "
            f"{_ms(local)}), {mesh.get('tokens')} tokens",
            f"client (the engine): weights {_client_weights(mesh) / MiB:.1f} MiB allocated, "
            f"{mesh['estimate']['input_bytes'] / MiB:.1f} MiB estimated",
            "host load (1-min average, 2 cores): " + ", ".join(
                f"{k.replace('_', ' ')} {v:.1f}" for k, v in (result.get("loadavg") or {}).items()),
            f"greedy text: {'equal' if result.get('same_text') else 'DIFFERENT'} to local "
            f"({mesh.get('text', '')!r})",
        ]
    elif mesh:
        summary.append(f"mesh load FAILED after {mesh.get('after_s', 0):.0f}s: {mesh.get('why')}")
    if rows:
        lines.append("(sizes in MiB; est/alloc-1 within [0, +15%] passes, as in bench/bench_matrix.py)")
    sep = "\n\n" if markdown else "\n"
    return "\n".join(lines) + sep + ("\n".join(f"- {s}" for s in summary) if markdown else "\n".join(summary))


def _client_weights(mesh: dict) -> int:
    return sum(v for k, v in (mesh.get("client") or {}).get("buffers", {}).items() if k.startswith("model:"))


def _tps(r: dict) -> str:
    return f"{r['decode_tps']:.2f}" if r.get("decode_tps") else "-"


def _ms(r: dict) -> str:
    return f"{r['ttft_ms']:.0f} ms" if r.get("ttft_ms") is not None else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="/tmp/synth-big", help="where the synthetic model is written and reused")
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--machines", type=int, default=MACHINES, help="machines in the mesh, at least 2 (default 3)")
    ap.add_argument("--share", type=float, default=None,
                    help="each machine's usable capacity as a fraction of the model's need on the mesh, in "
                         "(1/N, 1/(N-1)): N machines hold it, N-1 do not (default: halfway, 0.42 for 3, 0.75 for 2)")
    ap.add_argument("--load-timeout", type=float, default=1200.0)
    ap.add_argument("--arch", default=ARCH, choices=sorted(synth_gguf.ARCHS),
                    help=f"the synthetic architecture (default {ARCH}; llama3-8b: Llama 3.1 8B, about 4.6 GiB)")
    # A quick check of this script itself: --arch llama3-70b --scale tiny (8 small layers, seconds to write).
    ap.add_argument("--scale", default="full", choices=("tiny", "full"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None,
                    help="JSON results (default bench/results/big.json; big-ARCH-Nm.json for another arch or N)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--blocks", action="store_true",
                    help="write the model with bench/synth_blocks.py (straight in quantized blocks) if it is missing")
    args = ap.parse_args(argv)
    if args.machines < 2:
        ap.error(f"--machines must be at least 2 for a forced split, got {args.machines}")
    n = args.machines
    args.share = default_share(n) if args.share is None else args.share
    if not 1 / n < args.share < 1 / (n - 1):
        ap.error(f"--share must be in (1/{n}, 1/{n - 1}) for a forced {n}-way split, got {args.share}")
    if args.out is None:
        default = args.arch == ARCH and n == MACHINES and args.scale == "full"
        args.out = "bench/results/big.json" if default else f"bench/results/big-{args.arch}-{n}m.json"
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    from sharedllm.errors import MeshError, ModelTooLarge
    from sharedllm.gguf import estimate_memory, read_gguf, ties_embeddings
    from sharedllm.local import LocalMesh

    t_start = time.perf_counter()
    result: dict = {"config": vars(args), "host": platform.node(), "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    out_path = Path(args.out)

    def save() -> None:
        result["total_s"] = time.perf_counter() - t_start
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    path, synth = ensure_model(Path(args.models), args.arch, args.scale, blocks=args.blocks)
    parsed = read_gguf(path)
    result["model"] = {"name": path.name, "file_mib": path.stat().st_size / MiB, "synth": synth,
                       "n_layer": parsed.n_layer, "tied": ties_embeddings(parsed)}
    # What Mesh.load estimates on a CPU-only mesh: a tied model's output layer stays on the client (output_layer auto).
    estimate = estimate_memory(parsed, args.n_ctx, output_on_client=ties_embeddings(parsed))
    cap, need = caps_for(estimate, args.share)
    result["caps"] = {"cap_bytes": cap, "need_bytes": need, "compute_bytes": estimate.compute_bytes,
                      "share": args.share, "headroom": HEADROOM}
    print(f"{path.name}: {path.stat().st_size / MiB:.0f} MiB; mesh needs {need / MiB:.0f} MiB + "
          f"{estimate.compute_bytes / MiB:.0f} MiB compute per machine; --max-memory {cap / MiB:.0f} MiB each",
          file=sys.stderr, flush=True)
    save()

    # Other work on this host slows both runs alike only if it stays the same: the 1-minute load average, recorded.
    result["loadavg"] = {"before_local": os.getloadavg()[0]}
    result["local"] = run_local(path, args.n_ctx, args.tokens)
    result["loadavg"]["after_local"] = os.getloadavg()[0]
    print(f"local: load {result['local']['load_s']:.1f}s, {_tps(result['local'])} tok/s "
          f"{result['local']['text']!r}", file=sys.stderr, flush=True)
    save()

    machines = [f"machine-{i + 1}" for i in range(n)]
    with LocalMesh(machines=0, dashboard=False) as lm:
        for m in machines:
            # Each machine's tensor cache in the mesh's temporary directory: a cold load, and nothing left behind.
            lm.add_machine(m, worker_args=["--max-memory", str(cap), "--cache-dir", str(lm.workdir / f"cache-{m}")])
        mesh = lm.mesh()
        table = mesh.wait_for_machines(n, timeout=180)
        pids = {m["machine_id"]: m["rpc"]["pid"] for m in sorted(table, key=lambda m: machines.index(m["machine_id"]))}
        refused = []
        for names in itertools.combinations(machines, n - 1):
            names = list(names)
            try:
                topo = mesh.plan(str(path), args.n_ctx, machines=names)
                log.warning("the placement fits the model on %s alone: %s", names, topo)
            except ModelTooLarge as exc:
                refused.append({"machines": names, "why": str(exc)[:300]})
            except MeshError as exc:  # refused for another reason: not the check this is
                log.warning("planning on %s failed: %s: %s", names, type(exc).__name__, exc)
        result["caps"]["smaller_refused"] = len(refused)
        result["caps"]["refusals"] = refused
        save()
        result["mesh"] = run_mesh(mesh, path, args.n_ctx, args.tokens, pids, args.load_timeout)
        result["loadavg"]["after_mesh"] = os.getloadavg()[0]
    mesh_r = result["mesh"]
    result["same_text"] = mesh_r.get("load_ok", False) and mesh_r.get("text") == result["local"]["text"]
    result["ok"] = bool(result["same_text"] and mesh_r.get("n_way") and mesh_r.get("estimate_ok")
                        and result["caps"]["smaller_refused"] == n
                        and (mesh_r.get("progress_bytes") or {}).get("monotone"))
    save()
    print(render(result, args.markdown))
    print(f"\n{'OK' if result['ok'] else 'NOT OK'} in {result['total_s']:.0f}s; raw figures in {out_path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
