"""The waiting room on its own: admission, parking, leaving early, taking batches, draining.

Futures come from an event loop that never runs: the room only reads and settles them, so these
tests need no loop and no time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from batchio import QueueFullError, RequestTimeoutError
from batchio._outcomes import Outcomes
from batchio._request import GONE, PARKED, QUEUED, STATE, Request
from batchio._room import WaitingRoom
from batchio._stats import CANCELLED, REJECTED, SUBMITTED, TIMED_OUT, Tally


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Room:
    """A room with its tally and outcomes, and a counter of wake-ups."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, max_rows: int | None = None, wait: bool = False
    ) -> None:
        self.loop = loop
        self.tally = Tally()
        self.wakes = 0
        self.outcomes = Outcomes(self.tally, lambda r: self.room.forget(r))
        self.room = WaitingRoom(max_rows, wait, self.tally, self.outcomes, self._wake)

    def _wake(self) -> None:
        self.wakes += 1

    def fast(self, item: Any, at: float = 0.0) -> list[Any]:
        entry = [self.loop.create_future(), item, at, QUEUED]
        self.room.put_fast(entry)
        return entry

    def request(self, items: list[Any] | None, item: Any = None, at: float = 0.0) -> Request:
        req = Request(self.loop.create_future(), item, items, at)
        self.room.put(req)
        return req

    def count(self, index: int) -> int:
        return self.tally.counts[index]


def test_fast_entries_leave_in_order_with_their_waits(loop: asyncio.AbstractEventLoop) -> None:
    r = Room(loop)
    entries = [r.fast(i, at=float(i)) for i in range(5)]
    assert (r.room.rows, r.count(SUBMITTED), r.room.oldest_enqueued_at()) == (5, 5, 0.0)
    batch, waits = r.room.take(3, now=10.0)
    assert batch.inputs == [0, 1, 2]
    assert batch.owners == [e[0] for e in entries[:3]]
    assert waits == [10.0, 9.0, 8.0]
    assert [e[STATE] for e in entries] == [GONE, GONE, GONE, QUEUED, QUEUED]
    assert (r.room.rows, r.room.oldest_enqueued_at()) == (2, 3.0)


def test_cancel_reported_by_the_call_uncounts_the_row_once(loop: asyncio.AbstractEventLoop) -> None:
    r = Room(loop)
    first, second = r.fast(1), r.fast(2)
    first[0].cancel()
    r.room.cancel(first)
    r.room.cancel(first)  # a second report changes nothing
    assert (r.room.rows, r.count(CANCELLED)) == (1, 1)
    batch, _ = r.room.take(5, now=0.0)
    assert batch.inputs == [2]
    assert r.count(CANCELLED) == 1  # skipped at the front without being counted again
    r.room.cancel(second)  # taken already: the batch counts it when it reports
    assert r.count(CANCELLED) == 1


