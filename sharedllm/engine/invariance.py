# SPDX-License-Identifier: AGPL-3.0-or-later
"""What batching may change in llama.cpp's arithmetic, measured on the loaded model, and how exact batches avoid it.

llama.cpp's kernels may change with the number of rows of a pass (a matrix product of 1-7 rows takes another path
than one of 8 or more on x86 CPUs). Exact batches keep every sequence's arithmetic what it is alone: decode steps of
at most :func:`invariant_batch` sequences, and prompts read in the passes of a solo request or, where
:func:`invariant_chunks` shows it changes nothing, in shorter chunks cut by :func:`exact_chunk`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BATCH_PROMPTS = (3, 4, 8, 12)  # prompt lengths invariant_batch decodes after


def invariant_batch(llm: Any, parallel: int, lengths: tuple[int, ...] = BATCH_PROMPTS, limit: int | None = None,
                    check: Callable[[], None] | None = None) -> int:
    """The largest number of sequences one decode step may hold without changing any sequence's arithmetic.

    llama.cpp's kernels may change with the number of rows of a matrix product: on x86 CPUs with Gemma 3 270M
    Q4_K_M, ``MUL_MAT`` of the Q4_K ``attn_output`` weights (1024 -> 640) gives a row other bits from 8 rows on,
    and the logits of a sequence decoded with 7 others then differ from its logits alone by up to 0.67 (whether the
    bits flip depends on the data: with some prompts the logits stay equal). Measured on the loaded model with its
    devices, for prompts of 3, 4, 8 and 12 tokens: every sequence reads the prompt, then sequence 0's next token is
    decoded alone and with 1, 2, ... others; the answer is the largest k for which its logits stay bit-identical
    for every batch of at most k and every prompt (``parallel`` when they always do). Costs at most
    ``4 * (parallel + 1)`` decodes; the cells are freed afterwards. ``lengths``: the prompts' lengths measured now
    (the others' answer, ``limit``, found before); ``check``: called before every pass (it may raise to stop).
    """
    import ctypes

    import llama_cpp
    import numpy as np

    ctx, n_vocab = llm.ctx, llm.n_vocab()
    memory = llama_cpp.llama_get_memory(ctx)
    text = llm.tokenize(b"Once upon a time, in a small village by the sea, there lived", add_bos=True)
    batch = llama_cpp.llama_batch_init(12 * parallel, 0, 1)

    def decode(items: list[tuple[int, int, int]], row: int) -> np.ndarray:
        if check is not None:
            check()
        for i, (tok, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = i == row
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed while measuring the batch")
        ptr = llama_cpp.llama_get_logits_ith(ctx, row)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()

    def clear() -> None:
        for s in range(parallel):
            llama_cpp.llama_memory_seq_rm(memory, s, -1, -1)

    limit = parallel if limit is None else limit
    try:
        for length in lengths:
            prompt = text[:length]
            clear()
            nxt = int(decode([(tok, pos, s) for s in range(parallel) for pos, tok in enumerate(prompt)],
                             len(prompt) - 1).argmax())
            alone = None
            for k in range(1, limit + 1):
                row = decode([(nxt, len(prompt), s) for s in range(k)], 0)
                for s in range(k):
                    llama_cpp.llama_memory_seq_rm(memory, s, len(prompt), -1)
                if alone is None:
                    alone = row
                elif not np.array_equal(row, alone):
                    limit = k - 1
                    break
        return limit
    finally:
        clear()
        llama_cpp.llama_batch_free(batch)


def invariant_chunks(llm: Any, min_chunk: int, check: Callable[[], None] | None = None) -> bool:
    """Whether a prompt read in chunks of at least ``min_chunk`` tokens gives the logits it gives read in one pass.

    On x86 CPUs with Gemma 3 270M Q4_K_M a pass of 8 rows or more computes each row as a pass of 512 does (a
    600-token prompt in chunks of 8, 16, 32, 57, 100, 128 or 256 tokens: the last token's logits are bit-identical to
    512-token chunks), but a last chunk of fewer than 8 rows does not (33-token chunks of 600 tokens leave 6: logits
    up to 0.42 away). Measured here on the loaded model with its devices: a prompt of ``2 * min_chunk + 3`` tokens
    in one pass, then in chunks of ``min_chunk`` and ``min_chunk + 3``; the last token's logits, and those of the
    next token decoded after it (the KV cells the chunks wrote), must be bit-identical. Costs 5 passes; the cells
    are freed afterwards. ``check``: called before every pass (it may raise to stop).
    """
    import ctypes

    import llama_cpp
    import numpy as np

    ctx, n_vocab = llm.ctx, llm.n_vocab()
    memory = llama_cpp.llama_get_memory(ctx)
    length = 2 * min_chunk + 3
    text = llm.tokenize(b"The committee met on Tuesday to review the budget, the schedule and the open questions. "
                        * (length // 8 + 1), add_bos=True)[:length]
    batch = llama_cpp.llama_batch_init(length, 0, 1)

    def decode(tokens: list[int], start: int) -> np.ndarray:
        if check is not None:
            check()
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed while measuring prompt chunks")
        ptr = llama_cpp.llama_get_logits_ith(ctx, len(tokens) - 1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()

    def read(cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
        for a, b in zip([0, *cuts], [*cuts, length], strict=True):
            last = decode(text[a:b], a)
        return last, decode([int(last.argmax())], length)

    try:
        whole = read([])
        chunked = read([min_chunk])
        return all(np.array_equal(a, b) for a, b in zip(whole, chunked, strict=True))
    finally:
        llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
        llama_cpp.llama_batch_free(batch)


CHUNK_FLOORS = (64, 128)  # chunk sizes tried after ``lo``: SharedLLM's build takes the tiled kernel from 64 rows on


def chunk_sizes(llm: Any, lo: int, n_ctx: int) -> list[int]:
    """The chunk sizes :func:`min_chunk` tries, in order: ``lo``, then ``CHUNK_FLOORS``, each where its
    ``2 * size + 3``-token prompt fits ``n_batch``, ``n_ubatch`` and ``n_ctx``."""
    room = min(llm.n_batch, llm.context_params.n_ubatch, n_ctx)
    return [size for size in sorted({lo, *(f for f in CHUNK_FLOORS if f > lo)}) if 2 * size + 3 <= room]


def min_chunk(llm: Any, lo: int, n_ctx: int) -> int:
    """The fewest tokens, ``lo`` or more, that a prompt may be read in chunks of while keeping its arithmetic
    (:func:`invariant_chunks`, tried for each of :func:`chunk_sizes`), else 0."""
    return next((size for size in chunk_sizes(llm, lo, n_ctx) if invariant_chunks(llm, size)), 0)


def solo_last_pass(total: int, n_batch: int, n_ubatch: int) -> int:
    """Tokens in the last pass of a solo request's prompt of ``total`` tokens: llama-cpp-python evaluates it in
    batches of ``n_batch``, which llama.cpp splits into ubatches of ``n_ubatch``."""
    rest = total - n_batch * ((total - 1) // n_batch)
    return rest - n_ubatch * ((rest - 1) // n_ubatch)


def exact_chunk(left: int, final: int, budget: int, cap: int, min_chunk: int) -> int:
    """Tokens of a prompt to read in its next pass, ``left`` of it unread, so that every pass has the arithmetic of
    a solo request's (:func:`invariant_chunks`): at most ``budget`` (and ``cap``, one ubatch) but at least
    ``min_chunk`` tokens, never leaving fewer than ``min_chunk`` behind, except the solo request's own last pass of
    ``final`` tokens when that is shorter: it is read as it is, alone and last."""
    if final < min_chunk:
        if left <= final:
            return left
        body = left - final
    else:
        body = left
    take = min(max(budget, min_chunk), cap, body)
    if 0 < body - take < min_chunk:
        take = body if body <= cap else body - min_chunk
    return take


VERIFY_PROMPTS = (14, 600)  # tokens of the short and the long prompt invariant_verify verifies after


def invariant_verify(llm: Any, max_rows: int, n_ctx: int | None = None, prompts: tuple[int, ...] = VERIFY_PROMPTS,
                     check: Callable[[], None] | None = None) -> int:
    """The most rows (a sequence's next token and the drafts after it) one pass may verify while every row's logits
    stay bit-identical to decoding those tokens one at a time: how long a draft may be, with its greedy (and seeded)
    text unchanged (speculative decoding, :mod:`.speculative`).

    Measured on the loaded model with its devices, after a short prompt and after a long one (600 tokens, or what
    ``n_ctx``, each sequence's context, leaves room for: kernels may take other paths over a longer context, as the
    CPU's flash attention splits a lone row's KV cells between threads from 512 on unless SharedLLM's build turns it
    off): the greedy continuation is decoded one token at a time (the logits of each position kept), then verified
    in one pass of 2, 3, ... rows from the same cells; the answer is the largest row count whose every row matched,
    after both prompts (``max_rows`` when all do). Costs a long prompt's passes and at most ``2 * 2 * max_rows``
    decodes; the cells are freed afterwards. ``prompts``: those measured now (of ``VERIFY_PROMPTS``; ``max_rows``:
    the others' answer, found before); ``check``: called before every pass (it may raise to stop)."""
    import ctypes

    import llama_cpp
    import numpy as np

    ctx, n_vocab = llm.ctx, llm.n_vocab()
    memory = llama_cpp.llama_get_memory(ctx)
    n_ctx = n_ctx or llm.n_ctx()
    n_batch = min(llm.n_batch, 512)
    batch = llama_cpp.llama_batch_init(max(max_rows, n_batch), 0, 1)

    def decode(tokens: list[int], start: int, rows: list[int]) -> list[np.ndarray]:
        if check is not None:
            check()
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i in rows
        batch.n_tokens = len(tokens)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed while measuring verification passes")
        out = []
        for r in rows:
            ptr = llama_cpp.llama_get_logits_ith(ctx, r)
            out.append(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                             shape=(n_vocab,)).copy())
        return out

    story = b"Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter. "
    long = llm.tokenize(story * 80, add_bos=True)[:max(16, min(VERIFY_PROMPTS[-1], n_ctx - 2 * max_rows - 2))]
    limit = max_rows
    try:
        for prompt in (long[:n] for n in prompts):
            llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
            for start in range(0, len(prompt), n_batch):  # the prompt, in passes of n_batch
                chunk = prompt[start:start + n_batch]
                [last] = decode(chunk, start, [len(chunk) - 1])
            base = len(prompt)
            tokens, singles = [], []
            for i in range(limit):  # one at a time: the reference
                tokens.append(int(last.argmax()))
                [last] = decode([tokens[-1]], base + i, [0])
                singles.append(last)
            for rows in range(2, limit + 1):
                llama_cpp.llama_memory_seq_rm(memory, 0, base, -1)
                verified = decode(tokens[:rows], base, list(range(rows)))
                if not all(np.array_equal(a, b) for a, b in zip(verified, singles, strict=False)):
                    limit = rows - 1
                    break
            if limit < 2:
                break
        return limit
    finally:
        llama_cpp.llama_memory_seq_rm(memory, 0, -1, -1)
        llama_cpp.llama_batch_free(batch)
