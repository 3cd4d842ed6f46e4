#!/usr/bin/env python3
# SPDX-License-Identifier: AGPL-3.0-or-later
"""Put SharedLLM on a machine, from nothing but Python 3.10+ and a C compiler: a virtual environment with
llama-cpp-python built with RPC (the build ``scripts/setup.sh`` makes, from the same cache) and SharedLLM's wheel.
Standard library only: it runs before anything is installed.

    python3 install.py sharedllm-0.1.0-py3-none-any.whl --venv ~/sharedllm     # a donor's machine
    python3 install.py --llama-only --venv .venv                                # what scripts/setup.sh runs

``SHAREDLLM_CUDA=1`` builds the CUDA variant (``CMAKE_CUDA_ARCHITECTURES``, default 90). The llama-cpp-python wheel
is kept in ``~/.cache/sharedllm/wheels/``, keyed by its version, its build flags, the Python and the one constant of
its llama.cpp SharedLLM changes (the RPC client's hash threshold): a second install takes seconds. At the end it
prints the ``dask worker`` line that makes this machine part of a mesh.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_VERSION = os.environ.get("LLAMA_CPP_VERSION", "0.3.36")
# Three changes to the vendored llama.cpp (PATCHES: file, line, replacement; each line must occur once):
# - its RPC client offers a weight tensor to the rpc-server's cache by hash only above HASH_THRESHOLD (10 MiB
#   upstream), so warm loads re-send every smaller weight. The threshold is the client's alone (the server stores on
#   the client's flag and finds by hash whatever the size); 1 MiB takes 8 ms to send at 1 Gbit/s, longer than a
#   hash's round trip on a LAN;
# - the CPU's flash attention splits a single query row's KV cells between threads from 512 cells on, which sums
#   them in another order than a pass of several rows: a draft verified in a pass of several rows (speculative
#   decoding) would not get the bits of the same token decoded alone. Off unless GGML_CPU_FA_SPLIT_KV=1; a query row
#   is computed alike in any pass (the threads still share the rows and heads);
# - the CPU's K-quant matrix products take a tiled kernel from 8 rows on, with other bits than the rows alone: a
#   decode pass of 8 or more sequences (continuous batching) or of a sequence and its drafts would not give each row
#   its bits alone, so exact batches held 7 sequences a pass. From TILED_MM_MIN_ROWS rows on instead (a prompt's
#   passes, 512 rows, keep the tiled kernel; GGML_CPU_TILED_MM_MIN sets another floor at run time).
HASH_THRESHOLD_MIB = 1
TILED_MM_MIN_ROWS = 64
_FA_SPLIT_KV = ("const bool use_split_kv_path = !use_ref && (neq1 == 1 && neq3 == 1) && kv_is_f32_or_f16 && "
                "(k->type == v->type) && q->type == GGML_TYPE_F32 && nek1 >= 512;")
PATCHES = [
    ("ggml/src/ggml-rpc/ggml-rpc.cpp", "const size_t HASH_THRESHOLD = 10 * 1024 * 1024;",
     f"const size_t HASH_THRESHOLD = {HASH_THRESHOLD_MIB} * 1024 * 1024;"),
    ("ggml/src/ggml-cpu/ops.cpp", _FA_SPLIT_KV,
     _FA_SPLIT_KV[:-1] + ' && [] { static const bool on = [] { const char * e = getenv("GGML_CPU_FA_SPLIT_KV"); '
     "return e != nullptr && atoi(e) == 1; }(); return on; }();"),
    ("ggml/src/ggml-cpu/tiled/tiled.cpp", "    return rows >= 8 || ggml_tiled_matmul_forced();",
     "    static const int64_t floor_rows = [] { const char * e = getenv(\"GGML_CPU_TILED_MM_MIN\"); "
     f"return e != nullptr ? (int64_t) atoll(e) : (int64_t) {TILED_MM_MIN_ROWS}; }}();\n"
     "    return rows >= floor_rows || ggml_tiled_matmul_forced();"),
]
PATCHES_ID = hashlib.sha256(repr(PATCHES).encode()).hexdigest()[:8]  # in the cache keys of what they build


def apply_patches(llama_cpp: Path) -> None:
    """Apply ``PATCHES`` to a llama.cpp source tree (``vendor/llama.cpp`` of the sdist)."""
    for rel, old, new in PATCHES:
        path = llama_cpp / rel
        text = path.read_text()
        if text.count(old) != 1:
            sys.exit(f"[install] ERROR: {path} has no line '{old[:60]}...' to patch (another llama.cpp?); update "
                     "scripts/install.py")
        path.write_text(text.replace(old, new))


def log(msg: str) -> None:
    print(f"[install] {msg}", file=sys.stderr, flush=True)


def flags() -> str:
    if os.environ.get("SHAREDLLM_CUDA") == "1":
        arch = os.environ.get("CMAKE_CUDA_ARCHITECTURES", "90")
        return f"-DGGML_RPC=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES={arch} -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
    return "-DGGML_RPC=ON -DGGML_NATIVE=OFF"


def cache_tag(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"], capture_output=True,
                          text=True, check=True).stdout.strip()


def wheel_dir(python: str) -> Path:
    """Where the llama-cpp-python wheel of these flags and this Python is cached (the key scripts/setup.sh used)."""
    key = hashlib.sha256(f"{LLAMA_CPP_VERSION}|{flags()}|{cache_tag(python)}|patches-{PATCHES_ID}"
                         .encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharedllm"
    return cache / "wheels" / f"llama-cpp-python-{LLAMA_CPP_VERSION}-{key}"


def pip(python: str, *args: str, **env: str) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True, env={**os.environ, **env})


def llama_wheel(python: str) -> Path:
    """The llama-cpp-python wheel built with RPC (and ``PATCHES`` applied), from the cache or built now."""
    wheels = wheel_dir(python)
    found = sorted(wheels.glob("llama_cpp_python-*.whl")) if wheels.is_dir() else []
    if found:
        log(f"reusing the cached wheel in {wheels}")
        return found[-1]
    log(f"building llama-cpp-python {LLAMA_CPP_VERSION} with CMAKE_ARGS='{flags()}' (minutes, the first time only)")
    with tempfile.TemporaryDirectory(prefix="sharedllm-build-") as src:
        pip(python, "download", "-q", "--no-binary", ":all:", "--no-deps", "-d", src,
            f"llama-cpp-python=={LLAMA_CPP_VERSION}")
        [sdist] = Path(src).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+: no path outside the folder
                tar.extractall(src, filter="data")
            else:
                tar.extractall(src)
        [tree] = [p for p in Path(src).glob("llama_cpp_python-*") if p.is_dir()]
        apply_patches(tree / "vendor" / "llama.cpp")
        staging = Path(f"{wheels}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        pip(python, "wheel", "--no-deps", "--no-cache-dir", "-w", str(staging), str(tree), CMAKE_ARGS=flags(),
            CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1)))
        shutil.rmtree(wheels, ignore_errors=True)
        staging.rename(wheels)
    return sorted(wheels.glob("llama_cpp_python-*.whl"))[-1]


def installed_llama(python: str) -> bool:
    """Whether ``python`` has this version of llama-cpp-python, built with RPC, from this cache's build."""
    marker = Path(python).absolute().parents[1] / f".llama-flags-{wheel_dir(python).name}"
    code = (f"import importlib.metadata as m, llama_cpp, sys; sys.exit(0 if m.version('llama_cpp_python') == "
            f"'{LLAMA_CPP_VERSION}' and llama_cpp.llama_supports_rpc() else 1)")
    ok = subprocess.run([python, "-c", code], capture_output=True).returncode == 0
    return ok and marker.exists()


