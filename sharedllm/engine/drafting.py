# SPDX-License-Identifier: AGPL-3.0-or-later
"""How many drafts each sequence of a step gets (speculative decoding, :mod:`.speculative`), and what came of them.

- :class:`DraftLength`: a sequence's running acceptance, and when it probes again after its drafts stopped paying.
- :func:`allocate`: the drafts of each sequence of a step, from the acceptances and the measured cost of a step by its
  rows (:class:`~sharedllm.engine.cost.RowCost`), to maximise the step's expected tokens per millisecond (none when
  drafting does not pay: then a probe now and then, backing off); :func:`group_rows` fits them in each pass's rows.
- :class:`Drafting`: the batch scheduler's side of it: each decoded sequence's drafts for a step
  (:meth:`Drafting.propose`), the steps' costs, the counts of drafts verified and accepted.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from typing import Any

from sharedllm.engine.cost import RowCost

logger = logging.getLogger(__name__)

PRIOR_ACCEPTANCE = 0.5  # a sequence's acceptance before it has any, weighted as PRIOR_WEIGHT drafts
PRIOR_WEIGHT = 4.0
DECAY = 0.9  # a sequence's acceptance follows its recent drafts: older counts fade by this per verification
SURE_WEIGHT = 2.0  # a sequence's drafter is taken to have drafts when asked, weighted as this many asks
PROBE_FIRST = 4  # steps without drafts before a sequence tries one draft again ...
PROBE_MAX = 64  # ... doubling after each probe that failed, up to this
PROBE_ACCEPTANCE = 0.9  # a probe is made only where a draft would pay were it accepted this often ...
PROBE_SHARE = 0.025  # ... and where its cost is no more than this share of the steps since the last (times the
# backoff): with draft_max 16 an always-wrong drafter drafted 14 tokens of a 96-token answer at RTT 0 under 5%
# (0.87x-0.96x of no drafts), 7-8 under 2.5% (0.95x-0.99x)
FAILING_PRIOR = 0.25  # a new sequence starts as after a failed probe where the load's drafts are accepted less often


class DraftLength:
    """One sequence's acceptance: the chance that its next draft is accepted, as a decayed count of its drafts'
    outcomes (each draft token tried until the first rejection); how often its drafter had drafts when asked (a draft
    model has none where it is not ``p_min`` sure of its next token, and asking cost it a pass); and when it next
    probes while drafting does not pay."""

    def __init__(self, prior: float = PRIOR_ACCEPTANCE, decay: float = DECAY):
        self.accepted = prior * PRIOR_WEIGHT
        self.tried = PRIOR_WEIGHT
        self.decay = decay
        self.idle = 0  # steps since it last drafted
        self.probe_every = PROBE_FIRST
        self.failed = False  # its last drafts were all rejected: its probes back off (PROBE_SHARE)
        self.asked = self.given = SURE_WEIGHT  # decayed counts: steps its drafter was asked for drafts, and had some

    @property
    def acceptance(self) -> float:
        return self.accepted / self.tried if self.tried > 0 else PRIOR_ACCEPTANCE

    @property
    def sure(self) -> float:
        """The chance that its drafter has drafts when asked."""
        return self.given / self.asked

    def observe(self, drafted: int, accepted: int) -> None:
        """A verification of ``drafted`` drafts, of which the first ``accepted`` were accepted."""
        if drafted <= 0:
            self.idle += 1
            return
        tried = accepted + (1 if accepted < drafted else 0)  # the tokens tried up to the first rejection
        self.asked, self.given = self.asked * self.decay + 1, self.given * self.decay + 1
        self.accepted = self.accepted * self.decay + accepted
        self.tried = self.tried * self.decay + tried
        probe = self.probes()
        self.idle = 0
        self.failed = accepted == 0
        if accepted == 0 and (probe or drafted == 1):
            self.probe_every = min(PROBE_MAX, self.probe_every * 2)
        elif accepted:
            self.probe_every = PROBE_FIRST

    def declined(self) -> None:
        """Its drafter was asked for drafts and had none (a draft model not ``p_min`` sure of its next token): no
        draft was tried (its acceptance stands), but the chance that asking gives drafts falls; a probe that got none
        waits as after a failed probe. Asking cost the client a pass of the draft model (and reading the context
        since the last one): counted as nothing, a drafter that is never sure was asked again every ``PROBE_FIRST``
        steps, for a quarter of the steps' time at RTT 0 (Gemma 3 270M drafted by its Q2_K: 45-50 tok/s against 60
        without a drafter, and not one draft verified). Counted as a rejected draft, it stopped a draft model that is
        unsure at an answer's first tokens from drafting the rest (RTT 20 ms, open chat: 0.99x of no drafts against
        2.5x)."""
        self.asked, self.given = self.asked * self.decay + 1, self.given * self.decay
        if self.probes():
            self.idle = 0
            self.probe_every = min(PROBE_MAX, self.probe_every * 2)
        else:
            self.idle += 1

    def probes(self) -> bool:
        """Whether it may try drafts in this step although drafting does not pay by its acceptance so far."""
        return self.idle >= self.probe_every


def allocate(wants: list[tuple[DraftLength, int, int]], step_ms: Callable[[int], float], draft_ms: float,
             first_ms: list[float] | None = None, whole_ms: list[float] | None = None) -> list[int]:
    """The drafts of each sequence of a step: ``wants`` holds, per sequence, its :class:`DraftLength`, the drafts it
    may take at most (what its drafter has, its limits) and its pass's group (sequences of one ``llama_decode`` share
    the pass's free rows: :func:`group_rows` gives them).

    ``step_ms(extra)``: what the step costs with ``extra`` draft rows in all (the measured
    :class:`~sharedllm.engine.cost.RowCost`); without drafts it yields one token per sequence. The ``k``-th draft of
    a sequence yields ``s * a ** k`` more tokens on average (``a``: its acceptance; ``s``: the chance its drafter has
    drafts when asked, :attr:`DraftLength.sure`) and costs ``draft_ms`` on the client,
    and a sequence's first draft of the step ``first_ms`` on top (a draft model reading the context since its last
    draft: :meth:`Drafter.pending_ms`). The drafts are lined up, the most tokens per millisecond first, and the step
    takes the first ``n`` of them for the ``n`` that gives the most tokens per millisecond of the step: a step's cost
    is no line in its rows (one row more can cost a kernel change, the next few little), so drafts that do not pay
    one by one may pay together. A sequence that drafted nothing for a while probes where drafts accepted
    ``PROBE_ACCEPTANCE`` of the time would pay (else its acceptance is not what holds it back), with as many drafts
    as would pay best so (one more row can cost as much as several: a probe of one would tell as much and give less);
    after drafts that failed (:attr:`DraftLength.failed`), only where the next one costs at most ``PROBE_SHARE`` of
    the steps' time since its last draft, times its backoff (a draft that makes a CPU step take another kernel costs
    more than the step). Not after drafts that were accepted: a sequence whose acceptance is still near the prior's
    would otherwise stop for good behind a link, where a probe's catch-up (a draft model reading the tokens since its
    last draft) grows faster than that share of the steps (Gemma 3 270M at RTT 20 ms: one draft, accepted, then none
    for the rest of the answer).

    ``whole_ms``: what a sequence's first draft costs this step in full (``first_ms`` may spread a one-time cost, a
    draft model's first read of the prompt, over the steps drafting is to pay for: :meth:`Drafter.pending_ms`). A
    probe pays it in full: its acceptance is a guess, and if the guess is wrong nothing repays the read. (Gemma 3
    270M drafted by its Q2_K at RTT 0: a new sequence's first probe read a 100-token prompt, 243 ms for a 20 ms step,
    which the 90% guess spread over the answer's 92 steps counted as 3 ms; drafting then did not pay, and the rewrite
    workload ran at 0.89x of the same load without drafts.)"""
    first = first_ms or [0.0] * len(wants)
    whole = whole_ms or first
    base = max(step_ms(0), 1e-3)
    offered = sum(most for _, most, _ in wants)
    row = max((step_ms(offered) - base) / offered, 0.0) if offered else 0.0
    unit = max(row + draft_ms, 1e-6)  # what an average draft costs, to line them up
    # a sequence's first draft: accepted at its acceptance where its drafter has drafts when asked
    heap = [(-length.acceptance * length.sure / (unit + first[i]), i, length.acceptance * length.sure)
            for i, (length, most, _) in enumerate(wants) if most > 0]
    heapq.heapify(heap)
    line: list[tuple[int, float]] = []  # (sequence, tokens its draft adds), in the order they are taken
    lined = [0] * len(wants)
    while heap:
        _, i, gain = heapq.heappop(heap)
        line.append((i, gain))
        lined[i] += 1
        length, most, _ = wants[i]
        if lined[i] < most:
            heapq.heappush(heap, (-(gain * length.acceptance) / unit, i, gain * length.acceptance))
    tokens = float(len(wants))
    client, best, rate = 0.0, (0, tokens, 0.0), tokens / base  # best: (drafts, their step's tokens, client ms)
    taken = [False] * len(wants)
    for n, (i, gain) in enumerate(line, 1):
        tokens += gain
        client += draft_ms + (0.0 if taken[i] else first[i])
        taken[i] = True
        this = tokens / max(step_ms(n) + client, 1e-3)
        if this > rate:
            best, rate = (n, tokens, client), this
    best, tokens, client = best
    ks = [0] * len(wants)
    for i, _ in line[:best]:
        ks[i] += 1
    for i, (length, most, _) in enumerate(wants):
        if ks[i] == 0 and most > 0 and length.probes():
            k, with_probe, rate_with_probe = _probe(most, tokens, best, client + whole[i], rate, step_ms, draft_ms)
            # after a failed probe, the next costs at most PROBE_SHARE of the steps' time while it waited
            cost = step_ms(best + k) - step_ms(best) + k * draft_ms + whole[i]
            if k and (not length.failed
                      or length.idle * base * PROBE_SHARE >= cost * length.probe_every / PROBE_FIRST):
                ks[i] = k
                # the next sequence's probe is judged against a step with this one in it
                best, tokens, rate = best + k, with_probe, rate_with_probe
                client += k * draft_ms + whole[i]
    return ks


def _probe(most: int, tokens: float, drafts: int, client: float, rate: float, step_ms: Callable[[int], float],
           draft_ms: float) -> tuple[int, float, float]:
    """The drafts of a probe: of up to ``most``, as many as would raise most the ``rate`` of a step of ``tokens``
    expected tokens, ``drafts`` drafts and ``client`` milliseconds on the client, were they accepted
    ``PROBE_ACCEPTANCE`` of the time (0: none would); with the step's expected tokens and rate with those drafts."""
    gain, best = 1.0, (0, tokens, rate)
    for j in range(1, most + 1):
        gain *= PROBE_ACCEPTANCE
        tokens += gain
        this = tokens / max(step_ms(drafts + j) + client + j * draft_ms, 1e-3)
        if this > best[2]:
            best = (j, tokens, this)
    return best


