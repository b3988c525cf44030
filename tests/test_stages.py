"""The staged batcher: stages on their own workers, overlapping, with the batcher's contract at each.

Overlap is shown with gates (``threading.Event``), never with timing: batch 1 is held on the
device while the test watches batch 2 being prepared and assembled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from batchio import (
    Batcher,
    BatchFunctionError,
    BatchSizeMismatchError,
    BatchStalledError,
    DeviceClosedError,
    DeviceExecutor,
    RequestTimeoutError,
    Stages,
    StageStatistics,
)
from batchio.testing import wait_all_tasks_blocked

from .conftest import GATE_TIMEOUT, stalled_staged_batcher, wait_event

pytestmark = pytest.mark.anyio


class Recorder:
    """Stage functions that record what they saw and on which thread, with optional gates."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, list[Any], str]] = []
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}

    def gate(self, stage: str) -> threading.Event:
        self.gates[stage] = gate = threading.Event()
        return gate

    def entered_event(self, stage: str) -> threading.Event:
        self.entered[stage] = ev = threading.Event()
        return ev

    def hold(self, stage: str) -> tuple[threading.Event, threading.Event]:
        """Gate ``stage`` and watch for it: (the gate to open, the event set on entering)."""
        return self.gate(stage), self.entered_event(stage)

    def _note(self, stage: str, rows: Sequence[Any]) -> None:
        with self.lock:
            self.calls.append((stage, list(rows), threading.current_thread().name))
        if stage in self.entered:
            self.entered[stage].set()
        gate = self.gates.get(stage)
        if gate is not None and not gate.wait(GATE_TIMEOUT):
            raise TimeoutError(f"the {stage} gate stayed closed")

    def seen(self, stage: str) -> list[list[Any]]:
        with self.lock:
            return [rows for s, rows, _ in self.calls if s == stage]

    def threads(self, stage: str) -> set[str]:
        with self.lock:
            return {t for s, _, t in self.calls if s == stage}

    def prepare(self, items: list[int]) -> list[Any]:
        self._note("prepare", items)
        return [ValueError(f"bad {x}") if x < 0 else ("p", x) for x in items]

    def assemble(self, rows: list[tuple[str, int]]) -> list[int]:
        self._note("assemble", [x for _, x in rows])
        return [x for _, x in rows]

    def run(self, batch: list[int]) -> list[int]:
        self._note("device", batch)
        if any(x == 999 for x in batch):
            raise RuntimeError("the device refuses 999")
        return [x * 10 for x in batch]

    def finish(self, out: list[int]) -> list[int]:
        self._note("finish", out)
        return [x + 1 for x in out]

    def stages(self, **kwargs: Any) -> Stages[int, int]:
        return Stages(
            prepare=self.prepare,
            assemble=self.assemble,
            run=self.run,
            finish=self.finish,
            **kwargs,
        )


async def test_every_stage_runs_on_its_own_threads_and_results_are_per_row() -> None:
    rec = Recorder()
    async with Batcher(rec.stages(), max_batch_size=4, max_wait=0.0, name="m") as b:
        results = await asyncio.gather(*(b(x) for x in range(4)))
        assert await b.map([5, 6]) == [51, 61]
    assert results == [1, 11, 21, 31]
    assert {t.rsplit("-", 1)[0] for t in rec.threads("prepare")} == {"batchio-m-prepare"}
    assert rec.threads("assemble") == {"batchio-m-assemble-0"}
    assert rec.threads("device") == {"batchio-m-device-0"}
    assert rec.threads("finish") == {"batchio-m-finish-0"}


async def test_next_batches_are_prepared_and_assembled_while_one_is_on_the_device() -> None:
    rec = Recorder()
    device_gate, on_device = rec.hold("device")
    async with Batcher(rec.stages(), max_batch_size=2, max_wait=0.0) as b:
        first = [asyncio.ensure_future(b(x)) for x in (1, 2)]
        await wait_event(on_device)
        assembled = rec.entered_event("assemble")
        second = [asyncio.ensure_future(b(x)) for x in (3, 4)]
        await wait_event(assembled)  # batch 2 assembled while batch 1 holds the device
        assert rec.seen("device") == [[1, 2]]
        assert [3, 4] in rec.seen("prepare")
        assert [3, 4] in rec.seen("assemble")
        assert not any(f.done() for f in first + second)
        device_gate.set()
        assert await asyncio.gather(*first, *second) == [11, 21, 31, 41]
    assert rec.seen("device") == [[1, 2], [3, 4]]


