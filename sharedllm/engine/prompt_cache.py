# SPDX-License-Identifier: AGPL-3.0-or-later
"""The batch engine's prompt cache: the KV cells a new sequence keeps instead of reading its prompt again.

A chat's next turn is the last turn's prompt, its answer and a new message. When a sequence leaves its slot, the slot
keeps the sequence's cells that a later prompt may reuse (llama-server's ``cache_prompt``), and a new sequence takes
the free slot whose cells share the longest prefix with its prompt, keeping them and reading only the rest:

- exact batches (one KV stream per sequence) keep only cells written as a solo request writes them: by prompt passes
  of at least ``min_chunk`` rows (those compute each row as a solo request's 512-token passes do,
  :func:`~sharedllm.engine.invariance.invariant_chunks`), or whole ``prefill_chunk`` passes; a generated token's cell
  (a pass of 1-7 rows) is not. And a new prompt keeps no more than leave its rest read in passes that keep its
  arithmetic (:meth:`PromptCache.reusable`), so its text is its solo text;
- fast batches (one KV cache shared by the sequences) keep every cell, and a new sequence may also share the cells of
  another sequence, running or cached (``llama_memory_seq_cp`` within one cache adds a sequence id to a cell, it
  copies nothing): users with the same long system prompt read it once.

A slot's cells are dropped when another sequence takes it (or keeps its prefix). Nothing is kept where the memory
cannot drop a suffix (recurrent models) or has lost cells the rest would attend to (a sliding-window cache that is
not full-size): ``llama_memory_seq_rm`` and ``llama_memory_seq_pos_min`` say so, as in llama-server.
"""

from __future__ import annotations

import time
from typing import Any

from sharedllm.engine.invariance import solo_last_pass

REUSE_MIN = 16  # prompt tokens a slot's cache must give to be chosen for it (else a slot with no cache is taken)


def common_prefix(a: Any, b: Any) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def keeps_prefix(lib: Any, memory: Any, seq: int, keep: int, n_swa: int) -> bool:
    """Drop sequence ``seq``'s cells from position ``keep`` on; whether its first ``keep`` cells are then what the
    rest of a prompt attends to: False where the memory cannot drop a suffix (recurrent models) or a sliding-window
    cache that is not full-size lost cells of the window before ``keep`` (then drop them all)."""
    if lib.llama_memory_seq_rm(memory, seq, keep, -1):
        first = lib.llama_memory_seq_pos_min(memory, seq)
        if 0 <= first <= (max(0, keep - n_swa) if n_swa > 0 else 0):
            return True
    lib.llama_memory_seq_rm(memory, seq, -1, -1)
    return False


