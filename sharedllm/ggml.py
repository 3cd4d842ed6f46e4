# SPDX-License-Identifier: AGPL-3.0-or-later
"""ctypes bindings to the ggml libraries that ship inside llama-cpp-python.

No Dask here. Everything that can GGML_ABORT (connecting to an rpc-server, serving) must run in a disposable process;
the functions that do so say it. ``rpc_hello`` is pure Python and safe anywhere: it speaks the first message of the RPC
protocol itself, so it can probe a server's liveness and protocol version without llama.cpp.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import re
import socket
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sharedllm import settings
from sharedllm.dataplane import read_json, write_json

logger = logging.getLogger(__name__)

DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}

# RPC protocol facts from ggml/src/ggml-rpc/ggml-rpc.cpp (llama.cpp vendored by llama-cpp-python 0.3.36).
RPC_CMD_HELLO = 14
RPC_CONN_CAPS_SIZE = 24


@dataclass(frozen=True)
class Device:
    """One ggml backend device: the local CPU, a CUDA GPU, or a remote device behind an rpc-server."""

    index: int
    name: str
    description: str
    kind: str  # cpu, gpu, igpu, accel
    memory_free: int
    memory_total: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Device:
        return cls(**d)


def lib_dir() -> Path:
    """The folder holding llama-cpp-python's shared libraries."""
    import llama_cpp

    return Path(llama_cpp.__file__).parent / "lib"


@functools.lru_cache(maxsize=1)
def kernels_fingerprint() -> str:
    """A fingerprint of llama.cpp's libraries here (every ``libggml*``/``libllama*`` file: its name and size, and the
    bytes of those under 64 MiB): two machines with the same one compute alike (sharedllm.engine.measures)."""
    h = hashlib.sha256()
    for f in sorted(lib_dir().glob("lib*.so*")):
        if f.is_symlink() or not f.name.startswith(("libggml", "libllama")):
            continue
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        if size < 64 << 20:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    d = lib_dir()
    ggml = ctypes.CDLL(str(d / "libggml.so"), mode=ctypes.RTLD_GLOBAL)
    try:
        rpc = ctypes.CDLL(str(d / "libggml-rpc.so"), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise RuntimeError(
            f"llama-cpp-python at {d} was built without RPC ({exc}); rebuild it with scripts/setup.sh"
        ) from exc
    vp, sz, cp = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
    for name, res, args in [
        ("ggml_backend_dev_count", sz, []),
        ("ggml_backend_dev_get", vp, [sz]),
        ("ggml_backend_dev_name", cp, [vp]),
        ("ggml_backend_dev_description", cp, [vp]),
        ("ggml_backend_dev_type", ctypes.c_int, [vp]),
        ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]),
        ("ggml_backend_reg_dev_count", sz, [vp]),
        ("ggml_backend_reg_dev_get", vp, [vp, sz]),
        ("ggml_backend_load_all", None, []),
        ("ggml_backend_dev_by_type", vp, [ctypes.c_int]),
        ("ggml_backend_dev_buffer_type", vp, [vp]),
    ]:
        fn = getattr(ggml, name)
        fn.restype, fn.argtypes = res, args
    rpc.ggml_backend_rpc_start_server.restype = None
    rpc.ggml_backend_rpc_start_server.argtypes = [cp, cp, sz, sz, ctypes.POINTER(vp)]
    rpc.ggml_backend_rpc_add_server.restype = vp
    rpc.ggml_backend_rpc_add_server.argtypes = [cp]
    return ggml, rpc


def supports_rpc() -> bool:
    """True when the installed llama-cpp-python carries the RPC backend."""
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_rpc())
    except Exception:  # not installed, or a broken build
        return False


