"""A batcher belongs to the event loop that started it; calls from any other loop fail at once
with batchio's error, and nothing is queued.

Defects pinned: with loop A stopped (not closed) and loop B calling ``b(x)`` in the same thread,
asyncio's "attached to a different loop" error came out and a ghost request later ran on loop A;
after loop A was closed without cancelling its tasks, ``aclose()`` from a new loop hung forever
and calls from that loop were queued and counted before failing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from batchio import Batcher, BatcherBrokenError, BatcherLoopError

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dev dependency
    LOOPS: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]
else:
    LOOPS = [asyncio.new_event_loop, uvloop.new_event_loop]

IDS = ["asyncio", "uvloop"][: len(LOOPS)]


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        return items


@pytest.mark.parametrize("new_loop", LOOPS, ids=IDS)
def test_call_from_another_loop_in_the_same_thread_is_refused_and_queues_nothing(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    fn = Recorder()
    b = Batcher(fn, max_batch_size=4, max_wait=0)
    loop_a = new_loop()
    try:
        loop_a.run_until_complete(b.__aenter__())  # loop A is now stopped, not closed

        async def from_loop_b() -> None:
            with pytest.raises(BatcherLoopError, match="another event loop"):
                await b(1)
            with pytest.raises(BatcherLoopError):
                b.submit_nowait(2)
            with pytest.raises(BatcherLoopError):
                await b.map([3])
            with pytest.raises(BatcherLoopError):
                await b.aclose()

        loop_b = new_loop()
        try:
            loop_b.run_until_complete(from_loop_b())
        finally:
            loop_b.close()
        assert b.statistics().submitted == 0

        async def back_on_a() -> int:
            result = await b(9)
            await b.aclose()
            return result

        assert loop_a.run_until_complete(back_on_a()) == 9
    finally:
        loop_a.close()
    assert fn.batches == [[9]]  # no ghost request ran on loop A


def test_call_outside_any_loop_is_refused() -> None:
    b = Batcher(Recorder(), max_batch_size=4, max_wait=0)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(b.__aenter__())
        with pytest.raises(BatcherLoopError, match="outside a running event loop"):
            b.submit_nowait(1)
        loop.run_until_complete(b.aclose())
    finally:
        loop.close()


@pytest.mark.parametrize("new_loop", LOOPS, ids=IDS)
def test_batcher_whose_loop_was_closed_fails_at_once_from_a_new_loop(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    fn = Recorder()
    b = Batcher(fn, max_batch_size=4, max_wait=0)
    loop_a = new_loop()
    loop_a.run_until_complete(b.__aenter__())
    loop_a.close()  # without cancelling the executor task

    async def from_new_loop() -> None:
        async with asyncio.timeout(10):  # a hang fails fast
            with pytest.raises(BatcherBrokenError, match="event loop was closed"):
                await b(1)
            with pytest.raises(BatcherBrokenError):
                await b.aclose()

    loop_b = new_loop()
    try:
        loop_b.run_until_complete(from_new_loop())
    finally:
        loop_b.close()
    stats = b.statistics()
    assert (stats.submitted, stats.healthy, stats.closed) == (0, False, True)
    assert fn.batches == []
