# SPDX-License-Identifier: AGPL-3.0-or-later
"""What the test modules share, as plain functions, classes and constants (the fixtures are in ``conftest.py``): the
prompt and context, waiting for a condition, the command line, a synthetic placement estimate, a small GGUF writer, a
real rpc-server, an HTTP file server, and helpers for streams with faults and for batches. No test module imports
another."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.server
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from math import prod
from pathlib import Path

import pytest

from sharedllm.gguf import (
    ARRAY,
    BOOL,
    FLOAT32,
    FLOAT64,
    GGML_TYPES,
    INT8,
    INT16,
    INT32,
    INT64,
    STRING,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    ModelEstimate,
)

PROMPT = "Once upon a time"
N_CTX = 2048
HELLO = struct.pack("<BQ", 14, 24) + bytes(24)  # llama.cpp RPC: HELLO with 24 bytes of capabilities
ACCEPTED = "Accepted client connection"  # what an rpc-server logs for every client it serves
TWO = ["machine-1", "machine-2"]


def everything_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the peer sends until it closes (a reset counts as closed)."""
    sock.settimeout(timeout)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            got += chunk
    return got


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def machine(mesh, machine_id: str) -> dict | None:
    return next((m for m in mesh.machines() if m["machine_id"] == machine_id), None)


# --- the command line, as a user runs it ------------------------------------------------------------------------------


BIN = Path(sys.executable).parent


def run_cli(*args: str, timeout: float = 180, env: dict[str, str | None] | None = None) -> subprocess.CompletedProcess:
    """``sharedllm ARGS...``; ``env``: changes to this process's environment (None removes a variable)."""
    environ = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run([str(BIN / "sharedllm"), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=environ)


def key_env(key_file: str | os.PathLike) -> dict[str, str | None]:
    """The environment of a user whose key is in ``key_file`` (as ``sharedllm up`` says to use the admin's)."""
    return {"SHAREDLLM_KEY_FILE": str(key_file), "SHAREDLLM_KEY": None}


def admin_env(mesh_cluster) -> dict[str, str | None]:
    """The environment of the mesh's admin: ``SHAREDLLM_KEY_FILE`` names the LocalMesh's admin key file."""
    return key_env(mesh_cluster.admin_key_file)


# --- placement: a synthetic estimate ----------------------------------------------------------------------------------


MB = 1 << 20


def estimate(
    n_layer: int = 18,
    layer_weight: int = 8 * MB,
    layer_kv: int = 2 * MB,
    output: int = 170 * MB,
    compute: int = 0,
    path: str = "/models/gemma-3-270m-q4_k_m.gguf",
    weights: list[int] | None = None,
    kvs: list[int] | None = None,
) -> ModelEstimate:
    """A synthetic estimate: by default 18 layers of 10 MiB and an output slot of 170 MiB, like Gemma 3 270M."""
    weights = weights if weights is not None else [layer_weight] * n_layer
    kvs = kvs if kvs is not None else [layer_kv] * n_layer
    return ModelEstimate(
        path=path,
        architecture="gemma3",
        n_layer=n_layer,
        n_ctx=2048,
        layer_weight_bytes=tuple(weights),
        layer_kv_bytes=tuple(kvs),
        output_bytes=output,
        input_bytes=output,
        compute_bytes=compute,
        file_bytes=sum(weights) + 2 * output,
    )


# --- a small GGUF writer ----------------------------------------------------------------------------------------------


_FMT = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
        UINT64: "Q", INT64: "q", FLOAT64: "d"}  # fmt: skip
F32, F16, Q8_0, Q4_K = 0, 1, 8, 12


