# SPDX-License-Identifier: AGPL-3.0-or-later
"""One core, two drivers (``sharedllm.effects``): the blocking and the asyncio driver run the same generator to the
same result, pass failures into it, and run its ``finally`` blocks when the caller stops early."""

from __future__ import annotations

import asyncio
import threading

import pytest

from sharedllm import effects


def _value(v):
    """A wait for ``v``: the blocking side returns it, the asyncio side returns it after a turn of the loop."""

    async def wait():
        await asyncio.sleep(0)
        return v

    return effects.Wait(lambda: v, wait)


def _failing(exc: BaseException):
    def block():
        raise exc

    async def wait():
        raise exc

    return effects.Wait(block, wait)


def _adder(log: list):
    try:
        a = yield _value(2)
        try:
            yield _failing(KeyError("x"))
        except KeyError:
            log.append("caught")
        b = yield _value(3)
        return a + b
    finally:
        log.append("finally")


def test_run_and_arun_give_the_same_result_and_pass_failures_in():
    log_sync, log_async = [], []
    assert effects.run(_adder(log_sync)) == 5
    assert asyncio.run(effects.arun(_adder(log_async))) == 5
    assert log_sync == log_async == ["caught", "finally"]


def test_an_uncaught_failure_leaves_the_core_with_its_type():
    def core():
        yield _failing(TimeoutError("late"))

    with pytest.raises(TimeoutError, match="late"):
        effects.run(core())
    with pytest.raises(TimeoutError, match="late"):
        asyncio.run(effects.arun(core()))


def _counter(n: int, log: list):
    try:
        for i in range(n):
            got = yield _value(i * 10)
            yield got + 1  # an item for the caller
    finally:
        log.append("closed")


def test_iterate_and_aiterate_yield_the_same_items():
    log: list = []
    assert list(effects.iterate(_counter(3, log))) == [1, 11, 21]

    async def collect():
        return [x async for x in effects.aiterate(_counter(3, log))]

    assert asyncio.run(collect()) == [1, 11, 21]
    assert log == ["closed", "closed"]


def test_stopping_a_stream_early_runs_the_cores_finally():
    log: list = []
    it = effects.iterate(_counter(100, log))
    assert next(it) == 1
    it.close()
    assert log == ["closed"]

    async def first_then_cancel():
        gen = effects.aiterate(_counter(100, log))
        assert await gen.__anext__() == 1
        await gen.aclose()

    asyncio.run(first_then_cancel())
    assert log == ["closed", "closed"]


def test_a_cancelled_task_runs_the_cores_finally():
    log: list = []
    started = None

    def core():
        try:
            yield effects.Wait(lambda: None, lambda: asyncio.sleep(3600))
        finally:
            log.append("finally")

    async def main():
        nonlocal started
        task = asyncio.ensure_future(effects.arun(core()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert log == ["finally"]


def test_in_thread_blocks_in_the_caller_or_runs_in_a_worker_thread():
    caller = threading.get_ident()
    seen = []

    def where():
        seen.append(threading.get_ident())
        return "ok"

    def core():
        return (yield effects.in_thread(where))

    assert effects.run(core()) == "ok"
    assert asyncio.run(effects.arun(core())) == "ok"
    assert seen[0] == caller and seen[1] != caller


def test_a_shielded_wait_finishes_before_the_cancellation_goes_on():
    finished = threading.Event()
    release = threading.Event()

    def slow():
        release.wait(5)
        finished.set()

    def core():
        yield effects.in_thread(slow, shield=True)

    async def main():
        task = asyncio.ensure_future(effects.arun(core()))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done()  # still waiting for slow() to end
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert finished.is_set()


def test_nested_streams_pass_their_waits_up_and_their_items_out():
    log: list = []

    def outer():
        inner = effects.Nested(_counter(3, log))
        try:
            while (item := (yield from inner.next())) is not effects.END:
                yield item * 2
        finally:
            inner.close()

    assert list(effects.iterate(outer())) == [2, 22, 42]

    async def collect():
        return [x async for x in effects.aiterate(outer())]

    assert asyncio.run(collect()) == [2, 22, 42]
    assert log == ["closed", "closed"]
    it = effects.iterate(outer())
    next(it)
    it.close()  # closing the outer stream closes the nested one
    assert log == ["closed", "closed", "closed"]
