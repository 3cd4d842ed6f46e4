# SPDX-License-Identifier: AGPL-3.0-or-later
"""Speculative decoding: drafts proposed on the user's side, verified by the mesh many tokens per pass.

Every pass over the mesh pays a round trip per machine, whatever it holds. A drafter proposes the next ``k`` tokens of
a sequence; the batch scheduler (:mod:`.batch`) evaluates the sequence's next input and the ``k`` drafts in one pass
and samples each position in order, from the target's logits, with the sequence's own sampler chain: the drafts are
accepted up to the first position where the target's token differs, and that token is the step's last. One pass then
gives up to ``k + 1`` tokens, and the text is the text without drafts: every token is the one the target samples at
that position from the same logits (the rows of a verification pass are bit-identical to single-token decoding as
long as the pass holds no more rows than :func:`~sharedllm.engine.invariance.invariant_verify` measured), with the
same sampler state and random numbers. The cells of rejected drafts are removed before the next pass.

- :class:`LookupDrafter` (``draft="lookup"``): n-gram prompt lookup, no model: the latest earlier occurrence of the
  context's last tokens proposes what followed it. Strong where answers quote their input (edits, code, summaries).
- :class:`ModelDrafter` (``draft=MODEL``): a small GGUF with the target's vocabulary (:func:`vocab_mismatch`), loaded
  on the user's own CPU, greedy, each draft cut where the drafter's confidence falls below ``p_min``.
- How many drafts each sequence gets in a step is :mod:`.drafting`'s.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

LOOKUP = "lookup"
NGRAM_MAX = 4  # the longest context suffix the lookup drafter matches
NGRAM_MIN = 2  # ... and the shortest (one token matches almost anywhere, and proposes noise)


class Drafter:
    """What the batch scheduler asks of a drafter (:class:`LookupDrafter`, :class:`ModelDrafter`)."""

    name = "drafter"
    on_client_ms = 0.0  # what a draft token costs the client while it waits for it (:func:`.drafting.allocate`)

    def available(self, seq: Any, most: int) -> list[int]:
        """Up to ``most`` drafts ``seq`` may get (a drafter that makes them once allocated: placeholders)."""
        raise NotImplementedError

    def draft(self, wanted: list[tuple[Any, int]]) -> dict[int, list[int]]:
        """Up to ``k`` drafts for each ``(sequence, k)``, by ``id(sequence)``."""
        raise NotImplementedError

    def pending_ms(self, seq: Any, whole: float | None = None) -> float:
        """What a draft for ``seq`` costs once before its first guess (a draft model reading the context since its
        last draft), in ms, as drafting is to repay it (a one-time read spread over the steps it serves);
        ``whole``: :meth:`catch_up_ms`, where the caller has it."""
        return 0.0

    def catch_up_ms(self, seq: Any) -> float:
        """What a draft for ``seq`` costs before its first guess in this step, in full (a probe pays it whole)."""
        return 0.0

    def ahead(self, seqs: list[Any]) -> None:
        """The step's pass is about to run with these sequences' drafts: work ahead meanwhile, if it can."""

    def wait(self) -> None:
        """The step's pass is done: stop working ahead."""

    def release(self, seq: Any) -> None:
        """``seq`` left its slot."""

    def close(self) -> None:
        pass


class LookupDrafter(Drafter):
    """n-gram prompt lookup: the latest earlier occurrence of the sequence's last ``n`` tokens (``n`` from
    ``NGRAM_MAX`` down to ``NGRAM_MIN``, the longest that occurs) proposes the tokens that followed it. Each
    sequence keeps an index of its n-grams, brought up to date as its tokens come: a proposal costs microseconds."""

    name = LOOKUP

    def __init__(self, ngram_max: int = NGRAM_MAX, ngram_min: int = NGRAM_MIN):
        self.ngram_max, self.ngram_min = ngram_max, ngram_min

    def available(self, seq: Any, most: int) -> list[int]:
        """Up to ``most`` drafts for ``seq`` (its ``prompt`` and ``outputs`` are its context), maybe none."""
        if most <= 0:
            return []
        index = seq.draft_index
        if index is None:
            index = seq.draft_index = NgramIndex(self.ngram_min, self.ngram_max)
        history = seq.history()
        return index.propose(history, most)

    def draft(self, wanted: list[tuple[Any, int]]) -> dict[int, list[int]]:
        """The drafts of each sequence (by ``id``): here what ``available`` proposed, cut to the length allocated."""
        return {id(seq): seq.draft_offer[:k] for seq, k in wanted}

    def release(self, seq: Any) -> None:
        seq.draft_index = None


