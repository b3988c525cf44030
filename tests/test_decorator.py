"""``@batchio.batch``: functions, async functions, methods per instance, several event loops."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

import batchio
from batchio import BatchedFunction
from batchio.testing import VirtualClock, wait_all_tasks_blocked

pytestmark = pytest.mark.anyio


@batchio.batch(max_batch_size=4, max_wait=0.001)
def square(xs: list[int]) -> list[int]:
    return [x * x for x in xs]


@batchio.batch(max_batch_size=4, max_wait=0.001)
async def negate(xs: list[int]) -> list[int]:
    return [-x for x in xs]


class Scaler:
    def __init__(self, factor: int) -> None:
        self.factor = factor
        self.batches: list[list[int]] = []

    @batchio.batch(max_batch_size=8, max_wait=0.001)
    def scale(self, xs: list[int]) -> list[int]:
        self.batches.append(list(xs))
        return [x * self.factor for x in xs]


async def test_decorated_function_batches_per_item_calls() -> None:
    assert isinstance(square, BatchedFunction)
    assert square.__name__ == "square"
    assert await asyncio.gather(*(square(i) for i in range(10))) == [i * i for i in range(10)]
    assert await square.map([3, 4]) == [9, 16]
    stats = square.statistics()
    assert stats.completed >= 11
    assert stats.mean_batch_size > 1
    await square.aclose()


async def test_decorated_async_function() -> None:
    assert await asyncio.gather(*(negate(i) for i in range(6))) == [-i for i in range(6)]
    await negate.aclose()


async def test_methods_get_one_batcher_per_instance() -> None:
    a, b = Scaler(2), Scaler(3)
    ra = asyncio.gather(*(a.scale(i) for i in range(5)))
    rb = asyncio.gather(*(b.scale(i) for i in range(5)))
    assert await ra == [2 * i for i in range(5)]
    assert await rb == [3 * i for i in range(5)]
    assert sorted(x for batch in a.batches for x in batch) == list(range(5))
    assert sorted(x for batch in b.batches for x in batch) == list(range(5))
    assert a.scale is a.scale
    assert a.scale is not b.scale
    await a.scale.aclose()
    await b.scale.aclose()


async def test_method_wrapper_does_not_keep_instances_alive() -> None:
    s = Scaler(5)
    assert await s.scale(1) == 5
    await s.scale.aclose()
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is None


async def test_aclose_then_call_again_starts_a_new_batcher() -> None:
    assert await square(3) == 9
    await square.aclose()
    assert await square(4) == 16
    assert square.statistics().completed == 1
    await square.aclose()


def test_each_event_loop_gets_its_own_batcher() -> None:
    """Two asyncio.run calls (two loops, one after the other): each loop batches on its own, and
    the batcher of a closed loop is dropped when the next loop calls in."""

    @batchio.batch(max_batch_size=4, max_wait=0.001)
    def inc(xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]

    async def use() -> tuple[list[int], int]:
        results = await asyncio.gather(*(inc(i) for i in range(6)))
        return results, inc.statistics().completed

    first = asyncio.run(use())
    second = asyncio.run(use())
    assert first == second == ([1, 2, 3, 4, 5, 6], 6)
    assert len(inc._batchers) == 1  # the first loop's batcher was dropped


def test_instances_without_weakref_support_get_a_clear_error() -> None:
    class Slotted:
        __slots__ = ()

        @batchio.batch()
        def run(self, xs: list[int]) -> list[int]:
            return xs

    with pytest.raises(TypeError, match="weak references"):
        Slotted().run  # noqa: B018


# -- core v2 defects ---------------------------------------------------------------------------


async def test_bare_decorator_works_like_ray_serve_batch() -> None:
    @batchio.batch
    def triple(xs: list[int]) -> list[int]:
        return [3 * x for x in xs]

    @batchio.batch
    async def atriple(xs: list[int]) -> list[int]:
        return [3 * x for x in xs]

    assert isinstance(triple, BatchedFunction)
    assert list(await asyncio.gather(triple(1), atriple(2))) == [3, 6]
    assert triple.options == batchio.BatcherOptions()
    await triple.aclose()
    await atriple.aclose()


def test_bad_options_fail_at_decoration_not_at_the_first_call() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        batchio.batch(max_batch_size=0)


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])  # a virtual clock: asyncio only
async def test_timeout_none_per_call_means_no_deadline_as_on_batcher() -> None:
    """``@batch(timeout=...)`` is the default; ``timeout=None`` per call removes it (it used to
    mean "the decorator's default", so the call still timed out)."""
    gate = asyncio.Event()

    @batchio.batch(max_batch_size=3, max_wait=0, timeout=0.5)
    async def slow(xs: list[int]) -> list[int]:
        await gate.wait()
        return xs

    with VirtualClock().install() as clock:
        defaulted = asyncio.ensure_future(slow(1))
        patient = asyncio.ensure_future(slow(2, timeout=None))
        patient_map = asyncio.ensure_future(slow.map([3], timeout=None))
        await wait_all_tasks_blocked()
        clock.advance(10.0)
        with pytest.raises(batchio.RequestTimeoutError):
            await defaulted
        await wait_all_tasks_blocked()
        assert not patient.done()
        assert not patient_map.done()
        gate.set()
        assert (await patient, await patient_map) == (2, [3])
        await slow.aclose()


def test_statistics_from_another_thread_is_a_pure_read() -> None:
    """A metrics thread reads the statistics without a loop: no error, no batcher started."""
    import threading

    @batchio.batch(max_batch_size=4, max_wait=0)
    def inc(xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]

    def read() -> batchio.BatcherStatistics:
        out: list[batchio.BatcherStatistics] = []
        t = threading.Thread(target=lambda: out.append(inc.statistics()))
        t.start()
        t.join()
        return out[0]

    before = read()
    assert (before.submitted, before.closed) == (0, False)
    assert inc._batchers == {}  # nothing was started by reading

    async def use() -> batchio.BatcherStatistics:
        await asyncio.gather(*(inc(i) for i in range(3)))
        return read()

    during = asyncio.run(use())
    assert during.completed == 3


def test_statistics_outside_a_loop_with_batchers_on_two_live_loops_asks_which() -> None:
    @batchio.batch(max_batch_size=4, max_wait=0)
    def inc(xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]

    loops = [asyncio.new_event_loop() for _ in range(2)]
    try:
        for loop in loops:
            loop.run_until_complete(inc(1))
        with pytest.raises(RuntimeError, match=r"statistics\(loop=\.\.\.\)"):
            inc.statistics()
        assert inc.statistics(loop=loops[0]).completed == 1
        for loop in loops:
            loop.run_until_complete(inc.aclose())
    finally:
        for loop in loops:
            loop.close()


async def test_method_batcher_and_threads_are_named_after_the_method() -> None:
    import threading

    s = Scaler(2)
    assert await s.scale(1) == 2
    b = s.scale.batcher()
    assert b.name == "Scaler.scale"
    assert "Scaler.scale" in repr(b)
    assert any(t.name.startswith("batchio-Scaler.scale-") for t in threading.enumerate())
    await s.scale.aclose()


async def test_decorated_calls_are_coroutines_and_have_nowait_twins() -> None:
    task = asyncio.create_task(square(3))
    fut = square.submit_nowait(4)
    futs = square.map_nowait([5])
    assert (await task, await fut, await futs) == (9, 16, [25])
    await square.aclose()


def test_the_class_attribute_is_the_method_wrapper() -> None:
    assert isinstance(Scaler.scale, batchio.BatchedMethod)


async def test_a_collected_instance_fails_its_batch_with_closed_error() -> None:
    """The wrapper holds instances weakly: a batch that runs after the instance is gone fails
    with BatcherClosedError instead of resurrecting it."""
    s = Scaler(2)
    bound = s.scale
    ref = weakref.ref(s)
    del s
    gc.collect()
    assert ref() is None
    with pytest.raises(batchio.BatcherClosedError, match="garbage-collected"):
        await bound(1)
    await bound.aclose()
