# SPDX-License-Identifier: AGPL-3.0-or-later
"""Benchmark: decode speed through the relay tunnel (TLS + lease token) against direct llama.cpp RPC on loopback.

    .venv/bin/python bench/bench_tunnel.py [--tokens 128] [--repeats 5] [--out bench/results/tunnel.json]

Two rpc-servers on loopback (2 threads each) hold Gemma 3 270M Q4_K_M split ``--split`` (10:9). Each server has a
:class:`sharedllm.relay.ServerRelay` in front of it, in its own process (``python -m sharedllm.relay server``), as on
a real machine. Setups, each a fresh process that loads the model and streams ``--tokens`` greedy tokens:

- ``direct``: llama.cpp connects to the rpc-servers themselves (what ``--insecure-direct-rpc`` does).
- ``tunnel``: the llama process runs one :class:`~sharedllm.relay.ClientRelay` per server in threads (as the engine
  will) and llama.cpp connects to those: TLS 1.2+/1.3 with a pinned certificate and a lease token.
- ``tunnel (relay procs)``: the client relays run as their own processes (``python -m sharedllm.relay client``).
- ``tunnel via hub``: as ``tunnel``, to machines behind NAT: a second server relay per server listens on no port and
  registers at a relay hub (``python -m sharedllm.relay hub``, its own process); the client relays reach them through
  the hub (one more hop and two more socket copies per message; TLS still end to end). Its cost against ``tunnel``
  is the hub's cost.

Repeats are interleaved and medians reported. A micro-benchmark on the same servers then times one small RPC round
trip (``DEVICE_COUNT``) and one 1 MiB ``GET_TENSOR`` (the size of Gemma's logits, fetched every token) through each
path, which says where the tunnel's time goes. The table goes to stdout, the numbers to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import statistics
import struct
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

# Shared helpers: one way to time a stream and to watch the CPU.
from bench import common
from sharedllm import relay

logger = logging.getLogger("bench_tunnel")

DIRECT, TUNNEL, TUNNEL_PROCS, TUNNEL_HUB = "direct", "tunnel", "tunnel (relay procs)", "tunnel via hub"
SETUPS = (DIRECT, TUNNEL, TUNNEL_PROCS, TUNNEL_HUB)
TARGET_RATIO = 0.90
RESULT_PREFIX = "BENCH_TUNNEL_RESULT "
LEASE = "bench-lease"

# RPC protocol pieces for the micro-benchmark (ggml-rpc.cpp, protocol 7.x): commands and the packed rpc_tensor.
CMD_ALLOC_BUFFER, CMD_BUFFER_GET_BASE, CMD_GET_TENSOR, CMD_HELLO, CMD_DEVICE_COUNT = 0, 3, 8, 14, 15
RPC_TENSOR = struct.Struct("<QIQ4I4II16iI10QQQQ64sI")  # id type buffer ne nb op op_params flags src view data name use
GGML_TYPE_F32 = 0


# --- the llama process (direct or through in-process client relays) ---------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Open the relays (if any), register the servers, load the model with the split, stream one completion."""
    from sharedllm import ggml
    from sharedllm.engine import build_llama

    relays = []
    try:
        endpoints = spec["endpoints"]
        if spec.get("relays"):
            for r in spec["relays"]:
                cr = relay.ClientRelay(r["remote"], r["token"], fingerprint=r["fingerprint"], hub=r.get("hub")).start()
                check(cr)  # llama.cpp aborts on a failed connection: prove the token first
                relays.append(cr)
            endpoints = [cr.endpoint for cr in relays]
        t0 = time.perf_counter()
        devices = [ggml.add_server(ep)[0][1] for ep in endpoints]
        llm = build_llama(spec["model_path"], devices=devices, use_extra_bufts=False, n_ctx=spec["n_ctx"],
                          n_gpu_layers=-1, tensor_split=spec["tensor_split"], verbose=False)
        load_s = time.perf_counter() - t0
        def stream() -> Iterator[dict]:
            # A run that crawls (another session took the CPU) is cut short and retried: no use waiting a minute.
            deadline = time.perf_counter() + spec.get("max_s", 1e9)
            for chunk in llm.create_completion(common.PROMPT, stream=True, **common.completion_kwargs(spec["tokens"])):
                yield chunk
                if time.perf_counter() > deadline:
                    return

        try:
            res = common.timed_stream(stream)
        finally:
            llm.close()
        res["load_s"] = load_s
        return res
    finally:
        for cr in relays:
            cr.stop()


