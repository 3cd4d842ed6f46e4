# SPDX-License-Identifier: AGPL-3.0-or-later
"""bench/synth_blocks.py, the writer of the 8B/70B-shaped models for the GPU check: the file it writes straight in
quantized blocks has the tensors, types and size of llama.cpp's own quantization of the same shape, and generates
finite tokens."""

from __future__ import annotations

import dataclasses
import math

import pytest

synth_gguf = pytest.importorskip("bench.synth_gguf")  # needs numpy and gguf (the [test] extra)
synth_blocks = pytest.importorskip("bench.synth_blocks")


@pytest.mark.parametrize("arch", ["llama3-70b", "phi3-mini"])
def test_blocks_match_llama_cpp_quantization(arch, tmp_path):
    # A shape of the architecture's structure (its heads, GQA, fused tensors; row lengths multiples of 256) small
    # enough to quantize here from F32: what llama.cpp writes is the reference.
    a = synth_gguf.ARCHS[arch]
    hd = synth_blocks.miniature(a.full).head_dim
    dims = dataclasses.replace(a.full, n_embd=a.full.n_head * hd, head_dim=hd, n_rot=hd, n_ff=768, n_vocab=2000,
                               n_layer=6)
    src = synth_gguf.write_f32(arch, tmp_path / "ref-F32.gguf", scale="test", dims=dims)
    ref = synth_gguf.quantize(src, tmp_path / "ref-Q4_K_M.gguf", "Q4_K_M")
    out = synth_blocks.write_blocks(arch, "Q4_K_M", tmp_path / "blocks.gguf", dims=dims, workdir=tmp_path)
    c = synth_blocks.compare(out, ref)
    assert c["differ"] == {} and c["size"] == c["other_size"], c

    from sharedllm.engine import build_llama

    llm = build_llama(str(out), n_ctx=128, use_extra_bufts=False, verbose=False, logits_all=True)
    try:
        r = llm.create_completion("Once upon a time", max_tokens=4, temperature=0, logprobs=1)
    finally:
        llm.close()
    lps = r["choices"][0]["logprobs"]["token_logprobs"]
    assert lps and all(math.isfinite(x) for x in lps), lps