def test_lazily_cancelled_entry_is_counted_when_it_reaches_the_front(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r = Room(loop)
    dead, live = r.fast(1), r.fast(2)
    dead[0].cancel()
    assert r.room.rows == 2  # not noticed yet
    r.room.drop_dead_front()
    assert (r.room.rows, r.count(CANCELLED), r.room.oldest_enqueued_at()) == (1, 1, 0.0)
    assert r.room.take(5, now=0.0)[0].owners == [live[0]]


def test_rejection_drops_dead_front_entries_first(loop: asyncio.AbstractEventLoop) -> None:
    r = Room(loop, max_rows=2)
    dead = r.fast(1)
    r.fast(2)
    dead[0].cancel()
    r.fast(3)  # fits once the dead row at the front is dropped
    with pytest.raises(QueueFullError) as info:
        r.fast(4)
    assert (info.value.queued, info.value.requested, info.value.max_queue_size) == (2, 1, 2)
    assert (r.count(SUBMITTED), r.count(REJECTED), r.count(CANCELLED)) == (3, 1, 1)


def test_a_request_larger_than_the_queue_is_rejected_even_in_wait_mode(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r = Room(loop, max_rows=2, wait=True)
    with pytest.raises(QueueFullError):
        r.request([1, 2, 3])
    assert (r.count(SUBMITTED), r.count(REJECTED)) == (0, 1)


def test_parked_entries_are_admitted_in_order_as_room_frees(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r = Room(loop, max_rows=2, wait=True)
    r.fast(1)
    r.fast(2)
    wakes = r.wakes
    parked_fast = r.fast(3)
    parked_map = r.request([4, 5])
    assert (parked_fast[STATE], parked_map.state) == (PARKED, PARKED)
    assert (r.room.rows, r.room.parked_rows, r.room.depth, r.room.full) == (2, 3, 5, True)
    assert r.wakes > wakes  # a full queue is dispatched without waiting
    assert r.room.take(1, now=0.0)[0].inputs == [1]
    r.room.admit_parked()
    assert (r.room.rows, r.room.parked_rows) == (2, 2)  # 3 fits; the map of 2 does not yet
    assert r.room.take(2, now=0.0)[0].inputs == [2, 3]
    r.room.admit_parked()
    assert r.room.take(5, now=0.0)[0].inputs == [4, 5]
    assert r.room.empty


def test_parked_entries_that_left_are_skipped_at_admission(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Each way out of the parked line: reported cancelled (fast, map), cancelled unnoticed
    (fast, map), timed out; none holds room, each is counted once."""
    r = Room(loop, max_rows=1, wait=True)
    r.fast(0)
    reported_fast = r.fast(1)
    reported_map = r.request([2])
    lazy_fast = r.fast(3)
    lazy_map = r.request([4])
    timed = r.request(None, item=5)
    timed.timeout = 1.0
    survivor = r.fast(6)
    assert r.room.parked_rows == 6
    for e in (reported_fast, reported_map, lazy_fast, lazy_map):
        (e.future if isinstance(e, Request) else e[0]).cancel()
    r.room.cancel(reported_fast)
    r.room.cancel(reported_map)
    r.outcomes.time_out(timed)
    assert (r.room.parked_rows, r.count(CANCELLED)) == (3, 2)  # the lazy two and the survivor
    assert r.wakes >= 3  # each leave asked the executor to admit
    assert r.room.take(1, now=0.0)[0].inputs == [0]
    r.room.admit_parked()  # drops the lazy two, counting them, and admits the survivor
    assert (r.room.rows, r.room.parked_rows) == (1, 0)
    assert r.room.take(5, now=0.0)[0].owners == [survivor[0]]
    assert (r.count(CANCELLED), r.count(TIMED_OUT)) == (4, 1)
    assert isinstance(timed.future.exception(), RequestTimeoutError)


def test_map_request_is_split_across_batches_and_keeps_its_place(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r = Room(loop)
    big = r.request([10, 11, 12, 13, 14])
    r.fast(99)
    first, _ = r.room.take(2, now=0.0)
    assert (first.inputs, first.counts, first.offsets) == ([10, 11], [2], [0])
    second, waits = r.room.take(4, now=0.0)
    assert (second.inputs, second.counts, second.offsets) == ([12, 13, 14, 99], [3, 1], [2, 0])
    assert len(waits) == 1  # the map's wait was recorded once, with its first rows
    assert big.state == GONE


def test_cancelled_map_forgets_its_queued_rows(loop: asyncio.AbstractEventLoop) -> None:
    r = Room(loop)
    big = r.request([1, 2, 3, 4])
    r.room.take(1, now=0.0)
    big.future.cancel()
    r.room.cancel(big)
    assert (r.room.rows, big.undispatched, r.count(CANCELLED)) == (0, 0, 1)
    assert r.room.take(5, now=0.0)[0].inputs == []


def test_expired_request_is_timed_out_instead_of_dispatched(
    loop: asyncio.AbstractEventLoop,
) -> None:
    r = Room(loop)
    late = r.request(None, item=1)
    late.deadline, late.timeout = 5.0, 5.0
    r.fast(2)
    batch, _ = r.room.take(5, now=6.0)
    assert batch.inputs == [2]
    error = late.future.exception()
    assert isinstance(error, RequestTimeoutError)
    assert not error.dispatched
    assert (r.room.rows, r.count(TIMED_OUT)) == (0, 1)


def test_drain_returns_every_live_entry_in_order(loop: asyncio.AbstractEventLoop) -> None:
    r = Room(loop, max_rows=2, wait=True)
    a = r.fast(1)
    gone = r.fast(2)
    gone[0].cancel()
    r.room.cancel(gone)
    m = r.request([3])
    p = r.fast(4)  # parked
    taken = r.request([5, 6])  # parked
    taken.future.cancel()
    r.room.cancel(taken)
    assert r.room.drain() == [a, m, p]
    assert (r.room.rows, r.room.parked_rows, r.room.empty) == (0, 0, True)
    assert (a[STATE], m.state, p[STATE]) == (GONE, GONE, GONE)


def test_wake_fires_once_the_threshold_is_reached(loop: asyncio.AbstractEventLoop) -> None:
    r = Room(loop)
    r.room.wake_at(3)
    r.fast(1)
    r.fast(2)
    assert r.wakes == 0
    r.fast(3)
    assert r.wakes == 1
    r.fast(4)
    assert r.wakes == 1  # one wake-up per threshold set
    r.room.wake_at(2)  # already there: fires at once
    assert r.wakes == 2
