"""Queue entries, batches and the FIFO request queue.

Every request is an exact ``asyncio.Future`` the caller awaits (asyncio's C task steps fastest on
exact futures). A plain one-row request without a deadline is queued as a ``(future, item,
enqueued_at)`` tuple: nothing else to allocate. A request that needs bookkeeping (a ``map`` of
several rows, or one with a deadline) is queued as a :class:`Request`.

Cancellation is lazy, so the hot path pays nothing for it: a caller's cancellation cancels its
future, and the queue notices when the entry reaches the front (it is skipped, never dispatched)
or when something needs exact counts (:meth:`RequestQueue.purge`, run before rejecting a request,
parking one, or taking statistics). Each dead entry is counted exactly once, when it is dropped.

A ``map`` request larger than the room left in a batch is split: its first rows go into this
batch and the rest stay at the front of the queue, so FIFO order holds.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, TypeAlias

from ._stats import StatsRecorder

__all__: list[str] = []


class Request:
    """A queued request that needs more than a tuple: several rows, or a deadline."""

    __slots__ = (
        "counted",
        "deadline",
        "enqueued_at",
        "future",
        "item",
        "items",
        "offset",
        "outstanding",
        "parked",
        "results",
        "timeout",
        "timer",
        "undispatched",
    )

    def __init__(
        self, future: asyncio.Future[Any], item: Any, items: list[Any] | None, now: float
    ) -> None:
        self.future = future
        self.item = item
        self.items = items  # None for a one-row request
        self.enqueued_at = now
        rows = 1 if items is None else len(items)
        self.undispatched = rows  # rows still queued; 0 once all dispatched or dropped
        self.outstanding = rows  # rows whose results have not come back
        self.offset = 0  # next row of `items` to dispatch
        self.results: list[Any] | None = None if items is None else [None] * rows
        self.deadline: float | None = None
        self.timeout = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.parked = False  # waiting for room (when_full="wait"), not yet in the queue
        self.counted = False  # its outcome has been counted in the statistics

    @property
    def rows(self) -> int:
        return 1 if self.items is None else len(self.items)


Entry: TypeAlias = "tuple[asyncio.Future[Any], Any, float] | Request"


def future_of(entry: Entry) -> asyncio.Future[Any]:
    return entry[0] if type(entry) is tuple else entry.future  # type: ignore[union-attr]


def rows_of(entry: Entry) -> int:
    return 1 if type(entry) is tuple else entry.undispatched  # type: ignore[union-attr]


class Batch:
    """The inputs of one batch and whose they are.

    ``owners[i]`` owns ``counts[i]`` consecutive rows of ``inputs`` (its rows starting at
    ``offsets[i]``). When every owner is a plain one-row future, ``simple`` is true and ``owners``
    lines up with ``inputs`` one to one (the fast path).
    """

    __slots__ = ("counts", "inputs", "offsets", "owners", "simple")

    def __init__(self) -> None:
        self.inputs: list[Any] = []
        self.owners: list[asyncio.Future[Any] | Request] = []
        self.counts: list[int] = []
        self.offsets: list[int] = []
        self.simple = True


class RequestQueue:
    """A FIFO of entries and the count of their queued rows (dead entries count until dropped)."""

    __slots__ = ("dq", "rows", "stats")

    def __init__(self, stats: StatsRecorder) -> None:
        self.dq: deque[Entry] = deque()
        self.rows = 0
        self.stats = stats

    def push(self, entry: Entry) -> None:
        self.dq.append(entry)
        self.rows += rows_of(entry)

    def note_cancelled(self, request: Request) -> None:
        """Count a cancelled ``Request`` once, and drop whatever of it is still queued."""
        self.rows -= request.undispatched
        request.undispatched = 0
        if request.timer is not None:  # it holds the request (and its input) until it fires
            request.timer.cancel()
        if not request.counted:
            request.counted = True
            self.stats.cancelled += 1

    def discard(self, request: Request) -> None:
        """Forget the queued rows of a request that was failed while queued."""
        self.rows -= request.undispatched
        request.undispatched = 0

    def purge(self) -> None:
        """Drop dead entries now, so ``rows`` is exact (O(queue); not on the hot path)."""
        live: deque[Entry] = deque()
        for entry in self.dq:
            if type(entry) is tuple:
                if entry[0].done():
                    self.rows -= 1
                    self.stats.cancelled += 1
                    continue
            elif entry.undispatched == 0:  # type: ignore[union-attr]
                continue
            elif entry.future.done():  # type: ignore[union-attr]
                self.note_cancelled(entry)  # type: ignore[arg-type]
                continue
            live.append(entry)
        self.dq = live

    def oldest_enqueued_at(self) -> float | None:
        """Arrival time of the oldest live entry (dead entries at the front are dropped)."""
        dq = self.dq
        while dq:
            entry = dq[0]
            if type(entry) is tuple:
                if not entry[0].done():
                    return entry[2]
                self.rows -= 1
                self.stats.cancelled += 1
            elif entry.undispatched and not entry.future.done():  # type: ignore[union-attr]
                return entry.enqueued_at  # type: ignore[union-attr]
            elif entry.undispatched:  # type: ignore[union-attr]
                self.note_cancelled(entry)  # type: ignore[arg-type]
            dq.popleft()
        return None

    def drain(self) -> list[Entry]:
        """Remove and return every live entry."""
        self.purge()
        entries = list(self.dq)
        self.dq.clear()
        self.rows = 0
        return entries

    def take(self, max_rows: int, now: float) -> tuple[Batch, list[Request], list[float]]:
        """Pop up to ``max_rows`` live rows from the front.

        Returns the batch, the requests whose deadline had already passed (popped but not
        dispatched: the caller fails them and discards their rows), and the queue wait of each
        request that entered the batch.
        """
        batch = Batch()
        inputs = batch.inputs
        owners = batch.owners
        expired: list[Request] = []
        waits: list[float] = []
        dq = self.dq
        popleft = dq.popleft
        room = max_rows
        dropped = 0  # tuple entries found cancelled
        while room and dq:
            entry = popleft()
            if type(entry) is tuple:
                fut, item, t = entry
                if fut.done():
                    dropped += 1
                    continue
                inputs.append(item)
                owners.append(fut)
                waits.append(now - t)
                room -= 1
                if not batch.simple:
                    batch.counts.append(1)
                    batch.offsets.append(0)
                continue
            req: Request = entry  # type: ignore[assignment]
            if not req.undispatched:
                continue
            if req.future.done():
                self.note_cancelled(req)
                continue
            if req.deadline is not None and req.deadline <= now:
                expired.append(req)
                continue
            if batch.simple:
                batch.simple = False
                batch.counts = [1] * len(owners)
                batch.offsets = [0] * len(owners)
            start = req.offset
            if start == 0:
                waits.append(now - req.enqueued_at)
            n = min(room, req.undispatched)
            if req.items is None:
                inputs.append(req.item)
            else:
                inputs.extend(req.items[start : start + n])
            owners.append(req)
            batch.counts.append(n)
            batch.offsets.append(start)
            req.offset = start + n
            req.undispatched -= n
            room -= n
            if req.undispatched:
                dq.appendleft(req)  # the rest of a split map request stays at the front
        self.rows -= max_rows - room + dropped
        self.stats.cancelled += dropped
        return batch, expired, waits
