"""Cancellation: a cancelled caller never breaks the batch, the executor, or anyone else's result.

Cases: cancelled while queued, while its batch runs in the thread, exactly at delivery, a ``map``
request cancelled with rows still queued, and the batcher closed with requests still queued.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from batchio import Batcher, BatcherClosedError
from batchio.testing import GatedBatchFn

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def double(x: int) -> int:
    return 2 * x


async def test_cancelled_while_queued_never_reaches_fn() -> None:
    """The cancelled request is removed from the queue: it is not run and takes no room."""
    fn = GatedBatchFn(double, gated=True)
    async with Batcher(fn, max_batch_size=2, max_wait=0) as b:
        blocker = asyncio.ensure_future(b(0))
        await fn.wait_entered(1)
        victim = asyncio.ensure_future(b.submit(1))
        survivors = [asyncio.ensure_future(b(i)) for i in (2, 3)]
        await wait_all_tasks_blocked()
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert b.statistics().queue_depth == 2
        fn.open()
        assert await blocker == 0
        assert await asyncio.gather(*survivors) == [4, 6]
    assert fn.batches == [[0], [2, 3]]
    stats = b.statistics()
    assert (stats.cancelled, stats.completed, stats.pending) == (1, 3, 0)


async def test_cancelled_while_running_leaves_batch_and_executor_unharmed() -> None:
    fn = GatedBatchFn(double, gated=True)
    async with Batcher(fn, max_batch_size=3, max_wait=HOUR) as b:
        tasks = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await fn.wait_entered(1)
        tasks[1].cancel()
        await wait_all_tasks_blocked()
        fn.open()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert done[0] == 0
        assert isinstance(done[1], asyncio.CancelledError)
        assert done[2] == 4
        # The executor still works.
        assert await b.map([5, 6, 7]) == [10, 12, 14]
    stats = b.statistics()
    assert (stats.cancelled, stats.completed, stats.failed, stats.pending) == (1, 3, 0, 0)
    assert stats.healthy


async def test_cancelled_exactly_at_delivery() -> None:
    """The result is set, then the caller is cancelled before it resumes: the caller sees the
    cancellation, the request counts as completed once, and the batcher is unharmed."""
    loop = asyncio.get_running_loop()
    victim: asyncio.Task[int] | None = None

    async def fn(items: list[int]) -> list[int]:
        assert victim is not None
        # Scheduled before the delivery below wakes the victim, so it runs in between.
        loop.call_soon(victim.cancel)
        return [2 * x for x in items]

    async with Batcher(fn, max_batch_size=2, max_wait=HOUR) as b:
        victim = asyncio.ensure_future(b.submit(1))
        other = asyncio.ensure_future(b(2))
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert await other == 4
        assert await b.map([3, 4]) == [6, 8]
    stats = b.statistics()
    assert (stats.completed, stats.cancelled, stats.pending) == (3, 0, 0)


async def test_cancelled_map_drops_its_queued_rows() -> None:
    fn = GatedBatchFn(double, gated=True)
    async with Batcher(fn, max_batch_size=2, max_wait=0) as b:

        async def caller() -> list[int]:
            return await b.map(range(10, 16))

        big = asyncio.ensure_future(caller())
        await fn.wait_entered(1)
        await wait_all_tasks_blocked()
        assert b.statistics().queue_depth == 4
        big.cancel()
        await wait_all_tasks_blocked()
        assert b.statistics().queue_depth == 0
        fn.open()
        with pytest.raises(asyncio.CancelledError):
            await big
        assert await b.map([1, 2]) == [2, 4]
    assert fn.batches == [[10, 11], [1, 2]]


async def test_cancel_scope_around_a_request_cancels_only_that_request() -> None:
    fn = GatedBatchFn(double, gated=True)
    async with Batcher(fn, max_batch_size=8, max_wait=HOUR) as b:
        others = [asyncio.ensure_future(b(i)) for i in range(3)]
        with anyio.move_on_after(0.001) as scope:
            await b(99)
        assert scope.cancelled_caught
        assert fn.calls == 0
        fn.open()
        await b.aclose()
        assert [t.result() for t in others] == [0, 2, 4]
    assert 99 not in [x for batch in fn.batches for x in batch]


async def test_closing_with_queued_requests_resolves_all_of_them() -> None:
    """Exit with requests queued: drained by default; with cancel_pending they fail, clearly."""
    fn = GatedBatchFn(double, gated=True)
    b = Batcher(fn, max_batch_size=1, max_wait=0)
    async with b:
        tasks = [asyncio.ensure_future(b(i)) for i in range(4)]
        await fn.wait_entered(1)
        await wait_all_tasks_blocked()
        fn.open()
    assert [t.result() for t in tasks] == [0, 2, 4, 6]

    fn2 = GatedBatchFn(double, gated=True)
    b2 = Batcher(fn2, max_batch_size=1, max_wait=0)
    async with b2:
        tasks = [asyncio.ensure_future(b2(i)) for i in range(4)]
        await fn2.wait_entered(1)
        await wait_all_tasks_blocked()
        closing = asyncio.ensure_future(b2.aclose(cancel_pending=True))
        await wait_all_tasks_blocked()
        fn2.open()
        await closing
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert outcomes[0] == 0
    assert all(isinstance(o, BatcherClosedError) for o in outcomes[1:])
    assert b2.statistics().pending == 0


async def test_cancelling_aclose_fails_queued_requests_instead_of_leaving_them() -> None:
    fn = GatedBatchFn(double, gated=True)
    b = Batcher(fn, max_batch_size=1, max_wait=0)
    async with b:
        tasks = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await fn.wait_entered(1)
        await wait_all_tasks_blocked()
        with anyio.move_on_after(0.001):
            await b.aclose()
        for t in tasks[1:]:
            with pytest.raises(BatcherClosedError):
                await t
        fn.open()
    assert tasks[0].result() == 0
    assert b.statistics().pending == 0


async def test_close_with_only_cancelled_requests_queued_does_not_hang() -> None:
    """Regression: the executor once counted cancelled entries as queued rows, found no oldest
    request, and went back to sleep after close instead of exiting."""
    fn = GatedBatchFn(double)
    b = Batcher(fn, max_batch_size=8, max_wait=HOUR)
    async with b:
        callers = [asyncio.ensure_future(b.submit(i)) for i in range(3)]
        await wait_all_tasks_blocked()
        for c in callers:
            c.cancel()
        await wait_all_tasks_blocked()
        with anyio.fail_after(5):
            await b.aclose()
    assert fn.calls == 0
    stats = b.statistics()
    assert (stats.cancelled, stats.pending, stats.queue_depth) == (3, 0, 0)