async def test_a_row_that_fails_preparation_fails_alone_and_at_once() -> None:
    rec = Recorder()
    device_gate = rec.gate("device")
    async with Batcher(rec.stages(), max_batch_size=3, max_wait=0.0) as b:
        good = [asyncio.ensure_future(b(x)) for x in (1, 2)]
        bad = asyncio.ensure_future(b(-1))
        with pytest.raises(ValueError, match="bad -1"):
            await bad  # while its neighbours are still held on the device
        assert not any(f.done() for f in good)
        device_gate.set()
        assert await asyncio.gather(*good) == [11, 21]
        stats = b.statistics()
    assert rec.seen("device") == [[1, 2]]
    assert (stats.completed, stats.failed) == (2, 1)


async def test_a_request_cancelled_before_assembly_never_reaches_the_device() -> None:
    rec = Recorder()
    prepare_gate, preparing = rec.hold("prepare")
    async with Batcher(rec.stages(), max_batch_size=3, max_wait=0.0) as b:
        tasks = [asyncio.ensure_future(b(x)) for x in (1, 2, 3)]
        await wait_event(preparing)
        tasks[1].cancel()
        await wait_all_tasks_blocked()
        prepare_gate.set()
        assert await tasks[0] == 11
        assert await tasks[2] == 31
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        stats = b.statistics()
    assert rec.seen("assemble") == [[1, 3]]
    assert rec.seen("device") == [[1, 3]]
    assert stats.cancelled == 1
    assert stats.completed == 2
    assert stats.pending == 0


async def test_a_batch_whose_requests_all_left_during_assembly_skips_the_device() -> None:
    rec = Recorder()
    assemble_gate, assembling = rec.hold("assemble")
    async with Batcher(rec.stages(), max_batch_size=2, max_wait=0.0) as b:
        tasks = [asyncio.ensure_future(b(x)) for x in (1, 2)]
        await wait_event(assembling)
        for t in tasks:
            t.cancel()
        await wait_all_tasks_blocked()
        assemble_gate.set()
        assert await b(7) == 71  # the batcher carries on
        stats = b.statistics()
    assert rec.seen("device") == [[7]]
    assert stats.cancelled == 2


async def test_a_batch_whose_requests_all_left_while_queued_for_the_device_skips_it() -> None:
    """Found in review: a batch already handed to the device stage still ran after all its
    requests were cancelled (device time for nobody). The device job now looks first."""
    rec = Recorder()
    device_gate, on_device = rec.hold("device")
    async with Batcher(rec.stages(), max_batch_size=1, max_wait=0.0) as b:
        first = asyncio.ensure_future(b(1))
        await wait_event(on_device)  # batch [1] holds the device thread
        second = asyncio.ensure_future(b(2))
        # Batch [2] goes through the prepare and assemble threads, then waits for the device:
        # a state of other threads, which only a (bounded) look at the statistics shows.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + GATE_TIMEOUT
        while b.statistics().stages[2].queue_depth != 1:
            assert loop.time() < deadline, "batch [2] never reached the device's queue"
            await asyncio.sleep(0.001)
        second.cancel()
        await wait_all_tasks_blocked()
        device_gate.set()
        assert await first == 11
        assert await b(3) == 31  # the batcher carries on
        stats = b.statistics()
    assert rec.seen("device") == [[1], [3]]
    assert stats.cancelled == 1
    assert stats.scheduler is not None
    model = stats.scheduler.model
    assert model is not None
    assert model.samples == 2  # the skipped job taught the run-time model nothing