class NgramIndex:
    """For each n-gram of a token list, the position right after its latest occurrence, kept up to date as the list
    grows (the list's own suffix is indexed only once a token follows it)."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(lo, hi + 1)}
        self.indexed = 0  # positions p < indexed have their n-grams ending at p - 1 indexed

    def propose(self, tokens: list[int], most: int) -> list[int]:
        end = len(tokens)
        for p in range(max(self.indexed, self.lo), end):  # n-grams ending right before p, followed by tokens[p]
            for n, table in self.maps.items():
                if p >= n:
                    table[tuple(tokens[p - n:p])] = p
        self.indexed = max(self.indexed, end)
        for n in range(self.hi, self.lo - 1, -1):
            if end < n:
                continue
            p = self.maps[n].get(tuple(tokens[end - n:end]))
            if p is not None:
                return tokens[p:p + most]
        return []


class _Chain:
    """A slot of the draft model: the tokens in its cells and the drafter's greedy guess after the last one, with
    how sure it was of each token it guessed (a cell of the context it was told: 1)."""

    def __init__(self) -> None:
        self.cells: list[int] = []
        self.sure: list[float] = []
        self.guess: tuple[int, float] | None = None  # (token, probability) after cells[-1]


class ModelDrafter(Drafter):
    """A small GGUF model on the user's own CPU proposes the drafts, greedily, one pass per draft position for all
    the sequences that draft (``llama_decode`` of a context with one KV cache for ``parallel`` sequences).

    Each slot keeps a chain: its context's tokens in its cells, then the drafter's own guesses. Before drafting, the
    cells the context no longer starts with are dropped and the rest of the context is read; a chain that already
    runs past the context (its guesses were accepted) gives its guesses at once. A draft stops at the first token the
    drafter is less than ``p_min`` sure of. While the mesh verifies a step, the drafter guesses on from the end of
    each draft in a thread of its own (:meth:`ahead`: the client waits on the network then): when the mesh accepts a
    whole draft and samples the drafter's next guess, the next step's draft is ready, at no cost."""

    P_MIN = 0.5

    def __init__(self, llm: Any, parallel: int, n_ctx_seq: int, *, p_min: float = P_MIN, path: str = "",
                 ahead: int = 8):
        import llama_cpp

        self.name = os.path.basename(path) or "draft model"
        self.llm = llm
        self.p_min = p_min
        self.ahead_max = ahead
        self._lib = llama_cpp
        self._ctx = llm.ctx
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = llm.n_vocab()
        self._n_batch = llm.n_batch
        self._batch = llama_cpp.llama_batch_init(max(self._n_batch, parallel), 0, 1)
        self._chains: dict[int, _Chain] = {}  # slot -> its chain
        self.n_ctx_seq = n_ctx_seq
        self.on_client_ms = 0.0  # measured: what a draft costs the client while it waits for it (calibrate, draft)
        self._ahead: threading.Thread | None = None
        self._stop = threading.Event()
        self.ahead_hits = 0  # drafts taken from a chain guessed ahead
        self.read_ms = 0.0  # measured: a context token read to catch up (passes of several tokens, no logits)
        self._drafted: set[int] = set()  # the sequences (ids) that drafted since they took their slot

    def available(self, seq: Any, most: int) -> list[int]:
        return [] if most <= 0 else [0] * most  # any length: the drafts are made once allocated (see draft)

    def pending_ms(self, seq: Any, whole: float | None = None) -> float:
        """:meth:`catch_up_ms` (``whole``, where the caller has it), and a sequence's first draft reads its whole
        prompt (but what its slot's chain shares with it) once: that cost is spread over the steps the sequence may
        still take (its ``max_tokens``, else its context), at the tokens a step yields with drafts at its acceptance,
        so a long answer pays for reading a long prompt and a short one does not."""
        if whole is None:
            whole = self.catch_up_ms(seq)
        if id(seq) in self._drafted:
            return whole
        left = (seq.limit - seq.sampled) if seq.limit is not None else self.n_ctx_seq - seq.n_past
        per_step = min(self.ahead_max + 1.0, 1.0 / max(1.0 - seq.draft_length.acceptance, 1e-3))
        return whole * min(1.0, per_step / max(left, 1))

    def catch_up_ms(self, seq: Any) -> float:
        """The context tokens the chain of ``seq`` lacks, at the measured cost of reading one."""
        chain = self._chains.get(seq.slot)
        if id(seq) in self._drafted:
            return max(0, len(seq.prompt) + len(seq.outputs) - (len(chain.cells) if chain else 0)) * self.read_ms
        from sharedllm.engine.prompt_cache import common_prefix

        history = seq.history()
        return (len(history) - (common_prefix(chain.cells, history) if chain else 0)) * self.read_ms

    def calibrate(self, passes: int = 3, read: int = 32) -> None:
        """First measures of ``on_client_ms`` (a draft position's pass) and ``read_ms`` (a context token read),
        in a scratch sequence before any runs: until drafts measure them, drafting would look free, and a first draft
        would be tried where it cannot pay (locally, where the draft model's pass costs about what the target's
        does)."""
        tokens = self.llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 8, add_bos=True)[:read]
        self._set(0, tokens[0], 0, 0, True)
        self._decode(1)  # the first pass allocates: not timed
        started = time.monotonic()
        for i, tok in enumerate(tokens[1:]):
            self._set(i, tok, 1 + i, 0, False)
        self._decode(len(tokens) - 1)
        self.read_ms = (time.monotonic() - started) * 1000 / (len(tokens) - 1)
        times = []
        for j in range(passes):
            started = time.monotonic()
            self._set(0, tokens[j], len(tokens) + j, 0, True)
            self._decode(1)
            times.append((time.monotonic() - started) * 1000)
        self.on_client_ms = sorted(times)[len(times) // 2]
        self._lib.llama_memory_seq_rm(self._memory, 0, 0, -1)
        logger.info("draft model %s: %.1f ms a draft, %.2f ms a context token read", self.name, self.on_client_ms,
                    self.read_ms)

    def draft(self, wanted: list[tuple[Any, int]]) -> dict[int, list[int]]:
        """Up to ``k`` drafts for each ``(sequence, k)``: the chain's guesses past the sequence's context, guessed
        on where there are fewer."""
        self.wait()
        wanted = [(seq, k) for seq, k in wanted if k > 0]
        if not wanted:
            return {}
        self._catch_up([seq for seq, _ in wanted])
        self._drafted.update(id(seq) for seq, _ in wanted)
        need = {id(seq): (seq, min(k, self.n_ctx_seq - seq.n_past - 2)) for seq, k in wanted}
        started = time.monotonic()
        while True:
            short = [seq.slot for seq, k in need.values()
                     if len(self._drafts(seq)) < k and self._can_guess(seq.slot)]
            if not short:
                break
            self._guess_on(short)
        drafts = {key: self._drafts(seq)[:k] for key, (seq, k) in need.items()}
        given = sum(len(d) for d in drafts.values())
        if given:  # what a draft cost the client here: those guessed ahead, while the mesh verified, cost nothing
            ms = (time.monotonic() - started) * 1000 / given
            self.on_client_ms = ms if not self.on_client_ms else self.on_client_ms + 0.3 * (ms - self.on_client_ms)
        return drafts

    def ahead(self, seqs: list[Any]) -> None:
        """Guess on past the drafts of ``seqs`` in a thread, until :meth:`wait` (the step's pass is done) or
        ``ahead`` guesses past each one's draft."""
        # (slot, the most cells its chain may reach): taken now, the sequences change under the thread
        limits = [(s.slot, len(s.prompt) + len(s.outputs) + len(s.draft) + self.ahead_max) for s in seqs if s.draft]
        if not limits:
            return
        self._stop.clear()

        def run() -> None:
            try:
                for _ in range(self.ahead_max):
                    live = [slot for slot, most in limits if self._can_guess(slot, most)]
                    if self._stop.is_set() or not live:
                        return
                    self._guess_on(live)
            except Exception:  # a guess is only a guess: the next draft catches up
                logger.exception("the draft model's guesses ahead failed")

        self._ahead = threading.Thread(target=run, name="draft-ahead", daemon=True)
        self._ahead.start()

    def wait(self) -> None:
        """Stop guessing ahead (the verification is done): the chains are the scheduler's again."""
        if self._ahead is not None:
            self._stop.set()
            self._ahead.join()
            self._ahead = None

    def _drafts(self, seq: Any) -> list[int]:
        """The chain's guesses past ``seq``'s context (``_catch_up`` made the chain start with it), up to the first
        it is not ``p_min`` sure of."""
        chain = self._chains[seq.slot]
        n = len(seq.prompt) + len(seq.outputs)
        out = []
        for tok, sure in zip(chain.cells[n:], chain.sure[n:], strict=True):
            if sure < self.p_min:
                return out
            out.append(tok)
        if chain.guess is not None and chain.guess[1] >= self.p_min:
            out.append(chain.guess[0])
        return out

    def _can_guess(self, slot: int, most: int | None = None) -> bool:
        """Whether the chain of ``slot`` may guess on: it has a guess it is sure enough of, and room (within the
        context, and ``most`` cells)."""
        chain = self._chains.get(slot)
        if chain is None or chain.guess is None or chain.guess[1] < self.p_min:
            return False
        cells = len(chain.cells) + 1
        return cells < self.n_ctx_seq - 1 and (most is None or cells <= most)

    def _guess_on(self, slots: list[int]) -> None:
        """One pass: each chain's guess read into its cells, and the next guessed."""
        for i, slot in enumerate(slots):
            chain = self._chains[slot]
            tok, sure = chain.guess
            self._set(i, tok, len(chain.cells), slot, True)
            chain.cells.append(tok)
            chain.sure.append(sure)
        self._decode(len(slots))
        for i, slot in enumerate(slots):
            self._chains[slot].guess = self._guess(i)

    def _catch_up(self, seqs: list[Any]) -> None:
        """Make each sequence's chain start with its context: the cells it no longer starts with dropped, the rest
        of the context read (passes of ``n_batch`` rows, then the last tokens in one pass, for their guesses). A
        chain that runs past the context already (its guesses were right) is left as it is."""
        from sharedllm.engine.prompt_cache import common_prefix

        rest: list[tuple[int, int, int]] = []  # (token, position, slot), read without logits
        lasts: list[tuple[Any, int]] = []
        for seq in seqs:
            history = seq.history()
            chain = self._chains.setdefault(seq.slot, _Chain())
            keep = common_prefix(chain.cells, history)
            if keep == len(history) and (keep < len(chain.cells) or chain.guess is not None):
                self.ahead_hits += keep < len(chain.cells)
                continue  # the context ends inside the chain (or right before its guess)
            keep = min(keep, len(history) - 1)
            if keep < len(chain.cells):
                self._lib.llama_memory_seq_rm(self._memory, seq.slot, keep, -1)
                del chain.cells[keep:], chain.sure[keep:]
            chain.guess = None
            for tok in history[keep:-1]:
                rest.append((tok, len(chain.cells), seq.slot))
                chain.cells.append(tok)
                chain.sure.append(1.0)
            lasts.append((seq, history[-1]))
        started = time.monotonic()
        for start in range(0, len(rest), self._n_batch):
            chunk = rest[start:start + self._n_batch]
            for i, (tok, pos, slot) in enumerate(chunk):
                self._set(i, tok, pos, slot, False)
            self._decode(len(chunk))
        if len(rest) >= 4:  # a few tokens at least: a pass's fixed cost spread over them
            ms = (time.monotonic() - started) * 1000 / len(rest)
            self.read_ms = ms if not self.read_ms else self.read_ms + 0.3 * (ms - self.read_ms)
        if not lasts:
            return
        for i, (seq, tok) in enumerate(lasts):
            chain = self._chains[seq.slot]
            self._set(i, tok, len(chain.cells), seq.slot, True)
            chain.cells.append(tok)
            chain.sure.append(1.0)
        self._decode(len(lasts))
        for i, (seq, _) in enumerate(lasts):
            self._chains[seq.slot].guess = self._guess(i)

    def _guess(self, row: int) -> tuple[int, float]:
        """The drafter's greedy token from batch row ``row``'s logits, and its probability."""
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self._ctx, row)
        logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self._n_vocab,))
        tok = int(logits.argmax())
        top = float(logits[tok])
        return tok, float(1.0 / np.exp(logits - top).sum())

    def _set(self, i: int, tok: int, pos: int, slot: int, logits: bool) -> None:
        b = self._batch
        b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
        b.seq_id[i][0] = slot
        b.logits[i] = logits

    def _decode(self, n: int) -> None:
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"the draft model's llama_decode failed with status {rc}")

    def release(self, seq: Any) -> None:
        """The sequence left its slot: its chain stays (a later sequence in the slot keeps their common prefix)."""
        self._drafted.discard(id(seq))

    def close(self) -> None:
        self.wait()
        self._lib.llama_batch_free(self._batch)
        self.llm.close()


