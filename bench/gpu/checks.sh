# SPDX-License-Identifier: AGPL-3.0-or-later
# GPU checks of issues #12 and #13, run on a lent GPU machine after build.sh, with the same .dev/gpu/ carried (the
# stripped llama-cpp-python sdist, and in .dev/gpu/whl/ the wheels the device lacks: dask, distributed, bokeh, click,
# httpx, gguf, numpy if absent; the Gemma model as /tmp/model.part*, as check.sh expects it).
#   bash bench/gpu/checks.sh batch_check.py big_check.py            # each script's output in $OUT/<script>.log
#   ARGS_big_check="--steps 70b" bash bench/gpu/checks.sh big_check.py
#   ARGS_bench_link="--pin 2 --model /tmp/gemma.gguf --tokens 64 --repeats 4 --no-llama-placement --out $OUT/link-pinned.json" \
#     bash bench/gpu/checks.sh bench/bench_link.py    # #14's link bar with each emulated machine on cores of its own
# Device time: the build (in the background since build.sh), batch_check ~2 min, big_check: matrix ~2 min, 8B ~1 min,
# 70B ~3 min (42.5 GB written under /tmp/big, then loaded).
for i in $(seq 1 200); do grep -q BUILD_RC /tmp/build.log && break; sleep 3; done
tail -3 /tmp/build.log
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/whl/*.whl .dev/gpu/whl/*.whl || exit 1
mkdir -p /tmp/shim && rm -rf /tmp/shim/sharedllm && cp -r sharedllm /tmp/shim/ && cp -r scheduler_plugins /tmp/shim/sharedllm/ && cp -r cli /tmp/shim/sharedllm/
export PYTHONPATH=/tmp/shim:/tmp/site
cat /tmp/model.part* > /tmp/gemma.gguf 2>/dev/null  # batch_check.py's model when present
df -h /tmp | tail -1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
for script in "$@"; do
  case "$script" in */*) path=$script ;; *) path=bench/gpu/$script ;; esac
  name=$(basename "${script%.py}")
  args_var="ARGS_${name}"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout "${CHECK_TIMEOUT:-540}" python3 "$path" ${!args_var:-} 2>&1 | grep -v "^\s*$" > "$OUT/$name.log"
  tail -30 "$OUT/$name.log"
done