async def test_a_request_timed_out_before_assembly_never_reaches_the_device() -> None:
    rec = Recorder()
    prepare_gate, preparing = rec.hold("prepare")
    async with Batcher(rec.stages(), max_batch_size=2, max_wait=0.0) as b:
        late = asyncio.ensure_future(b(1, timeout=0.001))
        other = asyncio.ensure_future(b(2))
        await wait_event(preparing)
        with pytest.raises(RequestTimeoutError):
            await late  # its timer fires while preparation is held
        prepare_gate.set()
        assert await other == 21
    assert rec.seen("device") == [[2]]


@pytest.mark.parametrize("isolate", [False, True])
async def test_a_failing_device_stage_fails_its_rows_or_only_the_bad_one(isolate: bool) -> None:
    rec = Recorder()
    async with Batcher(rec.stages(), max_batch_size=4, max_wait=0.01, isolate_errors=isolate) as b:
        outcomes = await asyncio.gather(*(b(x) for x in (1, 999, 3, 4)), return_exceptions=True)
        assert await b(5) == 51  # healthy afterwards
    errors = [isinstance(o, RuntimeError) for o in outcomes]
    if isolate:
        assert errors == [False, True, False, False]
        assert [o for o in outcomes if not isinstance(o, Exception)] == [11, 31, 41]
    else:
        assert all(errors)


async def test_finish_returning_the_wrong_count_is_a_contract_error_for_the_batch() -> None:
    stages: Stages[int, int] = Stages(run=lambda xs: xs, finish=lambda out: out[:-1])
    async with Batcher(stages, max_batch_size=2, max_wait=0.01, isolate_errors=True) as b:
        outcomes = await asyncio.gather(b(1), b(2), return_exceptions=True)
    assert all(isinstance(o, BatchSizeMismatchError) for o in outcomes)


async def test_a_base_exception_from_a_stage_becomes_batch_function_error() -> None:
    class Odd(BaseException):
        pass

    def run(xs: list[int]) -> list[int]:
        raise Odd

    async with Batcher(Stages[int, Any](run=run), max_batch_size=1, max_wait=0.0) as b:
        with pytest.raises(BatchFunctionError) as info:
            await b(1)
        assert isinstance(info.value.__cause__, Odd)
        assert b.healthy


async def test_a_stalled_device_stage_is_abandoned_replaced_and_the_batcher_carries_on() -> None:
    async with stalled_staged_batcher() as b:  # b(0) stalled and raised BatchStalledError
        assert await b(1) == 1
        stats = b.statistics()
    assert stats.stalled_batches == 1


async def test_statistics_report_each_stage_and_the_device_busy_fraction() -> None:
    rec = Recorder()
    async with Batcher(rec.stages(prepare_workers=3), max_batch_size=2, max_wait=0.0) as b:
        await asyncio.gather(*(b(x) for x in range(6)))
        stats = b.statistics()
    assert [s.name for s in stats.stages] == ["prepare", "assemble", "device", "finish"]
    prepare, assemble, device, finish = stats.stages
    assert isinstance(prepare, StageStatistics)
    assert prepare.workers == 3
    assert assemble.workers == device.workers == finish.workers == 1
    assert all(s.jobs == stats.batches for s in stats.stages)
    assert all(s.queue_depth == 0 and s.busy_seconds >= 0 for s in stats.stages)
    assert all(s.run.count == s.jobs for s in stats.stages)
    assert stats.device_busy_fraction is not None
    assert 0.0 <= stats.device_busy_fraction <= 1.0
    plain = Batcher(lambda xs: xs)
    assert plain.statistics().stages == ()
    assert plain.statistics().device_busy_fraction is None


async def test_only_the_stages_given_exist_and_missing_ones_pass_through() -> None:
    async with Batcher(Stages[int, Any](run=lambda xs: [x * 2 for x in xs]), max_wait=0.0) as b:
        assert await b(4) == 8
        assert [s.name for s in b.statistics().stages] == ["device", "finish"]