def group_rows(ks: list[int], groups: list[int], free: dict[int, int]) -> list[int]:
    """``ks`` cut so that the drafts of each group fit its ``free`` rows (the fewest cut from those that asked the
    most: a long draft's last tokens are the least likely accepted)."""
    ks = list(ks)
    for g, room in free.items():
        members = [i for i, grp in enumerate(groups) if grp == g]
        while sum(ks[i] for i in members) > max(room, 0):
            i = max(members, key=lambda j: ks[j])
            ks[i] -= 1
    return ks


class Drafting:
    """The batch scheduler's drafts: its ``drafter`` (:class:`~sharedllm.engine.speculative.Drafter`), the most
    drafts a sequence takes in a step (``draft_max``; at least ``draft_min`` where offered), what a decode-only step
    costs by its rows, and the drafts verified and accepted so far."""

    def __init__(self, drafter: Any, draft_max: int, draft_min: int, n_ctx_seq: int, n_vocab: int):
        self.drafter = drafter
        self.draft_max = draft_max
        self.draft_min = min(draft_min, draft_max)
        self.n_ctx_seq = n_ctx_seq
        self.n_vocab = n_vocab
        self.row_cost = RowCost()
        self.prior = DraftLength(decay=0.98)  # every sequence's acceptance, slowly decayed: where a new one starts
        self.drafted = self.accepted = 0  # drafts verified, and accepted

    def new_length(self) -> DraftLength:
        """A new sequence's :class:`DraftLength`, starting from what the drafts of the others got, and due to probe
        in its first step with drafts where they do not pay by that: the first probe is what starts drafting, and
        ``PROBE_FIRST`` steps of waiting for it cost a load's first request its first drafts (when the others' drafts
        are still the prior's guess). Where the others' drafts are nearly all rejected (their acceptance under
        ``FAILING_PRIOR``) it starts as after a failed probe: its first probe too waits until it costs no more than
        ``PROBE_SHARE`` of the steps (an always-wrong drafter at RTT 0 otherwise paid a free first probe in every
        request, 7-9 drafts of a 96-token answer: 0.94x of the same load without drafts)."""
        length = DraftLength(prior=self.prior.acceptance)
        length.idle = length.probe_every
        length.failed = self.prior.acceptance < FAILING_PRIOR
        return length

    def reset_costs(self) -> None:
        """Steps are to cost otherwise (passes of other sizes, after the measures): the row costs are measured anew."""
        self.row_cost = RowCost()

    def room(self, seq: Any) -> int:
        """The most drafts ``seq`` may take now: ``draft_max`` (or the request's own, where it is less), within its
        context and its ``max_tokens`` (drafts past the tokens its consumer takes would be work thrown away)."""
        most = self.draft_max if seq.draft_max is None else min(self.draft_max, seq.draft_max)
        room = min(most, self.n_ctx_seq - seq.n_past - 1)
        if seq.limit is not None:
            room = min(room, seq.limit - seq.sampled - 1)
        return room

    def propose(self, groups: list[list[Any]], free: dict[int, int], decode_ms: float,
                token_ms: float | None = None) -> None:
        """Each decoded sequence's drafts for this step (``Sequence.draft``): what its drafter offers, within its
        limits, as many as :func:`allocate` finds worth their cost and each pass's ``free`` rows hold (by group).
        ``decode_ms``, ``token_ms``: a decode step's cost and a prompt token's on top (:class:`~.cost.StepCost`),
        the guesses for rows not measured yet."""
        wants, order = [], []
        for g, group in enumerate(groups):
            for seq in group:
                seq.draft = []
                most = self.room(seq)
                seq.draft_offer = self.drafter.available(seq, most) if most > 0 else []
                wants.append((seq.draft_length, len(seq.draft_offer), g))
                order.append(seq)
        curve, rows = self.row_cost.curve(decode_ms, token_ms), len(order)

        def step_ms(extra: int) -> float:
            return curve(rows + extra)

        whole = [self.drafter.catch_up_ms(seq) if w[1] else 0.0 for seq, w in zip(order, wants, strict=True)]
        first = [self.drafter.pending_ms(seq, ms) if ms else 0.0 for seq, ms in zip(order, whole, strict=True)]
        ks = allocate(wants, step_ms, self.drafter.on_client_ms, first, whole)
        ks = [max(k, min(self.draft_min, most)) for k, (_, most, _) in zip(ks, wants, strict=True)]
        ks = group_rows(ks, [w[2] for w in wants], free)
        if logger.isEnabledFor(logging.DEBUG):  # its arguments (lists, the curve read thrice) only when it logs
            logger.debug("drafts %s (offered %s, acceptance %s; step %.1f ms, %.1f with one draft, %.1f with 8; "
                         "draft %.2f ms)", ks, [w[1] for w in wants], [round(w[0].acceptance, 2) for w in wants],
                         step_ms(0), step_ms(1), step_ms(8), self.drafter.on_client_ms)
        drafts = self.drafter.draft([(seq, k) for seq, k in zip(order, ks, strict=True) if k]) if any(ks) else {}
        for seq, k in zip(order, ks, strict=True):
            draft = drafts.get(id(seq), [])[:k]
            # a token the target does not have (a draft model's vocabulary may be longer) ends the draft
            seq.draft = draft[:next((i for i, t in enumerate(draft) if not 0 <= t < self.n_vocab), len(draft))]
            if not seq.draft and k:  # allocated drafts, and its drafter had none
                seq.draft_length.declined()
            elif not seq.draft:
                seq.draft_length.observe(0, 0)

    def verified(self, seq: Any, got: list[int]) -> None:
        """``seq``'s drafts were verified and the target sampled ``got``: the drafts up to the first it differs from
        were accepted."""
        accepted = next((i for i, (a, b) in enumerate(zip(got, seq.draft, strict=False)) if a != b),
                        min(len(got), len(seq.draft)))
        seq.draft_length.observe(len(seq.draft), accepted)
        self.prior.observe(len(seq.draft), accepted)
        seq.drafted += len(seq.draft)
        seq.accepted += accepted
        self.drafted += len(seq.draft)
        self.accepted += accepted