def check(cr: relay.ClientRelay, timeout: float = 20.0) -> dict[str, str]:
    """``cr.check()``, waiting for a machine behind NAT to be registered at its hub (it registers in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return cr.check()
        except relay.RelayError as exc:
            if "not connected to this hub" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def run_child(spec: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """Run :func:`child` in a fresh interpreter (llama.cpp aborts its process when a connection fails)."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
                              stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, timeout=timeout, text=True)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child exited with status {proc.returncode}: {stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# --- the rig: rpc-servers, server relays, client relay processes ---------------------------------------------------


class Rig:
    """Every process of the benchmark, stopped on exit whatever happens."""

    def __init__(self, workdir: str):
        self.workdir = Path(workdir)
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log_name: str, ready_prefix: str | None = None, timeout: float = 60.0,
              env: dict[str, str] | None = None) -> tuple[subprocess.Popen, dict[str, Any] | None]:
        log = open(self.workdir / log_name, "wb")  # the child keeps its own descriptor
        proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE if ready_prefix else log,
                                stderr=log, env=env)
        log.close()
        self.procs.append(proc)
        if ready_prefix is None:
            return proc, None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"{' '.join(args[:4])} exited; see {self.workdir / log_name}")
            if line.startswith(ready_prefix):
                return proc, json.loads(line[len(ready_prefix):])
        raise RuntimeError(f"{' '.join(args[:4])} did not start in {timeout:.0f}s")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self.procs.clear()


def wait_hello(endpoint: str, timeout: float = 60.0) -> None:
    from sharedllm.ggml import rpc_hello

    deadline = time.monotonic() + timeout
    while True:
        try:
            rpc_hello(endpoint, timeout=2.0)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def mesh(args: argparse.Namespace, workdir: str) -> Iterator[dict[str, Any]]:
    """Start the rpc-servers, their server relays and the client relay processes; yield what the setups need."""
    from sharedllm.rpc_server import free_port

    rig = Rig(workdir)
    rpc_env = dict(os.environ)
    for a in args.rpc_env:
        key, sep, value = a.partition("=")
        if not sep or not key:
            raise ValueError(f"--rpc-env wants KEY=VALUE, got {a!r}")
        rpc_env[key] = value
    try:
        from sharedllm.relay.hub import hub_client_key, hub_machine_key

        master, hub_key = os.urandom(32), os.urandom(32)
        (Path(workdir) / "hub.key").write_text(hub_key.hex())
        _, hub_info = rig.spawn([sys.executable, "-m", "sharedllm.relay", "hub", "--listen", "127.0.0.1:0",
                                 "--key-file", str(Path(workdir) / "hub.key"), "--parent-pid", str(os.getpid())],
                                "hub.log", relay.READY_PREFIX)
        servers = []
        for i in range(args.servers):
            machine = f"bench-machine-{i + 1}"
            port = free_port("127.0.0.1")
            endpoint = f"127.0.0.1:{port}"
            rig.spawn(["stdbuf", "-oL", sys.executable, "-m", "sharedllm.rpc_server", "--host", "127.0.0.1",
                       "--port", str(port), "--threads", str(args.rpc_threads)], f"rpc-server-{i + 1}.log",
                      env=rpc_env)
            wait_hello(endpoint)
            cert, key, _ca = relay.make_self_signed(Path(workdir) / machine)
            mkey = relay.machine_key(master, machine)
            key_file = Path(workdir) / machine / "relay.key"
            key_file.write_text(mkey.hex())
            _, info = rig.spawn([sys.executable, "-m", "sharedllm.relay", "server", "--listen", "127.0.0.1:0",
                                 "--target", endpoint, "--cert", cert, "--key", key, "--machine-id", machine,
                                 "--key-file", str(key_file), "--lease", LEASE, "--parent-pid", str(os.getpid())],
                                f"relay-server-{i + 1}.log", relay.READY_PREFIX)
            token = relay.mint_token(mkey, LEASE, machine, ttl=24 * 3600)
            token_file = Path(workdir) / machine / "token"
            token_file.write_text(token)
            _, cinfo = rig.spawn([sys.executable, "-m", "sharedllm.relay", "client", "--remote", info["endpoint"],
                                  "--token-file", str(token_file), "--fingerprint", info["fingerprint"],
                                  "--parent-pid", str(os.getpid())],
                                 f"relay-client-{i + 1}.log", relay.READY_PREFIX)
            # The same machine behind NAT: a relay that listens on no port, registered at the hub.
            cred_file = Path(workdir) / machine / "hub-credential"
            cred_file.write_text(hub_machine_key(hub_key, machine).hex())
            _, ninfo = rig.spawn([sys.executable, "-m", "sharedllm.relay", "server", "--listen", "127.0.0.1:0",
                                  "--target", endpoint, "--cert", cert, "--key", key, "--machine-id", machine,
                                  "--key-file", str(key_file), "--lease", LEASE, "--parent-pid", str(os.getpid()),
                                  "--hub", hub_info["endpoint"], "--hub-key-file", str(cred_file), "--no-inbound"],
                                 f"relay-nat-{i + 1}.log", relay.READY_PREFIX)
            hub = {"endpoint": hub_info["endpoint"], "machine": machine,
                   "token": relay.mint_token(hub_client_key(hub_key), LEASE, machine, ttl=24 * 3600)}
            servers.append({"machine": machine, "endpoint": endpoint, "relay": info["endpoint"],
                            "fingerprint": info["fingerprint"], "token": token, "client_proc": cinfo["endpoint"],
                            "nat_relay": ninfo["endpoint"], "hub": hub})
        yield {"servers": servers, "rig": rig}
    finally:
        rig.close()


