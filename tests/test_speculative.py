# SPDX-License-Identifier: AGPL-3.0-or-later
"""Speculative decoding (sharedllm.engine.speculative): drafts proposed on the client, verified by the mesh many per
pass, with the text unchanged. The oracle of a model loaded with a draft is plain local llama-cpp-python with flash
attention on (a draft turns it on), greedy; seeded sampling is compared with the same mesh model without drafts."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading

import pytest

from sharedllm.engine.cost import RowCost
from sharedllm.engine.drafting import (
    FAILING_PRIOR,
    PRIOR_ACCEPTANCE,
    PROBE_FIRST,
    PROBE_SHARE,
    Drafting,
    DraftLength,
    allocate,
    group_rows,
)
from sharedllm.engine.sequence import Sequence
from sharedllm.engine.speculative import Drafter, LookupDrafter, NgramIndex
from sharedllm.options import LoadOptions
from sharedllm.views import draft_summary
from tests.helpers import N_CTX, PROMPT, TWO, machine, text_of, wait_for

PASSAGE = ("The committee met on Tuesday to discuss the new budget. After a long debate, the members agreed to "
           "increase funding for public libraries by ten percent, to reduce spending on road maintenance, and to "
           "create a new fund for small businesses affected by the flood.")
REWRITE = f"Repeat the following text exactly.\n\nText: {PASSAGE}\n\nRepeated text:"
CODE = ("def area(width, height):\n    return width * height\n\n\n"
        "# The same function, with type hints:\ndef area(width: float, height: float) -> float:\n")
# Past 512 cells of context (a kernel may take another path over a longer one: tested at load, and here)
LONG = "Summarize these minutes.\n\n" + "\n\n".join(f"Meeting {i}. {PASSAGE}" for i in range(1, 13)) + "\n\nSummary:"
PROMPTS = [REWRITE, CODE, PROMPT, LONG]


# --- the parts, alone -----------------------------------------------------------------------------------------------


def test_the_ngram_index_proposes_what_followed_the_latest_longest_match():
    index = NgramIndex(2, 4)
    tokens = [1, 2, 3, 4, 5, 6, 9, 9, 3, 4, 7, 8, 1, 2, 3, 4]
    # The suffix 1 2 3 4 occurred at the start: what followed it there (5 6 9 ...), not after the later 3 4.
    assert index.propose(tokens, 3) == [5, 6, 9]
    tokens += [7]  # ... 3 4 7: the latest 3 4 7 (position 8) is followed by 8 1
    assert index.propose(tokens, 2) == [8, 1]
    assert index.propose([*tokens, 42], 4) == []  # a suffix seen nowhere proposes nothing
    assert NgramIndex(2, 4).propose([5, 5], 3) == []  # nothing before the suffix itself


def line(step: float, row: float):
    """A step's cost that grows by ``row`` a draft from ``step``."""
    return lambda extra: step + row * extra


def test_allocate_drafts_where_they_pay_and_not_where_they_do_not():
    sure, unsure = DraftLength(prior=0.95), DraftLength(prior=0.05)
    # Behind a link a step costs 50 ms and a row 2 ms: a sure sequence takes every draft offered, an unsure none.
    assert allocate([(sure, 6, 0), (unsure, 6, 1)], line(50.0, 2.0), draft_ms=0.0) == [6, 0]
    # Locally a step costs 12 ms and a draft 10 ms more (a draft model as costly as the target): none pays.
    assert allocate([(sure, 6, 0)], line(12.0, 3.0), draft_ms=10.0) == [0]
    # Nothing offered, nothing drafted.
    assert allocate([(sure, 0, 0)], line(50.0, 2.0), draft_ms=0.0) == [0]
    # A draft model that must first read the context since its last draft pays that once, in its first draft:
    # locally 60 ms of catch-up makes a sure sequence's drafts too dear, and another's (caught up) still pay.
    assert allocate([(sure, 6, 0), (sure, 6, 0)], line(15.0, 2.0), draft_ms=1.0, first_ms=[60.0, 0.0]) == [0, 6]
    # Behind a link the same catch-up is worth it.
    assert allocate([(sure, 6, 0)], line(80.0, 2.0), draft_ms=1.0, first_ms=[60.0]) == [6]
    # The drafts of one pass share its free rows: cut from the longest first.
    assert group_rows([6, 2, 4], [0, 0, 1], {0: 5, 1: 6}) == [3, 2, 4]


