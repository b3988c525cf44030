"""Request slots and the FIFO request queue.

A request is one ``await batcher(item)`` (one row) or one ``await batcher.map(items)`` (k rows). Its
future is completed at most once: every completion goes through :func:`resolve` or :func:`fail`,
which do nothing when the future is already done (cancelled by its caller, timed out, or failed).

The queue removes dead requests lazily: a request that dies while queued has its undispatched rows
subtracted from the count at once (so sizes and backpressure stay exact) and is skipped when it
reaches the front. A ``map`` request larger than the room left in a batch is split: its first rows go
into this batch and the rest stay at the front of the queue, so FIFO order holds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Final

__all__: list[str] = []

_SINGLE: Final = -1  # Request.offset for a one-row request (it has no items list)


class Request:
    """One caller's request: its inputs, its future and its bookkeeping."""

    __slots__ = (
        "deadline",
        "dispatched",
        "enqueued_at",
        "future",
        "item",
        "items",
        "offset",
        "outstanding",
        "results",
        "timeout",
        "timer",
        "undispatched",
    )

    def __init__(
        self,
        future: asyncio.Future[Any],
        item: Any,
        items: list[Any] | None,
        enqueued_at: float,
    ) -> None:
        self.future = future
        self.item = item
        self.items = items
        self.enqueued_at = enqueued_at
        rows = 1 if items is None else len(items)
        self.undispatched = rows  # rows still in the queue
        self.outstanding = rows  # rows whose results have not come back
        self.offset = _SINGLE if items is None else 0  # next row of `items` to dispatch
        self.results: list[Any] | None = None if items is None else [None] * rows
        self.dispatched = False
        self.deadline: float | None = None
        self.timeout: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    @property
    def rows(self) -> int:
        return 1 if self.items is None else len(self.items)


def resolve(request: Request, value: Any) -> bool:
    """Complete ``request`` with ``value``; return False if it was already done."""
    fut = request.future
    if fut.done():
        return False
    fut.set_result(value)
    if request.timer is not None:
        request.timer.cancel()
    return True


def fail(request: Request, exc: BaseException) -> bool:
    """Fail ``request`` with ``exc``; return False if it was already done."""
    fut = request.future
    if fut.done():
        return False
    fut.set_exception(exc)
    if request.timer is not None:
        request.timer.cancel()
    return True


class Batch:
    """The inputs of one batch and where each row's output goes back to.

    ``requests[i]`` owns the rows ``[starts[i], starts[i] + counts[i])`` of the batch, and those are
    its rows ``[offsets[i], offsets[i] + counts[i])``. When every segment is a one-row request,
    ``offsets`` is ``None`` and ``requests`` lines up with ``inputs`` one to one (the fast path).
    """

    __slots__ = ("counts", "inputs", "offsets", "requests")

    def __init__(self) -> None:
        self.inputs: list[Any] = []
        self.requests: list[Request] = []
        self.offsets: list[int] | None = None
        self.counts: list[int] | None = None

    def __len__(self) -> int:
        return len(self.inputs)


class RequestQueue:
    """A FIFO of requests that counts live, undispatched rows exactly."""

    __slots__ = ("_dq", "rows")

    def __init__(self) -> None:
        self._dq: deque[Request] = deque()
        self.rows = 0

    def push(self, request: Request) -> None:
        self._dq.append(request)
        self.rows += request.undispatched

    def discard(self, request: Request) -> None:
        """Forget a request that died while (part of it was) queued; safe to call at any time."""
        self.rows -= request.undispatched
        request.undispatched = 0

    def oldest_enqueued_at(self) -> float | None:
        dq = self._dq
        while dq and dq[0].undispatched == 0:
            dq.popleft()
        return dq[0].enqueued_at if dq else None

    def drain(self) -> list[Request]:
        """Remove and return every live queued request."""
        live = [r for r in self._dq if r.undispatched]
        for r in live:
            self.discard(r)
        self._dq.clear()
        return live

    def take(self, max_rows: int, now: float) -> tuple[Batch, list[Request], list[float]]:
        """Pop up to ``max_rows`` rows from the front.

        Returns the batch, the requests whose deadline had already passed (not dispatched; the
        caller fails them), and the queue wait of each request that entered the batch.
        """
        batch = Batch()
        inputs = batch.inputs
        requests = batch.requests
        expired: list[Request] = []
        waits: list[float] = []
        dq = self._dq
        room = max_rows
        while room and dq:
            req = dq[0]
            if req.undispatched == 0:
                dq.popleft()
                continue
            if req.deadline is not None and req.deadline <= now:
                dq.popleft()
                self.discard(req)
                expired.append(req)
                continue
            if not req.dispatched:
                req.dispatched = True
                waits.append(now - req.enqueued_at)
            if req.offset == _SINGLE:
                dq.popleft()
                req.undispatched = 0
                self.rows -= 1
                inputs.append(req.item)
                requests.append(req)
                if batch.offsets is not None:
                    assert batch.counts is not None
                    batch.offsets.append(0)
                    batch.counts.append(1)
                room -= 1
                continue
            # A multi-row request: take as many of its rows as fit.
            if batch.offsets is None:
                batch.offsets = [0] * len(requests)
                batch.counts = [1] * len(requests)
            assert batch.counts is not None
            assert req.items is not None
            n = min(room, req.undispatched)
            start = req.offset
            inputs.extend(req.items[start : start + n])
            requests.append(req)
            batch.offsets.append(start)
            batch.counts.append(n)
            req.offset = start + n
            req.undispatched -= n
            self.rows -= n
            room -= n
            if req.undispatched == 0:
                dq.popleft()
        return batch, expired, waits