async def test_a_staged_batcher_keeps_several_batches_in_flight_by_default() -> None:
    rec = Recorder()
    gate = rec.gate("prepare")
    async with Batcher(rec.stages(prepare_workers=2), max_batch_size=1, max_wait=0.0) as b:
        tasks = [asyncio.ensure_future(b(x)) for x in range(8)]
        await wait_all_tasks_blocked()
        assert b.statistics().in_flight_batches == 5  # prepare_workers + 3
        assert b.options.max_concurrent_batches is None
        gate.set()
        assert await asyncio.gather(*tasks) == [x * 10 + 1 for x in range(8)]


def test_stages_are_validated() -> None:
    async def run(xs: list[int]) -> list[int]:
        return xs

    with pytest.raises(TypeError, match="device stage must be a plain function"):
        Stages(run=run)
    with pytest.raises(TypeError, match="prepare stage must be callable"):
        Stages(run=list, prepare=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prepare_workers must be >= 1"):
        Stages(run=list, prepare_workers=0)
    with pytest.raises(ValueError, match="weight must be >= 1"):
        Stages(run=list, weight=0)
    with pytest.raises(TypeError, match=r"device must be a batchio\.DeviceExecutor"):
        Stages(run=list, device="cuda")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"callable or a batchio\.Stages"):
        Batcher(3)  # type: ignore[arg-type]


# -- shapes: allowed_batch_sizes -------------------------------------------------------------------


