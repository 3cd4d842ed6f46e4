# SPDX-License-Identifier: AGPL-3.0-or-later
"""Synthetic GGUF models for tests and benchmarks: random weights, real metadata, real tensor names and shapes.

    .venv/bin/python bench/synth_gguf.py --arch llama3-8b --quant Q4_K_M --out DIR [--scale tiny|full]
    .venv/bin/python bench/synth_gguf.py --list

Each architecture is a real configuration (Llama 3.1 8B and 70B, Llama 3.2 3B, Qwen2.5 7B, Qwen3 8B, Gemma 3 4B,
Phi-3 mini, Mistral 7B v0.3, Qwen3-30B-A3B) written with the keys, tensor names and shapes ``convert_hf_to_gguf.py``
gives it, and a ``tiny`` variant of the same structure (GQA ratio, tied or untied embeddings, Qwen2's QKV biases,
QK-norm, Gemma's sliding-window pattern and extra norms, Phi-3's fused QKV and gate-up, MoE experts) with small
dimensions, several of them row lengths that are not a multiple of 256 (k-quants cannot take those rows, llama.cpp's
quantizer then picks another type for them: part of what the matrix verifies).

The weights are random (normal, std 0.02; norms 1) so that activations stay small and generation finite. The
output rows of control tokens and of end-of-generation are scaled down so that greedy text runs its full length
in visible tokens. The tokenizer is real but small: a byte-level BPE (``gpt2``, for the Llama 3 and Qwen models)
or a SentencePiece-style vocab with byte fallback (``llama``, for Gemma, Phi-3 and Mistral), both learned here from
a short embedded text, padded with reserved control tokens to the variant's ``n_vocab``.

A model is written once in F32 (``<name>-F32.gguf``) and quantized from it by llama.cpp itself
(``llama_model_quantize``), so every per-tensor type choice (Q4_K_M's Q6_K layers, the fallbacks for rows that are
not a multiple of 256) is llama.cpp's own. Files are reused when they exist with the same synthesizer version.
``--scale full`` writes the real shapes: the F32 source streams tensor by tensor, filled from a pool of random rows,
but it needs 4 bytes a parameter on disk (32 GB for 8B), then the quantizer's time.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

VERSION = 1  # bump when the output changes: cached files of another version are rewritten
SHALLOW_GAIN = 10.0  # write_f32(shallow=...): the output matrix's scale, so that greedy tokens are likely ones

QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS")
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "IQ4_XS": 30}


@dataclass(frozen=True)
class Dims:
    """The hyperparameters that set tensor shapes."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    head_dim: int | None = None  # None: n_embd // n_head (no key_length / value_length keys written)
    n_ctx_train: int = 4096
    n_swa: int = 0  # sliding window (metadata only for Phi-3: llama.cpp disables its SWA)
    n_rot: int | None = None  # rope dimensions, None: head_dim
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0


