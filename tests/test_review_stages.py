"""Adversarial review of the staged batcher (Stages, Pipeline) and the shared DeviceExecutor.

Each test pins one defect found in review (all fixed since): bisection cut by an assemble that
sorts in place, a queued job abandoned by a bounded close spawning a second device thread, the
time limit counting the wait for a thread, a cancellation counted twice, stage statistics that
missed abandoned threads and failed jobs, a busy fraction lost at close, and a closed device
bisected row by row.
Fakes are gated with ``threading.Event``; the tests that need ``batch_time_limit`` to pass drive it
with :class:`batchio.testing.VirtualClock` (asyncio's own loop only: uvloop's clock lives in C).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import pytest

from batchio import Batcher, BatchStalledError, DeviceExecutor, Stages
from batchio.testing import VirtualClock, wait_all_tasks_blocked

from .conftest import GATE_TIMEOUT, stalled_staged_batcher, wait_event

pytestmark = pytest.mark.anyio

ASYNCIO_ONLY = pytest.mark.parametrize("anyio_backend", [("asyncio", {})])  # VirtualClock
_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


def live_threads(prefix: str) -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(prefix))


async def let_timers_run() -> None:
    """After ``clock.advance``: the due timers run, then whatever they woke settles."""
    for _ in range(3):
        await asyncio.sleep(0)
    await wait_all_tasks_blocked()


# -- 1. isolate_errors bisection through the stage tail -------------------------------------------


async def test_isolate_bisection_is_not_fooled_by_an_assemble_that_sorts_in_place() -> None:
    def assemble(rows: list[int]) -> tuple[list[int], list[int]]:
        order = sorted(range(len(rows)), key=rows.__getitem__)
        rows.sort()  # in place, as a collator sorting by length might
        return list(rows), order

    def run(batch: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
        values, order = batch
        if 999 in values:
            raise RuntimeError("the device refuses 999")
        return [v * 10 for v in values], order

    def finish(out: tuple[list[int], list[int]]) -> list[int]:
        values, order = out
        results = [0] * len(values)
        for pos, i in enumerate(order):
            results[i] = values[pos]  # back to the order the rows were given in
        return results

    stages: Stages[int, int] = Stages(assemble=assemble, run=run, finish=finish)
    async with Batcher(stages, max_batch_size=4, max_wait=GATE_TIMEOUT, isolate_errors=True) as b:
        # Without a failure the pipeline is correct: each caller gets its own result.
        assert list(await asyncio.gather(b(3), b(1), b(2), b(4))) == [30, 10, 20, 40]
        outcomes = await asyncio.gather(*(b(x) for x in (3, 1, 999, 2)), return_exceptions=True)
    assert outcomes[0] == 30
    assert outcomes[1] == 10
    assert isinstance(outcomes[2], RuntimeError)
    assert outcomes[3] == 20


# -- 2. statistics: a cancelled row whose prepared slot holds an error ------------------------------


async def test_a_cancelled_row_whose_preparation_failed_is_counted_once() -> None:
    gate = threading.Event()
    entered = threading.Event()

    def prepare(items: list[int]) -> list[Any]:
        entered.set()
        gate.wait(GATE_TIMEOUT)
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    stages: Stages[int, int] = Stages(prepare=prepare, run=lambda xs: list(xs))
    async with Batcher(stages, max_batch_size=2, max_wait=GATE_TIMEOUT) as b:
        bad = asyncio.ensure_future(b(-1))
        good = asyncio.ensure_future(b(2))
        await wait_event(entered)
        bad.cancel()
        await wait_all_tasks_blocked()
        gate.set()
        assert await good == 2
        with pytest.raises(asyncio.CancelledError):
            await bad
        stats = b.statistics()
    assert stats.submitted == 2
    assert (stats.completed, stats.failed, stats.cancelled) == (1, 0, 1)
    assert stats.pending == 0


# -- 3. the shared device: one thread, even when a job still queued on it is abandoned ----------------


async def test_a_bounded_close_with_a_job_queued_on_a_shared_device_keeps_one_device_thread() -> (
    None
):
    name = unique("rev-gpu")
    gate = threading.Event()
    b_gate = threading.Event()
    a1_on_device = threading.Event()
    lock = threading.Lock()
    active = [0, 0]  # running device jobs now, most ever

    def a_run(xs: list[int]) -> list[int]:
        with lock:
            active[0] += 1
            active[1] = max(active)
        try:
            if 1 in xs:
                a1_on_device.set()
                gate.wait(GATE_TIMEOUT)
            return xs
        finally:
            with lock:
                active[0] -= 1

    def b_run(xs: list[int]) -> list[int]:
        b_gate.wait(GATE_TIMEOUT)
        return xs

    try:
        with DeviceExecutor(name) as gpu:
            a = Batcher(Stages[int, int](run=a_run, device=gpu), max_batch_size=1, max_wait=0.0)
            async with a:
                try:
                    a1 = asyncio.ensure_future(a(1))
                    await wait_event(a1_on_device)
                    a2 = asyncio.ensure_future(a(2))  # queued on the device behind a1
                    await wait_all_tasks_blocked()
                    b = Batcher(
                        Stages[int, int](run=b_run, device=gpu), max_batch_size=1, max_wait=0.0
                    )
                    async with b:
                        b1 = asyncio.ensure_future(b(1))  # queued on the device too
                        await wait_all_tasks_blocked()
                        await b.aclose(timeout=0)
                    with pytest.raises(Exception, match="drain timed out"):
                        await b1
                    # Nothing was stuck in b's job (it never started): no second thread is due.
                    assert live_threads(f"batchio-{name}-") == [f"batchio-{name}-0"]
                finally:
                    gate.set()  # (before the batchers close, so a failure cannot wait on it)
                    b_gate.set()
                assert list(await asyncio.gather(a1, a2)) == [1, 2]
        assert active[1] == 1
    finally:
        gate.set()
        b_gate.set()


@ASYNCIO_ONLY
async def test_a_stage_job_that_never_started_does_not_stall() -> None:
    clock = VirtualClock()
    gate = threading.Event()
    stuck_entered = threading.Event()

    def run(xs: list[int]) -> list[int]:
        if 0 in xs:
            stuck_entered.set()
            gate.wait(GATE_TIMEOUT)
        return [x + 100 for x in xs]

    try:
        with clock.install():
            async with Batcher(
                Stages[int, int](run=run), max_batch_size=1, max_wait=0.0, batch_time_limit=10.0
            ) as b:
                stuck = asyncio.ensure_future(b(0))
                await wait_event(stuck_entered)
                waiting = asyncio.ensure_future(b(1))  # queued behind the stuck job
                await wait_all_tasks_blocked()
                clock.advance(11.0)
                await let_timers_run()
                with pytest.raises(BatchStalledError):
                    await stuck  # it ran 11 s: a real stall
                # The other never started; its replacement-thread turn comes now.
                assert await waiting == 101
    finally:
        gate.set()


@ASYNCIO_ONLY
async def test_another_batchers_slow_job_does_not_stall_a_job_queued_on_the_shared_device() -> None:
    clock = VirtualClock()
    name = unique("rev-gpu")
    gate = threading.Event()
    slow_entered = threading.Event()

    def slow_run(xs: list[int]) -> list[int]:
        if 1 in xs:
            slow_entered.set()
            gate.wait(GATE_TIMEOUT)
        return xs

    try:
        with clock.install(), DeviceExecutor(name) as gpu:
            slow = Batcher(Stages[int, int](run=slow_run, device=gpu), max_batch_size=1, max_wait=0)
            bounded = Batcher(
                Stages[int, int](run=lambda xs: [-x for x in xs], device=gpu),
                max_batch_size=1,
                max_wait=0.0,
                batch_time_limit=10.0,
            )
            async with slow, bounded:
                tasks = [asyncio.ensure_future(slow(1))]
                try:
                    await wait_event(slow_entered)
                    tasks.append(asyncio.ensure_future(slow(2)))
                    tasks.append(mine := asyncio.ensure_future(bounded(5)))
                    await wait_all_tasks_blocked()
                    clock.advance(11.0)
                    await let_timers_run()
                    assert not mine.done()  # its job has not run at all: it cannot have stalled
                    assert live_threads(f"batchio-{name}-") == [f"batchio-{name}-0"]
                finally:
                    gate.set()  # (before the batchers close, so a failure cannot wait on it)
                    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
                assert outcomes == [1, 2, -5]
    finally:
        gate.set()


# -- 4. statistics of a staged batcher -----------------------------------------------------------


async def test_a_staged_batcher_reports_its_abandoned_stage_thread() -> None:
    async with stalled_staged_batcher() as b:  # b(0) stalled and raised BatchStalledError
        stats = b.statistics()
    assert stats.stalled_batches == 1
    assert stats.abandoned_workers == 1  # the device thread is still stuck in the job


async def test_stage_statistics_count_the_jobs_that_raised() -> None:
    calls: list[list[int]] = []

    def run(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        if 999 in xs:
            raise RuntimeError("the device refuses 999")
        return xs

    stages: Stages[int, int] = Stages(run=run)
    async with Batcher(stages, max_batch_size=4, max_wait=GATE_TIMEOUT, isolate_errors=True) as b:
        await asyncio.gather(*(b(x) for x in (1, 999, 3, 4)), return_exceptions=True)
        device = b.statistics().stages[0]
    assert device.name == "device"
    assert len(calls) == 5  # [1,999,3,4] -> [1,999] [3,4] -> [1] [999]
    assert device.jobs == len(calls)
    assert device.run.count == len(calls)


async def test_device_busy_fraction_is_kept_after_close() -> None:
    hold = threading.Event()
    entered = threading.Event()

    def run(xs: list[int]) -> list[int]:
        entered.set()
        hold.wait(GATE_TIMEOUT)
        return xs

    async with Batcher(Stages[int, int](run=run), max_wait=0.0) as b:
        task = asyncio.ensure_future(b(1))
        await wait_event(entered)
        hold.set()
        assert await task == 1
        assert b.statistics().stages[0].busy_seconds > 0
    stats = b.statistics()
    assert stats.stages[0].busy_seconds > 0
    assert stats.device_busy_fraction is not None
    assert stats.device_busy_fraction > 0.0


# -- 5. errors that are not about any row are bisected anyway ----------------------------------------


async def test_a_closed_shared_device_is_not_bisected_row_by_row() -> None:
    gpu = DeviceExecutor(unique("rev-closed"))
    gpu.close()
    assembled: list[int] = []

    def assemble(rows: list[int]) -> list[int]:
        assembled.append(len(rows))
        return rows

    stages: Stages[int, int] = Stages(assemble=assemble, run=lambda xs: list(xs), device=gpu)
    async with Batcher(stages, max_batch_size=8, max_wait=GATE_TIMEOUT, isolate_errors=True) as b:
        outcomes = await asyncio.gather(*(b(x) for x in range(8)), return_exceptions=True)
        assert b.healthy
    assert all(isinstance(o, RuntimeError) and "closed" in str(o) for o in outcomes)
    assert assembled == [8]