# --- micro-benchmark: one round trip, one 1 MiB tensor ---------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("rpc-server closed the connection")
        got += k
    return bytes(buf)


def _call(sock: socket.socket, cmd: int, payload: bytes) -> bytes:
    # llama.cpp sends the command byte, the size and the payload as three writes: do the same.
    sock.sendall(bytes([cmd]))
    sock.sendall(struct.pack("<Q", len(payload)))
    if payload:
        sock.sendall(payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    return _recv_exact(sock, size)


def rpc_micro(endpoint: str, pings: int, gets: int, get_bytes: int = 1 << 20) -> dict[str, float]:
    """Median (and p90) time of a ``DEVICE_COUNT`` round trip and of a ``get_bytes`` ``GET_TENSOR`` at ``endpoint``."""
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _call(s, CMD_HELLO, bytes(24))
        rtt = []
        for _ in range(pings):
            t0 = time.perf_counter()
            _call(s, CMD_DEVICE_COUNT, b"")
            rtt.append(time.perf_counter() - t0)
        remote_ptr, _size = struct.unpack("<QQ", _call(s, CMD_ALLOC_BUFFER, struct.pack("<IQ", 0, get_bytes)))
        (base,) = struct.unpack("<Q", _call(s, CMD_BUFFER_GET_BASE, struct.pack("<Q", remote_ptr)))
        n = get_bytes // 4
        tensor = RPC_TENSOR.pack(1, GGML_TYPE_F32, remote_ptr, n, 1, 1, 1, 4, 4 * n, 4 * n, 4 * n, 0, *([0] * 16), 0,
                                 *([0] * 10), 0, 0, base, b"bench", 0)
        req = tensor + struct.pack("<QQ", 0, get_bytes)
        big = []
        for _ in range(gets):
            t0 = time.perf_counter()
            if len(_call(s, CMD_GET_TENSOR, req)) != get_bytes:
                raise RuntimeError("GET_TENSOR returned a short answer")
            big.append(time.perf_counter() - t0)
    rtt.sort()
    big.sort()
    return {"rtt_p50_us": rtt[len(rtt) // 2] * 1e6, "rtt_p90_us": rtt[len(rtt) * 9 // 10] * 1e6,
            "get_1mib_p50_ms": big[len(big) // 2] * 1e3}


def micro(servers: list[dict[str, Any]], rounds: int, pings: int, gets: int) -> dict[str, Any]:
    """Interleaved micro-benchmark of direct, in-process client relay, client relay process, on the first server."""
    s = servers[0]
    out: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    cr = relay.ClientRelay(s["relay"], s["token"], fingerprint=s["fingerprint"]).start()
    hr = relay.ClientRelay(s["nat_relay"], s["token"], fingerprint=s["fingerprint"], hub=s["hub"]).start()
    try:
        tls = cr.check()
        check(hr)
        for _ in range(rounds):
            for name, ep in ((DIRECT, s["endpoint"]), (TUNNEL, cr.endpoint), (TUNNEL_PROCS, s["client_proc"]),
                             (TUNNEL_HUB, hr.endpoint)):
                out[name].append(rpc_micro(ep, pings, gets))
    finally:
        cr.stop()
        hr.stop()
    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in out.items()}
    return {"runs": out, "median": med, "tls": tls,
            "note": "tunnel: client relay in the measuring process's threads; relay procs: its own process"}


# --- main ------------------------------------------------------------------------------------------------------------


def medians(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("decode_tps", "decode_tps_p50gap", "gap_p50_ms", "ttft_ms", "load_s", "tokens"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(vals) if vals else None
    foreign = [r["cpu"]["foreign_pct"] for r in runs if "cpu" in r]
    out["foreign_cpu_pct"] = statistics.median(foreign) if foreign else None
    return out


def quiet_ratios(runs: dict[str, list[dict[str, Any]]], name: str, max_foreign: float) -> list[float]:
    """``name``/direct decode ratios of the repeats in which neither run shared the CPU with others (paired)."""
    out = []
    for t, d in zip(runs[name], runs[DIRECT], strict=True):
        if (t["decode_tps"] and d["decode_tps"] and not t.get("noisy") and not d.get("noisy")
                and t["cpu"]["foreign_pct"] <= max_foreign and d["cpu"]["foreign_pct"] <= max_foreign):
            out.append(t["decode_tps"] / d["decode_tps"])
    return out


def _median(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from sharedllm import models

    model_path = str(models.default_model_path())
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SETUPS}
    partial = Path(args.out).with_suffix(".partial.json")  # the runs so far, in case the benchmark is interrupted
    partial.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-tunnel-") as workdir, mesh(args, workdir) as m:
        servers = m["servers"]
        base = {"model_path": model_path, "tensor_split": args.split, "n_ctx": common.N_CTX, "tokens": args.tokens,
                "max_s": args.run_limit}
        specs = {
            DIRECT: {**base, "endpoints": [s["endpoint"] for s in servers]},
            TUNNEL: {**base, "endpoints": [], "relays": [
                {"remote": s["relay"], "token": s["token"], "fingerprint": s["fingerprint"]} for s in servers]},
            TUNNEL_PROCS: {**base, "endpoints": [s["client_proc"] for s in servers]},
            TUNNEL_HUB: {**base, "endpoints": [], "relays": [
                {"remote": s["nat_relay"], "token": s["token"], "fingerprint": s["fingerprint"], "hub": s["hub"]}
                for s in servers]},
        }
        logger.info("warm-up (not counted): one direct, one tunnel, one hub run of %d tokens", min(args.tokens, 8))
        for name in (DIRECT, TUNNEL, TUNNEL_HUB):
            run_child({**specs[name], "tokens": min(args.tokens, 8)})
        for r in range(args.repeats):
            order = SETUPS if r % 2 == 0 else tuple(reversed(SETUPS))  # no setup always runs first
            for name in order:
                discarded: list[dict[str, Any]] = []
                while True:
                    waited = common.wait_for_quiet(args.quiet_wait) if args.quiet_wait > 0 else 0.0
                    meter = common.CpuMeter()
                    res = run_child(specs[name])
                    res["cpu"] = meter.stop()
                    res["noisy"] = res["cpu"]["foreign_pct"] > args.max_foreign or res["tokens"] < args.tokens
                    if not res["noisy"] or len(discarded) >= args.retries:
                        break
                    logger.info("repeat %d/%d %-20s %.1f tok/s, %d tokens: discarded, other processes took %.0f%% "
                                "of the CPU", r + 1, args.repeats, name, res["decode_tps"] or 0, res["tokens"],
                                res["cpu"]["foreign_pct"])
                    discarded.append({k: res[k] for k in ("decode_tps", "decode_tps_p50gap", "tokens", "cpu")})
                res["repeat"] = r
                res["waited_for_quiet_s"] = waited
                res["discarded_noisy_attempts"] = discarded
                runs[name].append(res)
                partial.write_text(json.dumps({"config": vars(args), "runs": runs}, indent=1) + "\n")
                logger.info("repeat %d/%d %-20s %.1f tok/s (%.1f by median gap), load %.2f s, others took %.0f%% "
                            "of the CPU", r + 1, args.repeats, name, res["decode_tps"] or 0,
                            res["decode_tps_p50gap"] or 0, res["load_s"], res["cpu"]["foreign_pct"])
        logger.info("micro-benchmark: %d rounds of %d round trips and %d 1 MiB tensors per path", args.micro_rounds,
                    args.pings, args.gets)
        mic = micro(servers, args.micro_rounds, args.pings, args.gets)
    partial.unlink(missing_ok=True)
    total_s = time.perf_counter() - t_start

    summary = {name: {"runs": runs[name], "median": medians(runs[name])} for name in SETUPS}

    def ratio(a: str, key: str = "decode_tps") -> float | None:
        x, y = summary[a]["median"][key], summary[DIRECT]["median"][key]
        return x / y if x and y else None

    per_repeat = {name: [t["decode_tps"] / d["decode_tps"] if t["decode_tps"] and d["decode_tps"] else None
                         for t, d in zip(runs[name], runs[DIRECT], strict=True)]
                  for name in (TUNNEL, TUNNEL_PROCS, TUNNEL_HUB)}
    hub_vs_tunnel = [h["decode_tps"] / t["decode_tps"] if h["decode_tps"] and t["decode_tps"] else None
                     for h, t in zip(runs[TUNNEL_HUB], runs[TUNNEL], strict=True)]
    texts = {r["text"] for name in SETUPS for r in runs[name]}
    d_tps, t_tps = summary[DIRECT]["median"]["decode_tps"], summary[TUNNEL]["median"]["decode_tps"]
    added_ms = (1000 / t_tps - 1000 / d_tps) if d_tps and t_tps else None
    mm = mic["median"]
    rtt_added = mm[TUNNEL]["rtt_p50_us"] - mm[DIRECT]["rtt_p50_us"]
    get_added = mm[TUNNEL]["get_1mib_p50_ms"] - mm[DIRECT]["get_1mib_p50_ms"]
    return {
        "machine": common.machine_info(),
        "config": {"tokens": args.tokens, "repeats": args.repeats, "servers": args.servers, "split": args.split,
                   "rpc_threads": args.rpc_threads, "n_ctx": common.N_CTX, "model": model_path, "prompt": common.PROMPT,
                   "completion_kwargs": common.completion_kwargs(args.tokens), "quiet_wait_s": args.quiet_wait,
                   "max_foreign_pct": args.max_foreign, "retries": args.retries, "rpc_env": args.rpc_env,
                   "run_limit_s": args.run_limit},
        "setups": summary,
        "ratios": {
            "tunnel/direct decode": ratio(TUNNEL),
            "tunnel/direct decode per repeat": per_repeat[TUNNEL],
            "tunnel/direct decode, median of per-repeat ratios": _median(per_repeat[TUNNEL]),
            "tunnel/direct decode, quiet repeats": quiet_ratios(runs, TUNNEL, args.max_foreign),
            "tunnel/direct decode by median gap": ratio(TUNNEL, "decode_tps_p50gap"),
            "relay procs/direct decode": ratio(TUNNEL_PROCS),
            "relay procs/direct decode per repeat": per_repeat[TUNNEL_PROCS],
            "relay procs/direct decode, median of per-repeat ratios": _median(per_repeat[TUNNEL_PROCS]),
            "relay procs/direct decode, quiet repeats": quiet_ratios(runs, TUNNEL_PROCS, args.max_foreign),
            "relay procs/direct decode by median gap": ratio(TUNNEL_PROCS, "decode_tps_p50gap"),
            "hub/direct decode": ratio(TUNNEL_HUB),
            "hub/direct decode per repeat": per_repeat[TUNNEL_HUB],
            "hub/tunnel decode per repeat": hub_vs_tunnel,
            "hub/tunnel decode, median of per-repeat ratios": _median(hub_vs_tunnel),
            "target": TARGET_RATIO,
        },
        "where_the_time_goes": {
            "ms_added_per_token": added_ms,
            "us_added_per_round_trip": rtt_added,
            "ms_added_per_1mib_tensor": get_added,
            "round_trips_worth_per_token": (added_ms * 1000 - get_added * 1000) / rtt_added
            if added_ms is not None and rtt_added > 0 else None,
        },
        "micro": mic,
        "texts_match": len(texts) == 1,
        "text": sorted(texts)[0] if texts else "",
        "total_seconds": total_s,
    }


def _ratio_list(values: list[float]) -> str:
    if not values:
        return "none"
    return f"median {statistics.median(values):.3f} of {len(values)} (" + ", ".join(f"{v:.2f}" for v in values) + ")"


def report(result: dict[str, Any], markdown: bool) -> str:
    cfg, m, ratios = result["config"], result["machine"], result["ratios"]
    summary = result["setups"]
    d_tps = summary[DIRECT]["median"]["decode_tps"]
    rows = [["setup", "decode tok/s", "(min-max)", "by median gap", "TTFT ms", "load s", "vs direct", "others' CPU"]]
    for name in SETUPS:
        runs, med = summary[name]["runs"], summary[name]["median"]
        tps = [r["decode_tps"] for r in runs if r.get("decode_tps")]
        rows.append([name, common.fmt(med["decode_tps"], 1), f"{min(tps):.1f}-{max(tps):.1f}" if tps else "-",
                     common.fmt(med["decode_tps_p50gap"], 1), common.fmt(med["ttft_ms"], 0),
                     common.fmt(med["load_s"], 2),
                     f"{med['decode_tps'] / d_tps:.3f}x" if med["decode_tps"] and d_tps else "-",
                     common.fmt(med["foreign_cpu_pct"], 0) + "%"])
    mic = result["micro"]["median"]
    mrows = [["path (first server)", "round trip p50 us", "p90 us", "1 MiB GET_TENSOR ms"]]
    for name in SETUPS:
        mrows.append([name, common.fmt(mic[name]["rtt_p50_us"], 0), common.fmt(mic[name]["rtt_p90_us"], 0),
                      common.fmt(mic[name]["get_1mib_p50_ms"], 2)])
    r = ratios["tunnel/direct decode"]
    verdict = "meets" if r is not None and r >= TARGET_RATIO else "BELOW"
    w = result["where_the_time_goes"]
    tls = result["micro"]["tls"]
    lines = [
        f"Gemma 3 270M Q4_K_M, n_ctx {cfg['n_ctx']}, {cfg['tokens']} greedy tokens, median of {cfg['repeats']} "
        f"interleaved repeats, {cfg['servers']} loopback rpc-servers x {cfg['rpc_threads']} threads "
        f"(tensor_split {cfg['split']}), {m['cpu_count']} CPUs, {tls['tls']} {tls['cipher']}",
        "",
        common.render(rows, markdown),
        "",
        common.render(mrows, markdown),
        "",
        f"tunnel/direct decode tok/s: {common.fmt(r, 3)} ({verdict} the {TARGET_RATIO} bar; per repeat "
        + ", ".join(common.fmt(x, 2) for x in ratios["tunnel/direct decode per repeat"]) + ", median "
        + common.fmt(ratios["tunnel/direct decode, median of per-repeat ratios"], 3) + "); by median gap "
        + common.fmt(ratios["tunnel/direct decode by median gap"], 3),
        "through the hub (machines behind NAT) / tunnel decode tok/s: median of per-repeat ratios "
        + common.fmt(ratios["hub/tunnel decode, median of per-repeat ratios"], 3) + " (per repeat "
        + ", ".join(common.fmt(x, 2) for x in ratios["hub/tunnel decode per repeat"]) + "); hub/direct "
        + common.fmt(ratios["hub/direct decode"], 3) + "; a round trip through the hub costs "
        + common.fmt(mic[TUNNEL_HUB]["rtt_p50_us"] - mic[TUNNEL]["rtt_p50_us"], 0) + " us more than the tunnel's",
        f"relay procs/direct decode tok/s: {common.fmt(ratios['relay procs/direct decode'], 3)} (per repeat "
        + ", ".join(common.fmt(x, 2) for x in ratios["relay procs/direct decode per repeat"]) + ", median "
        + common.fmt(ratios["relay procs/direct decode, median of per-repeat ratios"], 3) + ")",
        f"repeats where neither run shared the CPU (others <= {cfg['max_foreign_pct']:g}%): tunnel/direct "
        + _ratio_list(ratios["tunnel/direct decode, quiet repeats"]) + "; relay procs/direct "
        + _ratio_list(ratios["relay procs/direct decode, quiet repeats"]),
        f"the tunnel adds {common.fmt(w['ms_added_per_token'], 2)} ms per token; a round trip costs "
        f"{common.fmt(w['us_added_per_round_trip'], 0)} us more and a 1 MiB tensor "
        f"{common.fmt(w['ms_added_per_1mib_tensor'], 2)} ms more",
        "greedy texts of every run: " + ("identical" if result["texts_match"] else "DIFFER"),
    ]
    foreign = max((x["cpu"]["foreign_pct"] for s in summary.values() for x in s["runs"]), default=0.0)
    if foreign >= 5:
        lines.append(f"WARNING: other processes took up to {foreign:.0f}% of the CPU during a run: numbers are noisy")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128, help="tokens per run (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per setup (default 5)")
    p.add_argument("--servers", type=int, default=2, help="loopback rpc-servers (default 2)")
    p.add_argument("--rpc-threads", type=int, default=2, help="threads per rpc-server (default 2)")
    p.add_argument("--split", type=float, nargs="+", default=None, help="tensor_split (default 10 9)")
    p.add_argument("--micro-rounds", type=int, default=3, help="interleaved micro-benchmark rounds (default 3)")
    p.add_argument("--pings", type=int, default=2000, help="round trips per micro-benchmark round (default 2000)")
    p.add_argument("--gets", type=int, default=100, help="1 MiB tensors per micro-benchmark round (default 100)")
    p.add_argument("--quiet-wait", type=float, default=10.0, metavar="SECONDS",
                   help="before each run, wait up to this long for other processes to leave the CPU (0: never)")
    p.add_argument("--max-foreign", type=float, default=10.0, metavar="PCT",
                   help="rerun a run during which other processes took more than PCT%% of the CPU (default 10)")
    p.add_argument("--retries", type=int, default=10, help="reruns of a noisy run before keeping it (default 10)")
    p.add_argument("--run-limit", type=float, default=20.0, metavar="SECONDS",
                   help="cut a run's decoding after this long and count it as noisy (default 20)")
    p.add_argument("--rpc-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the rpc-servers only, repeatable (e.g. OMP_WAIT_POLICY=passive)")
    p.add_argument("--out", default="bench/results/tunnel.json", help="JSON results file")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        print(RESULT_PREFIX + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.tokens < 2 or args.repeats < 1 or args.servers < 1:
        p.error("--tokens must be >= 2, --repeats and --servers >= 1")
    args.split = args.split or ([10.0, 9.0] if args.servers == 2 else [1.0] * args.servers)
    if len(args.split) != args.servers:
        p.error(f"--split needs {args.servers} numbers")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sharedllm.relay").setLevel(logging.WARNING)
    result = benchmark(args)
    return common.finish(result, args.out, report(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
