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
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar, cast, final

from ._exceptions import (
    BatcherBrokenError,
    BatcherClosedError,
    BatchSizeMismatchError,
    QueueFullError,
    RequestTimeoutError,
)
from ._policy import BatchPolicy, Dispatch, MaxSizeOrWait, QueueState
from ._queue import Batch, Request, RequestQueue, fail, resolve
from ._stats import BatcherStatistics, StatsRecorder

__all__ = ["AsyncBatchFn", "Batcher", "SyncBatchFn"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")

SyncBatchFn: TypeAlias = Callable[[list[InT]], Sequence[OutT | Exception]]
"""A function from a list of inputs to one result (or ``Exception``) per input, in order."""
AsyncBatchFn: TypeAlias = Callable[[list[InT]], Awaitable[Sequence[OutT | Exception]]]
"""The ``async def`` form of :data:`SyncBatchFn`."""

_log: Final = logging.getLogger("batchio")
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
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
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
        self._queue = RequestQueue()
        self._overflow: deque[Request] = deque()  # accepted, waiting for room (when_full="wait")
        self._stats = StatsRecorder()
        self._running: dict[asyncio.Task[None], Batch] = {}
        self._in_flight = 0
        self._waiter: asyncio.Future[None] | None = None
        self._wake_at_rows: float = _INF
        self._executor_task: asyncio.Task[None] | None = None
        self._threads: ThreadPoolExecutor | None = None
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
        self._loop = loop = asyncio.get_running_loop()
        if not self._is_async:
            self._threads = ThreadPoolExecutor(
                max_workers=self._max_concurrent, thread_name_prefix=f"batchio-{self._name}"
            )
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
                await asyncio.shield(task)
            while self._running:
                await asyncio.shield(asyncio.gather(*self._running, return_exceptions=True))
        except asyncio.CancelledError:
            self._fail_queued(BatcherClosedError(f"{self!r} closing was cancelled"))
            raise
        finally:
            if not self._running and self._threads is not None:
                self._threads.shutdown(wait=False)

    # -- submitting ------------------------------------------------------------------------------

    async def __call__(
        self, item: InT, *, timeout: float | _DefaultTimeout | None = _DEFAULT
    ) -> OutT:
        """Submit one item and return its result (same as :meth:`submit`)."""
        req = self._admit(item, None, timeout)
        try:
            return cast("OutT", await req.future)
        except asyncio.CancelledError:
            self._abandon(req)
            raise

    async def submit(
        self, item: InT, *, timeout: float | _DefaultTimeout | None = _DEFAULT
    ) -> OutT:
        """Submit one item and return its result.

        Args:
            item: one input for ``fn``.
            timeout: seconds until this request's deadline; ``None`` for no deadline; by default
                the batcher's ``timeout``.

        Raises:
            RequestTimeoutError: the deadline passed first.
            QueueFullError: the queue is full and ``when_full="reject"``.
            BatcherClosedError: the batcher is closed or was never started.
            BatcherBrokenError: the executor died.
            Exception: whatever ``fn`` raised for this request's batch, or put in its slot.
        """
        return await self(item, timeout=timeout)

    async def map(
        self, items: Iterable[InT], *, timeout: float | _DefaultTimeout | None = _DEFAULT
    ) -> list[OutT]:
        """Submit several items as one request and return their results, in order.

        The request counts its rows toward ``max_batch_size``; when it is larger than the room
        left in a batch it is split across batches (in order, ahead of later requests). It fails
        as a whole with the first error any of its rows gets. An empty request returns ``[]``.
        """
        rows = list(items)
        req = self._admit(None, rows, timeout)
        try:
            return cast("list[OutT]", await req.future)
        except asyncio.CancelledError:
            self._abandon(req)
            raise

    def _admit(
        self, item: Any, items: list[Any] | None, timeout: float | _DefaultTimeout | None
    ) -> Request:
        """Check the door, build the request and queue it (or park it waiting for room)."""
        loop = self._loop
        if self._broken is not None:
            raise BatcherBrokenError(f"{self!r} is broken") from self._broken
        if self._closed or loop is None:
            raise BatcherClosedError(
                f"{self!r} is not accepting requests"
                + ("" if loop else "; use it as `async with Batcher(...) as b:`")
            )
        if asyncio.get_running_loop() is not loop:
            raise RuntimeError(f"{self!r} belongs to another event loop")
        now = loop.time()
        req = Request(loop.create_future(), item, items, now)
        if items is not None and not items:
            resolve(req, [])
            self._stats.submitted += 1
            self._stats.completed += 1
            return req
        queue = self._queue
        max_queue = self._max_queue
        if max_queue is not None and (self._overflow or queue.rows + req.undispatched > max_queue):
            if not self._wait_for_room or req.undispatched > max_queue:
                self._stats.rejected += 1
                raise QueueFullError(queue.rows, req.undispatched, max_queue)
            self._overflow.append(req)
        else:
            queue.push(req)
            if queue.rows >= self._wake_at_rows:
                self._wake()
        self._stats.submitted += 1
        t = self._default_timeout if isinstance(timeout, _DefaultTimeout) else timeout
        if t is not None:
            req.timeout = t
            req.deadline = now + t
            req.timer = loop.call_at(req.deadline, self._expire, req)
        return req

    def _abandon(self, req: Request) -> None:
        """The caller was cancelled: if that cancelled the request, take it out of the queue."""
        if req.future.cancelled():
            self._stats.cancelled += 1
            self._forget(req)

    def _forget(self, req: Request) -> None:
        """Drop a request that died before all its rows were dispatched."""
        if req.timer is not None:
            req.timer.cancel()
        if req.undispatched:
            if self._overflow and req in self._overflow:
                self._overflow.remove(req)
                req.undispatched = 0
            else:
                self._queue.discard(req)
            self._admit_overflow()

    def _expire(self, req: Request) -> None:
        if fail(req, RequestTimeoutError(cast(float, req.timeout), dispatched=req.dispatched)):
            self._stats.timed_out += 1
            self._forget(req)

    def _fail(self, req: Request, exc: BaseException) -> None:
        if fail(req, exc):
            self._stats.failed += 1
            self._forget(req)

    def _fail_queued(self, exc: BaseException) -> None:
        waiting = list(self._overflow)
        self._overflow.clear()
        for req in waiting:
            req.undispatched = 0
        for req in (*self._queue.drain(), *waiting):
            self._fail(req, exc)

    def _admit_overflow(self) -> None:
        """Move requests waiting for room into the queue, in order, while they fit."""
        overflow = self._overflow
        if not overflow:
            return
        queue = self._queue
        max_queue = cast(int, self._max_queue)
        while overflow and queue.rows + overflow[0].undispatched <= max_queue:
            queue.push(overflow.popleft())
        if queue.rows >= self._wake_at_rows:
            self._wake()

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
            if self._closed and not queue.rows and not self._overflow:
                return
            now = loop.time()
            decision = decide(
                QueueState(
                    now=now,
                    queued_rows=queue.rows,
                    oldest_enqueued_at=queue.oldest_enqueued_at() if queue.rows else None,
                    free_slots=self._max_concurrent - self._in_flight,
                    closing=self._closed,
                )
            )
            if isinstance(decision, Dispatch):
                self._dispatch(max(1, decision.rows), now)
                continue
            waiter = self._waiter = loop.create_future()
            wake_at = decision.wake_at_rows
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

    def _executor_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            cause: BaseException = asyncio.CancelledError("the batchio executor was cancelled")
        else:
            exc = task.exception()
            if exc is None:
                return  # a clean exit after close() drained the queue
            cause = exc
        _log.error("batchio executor of %r died", self, exc_info=cause)
        self._broken = cause
        self._closed = True
        broken = BatcherBrokenError(f"{self!r} executor died: {cause!r}")
        broken.__cause__ = cause
        self._fail_queued(broken)
        for batch in self._running.values():
            for req in batch.requests:
                self._fail(req, broken)
        if not self._running and self._threads is not None:
            self._threads.shutdown(wait=False)

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
                    outcomes = await loop.run_in_executor(
                        self._threads, self._call_sync, batch.inputs
                    )
            except Exception as exc:
                for req in batch.requests:
                    self._fail(req, exc)
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
                for req in batch.requests:
                    self._fail(req, broken)

    def _call_sync(self, inputs: list[Any]) -> Sequence[Any]:
        fn = cast(Callable[[list[Any]], Any], self._fn)
        if not self._isolate:
            return _as_outputs(fn(inputs), len(inputs))
        try:
            return _as_outputs(fn(inputs), len(inputs))
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
            return _as_outputs(await fn(inputs), len(inputs))
        except Exception as exc:
            if len(inputs) == 1:
                return [exc]
            mid = len(inputs) // 2
            return [*await self._call_async(inputs[:mid]), *await self._call_async(inputs[mid:])]

    def _deliver(self, batch: Batch, outcomes: Sequence[Any]) -> None:
        stats = self._stats
        if batch.offsets is None:
            for req, out in zip(batch.requests, outcomes, strict=True):
                if isinstance(out, BaseException):
                    self._fail(req, out)
                elif resolve(req, out):
                    stats.completed += 1
            return
        assert batch.counts is not None
        start = 0
        for req, offset, count in zip(batch.requests, batch.offsets, batch.counts, strict=True):
            chunk = outcomes[start : start + count]
            start += count
            if req.results is None:  # a one-row request
                out = chunk[0]
                if isinstance(out, BaseException):
                    self._fail(req, out)
                elif resolve(req, out):
                    stats.completed += 1
                continue
            if req.future.done():
                continue
            error = next((o for o in chunk if isinstance(o, BaseException)), None)
            if error is not None:
                self._fail(req, error)
                continue
            req.results[offset : offset + count] = chunk
            req.outstanding -= count
            if req.outstanding == 0 and resolve(req, req.results):
                stats.completed += 1

    # -- introspection ---------------------------------------------------------------------------

    def statistics(self) -> BatcherStatistics:
        """Return a frozen snapshot of this batcher's counters and timings."""
        return self._stats.snapshot(
            queue_depth=self._queue.rows + sum(r.undispatched for r in self._overflow),
            in_flight=self._in_flight,
            healthy=self._broken is None,
            closed=self._closed,
        )