class PromptCache:
    """The cells the free slots keep, and the choice of a slot for a new sequence (see the module's docstring).
    ``lib`` is ``llama_cpp``, ``memory`` the context's ``llama_memory_t``; ``enabled=False`` keeps nothing.
    ``prompt_tokens`` and ``cached_tokens`` count the prompts of the sequences given a slot, and what they kept."""

    def __init__(self, lib: Any, memory: Any, *, enabled: bool, unified: bool, min_chunk: int, prefill_chunk: int,
                 n_batch: int, n_ubatch: int, n_swa: int):
        self._lib, self._memory = lib, memory
        self.enabled, self.unified = enabled, unified
        self.min_chunk, self.prefill_chunk = min_chunk, prefill_chunk
        self.n_batch, self.n_ubatch, self.n_swa = n_batch, n_ubatch, n_swa
        self.slots: dict[int, tuple[list[int], float]] = {}  # free slot -> (the tokens of its cells, when freed)
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def solo_pass(self, rows: int) -> bool:
        """Exact mode: whether a prompt pass of ``rows`` rows (starting where the sequence's reusable cells end)
        writes its cells as a solo request's passes would: at least ``min_chunk`` rows where chunks are allowed,
        else a whole ``prefill_chunk`` (it then starts at a multiple of it, as a solo request's passes do)."""
        return rows >= self.min_chunk if self.min_chunk else rows == self.prefill_chunk

    def reusable(self, prompt: list[int], cells: list[int]) -> int:
        """How many leading cells holding the tokens ``cells`` the sequence of ``prompt`` may keep: their common
        prefix, less at least the prompt's last token (its logits are needed) and, in the exact mode, less what
        leaves the rest of the prompt read in the passes a solo request reads it in (every pass at least
        ``min_chunk`` rows but the solo request's own last one, or whole ``prefill_chunk`` passes)."""
        common = common_prefix(cells, prompt[:-1])
        if self.unified or common <= 0:
            return max(common, 0)
        if not self.min_chunk:
            return common - common % self.prefill_chunk
        total = len(prompt)
        final = solo_last_pass(total, self.n_batch, self.n_ubatch)
        if final >= self.min_chunk:
            return max(0, min(common, total - self.min_chunk))
        common = min(common, total - final)
        gap = total - final - common
        if 0 < gap < self.min_chunk:
            common -= self.min_chunk - gap
        return max(common, 0)

    def choose(self, prompt: list[int], free: list[int], running: list[Any]) -> tuple[int, int, int | None]:
        """The free slot (of ``free``, a heap) for a new sequence, how many cells to give it, and the sequence id to
        share them from (None: the slot's own).

        Exact mode: the slot whose cells give the most (at least ``REUSE_MIN`` tokens) if the prompt continues all of
        them (a chat's next turn) or no slot holding none is free; else a slot holding none gets a copy of that
        slot's KV stream (``llama_memory_seq_cp`` between streams copies the whole stream on the devices; the
        suffix is dropped), so that another conversation's cells are not thrown away for a shared prefix; else the
        lowest free slot (consecutive slots are one pass).

        Fast mode: the slot whose cells the prompt continues whole (a chat's next turn), or, when no slot holding
        none is free, the one that gives the most unless that throws away most of its cells; else a slot holding
        none (or the one freed longest ago), sharing the cells of whichever sequence gives the most, running or
        cached (nobody's cells are thrown away for it)."""
        gives = {slot: self.reusable(prompt, self.slots[slot][0]) for slot in free if slot in self.slots} \
            if self.enabled else {}
        best = max(gives, key=gives.__getitem__, default=-1)
        reuse, cells = gives.get(best, 0), len(self.slots[best][0]) if best in gives else 0
        empty = [slot for slot in free if slot not in self.slots]
        if not self.unified:
            if reuse >= REUSE_MIN:
                whole = common_prefix(self.slots[best][0], prompt) >= cells
                return (best, reuse, None) if whole or not empty else (min(empty), reuse, best)
            slot = free[0]
            return slot, gives.get(slot, 0), None
        if reuse >= REUSE_MIN and (reuse == cells or (not empty and 2 * reuse >= cells)):
            return best, reuse, None
        slot = min(empty) if empty else min(free, key=lambda s: self.slots[s][1])
        own = gives.get(slot, 0)
        if self.enabled:  # the free slots' caches were weighed above (gives); the running sequences' cells too
            holders = [(s.slot, self.reusable(prompt, (s.prompt + s.outputs)[:s.n_past])) for s in running]
            holders += [(other, n) for other, n in gives.items() if other != slot]
            source, shared = max(holders, key=lambda x: x[1], default=(None, 0))
            if shared >= REUSE_MIN and shared > own:
                return slot, shared, source
        return slot, own, None

    def take(self, slot: int, prompt_len: int, reuse: int, source: int | None = None) -> int:
        """Give ``slot`` to a new sequence of a ``prompt_len``-token prompt with ``reuse`` leading cells: the slot's
        own, or shared with sequence ``source``; drop the rest. Returns the cells it got."""
        cached = self.slots.pop(slot, None)
        if reuse > 0 and source is not None:
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
            # One KV cache: the cells get the slot's sequence id too. One stream per sequence: llama.cpp copies a
            # whole stream only (its data at the next decode); keeps_prefix drops the suffix.
            self._lib.llama_memory_seq_cp(self._memory, source, slot, 0 if self.unified else -1,
                                          reuse if self.unified else -1)
            if self._lib.llama_memory_seq_pos_max(self._memory, slot) < reuse - 1:
                reuse = 0
        elif cached is None:
            reuse = 0
        if not keeps_prefix(self._lib, self._memory, slot, reuse, self.n_swa):
            reuse = 0
        self.prompt_tokens += prompt_len
        self.cached_tokens += reuse
        return reuse

    def forget(self) -> None:
        """Drop every free slot's cells (the engine measures its kernels in them: :mod:`.measuring`)."""
        for slot in self.slots:
            self._lib.llama_memory_seq_rm(self._memory, slot, -1, -1)
        self.slots.clear()

    def release(self, seq: Any) -> None:
        """Sequence ``seq`` left its slot: the slot keeps the cells a later prompt may reuse, and drops the rest."""
        keep = seq.n_past if self.unified else seq.reusable
        if self.enabled and seq.error is None and keep > 0:
            self.slots[seq.slot] = ((seq.prompt + seq.outputs)[:keep], time.monotonic())
            self._lib.llama_memory_seq_rm(self._memory, seq.slot, keep, -1)
        else:
            self.slots.pop(seq.slot, None)
            self._lib.llama_memory_seq_rm(self._memory, seq.slot, -1, -1)
