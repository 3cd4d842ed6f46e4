# SPDX-License-Identifier: AGPL-3.0-or-later
# GPU check for real sizes (issue #13; see bench/gpu/big_check.py), run on a lent GPU machine after build.sh, with the
# same .dev/gpu/ carried (the stripped llama-cpp-python sdist, and in .dev/gpu/whl/ the wheels the device lacks:
# dask, distributed, bokeh, click, gguf, numpy if absent). Disk: the 70B shape is 42.5 GB, written under /tmp/big.
# Device time: build (in the background since build.sh) + matrix ~2 min + 8B ~1 min + 70B write and load ~3 min.
#   BIG_ARGS="--steps 70b" bash bench/gpu/big_check.sh     # one step only
for i in $(seq 1 200); do grep -q BUILD_RC /tmp/build.log && break; sleep 3; done
tail -3 /tmp/build.log
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl .dev/gpu/whl/*.whl || exit 1
mkdir -p /tmp/shim && rm -rf /tmp/shim/sharedllm && cp -r sharedllm /tmp/shim/ && cp -r scheduler_plugins /tmp/shim/sharedllm/ && cp -r cli /tmp/shim/sharedllm/
export PYTHONPATH=/tmp/shim:/tmp/site
df -h /tmp | tail -1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 timeout "${BIG_TIMEOUT:-540}" python3 bench/gpu/big_check.py --models /tmp/big --out "$OUT/big_check.json" ${BIG_ARGS:-} 2>&1 | grep -v "^\s*$" > "$OUT/big_check.log"
tail -40 "$OUT/big_check.log"
