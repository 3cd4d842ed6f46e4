# SPDX-License-Identifier: AGPL-3.0-or-later
# GPU checks of issues #12 and #13, run from the repository root on a lent GPU machine after build.sh (which builds
# .venv with scripts/setup.sh and assembles the Gemma model); each script's output in $OUT/<script>.log.
#   bash bench/gpu/checks.sh batch_check.py big_check.py
#   ARGS_big_check="--steps 70b" bash bench/gpu/checks.sh big_check.py
#   ARGS_bench_link="--pin 2 --device CPU --tokens 64 --repeats 4 --no-llama-placement --out $OUT/link-pinned.json" \
#     bash bench/gpu/checks.sh bench/bench_link.py    # #14's link bar with each emulated machine on cores of its own
#   bash bench/gpu/checks.sh spec_check.py            # speculative decoding: the target on CUDA, drafts on the client
# Device time: the build (in the background since build.sh), batch_check ~2 min, big_check: matrix ~2 min, 8B ~1 min,
# 70B ~3 min (42.5 GB written under /tmp/big, then loaded), spec_check ~2 min.
cd "$(dirname "$0")/../.." || exit 1
for i in $(seq 1 200); do grep -q BUILD_RC /tmp/build.log 2>/dev/null && break; sleep 3; done
tail -3 /tmp/build.log
grep -q BUILD_RC=0 /tmp/build.log || exit 1
PY=.venv/bin/python
OUT=${OUT:-/tmp}
export OUT
df -h /tmp | tail -1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
for script in "$@"; do
  case "$script" in */*) path=$script ;; *) path=bench/gpu/$script ;; esac
  [ -f "$path" ] || { echo "no such script: $path" >&2; exit 2; }
  name=$(basename "${script%.py}")
  args_var="ARGS_${name}"
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout "${CHECK_TIMEOUT:-540}" "$PY" "$path" ${!args_var:-} 2>&1 | grep -v "^\s*$" > "$OUT/$name.log"
  tail -30 "$OUT/$name.log"
done