def cpu(extra: int) -> float:
    """A CPU step by its draft rows (Gemma 3 270M on 2 cores): 15 ms for one row, 35 for two (another kernel), then
    about 4 ms a row."""
    return 15.0 if extra == 0 else 35.0 + 4.0 * (extra - 1)


def test_allocate_takes_drafts_that_pay_together_though_not_one_by_one():
    """On a CPU a step of two rows can cost another kernel (:func:`cpu`): one draft does not pay, eight accepted 95% of
    the time do."""
    sure, unsure = DraftLength(prior=0.95), DraftLength(prior=0.6)

    assert allocate([(sure, 1, 0)], cpu, draft_ms=0.0) == [0]
    assert allocate([(sure, 8, 0)], cpu, draft_ms=0.0) == [8]
    assert allocate([(unsure, 8, 0)], cpu, draft_ms=0.0) == [0]  # 1.5 tokens for 35 ms or more: none pays
    # A linear model fitted to such steps (its slope 20 ms a row, or the step's own cost) would draft nothing.
    assert allocate([(sure, 8, 0)], line(15.0, 15.0), draft_ms=0.0) == [0]
    # A sequence whose drafts fail probes first with as many drafts as would pay best were they accepted 90% of the
    # time (a probe of one would cost the kernel change all the same), then, after the probe failed, once the next
    # probe's 48 ms are no more than PROBE_SHARE of the steps it waited, twice (its backoff).
    failing = DraftLength(prior=0.05)
    for _ in range(PROBE_FIRST):
        failing.observe(0, 0)
    assert allocate([(failing, 8, 0)], cpu, draft_ms=0.0) == [8]
    failing.observe(8, 0)
    wait = round(2 * 48 / (15.0 * PROBE_SHARE))  # steps of 15 ms
    for _ in range(wait - 1):
        failing.observe(0, 0)
    assert allocate([(failing, 8, 0)], cpu, draft_ms=0.0) == [0]
    failing.observe(0, 0)
    assert allocate([(failing, 8, 0)], cpu, draft_ms=0.0) == [8]  # PROBE_SHARE of the steps is 2 * 48 ms
    # Two sequences probing in one step behind a link: the second is judged against the step with the first's probe
    # in it (the rows that paid the kernel change), and both probe; on the local CPU two tokens a step of 15 ms are
    # more than any probe of two sequences would give.
    a, b = DraftLength(prior=0.05), DraftLength(prior=0.05)
    for _ in range(PROBE_FIRST):
        a.observe(0, 0)
        b.observe(0, 0)
    assert allocate([(a, 8, 0), (b, 8, 0)], lambda extra: 60.0 if extra == 0 else 80.0 + 2.0 * (extra - 1),
                    draft_ms=0.0) == [8, 8]
    assert allocate([(a, 8, 0), (b, 8, 0)], cpu, draft_ms=0.0) == [0, 0]


def test_a_new_sequence_probes_in_its_first_step():
    """A load's first request has no acceptance to go by but the prior's: it probes at once rather than after
    ``PROBE_FIRST`` steps without drafts (which cost that request its first drafts)."""
    drafting = Drafting(LookupDrafter(), 16, 0, 512, 1000)
    length = drafting.new_length()
    assert length.acceptance == PRIOR_ACCEPTANCE and length.probes()
    assert allocate([(length, 16, 0)], cpu, draft_ms=0.0)[0] > 0
    length.observe(16, 0)  # the probe failed: the next waits, doubled
    assert not length.probes() and length.probe_every == 2 * PROBE_FIRST


def test_a_new_sequence_after_drafts_that_all_failed_probes_as_after_a_failed_probe():
    """Where the load's drafts are nearly all rejected, a new sequence's first probe is no free one: it waits until
    the probe costs no more than ``PROBE_SHARE`` of the steps since it started, as after a failed probe; where they
    are accepted, it probes at once."""
    drafting = Drafting(LookupDrafter(), 16, 0, 512, 1000)
    for _ in range(40):
        drafting.prior.observe(4, 0)  # the load's drafts: all rejected
    assert drafting.prior.acceptance < FAILING_PRIOR
    length = drafting.new_length()
    assert length.failed and length.probes()
    costs = {"step_ms": line(20.0, 4.0), "draft_ms": 0.0}
    assert allocate([(length, 6, 0)], **costs) == [0]  # a probe of 6 drafts (24 ms): over PROBE_SHARE of 4 steps
    for _ in range(round(24 / (20.0 * PROBE_SHARE)) - PROBE_FIRST):
        length.observe(0, 0)
    assert allocate([(length, 6, 0)], **costs) == [6]
    accepted = Drafting(LookupDrafter(), 16, 0, 512, 1000)
    for _ in range(40):
        accepted.prior.observe(4, 2)
    fresh = accepted.new_length()
    assert not fresh.failed and allocate([(fresh, 6, 0)], **costs)[0] > 0


