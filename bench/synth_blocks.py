# SPDX-License-Identifier: AGPL-3.0-or-later
"""Full-size synthetic models written straight in quantized blocks: the 8B and 70B shapes without an F32 source.

    .venv/bin/python bench/synth_blocks.py --arch llama3-70b --quant Q4_K_M --out DIR
    .venv/bin/python bench/synth_blocks.py --arch llama3.2-3b --quant Q4_K_M --out DIR --compare OTHER.gguf

``bench/synth_gguf.py`` writes an F32 source and lets llama.cpp quantize it: exact, but 4 bytes a parameter on disk
first (280 GB for a 70B shape) and the quantizer's time. This writes the same model directly:

1. **The type of every tensor is llama.cpp's.** A *miniature* of the architecture (the same layers, head counts,
   experts and tensor names; every row length shrunk to a multiple of 256, so that no k-quant falls back) is written
   in F32 and quantized by ``llama_model_quantize``; the type it chose for each tensor name (Q4_K_M's Q6_K output
   layer, its Q6_K ``attn_v``/``ffn_down`` on some layers, ...) is the type of that tensor in the full file. The
   rules in llama.cpp's ``llama-quant.cpp`` look at names, layer indices, layer and head counts, not at sizes, so the
   choice carries over (``--compare`` checks it against a file llama.cpp quantized itself).
2. **Valid blocks, quantized by ggml.** For each (type, row length), a pool of random rows (normal, std 0.02, as
   synth_gguf) is quantized by ggml's own ``ggml_quantize_chunk``; each tensor's rows are drawn from its pool. The
   weights are finite and random-looking, the file has the exact size and layout of the real model's quantization.
   Norms, biases and Llama 3's rope factors are written as synth_gguf writes them; the output rows of control tokens
   are drawn from a pool scaled down, as there.

Memory: one tensor at a time (the largest, a 70B shape's output layer in Q6_K, is about 860 MB). Time: bound by
the disk (about 40 GB for a 70B Q4_K_M).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if not __package__:  # run as a file, not with python -m: import the bench package from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "bench"

from bench import synth_gguf as sg

logger = logging.getLogger("synth_blocks")

POOL_ROWS = 1024  # distinct random rows per (type, row length)
QUIET_SCALE = 0.05  # as synth_gguf: the output rows of control tokens are scaled down


def _ggml():
    from sharedllm.ggml import lib_dir

    lib = ctypes.CDLL(str(lib_dir() / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def quantize_rows(rows: np.ndarray, ggml_type: int) -> np.ndarray:
    """``rows`` (float32, n x row length) quantized to ``ggml_type`` by ggml: a uint8 array, n x row bytes."""
    lib = _ggml()
    rows = np.ascontiguousarray(rows, np.float32)
    n, width = rows.shape
    if lib.ggml_quantize_requires_imatrix(ggml_type):
        raise ValueError(f"ggml type {ggml_type} needs an importance matrix; not supported here")
    row_bytes = lib.ggml_row_size(ggml_type, width)
    out = np.empty((n, row_bytes), np.uint8)
    got = lib.ggml_quantize_chunk(ggml_type, rows.ctypes.data, out.ctypes.data, 0, n, width, None)
    if got != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {got} bytes, expected {out.nbytes}")
    return out


def miniature(d: sg.Dims) -> sg.Dims:
    """The same structure as ``d`` (layers, heads, experts) with every row length a small multiple of 256."""
    hd = 2
    while (d.n_head * hd) % 256:
        hd += 2
    return dataclasses.replace(d, n_embd=256, head_dim=hd, n_rot=hd, n_ff=512, n_vocab=2000,
                               n_ff_exp=256 if d.n_expert else 0)


def type_map(arch: str, quant: str, workdir: str | os.PathLike, dims: sg.Dims | None = None) -> dict[str, int]:
    """tensor name -> the ggml type llama.cpp's quantizer gives it in ``quant`` (from the miniature of ``dims``,
    default the full shape)."""
    from sharedllm.gguf import read_gguf

    a = sg.ARCHS[arch]
    work = Path(workdir)
    src = sg.write_f32(arch, work / f"{arch}-mini-F32.gguf", scale="mini", dims=miniature(dims or a.full))
    dst = sg.quantize(src, work / f"{arch}-mini-{quant}.gguf", quant)
    return {t.name: t.ggml_type for t in read_gguf(dst).tensors}


class _FileType:
    """A GGUFWriter whose ``general.file_type`` is the quantization's, not synth_gguf's F32."""

    def __init__(self, writer, ftype: int):
        self._w, self._ftype = writer, ftype

    def __getattr__(self, name):
        return getattr(self._w, name)

    def add_uint32(self, key: str, value: int) -> None:
        self._w.add_uint32(key, self._ftype if key == "general.file_type" else value)


def write_blocks(arch: str, quant: str, path: str | os.PathLike, *, seed: int = 0,
                 types: dict[str, int] | None = None, workdir: str | os.PathLike | None = None,
                 dims: sg.Dims | None = None) -> Path:
    """Write ``arch`` at full scale (or ``dims``) in ``quant`` to ``path`` (see the module's docstring)."""
    import gguf

    a = sg.ARCHS[arch]
    d = dims or a.full
    if types is None:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            types = type_map(arch, quant, tmp, d)
    vocab = sg.vocab_for(a, d.n_vocab)
    shapes = list(sg.tensor_shapes(a, d))
    missing = [n for n, _ in shapes if n not in types]
    if missing:
        raise RuntimeError(f"the miniature has no type for {missing[:3]}")
    order = {name: i for i, name in enumerate(types)}  # the quantizer's file order (a CPU mapping spans its tensors)
    shapes.sort(key=lambda ns: order[ns[0]])
    lib = _ggml()
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(tmp, a.arch)
    sg._metadata(_FileType(w, sg.FTYPES[quant]), a, d, vocab, "full")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's quantizer writes it
    for name, shape in shapes:
        t = types[name]
        nbytes = int(np.prod(shape[:-1])) * lib.ggml_row_size(t, shape[-1])
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    pools: dict[tuple[int, int, bool], np.ndarray] = {}

    def pool(t: int, width: int, quiet: bool = False) -> np.ndarray:
        key = (t, width, quiet)
        if key not in pools:
            rows = rng.standard_normal((POOL_ROWS, width), np.float32) * np.float32(0.02)
            if quiet:
                rows *= np.float32(QUIET_SCALE)
            pools[key] = quantize_rows(rows, t)
        return pools[key]

    total = sum(int(np.prod(s[:-1])) * lib.ggml_row_size(types[n], s[-1]) for n, s in shapes)
    done, t0, last = 0, time.monotonic(), 0.0
    for name, shape in shapes:
        t = types[name]
        if t == 0:  # F32: norms, biases, rope factors (small), as synth_gguf writes them
            data = sg._value(a, d, name, shape, vocab, rng, None)
        else:
            rows = int(np.prod(shape[:-1]))
            p = pool(t, shape[-1])
            data = p[rng.integers(0, len(p), rows)]
            if name in ("output.weight", "token_embd.weight") and (name == "output.weight" or a.tied):
                q = pool(t, shape[-1], quiet=True)
                data[vocab.quiet] = q[rng.integers(0, len(q), len(vocab.quiet))]
        w.write_tensor_data(data)
        done += data.nbytes
        if time.monotonic() - last > 5:
            last = time.monotonic()
            logger.info("%s: %.1f / %.1f GB (%.0f MB/s)", path.name, done / 1e9, total / 1e9,
                        done / 1e6 / max(last - t0, 1e-9))
    w.close()
    tmp.replace(path)
    return path


def compare(path: str | os.PathLike, other: str | os.PathLike) -> dict:
    """Tensor names, shapes, types and order of two files, and their sizes: what differs."""
    from sharedllm.gguf import read_gguf

    a, b = read_gguf(path), read_gguf(other)
    ta = {t.name: (t.ggml_type, tuple(t.shape)) for t in a.tensors}
    tb = {t.name: (t.ggml_type, tuple(t.shape)) for t in b.tensors}
    diff = {n: (ta.get(n), tb.get(n)) for n in sorted(set(ta) | set(tb)) if ta.get(n) != tb.get(n)}
    if not diff and list(ta) != list(tb):
        diff["(order)"] = (list(ta)[:4], list(tb)[:4])
    return {"tensors": len(ta), "differ": diff, "size": Path(path).stat().st_size,
            "other_size": Path(other).stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(sg.ARCHS), required=True)
    ap.add_argument("--quant", choices=[q for q in sg.FTYPES if q != "F32"], default="Q4_K_M")
    ap.add_argument("--out", default="bench/models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", help="a file of the same model quantized by llama.cpp: check types and size")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.arch}-full-{args.quant}-blocks.gguf"
    t0 = time.perf_counter()
    write_blocks(args.arch, args.quant, path, seed=args.seed, workdir=out)
    logger.info("%s: %.2f GB in %.1f s", path, path.stat().st_size / 1e9, time.perf_counter() - t0)
    if args.compare:
        c = compare(path, args.compare)
        logger.info("against %s: %d tensors, %d differ %s; size %d vs %d bytes (%+.4f%%)", args.compare,
                    c["tensors"], len(c["differ"]), dict(list(c["differ"].items())[:5]), c["size"],
                    c["other_size"], 100 * (c["size"] / c["other_size"] - 1))
        return 1 if c["differ"] else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
