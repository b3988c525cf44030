"""The Batcher: the options, the call API, the lifecycle and the executor loop.

Per request (the hot path) a call creates a future, hands an entry to the waiting room
(:mod:`batchio._room`) and awaits. Per batch the executor asks the policy what to do, takes the rows
from the room and starts one batch task, which runs ``fn`` through the worker transport
(:mod:`batchio._worker`) and hands the outcomes to the one completion point
(:mod:`batchio._outcomes`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable, Sequence
from types import MappingProxyType, TracebackType
from typing import (
    Any,
    Final,
    Generic,
    Literal,
    NoReturn,
    TypeAlias,
    TypeVar,
    Unpack,
    cast,
    final,
    overload,
)

from ._checks import check_cost, check_priority, check_seconds, check_timeout
from ._estimates import RateMeter, RunTimeLearner
from ._exceptions import (
    BatcherBrokenError,
    BatcherClosedError,
    BatcherLoopError,
    BatchFunctionError,
    BatchStalledError,
)
from ._fromthread import call_from_thread
from ._imap import stream
from ._observe import BatchObserver, capture_all, report
from ._observe import register as register_live
from ._options import (
    DEFAULT,
    BatcherOptions,
    BatcherOptionsKw,
    ReconfigureKw,
    TimeoutArg,
    options_from,
)
from ._outcomes import Outcomes
from ._outputs import output_rows
from ._policy import Dispatch, LatencyTarget, MaxSizeOrWait, QueueState, Wait
from ._request import FUT, QUEUED, Batch, Entry, Request, entry_future
from ._room import WaitingRoom
from ._stages import DEVICE, STALLED, Pipeline, Stages, StageWork
from ._stats import BATCHES as BATCHES_COUNT
from ._stats import STALLED as STALLED_COUNT
from ._stats import BatcherStatistics, SchedulerLog, SchedulerStatistics, Tally
from ._worker import Job, WorkerThreads, call_async, call_sync, is_async_callable

__all__ = ["AsyncBatchFn", "Batcher", "SyncBatchFn"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")

SyncBatchFn: TypeAlias = Callable[[list[InT]], Sequence[OutT | Exception]]
"""A function from a list of inputs to one result (or ``Exception``) per input, in order."""
AsyncBatchFn: TypeAlias = Callable[[list[InT]], Awaitable[Sequence[OutT | Exception]]]
"""The ``async def`` form of :data:`SyncBatchFn`."""

_log: Final = logging.getLogger("batchio")
_running_loop: Final = asyncio._get_running_loop  # the C accessor: None outside a loop, no raise
_INF: Final = float("inf")
_PROPAGATE: Final = (KeyboardInterrupt, SystemExit)
_FOR_ARRIVAL: Final = Wait(deadline=None, wake_at_rows=1)
_FIXED_OPTIONS: Final = frozenset({"max_concurrent_batches", "when_full", "name", "batch_cost"})


def _is_uvloop(loop: asyncio.AbstractEventLoop) -> bool:
    """A uvloop loop whose clock is uvloop's own (uvloop is not imported: it is optional)."""
    cls = type(loop)
    for base in cls.__mro__:
        if base.__module__ == "uvloop" and base.__name__ == "Loop":
            return getattr(cls, "time", None) is getattr(base, "time", None)
    return False