def test_a_probe_pays_a_draft_models_first_read_in_full():
    """A new sequence's first draft from a draft model reads its prompt first, a cost spread over the steps drafting
    is to repay it. A probe guesses its acceptance: judged with the read spread, the Q2_K drafter of Gemma 3 270M
    probed at RTT 0 (20 ms steps, 9 ms a draft, a 100-token prompt read in 142 ms counted as 3 ms), and nothing
    repaid the read. Judged whole, it does not probe; behind a link its drafts pay at the prior's acceptance and
    start drafting without a probe, with the read spread."""
    rtt0, rtt20 = line(19.9, 6.0), line(62.0, 6.0)
    read, spread = 142.0, 142.0 * 2 / 92  # 92 steps left, 2 tokens a step at acceptance 0.5
    new = Drafting(LookupDrafter(), 16, 0, 512, 1000).new_length()
    assert new.probes()
    assert allocate([(new, 16, 0)], rtt0, draft_ms=9.2, first_ms=[spread]) >= [1]  # spread: it probes
    assert allocate([(new, 16, 0)], rtt0, draft_ms=9.2, first_ms=[spread], whole_ms=[read]) == [0]
    assert allocate([(new, 16, 0)], rtt20, draft_ms=9.2, first_ms=[spread], whole_ms=[read]) >= [1]
    # A chain that has the prompt already (its slot's last request shared it) costs nothing to catch up: a probe.
    assert allocate([(new, 16, 0)], rtt0, draft_ms=9.2, first_ms=[0.0], whole_ms=[0.0]) >= [1]


def test_a_sequence_whose_drafts_were_accepted_probes_again_whatever_the_probe_costs():
    """Behind a link, a draft model's sequence that drafted once (accepted) at the prior's acceptance, where the
    steps' costs then said drafting does not pay: it probes after PROBE_FIRST steps (nine in ten accepted would pay),
    though the probe's catch-up is far over PROBE_SHARE of those steps: only failed drafts back off so."""
    length = DraftLength(prior=0.5)
    length.observe(1, 1)
    costs = {"step_ms": lambda extra: 63.0 if extra == 0 else 100.0 + 4.5 * (extra - 1), "draft_ms": 10.0}
    assert allocate([(length, 16, 0)], **costs, first_ms=[3.0]) == [0]  # at its acceptance, none pays
    for _ in range(PROBE_FIRST):
        length.observe(0, 0)
    catch_up = PROBE_FIRST * 2.75
    assert allocate([(length, 16, 0)], **costs, first_ms=[catch_up], whole_ms=[catch_up])[0] > 0
    failed = DraftLength(prior=0.5)
    failed.observe(1, 0)
    for _ in range(PROBE_FIRST * 2):
        failed.observe(0, 0)
    assert allocate([(failed, 16, 0)], **costs, first_ms=[catch_up], whole_ms=[catch_up]) == [0]


