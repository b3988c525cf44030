"""Findings of a second adversarial review of the core v2 (after the fixes pinned in
``test_review_core_v2.py``): each test pinned a real defect and its docstring names the root
cause (line numbers as of the code it failed on).

- ``test_parked_request_waits_forever_after_an_empty_dispatch_of_expired_rows`` and
  ``test_close_from_another_thread_can_strand_a_request_accepted_meanwhile`` failed on 0ddf1d9
  and pass since 7712c97 (kept as regression tests).
- ``test_aclose_hangs_when_the_batch_formed_while_closing_is_empty`` still fails on 7712c97:
  that commit's fix of the empty-dispatch wait covers parked requests but not closing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from batchio import Batcher, RequestTimeoutError
from batchio.testing import GatedBatchFn, VirtualClock, wait_all_tasks_blocked

from .test_review_core_v2 import _consistent, double

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("asyncio", {})


async def test_parked_request_waits_forever_after_an_empty_dispatch_of_expired_rows() -> None:
    """A request parked for room is never admitted when the batch formed ahead of it is empty
    because every queued row had expired: it waits until some *other* call arrives.

    The deadline of the queued request passes after the loop processed its timers for this
    iteration but before the executor forms the batch (with a real clock: any deadline that
    falls inside one loop iteration; here the virtual clock moves between the two). ``take``
    then times it out itself, as documented ("a late timer cannot let an expired request in").

    Root cause (on 0ddf1d9): ``Batcher._executor`` (batchio/_batcher.py:507-511): when ``_dispatch`` took
    nothing and ``room.rows`` is 0 it waits with ``Wait(deadline=None, wake_at_rows=1)`` without
    looking at the parked requests again. The room freed by the expired request was reported by
    ``WaitingRoom._after_leave`` (batchio/_room.py:230-234), which now only calls ``_wake``; but
    the executor is running at that moment (``_waiter`` is None), so the wake-up is lost, and
    ``wake_at(1)`` never fires for a queue that stays empty. The parked request hangs until a new
    arrival (or close) wakes the executor.
    """
    clock = VirtualClock()
    with clock.install():
        fn = GatedBatchFn(double, gated=True)
        b = Batcher(fn, max_batch_size=1, max_queue_size=1, when_full="wait")
        async with b:
            x = b.submit_nowait(0)
            await fn.wait_entered(1)  # x runs: the only batch slot is busy
            a = b.submit_nowait(1, timeout=5)  # queued: the queue is full
            parked = b.submit_nowait(2)  # parked for room
            await wait_all_tasks_blocked()
            fn.open()
            assert await x == 0
            # This task resumes in the same loop iteration as the batch's done callback, which
            # wakes the executor; a's deadline passes before the executor looks.
            clock.advance(10)
            await wait_all_tasks_blocked()
            assert a.done()
            with pytest.raises(RequestTimeoutError):
                a.result()
            try:
                # The queue is empty and the slot free: the parked request must be running now.
                stats = b.statistics()
                assert stats.queue_depth == 0, "the parked request was never admitted"
                # Admitted: running, or (the gate is open) already done; a batch stops counting
                # in flight when its run ends, before its task's done callback.
                assert parked.done() or stats.in_flight_batches == 1
            finally:
                b.close()  # wakes the executor, which then admits and runs it
        assert await parked == 4
    _consistent(b)


async def test_aclose_hangs_when_the_batch_formed_while_closing_is_empty() -> None:
    """``aclose()`` never returns when, while closing, the only queued request has expired by the
    time the executor forms the batch (its timer has not run yet): no parked request needed.

    ``close()`` wakes the executor; in the same loop iteration the request's deadline passes (the
    virtual clock moves here; with a real clock, a deadline that falls inside one iteration).
    The executor runs before the timer, the policy says ``Dispatch`` (closing), and ``take`` times
    the request out itself: the batch is empty.

    Root cause: ``Batcher._executor`` (batchio/_batcher.py:510-514 on 7712c97): after an empty
    dispatch with ``room.rows == 0`` (and, since 7712c97, ``room.parked_rows == 0``) it waits with
    ``Wait(deadline=None, wake_at_rows=1)``, an arrival that can never come once the batcher is
    closed, instead of going back to the top of the loop, where ``self._closed and room.empty``
    (batchio/_batcher.py:496) would end it. The executor never returns, so ``_drained``
    waits forever (guarantees: "Every accepted request is resolved exactly once", and leaving
    ``async with`` drains). The same empty-dispatch wait strands parked requests (test above).
    """
    clock = VirtualClock()
    with clock.install():
        fn = GatedBatchFn(double)
        b = Batcher(fn, max_batch_size=4, max_wait=10)
        await b.__aenter__()
        a = b.submit_nowait(1, timeout=5)
        await wait_all_tasks_blocked()  # a waits for company (max_wait)
        b.close()  # the executor wakes in the next iteration
        clock.advance(6)  # ... and by then a's deadline has passed
        closing = asyncio.ensure_future(b.aclose())
        await wait_all_tasks_blocked()
        assert a.done()
        assert isinstance(a.exception(), RequestTimeoutError)
        if not closing.done():
            await b.aclose(timeout=0)  # unstick it (the bounded close stops the executor)
            await closing
            pytest.fail("aclose() hung after the last batch formed while closing was empty")
        await closing
        assert fn.calls == 0
    _consistent(b)


async def test_close_from_another_thread_can_strand_a_request_accepted_meanwhile() -> None:
    """``close()`` from another thread (documented as safe) can let the loop accept a request
    after the executor has already exited for good: that request is never run nor settled, and
    ``aclose()`` returns with it still pending.

    Root cause (on 0ddf1d9): ``Batcher.close`` (batchio/_batcher.py:223-224) sets ``_closed = True`` *before*
    ``_open_loop = None``. Between the two stores the loop thread may run the executor, which sees
    ``_closed and room.empty`` (batchio/_batcher.py:493) and returns, and then take a call whose
    inlined fast path (batchio/_batcher.py:382-385, the same in ``__call__``) still finds
    ``_open_loop`` set and queues the entry. Nothing will ever take it: the executor is gone, and
    ``_drained`` only waits for the executor and the running batches. (Storing
    ``_open_loop = None`` first closes the window: a call that read the old loop queues its entry
    before the executor can look again, and later calls are refused.)

    The closing thread is held between the two stores (before the second one, whichever it is)
    with a trace function, so the interleaving is deterministic. A call may be refused with
    ``BatcherClosedError``; one that was accepted must be resolved.
    """
    import inspect
    import sys
    import threading

    import anyio.to_thread

    from batchio import BatcherClosedError

    src, first = inspect.getsourcelines(Batcher.close)
    stores = [
        first + next(i for i, line in enumerate(src) if needle in line)
        for needle in ("self._open_loop = None", "self._closed = True")
    ]
    second_store = max(stores)
    paused, resume = threading.Event(), threading.Event()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is not Batcher.close.__code__:
            return None
        if event == "line" and frame.f_lineno == second_store:
            paused.set()
            resume.wait(30)
        return tracer

    fn = GatedBatchFn(double)
    b = Batcher(fn, max_batch_size=4, max_wait=0)
    await b.__aenter__()
    await wait_all_tasks_blocked()  # the executor is waiting for the first arrival

    def close_from_thread() -> None:
        sys.settrace(tracer)
        try:
            b.close()
        finally:
            sys.settrace(None)
            paused.set()

    def submit(x: int) -> asyncio.Future[int] | None:
        try:
            return b.submit_nowait(x)
        except BatcherClosedError:
            return None  # refused: fine

    closer = threading.Thread(target=close_from_thread)
    closer.start()
    try:
        await anyio.to_thread.run_sync(paused.wait, 30)
        x = submit(1)
        await wait_all_tasks_blocked()  # the executor dispatches x, then sees "closed and empty"
        y = submit(2)
    finally:
        resume.set()
        await anyio.to_thread.run_sync(closer.join, 30)
    await b.aclose()
    accepted = {i: f for i, f in ((1, x), (2, y)) if f is not None}
    stranded = [i for i, f in accepted.items() if not f.done()]
    assert not stranded, f"requests {stranded} were accepted and left pending after aclose()"
    assert {i: f.result() for i, f in accepted.items()} == {i: 2 * i for i in accepted}
    _consistent(b)
