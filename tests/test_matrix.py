# SPDX-License-Identifier: AGPL-3.0-or-later
"""The architecture x quantization matrix, the suite's share: every architecture once and every quantization once
(a diagonal), synthetic tiny models (bench/synth_gguf.py) through the shared 2-machine mesh. Greedy text must equal
local llama-cpp-python's, and what each rpc-server allocated must stay within the placement's estimate and at most
15% below it. The full 7 x 7 matrix: bench/bench_matrix.py (``--machines 3 4`` for N-way splits)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import common, synth_gguf
from sharedllm.gguf import GGML_TYPES, read_gguf
from tests.helpers import TWO, machine, wait_for

THREE = [*TWO, "machine-3"]
N_CTX = 1024
TOKENS = 16
# Each architecture with a different quantization; those with rows that are not a multiple of 256 (Qwen2.5 448 and
# 2368, Gemma 320, Phi-3 384, the MoE's experts 192) take k-quants and IQ4_XS, whose blocks are 256 wide.
DIAGONAL = [("llama3-8b", "Q4_K_M"), ("qwen2.5-7b", "Q6_K"), ("qwen3-8b", "Q5_K_M"), ("gemma3-4b", "IQ4_XS"),
            ("phi3-mini", "Q8_0"), ("mistral-7b", "Q4_0"), ("qwen3moe-30b-a3b", "F16")]
ODD_ROWS = {"qwen2.5-7b", "gemma3-4b", "phi3-mini", "qwen3moe-30b-a3b"}


def test_the_diagonal_covers_the_matrix():
    assert {a for a, _ in DIAGONAL} == set(synth_gguf.MATRIX_ARCHS)
    assert {q for _, q in DIAGONAL} == set(synth_gguf.QUANTS)


@pytest.mark.parametrize("name", sorted(synth_gguf.ARCHS))
def test_tiny_shapes_keep_the_structure(name):
    """A tiny variant has the real configuration's tensor names, GQA ratio, embeddings (tied or not) and experts."""
    a = synth_gguf.ARCHS[name]
    full, tiny = dict(synth_gguf.tensor_shapes(a, a.full)), dict(synth_gguf.tensor_shapes(a, a.tiny))
    per_layer = {n.split(".", 2)[2] for n in full if n.startswith("blk.")}
    assert per_layer == {n.split(".", 2)[2] for n in tiny if n.startswith("blk.")}
    assert {n for n in full if not n.startswith("blk.")} == {n for n in tiny if not n.startswith("blk.")}
    assert ("output.weight" in tiny) == (not a.tied)
    assert a.full.n_head // a.full.n_head_kv == a.tiny.n_head // a.tiny.n_head_kv
    assert bool(a.full.n_expert) == bool(a.tiny.n_expert) and bool(a.full.n_swa) == bool(a.tiny.n_swa)
    assert tiny["token_embd.weight"] == (a.tiny.n_vocab, a.tiny.n_embd)
    for shapes, d in ((full, a.full), (tiny, a.tiny)):  # every layer has the same tensors
        assert len(shapes) == len([n for n in shapes if not n.startswith("blk.")]) + d.n_layer * len(per_layer)
    # The variants that test k-quant fallbacks have matrices whose rows are not a multiple of 256.
    assert any(len(s) > 1 and s[-1] % 256 for s in tiny.values()) == (name in ODD_ROWS)


def test_a_shallow_target_and_its_drafter_give_the_same_greedy_tokens(tmp_path):
    """The speculative bench's synthetic pair: a target whose layers past the second add nothing and a drafter of
    those two layers give the same greedy tokens (the drafter agrees, the target costs its whole shape), and neither
    picks a byte a streaming decoder would hold back."""
    import dataclasses

    import llama_cpp

    a = synth_gguf.ARCHS["llama3.2-3b-untied"]
    src = synth_gguf.write_f32(a.name, tmp_path / "target-F32.gguf", dims=dataclasses.replace(a.tiny, n_layer=8),
                               shallow=2, seed=1)
    target = synth_gguf.quantize(src, tmp_path / "target-Q4_K_M.gguf", "Q4_K_M")
    paths = [target, synth_gguf.truncate(target, tmp_path / "draft-Q4_K_M.gguf", 2)]
    assert read_gguf(paths[1]).metadata["llama.block_count"] == 2
    assert {t.name for t in read_gguf(paths[1]).tensors} < {t.name for t in read_gguf(target).tensors}
    texts = []
    for path in paths:
        llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, verbose=False)
        try:
            tokens = llm.tokenize(common.SYNTH_PROMPT.encode(), add_bos=True)
            out = []
            for tok in llm.generate(tokens, top_k=1, temp=0.0):
                out.append(tok)
                if len(out) == 24:
                    break
            texts.append((out, [llm.detokenize([t]) for t in out]))
        finally:
            llm.close()
    (want, pieces), (drafted, _) = texts
    assert want == drafted
    assert all(p and p.isascii() for p in pieces), pieces
    assert len(set(want)) >= 4, "a token or two over and over would prove little"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.mark.mesh