def _describe(index: int, dev: int) -> Device:
    ggml, _ = _libs()
    free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
    ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return Device(
        index=index,
        name=ggml.ggml_backend_dev_name(dev).decode(),
        description=(ggml.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
        kind=DEVICE_TYPES.get(ggml.ggml_backend_dev_type(dev), "unknown"),
        memory_free=free.value,
        memory_total=total.value,
    )


def _local_handles() -> list[tuple[Device, int]]:
    ggml, _ = _libs()
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        h = ggml.ggml_backend_dev_get(i)
        out.append((_describe(i, h), h))
    return out


def local_devices() -> list[Device]:
    """The devices this process's ggml can use (CPU, plus CUDA GPUs in a CUDA build). RPC devices are excluded."""
    return [d for d, _ in _local_handles() if not d.name.startswith("RPC")]


def cpu_buffer_type() -> int:
    """The local CPU's buffer type (``ggml_backend_cpu_buffer_type()``), for ``tensor_buft_overrides``."""
    ggml, _ = _libs()
    dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    if not dev:
        raise RuntimeError("this llama-cpp-python build has no CPU backend")
    return ggml.ggml_backend_dev_buffer_type(dev)


def default_server_devices(devices: list[Device] | None = None) -> list[str]:
    """What an rpc-server serves when not told: every GPU if the machine has any, else the CPU."""
    devices = local_devices() if devices is None else devices
    gpus = [d.name for d in devices if d.kind in ("gpu", "igpu")]
    return gpus or [d.name for d in devices if d.kind == "cpu"][:1]


def start_server(endpoint: str, device_names: list[str], n_threads: int, cache_dir: str | None = None) -> None:
    """Serve ``device_names`` on ``endpoint`` forever. Blocks; run it in a dedicated process (see rpc_server.py)."""
    _, rpc = _libs()
    handles = {d.name: h for d, h in _local_handles()}
    missing = [n for n in device_names if n not in handles]
    if missing:
        raise ValueError(f"unknown device(s) {missing}; this machine has {sorted(handles)}")
    arr = (ctypes.c_void_p * len(device_names))(*[handles[n] for n in device_names])
    rpc.ggml_backend_rpc_start_server(
        endpoint.encode(), cache_dir.encode() if cache_dir else None, n_threads, len(device_names), arr
    )


def add_server(endpoint: str) -> list[tuple[Device, int]]:
    """Register a remote rpc-server and return its devices with their raw handles.

    GGML_ABORTs when the server is unreachable: call only inside the engine process, after ``rpc_hello`` succeeded.
    """
    ggml, rpc = _libs()
    reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise RuntimeError(f"could not add rpc-server {endpoint}")
    out = []
    for i in range(ggml.ggml_backend_reg_dev_count(reg)):
        h = ggml.ggml_backend_reg_dev_get(reg, i)
        out.append((_describe(i, h), h))
    return out


def rpc_hello(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """Open a connection to an rpc-server, do the HELLO handshake and return its protocol version.

    Raises ``ConnectionError`` (refused, closed, malformed) or ``TimeoutError`` (the server is busy with another
    client, or hung). Safe in any process: no llama.cpp code runs.
    """
    from sharedllm.relay import parse_endpoint

    with socket.create_connection(parse_endpoint(endpoint), timeout=timeout) as s:
        return rpc_hello_on(s, endpoint, timeout)


def rpc_hello_on(sock: socket.socket, endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """The HELLO handshake on a connected socket (a plain one, or a relay's tunnel); ``endpoint`` names it in errors."""
    sock.settimeout(timeout)
    sock.sendall(struct.pack("<BQ", RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
    want = 8 + 4 + RPC_CONN_CAPS_SIZE
    buf = b""
    while len(buf) < want:
        chunk = sock.recv(want - len(buf))
        if not chunk:
            raise ConnectionError(f"rpc-server {endpoint} closed the connection during the handshake")
        buf += chunk
    (size,) = struct.unpack_from("<Q", buf)
    if size != 4 + RPC_CONN_CAPS_SIZE:
        raise ConnectionError(f"rpc-server {endpoint} answered HELLO with {size} bytes: not a compatible rpc-server")
    major, minor, patch = buf[8], buf[9], buf[10]
    return major, minor, patch


_PROBE = r"""
import json, os, socket, sys, threading, time
from sharedllm import ggml
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
ep = f"127.0.0.1:{port}"
threading.Thread(target=ggml.start_server, args=(ep, ggml.default_server_devices(), 1), daemon=True).start()
deadline, err = time.monotonic() + 50, None  # a loaded host starts the server slowly: wait, up to the caller's limit
while time.monotonic() < deadline:
    try:
        version = ggml.rpc_hello(ep, timeout=2)
    except OSError as exc:
        err = exc
        time.sleep(0.05)
        continue
    # A file of its own, not stdout: the rpc-server's C code prints there too (its banner, each client).
    with open(sys.argv[1], "w") as f:
        f.write(json.dumps(version))
    break
else:
    print(f"no HELLO from the probe's rpc-server at {ep} in 50s: {err}", file=sys.stderr); sys.stderr.flush()
os._exit(0)
"""


_HEADER_VERSION = re.compile(r"^#define\s+RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)", re.M)


def header_protocol_version() -> tuple[int, int, int] | None:
    """The RPC protocol version in the ``ggml-rpc.h`` installed with llama-cpp-python (the same build as its
    libraries), or None when the distribution carries no such header."""
    from importlib import metadata

    try:
        files = metadata.files("llama_cpp_python") or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == "ggml-rpc.h":
            try:
                found = dict(_HEADER_VERSION.findall(Path(f.locate()).read_text()))
            except OSError:
                return None
            if set(found) == {"MAJOR", "MINOR", "PATCH"}:
                return int(found["MAJOR"]), int(found["MINOR"]), int(found["PATCH"])
    return None


def probe_protocol_version(tries: int = 3) -> tuple[int, int, int]:
    """Ask a throwaway loopback rpc-server (in a process of its own) for its protocol version."""
    import tempfile

    why = ""
    for attempt in range(1, tries + 1):
        with tempfile.TemporaryDirectory(prefix="sharedllm-probe-") as tmp:
            answer = Path(tmp) / "version.json"
            try:
                out = subprocess.run(
                    [sys.executable, "-X", "faulthandler", "-c", _PROBE, str(answer)],
                    capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                )
            except subprocess.TimeoutExpired:
                why = "no answer in 60 s"
                continue
            try:
                return tuple(json.loads(answer.read_text()))
            except (OSError, ValueError):
                pass
        why = (f"exit status {out.returncode}; stderr: {out.stderr.strip()[-300:] or 'nothing'}; "
               f"stdout: {out.stdout.strip()[-300:] or 'nothing'}")
        logger.warning("RPC protocol probe %d of %d failed: %s", attempt, tries, why)
    raise RuntimeError(f"could not read the RPC protocol version ({why}); reinstall with scripts/setup.sh")


@functools.lru_cache(maxsize=1)
def rpc_protocol_version() -> tuple[int, int, int]:
    """The RPC protocol version of the installed llama.cpp (a macro upstream).

    Read from the ``ggml-rpc.h`` that llama-cpp-python installs beside its libraries; a build without it is asked
    through a throwaway loopback rpc-server, and the answer cached on disk per library build.
    """
    version = header_protocol_version()
    if version is not None:
        return version
    lib = lib_dir() / "libggml-rpc.so"
    st = lib.stat()
    cache = settings.cache_root() / "rpc-version.json"
    key = f"{lib}:{st.st_size}:{int(st.st_mtime)}"
    known = read_json(cache) or {}
    if key in known:
        return tuple(known[key])
    version = probe_protocol_version()
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        known[key] = list(version)
        write_json(cache, known)
    except OSError:
        pass
    return version


def build_info() -> dict:
    """Versions that must match across a mesh: llama-cpp-python and the RPC protocol."""
    import llama_cpp

    major, minor, patch = rpc_protocol_version()
    return {"llama_cpp_python": llama_cpp.__version__, "rpc_protocol": f"{major}.{minor}.{patch}"}