@dataclass(frozen=True)
class Arch:
    """One real model configuration and its tiny variant."""

    name: str
    arch: str  # general.architecture
    full: Dims
    tiny: Dims
    tokenizer: str  # "bpe" or "spm"
    pre: str  # tokenizer.ggml.pre
    rope_base: float
    eps: float
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    rope_freqs: bool = False  # Llama 3.1's rope scaling factors tensor
    rope_factor: float = 8.0  # its scaling factor (Llama 3.1: 8, Llama 3.2: 32)
    fused: bool = False  # Phi-3: attn_qkv and a gate+up ffn_up
    gemma: bool = False  # Gemma 3: post-norms, embeddings scaled, GELU
    extra: dict = field(default_factory=dict)  # further {arch}.* metadata


ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("llama3-8b", "llama",
         Dims(4096, 32, 32, 8, 14336, 128256, n_ctx_train=131072),
         Dims(512, 4, 8, 2, 1792, 2000),
         "bpe", "llama-bpe", 500000.0, 1e-5, rope_freqs=True),
    Arch("llama3-70b", "llama",
         Dims(8192, 80, 64, 8, 28672, 128256, n_ctx_train=131072),
         Dims(512, 8, 8, 1, 1792, 2000),
         "bpe", "llama-bpe", 500000.0, 1e-5, rope_freqs=True),
    Arch("llama3.2-3b", "llama",
         Dims(3072, 28, 24, 8, 8192, 128256, n_ctx_train=131072),
         Dims(768, 4, 6, 2, 2048, 2000),
         "bpe", "llama-bpe", 500000.0, 1e-5, tied=True, rope_freqs=True, rope_factor=32.0),
    # Llama 3.2 3B with an output matrix of its own: a model whose tokens do not echo its input embeddings (with
    # them tied, a random model repeats its last token), for the speculative bench's shallow target.
    Arch("llama3.2-3b-untied", "llama",
         Dims(3072, 28, 24, 8, 8192, 128256, n_ctx_train=131072),
         Dims(768, 4, 6, 2, 2048, 2000),
         "bpe", "llama-bpe", 500000.0, 1e-5, rope_freqs=True, rope_factor=32.0),
    Arch("qwen2.5-7b", "qwen2",
         Dims(3584, 28, 28, 4, 18944, 152064, n_ctx_train=32768),
         Dims(448, 4, 7, 1, 2368, 2100),
         "bpe", "qwen2", 1000000.0, 1e-6, qkv_bias=True),
    Arch("qwen3-8b", "qwen3",
         Dims(4096, 36, 32, 8, 12288, 151936, head_dim=128, n_ctx_train=40960),
         Dims(512, 4, 8, 2, 1536, 2100, head_dim=128),
         "bpe", "qwen2", 1000000.0, 1e-6, qk_norm=True),
    Arch("gemma3-4b", "gemma3",
         Dims(2560, 34, 8, 4, 10240, 262144, head_dim=256, n_ctx_train=131072, n_swa=1024),
         Dims(320, 12, 4, 2, 1280, 2304, head_dim=256, n_swa=128),
         "spm", "default", 1000000.0, 1e-6, tied=True, qk_norm=True, gemma=True),
    Arch("phi3-mini", "phi3",
         Dims(3072, 32, 32, 32, 8192, 32064, n_ctx_train=4096, n_swa=2047),
         Dims(384, 4, 6, 6, 1024, 1600, n_swa=2047),
         "spm", "default", 10000.0, 1e-5, fused=True),
    Arch("mistral-7b", "llama",
         Dims(4096, 32, 32, 8, 14336, 32768, n_ctx_train=32768),
         Dims(512, 4, 8, 2, 1792, 1800),
         "spm", "default", 1000000.0, 1e-5),
    Arch("qwen3moe-30b-a3b", "qwen3moe",
         Dims(2048, 48, 32, 4, 6144, 151936, head_dim=128, n_ctx_train=40960,
              n_expert=128, n_expert_used=8, n_ff_exp=768),
         Dims(256, 4, 8, 1, 768, 2000, head_dim=64, n_expert=8, n_expert_used=2, n_ff_exp=192),
         "bpe", "qwen2", 1000000.0, 1e-6, qk_norm=True),
)}
# One configuration per architecture family: the rows of the verified matrix.
MATRIX_ARCHS = ("llama3-8b", "qwen2.5-7b", "qwen3-8b", "gemma3-4b", "phi3-mini", "mistral-7b", "qwen3moe-30b-a3b")

# --- a small real tokenizer ----------------------------------------------------------------------------------------

CORPUS = """\
Once upon a time there was a little town by the sea. Every morning the people of the town walked to the harbour to
see the boats come in. The children ran along the water and the old men sat in the sun and talked about the weather.
One day a stranger came to the town with a box of books. He said that he wanted to build a library, a place where
everyone could read and learn. The people were not sure at first, but the children loved the idea. They helped him
carry the books, they painted the walls, and they made a sign for the door. Soon the library was the heart of the
town. In the evening families came to read stories together, and the stranger told them about the places he had
seen: mountains covered in snow, forests full of birds, cities with bright lights and machines that could think.
"What is a machine that thinks?" asked a girl named Anna. "It is a very large table of numbers," said the stranger,
"and when you ask it a question, it looks at every word you wrote and guesses the next one, then the next, and so
on, until the answer is complete." Anna laughed. "Then I am a machine too, because I always guess what my brother
will say before he says it." The stranger smiled, and from that day on the town had two storytellers instead of one.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Punctuation: (a, b; c: d!) [e] {f} 'g' - h / i * j + k = l ? @ # % & _ ~
"""

