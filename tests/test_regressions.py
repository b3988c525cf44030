"""Regression tests from an adversarial review of the core.

Each test failed against the code as reviewed; its docstring names the bug it pins down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
import weakref

import anyio
import pytest
from anyio import wait_all_tasks_blocked

import batchio
from batchio import Batcher
from batchio.testing import GatedBatchFn

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def double(x: int) -> int:
    return 2 * x


def batcher_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"batchio-{name}-")]


# -- 1. overflow never admitted after cancelled rows are purged --------------------------------


async def test_parked_request_is_admitted_once_cancelled_rows_free_the_queue() -> None:
    """BUG (hang): a request parked for room (when_full="wait") is never admitted when the room
    was freed by *cancelled* queued requests. The executor calls _admit_overflow() before
    oldest_enqueued_at() drops the dead entries, finds the queue "full" of dead rows, then purges
    them and goes to sleep with wake_at_rows=1 while the parked request sits in _overflow. Every
    later submit parks behind it (``self._overflow`` is non-empty), so the batcher is stuck."""
    fn = GatedBatchFn(double, gated=True)
    async with Batcher(
        fn, max_batch_size=2, max_wait=HOUR, max_queue_size=2, when_full="wait"
    ) as b:
        blocker = b.map_nowait([0, 0])  # a full batch: dispatched at once, holds the only slot
        await fn.wait_entered(1)
        a, c = b.submit_nowait(1), b.submit_nowait(2)  # fill the queue (2 rows)
        parked = b.submit_nowait(3)  # no room: parked
        await wait_all_tasks_blocked()
        a.cancel()
        c.cancel()
        fn.open()
        assert await blocker == [0, 0]
        await wait_all_tasks_blocked()  # the executor has looked at the queue and gone to sleep
        with anyio.fail_after(5):
            later = b.submit_nowait(4)
            assert list(await asyncio.gather(parked, later)) == [6, 8]


async def test_aclose_drains_a_parked_request_behind_a_cancelled_one() -> None:
    """BUG (aclose hangs): same root cause, no batch running at all. The queue holds one live row
    (waiting for max_wait), a second request parks for room, the first is cancelled. aclose()
    wakes the executor: _admit_overflow() sees queue.rows == 1 (the dead row) and admits nothing,
    oldest_enqueued_at() then drops the dead row, the closing check sees a non-empty overflow,
    the policy answers Wait(wake_at_rows=1), and nothing ever wakes the executor again: the
    parked request never runs and aclose() never returns."""
    fn = GatedBatchFn(double)
    b = Batcher(fn, max_batch_size=2, max_wait=HOUR, max_queue_size=1, when_full="wait")
    await b.__aenter__()
    first = b.submit_nowait(1)
    parked = b.submit_nowait(2)
    await wait_all_tasks_blocked()
    first.cancel()
    with anyio.fail_after(5):
        await b.aclose()
        assert await parked == 4


# -- 2. StopIteration from a sync fn ---------------------------------------------------------


def raise_stop_iteration(items: list[int]) -> list[int]:
    return [next(iter([]))]  # an exhausted iterator: a classic slip in real code


async def test_sync_fn_raising_stop_iteration_fails_the_batch_instead_of_hanging() -> None:
    """BUG (hang): the worker thread catches StopIteration and _settle() calls
    fut.set_exception(StopIteration()), which asyncio refuses with TypeError inside a loop
    callback. The batch's future is never resolved: the batch task, its callers, the executor
    (its only slot stays busy) and aclose() all hang forever."""
    b = Batcher(raise_stop_iteration, max_batch_size=2, max_wait=0)
    with anyio.fail_after(5):
        async with b:
            with pytest.raises(RuntimeError, match="StopIteration"):
                await b(1)  # any clear error would do; today the await never returns
            # aclose() on leaving the block hangs as well while the batch never finishes


async def test_stop_iteration_in_a_slot_fails_only_that_request() -> None:
    """BUG (wrong outcomes + double count): the docs say an Exception in a slot fails only that
    request. A StopIteration in a slot makes fut.set_exception() raise TypeError inside
    _deliver(); _run_batch's `finally` then fails every owner *after* it with
    BatcherBrokenError, and recounts owners already handled (a cancelled one counts twice)."""

    def fn(items: list[int]) -> list[object]:
        return [StopIteration() if x == 1 else 2 * x for x in items]

    gate: GatedBatchFn[int, int] = GatedBatchFn(lambda x: x, gated=True)

    def gated_fn(items: list[int]) -> list[object]:
        gate(items)
        return fn(items)

    async with Batcher(gated_fn, max_batch_size=3, max_wait=HOUR) as b:
        victim, bad, good = b.submit_nowait(0), b.submit_nowait(1), b.submit_nowait(2)
        await gate.wait_entered(1)
        victim.cancel()
        await wait_all_tasks_blocked()
        gate.open()
        outcomes = await asyncio.gather(bad, good, return_exceptions=True)
    stats = b.statistics()
    # Today: good gets BatcherBrokenError, the victim's cancellation counts twice (pending == -1).
    assert (outcomes[1], stats.cancelled, stats.pending) == (4, 1, 0), (outcomes, stats)


# -- 3. worker threads leak when aclose() is cancelled ------------------------------------------


async def test_cancelled_aclose_still_releases_worker_threads() -> None:
    """BUG (thread leak): aclose() shuts the worker threads down in its `finally` only if no batch
    is running. Cancel it while a batch runs and nothing ever shuts them down: _batch_done and
    the executor's clean exit do not, so the thread outlives the batcher's whole lifetime."""
    fn = GatedBatchFn(double, gated=True)
    b = Batcher(fn, max_batch_size=1, max_wait=0, name="leaky-aclose")
    await b.__aenter__()
    threads = batcher_threads("leaky-aclose")
    assert threads
    running = b.submit_nowait(1)
    await fn.wait_entered(1)
    with anyio.move_on_after(0.01):
        await b.aclose()  # cancelled while the batch runs
    fn.open()
    assert await running == 2
    await wait_all_tasks_blocked()
    for t in threads:
        await anyio.to_thread.run_sync(t.join, 2.0)
    assert not [t for t in threads if t.is_alive()], "worker thread still running"


# -- 4. timers of cancelled requests stayed scheduled -------------------------------------------


class Item:
    pass


async def test_cancelled_queued_request_does_not_keep_its_input_alive_until_its_deadline() -> None:
    """BUG (leak): dropping a cancelled queued request left its deadline timer scheduled, and the
    TimerHandle held the request, hence its input, until the deadline (an hour here). Once the
    dead entry is dropped (when the next batch forms), nothing may hold the input."""
    fn: GatedBatchFn[Item, int] = GatedBatchFn(lambda x: 0, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0, timeout=HOUR) as b:
        blocker = b.submit_nowait(Item())
        await fn.wait_entered(1)
        item = Item()
        ref = weakref.ref(item)
        victim = b.submit_nowait(item)
        del item
        victim.cancel()
        del victim
        fn.open()
        await blocker
        assert await b(Item()) == 0  # this batch formed after dropping the dead entry
        assert b.statistics().cancelled == 1
        gc.collect()
        assert ref() is None, "the cancelled request's input is still referenced (by its timer)"


# -- 5. decorator on methods of ordinary dataclasses --------------------------------------------


@dataclasses.dataclass
class Model:
    factor: int

    @batchio.batch(max_batch_size=4, max_wait=0)
    def scale(self, xs: list[int]) -> list[int]:
        return [x * self.factor for x in xs]


@dataclasses.dataclass(frozen=True)
class FrozenModel:
    name: str
    weights: list[int] = dataclasses.field(compare=False, hash=False)

    @batchio.batch(max_batch_size=4, max_wait=0)
    def scale(self, xs: list[int]) -> list[int]:
        return [x * self.weights[0] for x in xs]


async def test_batched_method_on_a_plain_dataclass() -> None:
    """BUG: BatchedMethod keys its per-instance batchers in a WeakKeyDictionary, which hashes
    the instance. A plain @dataclass (eq=True) is unhashable, so every call raises TypeError,
    with a misleading message about weak references (dataclasses support them)."""
    m = Model(3)
    assert await m.scale(2) == 6


async def test_equal_instances_do_not_share_a_batcher() -> None:
    """BUG (cross-delivery): the WeakKeyDictionary keys by equality, not identity. Two distinct
    instances that compare equal share one BatchedFunction, bound (weakly) to the first one: the
    second instance's calls run on the first instance's state and get its results."""
    a = FrozenModel("m", [2])
    b = FrozenModel("m", [10])
    assert a == b
    assert a is not b
    assert await a.scale(1) == 2
    assert await b.scale(1) == 10
    await a.scale.aclose()
    await b.scale.aclose()


# -- 6. executor death during aclose() -----------------------------------------------------------


class DiesWhenClosing:
    """A policy that waits (like a long max_wait) and fails once the batcher is closing."""

    max_batch_size = 4

    def decide(self, state: batchio.QueueState) -> batchio.Dispatch | batchio.Wait:
        if state.closing:
            raise RuntimeError("policy bug")
        return batchio.Wait(deadline=None, wake_at_rows=None)


async def test_executor_dying_while_aclose_drains_is_not_raised_from_aclose() -> None:
    """GAP (docs/concepts.md: "The crash is logged ... it is *not* raised into the body of the
    `async with`"): aclose() awaits asyncio.shield(executor_task), so if the executor dies while
    it drains, aclose() - hence leaving `async with` - raises the policy's raw RuntimeError, and
    returns without waiting for running batches or releasing the worker threads. (If the executor
    died before aclose(), aclose() is silent: the outcome depends on timing.)"""

    def fn(items: list[int]) -> list[int]:
        return [2 * x for x in items]

    b = Batcher(fn, policy=DiesWhenClosing())
    async with b:
        fut = b.submit_nowait(1)
    with pytest.raises(batchio.BatcherBrokenError):
        await fut
    assert not b.healthy


# -- 7. decorated methods: executors of collected instances are destroyed while pending ----------


class Scorer:
    @batchio.batch(max_batch_size=4, max_wait=0)
    async def score(self, xs: list[int]) -> list[int]:
        return xs


async def test_collecting_an_instance_does_not_destroy_a_pending_executor_task() -> None:
    """BUG (noise/leak of a live task): each instance's Batcher has a running executor task. When
    the instance is collected without an explicit `await obj.method.aclose()`, the WeakKeyDictionary
    drops the BatchedFunction, the Batcher <-> executor-task cycle becomes unreachable and the GC
    destroys the *pending* task: asyncio reports "Task was destroyed but it is pending!" for every
    instance, and _executor_done never runs. The docs promise the wrapper does not keep instances
    alive, but dropping one should shut its batcher down cleanly (e.g. a weakref.finalize that
    closes it)."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        s = Scorer()
        assert await s.score(1) == 1
        await wait_all_tasks_blocked()
        del s
        gc.collect()
        await wait_all_tasks_blocked()
    finally:
        loop.set_exception_handler(old)
    assert not [e for e in errors if "destroyed but it is pending" in str(e.get("message"))]


# -- found while fixing the above ------------------------------------------------------------


async def test_queue_smaller_than_a_batch_does_not_wait_max_wait_per_batch() -> None:
    """With max_queue_size < max_batch_size a batch can never fill; requests parked for room must
    make the executor dispatch at once, not after max_wait (an hour here)."""
    fn = GatedBatchFn(double)
    async with Batcher(
        fn, max_batch_size=8, max_wait=HOUR, max_queue_size=2, when_full="wait"
    ) as b:
        with anyio.fail_after(5):
            assert list(await asyncio.gather(*(b(i) for i in range(6)))) == [
                0, 2, 4, 6, 8, 10
            ]  # fmt: skip


async def test_per_call_timeout_is_validated() -> None:
    async with Batcher(double_all, max_batch_size=2, max_wait=0) as b:
        for bad in (0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="timeout"):
                b.submit_nowait(1, timeout=bad)
            with pytest.raises(ValueError, match="timeout"):
                b.map_nowait([1], timeout=bad)
        assert b.statistics().submitted == 0


def double_all(items: list[int]) -> list[int]:
    return [2 * x for x in items]


async def test_isolation_is_not_fooled_by_a_fn_that_mutates_its_input_list() -> None:
    def fn(items: list[int]) -> list[int]:
        items.reverse()  # a careless fn: changes the list it was given
        if 3 in items:
            raise ValueError("poison")
        return [2 * x for x in reversed(items)]

    async with Batcher(fn, max_batch_size=8, max_wait=HOUR, isolate_errors=True) as b:
        outcomes = await asyncio.gather(*(b(i) for i in range(8)), return_exceptions=True)
    assert [o if not isinstance(o, ValueError) else "err" for o in outcomes] == [
        0, 2, 4, "err", 8, 10, 12, 14
    ]  # fmt: skip


def test_loop_teardown_with_an_open_decorated_batcher_logs_no_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncio.run() cancels a lazily started batcher's executor at exit: not an ERROR."""

    @batchio.batch(max_batch_size=4, max_wait=0.001)
    def inc(xs: list[int]) -> list[int]:
        return [x + 1 for x in xs]

    async def use() -> int:
        return await inc(1)

    assert asyncio.run(use()) == 2
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