def _consume(task: asyncio.Future[Any]) -> None:
    """Mark an abandoned task's outcome as retrieved, so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


@final
class Batcher(Generic[InT, OutT]):
    """Groups concurrent single-item calls into batches for ``fn`` and hands each caller its result.

    ``fn`` takes a list of inputs and returns one result per input, in order (a list, tuple,
    iterator, or an array with a leading batch dimension; see :doc:`concepts`). A slot may hold an
    ``Exception`` instance instead of a result: that request alone fails with it. A sync ``fn``
    runs on worker threads owned by this batcher (``max_concurrent_batches`` of them, so one by
    default, and CUDA or thread-local state stays put); an ``async def fn`` is awaited on the
    event loop.

    Use it as an async context manager, which starts the executor and, on exit, stops intake and
    drains the queue::

        async with Batcher(embed_many, max_batch_size=64, max_wait=0.005) as embed:
            vector = await embed("some text")

    Args:
        fn: the batch function.
        options: a :class:`~batchio.BatcherOptions` to start from (shared between batchers,
            say); keyword options are applied on top of it.
        **kwargs: the options of :class:`~batchio.BatcherOptions` (``max_batch_size``,
            ``max_wait``, ``max_concurrent_batches``, ``max_queue_size``, ``when_full``,
            ``timeout``, ``batch_time_limit``, ``isolate_errors``, ``policy``, ``name``),
            validated here.
    """

    __slots__ = (
        "__weakref__",
        "_abandoned_tasks",
        "_broken",
        "_clock",
        "_closed",
        "_concurrency",
        "_cost_fn",
        "_device_jobs",
        "_device_until",
        "_executor_task",
        "_fast",
        "_fn",
        "_in_flight",
        "_is_async",
        "_lead",
        "_learner",
        "_loop",
        "_meter",
        "_name",
        "_observers",
        "_open_loop",
        "_options",
        "_outcomes",
        "_pending",
        "_pipeline",
        "_plain_policy",
        "_policy",
        "_raw_fn",
        "_recent",
        "_room",
        "_running",
        "_sched",
        "_stages",
        "_tally",
        "_threads",
        "_timeout",
        "_waiter",
    )

    def __init__(
        self,
        fn: SyncBatchFn[InT, OutT] | AsyncBatchFn[InT, OutT] | Stages[InT, OutT],
        *,
        options: BatcherOptions | None = None,
        **kwargs: Unpack[BatcherOptionsKw],
    ) -> None:
        stages = fn if isinstance(fn, Stages) else None
        if stages is None and not callable(fn):
            raise TypeError(f"fn must be callable or a batchio.Stages, got {fn!r}")
        opts = self._options = options_from(options, kwargs)
        default_concurrency = 1 if stages is None else stages.depth
        self._concurrency: int = opts.max_concurrent_batches or default_concurrency
        self._stages = stages
        self._pipeline: Pipeline | None = None
        self._raw_fn = fn
        self._fn: Any = fn if stages is not None else _with_padding(fn, opts)
        self._is_async = stages is None and is_async_callable(fn)
        self._policy = opts.make_policy()
        self._timeout = opts.timeout
        named = stages.run if stages is not None else fn
        self._name: str = opts.name or getattr(named, "__qualname__", None) or type(named).__name__
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] = time.monotonic
        # The loop while the batcher accepts requests; None before start, once closed or broken.
        self._open_loop: asyncio.AbstractEventLoop | None = None
        self._tally = Tally()
        self._outcomes = Outcomes(self._tally, self._forget)
        self._room = WaitingRoom(
            opts.max_queue_size,
            opts.when_full == "wait",
            self._tally,
            self._outcomes,
            self._wake,
            shed=opts.when_full == "shed",
        )
        self._cost_fn = opts.batch_cost
        self._fast = False
        self._learner = RunTimeLearner("rows" if opts.batch_cost is None else "cost")
        self._meter = RateMeter()
        self._sched = SchedulerLog()
        self._pending = 0  # staged batches dispatched whose device job has not started
        self._device_until: float | None = None  # predicted end of the running device job
        self._device_jobs = 0  # this batcher's device jobs started and not yet seen to end
        self._lead = 0.0  # recent seconds from dispatch to the device job's start
        self._recent = 0.0  # recent latency of each batch's slowest request
        self._observers: tuple[BatchObserver, ...] = ()
        self._apply(opts)
        self._running: dict[asyncio.Task[None], Batch] = {}
        self._abandoned_tasks: set[asyncio.Task[Any]] = set()
        self._in_flight = 0
        self._waiter: asyncio.Future[None] | None = None
        self._executor_task: asyncio.Task[None] | None = None
        self._threads: WorkerThreads | None = None
        self._closed = False
        self._broken: BaseException | None = None

    def __repr__(self) -> str:
        state = (
            "broken"
            if self._broken
            else "closed"
            if self._closed
            else ("running" if self._executor_task else "not started")
        )
        return (
            f"<batchio.Batcher {self._name!r} {state} queued={self._room.depth} "
            f"in_flight={self._in_flight}>"
        )

    def _forget(self, req: Request) -> None:
        self._room.forget(req)

    # -- lifecycle -------------------------------------------------------------------------------

    async def __aenter__(self) -> Batcher[InT, OutT]:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _start(self) -> None:
        if self._executor_task is not None or self._closed:
            raise RuntimeError(f"{self!r} cannot be started twice")
        self._loop = self._open_loop = loop = asyncio.get_running_loop()
        # asyncio's own loops define time() as time.monotonic(): calling that C function directly
        # reads the same clock without a Python frame per request. uvloop's time() is libuv's
        # view of the same monotonic clock, in whole milliseconds and cached per loop iteration:
        # read directly, the clock gives the statistics, records and spans microseconds instead
        # (its timers may then fire a fraction of a millisecond either side of a deadline; the
        # executor looks at the clock again when woken). Any other clock (a test's fake one
        # patched onto the loop, another loop's) is followed as it is.
        own_clock = getattr(loop.time, "__func__", None) is asyncio.BaseEventLoop.time
        self._clock = time.monotonic if own_clock or _is_uvloop(loop) else loop.time
        if self._stages is not None:
            self._pipeline = Pipeline(self._stages, self._name, self._outcomes, self._padded_size)
        elif not self._is_async:
            self._threads = WorkerThreads(self._concurrency, f"batchio-{self._name}")
        self._executor_task = task = loop.create_task(
            self._executor(), name=f"batchio-executor-{self._name}"
        )
        task.add_done_callback(self._executor_done)
        register_live(self)

    def add_observer(self, observer: BatchObserver) -> None:
        """Tell ``observer`` about every batch from now on (see :class:`~batchio.BatchObserver`).

        What tracing and metrics integrations use (``batchio.integrations.otel``). Requests
        submitted from now on carry what ``observer.capture()`` returns; with an observer,
        every request takes the bookkeeping path (a little slower than the plain one). Adding
        the same observer twice is a no-op. Call it on the batcher's loop thread, or before
        the batcher starts.
        """
        if not isinstance(observer, BatchObserver):
            raise TypeError(f"{observer!r} has no capture() and batch_done() methods")
        if observer not in self._observers:
            self._observers = (*self._observers, observer)
            self._apply(self._options)

    def remove_observer(self, observer: BatchObserver) -> None:
        """Stop telling ``observer`` about batches (a no-op if it was not added)."""
        self._observers = tuple(o for o in self._observers if o is not observer)
        self._apply(self._options)

    @property
    def options(self) -> BatcherOptions:
        """The options this batcher was built with."""
        return self._options

    @property
    def name(self) -> str:
        """The name used in logs, reprs and worker thread names."""
        return self._name

    @property
    def closed(self) -> bool:
        """True once the batcher no longer accepts requests."""
        return self._closed

    @property
    def healthy(self) -> bool:
        """False once the executor has died (or its loop closed under it); every request then
        fails with :class:`~batchio.BatcherBrokenError`."""
        return self._broken is None

    @property
    def max_batch_size(self) -> int:
        """The most rows one batch may hold."""
        return self._policy.max_batch_size

    def reconfigure(self, **changes: Unpack[ReconfigureKw]) -> BatcherOptions:
        """Change options of a batcher, live; effective from the next batch decision.

        Validated like the constructor: a bad value raises and changes nothing. Queued requests
        are never lost or reordered; batches already running finish as they started.

        - ``max_batch_size``, ``max_wait``, ``policy``, ``allowed_batch_sizes``: the next batch
          is formed by the new rule (the executor looks again at once).
        - ``max_queue_size``: a larger bound (or ``None``) admits parked requests, in order; a
          smaller one keeps every queued request and refuses (or parks) new ones until the
          queue is under it.
        - ``timeout``: the default deadline of calls made from now on (queued requests keep
          theirs).
        - ``batch_time_limit``, ``isolate_errors``: from the next batch.

        ``max_concurrent_batches``, ``when_full`` and ``name`` are fixed for a batcher's life
        (threads and parked requests depend on them): changing them raises ``TypeError``.

        Call it on the batcher's event loop (or before it starts). Returns the new options.

        Raises:
            TypeError: an option that cannot change live, or an unknown or ill-typed one.
            ValueError: a value out of range.
            BatcherLoopError: called from another thread or event loop than the batcher's.
        """
        fixed = set(changes) & _FIXED_OPTIONS
        if fixed:
            raise TypeError(
                f"{', '.join(sorted(fixed))} cannot change on a live batcher (threads and parked "
                "requests depend on it): build a new one"
            )
        loop = self._loop
        if loop is not None and _running_loop() is not loop and not loop.is_closed():
            raise BatcherLoopError(
                f"{self!r}.reconfigure() must be called on the batcher's event loop"
            )
        opts = self._options.replace(**changes)  # validates everything, together
        self._options = opts
        self._policy = opts.make_policy()
        self._timeout = opts.timeout
        if self._stages is None:
            self._fn = _with_padding(self._raw_fn, opts)
        self._apply(opts)
        self._room.set_limit(opts.max_queue_size)
        self._wake()
        return opts

    def _apply(self, opts: BatcherOptions) -> None:
        """Hand the options the call path and the waiting room read to them."""
        # A call is a fast entry (no Request object) when it needs no bookkeeping.
        self._fast = opts.timeout is None and opts.batch_cost is None and not self._observers
        self._plain_policy = type(self._policy) is MaxSizeOrWait
        room = self._room
        room.costed = opts.batch_cost is not None
        room.padded = opts.padded_cost
        room.bucket_window = opts.bucket_window or 0
        room.max_bypass = opts.max_bypass

    def _padded_size(self, rows: int) -> int:
        return self._options.padded_size(rows)

    def close(self) -> None:
        """Stop accepting requests; those already queued are still run (see :meth:`aclose`).

        Safe from any thread: off the batcher's loop, the executor is woken through
        ``call_soon_threadsafe``.
        """
        if self._closed:
            return
        # Intake first: once the executor sees `_closed` with an empty queue it exits for good,
        # so no call may still be admitted after that (close() may run on another thread).
        self._open_loop = None
        self._closed = True
        loop = self._loop
        if loop is None or _running_loop() is loop:
            self._wake()
        elif not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # closed meanwhile: nothing left to wake
                pass

    async def aclose(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Stop intake, then drain: wait until every accepted request has been resolved.

        Args:
            cancel_pending: fail the requests still queued with
                :class:`~batchio.BatcherClosedError` instead of running them; batches already
                running finish and deliver.
            timeout: a bound, in seconds, on the drain. When it passes, requests still queued
                and those in running batches fail with :class:`~batchio.BatcherClosedError`,
                worker threads still busy are abandoned, and an ``async def fn`` is cancelled.
                ``None``: wait as long as it takes.

        If this call is cancelled while draining, the queued requests are failed the same way
        before the cancellation propagates, so nothing is left waiting.

        Raises:
            BatcherLoopError: called from another event loop than the batcher's.
            BatcherBrokenError: the batcher's event loop was closed under it (its requests can
                no longer be resolved; the batcher is marked broken and its threads released).
        """
        drain_for = check_seconds("timeout", timeout, allow_zero=True, allow_none=True)
        loop = self._loop
        if loop is not None and loop is not _running_loop():
            self._refuse_foreign_loop(loop)
        self.close()
        if cancel_pending:
            self._fail_queued(BatcherClosedError(f"{self!r} was closed before this request ran"))
        try:
            if loop is not None:
                deadline = None if drain_for is None else self._clock() + drain_for
                if not await self._drained(loop, deadline):
                    await self._abort(BatcherClosedError(f"{self!r} closed: drain timed out"))
        except asyncio.CancelledError:
            self._fail_queued(BatcherClosedError(f"{self!r} closing was cancelled"))
            raise
        finally:
            self._release_threads()

    async def _drained(self, loop: asyncio.AbstractEventLoop, deadline: float | None) -> bool:
        """Wait until the executor and every batch are done; False if ``deadline`` passed."""
        while True:
            executor = self._executor_task
            tasks = [t for t in (executor, *self._running) if t is not None and not t.done()]
            if not tasks:
                return True
            remaining = None if deadline is None else deadline - self._clock()
            if remaining is not None and remaining <= 0:
                return False
            # Waiting does not take the executor's outcome: a crash was already delivered to
            # every pending request as BatcherBrokenError, and is not this caller's error.
            await asyncio.wait(tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)

    async def _abort(self, exc: BaseException) -> None:
        """A bounded close ran out of time: fail everything still pending and stop the work."""
        self._fail_queued(exc)
        tasks = list(self._running)
        for task, batch in self._running.items():
            self._outcomes.fail_batch(batch, exc)
            if batch.job is not None and batch.pool is not None:
                # A shared device serves other batchers: its thread is replaced, not given up.
                batch.pool.abandon(batch.job, replace=batch.shared)
            task.cancel()
        self._wake()
        if tasks:  # let the cancellations land; a function that ignores them is left behind
            await asyncio.wait(tasks, timeout=0)

    def _refuse_foreign_loop(self, loop: asyncio.AbstractEventLoop) -> NoReturn:
        if loop.is_closed():
            self._loop_closed(loop)
            raise BatcherBrokenError(f"{self!r}: its event loop was closed") from self._broken
        raise BatcherLoopError(
            f"{self!r} was called from another event loop than the one that started it"
        )

    def _loop_closed(self, loop: asyncio.AbstractEventLoop) -> None:
        """The batcher's loop was closed under it: nothing can run or resolve there any more."""
        if self._broken is None:
            self._broken = RuntimeError(f"the event loop {loop!r} was closed")
        self._closed = True
        self._open_loop = None
        self._shutdown_workers()

    def _shutdown_workers(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()
            self._threads = None
        if self._pipeline is not None:
            self._pipeline.shutdown()

    def _release_threads(self) -> None:
        """Let the worker threads exit once closed and nothing can use them any more."""
        task = self._executor_task
        if self._closed and not self._running and (task is None or task.done()):
            self._shutdown_workers()

    # -- calls -----------------------------------------------------------------------------------

    async def __call__(
        self, item: InT, *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> OutT:
        """Submit one item and return its result.

        A coroutine: ``await b(x)``, ``asyncio.create_task(b(x))``, ``task_group.start_soon(b,
        x)`` all work. The request is queued when the coroutine starts running; cancelling it
        cancels the request (a queued one never reaches ``fn``). :meth:`submit_nowait` is the
        future-returning twin.

        Args:
            item: one input for ``fn``.
            timeout: seconds until this request's deadline; ``None`` for no deadline; by default
                (:data:`~batchio.DEFAULT`) the batcher's ``timeout`` option.
            priority: an ``int``; higher is served first. Within one priority, the earliest
                deadline goes first (a request without one after those with one), then the
                earliest arrival. See :doc:`scheduling`.

        Raises:
            RequestTimeoutError: the deadline passed first.
            QueueFullError: the queue is full and ``when_full="reject"``.
            BatcherClosedError: the batcher is closed or was never started.
            BatcherBrokenError: the executor died, or its event loop was closed.
            BatcherLoopError: called from another event loop than the one that started it.
            BatchStalledError: the batch ran past ``batch_time_limit``.
            BatchOutputError: ``fn`` returned something that is not one result per input.
            BatchSizeMismatchError: ``fn`` returned the wrong number of results.
            BatchFunctionError: ``fn`` raised a ``BaseException`` that is not an ``Exception``.
            Exception: whatever ``fn`` raised for this request's batch, or put in its slot.
        """
        loop = self._open_loop
        entry: Entry
        if (
            timeout is DEFAULT
            and priority.__class__ is int
            and not priority
            and self._fast
            and _running_loop() is loop is not None
        ):
            # The common case, inlined (one Python call less per request than _enqueue).
            fut = loop.create_future()
            entry = [fut, item, self._clock(), QUEUED]
            self._room.put_fast(entry)
        else:
            entry = self._enqueue(item, timeout, priority)
            fut = entry_future(entry)
        try:
            result: OutT = await fut
        except asyncio.CancelledError:
            if fut.cancelled():  # the caller was cancelled (not: cancelled at delivery)
                self._room.cancel(entry)
            raise
        return result

    submit = __call__

    def submit_nowait(
        self, item: InT, *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> asyncio.Future[OutT]:
        """Submit one item now and return its future: the fast twin of ``await b(item)``.

        The request is queued before this returns, so ``asyncio.gather(b.submit_nowait(x),
        b.submit_nowait(y))`` batches both without creating tasks. Cancelling the future cancels
        the request; such a cancellation is noticed when the request reaches the front of the
        queue (until then its row counts in ``queue_depth`` and toward ``max_queue_size``).
        Same arguments and errors as :meth:`__call__`.
        """
        loop = self._open_loop
        if (
            timeout is DEFAULT
            and priority.__class__ is int
            and not priority
            and self._fast
            and _running_loop() is loop is not None
        ):
            fut = loop.create_future()  # the common case, inlined as in __call__
            self._room.put_fast([fut, item, self._clock(), QUEUED])
            return fut
        entry = self._enqueue(item, timeout, priority)
        return entry_future(entry)

    def _enqueue(self, item: Any, timeout: TimeoutArg, priority: int) -> Entry:
        # Every call that is not the inlined common case: refusals, deadlines, per-call timeouts,
        # priorities, costs.
        loop = self._open_loop
        if loop is None or _running_loop() is not loop:
            self._refuse()
        t = self._timeout if timeout is DEFAULT else check_timeout(timeout)
        p = check_priority(priority)
        cost_fn = self._cost_fn
        cost = 0.0 if cost_fn is None else check_cost(cost_fn(item))
        now = self._clock()
        fut = loop.create_future()
        observers = self._observers
        if t is None and not p and cost_fn is None and not observers:
            entry = [fut, item, now, QUEUED]
            self._room.put_fast(entry)
            return entry
        req = Request(fut, item, None, now)
        req.priority = p
        req.cost = cost
        if observers:
            req.context = capture_all(observers)
        if t is not None:
            req.deadline = now + t  # ranked by it when queued; the timer is armed once admitted
        self._room.put(req)
        if t is not None:
            req.set_deadline(loop, t, self._expire)
        return req

    async def map(
        self, items: Iterable[InT], *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> list[OutT]:
        """Submit several items as one request and return their results, in order.

        The request counts its rows toward ``max_batch_size``; when it is larger than the room
        left in a batch it is split across batches (in order, ahead of later requests). It fails
        as a whole with the first error any of its rows gets. An empty request returns ``[]``.
        Same arguments and errors as :meth:`__call__`.
        """
        req = self._enqueue_map(items, timeout, priority)
        try:
            results: list[OutT] = await req.future
        except asyncio.CancelledError:
            if req.future.cancelled():
                self._room.cancel(req)
            raise
        return results

    def map_nowait(
        self, items: Iterable[InT], *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> asyncio.Future[list[OutT]]:
        """The future-returning twin of :meth:`map` (see :meth:`submit_nowait`)."""
        return self._enqueue_map(items, timeout, priority).future

    def _enqueue_map(self, items: Iterable[InT], timeout: TimeoutArg, priority: int) -> Request:
        loop = self._open_loop
        if loop is None or _running_loop() is not loop:
            self._refuse()
        t = self._timeout if timeout is DEFAULT else check_timeout(timeout)
        p = check_priority(priority)
        rows = list(items)
        cost_fn = self._cost_fn
        costs = None if cost_fn is None else [check_cost(cost_fn(x)) for x in rows]
        req = Request(loop.create_future(), None, rows, self._clock())
        if not rows:
            self._outcomes.accept_empty(req)
            return req
        req.priority = p
        if self._observers:
            req.context = capture_all(self._observers)
        if costs is not None:
            req.costs = costs
            req.cost = sum(costs)
        if t is not None:
            req.deadline = req.enqueued_at + t
        self._room.put(req)
        if t is not None:
            req.set_deadline(loop, t, self._expire)
        return req

    # -- calls from threads and bulk streams ----------------------------------------------------

    def call_sync(self, item: InT, *, timeout: TimeoutArg = DEFAULT, priority: int = 0) -> OutT:
        """Submit one item from a thread other than the batcher's loop and block for its result.

        For code that cannot ``await``: a sync FastAPI endpoint (run in the thread pool), a WSGI
        app, a worker thread, or a sync program whose batcher runs on a background loop (see
        :class:`~batchio.BatcherThread`). Same arguments, results and errors as
        :meth:`__call__`; the request is submitted on the batcher's loop in a copy of the
        calling thread's context (so tracing sees the caller's span). If the waiting thread is
        interrupted (``KeyboardInterrupt``), the request is cancelled before that propagates.

        Raises:
            BatcherLoopError: called on a thread running an event loop (on the batcher's own
                loop it would deadlock: ``await batcher(item)`` there; on another it would
                block that loop), or from the batcher's own batch function (its worker or
                stage threads), which would wait for a slot its own batch holds.
            BatcherClosedError: the batcher is closed or was never started.
            BatcherBrokenError: the batcher's executor died or its loop was closed.
            Exception: anything :meth:`__call__` raises.
        """
        loop = self._sync_loop("call_sync")
        return cast(
            OutT,
            call_from_thread(
                loop,
                lambda: self._enqueue(item, timeout, priority),
                self._room.cancel,
                self._gone,
            ),
        )

    def map_sync(
        self, items: Iterable[InT], *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> list[OutT]:
        """The blocking twin of :meth:`map`, for threads (see :meth:`call_sync`)."""
        rows = list(items)  # here, on the caller's thread: the iterable may not be thread-safe
        loop = self._sync_loop("map_sync")
        return cast(
            "list[OutT]",
            call_from_thread(
                loop,
                lambda: self._enqueue_map(rows, timeout, priority),
                self._room.cancel,
                self._gone,
            ),
        )

    def _sync_loop(self, method: str) -> asyncio.AbstractEventLoop:
        running = _running_loop()
        loop = self._loop
        if running is not None and running is loop:
            raise BatcherLoopError(
                f"{self!r}.{method}() was called on its own event loop's thread, where blocking "
                "for the result would deadlock: use `await batcher(item)` there"
            )
        if running is not None:
            raise BatcherLoopError(
                f"{self!r}.{method}() was called on a thread running another event loop, which "
                "it would block; run it in a worker thread (asyncio.to_thread) instead"
            )
        threads, pipeline = self._threads, self._pipeline
        if (threads is not None and threads.owns_current_thread()) or (
            pipeline is not None and pipeline.owns_current_thread()
        ):
            raise BatcherLoopError(
                f"{self!r}.{method}() was called from its own batch function's thread, which "
                "would wait for a batch slot its own batch holds"
            )
        open_loop = self._open_loop
        if open_loop is None:
            raise self._gone()
        return open_loop

    def _gone(self) -> BaseException:
        """The error for a call from another thread that finds no loop to take it."""
        if self._broken is not None:
            exc = BatcherBrokenError(f"{self!r} is broken")
            exc.__cause__ = self._broken
            return exc
        loop = self._loop
        if loop is not None and loop.is_closed() and not self._closed:
            return BatcherBrokenError(f"{self!r}: its event loop was closed")
        return BatcherClosedError(
            f"{self!r} is not accepting requests"
            + ("" if loop else "; start it first (async with, or batchio.BatcherThread)")
        )

    @overload
    def imap(
        self,
        items: Iterable[InT] | AsyncIterable[InT],
        *,
        ordered: bool = ...,
        max_in_flight: int | None = ...,
        return_exceptions: Literal[False] = ...,
        timeout: TimeoutArg = ...,
        priority: int = ...,
    ) -> AsyncGenerator[OutT, None]: ...

    @overload
    def imap(
        self,
        items: Iterable[InT] | AsyncIterable[InT],
        *,
        ordered: bool = ...,
        max_in_flight: int | None = ...,
        return_exceptions: Literal[True],
        timeout: TimeoutArg = ...,
        priority: int = ...,
    ) -> AsyncGenerator[OutT | Exception, None]: ...

    @overload
    def imap(
        self,
        items: Iterable[InT] | AsyncIterable[InT],
        *,
        ordered: bool = ...,
        max_in_flight: int | None = ...,
        return_exceptions: bool,
        timeout: TimeoutArg = ...,
        priority: int = ...,
    ) -> AsyncGenerator[OutT | Exception, None]: ...

    def imap(
        self,
        items: Iterable[InT] | AsyncIterable[InT],
        *,
        ordered: bool = True,
        max_in_flight: int | None = None,
        return_exceptions: bool = False,
        timeout: TimeoutArg = DEFAULT,
        priority: int = 0,
    ) -> AsyncGenerator[Any, None]:
        """Stream ``items`` through the batcher: an async iterator over their results.

        For bulk jobs and async pipelines (embedding a file of texts, say): each item is its own
        request, at most ``max_in_flight`` of them submitted and not yet consumed, so any number
        of items flows through in constant memory, and the batcher sees enough of them at once
        to fill its batches::

            async for vector in embedder.batcher.imap(lines(path)):
                out.write(vector)

        Inputs are pulled from ``items`` (an iterable, or an async iterable such as another
        stage's output) by a feeder task, as slots free up. Leaving the loop early (``break``,
        an exception, cancellation) cancels what is in flight and withdraws what is queued;
        ``async with contextlib.aclosing(b.imap(...)) as results:`` makes that happen at once
        rather than when the iterator is garbage-collected.

        Args:
            items: the inputs.
            ordered: yield results in input order (the default; a slow item holds back those
                after it, within ``max_in_flight``), or as they complete.
            max_in_flight: how many requests may be submitted and not yet yielded; by default
                ``max_batch_size`` times (``max_concurrent_batches`` + 1), which keeps every
                batch slot busy with a full batch queued behind it, and at most
                ``max_queue_size`` (so a lone stream never overflows a bounded queue).
            return_exceptions: how a failed item is reported. False (the default): its error
                is raised from the iteration, which stops it (and cancels the rest). True: the
                exception instance is yielded in the item's place and the stream goes on, as
                :func:`asyncio.gather` does.
            timeout: each item's deadline, as in :meth:`__call__`.
            priority: each item's priority, as in :meth:`__call__`.

        An error raised by ``items`` itself is raised after the results of the items before it;
        so is a refusal that concerns the batcher rather than an item (``BatcherClosedError``,
        ``BatcherBrokenError``, ``BatcherLoopError``), which ends the stream even with
        ``return_exceptions=True``.
        """
        if max_in_flight is None:
            max_in_flight = self.max_batch_size * (self._concurrency + 1)
            bound = self._options.max_queue_size
            if bound is not None:  # (the feeder may queue them all before a batch is formed)
                max_in_flight = max(1, min(max_in_flight, bound))
        elif type(max_in_flight) is not int or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be a positive int, got {max_in_flight!r}")
        if timeout is not DEFAULT:
            check_timeout(timeout)  # here, not once per item
        check_priority(priority)
        return stream(
            items,
            lambda item: self._enqueue(item, timeout, priority),
            self._room.cancel,
            ordered=ordered,
            max_in_flight=max_in_flight,
            return_exceptions=return_exceptions,
        )

    def _refuse(self) -> NoReturn:
        """Raise the reason this batcher cannot take a request from here, now; queue nothing."""
        if self._broken is not None:
            raise BatcherBrokenError(f"{self!r} is broken") from self._broken
        loop = self._loop
        if loop is not None and loop.is_closed():
            self._refuse_foreign_loop(loop)
        # On its own loop a refused call can only mean closed (or closing, from another thread).
        if self._closed or loop is None or _running_loop() is loop:
            raise BatcherClosedError(
                f"{self!r} is not accepting requests"
                + ("" if loop else "; use it as `async with Batcher(...) as b:`")
            )
        if _running_loop() is None:
            raise BatcherLoopError(f"{self!r} was called outside a running event loop")
        self._refuse_foreign_loop(loop)

    def _expire(self, req: Request) -> None:
        self._outcomes.time_out(req)

    def _fail_queued(self, exc: BaseException) -> None:
        """Fail every request not yet dispatched (close, or a dead executor)."""
        entries = self._room.drain()
        self._outcomes.fail_all(
            [e if type(e) is Request else e[FUT] for e in entries],  # type: ignore[index]
            exc,
        )

    # -- the executor ----------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _executor(self) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        room = self._room
        concurrency = self._concurrency
        clock = self._clock
        sched = self._sched
        while True:
            if room.parked_rows:
                room.admit_parked()
            room.drop_dead_front()  # so the row count and the front below are live
            if self._closed and room.empty:
                return
            decision: Dispatch | Wait
            if not room.rows:
                # Nothing to decide: any policy waits for an arrival (with parked requests, the
                # room the next batch frees wakes it).
                decision = _FOR_ARRIVAL
            else:
                state = sched.last_state = self._state(clock(), concurrency)
                # Read per decision, not once: reconfigure() may have changed it since.
                decision = self._policy.decide(state)
                if isinstance(decision, Dispatch):
                    if self._dispatch(decision, state) or not room.empty or self._closed:
                        # Look again: rows the batch timed out may have made room for parked
                        # ones, or emptied a closing queue (then the executor exits above).
                        continue
                    # A policy that dispatches from an empty queue would spin the loop: wait
                    # for the next arrival instead.
                    decision = _FOR_ARRIVAL
            waiter = self._waiter = loop.create_future()
            wake_at = decision.wake_at_rows
            max_queue = room.max_rows
            if max_queue is not None and room.rows < max_queue:
                # (Not at a queue the policy saw full: waking at once would only ask it again,
                # for ever.)
                if wake_at is not None:
                    wake_at = min(wake_at, max_queue)  # a full queue is as full as it gets
                elif decision.wake_at_cost is not None or decision.deadline is not None:
                    # Waiting for cost, or for time: the queue filling up wakes it too (not
                    # while waiting for a batch slot: a full queue changes nothing then).
                    wake_at = max_queue
            timer = None
            if decision.deadline is not None:
                timer = loop.call_at(decision.deadline, self._wake)
                sched.last_wait = max(0.0, decision.deadline - sched.last_state.now)
            wake_cost = decision.wake_at_cost
            room.wake_at(  # wakes at once if already there
                _INF if wake_at is None else wake_at, _INF if wake_cost is None else wake_cost
            )
            try:
                await waiter
            finally:
                self._waiter = None
                room.wake_at(_INF)
                if timer is not None:
                    timer.cancel()

    def _state(self, now: float, concurrency: int) -> QueueState:
        """What the policy decides from, now."""
        room = self._room
        rate = self._meter.sample(now, room.arrived)
        # The static rule reads none of what is learned: spare gathering it per batch.
        rich = not self._plain_policy
        device_free_at = None
        if rich and self._pipeline is not None:
            device_free_at = now if self._device_until is None else self._device_until
        return QueueState(
            now=now,
            queued_rows=room.rows,
            oldest_enqueued_at=room.oldest_enqueued_at(),
            free_slots=concurrency - self._in_flight,
            closing=self._closed,
            queue_full=room.full,
            in_flight=self._in_flight,
            earliest_deadline=room.earliest_deadline() if rich else None,
            queued_cost=room.cost,
            arrival_rate=rate,
            model=self._learner.model if rich else None,
            pending_batches=self._pending,
            device_free_at=device_free_at,
            lead_time=self._lead,
            recent_latency=self._recent,
        )

    def _dispatch(self, decision: Dispatch, state: QueueState) -> bool:
        """Start the batch ``decision`` asks for; False if there was nothing live to take."""
        rows = max(1, decision.rows)
        now = state.now
        predict = None
        model = self._learner.model if self._options.early_timeout else None
        if model is not None:
            if model.unit == "cost" or self._options.allowed_batch_sizes is None:
                predict = model.predict
            else:  # the model learned padded sizes
                padded = self._padded_size

                def predict(size: float) -> float:
                    return model.predict(padded(math.ceil(size)))

        batch, waits = self._room.take(rows, now, decision.max_cost, predict)
        self._tally.waited(waits)
        if not batch.inputs:
            return False
        sched = self._sched
        reason = decision.reason or type(self._policy).__name__
        sched.last_reason = reason
        sched.reasons[reason] += 1
        self._in_flight += 1
        batch.at = now
        batch.waited = max(waits, default=0.0)
        if self._pipeline is not None:
            batch.pending = True
            self._pending += 1
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        task = loop.create_task(self._run_batch(batch, now))
        self._running[task] = batch
        task.add_done_callback(self._batch_done)
        return True

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        batch = self._running.pop(task, None)
        if batch is not None:  # (cancelled before its first step, its finally never ran)
            self._not_pending(batch)
            self._off_device(batch)
            self._end_flight(batch)
        _consume(task)  # its outcome was delivered to its requests already
        self._wake()
        if self._closed:
            self._release_threads()

    def _end_flight(self, batch: Batch) -> None:
        # At the end of the batch's own run, so a snapshot taken by a caller that has just got
        # its result no longer counts the batch in flight (and the slot is free for the next).
        if not batch.ended:
            batch.ended = True
            self._in_flight -= 1

    def _executor_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            cause: BaseException = asyncio.CancelledError("the batchio executor was cancelled")
        else:
            exc = task.exception()
            if exc is None:  # a clean exit after close() drained the queue
                self._release_threads()
                return
            cause = exc
        if isinstance(cause, asyncio.CancelledError):
            # Typically asyncio.run() tearing down a loop that still had a batcher open.
            _log.debug("batchio executor of %r was cancelled", self)
        else:
            _log.error("batchio executor of %r died", self, exc_info=cause)
        self._break(cause)

    def _break(self, cause: BaseException) -> None:
        """The batcher can no longer run batches: fail everything pending, refuse new calls."""
        if self._broken is None:
            self._broken = cause
        self._closed = True
        self._open_loop = None
        broken = BatcherBrokenError(f"{self!r} broke: {cause!r}")
        broken.__cause__ = cause
        self._fail_queued(broken)
        for batch in self._running.values():
            self._outcomes.fail_batch(batch, broken)
        self._wake()
        self._release_threads()

    # -- running one batch -------------------------------------------------------------------------

    async def _run_batch(self, batch: Batch, dispatched_at: float) -> None:
        """Run ``fn`` on one batch and deliver: the one exception boundary per batch."""
        n = len(batch.inputs)
        isolate = self._options.isolate_errors
        limit = self._options.batch_time_limit
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        delivered = False
        outcomes: Any = None
        error: BaseException | None = None  # the batch-level one, for observers
        try:
            try:
                if self._pipeline is not None:
                    outcomes = await self._pipeline.run(batch, self._stage_job, isolate)
                elif self._is_async:
                    work = call_async(self._fn, batch.inputs, isolate)
                    if limit is None:
                        outcomes = await work
                    else:
                        outcomes = await self._within_limit(batch, loop.create_task(work), limit)
                else:
                    threads = cast(WorkerThreads, self._threads)
                    job = batch.job = threads.run(
                        functools.partial(call_sync, self._fn, isolate=isolate),
                        batch.inputs,
                        notify_start=limit is not None,
                    )
                    batch.pool = threads
                    try:
                        if limit is None:
                            outcomes = await job.future
                        else:
                            outcomes = await self._within_limit(batch, job, limit, threads)
                    finally:
                        if job.finished:  # returned or raised: it took the thread that long
                            batch.service = job.elapsed
            except Exception as exc:
                error = exc
                self._outcomes.fail_batch(batch, exc)
            except BaseException as exc:
                error = exc
                task = asyncio.current_task()
                if isinstance(exc, _PROPAGATE) or (
                    isinstance(exc, asyncio.CancelledError) and task and task.cancelling()
                ):
                    raise  # ours to propagate; `finally` fails the batch's requests
                err = BatchFunctionError(
                    f"the batch function raised {exc!r}, a BaseException that is not an "
                    "Exception; the batch failed, the batcher carries on"
                )
                err.__cause__ = exc
                error = err
                self._outcomes.fail_batch(batch, err)
            else:
                if outcomes is not STALLED:  # a stalled batch was failed already
                    self._outcomes.deliver(batch, outcomes)
            delivered = True
        except _PROPAGATE as exc:
            self._break(exc)
            raise
        finally:
            batch.job = batch.pool = None
            seconds = self._clock() - dispatched_at
            self._tally.batch_ran(n, seconds)
            self._not_pending(batch)
            if not self._plain_policy:  # (only the adaptive, or a custom, policy reads it)
                latency = batch.waited + seconds
                first = self._tally.counts[BATCHES_COUNT] == 1
                self._recent = latency if first else self._recent + 0.2 * (latency - self._recent)
            if self._is_async:
                batch.service = seconds  # no thread to time: the whole call is the bottleneck
            if delivered and outcomes is not STALLED and batch.service >= 0:
                # The run-time model learns from every batch that ran to its end (a failed one
                # too: it took the device as long): the time it kept the bottleneck busy. A
                # staged batch that never reached the device teaches nothing.
                self._learner.add(self._size_of(batch), batch.service)
            if not delivered:
                # Cancellation (loop shutdown, a bounded close) or a bug in delivery: nobody may
                # be left waiting on a batch that will never report.
                broken = BatcherBrokenError(f"{self!r}: batch did not complete")
                self._outcomes.fail_batch(batch, broken)
                error = broken
            if self._observers:
                # What settled the batch, if something failed all of it (a stall, a bounded
                # close, the executor dying), is what its requests got.
                if batch.error is not None:
                    error = batch.error
                failed = n
                if error is None and isinstance(outcomes, list):
                    failed = sum(isinstance(o, BaseException) for o in outcomes)
                report(self._observers, self._name, batch, n, seconds, error, failed)
            self._end_flight(batch)

    def _size_of(self, batch: Batch) -> float:
        """A batch's size as the run-time model counts it: its cost, or the rows fn saw."""
        if self._cost_fn is not None:
            return batch.cost
        return self._padded_size(len(batch.inputs))

    def _off_device(self, batch: Batch) -> None:
        if batch.on_device:
            batch.on_device = False
            self._device_jobs -= 1
            if not self._device_jobs:  # (the next job may have started before we heard)
                self._device_until = None

    def _not_pending(self, batch: Batch) -> None:
        if batch.pending:
            batch.pending = False
            self._pending -= 1
            self._wake()  # the policy may form the next batch now

    def _device_started(self, batch: Batch, started: asyncio.Future[None]) -> None:
        if started.cancelled():
            return
        now = self._clock()
        model = self._learner.model
        self._device_until = now + (model.predict(self._size_of(batch)) if model else 0.0)
        batch.on_device = True
        self._device_jobs += 1
        self._not_pending(batch)

    async def _stage_job(
        self, work: StageWork, fn: Callable[[Any], Any], arg: Any, batch: Batch
    ) -> Any:
        """Run one stage's job for ``batch``: its result, or ``STALLED`` past the time limit."""
        limit = self._options.batch_time_limit
        pool = work.threads  # first: a closed shared device refuses here, before anything runs
        device = work.name == DEVICE
        if device and batch.pending:
            # The lead is the preparation: dispatch until the batch is ready for the device
            # (not until the device takes it, which would count waiting for it too, and make
            # just-in-time dispatch earlier each time it was early).
            self._lead += 0.2 * ((self._clock() - batch.at) - self._lead)
        job = batch.job = work.run(pool, fn, arg, notify_start=device or limit is not None)
        if device and job.started is not None:
            job.started.add_done_callback(functools.partial(self._device_started, batch))
        batch.pool = pool
        batch.shared = work.shared
        try:
            if limit is None:
                return await job.future
            return await self._within_limit(batch, job, limit, pool)
        finally:
            batch.job = batch.pool = None
            if job.finished:  # raised or returned; a stalled (abandoned) job is not counted
                work.record(job)
                if device:
                    batch.service = max(batch.service, 0.0) + job.elapsed
            self._off_device(batch)  # finished, or abandoned: the device is not its any more

    async def _within_limit(
        self,
        batch: Batch,
        work: Job | asyncio.Task[list[Any]],
        limit: float,
        pool: WorkerThreads | None = None,
    ) -> Any:
        """Await ``work`` for at most ``limit`` seconds from when it starts running; past it,
        fail the batch as stalled, abandon the work, and return ``STALLED``."""
        fut = work.future if isinstance(work, Job) else work
        try:
            started = work.started if isinstance(work, Job) else None
            if started is not None and not started.done():
                # Waiting for the thread (behind other jobs, or other batchers' on a shared
                # device) is not running: the limit counts from the start.
                await asyncio.wait([fut, started], return_when=asyncio.FIRST_COMPLETED)
            done, _ = await asyncio.wait([fut], timeout=limit)
        except asyncio.CancelledError:
            if isinstance(work, Job):
                fut.cancel()
            else:
                work.cancel()
            raise
        if done:
            return fut.result()
        self._tally.counts[STALLED_COUNT] += 1
        _log.warning("batchio batch of %r stalled (batch_time_limit=%g s)", self, limit)
        self._outcomes.fail_batch(batch, BatchStalledError(limit))
        if isinstance(work, Job):
            cast(WorkerThreads, pool).abandon(work)
            fut.cancel()
        else:
            work.cancel()  # an async fn that ignores it keeps running, detached from the batch
            self._abandoned_tasks.add(work)
            work.add_done_callback(self._abandoned_tasks.discard)
            work.add_done_callback(_consume)
        return STALLED

    # -- introspection ---------------------------------------------------------------------------

    def statistics(self) -> BatcherStatistics:
        """Return a frozen snapshot of this batcher's counters and timings.

        It changes nothing, so it may be called from any thread (a metrics scraper, say), and
        every snapshot is consistent: ``submitted == completed + failed + cancelled + timed_out +
        pending`` with ``pending >= 0``, even when taken during a burst.
        """
        threads = self._threads
        pipeline = self._pipeline
        stages, busy, abandoned = (
            pipeline.statistics()
            if pipeline is not None
            else ((), None, threads.abandoned if threads is not None else 0)
        )
        return self._tally.snapshot(
            queue_depth=self._room.depth,
            in_flight=self._in_flight,
            healthy=self._broken is None,
            closed=self._closed,
            abandoned_workers=abandoned,
            stages=stages,
            device_busy_fraction=busy,
            scheduler=self._scheduler_statistics(),
        )

    def _scheduler_statistics(self) -> SchedulerStatistics:
        sched = self._sched
        policy = self._policy
        state = sched.last_state
        cap = target = None
        if isinstance(policy, LatencyTarget) and state is not None:
            plan = policy.plan(state)  # pure: safe from any thread
            cap, target = plan.cap, plan.target
        return SchedulerStatistics(
            policy=type(policy).__name__,
            latency_target=self._options.latency_target,
            model=self._learner.model,
            arrival_rate=state.arrival_rate if state is not None else 0.0,
            cap=cap,
            target=target,
            wait=sched.last_wait,
            last_reason=sched.last_reason,
            dispatch_reasons=MappingProxyType(dict(sched.reasons)),
            early_timeouts=self._room.early_timeouts,
            shed=self._room.shed_count,
        )


def _with_padding(fn: Any, options: BatcherOptions) -> Any:
    """``fn``, or, with ``allowed_batch_sizes``, ``fn`` called on batches padded up to them."""
    if options.allowed_batch_sizes is None:
        return fn
    size_for = options.padded_size

    def pad(inputs: list[Any]) -> tuple[list[Any], int]:
        n = len(inputs)
        size = size_for(n)
        return (inputs + [inputs[-1]] * (size - n) if size > n else inputs), size

    if is_async_callable(fn):

        async def padded_async(inputs: list[Any]) -> list[Any]:
            batch, size = pad(inputs)
            return output_rows(await fn(batch), size)[: len(inputs)]

        return padded_async

    def padded(inputs: list[Any]) -> list[Any]:
        batch, size = pad(inputs)
        return output_rows(fn(batch), size)[: len(inputs)]

    return padded
