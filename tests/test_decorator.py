"""``@batchio.batch``: functions, async functions, methods per instance, several event loops."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

import batchio
from batchio import BatchedFunction

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