def test_a_sequence_whose_drafts_fail_backs_off_and_probes_again():
    length = DraftLength(prior=0.5)
    costs = {"step_ms": line(20.0, 4.0), "draft_ms": 0.0}
    assert allocate([(length, 6, 0)], **costs) >= [1]
    for _ in range(6):
        length.observe(4, 0)  # every first draft rejected: its acceptance falls
    assert length.acceptance < 0.2
    assert allocate([(length, 6, 0)], **costs) == [0]
    for _ in range(PROBE_FIRST):
        length.observe(0, 0)  # steps without drafts
    assert allocate([(length, 6, 0)], **costs) == [0]  # a probe of 6 drafts (24 ms): over PROBE_SHARE of 4 steps
    wait = round(24 / (20.0 * PROBE_SHARE))  # steps of 20 ms whose PROBE_SHARE is the probe's 24 ms
    for _ in range(wait - PROBE_FIRST):
        length.observe(0, 0)
    assert allocate([(length, 6, 0)], **costs) == [6]  # a probe: the drafts that pay best at 90% acceptance
    length.observe(6, 0)  # the probe failed: the next one waits twice as long
    assert length.probe_every == 2 * PROBE_FIRST
    for _ in range(2 * wait - 1):
        length.observe(0, 0)
    assert allocate([(length, 6, 0)], **costs) == [0]
    length.observe(0, 0)
    assert allocate([(length, 6, 0)], **costs) == [6]
    # Where a draft would not pay even if always accepted (a draft model as costly as a local step), no probe.
    assert allocate([(length, 6, 0)], line(5.0, 4.0), draft_ms=10.0) == [0]
    # Nor where the probe's catch-up would cost more than it could give.
    assert allocate([(length, 6, 0)], **costs, first_ms=[200.0]) == [0]


class Unsure(Drafter):
    """A drafter like a draft model that is not sure of its next token for its first ``unsure`` asks (all: None):
    drafts are made once allocated (any length offered), and none comes; once sure, the drafts asked for."""

    name = "unsure"

    def __init__(self, unsure: int | None = None, on_client_ms: float = 0.0) -> None:
        self.asked, self.unsure, self.on_client_ms = 0, unsure, on_client_ms

    def available(self, seq, most):
        return [0] * most

    def draft(self, wanted):
        self.asked += 1
        if self.unsure is None or self.asked <= self.unsure:
            return {}
        return {id(seq): [7] * k for seq, k in wanted}


def _drafting_one(drafter, step_ms: float, nine_rows_ms: float):
    drafting = Drafting(drafter, 16, 0, 512, 1000)
    seq = Sequence([1, 2, 3], sampler=None, stopped=lambda: False, limit=None)
    seq.slot, seq.n_past = 0, 3
    seq.draft_length = drafting.new_length()
    for _ in range(3):
        drafting.row_cost.observe(1, step_ms)
        drafting.row_cost.observe(9, nine_rows_ms)
    return drafting, seq


def test_a_drafter_that_has_no_drafts_when_asked_backs_off_as_a_failed_probe():
    """Asking a draft model costs the client a pass whether or not it is sure of a token: a sequence whose drafter
    declines is taken to have drafts less often, and a probe that got none waits as after a failed probe (before, it
    was asked again every ``PROBE_FIRST`` steps: a quarter of the steps' time at RTT 0, and not one draft)."""
    drafter = Unsure()
    drafting, seq = _drafting_one(drafter, 15.0, 15.0 + cpu(8) - cpu(0))  # a CPU step: one row, then nine
    for _ in range(200):
        drafting.propose([[seq]], {0: 16}, 15.0)
        assert seq.draft == []
    length = seq.draft_length
    assert length.sure < 0.2 and length.acceptance == PRIOR_ACCEPTANCE  # no draft was tried
    assert length.probe_every > PROBE_FIRST
    assert drafter.asked <= 8  # asked with backoff (at first, then after ever longer waits), not every 4 steps
    assert drafting.drafted == 0 and drafting.accepted == 0


def test_a_drafter_unsure_at_first_drafts_once_sure():
    """Behind a link (a step of 60 ms, a draft pass of 10 on the client) drafts pay: a drafter unsure of an answer's
    first tokens is asked on and drafts once sure (counted as rejected drafts, its declines stopped it for good)."""
    drafter = Unsure(unsure=3, on_client_ms=10.0)
    drafting, seq = _drafting_one(drafter, 60.0, 66.0)
    drafted = []
    for _ in range(20):
        drafting.propose([[seq]], {0: 16}, 60.0)
        drafted.append(len(seq.draft))
        if seq.draft:
            drafting.verified(seq, [*seq.draft, 8])  # every draft accepted
    assert drafted[:3] == [0, 0, 0] and all(drafted[-10:]), drafted  # declined thrice, then drafting every step
    assert seq.draft_length.sure > 0.5


