# SPDX-License-Identifier: AGPL-3.0-or-later
# GPU check, device final step (see docs/gpu.md), run from the repository root after build.sh: wait for the build,
# then bench/gpu/mesh_check.py on the Gemma model setup.sh assembled (a CUDA machine, a CPU machine); output in $OUT.
cd "$(dirname "$0")/../.." || exit 1
for i in $(seq 1 200); do grep -q BUILD_RC /tmp/build.log 2>/dev/null && break; sleep 3; done
tail -3 /tmp/build.log
grep -q BUILD_RC=0 /tmp/build.log || exit 1
PY=.venv/bin/python
MODEL=$("$PY" -m sharedllm.models --ensure-default) || exit 1
ls -la "$MODEL"; sha256sum "$MODEL"
"$PY" -c "import llama_cpp; print('rpc', llama_cpp.llama_supports_rpc())"
"$PY" -m sharedllm.rpc_server --list-devices
PYTHONUNBUFFERED=1 "$PY" bench/gpu/mesh_check.py "$MODEL" 2>&1 | grep -v "^\s*$" | tee "${OUT:-/tmp}/mesh_check.log" | tail -60
