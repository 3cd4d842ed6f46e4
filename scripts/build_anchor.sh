#!/usr/bin/env bash
# SPDX-License-Identifier: AGPL-3.0-or-later
# The anchor SharedLLM's serving figures are measured against (bench/bench_anchor.py): upstream's own executables,
# llama-server and llama-batched-bench (and ggml-rpc-server), built from the llama.cpp that our llama-cpp-python release
# vendors, with the same build flags and the same patches as our wheel (scripts/install.py: its LLAMA_CPP_VERSION,
# flags() and apply_patches() are used from there, never repeated here). A bench-only tool: nothing of the product
# depends on it.
#
#   scripts/build_anchor.sh          prints the bin folder (stdout) once built; a second run takes about a second
#
# Cached in ~/.cache/sharedllm/anchor/<version>-<key>/bin, keyed like the wheel (version, flags, patches) plus
# the targets. SHAREDLLM_CUDA=1 builds the CUDA variant (install.py's flags). cmake and ninja come from the system,
# else from a throwaway venv in the cache. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TARGETS=(llama-server llama-batched-bench ggml-rpc-server)
JOBS="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"

log() { echo "[anchor] $*" >&2; }

# What install.py builds with: version, flags, the patch; and the cache key.
eval "$("$PYTHON" - "${TARGETS[*]}" <<'EOF'
import hashlib, importlib.util, os, shlex, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("sharedllm_install", "scripts/install.py")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
key = hashlib.sha256(f"{m.LLAMA_CPP_VERSION}|{m.flags()}|patches-{m.PATCHES_ID}|anchor|{sys.argv[1]}"
                     .encode()).hexdigest()[:16]
cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharedllm"
out = {
    "VERSION": m.LLAMA_CPP_VERSION,
    "FLAGS": m.flags(),
    "PATCHES_ID": m.PATCHES_ID,
    "CACHE": str(cache),
    "DEST": str(cache / "anchor" / f"llama.cpp-{m.LLAMA_CPP_VERSION}-{key}"),
}
for k, v in out.items():
    print(f"{k}={shlex.quote(v)}")
EOF
)"

if [[ -x "$DEST/bin/llama-server" && -x "$DEST/bin/llama-batched-bench" && -f "$DEST/bin/.complete" ]]; then
    log "cached: llama.cpp of llama-cpp-python $VERSION ($FLAGS) in $DEST/bin"
    echo "$DEST/bin"
    exit 0
fi

# cmake and ninja: the system's, else a throwaway venv in the cache.
CMAKE="$(command -v cmake || true)"
GENERATOR=()
if [[ -z "$CMAKE" ]]; then
    TOOLS="$CACHE/anchor/tools"
    if [[ ! -x "$TOOLS/bin/cmake" ]]; then
        log "no cmake on this machine: installing cmake and ninja into $TOOLS"
        "$PYTHON" -m venv "$TOOLS"
        "$TOOLS/bin/python" -m pip install -q cmake ninja
    fi
    CMAKE="$TOOLS/bin/cmake"
    PATH="$TOOLS/bin:$PATH"
fi
if command -v ninja >/dev/null; then GENERATOR=(-G Ninja); fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sharedllm-anchor-XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)

log "downloading the llama-cpp-python $VERSION sdist"
"$PYTHON" -m pip download -q --no-binary :all: --no-deps -d "$WORK" "llama-cpp-python==$VERSION"
SDIST="$(ls "$WORK"/llama_cpp_python-*.tar.gz)"
log "unpacking $(basename "$SDIST") (vendor/llama.cpp only)"
tar -xzf "$SDIST" -C "$WORK" --wildcards '*/vendor/llama.cpp/*'
SRC="$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"

# The changes our wheel carries (scripts/install.py's PATCHES: the RPC client's hash threshold, ...).
"$PYTHON" - "$SRC" <<'EOF'
import importlib.util, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("sharedllm_install", "scripts/install.py")
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
m.apply_patches(Path(sys.argv[1]))
EOF
log "patched: scripts/install.py's PATCHES ($PATCHES_ID)"

log "configuring with $FLAGS -DLLAMA_CURL=OFF (Release)"
# shellcheck disable=SC2086  # FLAGS is a list of -D options
"$CMAKE" -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" $FLAGS -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON \
    -DBUILD_SHARED_LIBS=OFF >"$WORK/configure.log" 2>&1 || { cat "$WORK/configure.log" >&2; exit 1; }
log "building ${TARGETS[*]} with -j$JOBS (minutes, the first time only)"
"$CMAKE" --build "$WORK/build" --target "${TARGETS[@]}" -j "$JOBS" >"$WORK/build.log" 2>&1 \
    || { tail -50 "$WORK/build.log" >&2; exit 1; }

STAGING="$DEST.tmp"
rm -rf "$STAGING"
mkdir -p "$STAGING/bin"
for t in "${TARGETS[@]}"; do cp "$WORK/build/bin/$t" "$STAGING/bin/"; done
{ echo "llama-cpp-python $VERSION"; echo "flags $FLAGS -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF";
  echo "patches $PATCHES_ID"; echo "built $(date -u +%FT%TZ) in $(( $(date +%s) - t0 )) s"; } >"$STAGING/bin/.complete"
rm -rf "$DEST"
mv "$STAGING" "$DEST"
log "built in $(( $(date +%s) - t0 )) s: $DEST/bin"
echo "$DEST/bin"