_WORDS = re.compile(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+")


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable unicode character table (what byte-level BPE vocabularies store)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def _learn_merges(words: Counter, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair, for determinism)."""
    seqs = {w: list(w) for w in words}
    merges = []
    while len(merges) < n_merges:
        pairs: Counter = Counter()
        for w, count in words.items():
            s = seqs[w]
            for a, b in itertools.pairwise(s):
                pairs[a, b] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model
    tokens: list[str]
    types: list[int]  # 1 normal, 2 unknown, 3 control, 6 byte
    scores: list[float] | None
    merges: list[str] | None
    special: dict[str, int]  # bos, eos, unk, pad, eot ...
    add_bos: bool
    quiet: list[int]  # token ids whose output rows are scaled down (control tokens, end of generation)


def bpe_vocab(n_vocab: int, specials: list[str], bos: str, eos: str, eot: str | None, add_bos: bool) -> Vocab:
    """A byte-level BPE vocab of exactly ``n_vocab`` tokens: 256 bytes, merges, padding, then the specials."""
    chars = _byte_chars()
    enc = {b: chars[b] for b in range(256)}
    words = Counter("".join(enc[b] for b in w.encode()) for w in _WORDS.findall(CORPUS))
    n_pad_min = 8
    budget = n_vocab - 256 - len(specials) - n_pad_min
    merges = _learn_merges(words, budget)
    tokens = chars + [a + b for a, b in merges]
    types = [1] * len(tokens)
    n_pad = n_vocab - len(tokens) - len(specials)
    tokens += [f"<|reserved_special_token_{i}|>" for i in range(n_pad)] + specials
    types += [3] * (n_pad + len(specials))
    ids = {t: i for i, t in enumerate(tokens)}
    special = {"bos": ids[bos], "eos": ids[eos]}
    if eot:
        special["eot"] = ids[eot]
    quiet = [i for i, t in enumerate(types) if t == 3]
    return Vocab("gpt2", tokens, types, None, [f"{a} {b}" for a, b in merges], special, add_bos, quiet)


def spm_vocab(n_vocab: int, head: list[str], bos: str, eos: str, unk: str, pad: str | None, add_bos: bool,
              pad_name: str = "<unused{}>") -> Vocab:
    """A SentencePiece-style vocab (llama.cpp's ``llama`` tokenizer) of exactly ``n_vocab`` tokens: the special
    ``head``, 256 byte-fallback tokens, the characters and merges of the corpus scored by merge order, padding."""
    sp = "\u2581"
    text_words = Counter(sp + w.strip() for w in CORPUS.split())
    alphabet = sorted({c for w in text_words for c in w})
    budget = n_vocab - len(head) - 256 - len(alphabet) - 8
    merges = _learn_merges(text_words, budget)
    tokens = list(head) + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * len(head) + [6] * 256
    scores = [0.0] * len(tokens)
    pieces = alphabet + [a + b for a, b in merges]
    for rank, piece in enumerate(pieces):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    n_pad = n_vocab - len(tokens)
    tokens += [pad_name.format(i) for i in range(n_pad)]
    types += [3] * n_pad
    scores += [-1e9] * n_pad
    ids = {t: i for i, t in enumerate(tokens)}
    types[ids[unk]] = 2
    special = {"bos": ids[bos], "eos": ids[eos], "unk": ids[unk]}
    if pad:
        special["pad"] = ids[pad]
    quiet = [i for i, t in enumerate(types) if t in (2, 3)]
    return Vocab("llama", tokens, types, scores, None, special, add_bos, quiet)


def vocab_for(a: Arch, n_vocab: int) -> Vocab:
    if a.name.startswith("llama3"):
        return bpe_vocab(n_vocab, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                   "<|end_header_id|>", "<|eot_id|>"],
                         "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", add_bos=True)
    if a.tokenizer == "bpe":  # the Qwen family
        return bpe_vocab(n_vocab, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                         "<|endoftext|>", "<|im_end|>", "<|im_end|>", add_bos=False)
    if a.gemma:
        return spm_vocab(n_vocab, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                         "<bos>", "<eos>", "<unk>", "<pad>", add_bos=True)
    if a.fused:  # Phi-3: Llama 2's vocab with a few chat tokens
        return spm_vocab(n_vocab, ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>",
                                   "<|user|>"], "<s>", "<|endoftext|>", "<unk>", "<|endoftext|>", add_bos=False,
                         pad_name="<|placeholder{}|>")
    return spm_vocab(n_vocab, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "<unk>", None,
                     add_bos=True, pad_name="[control_{}]")


# --- tensors ---------------------------------------------------------------------------------------------------------


def tensor_shapes(a: Arch, d: Dims) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, numpy shape) of every tensor in file order; GGUF stores the shape reversed (ne0 = row length)."""
    e, hd = d.n_embd, d.head_dim or d.n_embd // d.n_head
    q, kv = d.n_head * hd, d.n_head_kv * hd
    yield "token_embd.weight", (d.n_vocab, e)
    if a.rope_freqs:
        yield "rope_freqs.weight", ((d.n_rot or hd) // 2,)
    for i in range(d.n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (e,)
        if a.fused:
            yield b + "attn_qkv.weight", (q + 2 * kv, e)
        else:
            yield b + "attn_q.weight", (q, e)
            yield b + "attn_k.weight", (kv, e)
            yield b + "attn_v.weight", (kv, e)
            if a.qkv_bias:
                yield b + "attn_q.bias", (q,)
                yield b + "attn_k.bias", (kv,)
                yield b + "attn_v.bias", (kv,)
        if a.qk_norm:
            yield b + "attn_q_norm.weight", (hd,)
            yield b + "attn_k_norm.weight", (hd,)
        yield b + "attn_output.weight", (e, q)
        if a.gemma:
            yield b + "post_attention_norm.weight", (e,)
        yield b + "ffn_norm.weight", (e,)
        if d.n_expert:
            yield b + "ffn_gate_inp.weight", (d.n_expert, e)
            yield b + "ffn_gate_exps.weight", (d.n_expert, d.n_ff_exp, e)
            yield b + "ffn_up_exps.weight", (d.n_expert, d.n_ff_exp, e)
            yield b + "ffn_down_exps.weight", (d.n_expert, e, d.n_ff_exp)
        elif a.fused:
            yield b + "ffn_up.weight", (2 * d.n_ff, e)
            yield b + "ffn_down.weight", (e, d.n_ff)
        else:
            yield b + "ffn_gate.weight", (d.n_ff, e)
            yield b + "ffn_up.weight", (d.n_ff, e)
            yield b + "ffn_down.weight", (e, d.n_ff)
        if a.gemma:
            yield b + "post_ffw_norm.weight", (e,)
    yield "output_norm.weight", (e,)
    if not a.tied:
        yield "output.weight", (d.n_vocab, e)


def _llama3_rope_factors(n: int, base: float, factor: float = 8.0) -> np.ndarray:
    """Llama 3.1's rope scaling (factor 8, low 1, high 4, original context 8192; Llama 3.2: factor 32), as
    convert_hf_to_gguf writes it."""
    freqs = 1.0 / base ** (np.arange(0, 2 * n, 2, dtype=np.float64) / (2 * n))
    wavelen = 2 * np.pi / freqs
    low, high = 8192 / 1.0, 8192 / 4.0
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < high, 1.0,
                       np.where(wavelen > low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


def readable(vocab: Vocab) -> list[int]:
    """The byte tokens that are not printable ASCII on their own (a lone byte of a UTF-8 sequence, a control
    character): a model that never picks them writes text a streaming decoder passes on token by token."""
    chars = _byte_chars()
    return [i for i, t in enumerate(vocab.tokens[:256]) if t == chars[i] and not 0x20 <= i < 0x7F]


def _value(a: Arch, d: Dims, name: str, shape: tuple[int, ...], vocab: Vocab, rng: np.random.Generator,
           pool: np.ndarray | None) -> np.ndarray:
    if name == "rope_freqs.weight":
        return _llama3_rope_factors(shape[0], a.rope_base, a.rope_factor)
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    if name.endswith(".bias"):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float32)
    if pool is not None:  # full scale: rows drawn from a pool of random rows (fast, still random-looking)
        rows = int(np.prod(shape[:-1]))
        src = pool[:, : shape[-1]]
        out = src[rng.integers(0, len(src), rows)].reshape(shape)
    else:
        out = rng.standard_normal(shape, np.float32) * np.float32(0.02)
    if name in ("output.weight", "token_embd.weight") and (name == "output.weight" or a.tied):
        out[vocab.quiet] *= np.float32(0.05)  # control tokens and end of generation rarely win the argmax
    return out


# --- writing -------------------------------------------------------------------------------------------------------


def _metadata(w, a: Arch, d: Dims, vocab: Vocab, scale: str) -> None:
    import gguf

    p = a.arch
    hd = d.head_dim or d.n_embd // d.n_head
    w.add_string("general.type", "model")
    w.add_string("general.name", f"synthetic {a.name} ({scale})")
    w.add_uint32(f"{p}.context_length", d.n_ctx_train)
    w.add_uint32(f"{p}.embedding_length", d.n_embd)
    w.add_uint32(f"{p}.block_count", d.n_layer)
    w.add_uint32(f"{p}.feed_forward_length", d.n_ff)
    w.add_uint32(f"{p}.attention.head_count", d.n_head)
    w.add_uint32(f"{p}.attention.head_count_kv", d.n_head_kv)
    w.add_float32(f"{p}.rope.freq_base", a.rope_base)
    w.add_float32(f"{p}.attention.layer_norm_rms_epsilon", a.eps)
    if d.head_dim:
        w.add_uint32(f"{p}.attention.key_length", hd)
        w.add_uint32(f"{p}.attention.value_length", hd)
    if a.arch == "llama" or a.fused:
        w.add_uint32(f"{p}.rope.dimension_count", d.n_rot or hd)
    if a.arch == "llama":
        w.add_uint32(f"{p}.vocab_size", d.n_vocab)
    if d.n_swa:
        w.add_uint32(f"{p}.attention.sliding_window", d.n_swa)
    if d.n_expert:
        w.add_uint32(f"{p}.expert_count", d.n_expert)
        w.add_uint32(f"{p}.expert_used_count", d.n_expert_used)
        w.add_uint32(f"{p}.expert_feed_forward_length", d.n_ff_exp)
    for k, v in a.extra.items():
        w.add_uint32(f"{p}.{k}", v) if isinstance(v, int) else w.add_float32(f"{p}.{k}", v)
    w.add_uint32("general.file_type", gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(a.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.special["bos"])
    w.add_eos_token_id(vocab.special["eos"])
    if "unk" in vocab.special:
        w.add_unk_token_id(vocab.special["unk"])
    if "pad" in vocab.special:
        w.add_pad_token_id(vocab.special["pad"])
    if "eot" in vocab.special:
        w.add_eot_token_id(vocab.special["eot"])
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    w.add_uint32("sharedllm.synth_version", VERSION)


def write_f32(arch: str, path: str | os.PathLike, *, scale: str = "tiny", seed: int = 0,
              dims: Dims | None = None, shallow: int | None = None) -> Path:
    """Write the F32 source model of ``arch`` at ``scale`` to ``path``, tensor by tensor.

    ``shallow`` (a number of layers): a model whose every layer from that one on adds nothing to the residual stream
    (its ``attn_output`` and ``ffn_down`` are zeros, computed all the same), and which never picks a byte token
    that is not printable ASCII on its own, and whose output logits are ``SHALLOW_GAIN`` times as spread (a random
    model's next token is otherwise a few percent likely, and a draft model drafts only what it is sure of). Its first
    ``shallow`` layers, quantized, are its drafter (:func:`truncate`): the same greedy tokens, while the target still
    costs its full shape a token (speculative decoding's bench: compute and link together)."""
    import gguf

    a = ARCHS[arch]
    d = dims or (a.tiny if scale == "tiny" else a.full)
    vocab = vocab_for(a, d.n_vocab)
    if shallow is not None:
        vocab.quiet = sorted({*vocab.quiet, *readable(vocab)})
    assert len(vocab.tokens) == d.n_vocab, (arch, len(vocab.tokens), d.n_vocab)
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    shapes = list(tensor_shapes(a, d))
    w = gguf.GGUFWriter(tmp, a.arch)
    _metadata(w, a, d, vocab, scale)
    for name, shape in shapes:
        w.add_tensor_info(name, shape, np.dtype(np.float32), int(np.prod(shape)) * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    widest = max(s[-1] for _, s in shapes)
    pool = None
    if scale != "tiny":
        pool = rng.standard_normal((4096, widest), np.float32) * np.float32(0.02)
    for name, shape in shapes:
        value = _value(a, d, name, shape, vocab, rng, pool)
        if shallow is not None and name.endswith(("attn_output.weight", "ffn_down.weight")) \
                and int(name.split(".")[1]) >= shallow:
            value[...] = 0.0
        if shallow is not None and name == "output.weight":
            value *= np.float32(SHALLOW_GAIN)
        w.write_tensor_data(value)
    w.close()
    tmp.replace(path)
    return path


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant: str, nthread: int = 0) -> Path:
    """Quantize ``src`` to ``quant`` with llama.cpp's own quantizer (``llama_model_quantize``)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quant]
    params.nthread = nthread or os.cpu_count() or 1
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    rc = llama_cpp.llama_model_quantize(os.fspath(src).encode(), os.fspath(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({src} -> {quant}) failed with {rc}")
    tmp.replace(dst)
    return dst


def truncate(src: str | os.PathLike, dst: str | os.PathLike, n_layer: int) -> Path:
    """Copy the quantized model ``src`` to ``dst`` with its first ``n_layer`` layers only: its metadata (the block
    count set to ``n_layer``) and tensors, byte for byte. Of a ``shallow`` model (:func:`write_f32`) that is its
    drafter, bit for bit the tensors it shares with the target (quantizing a 2-layer source instead would give its
    first layer other types: Q4_K_M gives more bits to the first eighth of the layers)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(tmp, arch)
    blocks = f"{arch}.block_count"
    for kv in reader.fields.values():
        if kv.name == gguf.Keys.General.ARCHITECTURE or kv.name.startswith("GGUF."):
            continue
        sub = kv.types[-1] if kv.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(kv.name, n_layer if kv.name == blocks else kv.contents(), kv.types[0], sub_type=sub)
    kept = [t for t in reader.tensors
            if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < n_layer]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    tmp.replace(dst)
    return dst


def current(path: Path) -> bool:
    """Whether ``path`` exists, written by this synthesizer version."""
    if not path.exists():
        return False
    from sharedllm.gguf import read_gguf

    try:
        return read_gguf(path).metadata.get("sharedllm.synth_version") == VERSION
    except Exception:
        return False


def synthesize(arch: str, quant: str, out_dir: str | os.PathLike, *, scale: str = "tiny", seed: int = 0) -> Path:
    """The path of ``arch`` at ``scale`` quantized to ``quant`` under ``out_dir``; written (and its F32 source)
    unless a file of this synthesizer version is there already."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; one of {', '.join(ARCHS)}")
    if quant not in FTYPES:
        raise ValueError(f"unknown quantization {quant!r}; one of {', '.join(FTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = f"{arch}-{scale}" + (f"-s{seed}" if seed else "")
    src = out / f"{base}-F32.gguf"
    if not current(src):
        write_f32(arch, src, scale=scale, seed=seed)
    if quant == "F32":
        return src
    dst = out / f"{base}-{quant}.gguf"
    if not current(dst):
        quantize(src, dst, quant)
    return dst


def n_params(arch: str, scale: str = "tiny") -> int:
    a = ARCHS[arch]
    d = a.tiny if scale == "tiny" else a.full
    return sum(int(np.prod(s)) for _, s in tensor_shapes(a, d))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(ARCHS), action="append", help="repeatable; default: the matrix's 7")
    ap.add_argument("--quant", choices=sorted(FTYPES), action="append", help="repeatable; default: all 7")
    ap.add_argument("--scale", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--out", default="bench/models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, a in ARCHS.items():
            print(f"{name:<18} {a.arch:<9} full {n_params(name, 'full') / 1e9:6.2f}B  "
                  f"tiny {n_params(name) / 1e6:6.2f}M  {a.tiny}")
        return 0
    for arch in args.arch or MATRIX_ARCHS:
        for quant in args.quant or QUANTS:
            t0 = time.perf_counter()
            path = synthesize(arch, quant, args.out, scale=args.scale, seed=args.seed)
            print(f"{path}  {path.stat().st_size / 2**20:.1f} MiB  {time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ARCHS", "FTYPES", "MATRIX_ARCHS", "QUANTS", "Arch", "Dims", "quantize", "synthesize",
           "write_f32"]