@pytest.mark.parametrize("staged", [False, True])
async def test_batches_are_padded_to_allowed_sizes_and_padding_never_reaches_a_caller(
    staged: bool,
) -> None:
    sizes: list[int] = []

    def fn(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return [x * 2 for x in xs]

    target: Any = Stages(run=fn) if staged else fn
    async with Batcher(target, max_batch_size=8, max_wait=0.0, allowed_batch_sizes=[2, 8, 4]) as b:
        assert b.options.allowed_batch_sizes == (2, 4, 8)
        for n in (1, 3, 5, 8):
            assert await asyncio.gather(*(b(x) for x in range(n))) == [x * 2 for x in range(n)]
        stats = b.statistics()
    assert sizes == [2, 4, 8, 8]
    assert stats.completed == 17
    assert stats.rows == 17


async def test_an_async_fn_is_padded_too() -> None:
    sizes: list[int] = []

    async def fn(xs: list[int]) -> list[int]:
        sizes.append(len(xs))
        return xs

    async with Batcher(fn, max_batch_size=4, max_wait=0.0, allowed_batch_sizes=(4,)) as b:
        assert await b.map([1, 2, 3]) == [1, 2, 3]
    assert sizes == [4]


def test_allowed_batch_sizes_are_validated() -> None:
    with pytest.raises(ValueError, match="must equal max_batch_size"):
        Batcher(list, max_batch_size=32, allowed_batch_sizes=(8, 16))
    with pytest.raises(ValueError, match="at least one size"):
        Batcher(list, allowed_batch_sizes=())
    with pytest.raises(TypeError, match="sequence of ints"):
        Batcher(list, allowed_batch_sizes=8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allowed_batch_sizes must be >= 1"):
        Batcher(list, max_batch_size=4, allowed_batch_sizes=(0, 4))


# -- one device, many batchers -----------------------------------------------------------------------


async def test_batchers_sharing_a_device_run_their_device_stages_on_its_one_thread() -> None:
    threads: list[tuple[str, str]] = []

    def stage(tag: str) -> Callable[[list[int]], list[str]]:
        def run(xs: list[int]) -> list[str]:
            threads.append((tag, threading.current_thread().name))
            return [f"{tag}{x}" for x in xs]

        return run

    with DeviceExecutor("gpu") as gpu:
        async with (
            Batcher(Stages[int, str](run=stage("a"), device=gpu), max_wait=0.0) as a,
            Batcher(Stages[int, str](run=stage("b"), device=gpu, weight=2), max_wait=0.0) as b,
        ):
            got = await asyncio.gather(a(1), b(2), a(3), b(4))
            device_stats = a.statistics().stages[0]
        assert not gpu.closed  # the batchers leave a shared device open
    assert list(got) == ["a1", "b2", "a3", "b4"]
    assert {name for _, name in threads} == {"batchio-gpu-0"}
    assert {tag for tag, _ in threads} == {"a", "b"}
    assert device_stats.name == "device"
    assert device_stats.workers == 1
    assert gpu.closed
    assert "closed" in repr(gpu)


async def test_a_closed_device_executor_fails_batches_clearly_and_the_batcher_stays_up() -> None:
    gpu = DeviceExecutor()
    gpu.close()
    async with Batcher(Stages[int, Any](run=list, device=gpu), max_wait=0.0) as b:
        with pytest.raises(DeviceClosedError, match="closed"):
            await b(1)
        assert b.healthy


async def test_a_bounded_close_replaces_a_stuck_shared_device_thread_for_the_others() -> None:
    release = threading.Event()

    def stuck(xs: list[int]) -> list[int]:
        release.wait(GATE_TIMEOUT)
        return xs

    try:
        with DeviceExecutor() as gpu:
            other = Batcher(
                Stages[int, int](run=lambda xs: [-x for x in xs], device=gpu), max_wait=0.0
            )
            async with other:
                b = Batcher(Stages[int, int](run=stuck, device=gpu), max_wait=0.0)
                async with b:
                    task = asyncio.ensure_future(b(1))
                    await wait_all_tasks_blocked()
                    await b.aclose(timeout=0.01)
                with pytest.raises(Exception, match="drain timed out"):
                    await task
                assert await other(5) == -5  # the device still serves the other batcher
    finally:
        release.set()


def test_device_executor_options_are_validated() -> None:
    with pytest.raises(ValueError, match='share must be "time" or "batches"'):
        DeviceExecutor(share="fair")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="name must be a str"):
        DeviceExecutor(3)  # type: ignore[arg-type]
    with DeviceExecutor("x", share="batches") as dev:
        assert (dev.name, dev.share) == ("x", "batches")
        assert "open" in repr(dev)
        assert 0.0 <= dev.busy_fraction() <= 1.0
    assert dev.busy_fraction() == 0.0
    dev.close()  # twice is fine


# -- a stall at any stage of the tail ----------------------------------------------------------------


@pytest.mark.parametrize("where", ["assemble", "finish", "second half"])
async def test_a_stall_anywhere_in_the_tail_fails_the_batch_and_the_batcher_carries_on(
    where: str,
) -> None:
    release = threading.Event()

    def hang_if(cond: bool) -> None:
        if cond:
            release.wait(GATE_TIMEOUT)

    def assemble(rows: list[int]) -> list[int]:
        hang_if(where == "assemble" and 0 in rows)
        return rows

    def run(rows: list[int]) -> list[int]:
        if 999 in rows and len(rows) > 1:
            raise RuntimeError("bisect me")  # the halves run next: [0] then [999]
        hang_if(where == "second half" and rows == [999])
        return rows

    def finish(rows: list[int]) -> list[int]:
        hang_if(where == "finish" and 0 in rows)
        return rows

    stages: Stages[int, int] = Stages(assemble=assemble, run=run, finish=finish)
    try:
        async with Batcher(
            stages, max_batch_size=2, max_wait=0.01, batch_time_limit=0.05, isolate_errors=True
        ) as b:
            outcomes = await asyncio.gather(b(0), b(999), return_exceptions=True)
            assert all(isinstance(o, BatchStalledError) for o in outcomes), outcomes
            assert await b(5) == 5
            stats = b.statistics()
    finally:
        release.set()
    assert stats.stalled_batches == 1
    assert stats.pending == 0


async def test_a_device_closed_while_a_job_is_being_queued_fails_with_device_closed_error() -> None:
    from batchio._stages import DEVICE, StageWork

    gpu = DeviceExecutor()
    work = StageWork(DEVICE, None, device=gpu, lane=gpu.lane("x", 1))
    pool = work.threads  # looked up while open ...
    gpu.close()  # ... closed by another batcher's owner before the job is queued
    with pytest.raises(DeviceClosedError, match="closed"):
        work.run(pool, list, [1], notify_start=False)
