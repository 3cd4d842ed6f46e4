# SPDX-License-Identifier: AGPL-3.0-or-later
"""What llama.cpp's RPC tensor cache costs by itself, in C, for the model's one cached tensor.

    .venv/bin/python bench/rpc_cache_floor.py [--bytes 178257920] [--repeats 5]

Upstream ggml-rpc (``ggml/src/ggml-rpc/ggml-rpc.cpp`` of the llama.cpp that llama-cpp-python 0.3.36 vendors) handles
a weight over 10 MiB like this; the steps are re-implemented here the same way (same hash loop, same I/O pattern) and
timed, with no Python, network or scheduling in between:

- client, cold and warm: ``fnv_hash`` over the tensor (64-bit FNV-1a, one byte per step), then ``SET_TENSOR_HASH``;
- server, warm (hit): ``get_cached_file`` (a ``std::vector`` resized to the file size, i.e. zero-filled, and an
  ``ifstream`` read of the whole file) and ``ggml_backend_tensor_set`` (a copy into the freshly allocated buffer);
- server, cold (miss): after receiving the data, ``fnv_hash`` again, an ``ofstream`` write of the file, then the copy.

The default size is Gemma 3 270M's tied output/token-embedding tensor (262144 x 640 Q8_0). The file lives in a
temporary directory (tmpfs or the page cache: a warm load reads it from memory, as in ``bench_load.py``). Prints a
table of medians; needs a C compiler (``cc``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }

static uint64_t fnv_hash(const uint8_t * data, size_t len) {  /* ggml-rpc.cpp fnv_hash, verbatim loop */
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; ++i) { hash ^= data[i]; hash *= 0x100000001b3ULL; }
    return hash;
}

int main(int argc, char ** argv) {
    size_t n = strtoull(argv[1], 0, 10);
    const char * path = argv[2];
    uint8_t * src = malloc(n);
    for (size_t i = 0; i < n; i++) src[i] = (uint8_t) (i * 2654435761u >> 13);
    double t0 = now();
    uint64_t h = fnv_hash(src, n);                                /* client: every load */
    double t1 = now();
    FILE * f = fopen(path, "wb"); fwrite(src, 1, n, f); fclose(f); /* server, cold: ofstream write */
    double t2 = now();
    uint8_t * buf = malloc(n);                                    /* server: the tensor's backend buffer */
    memcpy(buf, src, n);                                          /* cold: ggml_backend_tensor_set */
    double t3 = now();
    double t4 = now();
    uint8_t * vec = malloc(n); memset(vec, 0, n);                 /* warm: std::vector resize (zero-fill) */
    f = fopen(path, "rb"); if (fread(vec, 1, n, f) != n) return 1; fclose(f);  /* ifstream read */
    uint8_t * buf2 = malloc(n); memcpy(buf2, vec, n);             /* ggml_backend_tensor_set */
    free(vec);
    double t5 = now();
    printf("%.6f %.6f %.6f %.6f %llx %d\n", t1 - t0, t2 - t1, t3 - t2, t5 - t4, (unsigned long long) h,
           buf[n / 3] + buf2[n / 2]);  /* use both buffers, so that no copy is optimised away */
    free(buf); free(buf2);
    return 0;
}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bytes", type=int, default=178_257_920, help="tensor size (default: Gemma 3 270M's output)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        print("needs a C compiler (cc)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="sharedllm-cache-floor-") as d:
        src, exe, data = Path(d) / "floor.c", Path(d) / "floor", Path(d) / "0123456789abcdef"
        src.write_text(SOURCE)
        subprocess.run([cc, "-O3", "-o", str(exe), str(src)], check=True)
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([str(exe), str(args.bytes), str(data)], capture_output=True, text=True, check=True)
            runs.append([float(x) for x in out.stdout.split()[:4]])
    med = [statistics.median(r[i] for r in runs) for i in range(4)]
    hash_s, write_s, copy_s, hit_s = med
    print(f"tensor of {args.bytes / 2**20:.1f} MiB, median of {args.repeats} runs (C, -O3)")
    print(f"  client fnv_hash (every load, cold and warm)            {hash_s:.3f} s")
    print(f"  server hit: zero-filled vector + file read + copy (warm) {hit_s:.3f} s")
    print(f"  server miss: fnv_hash again + file write + copy (cold)   {hash_s + write_s + copy_s:.3f} s "
          f"(hash {hash_s:.3f}, write {write_s:.3f}, copy {copy_s:.3f}; plus the transfer itself)")
    print(f"  => the cache path costs the warm load at least {hash_s + hit_s:.3f} s for this one tensor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
