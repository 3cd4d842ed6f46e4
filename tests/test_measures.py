# SPDX-License-Identifier: AGPL-3.0-or-later
"""The engine's measures kept on disk between loads (sharedllm.engine.measures): what their key depends on, and the
file that keeps them."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import threading
from collections.abc import Callable

import pytest

from sharedllm.engine import measures
from sharedllm.engine.spec import EngineSpec, EngineStage
from tests.helpers import BATCH_N_CTX, TWO, at_once, text_of, wait_for

MACHINES = {"m1": {"kernels": "aaaa", "threads": 2, "devices": [["CPU", "AMD EPYC", "cpu"]]},
            "m2": {"kernels": "bbbb", "threads": 2, "devices": [["CPU", "AMD EPYC", "cpu"]]}}


def _spec(tmp_path, **kw) -> EngineSpec:
    model = tmp_path / "model.gguf"
    if not model.exists():
        model.write_bytes(b"GGUF" + bytes(60))
    base = EngineSpec(model_path=str(model), stages=[EngineStage("127.0.0.1:1", 0, "m1", True),
                                                     EngineStage("127.0.0.1:2", 0, "m2", True)],
                      tensor_split=[9.0, 10.0], llama_kwargs={"n_ctx": 4096}, parallel=8)
    return dataclasses.replace(base, **kw)


def test_the_key_changes_with_whatever_the_measures_depend_on(tmp_path):
    spec = _spec(tmp_path)
    k = measures.key(spec, "cccc", MACHINES)
    assert k is not None and k == measures.key(_spec(tmp_path), "cccc", MACHINES)
    changed = [
        measures.key(spec, "dddd", MACHINES),  # this machine's kernels
        measures.key(spec, "cccc", {**MACHINES, "m2": {**MACHINES["m2"], "kernels": "eeee"}}),
        measures.key(spec, "cccc", {**MACHINES, "m2": {**MACHINES["m2"], "threads": 4}}),
        measures.key(_spec(tmp_path, tensor_split=[10.0, 9.0]), "cccc", MACHINES),
        measures.key(_spec(tmp_path, llama_kwargs={"n_ctx": 4096, "flash_attn": True}), "cccc", MACHINES),
        measures.key(_spec(tmp_path, parallel=4), "cccc", MACHINES),
        measures.key(_spec(tmp_path, draft="lookup"), "cccc", MACHINES),
        measures.key(_spec(tmp_path, output_on_client=True), "cccc", MACHINES),
        measures.key(_spec(tmp_path, exact_batches=False), "cccc", MACHINES),
    ]
    assert None not in changed and len({k, *changed}) == len(changed) + 1
    os.utime(spec.model_path, ns=(1, 1))  # the model file replaced
    assert measures.key(spec, "cccc", MACHINES) != k


def test_a_machine_of_unknown_build_is_measured_again(tmp_path):
    old = {**MACHINES, "m2": {"kernels": None, "threads": 2, "devices": []}}
    assert measures.key(_spec(tmp_path), "cccc", old) is None
    assert measures.key(_spec(tmp_path), "cccc", {"m1": MACHINES["m1"]}) is None  # a machine the mesh did not list
    assert measures.key(_spec(tmp_path, model_path=str(tmp_path / "gone.gguf")), "cccc", MACHINES) is None
    assert measures.recall(None) is None


def test_the_file_keeps_the_newest_entries_and_survives_garbage(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert measures.recall("k0") is None  # no file yet
    measures.remember("k0", {"max_batch": 8, "batch_min_chunk": 64})
    assert measures.recall("k0") == {"max_batch": 8, "batch_min_chunk": 64}
    monkeypatch.setattr(measures, "MAX_ENTRIES", 3)
    for i in range(1, 5):
        measures.remember(f"k{i}", {"max_batch": i})
    kept = json.loads(measures.path().read_text())
    assert sorted(kept) == ["k2", "k3", "k4"]
    measures.path().write_text("{not json")
    assert measures.recall("k4") is None  # a damaged file costs a measure, nothing else
    measures.remember("k5", {"max_batch": 5})
    assert measures.recall("k5") == {"max_batch": 5}


@pytest.mark.mesh
def test_a_first_load_serves_at_once_measures_while_idle_and_a_second_takes_the_measures_from_disk(mesh):
    # A seed no other load uses (greedy texts do not depend on it): a key of its own in the measures file, which
    # outlives a test run in the user's cache, so the first load measures and the second finds what it measured;
    # the batched texts are the solo texts in all three rounds: before the measures (steps of one sequence), after
    # them, and with them from disk.
    prompts = [("Once upon a time", 24), ("The capital of France is", 16), ("def fibonacci(n):", 32),
               ("Water boils at", 12)]
    seed = int.from_bytes(os.urandom(4), "little") >> 1
    seen, texts = [], []
    for _ in range(2):
        with mesh.load("gemma-3-270m", n_ctx=BATCH_N_CTX, machines=TWO, parallel=8, seed=seed) as llm:
            info = llm._engine.info
            seen.append((info["measured_by"], info["invariance"], llm.max_batch))
            texts.append(at_once(llm, prompts))
            if len(texts) == 1:
                assert texts[0] == {p: text_of(llm.create_completion(p, max_tokens=n, temperature=0))
                                    for p, n in prompts}
                measured = llm.measured(timeout=120)
                assert measured is not None and measured["max_batch"] >= 1, info
                assert info["measured_by"] == "engine" and llm.max_batch == measured["max_batch"]
                assert measures.recall(llm._engine.spec.measures_key) == measured  # kept for the next load
                texts.append(at_once(llm, prompts))
    assert [s[:2] for s in seen] == [("measuring", None), ("disk", measured)], seen
    assert seen[0][2] == 1  # one sequence a step until measured
    assert texts[0] == texts[1] == texts[2]


def test_measures_cut_short_by_work_resume_where_they_stopped_and_find_what_one_run_finds(model_path):
    # The batch scheduler takes the measures while idle, and work that arrives stops the unit in progress at its
    # next pass: taken again from its start later, the units done kept. Here "work" arrives at the 13th pass of each
    # idle moment (a unit takes 5-10 passes).
    from sharedllm.engine import build_llama
    from sharedllm.engine.measuring import Measuring

    llm = build_llama(str(model_path), n_ctx=4 * 512, n_threads=2, use_extra_bufts=False, parallel=4,
                      flash_attn=True)
    try:
        def measuring() -> Measuring:
            return Measuring(llm, 4, 512, {}, batches=True, chunks_from=32, verify_rows=5)

        whole = measuring()
        assert whole.run(lambda: False) and whole.done
        assert set(whole.result) == {"max_batch", "batch_min_chunk", "verify_rows"}, whole.result
        cut, stops = measuring(), 0

        def busy_at_13th_pass() -> Callable[[], bool]:
            checks = itertools.count()
            return lambda: next(checks) == 12

        while not cut.run(busy_at_13th_pass()):
            stops += 1
            assert not cut.done and stops < 100
        assert cut.result == whole.result
        assert stops > 3 and cut.passes_run > whole.passes_run  # stopped units were taken again from their start
        assert measuring().wanted and not Measuring(llm, 4, 512, whole.result, batches=True, chunks_from=32,
                                                    verify_rows=5).wanted  # what is known is not measured again
    finally:
        llm.close()


def test_a_measure_that_fails_leaves_the_engine_serving_as_before_it(model_path):
    # A measure taken while idle fails (a machine lost mid-pass, say): the batch scheduler logs it and serves on with
    # what needs no measure, one sequence a step, instead of failing every request after it.
    from sharedllm.engine import build_llama
    from sharedllm.engine.batch import BatchScheduler

    llm = build_llama(str(model_path), n_ctx=2 * 256, n_threads=2, use_extra_bufts=False, parallel=2)
    tried = threading.Event()

    class Failing:
        def run(self, busy: Callable[[], bool]) -> bool:
            tried.set()
            raise RuntimeError("llama_decode failed while measuring the batch")

    scheduler = BatchScheduler(llm, 2, 256, max_batch=1)
    try:
        scheduler.measure_while_idle(Failing())
        assert tried.wait(30)
        wait_for(lambda: scheduler.measuring is None, 30, what="the failed measure dropped")
        prompt = llm.tokenize(b"Once upon a time", add_bos=True)
        got = scheduler.generate(prompt, seed=1, logit_bias=None, stopped=lambda: False, max_tokens=8, temp=0.0)
        assert len(list(itertools.islice(got, 8))) == 8
    finally:
        scheduler.close()
        llm.close()
