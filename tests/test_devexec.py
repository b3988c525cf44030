"""The shared device's fair queue, driven directly: which lane's job goes next, and why."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from batchio._devexec import FairQueue, Lane
from batchio._worker import Job


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def job(loop: asyncio.AbstractEventLoop, lane: Lane, tag: str) -> Job:
    return Job(loop, print, tag, lane)


def drain(q: FairQueue, costs: dict[str, float] | None = None) -> list[str]:
    order = []
    while q.qsize():
        j = q.get()
        assert j is not None
        order.append(j.lane.name)
        q.charge(j, (costs or {}).get(j.lane.name, 1.0))
    return order


def test_by_batches_weights_split_the_turns(loop: asyncio.AbstractEventLoop) -> None:
    q = FairQueue("batches")
    a, b = Lane("a", 2), Lane("b", 1)
    for i in range(6):
        q.put(job(loop, a, f"a{i}"))
    for i in range(3):
        q.put(job(loop, b, f"b{i}"))
    order = drain(q)
    assert order.count("a") == 6
    assert order.count("b") == 3
    # While both have work, a gets two turns for each of b's.
    assert order[:6].count("a") == 4
    assert order[:6].count("b") == 2


def test_by_time_a_costly_lane_gets_fewer_turns(loop: asyncio.AbstractEventLoop) -> None:
    q = FairQueue("time")
    slow, fast = Lane("slow", 1), Lane("fast", 1)
    for i in range(4):
        q.put(job(loop, slow, f"s{i}"))
    for i in range(12):
        q.put(job(loop, fast, f"f{i}"))
    order = drain(q, {"slow": 3.0, "fast": 1.0})
    # Equal weights share device time: three fast jobs for each slow one while both wait.
    assert order[:8].count("slow") == 2
    assert order[:8].count("fast") == 6
    assert slow.busy == 12.0
    assert fast.busy == 12.0


def test_an_idle_lane_earns_no_credit_while_idle(loop: asyncio.AbstractEventLoop) -> None:
    q = FairQueue("batches")
    busy, late = Lane("busy", 1), Lane("late", 1)
    for i in range(10):
        q.put(job(loop, busy, f"b{i}"))
    assert drain(q)[:10] == ["busy"] * 10
    for i in range(4):
        q.put(job(loop, busy, f"b{i}"))
        q.put(job(loop, late, f"l{i}"))
    # The late lane joins at the current level: it alternates, it does not take 10 turns in a row.
    order = drain(q)
    assert order[:4].count("late") == 2


def test_stop_signals_come_after_the_queued_jobs_and_new_jobs_are_refused_once_closed(
    loop: asyncio.AbstractEventLoop,
) -> None:
    q = FairQueue("time")
    lane = Lane("x", 1)
    q.put(job(loop, lane, "x"))
    q.put(None)
    first = q.get()
    assert first is not None
    assert first.arg == "x"
    assert q.get() is None
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.put(job(loop, lane, "y"))
