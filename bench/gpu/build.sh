# SPDX-License-Identifier: AGPL-3.0-or-later
# GPU check run on a lent H200 (see README "GPU"); paths are those of the device session (.dev/gpu/ carried).
# Device step 1: unpack the stripped sdist, build the CUDA wheel in the background (setsid), probe NVML meanwhile.
set -x
mkdir -p /tmp/b && tar xzf .dev/gpu/llama-src.tgz -C /tmp/b
cd /tmp/b/llama_cpp_python-0.3.36
setsid bash -c 'CMAKE_ARGS="-DGGML_RPC=ON -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip wheel --no-build-isolation --no-deps -w /tmp/whl . > /tmp/build.log 2>&1; echo BUILD_RC=$? >> /tmp/build.log' < /dev/null > /dev/null 2>&1 &
cd - >/dev/null
nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv
python3 -c "import sys; sys.path.insert(0, '.'); from sharedllm import resources; r = resources.probe('gpu-box'); print(r.describe()); print(r.to_dict()['gpus'])"
