"""The Batcher: an asyncio-native queue of awaitable requests and one executor task.

Per request (the hot path) the loop does: create a future, append to a deque, maybe wake the
executor, await. Per batch the executor asks the policy what to do, pops the rows, and starts one
batch task, which runs ``fn`` (on the batcher's own worker thread for a sync ``fn``) and completes
each request's future with its own slice of the results.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from itertools import repeat
from types import TracebackType
from typing import Any, Final, Generic, Literal, NoReturn, TypeAlias, TypeVar, cast, final

from ._exceptions import (
    BatcherBrokenError,
    BatcherClosedError,
    BatchSizeMismatchError,
    QueueFullError,
    RequestTimeoutError,
)
from ._policy import BatchPolicy, Dispatch, MaxSizeOrWait, QueueState
from ._queue import Batch, Entry, Request, RequestQueue, future_of, rows_of
from ._stats import BatcherStatistics, StatsRecorder
from ._worker import WorkerThreads, settleable

__all__ = ["AsyncBatchFn", "Batcher", "SyncBatchFn"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")

SyncBatchFn: TypeAlias = Callable[[list[InT]], Sequence[OutT | Exception]]
"""A function from a list of inputs to one result (or ``Exception``) per input, in order."""
AsyncBatchFn: TypeAlias = Callable[[list[InT]], Awaitable[Sequence[OutT | Exception]]]
"""The ``async def`` form of :data:`SyncBatchFn`."""

_log: Final = logging.getLogger("batchio")
_thread_id: Final = threading.get_ident
_INF: Final = math.inf


class _DefaultTimeout:
    """Marks 'use the batcher's default timeout' in a per-call ``timeout=``."""

    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT: Final = _DefaultTimeout()


def _is_async_callable(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with an async __call__
    )


def _check_timeout(timeout: object) -> None:
    if not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, or None; got {timeout!r}")


def _as_outputs(out: Any, expected: int) -> Sequence[Any]:
    if not isinstance(out, list | tuple):
        out = list(out)
    if len(out) != expected:
        raise BatchSizeMismatchError(expected, len(out))
    return cast("Sequence[Any]", out)


