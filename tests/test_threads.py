"""Calls from threads (``call_sync``, ``map_sync``) and sync programs (``BatcherThread``).

Same contract as ``await batcher(x)`` from any thread but the loop's: each caller gets its own
result or its own error, a call on the loop's thread is refused instead of deadlocking, an
interrupted caller's request is withdrawn, and leaving a ``BatcherThread`` drains.
"""

from __future__ import annotations

import asyncio
import contextvars
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from batchio import (
    Batcher,
    BatcherBrokenError,
    BatcherClosedError,
    BatcherLoopError,
    BatcherThread,
    BatchRecord,
    RequestTimeoutError,
    Stages,
)

from .conftest import GATE_TIMEOUT

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")


def double(xs: list[int]) -> list[int]:
    return [2 * x for x in xs]


class Gate:
    """A sync batch function that records its batches and blocks on a gate (for sync tests)."""

    def __init__(self, *, gated: bool = True) -> None:
        self.batches: list[list[int]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, xs: list[int]) -> list[int]:
        self.batches.append(list(xs))
        self.entered.set()
        if not self.gate.wait(GATE_TIMEOUT):
            raise TimeoutError("gate stayed closed")
        return [10 * x for x in xs]


def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for a condition another thread makes true: only for cross-thread states
    no event announces (a request sitting in the queue)."""
    deadline = time.monotonic() + GATE_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"never: {what}")
        time.sleep(0.001)


def run_threads(n: int, target: object) -> list[object]:
    results: list[object] = [None] * n

    def work(i: int) -> None:
        try:
            results[i] = target(i)  # type: ignore[operator]
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(GATE_TIMEOUT)
        assert not t.is_alive(), "a caller thread hung"
    return results


# -- call_sync from threads while the loop runs in the test -------------------------------------


@pytest.mark.anyio
async def test_many_threads_each_get_their_own_result_in_shared_batches() -> None:
    n = 32
    async with Batcher(double, max_batch_size=n, max_wait=60.0) as b:
        # The batch is dispatched only once all 32 threads' rows are queued: batched, for sure.
        results = await asyncio.to_thread(run_threads, n, b.call_sync)
        assert results == [2 * i for i in range(n)]
        assert await asyncio.to_thread(b.map_sync, range(n)) == [2 * i for i in range(n)]
    s = b.statistics()
    assert s.batch_size_histogram[n] == 2
    assert s.completed == n + 1


@pytest.mark.anyio
async def test_errors_and_timeouts_reach_the_calling_thread() -> None:
    def picky(xs: list[int]) -> list[object]:
        return [ValueError(f"bad {x}") if x < 0 else x for x in xs]

    async with Batcher(picky, max_batch_size=4, max_wait=0.0) as b:
        assert await asyncio.to_thread(b.call_sync, 5) == 5
        with pytest.raises(ValueError, match="bad -1"):
            await asyncio.to_thread(b.call_sync, -1)
        with pytest.raises(ValueError, match="timeout"):
            await asyncio.to_thread(b.call_sync, 1, timeout=-1)
    gate = Gate()
    async with Batcher(gate, max_batch_size=1, max_wait=0.0) as gated:
        first = asyncio.ensure_future(gated(1))
        await asyncio.to_thread(gate.entered.wait, GATE_TIMEOUT)
        with pytest.raises(RequestTimeoutError):  # queued behind the gated batch, past 10 ms
            await asyncio.to_thread(gated.call_sync, 2, timeout=0.01)
        gate.gate.set()
        assert await first == 10


@pytest.mark.anyio
async def test_a_call_on_the_loops_own_thread_is_refused_not_deadlocked() -> None:
    async with Batcher(double) as b:
        with pytest.raises(BatcherLoopError, match="deadlock"):
            b.call_sync(1)
        with pytest.raises(BatcherLoopError, match="deadlock"):
            b.map_sync([1])
        assert b.statistics().submitted == 0


@pytest.mark.anyio
async def test_a_call_from_a_thread_running_another_loop_is_refused() -> None:
    async with Batcher(double) as b:

        async def elsewhere() -> int:
            return b.call_sync(1)

        with pytest.raises(BatcherLoopError, match="another event loop"):
            await asyncio.to_thread(asyncio.run, elsewhere())


def test_calls_before_start_after_close_and_after_the_loop_closed_fail_clearly() -> None:
    b = Batcher(double)
    with pytest.raises(BatcherClosedError, match="start it first"):
        b.call_sync(1)
    with BatcherThread(b) as started:
        assert started.call_sync(2) == 4
    with pytest.raises(BatcherClosedError):
        b.call_sync(3)

    loop = asyncio.new_event_loop()
    orphan = Batcher(double)
    loop.run_until_complete(orphan.__aenter__())
    loop.close()  # closed under the open batcher
    with pytest.raises(BatcherBrokenError):
        orphan.call_sync(1)


@pytest.mark.anyio
async def test_the_submission_runs_in_the_calling_threads_context() -> None:
    seen: list[object] = []

    class Capture:
        def capture(self) -> object:
            return VAR.get()

        def batch_done(self, record: BatchRecord) -> None:
            seen.extend(record.contexts)

    def in_thread() -> int:
        VAR.set("thread's")
        return b.call_sync(1)

    async with Batcher(double, max_wait=0.0) as b:
        b.add_observer(Capture())
        VAR.set("loop's")
        assert await asyncio.to_thread(in_thread) == 2
    assert seen == ["thread's"]


# -- BatcherThread: a sync program owns the batcher ----------------------------------------------


def test_an_interrupted_caller_withdraws_its_queued_request() -> None:
    gate = Gate()
    with BatcherThread(Batcher(gate, max_batch_size=1, max_wait=0.0)) as b:
        holder = threading.Thread(target=b.call_sync, args=(1,))
        holder.start()  # occupies the one batch slot, gated
        assert gate.entered.wait(GATE_TIMEOUT)

        def interrupt_once_queued() -> None:
            until(lambda: b.statistics().queue_depth == 1, "the main thread's request queued")
            # A real SIGINT at the main thread (Ctrl-C): it interrupts the blocked wait.
            # (_thread.interrupt_main() only sets a flag, noticed once the wait ends.)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # type: ignore[arg-type]

        interrupter = threading.Thread(target=interrupt_once_queued)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            b.call_sync(2)  # blocks in the main thread until interrupted
        interrupter.join()
        until(lambda: b.statistics().cancelled == 1, "the withdrawal counted")
        assert b.statistics().queue_depth == 0
        gate.gate.set()
        holder.join(GATE_TIMEOUT)
    assert gate.batches == [[1]]  # the withdrawn request never ran


def test_leaving_the_block_drains_requests_in_flight_from_other_threads() -> None:
    gate = Gate()
    bt = BatcherThread(Batcher(gate, max_batch_size=4, max_wait=60.0))
    b = bt.start()
    assert bt.running
    results: list[object] = []
    callers = [
        threading.Thread(target=lambda i=i: results.append(b.call_sync(i))) for i in range(4)
    ]
    for t in callers:
        t.start()
    assert gate.entered.wait(GATE_TIMEOUT)  # a full batch of 4, held by the gate
    stopper = threading.Thread(target=bt.stop)
    stopper.start()
    until(lambda: b.closed, "close() reached the batcher")
    with pytest.raises(BatcherClosedError):
        b.call_sync(9)  # intake stopped, while the batch in flight is still held
    gate.gate.set()
    stopper.join(GATE_TIMEOUT)
    for t in callers:
        t.join(GATE_TIMEOUT)
    assert sorted(results) == [0, 10, 20, 30]  # type: ignore[type-var]
    assert not bt.running
    bt.stop()  # idempotent


def test_uvloop_and_run_a_coroutine_on_the_background_loop() -> None:
    async def total(b: Batcher[int, int], n: int) -> int:
        return sum([r async for r in b.imap(range(n))])

    with BatcherThread(Batcher(double, max_batch_size=8), use_uvloop=True) as b:
        assert b.call_sync(21) == 42
        thread = BatcherThread(b)  # (not started: only to reach .run on the right one below)
        with pytest.raises(RuntimeError, match="not been started"):
            thread.run(total, b, 3)
    bt = BatcherThread(Batcher(double, max_batch_size=8))
    with bt as b:
        assert bt.run(total, b, 100) == 2 * sum(range(100))
        assert type(bt.loop).__module__.startswith("asyncio")
    assert "stopped" in repr(bt)
    with pytest.raises(RuntimeError, match="not running"):
        bt.run(total, b, 1)


def test_errors_entering_and_exiting_the_owner_reach_the_program() -> None:
    @asynccontextmanager
    async def refuses() -> AsyncIterator[None]:
        raise OSError("no model here")
        yield  # pragma: no cover

    with pytest.raises(OSError, match="no model here"), BatcherThread(refuses()):
        pass  # pragma: no cover

    @asynccontextmanager
    async def fails_on_exit() -> AsyncIterator[int]:
        yield 7
        raise RuntimeError("exit failed")

    bt = BatcherThread(fails_on_exit())
    assert bt.start() == 7
    with pytest.raises(RuntimeError, match="cannot be started twice"):
        bt.start()
    with pytest.raises(RuntimeError, match="exit failed"):
        bt.stop()


def test_stop_from_the_loops_own_thread_is_refused() -> None:
    bt = BatcherThread(Batcher(double))
    with bt:

        async def stop_here() -> None:
            bt.stop()

        with pytest.raises(RuntimeError, match="own loop's thread"):
            bt.run(stop_here)


@pytest.mark.anyio
@pytest.mark.parametrize("staged", [False, True])
async def test_a_batch_function_calling_its_own_batcher_is_refused(staged: bool) -> None:
    """From the batcher's own worker (or stage) thread, call_sync would wait for a batch slot
    its own batch holds: refused with BatcherLoopError, which fails that batch alone."""
    holder: list[Batcher[int, int]] = []

    def recurse(xs: list[int]) -> list[int]:
        return [holder[0].call_sync(x) for x in xs]

    fn: Stages[int, int] | Callable[[list[int]], list[int]] = (
        Stages[int, int](run=recurse) if staged else recurse
    )
    async with Batcher(fn, max_batch_size=1, max_wait=0.0) as b:
        holder.append(b)
        with pytest.raises(BatcherLoopError, match="own batch function"):
            await b(1)
        assert b.healthy


@pytest.mark.anyio
async def test_a_stopped_batcher_reports_no_workers() -> None:
    async with Batcher(Stages[int, int](run=double), max_wait=0.0) as b:
        assert await b(1) == 2
        assert all(st.workers >= 1 for st in b.statistics().stages)
    assert all(st.workers == 0 for st in b.statistics().stages)
