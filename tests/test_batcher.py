"""Batcher behaviour: batching, results, errors, backpressure, timeouts, lifecycle, statistics.

Synchronisation uses gated batch functions and ``wait_all_tasks_blocked``, never sleeps; the few
tests that need the max_wait timer to fire use a short max_wait and assert only what happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
from collections.abc import Sequence

import anyio
import pytest
from anyio import wait_all_tasks_blocked
from anyio.lowlevel import checkpoint

import batchio
from batchio import (
    Batcher,
    BatcherBrokenError,
    BatcherClosedError,
    BatchSizeMismatchError,
    QueueFullError,
)
from batchio.testing import GatedBatchFn

pytestmark = pytest.mark.anyio

HOUR = 3600.0  # a max_wait that never elapses during a test


def double(x: int) -> int:
    return 2 * x


def gated() -> GatedBatchFn[int, int]:
    return GatedBatchFn(double, gated=True)


async def submit_all(
    b: Batcher[int, int],
    items: Sequence[int],
    tg: anyio.abc.TaskGroup,
    into: dict[int, int] | None = None,
) -> dict[int, int]:
    """Start one task per item; results land in the returned dict as they complete."""
    results: dict[int, int] = {} if into is None else into

    async def one(i: int) -> None:
        results[i] = await b(i)

    for i in items:
        tg.start_soon(one, i)
    return results


async def test_each_caller_gets_its_own_result() -> None:
    fn = GatedBatchFn(double)
    async with Batcher(fn, max_batch_size=8, max_wait=0.001) as b:
        results = await asyncio.gather(*(b(i) for i in range(100)))
    assert results == [2 * i for i in range(100)]
    assert sorted(x for batch in fn.batches for x in batch) == list(range(100))
    assert max(len(batch) for batch in fn.batches) <= 8


async def test_full_batch_dispatches_without_waiting_for_max_wait() -> None:
    fn = GatedBatchFn(double)
    async with Batcher(fn, max_batch_size=4, max_wait=HOUR) as b:
        assert list(await asyncio.gather(*(b(i) for i in range(4)))) == [0, 2, 4, 6]
    assert fn.batches == [[0, 1, 2, 3]]


async def test_partial_batch_waits_for_more_rows_then_fills() -> None:
    """Fewer rows than max_batch_size wait (no dispatch on arrival); the batch goes when full."""
    fn = GatedBatchFn(double)
    async with Batcher(fn, max_batch_size=4, max_wait=HOUR) as b, anyio.create_task_group() as tg:
        results = await submit_all(b, [0, 1, 2], tg)
        await wait_all_tasks_blocked()
        assert fn.calls == 0
        assert b.statistics().queue_depth == 3
        results[3] = await b(3)
    assert fn.batches == [[0, 1, 2, 3]]
    assert results == {i: 2 * i for i in range(4)}


async def test_zero_max_wait_dispatches_whatever_is_queued() -> None:
    fn = GatedBatchFn(double)
    async with Batcher(fn, max_batch_size=64, max_wait=0) as b:
        assert await b(5) == 10
    assert fn.batches == [[5]]


async def test_backlog_forms_full_batches_while_busy() -> None:
    """While the executor is busy, requests queue up; the next batches form from the backlog."""
    fn = gated()
    async with Batcher(fn, max_batch_size=4, max_wait=0) as b, anyio.create_task_group() as tg:
        first = await submit_all(b, [100], tg)
        await fn.wait_entered(1)
        backlog = await submit_all(b, range(8), tg)
        await wait_all_tasks_blocked()
        assert b.statistics().queue_depth == 8
        fn.open()
    assert fn.batches == [[100], [0, 1, 2, 3], [4, 5, 6, 7]]
    assert first == {100: 200}
    assert backlog == {i: 2 * i for i in range(8)}


async def test_max_concurrent_batches_bounds_batches_in_flight() -> None:
    fn = gated()
    async with (
        Batcher(fn, max_batch_size=1, max_wait=0, max_concurrent_batches=2) as b,
        anyio.create_task_group() as tg,
    ):
        results = await submit_all(b, range(5), tg)
        await fn.wait_entered(2)
        await wait_all_tasks_blocked()
        assert fn.calls == 2
        assert b.statistics().in_flight_batches == 2
        fn.open()
    assert results == {i: 2 * i for i in range(5)}
    assert b.statistics().in_flight_batches == 0


async def test_sync_fn_runs_on_one_thread_owned_by_the_batcher() -> None:
    seen: list[str] = []

    def record(items: list[int]) -> list[int]:
        seen.append(threading.current_thread().name)
        return items

    async with Batcher(record, max_batch_size=2, max_wait=0, name="m") as b:
        for i in range(5):
            await b(i)
    assert len(set(seen)) == 1
    assert seen[0].startswith("batchio-m")
    assert seen[0] != threading.current_thread().name


async def test_async_fn_is_awaited_on_the_loop() -> None:
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []

    async def fn(items: list[int]) -> list[int]:
        threads.append(threading.current_thread())
        await checkpoint()
        return [x + 1 for x in items]

    async with Batcher(fn, max_batch_size=8, max_wait=0.001) as b:
        assert await asyncio.gather(*(b(i) for i in range(20))) == list(range(1, 21))
    assert set(threads) == {loop_thread}


async def test_map_returns_results_in_order_and_splits_across_batches() -> None:
    fn = GatedBatchFn(double)
    async with Batcher(fn, max_batch_size=4, max_wait=0) as b:
        assert await b.map(range(10)) == [2 * i for i in range(10)]
        assert await b.map([]) == []
    assert fn.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    stats = b.statistics()
    assert stats.submitted == stats.completed == 2
    assert stats.rows == 10


async def test_map_rows_count_toward_max_batch_size_and_keep_fifo_order() -> None:
    fn = gated()
    async with Batcher(fn, max_batch_size=4, max_wait=0) as b, anyio.create_task_group() as tg:
        single = await submit_all(b, [100], tg)
        await fn.wait_entered(1)
        mapped: list[list[int]] = []

        async def do_map() -> None:
            mapped.append(await b.map([1, 2, 3, 4, 5, 6]))

        tg.start_soon(do_map)
        await wait_all_tasks_blocked()
        tail = await submit_all(b, [7, 8], tg)
        await wait_all_tasks_blocked()
        fn.open()
    assert fn.batches == [[100], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert mapped == [[2, 4, 6, 8, 10, 12]]
    assert single == {100: 200}
    assert tail == {7: 14, 8: 16}


async def test_fn_error_fails_the_whole_batch_and_executor_carries_on() -> None:
    calls = 0

    def flaky(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ZeroDivisionError("boom")
        return items

    async with Batcher(flaky, max_batch_size=3, max_wait=HOUR) as b:
        outcomes = await asyncio.gather(*(b(i) for i in range(3)), return_exceptions=True)
        assert all(isinstance(o, ZeroDivisionError) for o in outcomes)
        assert await b.map([7, 8, 9]) == [7, 8, 9]
    stats = b.statistics()
    assert (stats.failed, stats.completed, stats.batches) == (3, 1, 2)
    assert stats.healthy


async def test_exception_in_a_slot_fails_only_that_request() -> None:
    def fn(items: list[int]) -> list[int | Exception]:
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    async with Batcher(fn, max_batch_size=4, max_wait=HOUR) as b:
        outcomes = await asyncio.gather(b(1), b(-2), b(3), b(4), return_exceptions=True)
    assert outcomes[0] == 1
    assert isinstance(outcomes[1], ValueError)
    assert str(outcomes[1]) == "bad -2"
    assert list(outcomes[2:]) == [3, 4]


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_isolate_errors_bisects_to_the_poisoned_inputs(use_async: bool) -> None:
    seen: list[list[int]] = []

    def check(items: list[int]) -> list[int]:
        seen.append(list(items))
        if any(x % 7 == 3 for x in items):
            raise ValueError("poison")
        return [x * 10 for x in items]

    async def acheck(items: list[int]) -> list[int]:
        return check(items)

    fn = acheck if use_async else check
    async with Batcher(fn, max_batch_size=16, max_wait=HOUR, isolate_errors=True) as b:
        outcomes = await asyncio.gather(*(b(i) for i in range(16)), return_exceptions=True)
    for i, out in enumerate(outcomes):
        if i % 7 == 3:
            assert isinstance(out, ValueError)
        else:
            assert out == i * 10
    assert seen[0] == list(range(16))
    assert len(seen) < 16 * 2  # bisection, not one call per input after the first failure


async def test_wrong_number_of_results_fails_the_batch_with_mismatch_error() -> None:
    def short(items: list[int]) -> list[int]:
        return items[:-1] if 2 in items else items

    async with Batcher(short, max_batch_size=2, max_wait=HOUR) as b:
        outcomes = await asyncio.gather(b(1), b(2), return_exceptions=True)
        assert all(isinstance(o, BatchSizeMismatchError) for o in outcomes)
        err = outcomes[0]
        assert isinstance(err, BatchSizeMismatchError)
        assert (err.expected, err.actual) == (2, 1)
        assert isinstance(err, ValueError)
        assert await b.map([5, 6]) == [5, 6]


async def test_non_sequence_results_are_accepted_if_iterable() -> None:
    def gen(items: list[int]) -> Sequence[int]:
        return range(len(items))

    async with Batcher(gen, max_batch_size=3, max_wait=HOUR) as b:
        assert await b.map([9, 9, 9]) == [0, 1, 2]


async def test_queue_full_rejects_at_once() -> None:
    fn = gated()
    async with (
        Batcher(fn, max_batch_size=1, max_wait=0, max_queue_size=2) as b,
        anyio.create_task_group() as tg,
    ):
        results = await submit_all(b, [0], tg)
        await fn.wait_entered(1)
        await submit_all(b, [1, 2], tg, into=results)
        await wait_all_tasks_blocked()
        with pytest.raises(QueueFullError) as info:
            await b(3)
        assert (info.value.queued, info.value.max_queue_size) == (2, 2)
        with pytest.raises(QueueFullError):
            await b.map([4, 5, 6])  # larger than the whole queue: can never fit
        fn.open()
    assert results == {0: 0, 1: 2, 2: 4}
    stats = b.statistics()
    assert stats.rejected == 2
    assert stats.submitted == stats.completed == 3


async def test_queue_full_wait_mode_waits_for_room_in_order() -> None:
    fn = gated()
    async with (
        Batcher(fn, max_batch_size=1, max_wait=0, max_queue_size=1, when_full="wait") as b,
        anyio.create_task_group() as tg,
    ):
        results = await submit_all(b, [0], tg)
        await fn.wait_entered(1)
        for i in (1, 2, 3):
            await submit_all(b, [i], tg, into=results)
            await wait_all_tasks_blocked()
        assert b.statistics().queue_depth == 3
        fn.open()
    assert results == {i: 2 * i for i in range(4)}
    assert fn.batches == [[0], [1], [2], [3]]


async def test_submit_before_start_and_after_close_raise_closed() -> None:
    b = Batcher(double_all, max_batch_size=2)
    with pytest.raises(BatcherClosedError, match="async with"):
        await b(1)
    async with b:
        assert await b(1) == 2
    with pytest.raises(BatcherClosedError):
        await b(1)
    assert b.closed
    with pytest.raises(RuntimeError, match="twice"):
        async with b:
            pass


def double_all(items: list[int]) -> list[int]:
    return [2 * x for x in items]


async def test_closing_drains_queued_requests() -> None:
    fn = gated()
    async with anyio.create_task_group() as tg:
        async with Batcher(fn, max_batch_size=2, max_wait=HOUR) as b:
            results = await submit_all(b, range(5), tg)
            await fn.wait_entered(1)
            await wait_all_tasks_blocked()
            fn.open()
        # Leaving the block drained everything, including the partial batch of one.
        assert results == {i: 2 * i for i in range(5)}
    assert fn.batches == [[0, 1], [2, 3], [4]]


async def test_aclose_cancel_pending_fails_queued_but_finishes_running() -> None:
    fn = gated()
    b = Batcher(fn, max_batch_size=1, max_wait=0)
    outcomes: dict[int, object] = {}

    async def one(i: int) -> None:
        try:
            outcomes[i] = await b(i)
        except BatcherClosedError as exc:
            outcomes[i] = exc

    async with b, anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
        await fn.wait_entered(1)
        await wait_all_tasks_blocked()
        tg.start_soon(functools.partial(b.aclose, cancel_pending=True))
        await wait_all_tasks_blocked()
        fn.open()
    assert outcomes[0] == 0
    assert isinstance(outcomes[1], BatcherClosedError)
    assert isinstance(outcomes[2], BatcherClosedError)
    assert fn.batches == [[0]]


class ExplodingPolicy:
    """A policy that fails on its second decision, killing the executor."""

    max_batch_size = 4

    def __init__(self) -> None:
        self.decisions = 0

    def decide(self, state: batchio.QueueState) -> batchio.Dispatch | batchio.Wait:
        self.decisions += 1
        if self.decisions > 1:
            raise RuntimeError("policy bug")
        return batchio.Wait(deadline=None, wake_at_rows=1)


async def test_dead_executor_fails_every_pending_request_and_reports_unhealthy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Batcher(double_all, policy=ExplodingPolicy()) as b:
        with pytest.raises(BatcherBrokenError) as info:
            await b(1)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert not b.healthy
        assert not b.statistics().healthy
        with pytest.raises(BatcherBrokenError):
            await b(2)
    assert "executor" in caplog.text
    stats = b.statistics()
    assert (stats.submitted, stats.failed, stats.pending) == (1, 1, 0)


async def test_statistics_is_a_frozen_consistent_snapshot() -> None:
    fn = GatedBatchFn(double)
    async with Batcher(fn, max_batch_size=4, max_wait=HOUR) as b:
        before = b.statistics()
        await asyncio.gather(*(b(i) for i in range(8)))
        after = b.statistics()
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.completed = 0  # type: ignore[misc]
    assert before.submitted == 0
    assert (after.submitted, after.completed, after.batches, after.rows) == (8, 8, 2, 8)
    assert dict(after.batch_size_histogram) == {4: 2}
    assert after.mean_batch_size == 4.0
    assert after.queue_wait.count == 8
    assert after.batch_run.count == 2
    assert 0 <= after.queue_wait.p50 <= after.queue_wait.p99 <= after.queue_wait.max
    assert after.pending == after.queue_depth == after.in_flight_batches == 0


async def test_constructor_validates_options() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(double_all, max_batch_size=0)
    with pytest.raises(ValueError, match="max_concurrent_batches"):
        Batcher(double_all, max_concurrent_batches=0)
    with pytest.raises(ValueError, match="max_queue_size"):
        Batcher(double_all, max_queue_size=0)
    with pytest.raises(ValueError, match="timeout"):
        Batcher(double_all, timeout=0)
    with pytest.raises(ValueError, match="when_full"):
        Batcher(double_all, when_full="drop")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        Batcher(42)  # type: ignore[arg-type]


async def test_a_batcher_belongs_to_the_loop_that_started_it() -> None:
    async with Batcher(double_all, max_batch_size=2, max_wait=0) as b:

        def other_loop() -> None:
            async def use() -> int:
                return await b(1)

            asyncio.run(use())

        with pytest.raises(RuntimeError, match="another event loop"):
            await anyio.to_thread.run_sync(other_loop)
        assert await b(1) == 2