def test_row_cost_is_measured_by_the_rows_of_a_step():
    cost = RowCost()
    assert cost.ms(3, unknown=12.0) == 12.0  # nothing measured: what the caller guesses
    cost.observe(1, 15.0)
    assert cost.ms(1) == 15.0
    assert cost.ms(3) == pytest.approx(15.0 + 2 * RowCost.PRIOR * 15.0)  # past what was measured: the prior
    for _ in range(10):
        cost.observe(2, 35.0)
        cost.observe(9, 63.0)
    assert cost.ms(2) == pytest.approx(35.0)
    assert cost.ms(9) == pytest.approx(63.0)
    assert cost.ms(5) == pytest.approx(35.0 + 3 * 4.0)  # between two measured counts: on the line through them
    assert cost.ms(11) == pytest.approx(63.0 + 2 * RowCost.PRIOR * 15.0)
    # A count seen once is taken halfway between that step and the guess for it (a first step may pay for what
    # starts with it); a count that cost more than a larger one (a slow moment) is taken at the larger one's cost.
    cost.observe(4, 90.0)
    assert cost.ms(4) == pytest.approx(15.0 + (75.0 + 3 * RowCost.PRIOR * 15.0) / 2)
    cost.observe(4, 90.0)
    assert cost.ms(4) == pytest.approx(63.0)
    assert cost.ms(3) == pytest.approx(35.0 + (63.0 - 35.0) / 2)
    # The link got 40 ms slower: the steps of one row say so, and every count's cost rises alike (a pass's round
    # trips do not depend on its rows).
    for _ in range(30):
        cost.observe(1, 55.0)
    assert cost.ms(1) == pytest.approx(55.0, abs=0.5)
    assert cost.ms(2) == pytest.approx(75.0, abs=1.0)
    assert cost.ms(9) == pytest.approx(103.0, abs=1.0)
    # A count measured while the level still climbs to a slower link's steps is measured over the new steps.
    climbing = RowCost()
    for ms in (15.0, 15.0, 55.0):
        climbing.observe(1, ms)
    climbing.observe(2, 75.0)
    climbing.observe(2, 75.0)
    assert climbing.ms(1) < 40.0 and climbing.ms(2) - climbing.ms(1) == pytest.approx(20.0)
    # Past the largest count, no more a row than ROW_TOKENS prompt tokens where a prompt token's cost is known: a
    # guess from the smallest count's cost alone grows with the link.
    assert cost.ms(11, token_ms=1.5) == pytest.approx(103.0 + 2 * RowCost.ROW_TOKENS * 1.5, abs=1.0)
    assert cost.ms(11, token_ms=100.0) == pytest.approx(103.0 + 2 * RowCost.PRIOR * 55.0, abs=1.0)


def test_a_draft_models_costs_are_measured_before_its_first_draft(model_path):
    """Before any draft, the draft model's pass and a context token read are timed (drafting would look free), and a
    sequence's first draft, which reads its whole context, is charged spread over the tokens it may still give."""
    from types import SimpleNamespace

    from sharedllm.engine.load import build_llama
    from sharedllm.engine.speculative import ModelDrafter

    llm = build_llama(str(model_path), n_ctx=256, parallel=2, unified=True, use_extra_bufts=True, n_threads=2,
                      n_batch=512)
    drafter = ModelDrafter(llm, 2, 256, path=str(model_path))
    try:
        assert drafter.on_client_ms == drafter.read_ms == 0.0
        drafter.calibrate()
        # A token read among 31 costs a fraction of a pass of one (the weights are read once a pass).
        assert 0.0 < drafter.read_ms < drafter.on_client_ms

        def seq(limit: int | None, acceptance: float):
            prompt = list(range(100, 200))
            return SimpleNamespace(slot=0, prompt=prompt, outputs=[], limit=limit, sampled=0, n_past=len(prompt),
                                   draft_length=DraftLength(prior=acceptance), history=lambda: list(prompt))

        # 100 tokens to read, 50 left to give at 2 tokens a step (acceptance 0.5): 100 * 2 / 50 reads a step.
        assert drafter.pending_ms(seq(50, 0.5)) == pytest.approx(100 * drafter.read_ms * 2 / 50)
        assert drafter.pending_ms(seq(1000, 0.5)) == pytest.approx(100 * drafter.read_ms * 2 / 1000)
        assert drafter.pending_ms(seq(1, 0.5)) == pytest.approx(100 * drafter.read_ms)  # at most the whole read
        assert drafter.catch_up_ms(seq(50, 0.5)) == pytest.approx(100 * drafter.read_ms)  # what a probe counts
        # With no max_tokens, the rest of the context.
        assert drafter.pending_ms(seq(None, 0.75)) == pytest.approx(100 * drafter.read_ms * 4 / (256 - 100))
    finally:
        drafter.close()