def install_llama(python: str) -> None:
    if installed_llama(python):
        return
    wheel = llama_wheel(python)
    # Our wheel over any other build of the same version, then its dependencies (numpy, ...).
    pip(python, "install", "-q", "--force-reinstall", "--no-deps", str(wheel))
    pip(python, "install", "-q", str(wheel))
    venv = Path(python).absolute().parents[1]
    for old in venv.glob(".llama-flags-*"):
        old.unlink()
    (venv / f".llama-flags-{wheel_dir(python).name}").touch()
    check = "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else 1)"
    if subprocess.run([python, "-c", check]).returncode != 0:
        sys.exit(f"[install] ERROR: llama-cpp-python in {venv} was built without RPC; delete {wheel.parent} and run "
                 "again")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("wheel", nargs="?", help="SharedLLM's wheel (a path, or a requirement pip can install)")
    p.add_argument("--venv", default=str(Path.home() / "sharedllm"), help="the virtual environment to make or use")
    p.add_argument("--llama-only", action="store_true", help="only llama-cpp-python (scripts/setup.sh)")
    args = p.parse_args(argv)
    venv = Path(args.venv).expanduser()
    python = str(venv / "bin" / "python")
    if not Path(python).exists():
        log(f"creating {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip(python, "install", "-q", "--upgrade", "pip")
    install_llama(python)
    if args.llama_only:
        return 0
    if not args.wheel:
        p.error("give SharedLLM's wheel (sharedllm-*.whl), or --llama-only")
    log(f"installing {args.wheel} and its dependencies into {venv}")
    pip(python, "install", "-q", args.wheel)
    log(f"done. To give this machine to a mesh:\n\n  {venv}/bin/dask worker tcp://SCHEDULER:8786 --preload-nanny "
        "sharedllm.nanny --preload sharedllm.worker\n\n  (behind NAT, taking no inbound connection: add "
        "--host 127.0.0.1 --no-inbound; the cluster secret from SHAREDLLM_CLUSTER_SECRET_FILE)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
