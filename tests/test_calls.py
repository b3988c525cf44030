"""Calls work wherever a coroutine is expected, and the ``_nowait`` twins return futures.

Defect pinned: ``b(x)`` used to return a bare Future, so ``asyncio.create_task(b(x))``,
``TaskGroup.create_task(b(x))`` and anyio's ``tg.start_soon(b, x)`` all raised.
"""

from __future__ import annotations

import asyncio
import inspect

import anyio
import pytest

from batchio import Batcher
from batchio.testing import GatedBatchFn, wait_all_tasks_blocked

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def double_all(items: list[int]) -> list[int]:
    return [2 * x for x in items]


async def test_call_is_a_coroutine_for_create_task() -> None:
    async with Batcher(double_all, max_batch_size=4, max_wait=0) as b:
        call = b(1)
        assert inspect.iscoroutine(call)
        assert await asyncio.create_task(call) == 2
        assert await asyncio.create_task(b.map([1, 2])) == [2, 4]


async def test_call_in_an_asyncio_task_group() -> None:
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: 2 * x)
    async with Batcher(fn, max_batch_size=4, max_wait=HOUR) as b:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(b(i)) for i in range(4)]
        assert [t.result() for t in tasks] == [0, 2, 4, 6]
    assert fn.batches == [[0, 1, 2, 3]]


async def test_call_with_anyio_start_soon() -> None:
    results: dict[int, int] = {}
    async with Batcher(double_all, max_batch_size=3, max_wait=HOUR) as b:

        async def one(i: int) -> None:
            results[i] = await b(i)

        async with anyio.create_task_group() as tg:
            tg.start_soon(b, 100)  # the batcher itself as the coroutine function
            tg.start_soon(b.map, [5])
            tg.start_soon(one, 7)
    assert results == {7: 14}
    stats = b.statistics()
    assert (stats.completed, stats.batches) == (3, 1)


async def test_submit_nowait_queues_before_it_returns() -> None:
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: 2 * x)
    async with Batcher(fn, max_batch_size=2, max_wait=HOUR) as b:
        first = b.submit_nowait(1)
        assert isinstance(first, asyncio.Future)
        assert b.statistics().queue_depth == 1  # queued already, without a task
        second = b.map_nowait([2])
        assert (await first, await second) == (2, [4])
    assert fn.batches == [[1, 2]]


async def test_cancelling_the_coroutine_drops_its_queued_row_at_once() -> None:
    """Cancellation through ``await b(x)`` is noticed when it happens (not lazily): the row stops
    counting toward the queue and the cancellation is counted."""
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: 2 * x, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0, max_queue_size=1) as b:
        running = asyncio.ensure_future(b(0))
        await fn.wait_entered(1)
        queued = asyncio.ensure_future(b(1))
        await wait_all_tasks_blocked()
        assert b.statistics().queue_depth == 1
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        stats = b.statistics()
        assert (stats.queue_depth, stats.cancelled) == (0, 1)
        fn.open()
        assert await b(2) == 4
        assert await running == 0
    assert fn.batches == [[0], [2]]
    stats = b.statistics()
    assert (stats.submitted, stats.completed, stats.cancelled, stats.pending) == (3, 2, 1, 0)


async def test_cancelling_a_map_coroutine_drops_its_queued_rows() -> None:
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: 2 * x, gated=True)
    async with Batcher(fn, max_batch_size=2, max_wait=0) as b:
        big = asyncio.ensure_future(b.map(range(5)))
        await fn.wait_entered(1)
        await wait_all_tasks_blocked()
        assert b.statistics().queue_depth == 3
        big.cancel()
        with pytest.raises(asyncio.CancelledError):
            await big
        assert b.statistics().queue_depth == 0
        fn.open()
    assert fn.batches == [[0, 1]]
    stats = b.statistics()
    assert (stats.cancelled, stats.pending) == (1, 0)
