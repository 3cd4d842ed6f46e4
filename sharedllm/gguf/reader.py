# SPDX-License-Identifier: AGPL-3.0-or-later
"""GGUF reader. Pure Python: no llama.cpp, no Dask.

``read_gguf`` validates a model file completely (header, metadata, tensor infos, tensor data bounds) before anything
else touches it, so that a bad download fails here with one clear line instead of deep inside an rpc-server.

Format (GGUF v2/v3, little-endian): magic ``GGUF``, u32 version, u64 tensor_count, u64 kv_count, the metadata
key/value pairs, the tensor infos, padding up to ``general.alignment``, then the tensor data.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import stat
import struct
from dataclasses import dataclass
from math import prod
from typing import Any

from sharedllm.errors import InvalidModel, ModelNotFound

log = logging.getLogger("sharedllm.gguf")

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Limits that keep a corrupt or hostile file from costing memory or time, whatever its size; every real model is far
# below them. Counts and lengths are also bounded by the bytes left in the file.
# Values bigger than these are validated but kept only as a Skipped (their length): the tokenizer vocab, scores and
# merges (262k entries for Gemma) or an embedded tokenizer.json are of no use to SharedLLM, and GGUFFile travels over
# Dask RPC, so it should stay small.
MAX_ARRAY_KEEP = 1024  # items
MAX_STRING_KEEP = 1 << 20  # bytes
MAX_KEPT_BYTES = 64 << 20  # all kept strings and array items together; beyond it values are skipped
MAX_WALK = 1 << 24  # string and nested-array items walked one by one: ~3 s of Python at worst
MAX_ARRAY_DEPTH = 8
MAX_KEY = 1 << 16  # bytes in a metadata key
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 18
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 63  # GGML_MAX_NAME is 64 including the NUL

# ggml_type -> (name, elements per block, bytes per block), from ggml/include/ggml.h `enum ggml_type` and the
# `type_traits` of ggml/src/ggml.c (llama.cpp vendored by llama-cpp-python 0.3.36; block sizes checked with sizeof()
# of the ggml-common.h structs). Numbers 4, 5, 31-33 and 36-38 are types ggml removed: files using them are refused.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
    42: ("Q2_0", 64, 18),
}

# GGUF metadata value types.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_FMT = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
               UINT64: "Q", INT64: "q", FLOAT64: "d"}  # fmt: skip
_SCALAR = {t: struct.Struct("<" + f) for t, f in _SCALAR_FMT.items()}
# The fewest bytes one value of each type takes: bounds every count by the bytes left, so no count can make the
# reader allocate or loop beyond the size of the file.
_MIN_SIZE = {**{t: s.size for t, s in _SCALAR.items()}, STRING: 8, ARRAY: 12}
_U32, _U64 = _SCALAR[UINT32], _SCALAR[UINT64]
BLOCK_NAME = re.compile(r"blk\.(\d+)\.")
_ARCH = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Skipped:
    """Stands in for a metadata value too big to keep (see MAX_ARRAY_KEEP): its bounds were validated.

    ``value_type`` is STRING (``length`` in bytes) or ARRAY (``length`` items of ``item_type``); ``len()`` works.
    """

    value_type: int
    length: int
    item_type: int | None = None

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF/ggml order: shape[0] is the row length (ne0)
    ggml_type: int
    offset: int  # absolute file offset
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]


@dataclass(frozen=True)
class GGUFFile:
    """A validated GGUF file. ``metadata`` holds ints, floats, bools, strs, lists, and Skipped for big values."""

    path: str
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int
    header_bytes: int | None = None  # of a remote file: the bytes fetched to read its header (sharedllm.gguf_remote)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def n_layer(self) -> int:
        return self.metadata[f"{self.architecture}.block_count"]

    def get(self, key: str, default: Any = None) -> Any:
        """``metadata[key]``, or ``metadata[f"{arch}.{key}"]``: ``get("block_count")`` works for any architecture."""
        if key in self.metadata:
            return self.metadata[key]
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


_REDOWNLOAD = "re-download the model"


def _short(value: Any) -> str:
    """A value from the file, for a message: repr keeps it on one line, the cut keeps the line short."""
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


class Cursor:
    """Bounds-checked little-endian reads over the mapped file. ``what`` names the part being read, for errors."""

    __slots__ = ("buf", "kept", "path", "pos", "size", "walk", "what")

    def __init__(self, buf, size: int, path: str):
        self.buf, self.size, self.path, self.pos, self.what = buf, size, path, 0, "the header"
        self.kept, self.walk = MAX_KEPT_BYTES, MAX_WALK  # budgets left

    def invalid(self, problem: str) -> InvalidModel:
        return InvalidModel(f"{self.path}: {problem}; {_REDOWNLOAD}", self.path)

    def need(self, n: int) -> None:
        if n > self.size - self.pos:
            raise self.invalid(
                f"truncated GGUF: {self.what} needs {n} bytes at byte {self.pos} but the file has {self.size} bytes"
            )

    def scalar(self, st: struct.Struct):
        self.need(st.size)
        (value,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return value

    def count(self, n: int, min_size: int, noun: str, limit: int | None = None) -> int:
        """Refuse a count whose items cannot fit in the rest of the file, or that exceeds ``limit``."""
        if n * min_size > self.size - self.pos or (limit is not None and n > limit):
            room = f"more than the {self.size - self.pos} bytes left in the file can hold"
            raise self.invalid(f"corrupt GGUF: {self.what} claims {n} {noun}, {room if limit is None else 'too many'}")
        return n

    def string(self, limit: int) -> str:
        n = self.count(self.scalar(_U64), 1, "string bytes", limit)
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")  # llama.cpp does not check UTF-8 either

    def keep(self, n: int) -> bool:
        """Take ``n`` bytes from the budget of kept values, if there are enough left."""
        if n > self.kept:
            return False
        self.kept -= n
        return True

    def skip_strings(self, n: int) -> None:
        buf, pos, size, u64 = self.buf, self.pos, self.size, _U64.unpack_from
        for _ in range(n):  # the hot loop of a 262k-entry vocab: keep it plain
            if pos + 8 > size:
                self.pos = pos
                self.need(8)
            (length,) = u64(buf, pos)
            pos += 8
            if length > size - pos:
                self.pos = pos
                self.count(length, 1, "string bytes")
            pos += length
        self.pos = pos

    def value(self, vtype: int, depth: int = 0, keep: bool = True):
        """One metadata value; with ``keep`` false (inside a skipped array) only its bounds are checked."""
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == STRING:
            n = self.count(self.scalar(_U64), 1, "string bytes")
            short = depth == 0 and n <= 256  # a key's own short value (general.architecture...): always kept
            keep = keep and (short or (n <= MAX_STRING_KEEP and self.keep(n + 64)))
            raw = self.buf[self.pos : self.pos + n] if keep else b""
            self.pos += n
            return raw.decode("utf-8", "replace") if keep else Skipped(STRING, n)
        if vtype != ARRAY:
            raise self.invalid(f"corrupt GGUF: {self.what} has unknown value type {vtype}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.invalid(f"corrupt GGUF: {self.what} nests arrays deeper than {MAX_ARRAY_DEPTH} levels")
        item_type = self.scalar(_U32)
        if item_type not in _MIN_SIZE:
            raise self.invalid(f"corrupt GGUF: {self.what} has arrays of unknown value type {item_type}")
        n = self.count(self.scalar(_U64), _MIN_SIZE[item_type], "array items")
        keep = keep and n <= MAX_ARRAY_KEEP and self.keep(8 * n + 64)
        items = None
        if item_type in _SCALAR:  # read at once, or skipped without a loop
            if keep:
                items = list(struct.unpack_from(f"<{n}{_SCALAR_FMT[item_type]}", self.buf, self.pos))
            self.pos += n * _SCALAR[item_type].size  # count() checked the bounds
        else:  # strings and nested arrays are walked item by item
            self.walk -= n
            if self.walk < 0:
                raise self.invalid(f"corrupt GGUF: the metadata holds more than {MAX_WALK} strings and arrays")
            if keep:
                items = [self.value(item_type, depth + 1) for _ in range(n)]
            elif item_type == STRING:
                self.skip_strings(n)
            else:
                for _ in range(n):
                    self.value(item_type, depth + 1, keep=False)
        return items if keep else Skipped(ARRAY, n, item_type)


def _open(path: str | os.PathLike) -> tuple[str, int, Any]:
    """Open and map the file; ModelNotFound for everything that keeps us from reading it."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ModelNotFound(f"{p}: model file not found; check the path or download the model first", p) from None
    except OSError as e:
        raise ModelNotFound(f"{p}: cannot access the model file ({e.strerror}); check the path", p) from None
    if stat.S_ISDIR(st.st_mode):
        raise ModelNotFound(f"{p}: is a directory, not a GGUF file; pass the path of the .gguf file in it", p)
    if not stat.S_ISREG(st.st_mode):
        raise ModelNotFound(f"{p}: not a regular file; pass the path of a .gguf model file", p)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise InvalidModel(f"{p}: empty file, not a GGUF model; {_REDOWNLOAD}", p)
            # A read-only map: the header is parsed in place and the tensor data is never paged in.
            return p, size, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise ModelNotFound(f"{p}: cannot read the model file ({e.strerror}); check its permissions", p) from None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Read and validate a GGUF model file. Raises ModelNotFound or InvalidModel with a one-line message."""
    p, size, mm = _open(path)
    try:
        return parse(Cursor(mm, size, p))
    finally:
        mm.close()


def parse(cur: Cursor) -> GGUFFile:
    p, size = cur.path, cur.size
    magic = cur.buf[:4]
    if magic != GGUF_MAGIC:
        raise InvalidModel(f"{p}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); pass a .gguf model", p)
    cur.pos = 4
    version = cur.scalar(_U32)
    if version not in SUPPORTED_VERSIONS:
        hint = " (big-endian GGUF?)" if version and version & 0xFFFF == 0 else ""
        raise InvalidModel(
            f"{p}: unsupported GGUF version {version}{hint}; SharedLLM reads versions 2 and 3, convert the model "
            f"with a recent llama.cpp",
            p,
        )
    n_tensors, n_kv = cur.scalar(_U64), cur.scalar(_U64)
    cur.what = "the header"
    cur.count(n_tensors, 24, "tensors", MAX_TENSORS)  # name length + n_dims + type + offset
    cur.count(n_kv, 14, "metadata keys", MAX_KEYS)  # key length + 1 byte key + type + 1 byte value

    metadata: dict[str, Any] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        cur.what = f"metadata key #{i}"
        key = cur.string(MAX_KEY)
        if not key or key in metadata:
            raise cur.invalid(f"corrupt GGUF: metadata key #{i} {key!r} is empty or a duplicate")
        cur.what = f"metadata key {key!r}"
        vtype = cur.scalar(_U32)
        metadata[key] = cur.value(vtype)
        if key == "general.alignment":
            alignment = metadata[key]
            if vtype != UINT32 or alignment <= 0 or alignment & (alignment - 1):
                raise cur.invalid(f"corrupt GGUF: general.alignment {_short(alignment)} is not a power of 2 uint32")

    tensors: list[tuple[str, tuple[int, ...], int, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        cur.what = f"tensor info #{i}"
        name = cur.string(MAX_NAME)
        if name in names:
            raise cur.invalid(f"corrupt GGUF: tensor #{i} name {name!r} is a duplicate")
        names.add(name)
        cur.what = f"tensor {name!r}"
        n_dims = cur.scalar(_U32)
        if n_dims > MAX_DIMS:
            raise cur.invalid(f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions, ggml allows {MAX_DIMS}")
        shape = tuple(cur.scalar(_U64) for _ in range(n_dims))
        ggml_type = cur.scalar(_U32)
        if ggml_type not in GGML_TYPES:
            raise InvalidModel(
                f"{p}: tensor {name!r} has unknown ggml type {ggml_type}; re-download the model, or update "
                f"SharedLLM if the model needs a newer llama.cpp",
                p,
            )
        tname, block, type_size = GGML_TYPES[ggml_type]
        if any(d >= 1 << 63 for d in shape) or (shape[0] if shape else 1) % block:
            raise cur.invalid(f"corrupt GGUF: tensor {name!r} of type {tname} has an impossible shape {shape}")
        nbytes = prod(shape) // block * type_size
        tensors.append((name, shape, ggml_type, cur.scalar(_U64), nbytes))

    cur.what = "the tensor data section"
    data_offset = -(-cur.pos // alignment) * alignment
    if not tensors:
        raise cur.invalid("GGUF has no tensors (a vocab-only file?); use a full model file")
    if data_offset > size:
        raise cur.invalid(f"truncated GGUF: tensor data starts at byte {data_offset} but the file has {size} bytes")
    infos, expected = [], 0
    for name, shape, ggml_type, rel, nbytes in tensors:
        end = data_offset + rel + nbytes
        if end > size:
            raise cur.invalid(f"truncated GGUF: tensor {name!r} data ends at byte {end} but the file has {size} bytes")
        # llama.cpp's loader wants the data packed in tensor-info order, each tensor padded to the alignment.
        if rel != expected:
            raise cur.invalid(f"corrupt GGUF: tensor {name!r} has data offset {rel}, expected {expected}")
        expected += -(-nbytes // alignment) * alignment
        infos.append(TensorInfo(name, shape, ggml_type, data_offset + rel, nbytes))

    _check_model(cur, metadata, infos)
    return GGUFFile(cur.path, version, metadata, tuple(infos), data_offset, size)


def _check_model(cur: Cursor, metadata: dict[str, Any], tensors: list[TensorInfo]) -> None:
    """What llama.cpp needs to even pick a model class: an architecture and a sane block count."""
    arch = metadata.get("general.architecture")
    if arch is None:
        raise InvalidModel(
            f"{cur.path}: GGUF metadata has no general.architecture, so it is not a llama.cpp model; "
            f"convert the model with llama.cpp's convert_hf_to_gguf.py",
            cur.path,
        )
    if not isinstance(arch, str) or not _ARCH.fullmatch(arch):
        raise cur.invalid(f"corrupt GGUF: general.architecture {_short(arch)} is not an architecture name")
    n_layer = metadata.get(f"{arch}.block_count")
    if n_layer is None and not any(k.startswith(f"{arch}.") for k in metadata):
        raise InvalidModel(
            f"{cur.path}: GGUF metadata has no {arch}.* hyperparameters: llama.cpp does not know an architecture "
            f"{arch!r}, or the file was renamed or damaged; use a model of an architecture llama.cpp supports",
            cur.path,
        )
    if type(n_layer) is not int or not 0 < n_layer <= len(tensors):
        raise cur.invalid(
            f"corrupt GGUF: {arch}.block_count is {_short(n_layer)}, expected a layer count between 1 and the "
            f"{len(tensors)} tensors"
        )
    seen = set()
    for t in tensors:
        m = BLOCK_NAME.match(t.name)
        if m:
            seen.add(int(m[1]))
            if int(m[1]) >= n_layer:
                raise cur.invalid(f"corrupt GGUF: tensor {t.name!r} is beyond {arch}.block_count {n_layer}")
    if len(seen) < n_layer:
        log.warning("%s: %d of %d layers have no blk.N tensors", cur.path, n_layer - len(seen), n_layer)
    _check_hyperparameters(cur, arch, metadata)


# Hyperparameters ggml asserts on at compute time, inside whichever rpc-server runs the op (a load succeeds, then the
# first token aborts every server it reaches): key suffix -> (the test a value must pass, what llama.cpp needs).
_ASSERTED: dict[str, tuple[Any, str]] = {
    "attention.layer_norm_rms_epsilon": (lambda v: v >= 0, ">= 0 (GGML_ASSERT(eps >= 0.0f) in rms_norm)"),
    "attention.layer_norm_epsilon": (lambda v: v >= 0, ">= 0 (GGML_ASSERT(eps >= 0.0f) in norm)"),
    "rope.freq_base": (lambda v: v > 0, "> 0"),
    "rope.scaling.factor": (lambda v: v >= 0, ">= 0"),
    "attn_logit_softcapping": (lambda v: v >= 0, ">= 0"),
    "final_logit_softcapping": (lambda v: v >= 0, ">= 0"),
}


def _check_hyperparameters(cur: Cursor, arch: str, metadata: dict[str, Any]) -> None:
    """Refuse, before a byte moves, the hyperparameters that would make rpc-servers abort: an honest machine would
    crash on them and take the blame (a poisoned model)."""
    for suffix, (ok, need) in _ASSERTED.items():
        key = f"{arch}.{suffix}"
        value = metadata.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
            raise InvalidModel(
                f"{cur.path}: GGUF metadata {key} is {_short(value)}, llama.cpp needs a finite number {need}: it "
                "would abort every machine that runs the model; the file is damaged or was tampered with, "
                f"{_REDOWNLOAD} from its source", cur.path)
    n_expert, n_used = metadata.get(f"{arch}.expert_count"), metadata.get(f"{arch}.expert_used_count")
    if type(n_expert) is int and type(n_used) is int and not n_used <= n_expert:
        raise InvalidModel(
            f"{cur.path}: GGUF metadata {arch}.expert_used_count {n_used} exceeds {arch}.expert_count {n_expert}; "
            f"{_REDOWNLOAD}", cur.path)


def int_param(gguf: GGUFFile, key: str, default: int | None = None) -> int:
    value = gguf.get(key, default)
    if type(value) is not int or value < 0:
        raise InvalidModel(
            f"{gguf.path}: GGUF metadata {gguf.architecture}.{key} is {_short(value)}, expected a count; {_REDOWNLOAD}",
            gguf.path,
        )
    return value


def per_layer(gguf: GGUFFile, key: str, default: int) -> tuple[int, ...]:
    """A hyperparameter that is either one int or an array with one int per layer (OpenELM, hybrid models...)."""
    n_layer = gguf.n_layer
    value = gguf.get(key, default)
    if isinstance(value, list) and len(value) == n_layer and all(type(v) is int and v >= 0 for v in value):
        return tuple(value)
    return (int_param(gguf, key, default),) * n_layer


def ties_embeddings(gguf: GGUFFile) -> bool:
    """True when the model has no ``output.weight``: its token embeddings double as the output projection."""
    return gguf.tensor("output.weight") is None and gguf.tensor("token_embd.weight") is not None
