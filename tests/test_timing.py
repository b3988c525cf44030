"""Everything that depends on time passing (max_wait, deadlines, batch_time_limit, bounded close),
driven by a virtual clock: time moves only when a test advances it, so nothing waits on a real
timer and every assertion is exact.

These tests run on asyncio's own loop only: uvloop's clock lives in C and cannot be replaced.
What they exercise (the batcher reading ``loop.time()`` and arming ``loop.call_at``) is the same
code on both loops, and the rest of the suite runs it under uvloop with real time.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from batchio import (
    Batcher,
    BatcherClosedError,
    BatchStalledError,
    RequestTimeoutError,
)
from batchio.testing import GatedBatchFn, VirtualClock, wait_all_tasks_blocked

pytestmark = pytest.mark.anyio

HOUR = 3600.0


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {})


@pytest.fixture
def clock() -> VirtualClock:
    """A virtual clock; each test installs it on its own loop."""
    return VirtualClock()


def double(x: int) -> int:
    return 2 * x


def gated() -> GatedBatchFn[int, int]:
    return GatedBatchFn(double, gated=True)


async def test_partial_batch_dispatches_after_max_wait(clock: VirtualClock) -> None:
    """A partial batch waits exactly max_wait for company (measured from its oldest row)."""
    with clock.install():
        fn = GatedBatchFn(double)
        async with Batcher(fn, max_batch_size=64, max_wait=0.5) as b:
            tasks = [asyncio.ensure_future(b(i)) for i in (1, 2)]
            await wait_all_tasks_blocked()
            clock.advance(0.25)
            await wait_all_tasks_blocked()
            assert fn.calls == 0
            clock.advance(0.25)
            assert list(await asyncio.gather(*tasks)) == [2, 4]
        assert fn.batches == [[1, 2]]


async def test_waiting_for_room_respects_the_deadline(clock: VirtualClock) -> None:
    with clock.install():
        fn = gated()
        async with Batcher(
            fn, max_batch_size=1, max_wait=0, max_queue_size=1, when_full="wait"
        ) as b:
            first = asyncio.ensure_future(b(0))
            await fn.wait_entered(1)
            queued = asyncio.ensure_future(b(1))
            parked = asyncio.ensure_future(b(2, timeout=0.5))
            await wait_all_tasks_blocked()
            clock.advance(0.5)
            with pytest.raises(RequestTimeoutError) as info:
                await parked
            assert not info.value.dispatched
            fn.open()
            assert (await first, await queued) == (0, 2)
        assert [2] not in fn.batches
        assert b.statistics().timed_out == 1


async def test_request_whose_deadline_passes_while_queued_is_never_dispatched(
    clock: VirtualClock,
) -> None:
    with clock.install():
        fn = gated()
        async with Batcher(fn, max_batch_size=4, max_wait=0) as b:
            first = asyncio.ensure_future(b(0))
            await fn.wait_entered(1)
            late = asyncio.ensure_future(b(1, timeout=0.5))
            await wait_all_tasks_blocked()
            clock.advance(0.5)
            with pytest.raises(RequestTimeoutError) as info:
                await late
            assert not info.value.dispatched
            assert isinstance(info.value, TimeoutError)
            fn.open()
            assert await first == 0
            assert await b(2) == 4
        assert fn.batches == [[0], [2]]
        stats = b.statistics()
        assert (stats.timed_out, stats.completed, stats.pending) == (1, 2, 0)


async def test_expired_request_is_not_dispatched_even_before_its_timer_runs(
    clock: VirtualClock,
) -> None:
    """Batch formation checks deadlines itself, so a late timer cannot let an expired row in."""
    with clock.install():
        fn = gated()
        async with Batcher(fn, max_batch_size=4, max_wait=0) as b:
            first = asyncio.ensure_future(b(0))
            await fn.wait_entered(1)
            late = asyncio.ensure_future(b(1, timeout=0.5))
            fresh = asyncio.ensure_future(b(2))
            await wait_all_tasks_blocked()
            clock.advance(1.0)  # both the batch's end and the timer are due now
            fn.open()
            assert (await first, await fresh) == (0, 4)
            with pytest.raises(RequestTimeoutError):
                await late
        assert fn.batches == [[0], [2]]


async def test_deadline_passing_while_running_fails_only_that_request(
    clock: VirtualClock,
) -> None:
    with clock.install():
        fn = gated()
        async with Batcher(fn, max_batch_size=2, max_wait=HOUR) as b:
            other = asyncio.ensure_future(b(1))
            mine = asyncio.ensure_future(b(2, timeout=0.5))
            await fn.wait_entered(1)
            clock.advance(0.5)
            with pytest.raises(RequestTimeoutError) as info:
                await mine
            assert info.value.dispatched
            fn.open()
            assert await other == 2
        assert [sorted(batch) for batch in fn.batches] == [[1, 2]]
        assert (b.statistics().timed_out, b.statistics().completed) == (1, 1)


async def test_default_timeout_and_per_call_override(clock: VirtualClock) -> None:
    with clock.install():
        fn = gated()
        async with Batcher(fn, max_batch_size=8, max_wait=0, timeout=0.5) as b:
            defaulted = asyncio.ensure_future(b(1))
            no_deadline = asyncio.ensure_future(b(3, timeout=None))
            longer = asyncio.ensure_future(b(4, timeout=2.0))
            await fn.wait_entered(1)
            clock.advance(1.0)
            with pytest.raises(RequestTimeoutError):
                await defaulted
            await wait_all_tasks_blocked()
            assert not longer.done()
            clock.advance(1.0)
            with pytest.raises(RequestTimeoutError):
                await longer
            fn.open()
            assert await no_deadline == 6


# -- batch_time_limit (a stuck model) --------------------------------------------------------------


async def test_stalled_sync_batch_fails_with_stalled_error_and_the_batcher_carries_on(
    clock: VirtualClock,
) -> None:
    """A sync fn that never returns: at the limit its requests fail with BatchStalledError, the
    stuck thread is abandoned and replaced, later requests succeed, and statistics say so."""
    with clock.install():
        stuck = threading.Event()
        calls: list[list[int]] = []

        entered = threading.Event()

        def fn(items: list[int]) -> list[int]:
            calls.append(list(items))
            entered.set()
            if 0 in items:
                stuck.wait(30)
            return [2 * x for x in items]

        async with Batcher(fn, max_batch_size=2, max_wait=0, batch_time_limit=5.0) as b:
            victims = [asyncio.ensure_future(b(i)) for i in (0, 1)]
            # The limit counts from when a thread starts the batch: let it start first.
            assert await asyncio.to_thread(entered.wait, 30)
            await wait_all_tasks_blocked()
            clock.advance(5.0)
            for victim in victims:
                with pytest.raises(BatchStalledError) as info:
                    await victim
                assert info.value.limit == 5.0
            assert list(await asyncio.gather(b(2), b(3))) == [4, 6]
            stats = b.statistics()
            assert (stats.stalled_batches, stats.abandoned_workers) == (1, 1)
            assert (stats.failed, stats.completed, stats.pending) == (2, 2, 0)
            assert b.healthy
            stuck.set()  # the abandoned thread returns; its result is dropped
        assert calls == [[0, 1], [2, 3]]


async def test_stalled_async_batch_is_cancelled(clock: VirtualClock) -> None:
    with clock.install():
        cancelled = asyncio.Event()

        async def fn(items: list[int]) -> list[int]:
            if 0 in items:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            return items

        async with Batcher(fn, max_batch_size=1, max_wait=0, batch_time_limit=1.0) as b:
            victim = asyncio.ensure_future(b(0))
            await wait_all_tasks_blocked()
            clock.advance(1.0)
            with pytest.raises(BatchStalledError):
                await victim
            await cancelled.wait()
            assert await b(7) == 7
        assert b.statistics().stalled_batches == 1


async def test_async_fn_that_ignores_cancellation_is_left_behind(clock: VirtualClock) -> None:
    """An async fn that swallows the cancellation keeps running detached; the batcher moves on."""
    with clock.install():
        release = asyncio.Event()

        async def fn(items: list[int]) -> list[int]:
            if 0 in items:
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    await release.wait()  # ignores it, for a while
            return items

        async with Batcher(fn, max_batch_size=1, max_wait=0, batch_time_limit=1.0) as b:
            victim = asyncio.ensure_future(b(0))
            await wait_all_tasks_blocked()
            clock.advance(1.0)
            with pytest.raises(BatchStalledError):
                await victim
            assert await b(5) == 5
            release.set()


async def test_bounded_aclose_fails_queued_and_running_requests_at_its_deadline(
    clock: VirtualClock,
) -> None:
    with clock.install():
        fn = gated()
        b = Batcher(fn, max_batch_size=1, max_wait=0)
        await b.__aenter__()
        running = asyncio.ensure_future(b(0))
        await fn.wait_entered(1)
        queued = asyncio.ensure_future(b(1))
        await wait_all_tasks_blocked()
        closing = asyncio.ensure_future(b.aclose(timeout=2.0))
        await wait_all_tasks_blocked()
        assert not closing.done()
        clock.advance(2.0)
        await closing
        for request in (running, queued):
            with pytest.raises(BatcherClosedError):
                await request
        stats = b.statistics()
        assert (stats.failed, stats.pending, stats.closed) == (2, 0, True)
        fn.open()  # the abandoned worker returns and exits


async def test_bounded_aclose_returns_at_once_when_already_drained(clock: VirtualClock) -> None:
    with clock.install():
        b = Batcher(GatedBatchFn(double), max_batch_size=1, max_wait=0)
        await b.__aenter__()
        assert await b(1) == 2
        await b.aclose(timeout=0)
        assert b.statistics().completed == 1