@pytest.mark.parametrize(("arch", "quant"), DIAGONAL)
def test_mesh_greedy_and_memory_match(mesh, synth_dir, arch, quant):
    path = synth_gguf.synthesize(arch, quant, synth_dir)
    g = read_gguf(path)
    vocab = synth_gguf.vocab_for(synth_gguf.ARCHS[arch], synth_gguf.ARCHS[arch].tiny.n_vocab)
    assert len(g.metadata["tokenizer.ggml.tokens"]) == len(vocab.tokens) == g.tensor("token_embd.weight").shape[1]
    # llama.cpp's quantizer gave the rows that are not a multiple of a 256-wide block another type.
    for t in g.tensors:
        assert t.shape[0] % GGML_TYPES[t.ggml_type][1] == 0
    odd = [t for t in g.tensors if len(t.shape) > 1 and t.shape[0] % 256]
    assert bool(odd) == (arch in ODD_ROWS)
    if quant in ("Q6_K", "Q5_K_M", "Q4_K_M", "IQ4_XS"):
        assert all(GGML_TYPES[t.ggml_type][1] < 256 for t in odd)

    from sharedllm.engine import build_llama

    llm = build_llama(str(path), n_ctx=N_CTX, n_threads=2, use_extra_bufts=False)
    try:
        local = llm.create_completion(common.SYNTH_PROMPT, max_tokens=TOKENS, temperature=0)
    finally:
        llm.close()
    with mesh.load(str(path), n_ctx=N_CTX, machines=TWO, verbose=True) as h:
        assert h.topology.machines == TWO
        out = h.create_completion(common.SYNTH_PROMPT, max_tokens=TOKENS, temperature=0)
        devices, client = common.engine_buffers(Path(h._engine.log_path).read_text(errors="replace"))
        stages, estimate = h.topology.stages, h.estimate
    text = out["choices"][0]["text"]
    assert text.strip(), "the random model produced no visible text: the comparison would prove nothing"
    assert text == local["choices"][0]["text"]
    assert len(devices) == len(stages) == 2
    for stage, buffers in zip(stages, devices, strict=True):
        report = common.stage_report(stage, buffers)
        assert report["measured"]["weights"] > 0 and report["measured"]["compute"] > 0, buffers
        # The estimate follows llama.cpp's graph without flash attention, byte for byte (the three-way split below
        # holds it to that); with flash attention, the default, no KQ product is allocated: it bounds the buffers.
        assert report["bound"], report
    assert sum(v for k, v in client.items() if k.startswith("model:")) == pytest.approx(estimate.input_bytes,
                                                                                          abs=0.01 * (1 << 20))


@pytest.mark.mesh
def test_three_way_split_each_stage_kind_within_its_estimate(mesh_cluster, mesh, synth_dir):
    """A 3-way split of a tiny untied Llama 3 70B shape, its output layer on the mesh: the middle stage receives two
    hidden states from the machine before it (the residual stream and its norm, four copies each under pipeline
    parallelism), the first one from the client, the last one holds the logits. Each stays within its estimate, which
    models llama.cpp's graph without flash attention (its KQ products) to the byte."""
    mesh_cluster.add_machine("machine-3")
    try:
        wait_for(lambda: (m := machine(mesh, "machine-3")) and m["rpc"]["state"] == "ready" and m["rpc"]["relay"],
                 timeout=90, what="machine-3's rpc-server and relay")
        path = synth_gguf.synthesize("llama3-70b", "Q4_K_M", synth_dir)
        with mesh.load(str(path), n_ctx=N_CTX, machines=THREE, verbose=True, output_layer="mesh",
                       flash_attn=False) as h:
            assert h.topology.machines == THREE and not h.topology.output_on_client
            devices, _ = common.engine_buffers(Path(h._engine.log_path).read_text(errors="replace"))
            stages = h.topology.stages
    finally:
        mesh_cluster.stop_machine("machine-3")
        wait_for(lambda: machine(mesh, "machine-3") is None, what="machine-3 to leave")
    assert len(devices) == len(stages) == 3
    first, middle, last = (common.stage_report(s, b) for s, b in zip(stages, devices, strict=True))
    for report in (first, middle, last):
        assert report["ok"], report
    assert stages[1].compute_bytes > stages[0].compute_bytes
    assert middle["measured"]["compute"] > first["measured"]["compute"]