def vocab_mismatch(target: Any, draft: Any) -> str | None:
    """How a draft model's vocabulary differs from the target's, or None when its drafts are the target's tokens:
    the same tokenizer model, the same special tokens and whether BOS/EOS are added, and the same text for every
    token id (llama.cpp's own rule for ``--model-draft`` allows up to 128 more or fewer ids, padding at the end)."""
    import llama_cpp

    tv, dv = target._model.vocab, draft._model.vocab
    if llama_cpp.llama_vocab_type(tv) != llama_cpp.llama_vocab_type(dv):
        return "another tokenizer model"
    for what, fn in (("BOS token", llama_cpp.llama_vocab_bos), ("EOS token", llama_cpp.llama_vocab_eos),
                     ("end-of-turn token", llama_cpp.llama_vocab_eot),
                     ("whether BOS is added", llama_cpp.llama_vocab_get_add_bos),
                     ("whether EOS is added", llama_cpp.llama_vocab_get_add_eos)):
        if fn(tv) != fn(dv):
            return f"another {what} ({fn(dv)} against the target's {fn(tv)})"
    nt, nd = llama_cpp.llama_vocab_n_tokens(tv), llama_cpp.llama_vocab_n_tokens(dv)
    if abs(nt - nd) > 128:
        return f"{nd} tokens against the target's {nt}"
    text = llama_cpp.llama_vocab_get_text
    for i in range(min(nt, nd)):
        if text(tv, i) != text(dv, i):
            return f"token {i} is {text(dv, i)!r}, the target's is {text(tv, i)!r}"
    return None