def test_load_options_of_a_draft():
    opts = LoadOptions(draft="lookup")
    assert opts.llama_kwargs()["flash_attn"] is True
    assert opts.engine_options()["draft"] == "lookup"
    assert LoadOptions().llama_kwargs()["flash_attn"] is True  # llama-server's default, and the oracle's
    assert LoadOptions.build(flash_attn=False).llama_kwargs()["flash_attn"] is False
    with pytest.raises(ValueError, match="flash attention"):
        LoadOptions.build(draft="lookup", flash_attn=False)
    with pytest.raises(ValueError, match="draft_max"):
        LoadOptions(draft="lookup", draft_max=0)
    with pytest.raises(ValueError, match="draft_min"):
        LoadOptions(draft="lookup", draft_max=4, draft_min=5)


def test_draft_counts_reach_the_views_and_the_totals():
    from sharedllm.scheduler_plugins.mesh.data import MeshData

    load = {"draft": {"drafter": "lookup", "drafted": 40.0, "accepted": 30.0, "steps": 20.0, "tokens": 50.0}}
    assert draft_summary(load) == "lookup: 75% accepted, 2.5 tok/step"
    assert draft_summary({"running": 1.0}) is None
    data = MeshData()
    data.count_drafts(load["draft"], None)
    data.count_drafts({"drafted": 50.0, "accepted": 36.0}, load["draft"])
    assert data.drafts_total == {"accepted": 36.0, "rejected": 14.0}
    data.count_drafts({"drafted": 4.0, "accepted": 3.0}, {"drafted": 50.0, "accepted": 36.0})  # a new engine
    assert data.drafts_total == {"accepted": 39.0, "rejected": 15.0}


# --- on the mesh ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flash_greedy(model_path):
    """The oracle: plain local llama-cpp-python, flash attention on (as with a draft), greedy."""
    from sharedllm.engine import build_llama

    llm = build_llama(str(model_path), n_ctx=N_CTX, n_threads=2, use_extra_bufts=False, flash_attn=True)
    out = {p: text_of(llm.create_completion(p, max_tokens=72, temperature=0)) for p in PROMPTS}
    llm.close()
    return out


def _drafts(llm) -> dict:
    return wait_for(lambda: llm.engine_stats.get("draft"), timeout=30, what="the engine's draft counts")


def _drafts_after(llm, before: dict) -> dict:
    """The engine's draft counts once they report a request's steps after ``before`` and nothing runs."""
    def counted():
        stats = llm.engine_stats or {}
        draft = stats.get("draft")
        return draft if draft and draft["steps"] > before["steps"] and not stats.get("running") else None

    return wait_for(counted, timeout=30, what="the engine's draft counts after the request")


# Each load below leases both machines: the tests that load their own model come before the module's shared one.


@pytest.mark.mesh
def test_eight_sequences_each_with_its_drafts(mesh, flash_greedy):
    with mesh.load("gemma-3-270m", n_ctx=512, machines=TWO, parallel=8, draft="lookup", draft_min=4) as llm:
        assert llm.measured()["verify_rows"] >= 2  # drafts are verified once measured (while idle, a first load)
        texts: dict[int, str] = {}
        prompts = [PROMPTS[i % 3] for i in range(8)]  # short ones: 512 tokens of context each

        def one(i: int) -> None:
            texts[i] = "".join(c["choices"][0]["text"] for c in llm.create_completion(
                prompts[i], max_tokens=72, temperature=0, stream=True))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert {i: texts.get(i) for i in range(8)} == {i: flash_greedy[p] for i, p in enumerate(prompts)}
        assert _drafts(llm)["accepted"] > 0


@pytest.mark.mesh
def test_a_draft_model_with_the_targets_vocabulary(mesh, model_path, flash_greedy, tmp_path_factory):
    from sharedllm.models import quantized

    draft = quantized(model_path, "Q2_K", tmp_path_factory.mktemp("drafts"))  # llama.cpp's quantizer, cheaper
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, draft=str(draft), draft_min=4) as llm:
        assert llm.measured()["verify_rows"] >= 2  # drafts are verified once measured (while idle, a first load)
        assert text_of(llm.create_completion(REWRITE, max_tokens=72, temperature=0)) == flash_greedy[REWRITE]
        draft_counts = _drafts(llm)
        assert draft_counts["drafter"] == draft.name and draft_counts["accepted"] > 0