def gguf_str(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_value(vtype: int, value) -> bytes:
    if vtype == STRING:
        return gguf_str(value)
    if vtype == ARRAY:
        item_type, items = value
        return struct.pack("<IQ", item_type, len(items)) + b"".join(gguf_value(item_type, v) for v in items)
    return struct.pack("<" + _FMT[vtype], value)


def nbytes_of(shape, ggml_type) -> int:
    _, block, size = GGML_TYPES.get(ggml_type, ("unknown", 1, 1))
    return prod(shape) // block * size


def gguf_bytes(kvs, tensors, *, version=3, alignment=32, offsets=None, counts=None) -> bytes:
    """``kvs``: (key, type, value), arrays as (item_type, items); ``tensors``: (name, shape, ggml_type)."""
    n_tensors, n_kv = counts or (len(tensors), len(kvs))
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv))
    for key, vtype, value in kvs:
        out += gguf_str(key) + struct.pack("<I", vtype) + gguf_value(vtype, value)
    pad = lambda n: -(-n // alignment) * alignment  # noqa: E731
    rel = 0
    for i, (name, shape, ggml_type) in enumerate(tensors):
        off = offsets[i] if offsets else rel
        out += gguf_str(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, ggml_type, off)
        rel += pad(nbytes_of(shape, ggml_type))
    out += bytes(pad(len(out)) - len(out))
    for i, (_, shape, ggml_type) in enumerate(tensors):
        n = nbytes_of(shape, ggml_type)
        out += bytes([i + 1]) * n + bytes(pad(n) - n)
    return bytes(out)


MODEL_KVS = [
    ("general.architecture", STRING, "llama"),
    ("llama.block_count", UINT32, 2),
    ("llama.embedding_length", UINT32, 64),
    ("llama.feed_forward_length", UINT32, 256),
    ("llama.attention.head_count", UINT32, 4),
    ("llama.attention.head_count_kv", ARRAY, (INT32, [2, 1])),
]
MODEL_TENSORS = [
    ("token_embd.weight", (64, 100), F16),
    ("blk.0.attn_q.weight", (64, 64), Q8_0),
    ("blk.0.ffn_up.weight", (256, 64), Q4_K),
    ("blk.1.attn_q.weight", (64, 64), Q8_0),
    ("blk.1.ffn_up.weight", (256, 64), Q4_K),
    ("output_norm.weight", (64,), F32),
    ("output.weight", (64, 100), Q8_0),
]


# --- a real rpc-server ------------------------------------------------------------------------------------------------


class RPCServer:
    """A real ``python -m sharedllm.rpc_server`` on loopback; its stdout and stderr go to ``log``."""

    def __init__(self, log: Path):
        from sharedllm import ggml
        from sharedllm.rpc_server import free_port

        self.log = log
        self.port = free_port("127.0.0.1")
        self.endpoint = f"127.0.0.1:{self.port}"
        self._out = open(log, "wb")  # closed in stop()
        # llama.cpp fflush()es after "Accepted client connection"; stdbuf keeps any other printf line-buffered too.
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", sys.executable, "-m", "sharedllm.rpc_server", "--host", "127.0.0.1", "--port",
             str(self.port), "--threads", "1"], stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.version = ggml.rpc_hello(self.endpoint, timeout=2)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"rpc-server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)

    def accepted(self) -> int:
        return self.log.read_text(errors="replace").count(ACCEPTED)

    def wait_accepted(self, n: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.accepted() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.accepted()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._out.close()


# --- an HTTP file server (the fixture: conftest's ``server``) ---------------------------------------------------------


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) with ETag, Range and If-Range; counts the body bytes it sends.

    ``drops``: how many of the next responses are cut at a random offset of the file (a clean close, as a proxy or a
    flaky link does); the offsets are drawn at once, so that they spread over the whole file. ``rate``: bytes per
    second per response (0: unthrottled). ``honor_if_range=False`` serves ranges of the current file whatever
    If-Range says (a server that ignores it).
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.drops = 0
        self.cuts: list[int] = []
        self.rate = 0
        self.honor_if_range = True
        self.closed_ranges = True  # False: "bytes=A-B" is served as "bytes=A-" (the whole rest)
        self.busy: list[tuple[int, str | None]] = []  # the next responses: (status, Retry-After), then the file
        self.sent = 0
        self.requests: list[dict] = []
        self.rng = random.Random(1234)
        self.lock = threading.Lock()

    def put(self, path: str, data: bytes, etag: str | None = None) -> str:
        self.files[path] = data
        self.etags[path] = etag or f'"{hashlib.md5(data).hexdigest()}"'
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        srv = self.server
        data, etag = srv.files.get(self.path), srv.etags.get(self.path)
        rec = {"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range"),
               "sent": 0, "at": time.monotonic()}
        with srv.lock:
            srv.requests.append(rec)
            busy = srv.busy.pop(0) if srv.busy else None
        if busy is not None:
            self.send_response(busy[0])
            if busy[1] is not None:
                self.send_header("Retry-After", busy[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if data is None:
            self.send_error(404)
            return
        start, status, stop = 0, 200, None
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if_range = self.headers.get("If-Range")
        if m and (if_range is None or if_range == etag or not srv.honor_if_range):
            start = int(m[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            stop = min(int(m[2]) + 1, len(data)) if m[2] and srv.closed_ranges else None
        end = stop or len(data)
        self.send_response(status)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        with srv.lock:
            if srv.drops and not srv.cuts:
                srv.cuts = sorted(srv.rng.sample(range(1, len(data)), srv.drops))
            while srv.cuts and srv.cuts[0] <= start:
                srv.cuts.pop(0)
                srv.drops -= 1
            if srv.cuts:
                srv.drops -= 1
                end = min(end, srv.cuts.pop(0))
        pos, step = start, 64 << 10
        t0 = time.monotonic()
        try:
            while pos < end:
                n = min(step, end - pos)
                self.wfile.write(data[pos:pos + n])
                with srv.lock:
                    srv.sent += n
                    rec["sent"] += n
                pos += n
                if srv.rate:
                    ahead = (pos - start) / srv.rate - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:  # the client went away
            self.close_connection = True
            return
        if end < (stop or len(data)):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


# --- streams and batches on a loaded model ----------------------------------------------------------------------------


def stream_with_fault(llm, fault, after: int = 8, api: str = "blocking", **kwargs) -> tuple[str, float]:
    """Stream a greedy completion, call ``fault()`` after ``after`` chunks; return the text and the seconds from the
    fault to the next chunk. ``api="asyncio"``: through ``acreate_completion`` in an event loop."""
    text, n, t_fault, gap = "", 0, None, 0.0

    def take(chunk: dict) -> None:
        nonlocal text, n, t_fault, gap
        if t_fault is not None and not gap:
            gap = time.perf_counter() - t_fault
        text += chunk["choices"][0]["text"]
        n += 1
        if n == after:
            fault()
            t_fault = time.perf_counter()

    kwargs = {"max_tokens": 64, "temperature": 0, "stream": True, **kwargs}
    if api == "asyncio":
        async def consume() -> None:
            async for chunk in await llm.acreate_completion(PROMPT, **kwargs):
                take(chunk)

        asyncio.run(consume())
    else:
        for chunk in llm.create_completion(PROMPT, **kwargs):
            take(chunk)
    return text, gap


BATCH_N_CTX = 512  # per sequence


def text_of(out: dict) -> str:
    return out["choices"][0]["text"]


def at_once(llm, items: list[tuple[str, int]]) -> dict[str, str]:
    """Stream each (prompt, max_tokens) of ``items`` at once, a thread each; their texts."""
    texts: dict[str, str] = {}

    def one(prompt: str, n: int) -> None:
        texts[prompt] = "".join(c["choices"][0]["text"]
                                for c in llm.create_completion(prompt, max_tokens=n, temperature=0, stream=True))

    threads = [threading.Thread(target=one, args=item) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return texts


def idle_stats(llm, after: int = -1) -> dict:
    """The engine's statistics once it reported its last step (nothing running, more steps than ``after``)."""
    return wait_for(lambda: (s := llm.engine_stats).get("running") == 0 and s.get("steps", -1) > after and s,
                    timeout=60, what="the engine's report of its last step")