def start_drafter(spec: Any) -> Drafter | None:
    """The drafter ``spec.draft`` (an ``EngineSpec``'s) names, or None. A draft model is loaded on
    this machine's CPU and its vocabulary checked against the target's (read alone from the target's file, before the
    target loads): ``ValueError`` naming both files when its drafts would not be the target's tokens."""
    if not spec.draft:
        return None
    spec.llama_kwargs.setdefault("flash_attn", True)  # verification passes keep single-token arithmetic with it
    if spec.draft == LOOKUP:
        return LookupDrafter()
    import llama_cpp

    from sharedllm.engine.load import build_llama, call_hook

    if isinstance(spec.draft, tuple):  # ("module:function", sys.path entry, kwargs): a drafter of one's own
        return call_hook(spec.draft, spec)

    n_ctx = spec.llama_kwargs.get("n_ctx", 512)
    try:
        draft = build_llama(spec.draft, n_ctx=n_ctx, parallel=spec.parallel, unified=True, use_extra_bufts=True,
                            n_threads=os.cpu_count() or 1, n_batch=512)
    except ValueError as exc:
        raise ValueError(f"the draft model {spec.draft} could not be loaded: {exc}") from exc
    target = llama_cpp.Llama(model_path=spec.model_path, vocab_only=True, verbose=False)
    try:
        why = vocab_mismatch(target, draft)
    finally:
        target.close()
    if why is not None:
        draft.close()
        raise ValueError(f"the draft model {spec.draft} cannot draft for {spec.model_path}: its vocabulary differs "
                         f"({why}); use a draft model with the target's tokenizer (a smaller model of its family, or "
                         "draft='lookup')")
    drafter = ModelDrafter(draft, spec.parallel, n_ctx, path=spec.draft)
    drafter.calibrate()
    return drafter
