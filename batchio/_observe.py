"""Observers: what a tracing or metrics integration sees of each batch, and the live batchers.

The core knows nothing of OpenTelemetry or Prometheus. An observer is told about each batch once
it has been delivered (:class:`BatchRecord`), and may carry one value per request from the
caller's context to that record (:meth:`BatchObserver.capture`): the current span, typically, so
a batch's span can link to the spans of the requests it carried.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._request import Batch, Request

if TYPE_CHECKING:
    from ._batcher import Batcher

__all__ = ["BatchObserver", "BatchRecord", "live_batchers"]

_log = logging.getLogger("batchio")


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One batch, as observers see it once its requests have their results (or errors).

    Attributes:
        batcher: the batcher's ``name``.
        rows: rows the batch function was given (before padding).
        requests: requests with rows in this batch (a ``map`` split over several batches
            counts in each).
        started_ns: when the batch was dispatched, in ``time.time_ns()`` nanoseconds (what
            tracing APIs take as a span's start).
        ended_ns: when its results were delivered, likewise.
        run: seconds from dispatch to delivery.
        queue_waits: per request, in the order of ``contexts``: seconds from its submission to
            this dispatch. (A request submitted before the observer was added counts the
            batch's longest wait: its own submission time was not kept.)
        contexts: per request: what :meth:`BatchObserver.capture` returned when it was
            submitted; ``None`` for requests submitted before the observer was added.
        first: per request: this batch carries its first row (False for the later parts of a
            ``map`` split over several batches), so a per-request figure such as the queue
            wait is counted once.
        failed: per request: it has got an error (from this batch, or, for a ``map`` whose
            earlier part failed, before).
        error: the batch-level error (the function raised, returned the wrong shape, or
            stalled), or ``None`` when the function returned results, even if some of them
            are per-row exceptions.
        failed_rows: rows whose request got an error from this batch.
    """

    batcher: str
    rows: int
    requests: int
    started_ns: int
    ended_ns: int
    run: float
    queue_waits: tuple[float, ...]
    contexts: tuple[object, ...]
    first: tuple[bool, ...]
    failed: tuple[bool, ...]
    error: BaseException | None
    failed_rows: int


@runtime_checkable
class BatchObserver(Protocol):
    """What :meth:`Batcher.add_observer <batchio.Batcher.add_observer>` accepts.

    Both methods run on the batcher's event loop thread (``capture`` in the caller's context:
    for :meth:`~batchio.Batcher.call_sync`, a copy of the calling thread's) and must be quick:
    they are on the request path. An
    exception from either is logged (logger ``"batchio"``) and otherwise ignored: observing
    never fails a request.
    """

    def capture(self) -> object:
        """Called when a request is submitted, in the caller's context (its contextvars: the
        current span, say); the value comes back in :attr:`BatchRecord.contexts`."""
        ...

    def batch_done(self, record: BatchRecord) -> None:
        """Called once per batch, after its requests were resolved."""
        ...


def capture_all(observers: tuple[BatchObserver, ...]) -> tuple[tuple[BatchObserver, object], ...]:
    """What each of ``observers`` captures for one request, paired with the observer (so a
    record finds its own value even if observers were added or removed meanwhile)."""
    return tuple((o, _capture(o)) for o in observers)


def _capture(observer: BatchObserver) -> object:
    try:
        return observer.capture()
    except Exception:
        _log.exception("batchio observer %r failed to capture a request's context", observer)
        return None


def report(
    observers: tuple[BatchObserver, ...],
    name: str,
    batch: Batch,
    rows: int,
    seconds: float,
    error: BaseException | None,
    failed_rows: int,
) -> None:
    """Tell ``observers`` about ``batch``, ``seconds`` after it was dispatched."""
    ended = time.time_ns()
    started = ended - int(seconds * 1e9)
    waits: list[float] = []
    captured: list[Any] = []
    failed: list[bool] = []
    fut: asyncio.Future[Any]
    for owner in batch.owners:
        if type(owner) is Request:
            waits.append(max(0.0, batch.at - owner.enqueued_at))
            captured.append(owner.context)
            fut = owner.future
        else:  # submitted before any observer was added: nothing was kept
            waits.append(batch.waited)
            captured.append(None)
            fut = owner  # type: ignore[assignment]
        failed.append(fut.done() and not fut.cancelled() and fut.exception() is not None)
    first = (True,) * len(waits) if batch.simple else tuple(o == 0 for o in batch.offsets)
    for observer in observers:
        contexts = tuple(
            next((value for o, value in c if o is observer), None) if c else None for c in captured
        )
        record = BatchRecord(
            batcher=name,
            rows=rows,
            requests=len(batch.owners),
            started_ns=started,
            ended_ns=ended,
            run=seconds,
            queue_waits=tuple(waits),
            contexts=contexts,
            first=first,
            failed=tuple(failed),
            error=error,
            failed_rows=failed_rows,
        )
        try:
            observer.batch_done(record)
        except Exception:
            _log.exception("batchio observer %r failed on a batch of %s", observer, name)


# Every started batcher, weakly, in start order, for exporters that watch them all.
_live: dict[int, weakref.ref[Batcher[Any, Any]]] = {}
_order = itertools.count()


def register(batcher: Batcher[Any, Any]) -> None:
    """Note a batcher that has just started (on its loop's thread)."""
    key = next(_order)
    _live[key] = weakref.ref(batcher, lambda _: _live.pop(key, None))


def live_batchers() -> tuple[Batcher[Any, Any], ...]:
    """Every batcher started in this process and not yet garbage-collected, in start order.

    Closed batchers stay listed (their final counters still count) until they are collected.
    Safe to call from any thread: what a metrics exporter scrapes when it is not given a list.
    """
    refs = _live.copy()  # one atomic step: batchers may start on another thread meanwhile
    found = (ref() for _, ref in sorted(refs.items()))
    return tuple(b for b in found if b is not None)
