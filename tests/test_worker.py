"""The worker transport on its own: calling fn and checking its outputs, bisection, and the
batcher's own threads (round trip, errors, abandonment of a stuck job, shutdown)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from batchio import BatchOutputError, BatchSizeMismatchError
from batchio._worker import WorkerThreads, call_async, call_sync, is_async_callable

pytestmark = pytest.mark.anyio


def fails_on_odd(items: list[int]) -> list[int]:
    if any(x % 2 for x in items):
        raise ValueError(f"odd in {items}")
    return [x * 10 for x in items]


async def afails_on_odd(items: list[int]) -> list[int]:
    return fails_on_odd(items)


def test_isolation_bisects_to_the_failing_inputs() -> None:
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(items)
        return fails_on_odd(items)

    outcomes = call_sync(fn, [0, 1, 2, 4], isolate=True)
    assert outcomes[0] == 0
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[2:] == [20, 40]
    assert calls[0] is not calls[1]  # each call gets its own list: fn may mutate it
    with pytest.raises(ValueError, match="odd"):
        call_sync(fails_on_odd, [1], isolate=False)


async def test_async_isolation_bisects_the_same_way() -> None:
    outcomes = await call_async(afails_on_odd, [1, 2, 3], isolate=True)
    assert isinstance(outcomes[0], ValueError)
    assert outcomes[1] == 20
    assert isinstance(outcomes[2], ValueError)
    with pytest.raises(ValueError, match="odd"):
        await call_async(afails_on_odd, [1], isolate=False)


@pytest.mark.parametrize(
    ("fn", "error"),
    [(lambda xs: set(xs), BatchOutputError), (lambda xs: xs[:-1], BatchSizeMismatchError)],
)
def test_contract_errors_are_not_bisected(fn: Any, error: type[Exception]) -> None:
    """An error about what fn returned is about no input: bisecting would only repeat it."""
    calls = 0

    def counted(items: list[int]) -> Any:
        nonlocal calls
        calls += 1
        return fn(items)

    with pytest.raises(error):
        call_sync(counted, [1, 2, 3, 4], isolate=True)
    assert calls == 1


async def test_async_contract_errors_are_not_bisected() -> None:
    async def fn(items: list[int]) -> set[int]:
        return set(items)

    with pytest.raises(BatchOutputError):
        await call_async(fn, [1, 2], isolate=True)


def test_async_callables_are_recognised() -> None:
    class AsyncCallable:
        async def __call__(self, items: list[int]) -> list[int]:
            return items

    assert is_async_callable(afails_on_odd)
    assert is_async_callable(AsyncCallable())
    assert not is_async_callable(fails_on_odd)


async def test_threads_run_jobs_and_report_outcomes_on_the_loop() -> None:
    threads = WorkerThreads(1, "unit-roundtrip")
    try:
        job = threads.run(lambda x: (x, threading.current_thread().name), 5)
        value, name = await job.future
        assert (value, name) == (5, "unit-roundtrip-0")
        failing = threads.run(lambda x: 1 // x, 0)
        with pytest.raises(ZeroDivisionError):
            await failing.future
        stopped = threads.run(lambda x: next(iter([])), 0)
        with pytest.raises(RuntimeError) as info:  # a future cannot hold StopIteration
            await stopped.future
        assert isinstance(info.value.__cause__, StopIteration)
    finally:
        threads.shutdown()


async def test_an_abandoned_job_is_replaced_and_its_thread_exits_when_it_returns() -> None:
    started, release = threading.Event(), threading.Event()

    def hang(_: object) -> bool:
        started.set()
        return release.wait(30)

    threads = WorkerThreads(1, "unit-abandon")
    try:
        stuck = threads.run(hang, None)
        await asyncio.to_thread(started.wait, 30)  # thread 0 is inside the job
        threads.abandon(stuck)
        threads.abandon(stuck)  # once is enough
        assert threads.abandoned == 1
        # The replacement takes the next job while the stuck one still runs.
        assert await threads.run(lambda x: x + 1, 1).future == 2
        mine = {t.name: t for t in threading.enumerate() if t.name.startswith("unit-abandon")}
        assert set(mine) == {"unit-abandon-0", "unit-abandon-1"}
        release.set()
        # The stuck thread returns, drops its result and exits.
        await asyncio.to_thread(mine["unit-abandon-0"].join, 30)
        assert not mine["unit-abandon-0"].is_alive()
        assert threads.abandoned == 0
        assert not stuck.future.done()  # its late outcome was dropped
    finally:
        threads.shutdown()


async def test_a_finished_job_cannot_be_abandoned() -> None:
    threads = WorkerThreads(1, "unit-finished")
    try:
        job = threads.run(lambda x: x, 3)
        assert await job.future == 3
        threads.abandon(job)
        assert threads.abandoned == 0
    finally:
        threads.shutdown()
