"""Requests as the waiting room and the batches see them, and the batch that carries their rows.

Every request is an exact ``asyncio.Future`` the caller awaits (asyncio's C task steps fastest on
exact futures). A plain one-row request without a deadline is a *fast entry*: the list
``[future, item, enqueued_at, state]``, cheaper to build than an object. Anything that needs more
bookkeeping (a ``map`` of several rows, or a deadline) is a :class:`Request`.

Both kinds have one of three states, changed only by the waiting room: ``QUEUED`` (its rows are
counted in the queue), ``PARKED`` (waiting for room, ``when_full="wait"``) and ``GONE`` (no longer
the room's concern: taken into a batch, or dropped). Whether the *caller* is done is the future's
business; the state says only where the rows are.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, TypeAlias

__all__: list[str] = []

QUEUED: Final = 0
PARKED: Final = 1
GONE: Final = 2

# Indexes into a fast entry.
FUT: Final = 0
ITEM: Final = 1
AT: Final = 2
STATE: Final = 3

FastEntry: TypeAlias = "list[Any]"


class Request:
    """A request with bookkeeping: several rows (``map``), a deadline, or both."""

    __slots__ = (
        "bypassed",
        "context",
        "cost",
        "costs",
        "counted",
        "deadline",
        "enqueued_at",
        "future",
        "is_map",
        "item",
        "items",
        "key",
        "offset",
        "outstanding",
        "priority",
        "results",
        "rows",
        "state",
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
        self.is_map = items is not None
        self.enqueued_at = now
        self.rows = rows = 1 if items is None else len(items)  # rows this request asked for
        self.undispatched = rows  # rows not yet taken into a batch
        self.outstanding = rows  # rows whose results have not come back
        self.offset = 0  # the next row of `items` to take
        self.results: list[Any] | None = None if items is None else [None] * rows
        self.deadline: float | None = None
        self.timeout = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.state = QUEUED
        self.counted = False  # its outcome is in the statistics
        self.priority = 0
        # Where it ranks, set by the waiting room: (-priority, deadline or inf, arrival sequence).
        self.key: tuple[int, float, int] | None = None
        self.cost = 0.0  # the cost of its one row, or of the rows not yet taken (a map)
        self.costs: list[float] | None = None  # a map's cost per row, with a cost function
        self.bypassed = 0  # batches that took requests ranked after it while it waited
        self.context: Any = None  # what observers captured when it was submitted

    def set_deadline(self, loop: asyncio.AbstractEventLoop, timeout: float, expire: Any) -> None:
        """Arm the timer that calls ``expire(self)`` ``timeout`` seconds after submission."""
        self.timeout = timeout
        self.deadline = self.enqueued_at + timeout
        self.timer = loop.call_at(self.deadline, expire, self)

    def take(self, room: int) -> tuple[list[Any], int, int]:
        """Take up to ``room`` of the rows still queued: ``(inputs, offset, count)``."""
        start = self.offset
        n = min(room, self.undispatched)
        inputs = self.items[start : start + n] if self.is_map else [self.item]  # type: ignore[index]
        self.offset = start + n
        self.undispatched -= n
        costs = self.costs
        if costs is not None:
            self.cost -= sum(costs[start : start + n])
        return inputs, start, n

    def max_cost(self) -> float:
        """The largest cost among the rows not yet taken."""
        costs = self.costs
        return self.cost if costs is None else max(costs[self.offset :], default=0.0)

    def forget_rows(self) -> int:
        """Drop the rows not yet taken (and the timer); returns how many there were."""
        rows = self.undispatched
        self.undispatched = 0
        self.state = GONE
        self.item = self.items = None  # the inputs are not needed any more: let them go
        self.disarm()
        return rows

    def disarm(self) -> None:
        """Cancel the deadline timer (it holds this request, and its input, until it fires)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def record(self, offset: int, chunk: list[Any]) -> bool:
        """Store the results of rows ``offset..``; True once every row has its result."""
        if self.results is None:
            self.results = chunk
        else:
            self.results[offset : offset + len(chunk)] = chunk
        self.outstanding -= len(chunk)
        return self.outstanding == 0

    def result(self) -> Any:
        """The value the caller gets: its one result, or the list of a ``map``."""
        assert self.results is not None
        return self.results if self.is_map else self.results[0]


Entry: TypeAlias = "FastEntry | Request"
Owner: TypeAlias = "asyncio.Future[Any] | Request"


class Batch:
    """The inputs of one batch and whose they are.

    ``owners[i]`` owns ``counts[i]`` consecutive rows of ``inputs``, starting at row
    ``offsets[i]`` of its request. When every owner is a plain future (one row each), ``simple``
    is true and ``owners`` lines up with ``inputs`` one to one: the fast path.
    """

    __slots__ = (
        "at",
        "cost",
        "counts",
        "ended",
        "error",
        "inputs",
        "job",
        "offsets",
        "on_device",
        "owners",
        "pending",
        "pool",
        "service",
        "settled",
        "shared",
        "simple",
        "waited",
    )

    def __init__(self) -> None:
        self.settled = False  # its requests have been delivered to, or failed, once
        self.ended = False  # its run is over and no longer counted in flight
        self.error: BaseException | None = None  # what failed all of it, if something did
        self.cost = 0.0  # what its rows cost (summed, or padded), with a cost function
        self.at = 0.0  # when it was dispatched
        self.waited = 0.0  # the longest queue wait of its requests
        self.service = -1.0  # seconds its jobs ran on the bottleneck (-1: none ran there)
        self.on_device = False  # its device job has started and not yet been seen to finish
        self.pending = False  # dispatched, and its device job has not started yet (staged)
        self.job: Any = None  # the worker job running it (a sync fn, or a stage), once started
        self.pool: Any = None  # the WorkerThreads running `job`
        self.shared = False  # `pool` is a shared device's: abandoning a job must replace its thread
        self.inputs: list[Any] = []
        self.owners: list[Owner] = []
        self.counts: list[int] = []
        self.offsets: list[int] = []
        self.simple = True

    def add_fast(self, fut: asyncio.Future[Any], item: Any) -> None:
        self.inputs.append(item)
        self.owners.append(fut)
        if not self.simple:
            self.counts.append(1)
            self.offsets.append(0)

    def add_request(self, req: Request, room: int) -> int:
        """Add up to ``room`` of ``req``'s queued rows; returns how many were added."""
        if self.simple:
            self.simple = False
            self.counts = [1] * len(self.owners)
            self.offsets = [0] * len(self.owners)
        inputs, offset, n = req.take(room)
        self.inputs.extend(inputs)
        self.owners.append(req)
        self.counts.append(n)
        self.offsets.append(offset)
        return n


def entry_future(entry: Entry) -> asyncio.Future[Any]:
    """The future the caller of ``entry`` (either kind) awaits."""
    return entry.future if type(entry) is Request else entry[FUT]  # type: ignore[index]