@final
class Batcher(Generic[InT, OutT]):
    """Groups concurrent single-item calls into batches for ``fn`` and hands each caller its result.

    ``fn`` takes a list of inputs and returns a sequence of the same length, in order. A slot may
    hold an ``Exception`` instance instead of a result: that request alone fails with it. A sync
    ``fn`` runs on worker threads owned by this batcher (``max_concurrent_batches`` of them, so one
    by default, and CUDA or thread-local state stays put); an ``async def fn`` is awaited on the
    event loop.

    Use it as an async context manager, which starts the executor and, on exit, stops intake and
    drains the queue::

        async with Batcher(embed_many, max_batch_size=64, max_wait=0.005) as embed:
            vector = await embed("some text")

    Args:
        fn: the batch function.
        max_batch_size: the most rows in one batch.
        max_wait: seconds the oldest queued request may wait for a batch to fill before a partial
            batch is dispatched.
        max_concurrent_batches: batches that may run at once (and worker threads for a sync fn).
        max_queue_size: the most rows that may wait in the queue; ``None`` for no bound.
        when_full: what a submit does when the queue is full: ``"reject"`` raises
            :class:`~batchio.QueueFullError` at once, ``"wait"`` waits (FIFO) for room, within the
            request's timeout.
        timeout: default deadline, in seconds from submission, for each request (``None``: none).
            A request can override it with ``timeout=`` per call.
        isolate_errors: when ``fn`` raises for a batch, re-run it in halves to find the inputs that
            fail, so the other requests still get their results. Costs extra calls of ``fn`` only
            when a batch fails.
        policy: a custom :class:`~batchio.BatchPolicy`; replaces ``max_batch_size``/``max_wait``.
        name: a name for logs, reprs and worker threads.
    """

    __slots__ = (
        "__weakref__",
        "_broken",
        "_clock",
        "_closed",
        "_default_timeout",
        "_executor_task",
        "_fn",
        "_in_flight",
        "_is_async",
        "_isolate",
        "_loop",
        "_max_concurrent",
        "_max_queue",
        "_name",
        "_open_loop",
        "_open_thread",
        "_overflow",
        "_policy",
        "_queue",
        "_running",
        "_stats",
        "_threads",
        "_wait_for_room",
        "_waiter",
        "_wake_at_rows",
    )

    def __init__(
        self,
        fn: SyncBatchFn[InT, OutT] | AsyncBatchFn[InT, OutT],
        *,
        max_batch_size: int = 32,
        max_wait: float = 0.005,
        max_concurrent_batches: int = 1,
        max_queue_size: int | None = None,
        when_full: Literal["reject", "wait"] = "reject",
        timeout: float | None = None,
        isolate_errors: bool = False,
        policy: BatchPolicy | None = None,
        name: str | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if max_concurrent_batches < 1:
            raise ValueError(f"max_concurrent_batches must be >= 1, got {max_concurrent_batches}")
        if max_queue_size is not None and max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1 or None, got {max_queue_size}")
        if when_full not in ("reject", "wait"):
            raise ValueError(f'when_full must be "reject" or "wait", got {when_full!r}')
        if timeout is not None:
            _check_timeout(timeout)
        self._fn = fn
        self._is_async = _is_async_callable(fn)
        self._policy: BatchPolicy = (
            policy if policy is not None else MaxSizeOrWait(max_batch_size, max_wait)
        )
        self._max_concurrent = max_concurrent_batches
        self._max_queue = max_queue_size
        self._wait_for_room = when_full == "wait"
        self._default_timeout = timeout
        self._isolate = isolate_errors
        self._name = name or getattr(fn, "__qualname__", None) or type(fn).__name__
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clock: Callable[[], float] = time.monotonic
        # The loop while the batcher accepts requests; None before start, once closed or broken.
        self._open_loop: asyncio.AbstractEventLoop | None = None
        # The thread running that loop: comparing thread ids is a third of the cost of
        # asyncio.get_running_loop() on the hot path, and one loop runs in one thread.
        self._open_thread = -1
        self._stats = StatsRecorder()
        self._queue = RequestQueue(self._stats)
        self._overflow: deque[Entry] = deque()  # accepted, waiting for room (when_full="wait")
        self._running: dict[asyncio.Task[None], Batch] = {}
        self._in_flight = 0
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at_rows: float = _INF
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
            f"<batchio.Batcher {self._name!r} {state} queued={self._queue.rows} "
            f"in_flight={self._in_flight}>"
        )

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
        self._open_thread = _thread_id()
        # asyncio's own loops define time() as time.monotonic(): calling that C function directly
        # reads the same clock (so call_at deadlines agree) without a Python frame per request.
        base_time = asyncio.BaseEventLoop.time
        self._clock = time.monotonic if type(loop).time is base_time else loop.time
        if not self._is_async:
            self._threads = WorkerThreads(self._max_concurrent, f"batchio-{self._name}")
        self._executor_task = task = loop.create_task(
            self._executor(), name=f"batchio-executor-{self._name}"
        )
        task.add_done_callback(self._executor_done)

    @property
    def closed(self) -> bool:
        """True once the batcher no longer accepts requests."""
        return self._closed

    @property
    def healthy(self) -> bool:
        """False once the executor has died; every request then fails with BatcherBrokenError."""
        return self._broken is None

    @property
    def max_batch_size(self) -> int:
        """The most rows one batch may hold."""
        return self._policy.max_batch_size

    def close(self) -> None:
        """Stop accepting requests; those already queued are still run (see :meth:`aclose`)."""
        if not self._closed:
            self._closed = True
            self._open_loop = None
            self._wake()

    async def aclose(self, *, cancel_pending: bool = False) -> None:
        """Stop intake, then drain: wait until every accepted request has been resolved.

        With ``cancel_pending=True``, requests still queued fail with
        :class:`~batchio.BatcherClosedError` instead of running; batches already running finish
        and deliver. If this call is cancelled while draining, the queued requests are failed the
        same way before the cancellation propagates, so nothing is left waiting.
        """
        self.close()
        if cancel_pending:
            self._fail_queued(BatcherClosedError(f"{self!r} was closed before this request ran"))
        task = self._executor_task
        try:
            if task is not None and not task.done():
                # Wait without taking its outcome: a crash was already delivered to every
                # pending request as BatcherBrokenError, and is not this caller's error.
                await asyncio.shield(asyncio.wait([task]))
            while self._running:
                await asyncio.shield(asyncio.wait(list(self._running)))
        except asyncio.CancelledError:
            self._fail_queued(BatcherClosedError(f"{self!r} closing was cancelled"))
            raise
        finally:
            self._release_threads()

    def _release_threads(self) -> None:
        """Let the worker threads exit once closed and nothing can use them any more."""
        task = self._executor_task
        if (
            self._threads is not None
            and self._closed
            and not self._running
            and (task is None or task.done())
        ):
            self._threads.shutdown()
            self._threads = None

    # -- submitting ------------------------------------------------------------------------------

    def __call__(
        self, item: InT, *, timeout: float | _DefaultTimeout | None = _DEFAULT
    ) -> asyncio.Future[OutT]:
        """Submit one item; await the returned future for its result.

        The request is queued at once, when this is called (not when it is awaited), so
        ``asyncio.gather(b(x), b(y))`` batches both. Cancelling the future, or the task awaiting
        it, cancels the request. :meth:`submit` is the coroutine form of the same call.

        Args:
            item: one input for ``fn``.
            timeout: seconds until this request's deadline; ``None`` for no deadline; by default
                the batcher's ``timeout``.

        Raises (from the call, or from awaiting the future):
            RequestTimeoutError: the deadline passed first.
            QueueFullError: the queue is full and ``when_full="reject"``.
            BatcherClosedError: the batcher is closed or was never started.
            BatcherBrokenError: the executor died.
            RuntimeError: called from another event loop than the one that started the batcher.
            Exception: whatever ``fn`` raised for this request's batch, or put in its slot.
        """
        # The hot path: one exact future, one tuple, one deque append; no frame of our own.
        loop = self._open_loop
        if loop is None or _thread_id() != self._open_thread:
            self._refuse()
        fut = loop.create_future()
        now = self._clock()
        t = self._default_timeout if timeout is _DEFAULT else timeout
        if t is None:
            entry: Entry = (fut, item, now)
        else:
            _check_timeout(t)
            entry = Request(fut, item, None, now)
        queue = self._queue
        if self._max_queue is not None and (self._overflow or queue.rows >= self._max_queue):
            self._park(entry, 1)
        else:
            queue.dq.append(entry)
            queue.rows += 1
            if queue.rows >= self._wake_at_rows:
                self._wake()
        self._stats.submitted += 1
        if t is not None:
            self._set_deadline(entry, t, now)  # type: ignore[arg-type]
        return fut

    async def submit(
        self, item: InT, *, timeout: float | _DefaultTimeout | None = _DEFAULT
    ) -> OutT:
        """Submit one item and return its result: the coroutine form of ``batcher(item)``.

        Use it where a coroutine function is needed, e.g. ``task_group.start_soon(b.submit, x)``.
        Same arguments and errors as :meth:`__call__`.
        """
        return await self(item, timeout=timeout)

    def map(
        self, items: Iterable[InT], *, timeout: float | _DefaultTimeout | None = _DEFAULT
    ) -> asyncio.Future[list[OutT]]:
        """Submit several items as one request; await the returned future for their results.

        The request counts its rows toward ``max_batch_size``; when it is larger than the room
        left in a batch it is split across batches (in order, ahead of later requests). It fails
        as a whole with the first error any of its rows gets. An empty request returns ``[]``.
        Same arguments and errors as :meth:`__call__`.
        """
        loop = self._open_loop
        if loop is None or _thread_id() != self._open_thread:
            self._refuse()
        rows = list(items)
        t = self._default_timeout if timeout is _DEFAULT else timeout
        if t is not None:
            _check_timeout(t)
        fut: asyncio.Future[list[OutT]] = loop.create_future()
        now = loop.time()
        req = Request(fut, None, rows, now)
        if not rows:
            fut.set_result([])
            self._stats.submitted += 1
            self._stats.completed += 1
            return fut
        queue = self._queue
        max_queue = self._max_queue
        if max_queue is not None and (self._overflow or queue.rows + len(rows) > max_queue):
            self._park(req, len(rows))
        else:
            queue.push(req)
            if queue.rows >= self._wake_at_rows:
                self._wake()
        self._stats.submitted += 1
        if t is not None:
            self._set_deadline(req, cast(float, t), now)
        return fut

    def _refuse(self) -> NoReturn:
        """Raise the reason this batcher cannot take a request from here, now."""
        if self._broken is not None:
            raise BatcherBrokenError(f"{self!r} is broken") from self._broken
        if self._closed or self._loop is None:
            raise BatcherClosedError(
                f"{self!r} is not accepting requests"
                + ("" if self._loop else "; use it as `async with Batcher(...) as b:`")
            )
        asyncio.get_running_loop()  # raises "no running event loop" outside async code
        raise RuntimeError(f"{self!r} belongs to another event loop (and thread)")

    def _park(self, entry: Entry, rows: int) -> None:
        """The queue looks full: count it exactly, then queue, reject, or park for room."""
        queue = self._queue
        max_queue = cast(int, self._max_queue)
        queue.purge()
        self._purge_overflow()
        self._admit_overflow()
        if not self._overflow and queue.rows + rows <= max_queue:
            queue.push(entry)
            if queue.rows >= self._wake_at_rows:
                self._wake()
            return
        if not self._wait_for_room or rows > max_queue:
            self._stats.rejected += 1
            raise QueueFullError(queue.rows, rows, max_queue)
        if type(entry) is Request:
            entry.parked = True
        self._overflow.append(entry)
        self._wake()  # the queue is full: the policy dispatches without waiting for max_wait

    def _purge_overflow(self) -> None:
        overflow = self._overflow
        if overflow:
            live = [e for e in overflow if not future_of(e).done()]
            if len(live) != len(overflow):
                for e in overflow:
                    if future_of(e).done():
                        self._note_dead_parked(e)
                self._overflow = deque(live)

    def _note_dead_parked(self, entry: Entry) -> None:
        """A parked entry whose future is done: count a cancellation once; it holds no rows."""
        if type(entry) is tuple:
            self._stats.cancelled += 1
            return
        req = cast(Request, entry)
        req.parked = False
        req.undispatched = 0
        if req.timer is not None:
            req.timer.cancel()
        if not req.counted and req.future.cancelled():
            req.counted = True
            self._stats.cancelled += 1

    def _admit_overflow(self) -> None:
        """Move entries waiting for room into the queue, in order, while they fit."""
        overflow = self._overflow
        if not overflow:
            return
        queue = self._queue
        max_queue = cast(int, self._max_queue)
        purged = False
        while overflow:
            entry = overflow[0]
            if future_of(entry).done():
                overflow.popleft()
                self._note_dead_parked(entry)
                continue
            if queue.rows + rows_of(entry) > max_queue:
                if purged:
                    break
                queue.purge()  # cancelled entries may be holding the room
                purged = True
                continue
            overflow.popleft()
            if type(entry) is Request:
                entry.parked = False
            queue.push(entry)
        if queue.rows >= self._wake_at_rows:
            self._wake()

    def _set_deadline(self, req: Request, timeout: float, now: float) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        req.timeout = timeout
        req.deadline = now + timeout
        req.timer = loop.call_at(req.deadline, self._expire, req)

    def _expire(self, req: Request) -> None:
        """A request's deadline passed (its timer fired, or a batch was forming without it)."""
        fut = req.future
        if fut.done():
            self._note_if_cancelled(req)
            return
        dispatched = req.undispatched < req.rows
        fut.set_exception(RequestTimeoutError(req.timeout, dispatched=dispatched))
        req.counted = True
        self._stats.timed_out += 1
        self._drop_queued(req)

    def _drop_queued(self, req: Request) -> None:
        """Forget the rows of ``req`` still waiting, in the queue or parked for room."""
        if req.timer is not None:
            req.timer.cancel()
        if req.parked:
            self._overflow.remove(req)
            req.parked = False
            req.undispatched = 0
        elif req.undispatched:
            self._queue.discard(req)
        self._admit_overflow()

    def _fail_owner(self, owner: asyncio.Future[Any] | Request, exc: BaseException) -> None:
        """Fail one request of a finished batch (or note that its caller had cancelled)."""
        exc = settleable(exc)
        if type(owner) is Request:
            fut = owner.future
            if not fut.done():
                fut.set_exception(exc)
                self._stats.failed += 1
                owner.counted = True
                self._drop_queued(owner)
            else:
                self._note_if_cancelled(owner)
            return
        fut = cast("asyncio.Future[Any]", owner)
        if not fut.done():
            fut.set_exception(exc)
            self._stats.failed += 1
        elif fut.cancelled():
            self._stats.cancelled += 1

    def _note_if_cancelled(self, req: Request) -> None:
        """``req`` is done: if its caller cancelled it, count that once and drop its queued rows."""
        if req.future.cancelled() and not req.counted:
            req.counted = True
            self._stats.cancelled += 1
            self._drop_queued(req)

    def _fail_queued(self, exc: BaseException) -> None:
        """Fail every request not yet dispatched (close with cancel_pending, or a dead executor)."""
        parked = list(self._overflow)
        self._overflow.clear()
        for entry in (*self._queue.drain(), *parked):
            fut = future_of(entry)
            if type(entry) is Request:
                entry.parked = False
                entry.undispatched = 0
                if entry.timer is not None:
                    entry.timer.cancel()
                if fut.done():
                    if fut.cancelled() and not entry.counted:
                        entry.counted = True
                        self._stats.cancelled += 1
                    continue
                entry.counted = True
            elif fut.done():
                self._stats.cancelled += 1
                continue
            fut.set_exception(exc)
            self._stats.failed += 1

    # -- the executor ----------------------------------------------------------------------------

    def _wake(self) -> None:
        self._wake_at_rows = _INF
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _executor(self) -> None:
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        queue = self._queue
        decide = self._policy.decide
        while True:
            if self._overflow:
                self._admit_overflow()
            # First drop cancelled entries at the front, so the row count below is current.
            oldest = queue.oldest_enqueued_at()
            if self._closed and not queue.rows and not self._overflow:
                return
            now = loop.time()
            decision = decide(
                QueueState(
                    now=now,
                    queued_rows=queue.rows,
                    oldest_enqueued_at=oldest,
                    free_slots=self._max_concurrent - self._in_flight,
                    closing=self._closed,
                    queue_full=self._max_queue is not None
                    and (queue.rows >= self._max_queue or bool(self._overflow)),
                )
            )
            if isinstance(decision, Dispatch):
                self._dispatch(max(1, decision.rows), now)
                continue
            waiter = self._waiter = loop.create_future()
            wake_at = decision.wake_at_rows
            if wake_at is not None and self._max_queue is not None:
                wake_at = min(wake_at, self._max_queue)  # a full queue is as full as it gets
            self._wake_at_rows = _INF if wake_at is None else wake_at
            timer = (
                None if decision.deadline is None else loop.call_at(decision.deadline, self._wake)
            )
            # Rows may have arrived since the policy looked (nothing yields in between, but a
            # policy can ask for fewer rows than are already queued).
            if queue.rows >= self._wake_at_rows:
                self._wake()
            try:
                await waiter
            finally:
                self._waiter = None
                self._wake_at_rows = _INF
                if timer is not None:
                    timer.cancel()

    def _dispatch(self, rows: int, now: float) -> None:
        batch, expired, waits = self._queue.take(rows, now)
        for req in expired:
            self._expire(req)
        self._stats.queue_waits.extend(waits)
        self._admit_overflow()
        if not batch.inputs:
            return
        self._in_flight += 1
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        task = loop.create_task(self._run_batch(batch, now))
        self._running[task] = batch
        task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._in_flight -= 1
        self._wake()
        if self._closed:
            self._release_threads()

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
        self._broken = cause
        self._closed = True
        self._open_loop = None
        broken = BatcherBrokenError(f"{self!r} executor died: {cause!r}")
        broken.__cause__ = cause
        self._fail_queued(broken)
        # Running batches are failed now, so nobody waits; cancellations among them are counted
        # when each batch finishes, as usual.
        for batch in self._running.values():
            for owner in batch.owners:
                fut = owner.future if type(owner) is Request else owner
                if not fut.done():  # type: ignore[union-attr]
                    fut.set_exception(broken)  # type: ignore[union-attr]
                    self._stats.failed += 1
                    if type(owner) is Request:
                        owner.counted = True
        self._release_threads()

    # -- running one batch -------------------------------------------------------------------------

    async def _run_batch(self, batch: Batch, dispatched_at: float) -> None:
        """Run ``fn`` on one batch and deliver: the one exception boundary per batch."""
        n = len(batch.inputs)
        loop = cast(asyncio.AbstractEventLoop, self._loop)
        delivered = False
        try:
            try:
                if self._is_async:
                    outcomes = await self._call_async(batch.inputs)
                else:
                    threads = cast(WorkerThreads, self._threads)
                    outcomes = await threads.run(self._call_sync, batch.inputs)
            except Exception as exc:
                for owner in batch.owners:
                    self._fail_owner(owner, exc)
            else:
                self._deliver(batch, outcomes)
            delivered = True
        finally:
            stats = self._stats
            stats.batches += 1
            stats.rows += n
            stats.histogram[n] += 1
            stats.batch_runs.append(loop.time() - dispatched_at)
            if not delivered:
                # Only a cancellation (loop shutdown) or a bug in delivery gets here: nobody may be
                # left waiting on a batch that will never report.
                broken = BatcherBrokenError(f"{self!r}: batch did not complete")
                for owner in batch.owners:
                    self._fail_owner(owner, broken)

    def _call_sync(self, inputs: list[Any]) -> Sequence[Any]:
        fn = cast(Callable[[list[Any]], Any], self._fn)
        if not self._isolate:
            return _as_outputs(fn(inputs), len(inputs))
        try:
            return _as_outputs(fn(list(inputs)), len(inputs))
        except Exception as exc:
            if len(inputs) == 1:
                return [exc]
            mid = len(inputs) // 2
            return [*self._call_sync(inputs[:mid]), *self._call_sync(inputs[mid:])]

    async def _call_async(self, inputs: list[Any]) -> Sequence[Any]:
        fn = cast(Callable[[list[Any]], Awaitable[Any]], self._fn)
        if not self._isolate:
            return _as_outputs(await fn(inputs), len(inputs))
        try:
            return _as_outputs(await fn(list(inputs)), len(inputs))
        except Exception as exc:
            if len(inputs) == 1:
                return [exc]
            mid = len(inputs) // 2
            return [*await self._call_async(inputs[:mid]), *await self._call_async(inputs[mid:])]

    def _deliver(self, batch: Batch, outcomes: Sequence[Any]) -> None:
        """Hand each request its own slice of the outcomes (results, or errors in slots)."""
        stats = self._stats
        owners = batch.owners
        if batch.simple and not any(map(isinstance, outcomes, repeat(BaseException))):
            # The fast path: one plain future per row and no errors in slots.
            skipped = cancelled = 0
            futures = cast("list[asyncio.Future[Any]]", owners)
            for fut, out in zip(futures, outcomes, strict=True):
                try:
                    fut.set_result(out)
                except asyncio.InvalidStateError:
                    if fut.cancelled():
                        cancelled += 1
                    else:  # failed already (the executor died meanwhile)
                        skipped += 1
            stats.completed += len(owners) - cancelled - skipped
            stats.cancelled += cancelled
            return
        start = 0
        for i, owner in enumerate(owners):
            count = 1 if batch.simple else batch.counts[i]
            chunk = outcomes[start : start + count]
            start += count
            error = next((o for o in chunk if isinstance(o, BaseException)), None)
            if error is not None:
                self._fail_owner(owner, error)
                continue
            if type(owner) is not Request:
                fut = cast("asyncio.Future[Any]", owner)
                if not fut.done():
                    fut.set_result(chunk[0])
                    stats.completed += 1
                elif fut.cancelled():
                    stats.cancelled += 1
                continue
            req = owner
            if req.future.done():  # cancelled, timed out or failed meanwhile
                self._note_if_cancelled(req)
                continue
            if req.results is None:
                req.future.set_result(chunk[0])
            else:
                offset = batch.offsets[i]
                req.results[offset : offset + count] = chunk
                req.outstanding -= count
                if req.outstanding:
                    continue
                req.future.set_result(req.results)
            req.counted = True
            if req.timer is not None:
                req.timer.cancel()
            stats.completed += 1

    # -- introspection ---------------------------------------------------------------------------

    def statistics(self) -> BatcherStatistics:
        """Return a frozen snapshot of this batcher's counters and timings.

        It changes nothing, so it may be called from any thread (a metrics scraper, say).
        Cancelled requests the batcher has not dropped yet are already counted as cancelled.
        """
        queued = cancelled = 0
        # list() copies a deque atomically under the GIL; the scan below reads only the copies.
        for entry in (*list(self._queue.dq), *list(self._overflow)):
            if type(entry) is tuple:
                if entry[0].done():
                    cancelled += 1
                else:
                    queued += 1
                continue
            req = cast(Request, entry)
            if not req.undispatched:
                continue
            if not req.future.done():
                queued += req.undispatched
            elif req.future.cancelled() and not req.counted:
                cancelled += 1
        return self._stats.snapshot(
            queue_depth=queued,
            in_flight=self._in_flight,
            healthy=self._broken is None,
            closed=self._closed,
            uncounted_cancelled=cancelled,
        )
