"""Findings of an adversarial review of the core v2: each test pinned a real defect (it failed on
the code as reviewed, and passes since its fix) and its docstring names the root cause."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchio import (
    Batcher,
    BatcherBrokenError,
    BatcherClosedError,
    BatchFunctionError,
    Dispatch,
    QueueState,
    Wait,
)
from batchio.testing import GatedBatchFn, wait_all_tasks_blocked

pytestmark = pytest.mark.anyio


def double(x: int) -> int:
    return 2 * x


def _consistent(b: Batcher[Any, Any]) -> None:
    s = b.statistics()
    assert s.pending >= 0, s
    assert s.submitted == s.completed + s.failed + s.cancelled + s.timed_out + s.pending, s


async def test_lazily_cancelled_map_at_front_with_parked_request_kills_executor() -> None:
    """A ``map_nowait`` future cancelled while a request is parked kills the executor.

    Root cause: ``WaitingRoom.drop_dead_front`` (batchio/_room.py, the ``Request`` branch) settles
    the dead front entry with ``Outcomes.cancelled`` *before* ``dq.popleft()``. ``cancelled`` calls
    ``forget`` -> ``_after_leave`` -> ``admit_parked``, re-entrantly, from inside the outer
    ``admit_parked`` (which called ``drop_dead_front`` because its front parked entry did not fit).
    The inner ``admit_parked`` admits that parked entry; the outer one, still holding the stale
    ``entry``/``rows``, then finds the request fits and calls ``parked.popleft()`` on an empty
    deque: ``IndexError`` in the executor, which breaks the batcher, and every pending request
    fails with ``BatcherBrokenError``.
    """
    fn = GatedBatchFn(double, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0, max_queue_size=4, when_full="wait") as b:
        first = asyncio.ensure_future(b(0))
        await fn.wait_entered(1)
        dead = b.map_nowait([1, 2])  # 2 rows, a Request
        x = b.submit_nowait(3)
        y = b.submit_nowait(4)  # the queue is full: 4 rows
        parked = b.submit_nowait(5)  # parked for room
        await wait_all_tasks_blocked()
        dead.cancel()  # noticed lazily, when it reaches the front
        fn.open()
        assert await first == 0
        results = list(await asyncio.gather(x, y, parked, return_exceptions=True))
        assert b.healthy
        assert results == [6, 8, 10]
    _consistent(b)


async def test_lazily_cancelled_map_at_front_loses_the_next_queued_request() -> None:
    """The same re-entrancy pops a *live* request off the queue: it is never run nor settled.

    Root cause: ``WaitingRoom.drop_dead_front`` (batchio/_room.py) calls
    ``Outcomes.cancelled(entry)`` before ``dq.popleft()``; through ``forget`` -> ``_after_leave``
    -> ``admit_parked`` -> ``drop_dead_front`` the inner call pops the dead entry (now ``GONE``)
    itself, and the outer call's ``dq.popleft()`` then removes the next, live, entry. Its row stays
    counted in ``rows`` while the deque no longer holds it, so the request hangs forever (and once
    the deque is empty with ``rows > 0`` the default policy answers ``Wait(wake_at_rows=1)``,
    which fires at once: the executor spins without yielding). Even ``aclose(cancel_pending=True)``
    cannot reach it, since ``drain`` walks the deque.

    Here the trigger is a coroutine caller cancelled at the front (``WaitingRoom.cancel`` ->
    ``_after_leave`` -> ``admit_parked``), with a 3-row request parked.
    """
    fn = GatedBatchFn(double, gated=True)
    b = Batcher(fn, max_batch_size=1, max_wait=0, max_queue_size=4, when_full="wait")
    async with b:
        first = asyncio.ensure_future(b(0))
        await fn.wait_entered(1)
        front = asyncio.ensure_future(b(1))  # a coroutine call: its cancellation is reported
        await wait_all_tasks_blocked()
        dead = b.map_nowait([2])  # a Request, cancelled lazily below
        x = b.submit_nowait(3)
        y = b.submit_nowait(4)  # 4 rows: full
        parked = b.map_nowait([5, 6, 7])  # 3 rows, parked
        await wait_all_tasks_blocked()
        dead.cancel()
        front.cancel()
        await asyncio.gather(front, return_exceptions=True)
        closing = asyncio.ensure_future(b.aclose(cancel_pending=True))
        await wait_all_tasks_blocked()
        fn.open()
        await closing
        assert await first == 0
        for fut in (y, parked):
            assert isinstance(fut.exception(), BatcherClosedError)
        # aclose promises every accepted request is resolved; x was never run nor failed.
        assert x.done(), "x was dropped from the queue without being settled"
        assert isinstance(x.exception(), BatcherClosedError)
        _consistent(b)
        assert b.statistics().pending == 0


async def test_cancelled_plain_future_in_running_batch_counted_twice_by_bounded_close() -> None:
    """``aclose(timeout=0)`` counts a cancelled one-row request twice: ``pending`` goes negative.

    Root cause: a plain future (a fast entry) has no "counted" mark, and ``Outcomes._settle``
    (batchio/_outcomes.py:87-90) adds one to ``cancelled`` every time it meets a cancelled plain
    future. A bounded close meets it twice: ``Batcher._abort`` (batchio/_batcher.py:279) fails the
    running batch's owners, then cancels the batch task, whose ``finally`` in ``_run_batch``
    (batchio/_batcher.py:598-602) fails the same owners again. ``Request`` has ``counted`` for
    exactly this; plain futures need the same (e.g. count a plain cancellation only where the
    future leaves the batch, or drop settled owners from ``batch.owners``).
    """
    fn = GatedBatchFn(double, gated=True)
    b = Batcher(fn, max_batch_size=4, max_wait=0)
    async with b:
        pass_ = b.submit_nowait(1)
        gone = b.submit_nowait(2)
        await fn.wait_entered(1)
        gone.cancel()  # cancelled while its batch runs
        await b.aclose(timeout=0)
        fn.open()
        with pytest.raises(BatcherClosedError):
            await pass_
        s = b.statistics()
        assert (s.submitted, s.failed, s.cancelled) == (2, 1, 1), s
        _consistent(b)


class _Breaks:
    """A policy that dispatches at once, and raises once ``armed`` (a policy bug, say)."""

    max_batch_size = 4

    def __init__(self) -> None:
        self.armed = False

    def decide(self, state: QueueState) -> Dispatch | Wait:
        if self.armed:
            raise RuntimeError("policy bug")
        if state.free_slots > 0 and state.queued_rows:
            return Dispatch(state.queued_rows)
        return Wait(deadline=None, wake_at_rows=1)


async def test_cancelled_plain_future_counted_again_when_batch_delivers_after_executor_death() -> (
    None
):
    """Executor death, then the running batch delivering, counts a cancelled request twice.

    Root cause: ``Batcher._break`` (batchio/_batcher.py:543) fails every owner of the running
    batches (one ``cancelled`` for the plain future its caller cancelled, batchio/_outcomes.py:87-90),
    then the batch finishes and ``Outcomes.deliver`` (batchio/_outcomes.py:126-135) meets the
    same cancelled future and counts it again. ``submitted == ... + pending`` then needs
    ``pending == -1``.
    """
    fn = GatedBatchFn(double, gated=True)
    policy = _Breaks()
    b = Batcher(fn, policy=policy)
    async with b:
        kept = b.submit_nowait(1)
        gone = b.submit_nowait(2)
        await fn.wait_entered(1)
        gone.cancel()
        policy.armed = True
        late = b.submit_nowait(3)  # wakes the executor, whose policy now raises
        with pytest.raises(BatcherBrokenError):
            await late
        assert not b.healthy
        fn.open()
        with pytest.raises(BatcherBrokenError):
            await kept
        await b.aclose()  # waits for the running batch to finish and deliver
        s = b.statistics()
        assert s.cancelled == 1, s
        _consistent(b)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
async def test_cancelled_error_returned_in_a_slot_cancels_the_callers_task(use_async: bool) -> None:
    """A ``CancelledError`` instance *returned* in a slot reaches the caller raw: the caller's
    task ends up cancelled although nobody cancelled it (while the statistics count a failure).

    The same exception *raised* by ``fn`` is wrapped in ``BatchFunctionError`` at the batch
    boundary (batchio/_batcher.py:582), precisely so that a batch function cannot cancel its
    callers. Root cause: ``Outcomes.deliver`` (batchio/_outcomes.py:142-144) treats any
    ``BaseException`` in a slot as that request's error and sets it as is; only ``StopIteration``
    is adapted (``settleable``). A ``KeyboardInterrupt`` instance in a slot likewise leaves the
    caller's task and stops the event loop. Fix: wrap slot values that are not ``Exception``
    the way ``_run_batch`` wraps a raised one (or refuse them as a contract error).
    """

    def fn(items: list[int]) -> list[Any]:
        return [asyncio.CancelledError() if x == 0 else x for x in items]

    async def afn(items: list[int]) -> list[Any]:
        return fn(items)

    async with Batcher(afn if use_async else fn, max_batch_size=2, max_wait=0) as b:
        poisoned = asyncio.ensure_future(b(0))
        fine = asyncio.ensure_future(b(1))
        await asyncio.wait([poisoned, fine])
        assert fine.result() == 1
        assert not poisoned.cancelled(), "nobody cancelled this caller"
        assert isinstance(poisoned.exception(), BatchFunctionError)


def test_sync_fn_raising_system_exit_no_longer_breaks_the_batcher() -> None:
    """Regression in c157ec6: a sync ``fn`` raising ``SystemExit`` (or ``KeyboardInterrupt``)
    is now swallowed into ``BatchFunctionError`` on the worker thread; the batcher stays healthy
    and the exit never leaves the loop, unlike the same raise from an ``async def fn``.

    Root cause: ``settleable`` (batchio/_outcomes.py:22-40) was widened to wrap every
    non-``Exception`` ``BaseException`` (meant for values *returned* in a slot), but the worker
    thread also passes *raised* exceptions through it (batchio/_worker.py:122), so
    ``_run_batch``'s ``_PROPAGATE`` branch (batchio/_batcher.py:578) never sees them. Fix: keep
    ``settleable`` to the StopIteration adaptation for raised exceptions in ``_work`` (or wrap
    slot values in ``deliver`` only). tests/test_base_exceptions.py
    ``test_keyboard_interrupt_and_system_exit_propagate_and_break_the_batcher[*-sync]`` fails too.
    """

    def fn(items: list[int]) -> list[int]:
        raise SystemExit(3)

    seen: dict[str, Any] = {}

    async def main() -> None:
        b = seen["b"] = Batcher(fn, max_batch_size=1, max_wait=0)
        await b.__aenter__()
        await b.submit_nowait(0)

    with pytest.raises(SystemExit):
        asyncio.run(main())
    assert not seen["b"].healthy


# -- design concerns from the same review, fixed ---------------------------------------------------


class _DispatchesAlways:
    """A careless policy: Dispatch even from an empty queue."""

    max_batch_size = 4

    def decide(self, state: QueueState) -> Dispatch | Wait:
        if state.free_slots <= 0:
            return Wait(deadline=None, wake_at_rows=None)
        return Dispatch(self.max_batch_size)


async def test_a_policy_dispatching_from_an_empty_queue_does_not_spin_the_loop() -> None:
    """It used to make the executor loop forever without yielding (take() found nothing, and
    the executor asked again at once); an empty take now waits for the next arrival."""
    async with Batcher(lambda xs: xs, policy=_DispatchesAlways()) as b:
        await wait_all_tasks_blocked()  # returns only if the executor sleeps
        assert await b(3) == 3
        await wait_all_tasks_blocked()


async def test_close_from_another_thread_wakes_the_executor() -> None:
    import threading

    fn = GatedBatchFn(double)
    b = Batcher(fn, max_batch_size=4, max_wait=3600)
    await b.__aenter__()
    queued = b.submit_nowait(1)  # a partial batch, waiting for company for an hour
    await wait_all_tasks_blocked()
    t = threading.Thread(target=b.close)
    t.start()
    await asyncio.to_thread(t.join)
    assert await queued == 2  # closing dispatches what is queued without waiting
    await b.aclose()


async def test_a_cancelled_request_deep_in_the_queue_lets_go_of_its_input() -> None:
    """Its rows are forgotten at once, and with them its input (not when it reaches the front)."""
    import gc
    import weakref

    class Item:
        pass

    fn: GatedBatchFn[Any, int] = GatedBatchFn(lambda x: 0, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0, timeout=3600) as b:
        blocker = b.submit_nowait(Item())
        await fn.wait_entered(1)
        item = Item()
        ref = weakref.ref(item)
        # An iterator, so the call's own frame (kept by the CancelledError's traceback) does not
        # hold the item: only the batcher could.
        doomed = asyncio.ensure_future(b.map(iter([item])))
        behind = b.submit_nowait(Item())
        await wait_all_tasks_blocked()
        del item
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        gc.collect()
        released = ref() is None
        fn.open()
        assert (await blocker, await behind) == (0, 0)
    assert released


async def test_array_like_without_copy_gives_its_rows_as_they_are() -> None:
    class Rows:
        shape = (2,)

        def __getitem__(self, i: int) -> str:
            return "ab"[i]

    def fn(items: list[int]) -> Any:
        return Rows()

    async with Batcher(fn, max_batch_size=2, max_wait=3600) as b:
        assert list(await asyncio.gather(b(1), b(2))) == ["a", "b"]
