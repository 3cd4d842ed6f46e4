# SPDX-License-Identifier: AGPL-3.0-or-later
"""The standby engine process (``sharedllm.engine.Standby``): started ahead, the model loads into it; a dead one is
replaced by a new process, never a failure. Real model, local (the recovery that takes it: tests/test_churn.py)."""

import os

import pytest

from sharedllm.engine import Engine, EngineSpec, Standby

pytestmark = pytest.mark.mesh  # engine processes with the real model

ARGS = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def solo(model_path):
    """The greedy text of an engine that started its own process."""
    engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 256}))
    engine.start()
    try:
        return engine.call("create_completion", dict(ARGS))["choices"][0]["text"]
    finally:
        engine.close()


def test_an_engine_loads_into_its_standby(model_path, solo):
    standby = Standby()
    engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 256}), standby=standby)
    try:
        info = engine.start()
        assert info["pid"] == standby.proc.pid
        assert engine.call("create_completion", dict(ARGS))["choices"][0]["text"] == solo
    finally:
        engine.close()
    assert standby.proc.poll() is not None and not os.path.exists(standby.log.name)


def test_a_dead_standby_is_replaced_by_a_new_process(model_path, solo):
    standby = Standby()
    standby.proc.kill()
    standby.proc.wait()
    engine = Engine(EngineSpec(str(model_path), llama_kwargs={"n_ctx": 256}), standby=standby)
    try:
        info = engine.start()
        assert info["pid"] != standby.proc.pid
        assert engine.call("create_completion", dict(ARGS))["choices"][0]["text"] == solo
    finally:
        engine.close()
    assert not os.path.exists(standby.log.name)


def test_an_engine_that_never_starts_stops_its_standby():
    standby = Standby()
    Engine(EngineSpec("/nonexistent.gguf"), standby=standby).close()
    assert standby.proc.poll() is not None and not os.path.exists(standby.log.name)