@pytest.mark.mesh
def test_a_draft_model_of_another_vocabulary_is_one_clear_error(mesh, model_path, tmp_path):
    # The same model with one token's text changed: its drafts would not be the target's tokens.
    import llama_cpp

    vocab_only = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)
    token = 10_000
    text = llama_cpp.llama_vocab_get_text(vocab_only._model.vocab, token)
    vocab_only.close()
    other = tmp_path / "other-vocab.gguf"
    shutil.copyfile(model_path, other)
    data = other.read_bytes()
    needle = len(text).to_bytes(8, "little") + text
    at = data.index(needle)
    changed = bytes(reversed(text)) if bytes(reversed(text)) != text else text.upper()
    with open(other, "r+b") as f:
        f.seek(at + 8)
        f.write(changed)
    with pytest.raises(ValueError) as err:
        mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, draft=str(other))
    message = str(err.value)
    assert "other-vocab.gguf" in message and model_path.name in message and "vocabulary differs" in message
    assert f"token {token}" in message and "\n" not in message
    wait_for(lambda: not mesh.state()["sessions"], timeout=30, what="the failed load's lease to be given back")


@pytest.mark.mesh
def test_kill_an_rpc_server_mid_stream_with_drafts(mesh, flash_greedy):
    victim = machine(mesh, "machine-2")["rpc"]
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, draft="lookup", draft_min=6) as llm:
        assert llm.measured()["verify_rows"] >= 2  # drafts are verified once measured (while idle, a first load)
        text = ""
        for chunk_text in _stream_killing(llm, lambda: os.kill(victim["pid"], signal.SIGKILL)):
            text += chunk_text
        assert text == flash_greedy[REWRITE]
        assert [r["lost"] for r in llm.recoveries] == ["machine-2"]
    wait_for(lambda: (m := machine(mesh, "machine-2")) and m["rpc"]["pid"] != victim["pid"]
             and mesh.machines().ready(), timeout=120, what="machine-2's rpc-server back")


@pytest.fixture(scope="module")
def drafting(mesh):
    """Gemma on both machines with the lookup drafter, taking every draft offered (up to 6 a step): the test
    mesh's loopback links are so fast that drafting would not pay, and the drafts must be verified to be tested."""
    with mesh.load("gemma-3-270m", n_ctx=N_CTX, machines=TWO, draft="lookup", draft_max=6, draft_min=6) as llm:
        assert llm.measured()["verify_rows"] >= 2  # drafts are verified once measured (while idle, a first load)
        yield llm


@pytest.mark.mesh
def test_greedy_text_with_lookup_drafts_is_the_text_without(drafting, flash_greedy):
    before = _drafts(drafting)["accepted"] if drafting.engine_stats.get("draft") else 0
    for prompt in PROMPTS:
        assert text_of(drafting.create_completion(prompt, max_tokens=72, temperature=0)) == flash_greedy[prompt]
        streamed = "".join(c["choices"][0]["text"]
                           for c in drafting.create_completion(prompt, max_tokens=72, temperature=0, stream=True))
        assert streamed == flash_greedy[prompt]
    draft = _drafts(drafting)
    assert draft["drafter"] == "lookup"
    assert draft["accepted"] - before > 50  # the rewrite quotes its passage: most drafts verified were accepted
    assert draft["tokens"] > draft["steps"]  # more than one token per step
    assert drafting._engine.info["invariance"]["verify_rows"] >= 2


@pytest.mark.mesh
def test_a_request_bounds_its_own_drafts(drafting, flash_greedy):
    """``draft_max`` per request (llama-server's ``speculative.n_max``): 0 turns drafting off for that request alone,
    with the same text; a bad value is one clear error, and the model serves on."""
    before = _drafts(drafting)
    assert text_of(drafting.create_completion(REWRITE, max_tokens=72, temperature=0, draft_max=0)) == \
        flash_greedy[REWRITE]
    after = _drafts_after(drafting, before)
    assert after["drafted"] == before["drafted"]
    assert text_of(drafting.create_completion(REWRITE, max_tokens=72, temperature=0, draft_max=2)) == \
        flash_greedy[REWRITE]
    bounded = _drafts_after(drafting, after)
    steps = bounded["steps"] - after["steps"]
    assert 0 < bounded["drafted"] - after["drafted"] <= 2 * steps  # at most 2 drafts a step
    with pytest.raises(ValueError, match="draft_max must be an integer >= 0"):
        drafting.create_completion(REWRITE, max_tokens=8, draft_max=-1)
    assert text_of(drafting.create_completion(REWRITE, max_tokens=72, temperature=0)) == flash_greedy[REWRITE]


