"""``Batcher.reconfigure``: live option changes, effective from the next batch decision, that never
lose or reorder queued requests (issue 9's reconfiguration, the first step of it)."""

from __future__ import annotations

import asyncio
import threading
import typing

import pytest

from batchio import (
    Batcher,
    BatcherLoopError,
    BatcherOptions,
    QueueFullError,
    ReconfigureKw,
)
from batchio.testing import GatedBatchFn, wait_all_tasks_blocked

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def echo(xs: list[int]) -> list[int]:
    return xs


async def test_a_new_batch_size_applies_to_the_next_batch_and_keeps_the_order() -> None:
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: x * 2, gated=True)
    async with Batcher(fn, max_batch_size=2, max_wait=0) as b:
        first = [asyncio.ensure_future(b(x)) for x in range(2)]
        await fn.wait_entered(1)  # [0, 1] is running; the rest queue behind it
        queued = [asyncio.ensure_future(b(x)) for x in range(2, 9)]
        await wait_all_tasks_blocked()
        opts = b.reconfigure(max_batch_size=5)
        assert opts.max_batch_size == 5
        assert b.options is opts
        assert b.max_batch_size == 5
        fn.open()
        assert await asyncio.gather(*first, *queued) == [x * 2 for x in range(9)]
    assert fn.batches == [[0, 1], [2, 3, 4, 5, 6], [7, 8]]


async def test_a_shorter_wait_dispatches_a_waiting_partial_batch_at_once() -> None:
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: x)
    async with Batcher(fn, max_batch_size=8, max_wait=HOUR) as b:
        tasks = [asyncio.ensure_future(b(x)) for x in range(3)]
        await wait_all_tasks_blocked()
        assert fn.calls == 0  # waiting an hour for company
        b.reconfigure(max_wait=0)
        assert await asyncio.gather(*tasks) == [0, 1, 2]
    assert fn.batches == [[0, 1, 2]]


async def test_a_larger_queue_bound_admits_parked_requests_in_order() -> None:
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: x, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0, max_queue_size=1, when_full="wait") as b:
        running = asyncio.ensure_future(b(0))
        await fn.wait_entered(1)
        rest = [asyncio.ensure_future(b(x)) for x in range(1, 5)]  # 1 queued, 3 parked
        await wait_all_tasks_blocked()
        assert (b.statistics().queue_depth, b._room.parked_rows) == (4, 3)
        b.reconfigure(max_queue_size=3)
        await wait_all_tasks_blocked()
        assert (b._room.rows, b._room.parked_rows) == (3, 1)
        b.reconfigure(max_queue_size=None)  # lifted: every parked request is admitted
        assert (b._room.rows, b._room.parked_rows) == (4, 0)
        fn.open()
        assert await asyncio.gather(running, *rest) == [0, 1, 2, 3, 4]
    assert fn.batches == [[0], [1], [2], [3], [4]]


async def test_a_smaller_queue_bound_keeps_what_is_queued_and_refuses_new_calls() -> None:
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: x, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0, max_queue_size=10) as b:
        running = asyncio.ensure_future(b(0))
        await fn.wait_entered(1)
        queued = [b.submit_nowait(x) for x in range(1, 5)]
        b.reconfigure(max_queue_size=2)
        with pytest.raises(QueueFullError):
            b.submit_nowait(99)
        fn.open()
        assert await asyncio.gather(running, *queued) == [0, 1, 2, 3, 4]
        stats = b.statistics()
    assert (stats.completed, stats.rejected, stats.pending) == (5, 1, 0)


async def test_allowed_batch_sizes_and_timeout_follow_the_new_options() -> None:
    sizes: list[int] = []

    def fn(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    async with Batcher(fn, max_batch_size=4, max_wait=0) as b:
        assert await b.map([1, 2, 3]) == [1, 2, 3]
        b.reconfigure(allowed_batch_sizes=(2, 4), timeout=30.0)
        assert await b.map([1, 2, 3]) == [1, 2, 3]
        assert b.options.timeout == 30.0
    assert sizes == [3, 4]


async def test_a_bad_value_raises_and_changes_nothing() -> None:
    b: Batcher[int, int] = Batcher(echo, max_batch_size=4, max_wait=0.01)
    async with b:
        before = b.options
        with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
            b.reconfigure(max_batch_size=0)
        with pytest.raises(ValueError, match="must equal max_batch_size"):
            b.reconfigure(allowed_batch_sizes=(2,))
        with pytest.raises(TypeError, match="cannot change on a live batcher"):
            b.reconfigure(max_concurrent_batches=2)  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="unknown batcher option"):
            b.reconfigure(max_size=2)  # type: ignore[call-arg]
        assert b.options is before
        assert await b(1) == 1


async def test_reconfigure_from_another_thread_is_refused() -> None:
    b: Batcher[int, int] = Batcher(echo, max_wait=0)
    async with b:
        outcome: list[BaseException] = []

        def elsewhere() -> None:
            try:
                b.reconfigure(max_wait=0.5)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        await asyncio.to_thread(thread.join)
        assert isinstance(outcome[0], BatcherLoopError)
        assert b.options.max_wait == 0


def test_reconfigure_before_start_is_allowed() -> None:
    b: Batcher[int, int] = Batcher(echo, max_batch_size=4)
    assert b.reconfigure(max_batch_size=8).max_batch_size == 8


def test_reconfigure_kw_names_the_options_that_may_change() -> None:
    names = set(typing.get_type_hints(ReconfigureKw))
    fields = set(BatcherOptions.__dataclass_fields__)
    assert names <= fields
    assert fields - names == {"max_concurrent_batches", "when_full", "name", "batch_cost"}


async def test_a_staged_batcher_takes_the_new_sizes_too() -> None:
    from batchio import Stages

    sizes: list[int] = []

    def run(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    async with Batcher(Stages[int, int](run=run), max_batch_size=2, max_wait=0) as b:
        assert await b.map([1, 2, 3]) == [1, 2, 3]
        b.reconfigure(max_batch_size=4, allowed_batch_sizes=(4,))
        assert await b.map([1, 2, 3]) == [1, 2, 3]
    assert sizes == [2, 1, 4]
