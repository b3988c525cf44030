"""The one completion point: every request future is settled here, and counted here, exactly once.

Settling is idempotent: a future that is already done (its caller cancelled it, it timed out, the
executor died meanwhile) is left alone, and a cancellation is counted the first time it is
noticed. No other module sets a request's future or touches an outcome counter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any, cast

from ._exceptions import BatchFunctionError, RequestTimeoutError
from ._request import GONE, Batch, Owner, Request
from ._stats import CANCELLED, COMPLETED, FAILED, SUBMITTED, TIMED_OUT, Tally

__all__: list[str] = []


def holdable(exc: BaseException) -> BaseException:
    """``exc``, or a ``RuntimeError`` wrapping it if an asyncio future cannot hold it.

    Futures refuse ``StopIteration`` (it would end the awaiting coroutine instead of being raised
    in it); Python's coroutines convert it the same way. Anything else passes as it is, so the
    batch boundary still sees a ``KeyboardInterrupt`` raised on a worker thread.
    """
    if isinstance(exc, StopIteration):
        wrapped = RuntimeError(f"the batch function raised {exc!r}")
        wrapped.__cause__ = exc
        return wrapped
    return exc


def settleable(exc: BaseException) -> BaseException:
    """``exc`` as a caller may receive it: :func:`holdable`, and a ``BaseException`` that is not
    an ``Exception`` (a ``CancelledError`` or ``KeyboardInterrupt`` a batch function put in a
    slot, say), which would cancel or stop the caller, becomes a
    :class:`~batchio.BatchFunctionError`.
    """
    if isinstance(exc, StopIteration):
        return holdable(exc)
    if not isinstance(exc, Exception):
        wrapped = BatchFunctionError(
            f"the batch function gave {exc!r}, a BaseException that is not an Exception"
        )
        wrapped.__cause__ = exc
        return wrapped
    return exc


class Outcomes:
    """Settles request futures and keeps the outcome counters of one batcher.

    Args:
        tally: the counters to keep.
        forget: drops the rows a request still has in the waiting room (called when a request is
            settled while some of its rows are still queued or parked).
    """

    __slots__ = ("_forget", "tally")

    def __init__(self, tally: Tally, forget: Callable[[Request], None]) -> None:
        self.tally = tally
        self._forget = forget

    # -- one request -------------------------------------------------------------------------------

    def cancelled(self, owner: Owner) -> None:
        """Note that ``owner``'s caller cancelled it (counted once, whoever notices first)."""
        if type(owner) is Request:
            if not owner.counted:
                owner.counted = True
                self.tally.counts[CANCELLED] += 1
            if owner.state != GONE:
                self._forget(owner)
            owner.disarm()
        else:
            self.tally.counts[CANCELLED] += 1

    def fail(self, owner: Owner, exc: BaseException) -> None:
        """Fail one request with ``exc`` (a timeout counts as timed out, anything else failed)."""
        self._settle(owner, False, settleable(exc))

    def complete(self, owner: Owner, value: Any) -> None:
        """Give one request its result."""
        self._settle(owner, True, value)

    def _settle(self, owner: Owner, ok: bool, value: Any) -> None:
        counts = self.tally.counts
        if type(owner) is Request:
            fut = owner.future
            if owner.state != GONE:
                self._forget(owner)  # its rows still queued will never be needed
            owner.disarm()
            if fut.done():
                if fut.cancelled() and not owner.counted:
                    owner.counted = True
                    counts[CANCELLED] += 1
                return
            owner.counted = True
        else:
            fut = cast("asyncio.Future[Any]", owner)
            if fut.done():
                if fut.cancelled():
                    counts[CANCELLED] += 1
                return
        if ok:
            fut.set_result(value)
            counts[COMPLETED] += 1
        else:
            fut.set_exception(value)
            counts[TIMED_OUT if isinstance(value, RequestTimeoutError) else FAILED] += 1

    def accept_empty(self, req: Request) -> None:
        """An empty ``map``: accepted and completed at once, with ``[]``."""
        req.state = GONE
        req.counted = True
        self.tally.counts[SUBMITTED] += 1
        self.tally.counts[COMPLETED] += 1
        req.future.set_result([])

    def time_out(self, req: Request, *, early: bool = False) -> None:
        """``req``'s deadline passed (its timer fired, or a batch formed without it), or, with
        ``early``, its batch is predicted to finish after it."""
        dispatched = req.undispatched < req.rows
        self.fail(req, RequestTimeoutError(req.timeout, dispatched=dispatched, early=early))

    # -- many requests -----------------------------------------------------------------------------

    def fail_all(self, owners: Iterable[Owner], exc: BaseException) -> None:
        """Fail every request in ``owners`` that is not done yet."""
        exc = settleable(exc)
        for owner in owners:
            self._settle(owner, False, exc)

    def fail_batch(self, batch: Batch, exc: BaseException) -> None:
        """Fail every request of ``batch`` not done yet; the batch is then settled for good.

        A plain future carries no "counted" mark, so a batch is settled once: whatever reaches
        it later (its delivery after the executor died, its ``finally`` after a bounded close)
        finds it settled and counts nothing twice.
        """
        if not batch.settled:
            batch.settled = True
            batch.error = exc
            self.fail_all(batch.owners, exc)

    def deliver(self, batch: Batch, outcomes: Sequence[Any]) -> None:
        """Hand each request of ``batch`` its own slice of ``outcomes`` (results or errors)."""
        if batch.settled:
            return
        batch.settled = True
        owners = batch.owners
        if batch.simple and not any(map(isinstance, outcomes, repeat(BaseException))):
            # The fast path: one plain future per row, no errors in slots, one counter update.
            done = cancelled = 0
            for fut, out in zip(cast("list[asyncio.Future[Any]]", owners), outcomes, strict=True):
                try:
                    fut.set_result(out)
                except asyncio.InvalidStateError:
                    if fut.cancelled():
                        cancelled += 1
                    else:  # settled meanwhile (the executor died, or a bounded close)
                        done += 1
            counts = self.tally.counts
            counts[COMPLETED] += len(owners) - cancelled - done
            counts[CANCELLED] += cancelled
            return
        start = 0
        for i, owner in enumerate(owners):
            count = 1 if batch.simple else batch.counts[i]
            chunk = list(outcomes[start : start + count])
            start += count
            error = next((o for o in chunk if isinstance(o, BaseException)), None)
            if error is not None:
                self.fail(owner, error)
            elif type(owner) is not Request:
                self.complete(owner, chunk[0])
            elif owner.future.done():
                self._settle(owner, True, None)  # counts a cancellation once, sets nothing
            elif owner.record(batch.offsets[i], chunk):
                self.complete(owner, owner.result())
