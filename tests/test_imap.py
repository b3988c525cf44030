"""``Batcher.imap``: bulk streams through a batcher in constant memory, in order or as completed.

Every item gets its own result in its own place; no more than ``max_in_flight`` items are ever
submitted and unconsumed; a failed item raises (or is yielded, with ``return_exceptions``);
leaving early withdraws what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from batchio import Batcher, BatcherClosedError, QueueFullError
from batchio.testing import GatedBatchFn, wait_all_tasks_blocked

pytestmark = pytest.mark.anyio


def double(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


class Source:
    """An iterable that counts how many items were pulled from it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pulled = 0

    def __iter__(self) -> Iterator[int]:
        for i in range(self.n):
            self.pulled += 1
            yield i


async def test_results_come_in_input_order_and_never_more_than_max_in_flight_unconsumed() -> None:
    src = Source(5000)
    consumed = 0
    async with Batcher(double, max_batch_size=16, max_wait=0.0) as b:
        async for result in b.imap(src, max_in_flight=40):
            assert result == 2 * consumed
            consumed += 1
            assert src.pulled - consumed <= 40 - 1  # this one's slot is free again
    assert consumed == 5000
    s = b.statistics()
    assert s.completed == 5000
    assert s.mean_batch_size > 1  # the stream kept batches filled


async def test_an_async_source_streams_through_too() -> None:
    async def agen() -> AsyncIterator[int]:
        for i in range(100):
            if i % 10 == 0:
                await asyncio.sleep(0)  # a source that awaits (another stage, a socket)
            yield i

    async with Batcher(double, max_batch_size=8, max_wait=0.0) as b:
        assert [r async for r in b.imap(agen())] == [2 * i for i in range(100)]


async def test_unordered_yields_as_completed_and_ordered_waits_for_the_slow_one() -> None:
    slow = asyncio.Event()

    async def fn(xs: list[int]) -> list[int]:
        if 0 in xs:
            await slow.wait()
        return [10 * x for x in xs]

    async with Batcher(fn, max_batch_size=1, max_wait=0.0, max_concurrent_batches=2) as b:
        out: list[int] = []
        async for r in b.imap(range(4), ordered=False):
            out.append(r)
            if len(out) == 3:
                slow.set()  # the others overtook item 0
        assert out == [10, 20, 30, 0]

        slow.clear()
        ordered = b.imap(range(3))
        first = asyncio.ensure_future(anext(ordered))
        await wait_all_tasks_blocked()
        assert not first.done()  # items 1 and 2 are done, but 0 comes first
        slow.set()
        assert await first == 0
        assert [r async for r in ordered] == [10, 20]


async def test_a_failed_item_raises_and_withdraws_the_rest() -> None:
    fn = GatedBatchFn[int, int](lambda x: x)

    def picky(xs: list[int]) -> list[object]:
        fn(xs)
        return [ValueError(f"bad {x}") if x == 3 else x for x in xs]

    async with Batcher(picky, max_batch_size=1, max_wait=0.0) as b:
        with pytest.raises(ValueError, match="bad 3"):
            async for _ in b.imap(range(1000), max_in_flight=8):
                pass
        await wait_all_tasks_blocked()
        s = b.statistics()
        assert s.pending == 0
        assert s.queue_depth == 0
    assert b.statistics().completed < 20  # the rest of the 1000 never ran


async def test_return_exceptions_yields_each_error_in_its_place() -> None:
    def picky(xs: list[int]) -> list[object]:
        return [ValueError(x) if x % 3 == 0 else x for x in xs]

    async with Batcher(picky, max_batch_size=4, max_wait=0.0) as b:
        out = [r async for r in b.imap(range(7), return_exceptions=True)]
    assert [type(r).__name__ if isinstance(r, Exception) else r for r in out] == [
        "ValueError",
        1,
        2,
        "ValueError",
        4,
        5,
        "ValueError",
    ]


async def test_an_error_of_the_source_comes_after_the_results_before_it() -> None:
    def broken() -> Iterator[int]:
        yield 1
        yield 2
        raise OSError("the file went away")

    got: list[int] = []

    async def collect(b: Batcher[int, int]) -> None:
        async for r in b.imap(broken()):
            got.append(r)  # noqa: PERF401 - what came before the error is the point

    async with Batcher(double, max_batch_size=4, max_wait=0.0) as b:
        with pytest.raises(OSError, match="went away"):
            await collect(b)
    assert got == [2, 4]


async def test_leaving_early_cancels_and_withdraws_what_is_in_flight() -> None:
    fn = GatedBatchFn[int, int](lambda x: x, gated=True)
    async with Batcher(fn, max_batch_size=2, max_wait=0.0) as b:
        async with contextlib.aclosing(b.imap(range(10**9), max_in_flight=6)) as results:
            first = asyncio.ensure_future(anext(results))
            await fn.wait_entered()
            await wait_all_tasks_blocked()
            assert b.statistics().queue_depth == 4  # 6 in flight: a batch of 2 held, 4 queued
            fn.open()
            assert await first == 0
        s = b.statistics()
        assert s.queue_depth == 0  # withdrawn at once, not when they reach the front
        assert s.cancelled >= 3


async def test_cancelling_the_consumer_cleans_up() -> None:
    fn = GatedBatchFn[int, int](lambda x: x, gated=True)
    async with Batcher(fn, max_batch_size=2, max_wait=0.0) as b:

        async def consume() -> None:
            async for _ in b.imap(range(100), max_in_flight=4):
                pass  # pragma: no cover - the first result never comes

        task = asyncio.ensure_future(consume())
        await fn.wait_entered()
        await wait_all_tasks_blocked()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert b.statistics().queue_depth == 0
        fn.open()
    s = b.statistics()
    assert s.pending == 0
    assert s.submitted == 4


async def test_refusals_at_the_door_are_the_items_errors() -> None:
    async with Batcher(double, max_batch_size=1, max_wait=0.0, max_queue_size=1) as b:
        # The feeder submits all three in one step: the first fills the queue.
        out = [r async for r in b.imap(range(3), max_in_flight=3, return_exceptions=True)]
    assert out[0] == 0
    assert all(isinstance(r, QueueFullError) for r in out[1:])


async def test_bad_arguments_are_refused_before_anything_is_submitted() -> None:
    async with Batcher(double) as b:
        with pytest.raises(ValueError, match="max_in_flight"):
            b.imap(range(3), max_in_flight=0)
        with pytest.raises(ValueError, match="timeout"):
            b.imap(range(3), timeout=-1.0)
        with pytest.raises(TypeError):
            b.imap(range(3), priority="high")  # type: ignore[call-overload]
        assert b.statistics().submitted == 0


async def test_a_closed_batcher_ends_the_stream_even_with_return_exceptions() -> None:
    pulled = Source(10**9)  # an endless source would otherwise be pulled to the end
    b = Batcher(double)
    async with b:
        pass
    stream = b.imap(pulled, return_exceptions=True)
    with pytest.raises(BatcherClosedError):
        await anext(stream)
    assert pulled.pulled == 1
