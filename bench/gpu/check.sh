# SPDX-License-Identifier: AGPL-3.0-or-later
# GPU check run on a lent H200 (see README "GPU"); paths are those of the device session (.dev/gpu/ carried).
# Device final step: wait for the build, install, assemble the model, run the CUDA checks.
for i in $(seq 1 100); do grep -q BUILD_RC /tmp/build.log && break; sleep 3; done
tail -3 /tmp/build.log
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl .dev/gpu/whl/*.whl || exit 1
mkdir -p /tmp/shim && rm -rf /tmp/shim/sharedllm && cp -r sharedllm /tmp/shim/ && cp -r scheduler_plugins /tmp/shim/sharedllm/ && cp -r cli /tmp/shim/sharedllm/
export PYTHONPATH=/tmp/shim:/tmp/site
cat /tmp/model.part* > /tmp/gemma.gguf 2>/dev/null; ls -la /tmp/gemma.gguf; sha256sum /tmp/gemma.gguf
python3 -c "import llama_cpp; print('rpc', llama_cpp.llama_supports_rpc())"
python3 -m sharedllm.rpc_server --list-devices
PYTHONUNBUFFERED=1 python3 .dev/gpu/mesh_check.py /tmp/gemma.gguf 2>&1 | grep -v "^\s*$" | tee $OUT/mesh_check.log | tail -60
