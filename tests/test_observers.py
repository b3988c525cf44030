"""Observers, cumulative histograms and the live-batcher registry: what exporters build on."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import math

import pytest

from batchio import (
    TIME_BUCKETS,
    Batcher,
    BatchObserver,
    BatchRecord,
    BatchStalledError,
    Histogram,
    live_batchers,
)
from batchio._stats import HistogramCounts
from batchio.testing import GatedBatchFn, VirtualClock, wait_all_tasks_blocked

pytestmark = pytest.mark.anyio

CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="none")


class Recorder:
    """An observer that captures the caller's context variable and keeps every record."""

    def __init__(self) -> None:
        self.records: list[BatchRecord] = []

    def capture(self) -> object:
        return CALLER.get()

    def batch_done(self, record: BatchRecord) -> None:
        self.records.append(record)


def double(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


async def call_as(b: Batcher[int, int], who: str, x: int) -> int:
    CALLER.set(who)  # (in this task's own context copy)
    return await b(x)


# -- histograms --------------------------------------------------------------------------------


def test_histogram_buckets_are_upper_bound_inclusive_and_cumulate_to_the_count() -> None:
    h = HistogramCounts((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(value)
    h.observe_all([0.2, 7.0])
    snap = h.snapshot()
    assert snap.counts == (2, 3, 2)
    assert snap.count == 7
    assert snap.sum == pytest.approx(0.05 + 0.1 + 0.5 + 1.0 + 3.0 + 0.2 + 7.0)
    assert snap.cumulative() == ((0.1, 2), (1.0, 5), (math.inf, 7))


async def test_statistics_count_every_wait_and_run_in_the_histograms() -> None:
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.BaseEventLoop):
        # uvloop's clock lives in C: the same counts, without the exact bucket placement.
        async with Batcher(double, max_batch_size=4, max_wait=0.0) as b:
            await asyncio.gather(*(b(i) for i in range(10)))
        s = b.statistics()
        assert s.queue_wait_histogram.count == 10
        assert s.batch_run_histogram.count == s.batches
        return
    with VirtualClock().install() as clock:
        fn = GatedBatchFn[int, int](lambda x: x, gated=True)
        async with Batcher(fn, max_batch_size=2, max_wait=0.003) as b:
            calls = [asyncio.ensure_future(b(i)) for i in range(2)]
            await fn.wait_entered()  # full at once: waited 0 s
            clock.advance(0.02)  # the batch "runs" 20 ms
            fn.open()
            await asyncio.gather(*calls)
            late = asyncio.ensure_future(b(9))
            await wait_all_tasks_blocked()
            clock.advance(0.003)  # max_wait passes for the lone request
            assert await late == 9
        s = b.statistics()
    waits, runs = s.queue_wait_histogram, s.batch_run_histogram
    assert waits.bounds == runs.bounds == TIME_BUCKETS
    assert waits.count == 3
    assert runs.count == 2
    assert dict(waits.cumulative())[0.0005] == 2  # the two that filled a batch at once
    assert dict(waits.cumulative())[0.005] == 3  # the lone one, after max_wait
    assert waits.sum == pytest.approx(0.003)
    assert dict(runs.cumulative())[0.01] == 1  # the lone one ran in no virtual time
    assert dict(runs.cumulative())[0.025] == 2  # the gated one took 20 ms
    assert runs.sum == pytest.approx(0.02)


def test_an_unstarted_batcher_reports_empty_histograms() -> None:
    s = Batcher(double).statistics()
    assert s.queue_wait_histogram == Histogram(TIME_BUCKETS, (0,) * 17, 0.0, 0)
    assert s.batch_run_histogram.cumulative()[-1] == (math.inf, 0)


# -- the live-batcher registry -------------------------------------------------------------------


async def test_live_batchers_lists_started_batchers_in_start_order_until_collected() -> None:
    never_started = Batcher(double, name="never")
    second = Batcher(double, name="second")
    async with Batcher(double, name="first") as first, second:
        live = live_batchers()
        assert live.index(first) < live.index(second)
        assert never_started not in live
    assert second in live_batchers()  # closed, but its final counters still count
    del live, first, second
    gc.collect()
    assert not [b for b in live_batchers() if b.name in ("first", "second")]


# -- observers -----------------------------------------------------------------------------------


async def test_a_record_per_batch_carries_each_callers_captured_context() -> None:
    rec = Recorder()
    fn = GatedBatchFn[int, int](lambda x: 10 * x, gated=True)
    async with Batcher(fn, max_batch_size=3, max_wait=60.0) as b:
        b.add_observer(rec)
        calls = [asyncio.ensure_future(call_as(b, f"caller-{i}", i)) for i in range(3)]
        await fn.wait_entered()
        fn.open()
        assert await asyncio.gather(*calls) == [0, 10, 20]
    (record,) = rec.records
    assert record.batcher == b.name
    assert (record.rows, record.requests) == (3, 3)
    assert record.contexts == ("caller-0", "caller-1", "caller-2")
    assert len(record.queue_waits) == 3
    assert all(w >= 0 for w in record.queue_waits)
    assert record.error is None
    assert record.failed_rows == 0
    assert record.ended_ns >= record.started_ns
    assert record.ended_ns - record.started_ns == pytest.approx(record.run * 1e9, abs=1e3)


async def test_a_map_split_over_batches_appears_in_each_with_its_context() -> None:
    rec = Recorder()
    async with Batcher(double, max_batch_size=2, max_wait=0.0) as b:
        b.add_observer(rec)
        CALLER.set("mapper")
        assert await b.map([1, 2, 3]) == [2, 4, 6]
    assert [(r.rows, r.contexts) for r in rec.records] == [(2, ("mapper",)), (1, ("mapper",))]
    assert [r.first for r in rec.records] == [(True,), (False,)]  # its wait counts once


async def test_a_failing_batch_is_reported_with_its_error() -> None:
    rec = Recorder()

    def boom(xs: list[int]) -> list[int]:
        raise ValueError("bad batch")

    async with Batcher(boom, max_batch_size=2, max_wait=0.0) as b:
        b.add_observer(rec)
        with pytest.raises(ValueError, match="bad batch"):
            await b(1)
    (record,) = rec.records
    assert isinstance(record.error, ValueError)
    assert record.failed_rows == 1
    assert record.failed == (True,)


async def test_per_row_errors_count_as_failed_rows_of_a_batch_that_returned() -> None:
    rec = Recorder()

    def some_fail(xs: list[int]) -> list[object]:
        return [ValueError(x) if x < 0 else x for x in xs]

    async with Batcher(some_fail, max_batch_size=3, max_wait=60.0) as b:
        b.add_observer(rec)
        results = await asyncio.gather(b(1), b(-1), b(2), return_exceptions=True)
    assert isinstance(results[1], ValueError)
    (record,) = rec.records
    assert record.failed == (False, True, False)
    assert record.error is None
    assert record.failed_rows == 1


async def test_a_stalled_batch_is_reported_as_stalled() -> None:
    rec = Recorder()
    fn = GatedBatchFn[int, int](lambda x: x, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0.0, batch_time_limit=0.01) as b:
        b.add_observer(rec)
        with pytest.raises(BatchStalledError):
            await b(1)
        fn.open()
    assert isinstance(rec.records[0].error, BatchStalledError)
    assert rec.records[0].failed_rows == 1


async def test_requests_queued_before_the_observer_have_no_context() -> None:
    rec = Recorder()
    fn = GatedBatchFn[int, int](lambda x: x, gated=True)
    async with Batcher(fn, max_batch_size=2, max_wait=60.0) as b:
        early = asyncio.ensure_future(call_as(b, "early", 1))
        await wait_all_tasks_blocked()
        b.add_observer(rec)
        late = asyncio.ensure_future(call_as(b, "late", 2))
        await fn.wait_entered()
        fn.open()
        assert list(await asyncio.gather(early, late)) == [1, 2]
    (record,) = rec.records
    assert record.contexts == (None, "late")


async def test_failing_observers_are_logged_and_never_fail_a_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        def capture(self) -> object:
            raise RuntimeError("capture broke")

        def batch_done(self, record: BatchRecord) -> None:
            raise RuntimeError("batch_done broke")

    rec = Recorder()
    async with Batcher(double, max_batch_size=2, max_wait=0.0) as b:
        b.add_observer(Broken())
        b.add_observer(rec)
        CALLER.set("ok")
        with caplog.at_level(logging.ERROR, logger="batchio"):
            assert await b(4) == 8
    assert "capture broke" in caplog.text
    assert "batch_done broke" in caplog.text
    assert rec.records[0].contexts == ("ok",)  # each observer gets its own captured value


async def test_removing_the_last_observer_restores_the_fast_path() -> None:
    rec = Recorder()
    async with Batcher(double, max_batch_size=2, max_wait=0.0) as b:
        assert b._fast
        b.add_observer(rec)
        b.add_observer(rec)  # a no-op: one record per batch, not two
        assert not b._fast
        assert await b(1) == 2
        b.remove_observer(rec)
        assert b._fast
        assert await b(2) == 4
    assert len(rec.records) == 1


def test_add_observer_refuses_what_is_not_one() -> None:
    with pytest.raises(TypeError, match="capture"):
        Batcher(double).add_observer(object())  # type: ignore[arg-type]
    assert isinstance(Recorder(), BatchObserver)


async def test_durations_have_the_monotonic_clocks_resolution_under_uvloop_too() -> None:
    """uvloop's loop.time() ticks in whole milliseconds (cached per iteration): durations read
    from it made an 80 µs batch run 0 s. The batcher reads time.monotonic() directly on uvloop,
    as on asyncio's own loops (the same clock, finer); only a patched clock is followed as is."""
    import time

    async with Batcher(double) as b:
        assert b._clock is time.monotonic
        start = time.monotonic()
        assert await b(1) == 2
        elapsed = time.monotonic() - start
    run = b.statistics().batch_run_histogram
    assert run.count == 1
    assert 0 < run.sum <= elapsed  # (a millisecond clock reads a sub-millisecond batch as 0)