@pytest.mark.mesh
def test_asyncio_stop_strings_and_max_tokens_as_without_drafts(drafting, flash_greedy):
    async def run() -> str:
        return "".join([c["choices"][0]["text"] async for c in await drafting.acreate_completion(
            REWRITE, max_tokens=72, temperature=0, stream=True)])

    assert asyncio.run(run()) == flash_greedy[REWRITE]
    # Drafts run past a stop string and max_tokens: the text ends where it would without them.
    stop = flash_greedy[REWRITE].split()[6]
    out = drafting.create_completion(REWRITE, max_tokens=72, temperature=0, stop=[stop])
    assert text_of(out) == flash_greedy[REWRITE].split(stop)[0]
    assert out["choices"][0]["finish_reason"] == "stop"
    out = drafting.create_completion(REWRITE, max_tokens=9, temperature=0)
    assert out["usage"]["completion_tokens"] == 9 and flash_greedy[REWRITE].startswith(text_of(out))


@pytest.mark.mesh
def test_seeded_sampling_logprobs_and_grammars_with_drafts_are_those_without(drafting, model_path):
    from sharedllm.engine import Engine, EngineSpec

    # Without drafts: a local engine of the same model and kernels (flash attention on), one token at a time.
    plain = Engine(EngineSpec(model_path=str(model_path), llama_kwargs={"n_ctx": N_CTX, "n_threads": 2,
                                                                        "flash_attn": True}))
    plain.start()
    try:
        for seed in (7, 11):
            kwargs = {"prompt": REWRITE, "max_tokens": 48, "temperature": 0.7, "seed": seed}
            assert text_of(drafting.create_completion(**kwargs)) == text_of(plain.call("create_completion", kwargs))
        kwargs = {"prompt": REWRITE, "max_tokens": 24, "temperature": 0, "logprobs": 3}
        got = drafting.create_completion(**kwargs)["choices"][0]["logprobs"]
        want = plain.call("create_completion", kwargs)["choices"][0]["logprobs"]
        assert got["tokens"] == want["tokens"]
        assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-5)
        # A grammar (response_format): the drafts it does not allow are not accepted; the same JSON.
        kwargs = {"messages": [{"role": "user", "content": "Give a JSON object with a field name set to Ada."}],
                  "max_tokens": 32, "temperature": 0, "response_format": {"type": "json_object"}}
        assert drafting.create_chat_completion(**kwargs)["choices"][0]["message"]["content"] == \
            plain.call("create_chat_completion", kwargs)["choices"][0]["message"]["content"]
    finally:
        plain.close()


@pytest.mark.mesh
def test_the_mesh_reports_drafts(mesh_cluster, drafting):
    import urllib.request

    drafting.create_completion(REWRITE, max_tokens=48, temperature=0)

    def reported():
        sessions = {s["session_id"]: s for s in mesh_cluster.mesh().state()["sessions"]}
        draft = (sessions.get(drafting.session_id, {}).get("load") or {}).get("draft")
        return draft if draft and draft.get("accepted", 0) > 0 else None

    draft = wait_for(reported, timeout=30, what="the session's draft counts at the scheduler")
    assert draft["drafter"] == "lookup" and draft["tokens"] > draft["steps"]
    page = urllib.request.urlopen(f"{mesh_cluster.dashboard_link.rsplit('/', 1)[0]}/metrics", timeout=10).read()
    series = 'sharedllm_draft_tokens_total{result="accepted"}'
    lines = [ln for ln in page.decode().splitlines() if ln.startswith(series)]
    assert lines and float(lines[0].split()[-1]) > 0


def _stream_killing(llm, fault, after: int = 6):
    for n, chunk in enumerate(llm.create_completion(REWRITE, max_tokens=72, temperature=0, stream=True), 1):
        yield chunk["choices"][0]["text"]
        if n == after:
            fault()
