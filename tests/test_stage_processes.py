"""``Stages(prepare_processes=N)``: the prepare stage in worker processes, out of the GIL.

The prepare functions are module-level, so the spawned worker processes can unpickle them (they
import this module). No sleeps and no timing: each test waits for its batches' results.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import threading
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.connection import wait
from typing import Any

import pytest

from batchio import Batcher, BatchStalledError, Stages

pytestmark = pytest.mark.anyio

JOIN_TIMEOUT = 20.0  # a leaked process fails the test instead of hanging it


def prepare_pid(items: list[int]) -> list[tuple[int, int]]:
    """Each item with the pid of the process that prepared it."""
    pid = os.getpid()
    return [(x, pid) for x in items]


def prepare_or_die(items: list[int]) -> list[int]:
    """Kill the worker process on a negative item (as a crash in native code would)."""
    if any(x < 0 for x in items):
        os._exit(3)
    return [x * 10 for x in items]


def prepare_failing_row(items: list[int]) -> list[int | Exception]:
    """A ``ValueError`` in the slot of each odd item, the others times ten."""
    return [ValueError(f"odd {x}") if x % 2 else x * 10 for x in items]


def prepare_raising(items: list[int]) -> list[int]:
    """Raise for a whole batch that holds a 13 (bisected with ``isolate_errors``)."""
    if 13 in items:
        raise KeyError(13)
    return [x * 10 for x in items]


def prepare_or_hang(items: list[int]) -> list[int]:
    """Never return for a negative item (a stuck native call, say); the others times ten."""
    if any(x < 0 for x in items):
        threading.Event().wait()  # only terminating the process ends this
    return [x * 10 for x in items]


def run_rows(rows: list[Any]) -> list[Any]:
    return rows


async def outcomes(batcher: Batcher[int, Any], items: list[int]) -> list[Any]:
    """Each item's result or exception, submitted concurrently."""
    return await asyncio.gather(*(batcher(x) for x in items), return_exceptions=True)


async def test_prepare_runs_in_other_processes() -> None:
    stages: Stages[int, Any] = Stages(prepare=prepare_pid, run=run_rows, prepare_processes=2)
    assert stages.prepare_threads == 2
    assert stages.depth == 5
    async with Batcher(stages, max_batch_size=4, max_wait=0) as batcher:
        results = await batcher.map(range(8))
    assert [x for x, _ in results] == list(range(8))
    assert all(pid != os.getpid() for _, pid in results)
    assert batcher.statistics().stages[0].name == "prepare"


async def test_threads_are_at_least_the_processes() -> None:
    stages: Stages[int, Any] = Stages(
        prepare=prepare_pid, run=run_rows, prepare_workers=1, prepare_processes=3
    )
    assert stages.prepare_threads == 3
    assert Stages(prepare=prepare_pid, run=run_rows, prepare_workers=4).prepare_threads == 4


async def test_per_row_errors_cross_the_process_boundary() -> None:
    stages: Stages[int, Any] = Stages(
        prepare=prepare_failing_row, run=run_rows, prepare_processes=1
    )
    async with Batcher(stages, max_batch_size=4, max_wait=0) as batcher:
        results = await outcomes(batcher, [0, 1, 2, 3])
    assert results[0] == 0
    assert results[2] == 20
    assert isinstance(results[1], ValueError)
    assert str(results[3]) == "odd 3"


async def test_isolate_errors_bisects_in_the_process() -> None:
    stages: Stages[int, Any] = Stages(prepare=prepare_raising, run=run_rows, prepare_processes=1)
    async with Batcher(stages, max_batch_size=4, max_wait=0, isolate_errors=True) as batcher:
        results = await outcomes(batcher, [1, 13, 2, 3])
    assert [results[0], results[2], results[3]] == [10, 20, 30]
    assert isinstance(results[1], KeyError)


async def test_a_dead_worker_fails_its_batch_and_the_next_batch_works() -> None:
    stages: Stages[int, Any] = Stages(prepare=prepare_or_die, run=run_rows, prepare_processes=1)
    async with Batcher(stages, max_batch_size=4, max_wait=0) as batcher:
        assert await batcher.map([1, 2]) == [10, 20]
        with pytest.raises(BrokenProcessPool, match="prepare worker process died"):
            await batcher(-1)
        assert await batcher.map([4, 5]) == [40, 50]
        assert await batcher(6) == 60
        stats = batcher.statistics()
    assert (stats.completed, stats.failed, stats.healthy) == (3, 1, True)


async def test_close_leaves_no_child_process() -> None:
    """The workers exit once the batcher closes, on their own: joining them needs no kill.

    The stop runs on a thread (joining processes would block the event loop), so the test joins
    them itself; the timeout only turns a leak into a failure instead of a hang.
    """
    before = set(multiprocessing.active_children())
    stages: Stages[int, Any] = Stages(prepare=prepare_pid, run=run_rows, prepare_processes=2)
    async with Batcher(stages, max_batch_size=2, max_wait=0) as batcher:
        results = await batcher.map(range(6))
        seen = set(multiprocessing.active_children())
    # Also those still booting when the batch came back (the pool starts both at once).
    workers = (seen | set(multiprocessing.active_children())) - before
    assert {pid for _, pid in results} <= {p.pid for p in workers}
    assert 1 <= len(workers) <= 2
    for proc in workers:
        # Ready once the process has ended (the pool's stop thread may be the one to reap it).
        assert wait([proc.sentinel], JOIN_TIMEOUT) == [proc.sentinel], proc


async def test_a_worker_stuck_past_the_time_limit_is_terminated_at_close() -> None:
    """A prepare that never returns stalls its batch; the batcher carries on in the pool's other
    process, and closing terminates the stuck one instead of waiting for it forever."""
    before = set(multiprocessing.active_children())
    stages: Stages[int, Any] = Stages(prepare=prepare_or_hang, run=run_rows, prepare_processes=2)
    async with Batcher(stages, max_batch_size=1, max_wait=0, batch_time_limit=3.0) as batcher:
        with pytest.raises(BatchStalledError):
            await batcher(-1)
        assert await batcher(2) == 20
        workers = set(multiprocessing.active_children()) - before
    assert workers
    for proc in workers:
        assert wait([proc.sentinel], JOIN_TIMEOUT) == [proc.sentinel], proc


def test_prepare_must_be_picklable() -> None:
    with pytest.raises(TypeError, match="must be picklable"):
        Stages(prepare=lambda items: items, run=run_rows, prepare_processes=1)


def test_prepare_processes_needs_prepare_and_a_count() -> None:
    with pytest.raises(TypeError, match="needs a prepare stage"):
        Stages(run=run_rows, prepare_processes=1)
    with pytest.raises(ValueError, match="prepare_processes"):
        Stages(prepare=prepare_pid, run=run_rows, prepare_processes=0)
    stages: Stages[int, Any] = Stages(prepare=prepare_pid, run=run_rows, prepare_processes=2)
    assert pickle.loads(pickle.dumps(stages.prepare)) is prepare_pid
