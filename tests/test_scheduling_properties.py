"""Scheduling properties of the waiting room and the policies (issue 9), with Hypothesis.

The waiting room is driven directly, built as ``Batcher`` builds it, with futures from an event
loop that never runs and a clock value handed in as ``now``: no time passes and nothing sleeps.
Requests are built the way ``Batcher._enqueue`` and ``_enqueue_map`` build them (a fast entry for
a plain row; a :class:`Request` for a ``map``, a deadline, a priority or a cost). Each row's input
is ``(request index, row index)``, so every batch says exactly whose rows it took.

A request's rank is ``(-priority, deadline or inf, arrival)``: the order the room promises.
Reconfiguration is checked through a real :class:`Batcher` with a gated batch function.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import pytest
from hypothesis import HealthCheck, example, given, settings, target
from hypothesis import strategies as st

from batchio import (
    Batcher,
    BatcherClosedError,
    Dispatch,
    LatencyTarget,
    MaxSizeOrWait,
    QueueFullError,
    QueueState,
    ReconfigureKw,
    RequestShedError,
    RequestTimeoutError,
    RunTimeModel,
    Wait,
)
from batchio._estimates import RateMeter, RunTimeLearner
from batchio._outcomes import Outcomes
from batchio._request import FUT, PARKED, QUEUED, STATE, Batch, Entry, Request
from batchio._room import WaitingRoom
from batchio._stats import CANCELLED, COMPLETED, FAILED, REJECTED, SUBMITTED, TIMED_OUT, Tally
from batchio.testing import GatedBatchFn, wait_all_tasks_blocked

INF = float("inf")
Rank: TypeAlias = tuple[int, float, int]
RowRank: TypeAlias = tuple[int, float, int, int]
WhenFull: TypeAlias = Literal["reject", "wait", "shed"]

FAST = settings(max_examples=150, deadline=None)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A loop that only makes futures: the room reads and settles them, nothing runs on it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# -- the model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Put:
    """Submit a request: one row (``b(x)``) or a ``map`` of ``len(costs)`` rows."""

    priority: int = 0
    deadline: float | None = None  # seconds after the put (a per-call timeout)
    costs: tuple[float, ...] = (1.0,)
    is_map: bool = False


@dataclass(frozen=True)
class Take:
    """Form a batch, as the executor does after a ``Dispatch``."""

    max_rows: int
    max_cost: float | None = None
    hopeless: float | None = None  # early time-outs: every batch is predicted to take this long
    tidy: bool = True  # admit parked requests and drop the dead front first (the executor does)


@dataclass(frozen=True)
class Cancel:
    """Cancel a request's future; ``report``: its ``await`` reports it (``room.cancel``), else the
    room notices lazily (a ``submit_nowait`` future)."""

    pick: int
    report: bool


@dataclass(frozen=True)
class Expire:
    """A request's deadline timer fires (the clock moves to its deadline)."""

    pick: int


@dataclass(frozen=True)
class Deliver:
    """A running batch returns its results."""

    pick: int


@dataclass(frozen=True)
class Tick:
    seconds: float


Op: TypeAlias = Put | Take | Cancel | Expire | Deliver | Tick


@dataclass(eq=False)
class Call:
    """One accepted request, as the test sees it."""

    index: int  # arrival order
    priority: int
    deadline: float | None
    costs: list[float]
    is_map: bool
    entry: Entry
    taken: int = 0  # rows the test has seen leave in batches

    @property
    def rows(self) -> int:
        return len(self.costs)

    @property
    def rank(self) -> Rank:
        return (-self.priority, INF if self.deadline is None else self.deadline, self.index)

    def row_rank(self, row: int) -> RowRank:
        return (*self.rank, row)

    @property
    def request(self) -> Request | None:
        return self.entry if type(self.entry) is Request else None

    @property
    def future(self) -> asyncio.Future[Any]:
        req = self.request
        return req.future if req is not None else self.entry[FUT]  # type: ignore[index]

    @property
    def state(self) -> int:
        req = self.request
        return req.state if req is not None else int(self.entry[STATE])  # type: ignore[index]

    @property
    def left(self) -> int:
        """Rows not yet taken, as the room counts them."""
        req = self.request
        return req.undispatched if req is not None else 1

    @property
    def live(self) -> bool:
        """Queued (not parked) and its caller still waiting."""
        return self.state == QUEUED and not self.future.done()

    def expected(self) -> Any:
        outs = [("out", (self.index, j)) for j in range(self.rows)]
        return outs if self.is_map else outs[0]


class Harness:
    """A waiting room built the way ``Batcher`` builds it, and the requests it was given."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        max_rows: int | None = None,
        when_full: WhenFull = "reject",
        costed: bool = False,
        padded: bool = False,
        bucket_window: int = 0,
        max_bypass: int = 0,
    ) -> None:
        self.loop = loop
        self.tally = Tally()
        self.outcomes = Outcomes(self.tally, self._forget)
        self.room = WaitingRoom(
            max_rows,
            when_full == "wait",
            self.tally,
            self.outcomes,
            self._wake,
            shed=when_full == "shed",
        )
        self.room.costed = costed
        self.room.padded = padded
        self.room.bucket_window = bucket_window
        self.room.max_bypass = max_bypass
        self.now = 0.0
        self.calls: list[Call] = []
        self.by_index: dict[int, Call] = {}
        self.refused: list[QueueFullError] = []
        self.running: list[Batch] = []
        self.row_seen: Counter[tuple[int, int]] = Counter()
        self._next = 0

    def _forget(self, req: Request) -> None:
        self.room.forget(req)

    def _wake(self) -> None:
        pass

    # -- operations ---------------------------------------------------------------------------

    def put(self, op: Put) -> Call | None:
        """Submit as ``Batcher._enqueue`` / ``_enqueue_map`` do; None if refused."""
        index = self._next
        self._next += 1
        now = self.now
        fut: asyncio.Future[Any] = self.loop.create_future()
        costed = self.room.costed
        is_map = op.is_map or len(op.costs) > 1
        deadline = None if op.deadline is None else now + op.deadline
        entry: Entry
        if not is_map and not costed and op.priority == 0 and deadline is None:
            entry = [fut, (index, 0), now, QUEUED]
        else:
            if is_map:
                req = Request(fut, None, [(index, j) for j in range(len(op.costs))], now)
            else:
                req = Request(fut, (index, 0), None, now)
            req.priority = op.priority
            if costed:
                if is_map:
                    req.costs = list(op.costs)
                    req.cost = sum(op.costs)
                else:
                    req.cost = op.costs[0]
            if deadline is not None:
                req.deadline = deadline
                req.timeout = deadline - now
            entry = req
        call = Call(index, op.priority, deadline, list(op.costs), is_map, entry)
        try:
            if type(entry) is Request:
                self.room.put(entry)
            else:
                self.room.put_fast(entry)  # type: ignore[arg-type]
        except QueueFullError as exc:
            assert not fut.done()
            self.refused.append(exc)
            return None
        self.calls.append(call)
        self.by_index[index] = call
        return call

    def take(
        self,
        max_rows: int,
        max_cost: float | None = None,
        run_time: float | None = None,
        *,
        tidy: bool = True,
    ) -> tuple[Batch, list[tuple[Call, int]]]:
        """Take a batch; returns it with ``(call, row)`` for each of its rows, in order."""
        room = self.room
        if tidy:
            if room.parked_rows:
                room.admit_parked()
            room.drop_dead_front()
        predict = None if run_time is None else (lambda size: run_time)
        batch, _ = room.take(max_rows, self.now, max_cost, predict)
        rows: list[tuple[Call, int]] = []
        for item in batch.inputs:
            i, j = item
            call = self.by_index[i]
            assert j == call.taken, f"request {i}'s rows left out of order"
            call.taken += 1
            self.row_seen[item] += 1
            assert self.row_seen[item] == 1, f"row {item} taken twice"
            rows.append((call, j))
        assert len(rows) <= max_rows
        if not batch.simple:  # the owners' bookkeeping covers the inputs exactly
            assert sum(batch.counts) == len(batch.inputs)
        if batch.inputs:
            self.running.append(batch)
        return batch, rows

    def deliver(self, batch: Batch) -> None:
        if not batch.inputs:
            return  # an empty take: nothing ran
        self.running.remove(batch)
        self.outcomes.deliver(batch, [("out", x) for x in batch.inputs])

    def cancel(self, call: Call, report: bool) -> None:
        call.future.cancel()
        if report:
            self.room.cancel(call.entry)

    def expire(self, call: Call) -> None:
        """The deadline timer fires (``Batcher._expire``)."""
        req = call.request
        assert req is not None
        assert call.deadline is not None
        self.now = max(self.now, call.deadline)
        self.outcomes.time_out(req)

    def close(self) -> None:
        """As at ``aclose``: fail what is queued or parked, then the running batches return."""
        entries = self.room.drain()
        self.outcomes.fail_all(
            [e if type(e) is Request else e[FUT] for e in entries],  # type: ignore[index]
            BatcherClosedError("closed"),
        )
        for batch in list(self.running):
            self.deliver(batch)

    def apply(self, op: Op) -> None:
        """One step of a random interleaving."""
        if isinstance(op, Put):
            self.put(op)
        elif isinstance(op, Take):
            max_cost = op.max_cost if self.room.costed else None
            self.take(op.max_rows, max_cost, op.hopeless, tidy=op.tidy)
        elif isinstance(op, Cancel):
            pending = [c for c in self.calls if not c.future.done()]
            if pending:
                self.cancel(pending[op.pick % len(pending)], op.report)
        elif isinstance(op, Expire):
            timed = [c for c in self.calls if c.deadline is not None and not c.future.done()]
            if timed:
                self.expire(timed[op.pick % len(timed)])
        elif isinstance(op, Deliver):
            if self.running:
                self.deliver(self.running[op.pick % len(self.running)])
        else:
            self.now += op.seconds

    # -- checks -------------------------------------------------------------------------------

    def queued(self) -> list[Call]:
        """Requests with live rows still queued, in no particular order."""
        return [c for c in self.calls if c.live]

    def check_counts(self) -> None:
        """``rows``, ``parked_rows`` and ``cost`` equal the sums over the entries they count."""
        rows = parked = 0
        cost = 0.0
        for c in self.calls:
            state = c.state
            if state in (QUEUED, PARKED):
                # A queued request's caller is still waiting, or cancelled it unnoticed.
                assert not c.future.done() or c.future.cancelled(), c
                assert c.left == c.rows - c.taken, c
            if state == QUEUED:
                rows += c.left
                req = c.request
                cost += 0.0 if req is None else req.cost
            elif state == PARKED:
                parked += c.left
                assert c.taken == 0
        room = self.room
        assert (room.rows, room.parked_rows) == (rows, parked)
        assert room.cost == cost  # integer costs: the sums are exact
        assert room.depth == rows + parked

    def check_settled(self) -> None:
        """After close: every request settled once, with its own result if it completed."""
        counts = self.tally.counts
        assert counts[SUBMITTED] == len(self.calls)
        assert counts[REJECTED] == len(self.refused)
        settled = counts[COMPLETED] + counts[FAILED] + counts[CANCELLED] + counts[TIMED_OUT]
        assert settled == counts[SUBMITTED]
        outcomes: Counter[str] = Counter()
        for c in self.calls:
            fut = c.future
            assert fut.done(), c
            if fut.cancelled():
                outcomes["cancelled"] += 1
                continue
            exc = fut.exception()
            if exc is None:
                outcomes["completed"] += 1
                assert fut.result() == c.expected()
                assert c.taken == c.rows  # every row ran
            elif isinstance(exc, RequestTimeoutError):
                outcomes["timed_out"] += 1
            else:
                assert isinstance(exc, BatcherClosedError | RequestShedError), exc
                outcomes["failed"] += 1
        assert outcomes["completed"] == counts[COMPLETED]
        assert outcomes["timed_out"] == counts[TIMED_OUT]
        assert outcomes["failed"] == counts[FAILED]
        assert outcomes["cancelled"] == counts[CANCELLED]
        assert (self.room.rows, self.room.parked_rows, self.room.cost) == (0, 0, 0.0)


# -- strategies -----------------------------------------------------------------------------------

priorities = st.integers(-2, 2)
deadlines = st.none() | st.integers(1, 6).map(float)
costs = st.lists(st.integers(0, 9).map(float), min_size=1, max_size=4).map(tuple)


def puts(
    *, priority: st.SearchStrategy[int] = priorities, deadline: Any = deadlines
) -> st.SearchStrategy[Put]:
    return st.builds(Put, priority=priority, deadline=deadline, costs=costs, is_map=st.booleans())


takes = st.builds(Take, max_rows=st.integers(1, 6))


def budget_takes() -> st.SearchStrategy[Take]:
    return st.builds(
        Take,
        max_rows=st.integers(1, 6),
        max_cost=st.none() | st.integers(1, 20).map(float),
    )


def ordering_ops(put: st.SearchStrategy[Put] | None = None) -> st.SearchStrategy[list[Op]]:
    return st.lists(st.one_of(puts() if put is None else put, takes), max_size=40)


def drain_rows(h: Harness, max_rows: int = 6) -> list[tuple[Call, int]]:
    """Take until nothing is queued, delivering as it goes; the rows in the order they left."""
    out: list[tuple[Call, int]] = []
    while h.room.rows:
        batch, rows = h.take(max_rows)
        assert rows, "rows are queued but the take formed an empty batch"
        h.deliver(batch)
        out.extend(rows)
    return out


# -- 1 and 2: priorities, then deadlines, then arrival --------------------------------------------


def _check_ranked_take(h: Harness, op: Take) -> list[tuple[Call, int]]:
    before = sum(c.left for c in h.queued())
    _, rows = h.take(op.max_rows, op.max_cost)
    left = [(c, c.taken + k) for c in h.queued() for k in range(c.left)]
    if op.max_cost is None:
        assert len(rows) == min(op.max_rows, before)
    elif before:
        assert rows  # the first row always fits
    # 1: no queued row has a higher priority than a taken one.
    if rows and left:
        assert min(c.priority for c, _ in rows) >= max(c.priority for c, _ in left)
    # 2: the batch is in rank order, and ranks before everything still queued.
    ranks = [c.row_rank(j) for c, j in rows]
    assert ranks == sorted(ranks)
    if rows and left:
        assert max(ranks) < min(c.row_rank(j) for c, j in left)
    return rows


@FAST
@given(ops=ordering_ops(), costed=st.booleans())
def test_priorities_are_never_inverted(
    loop: asyncio.AbstractEventLoop, ops: list[Op], costed: bool
) -> None:
    """Every taken row has a priority >= that of every row still queued, whatever arrived when
    and however the batches were cut (with a cost function too, bucketing off)."""
    h = Harness(loop, costed=costed)
    for op in ops:
        if isinstance(op, Take):
            _, rows = h.take(op.max_rows)
            left = h.queued()
            if rows and left:
                assert min(c.priority for c, _ in rows) >= max(c.priority for c in left)
        else:
            h.apply(op)
        h.check_counts()
    drain_rows(h)
    h.close()
    h.check_settled()


@FAST
@given(
    ops=st.lists(st.one_of(puts(), budget_takes()), max_size=40),
    costed=st.booleans(),
    padded=st.booleans(),
)
def test_rows_leave_in_rank_order_earliest_deadline_first(
    loop: asyncio.AbstractEventLoop, ops: list[Op], costed: bool, padded: bool
) -> None:
    """Within a priority, the earliest deadline leaves first (none last), then the earliest
    arrival: each batch is in rank order and ranks before every row still queued. A cost budget
    only cuts batches shorter, never reorders them."""
    h = Harness(loop, costed=costed, padded=padded)
    for op in ops:
        if isinstance(op, Take):
            _check_ranked_take(h, op if costed else Take(op.max_rows))
        else:
            h.apply(op)
        h.check_counts()
    # What is left drains in rank order too.
    rest = sorted(c.row_rank(c.taken + k) for c in h.queued() for k in range(c.left))
    assert [c.row_rank(j) for c, j in drain_rows(h)] == rest
    h.close()
    h.check_settled()


def test_edf_within_a_priority_and_none_last(loop: asyncio.AbstractEventLoop) -> None:
    """A worked example: priority first, then deadline, then arrival; no deadline ranks last."""
    h = Harness(loop)
    order = [
        Put(),  # 0: plain
        Put(deadline=5.0),  # 1
        Put(deadline=2.0),  # 2
        Put(priority=1),  # 3
        Put(deadline=2.0),  # 4: same deadline as 2, later arrival
        Put(priority=-1, deadline=1.0),  # 5: a low priority with the earliest deadline
        Put(costs=(1.0, 1.0), is_map=True),  # 6: a map, plain
    ]
    for op in order:
        h.put(op)
    left = [(c.index, j) for c, j in drain_rows(h, max_rows=3)]
    assert left == [(3, 0), (2, 0), (4, 0), (1, 0), (0, 0), (6, 0), (6, 1), (5, 0)]


# -- 3: no priorities or deadlines: exactly FIFO, on the fast path ---------------------------------


@FAST
@given(
    ops=ordering_ops(puts(priority=st.just(0), deadline=st.none())),
    tidy=st.booleans(),
)
def test_without_priorities_or_deadlines_the_order_is_fifo(
    loop: asyncio.AbstractEventLoop, ops: list[Op], tidy: bool
) -> None:
    """Rows leave exactly in arrival order, a split ``map``'s rest first in the next batch, every
    batch as full as it may be; and the queue stays the FIFO deque (no heap)."""
    h = Harness(loop)
    arrived: list[tuple[int, int]] = []
    left: list[tuple[int, int]] = []
    for op in ops:
        if isinstance(op, Put):
            call = h.put(op)
            assert call is not None
            arrived.extend((call.index, j) for j in range(call.rows))
        else:
            assert isinstance(op, Take)
            queued = h.room.rows
            batch, rows = h.take(op.max_rows, tidy=tidy)
            assert len(rows) == min(op.max_rows, queued)
            left.extend((c.index, j) for c, j in rows)
            h.deliver(batch)
        assert h.room._heap is None  # the fast path: never ranked
        assert left == arrived[: len(left)]
        h.check_counts()
    left.extend((c.index, j) for c, j in drain_rows(h))
    assert left == arrived
    h.close()
    h.check_settled()


def test_a_split_map_rest_stays_in_front(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop)
    h.put(Put(costs=(1.0,) * 5, is_map=True))
    h.put(Put())
    h.put(Put(costs=(1.0, 1.0), is_map=True))
    got = [[(c.index, j) for c, j in h.take(2)[1]] for _ in range(4)]
    assert got == [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4), (1, 0)], [(2, 0), (2, 1)]]


# -- 4: the cost budget ----------------------------------------------------------------------------


def batch_cost(rows: list[tuple[Call, int]], padded: bool) -> float:
    row_costs = [c.costs[j] for c, j in rows]
    if padded:
        return max(row_costs, default=0.0) * len(row_costs)
    return sum(row_costs)


@FAST
@given(
    ops=st.lists(
        st.one_of(puts(), st.builds(Take, max_rows=st.integers(1, 8))),
        max_size=40,
    ),
    max_cost=st.integers(1, 25).map(float),
    padded=st.booleans(),
    bucket_window=st.sampled_from([0, 0, 2, 4]),
    max_bypass=st.integers(0, 3),
)
def test_a_batch_never_costs_more_than_the_budget_unless_it_is_one_row(
    loop: asyncio.AbstractEventLoop,
    ops: list[Op],
    max_cost: float,
    padded: bool,
    bucket_window: int,
    max_bypass: int,
) -> None:
    """Summed or padded (largest row times rows), a batch's cost is within ``max_cost`` unless it
    holds a single row (the first row of a batch always fits). In strict order the batch stops
    only at the row that would take it over, and ``batch.cost`` is what its rows cost."""
    h = Harness(
        loop, costed=True, padded=padded, bucket_window=bucket_window, max_bypass=max_bypass
    )
    for op in ops:
        if isinstance(op, Take):
            queued = h.queued()
            batch, rows = h.take(op.max_rows, max_cost)
            cost = batch_cost(rows, padded)
            assert batch.cost == cost
            assert cost <= max_cost or len(rows) == 1, (cost, rows)
            if queued:
                assert rows
            if bucket_window == 0 and rows and len(rows) < op.max_rows:
                left = [(c, c.taken) for c in h.queued()]
                if left:  # the next row in rank order would have gone over
                    nxt = min(left, key=lambda cj: cj[0].row_rank(cj[1]))
                    assert batch_cost([*rows, nxt], padded) > max_cost
            h.deliver(batch)
        else:
            h.apply(op)
        h.check_counts()
    h.close()
    h.check_settled()


def test_an_oversized_row_runs_alone(loop: asyncio.AbstractEventLoop) -> None:
    for padded in (False, True):
        h = Harness(loop, costed=True, padded=padded)
        h.put(Put(costs=(50.0,)))
        h.put(Put(costs=(1.0,)))
        h.put(Put(costs=(2.0, 30.0, 1.0), is_map=True))
        sizes = []
        while h.room.rows:
            batch, rows = h.take(8, max_cost=10.0)
            sizes.append([(c.index, j) for c, j in rows])
            h.deliver(batch)
        assert sizes == [[(0, 0)], [(1, 0), (2, 0)], [(2, 1)], [(2, 2)]]


# -- 5: bucketing and its starvation bound ---------------------------------------------------------


# Starvation needs a request that keeps meeting rows unlike it behind newcomers that outrank it:
# bimodal costs and two priorities make that common, and ``target`` steers toward it.
bimodal_puts = st.builds(
    Put,
    priority=st.integers(0, 1),
    deadline=st.none() | st.just(3.0),
    costs=st.lists(st.sampled_from([1.0, 10.0]), min_size=1, max_size=2).map(tuple),
    is_map=st.just(False),
)


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            puts(),
            bimodal_puts,
            bimodal_puts,
            st.builds(Take, max_rows=st.integers(1, 8)),
            st.builds(Take, max_rows=st.integers(2, 3)),
        ),
        max_size=50,
    ),
    bucket_window=st.integers(2, 6),
    max_bypass=st.integers(0, 3),
    padded=st.booleans(),
    max_cost=st.none() | st.integers(5, 30).map(float),
)
def test_no_request_is_passed_over_more_than_max_bypass_times(
    loop: asyncio.AbstractEventLoop,
    ops: list[Op],
    bucket_window: int,
    max_bypass: int,
    padded: bool,
    max_cost: float | None,
) -> None:
    """With bucketing, a request is passed over (a batch takes a request ranked after it while it
    waits, untaken) at most ``max_bypass`` times."""
    h = Harness(
        loop, costed=True, padded=padded, bucket_window=bucket_window, max_bypass=max_bypass
    )
    passed: Counter[int] = Counter()

    def take(max_rows: int) -> Batch:
        waiting = h.queued()
        batch, rows = h.take(max_rows, max_cost)
        taken = {c.index for c, _ in rows}
        if waiting:
            assert rows
            assert rows[0][0].rank == min(c.rank for c in waiting)  # the front goes first
        last = max((c.rank for c, _ in rows), default=None)
        for c in waiting:
            if c.index not in taken and last is not None and last > c.rank:
                passed[c.index] += 1
                assert passed[c.index] <= max_bypass, (c.index, passed[c.index])
        return batch

    for op in ops:
        if isinstance(op, Take):
            h.deliver(take(op.max_rows))
        else:
            h.apply(op)
        h.check_counts()
    while h.room.rows:
        h.deliver(take(4))
    target(float(max(passed.values(), default=0)), label="most passes over one request")
    h.close()
    h.check_settled()


def test_bucketing_pads_less(loop: asyncio.AbstractEventLoop) -> None:
    """Alternating long and short rows: strict order pads every short row to a long one;
    a window of 4 pairs like with like."""

    def padded_total(window: int) -> tuple[float, list[list[int]]]:
        h = Harness(loop, costed=True, padded=True, bucket_window=window, max_bypass=4)
        for k in range(8):
            h.put(Put(costs=(10.0 if k % 2 == 0 else 1.0,)))
        total = 0.0
        shapes: list[list[int]] = []
        while h.room.rows:
            batch, rows = h.take(2)
            total += batch.cost
            shapes.append([c.index for c, _ in rows])
            h.deliver(batch)
        return total, shapes

    strict, strict_shapes = padded_total(0)
    bucketed, bucketed_shapes = padded_total(4)
    assert strict_shapes == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert strict == 80.0
    assert bucketed_shapes[0] == [0, 2]  # like with like
    assert bucketed < strict


def test_a_request_is_passed_over_at_most_max_bypass_times(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A short row behind ever new long rows that outrank it: passed over twice (max_bypass=2),
    then the window closes at it and the next batch takes it."""
    h = Harness(loop, costed=True, padded=True, bucket_window=4, max_bypass=2)
    short = h.put(Put(costs=(1.0,)))
    assert short is not None
    for _ in range(3):
        h.put(Put(priority=1, costs=(10.0,)))  # outranks `short`: the next head
        h.put(Put(costs=(10.0,)))  # ranks after `short`, and pads like the head
        _, rows = h.take(2)
        if short.taken:
            break
        assert short.request is not None
        assert [c.costs[0] for c, _ in rows] == [10.0, 10.0]
    assert short.taken == 1
    assert short.request is not None
    assert short.request.bypassed == 2


def test_a_bypassed_request_closes_the_window(loop: asyncio.AbstractEventLoop) -> None:
    """max_bypass=1: the short row passed over once is taken by the next batch."""
    h = Harness(loop, costed=True, padded=True, bucket_window=4, max_bypass=1)
    for c in (10.0, 1.0, 10.0, 10.0, 10.0):
        h.put(Put(costs=(c,)))
    first = [c.index for c, _ in h.take(2)[1]]
    second = [c.index for c, _ in h.take(2)[1]]
    assert first == [0, 2]  # 1 passed over once
    assert 1 in second


# -- 6: shedding -----------------------------------------------------------------------------------


shed_ops = st.lists(
    st.one_of(
        st.builds(
            Put,
            priority=priorities,
            deadline=deadlines,
            costs=st.lists(st.just(1.0), min_size=1, max_size=3).map(tuple),
            is_map=st.booleans(),
        ),
        takes,
    ),
    max_size=40,
)


# The two cases the first version of shedding got wrong (see the unit tests below), always run.
SHED_FOR_NOTHING = example(
    ops=[Put(priority=0), Put(priority=2), Put(priority=1, costs=(1.0, 1.0), is_map=True)],
    max_rows=2,
)
SHED_PAST_A_PARTLY_RUNNING_REQUEST = example(
    ops=[Put(costs=(1.0, 1.0, 1.0), is_map=True), Take(1), Put(priority=1), Put(priority=2)],
    max_rows=3,
)


def _shed_victims(h: Harness, before: list[Call]) -> list[Call]:
    return [
        c
        for c in before
        if c.future.done()
        and not c.future.cancelled()
        and isinstance(c.future.exception(), RequestShedError)
    ]


@settings(max_examples=200, deadline=None)
@given(ops=shed_ops, max_rows=st.integers(1, 6))
@SHED_FOR_NOTHING
@SHED_PAST_A_PARTLY_RUNNING_REQUEST
def test_shedding_evicts_only_lower_priorities_lowest_ranked_first(
    loop: asyncio.AbstractEventLoop, ops: list[Op], max_rows: int
) -> None:
    """At a full queue a request sheds only queued requests of strictly lower priority, the
    lowest-ranked first and no more than it needs, each failed with RequestShedError; with
    nothing lower queued it gets QueueFullError; the row counts stay exact."""
    h = Harness(loop, max_rows=max_rows, when_full="shed")
    for op in ops:
        if not isinstance(op, Put):
            h.apply(op)
            h.check_counts()
            continue
        before = h.queued()
        rows_before = sum(c.left for c in before)
        new_rows = len(op.costs)
        refused = len(h.refused)
        call = h.put(op)
        victims = _shed_victims(h, before)
        h.check_counts()
        if rows_before + new_rows <= max_rows:
            assert call is not None
            assert not victims
            continue
        for v in victims:
            assert v.priority < op.priority
            exc = v.future.exception()
            assert isinstance(exc, RequestShedError)
            assert isinstance(exc, QueueFullError)
            assert (exc.priority, exc.by_priority) == (v.priority, op.priority)
            assert v.taken == 0  # a request partly running is never shed
        # The lowest-ranked first: every lower-priority survivor outranks every victim.
        survivors = [
            c for c in before if c not in victims and c.priority < op.priority and c.taken == 0
        ]
        for v in victims:
            assert all(s.rank < v.rank for s in survivors), (v.index, [s.index for s in survivors])
        if not any(c.priority < op.priority for c in before):
            assert call is None
            assert not victims
        if call is not None:
            shed = sum(v.rows for v in victims)
            assert rows_before - shed + new_rows <= max_rows
            if victims:  # no more than needed: the last one shed was needed
                last = min(victims, key=lambda v: v.rank)
                assert rows_before - (shed - last.rows) + new_rows > max_rows
        else:
            assert len(h.refused) == refused + 1
            assert type(h.refused[-1]) is QueueFullError
    h.close()
    h.check_settled()


@settings(max_examples=200, deadline=None)
@given(ops=shed_ops, max_rows=st.integers(1, 6))
@SHED_FOR_NOTHING
@SHED_PAST_A_PARTLY_RUNNING_REQUEST
def test_shedding_makes_room_or_sheds_nothing(
    loop: asyncio.AbstractEventLoop, ops: list[Op], max_rows: int
) -> None:
    """The exact rule: the requests that may be shed are the queued ones of strictly lower
    priority that are not partly running. If shedding them, the lowest-ranked first, makes room,
    exactly those needed are shed and the newcomer is queued; if it cannot, none is shed and the
    newcomer gets QueueFullError (a request must not fail for a newcomer that is then refused)."""
    h = Harness(loop, max_rows=max_rows, when_full="shed")
    for op in ops:
        if not isinstance(op, Put):
            h.apply(op)
            continue
        before = h.queued()
        new_rows = len(op.costs)
        need = sum(c.left for c in before) + new_rows - max_rows
        sheddable = sorted(
            (c for c in before if c.priority < op.priority and c.taken == 0),
            key=lambda c: c.rank,
            reverse=True,
        )
        expected: list[Call] = []
        freed = 0
        for c in sheddable:
            if freed >= need:
                break
            expected.append(c)
            freed += c.left
        admit = new_rows <= max_rows and freed >= need
        if not admit:
            expected = []
        call = h.put(op)
        victims = _shed_victims(h, before)
        assert (call is not None, sorted(v.index for v in victims)) == (
            admit,
            sorted(c.index for c in expected),
        )
        h.check_counts()
    h.close()
    h.check_settled()


def test_shedding_a_worked_example(loop: asyncio.AbstractEventLoop) -> None:
    h = Harness(loop, max_rows=3, when_full="shed")
    low = h.put(Put())  # 0: priority 0
    mid = h.put(Put(priority=1))
    late_low = h.put(Put())  # ranks after `low`
    assert low is not None
    assert mid is not None
    assert late_low is not None
    high = h.put(Put(priority=2))
    assert high is not None
    err = late_low.future.exception()
    assert isinstance(err, RequestShedError)
    assert (err.priority, err.by_priority) == (0, 2)
    assert not low.future.done()
    assert h.room.shed_count == 1
    assert h.put(Put(priority=0)) is None  # nothing lower than 0 is queued: refused
    assert type(h.refused[-1]) is QueueFullError
    h.check_counts()
    assert h.room.rows == 3


def test_a_refused_request_sheds_nothing(loop: asyncio.AbstractEventLoop) -> None:
    """A request that cannot be admitted even after shedding every lower-priority request it may
    shed must not shed any: the victims would fail for nothing (the first version shed `a`).

    max_rows=2, queued: a (priority 0), b (priority 5); then a 2-row map of priority 3 arrives.
    Shedding `a` frees 1 row, `b` may not be shed, so the map is refused: `a` should survive.
    """
    h = Harness(loop, max_rows=2, when_full="shed")
    a = h.put(Put(priority=0))
    b = h.put(Put(priority=5))
    assert a is not None
    assert b is not None
    assert h.put(Put(priority=3, costs=(1.0, 1.0), is_map=True)) is None  # refused
    assert not a.future.done(), f"a was shed for a request then refused: {a.future.exception()!r}"
    assert h.room.shed_count == 0


def test_a_partly_running_lowest_request_does_not_stop_shedding(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A split map that ranks last is not shed, but a lower-priority request ranked above it
    still may be: the newcomer gets in (the first version stopped at the split map and refused).

    max_rows=3. A 3-row map of priority 0 has one row taken (two queued), then b (priority 1)
    arrives (full), then c (priority 2): b may be shed for c.
    """
    h = Harness(loop, max_rows=3, when_full="shed")
    m = h.put(Put(priority=0, costs=(1.0, 1.0, 1.0), is_map=True))
    assert m is not None
    h.take(1)  # m runs one row; its rest stays queued
    b = h.put(Put(priority=1))
    assert b is not None
    assert h.room.rows == 3
    c = h.put(Put(priority=2))
    assert c is not None, "refused although a lower-priority request (b) could be shed"
    assert isinstance(b.future.exception(), RequestShedError)


def test_a_cancelled_entry_makes_room_before_a_live_one_is_shed(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A queued row whose caller cancelled it (a ``submit_nowait`` future, noticed lazily) is
    dropped to make room before any live request is shed for a newcomer.

    max_rows=2: a (priority 1, live), then b (priority 0) whose future is cancelled; b is not at
    the front, so it still counts. c (priority 2) arrives: dropping b makes room; a should live.
    """
    h = Harness(loop, max_rows=2, when_full="shed")
    a = h.put(Put(priority=1))
    b = h.put(Put(priority=0))
    assert a is not None
    assert b is not None
    h.cancel(b, report=False)
    assert h.put(Put(priority=2)) is not None
    assert not a.future.done(), f"a was shed while a cancelled row held room: {a.future!r}"
    h.check_counts()
    assert (h.room.rows, h.room.shed_count) == (2, 0)


# -- 8: exactly once, and exact bookkeeping, across random interleavings --------------------------

any_ops = st.lists(
    st.one_of(
        puts(),
        st.builds(
            Take,
            max_rows=st.integers(1, 6),
            max_cost=st.none() | st.integers(1, 20).map(float),
            hopeless=st.none() | st.integers(0, 4).map(float),
            tidy=st.booleans(),
        ),
        st.builds(Cancel, pick=st.integers(0, 50), report=st.booleans()),
        st.builds(Expire, pick=st.integers(0, 50)),
        st.builds(Deliver, pick=st.integers(0, 10)),
        st.builds(Tick, seconds=st.sampled_from([0.5, 1.0, 2.0])),
    ),
    max_size=60,
)


@settings(max_examples=250, deadline=None)
@given(
    ops=any_ops,
    max_rows=st.none() | st.integers(1, 8),
    when_full=st.sampled_from(["reject", "wait", "shed"]),
    costed=st.booleans(),
    padded=st.booleans(),
    bucket_window=st.sampled_from([0, 3]),
    max_bypass=st.integers(0, 2),
)
def test_every_request_settles_once_and_the_counts_stay_exact(
    loop: asyncio.AbstractEventLoop,
    ops: list[Op],
    max_rows: int | None,
    when_full: WhenFull,
    costed: bool,
    padded: bool,
    bucket_window: int,
    max_bypass: int,
) -> None:
    """Puts, takes, deliveries, cancellations (reported or lazy), time-outs (timer, at a take,
    early) and shedding in any order: ``rows``, ``parked_rows`` and ``cost`` always equal the
    sums over the entries they count, no row is taken twice, and at close every request has
    settled exactly once (counted once), a completed one with its own results."""
    h = Harness(
        loop,
        max_rows=max_rows,
        when_full=when_full,
        costed=costed,
        padded=padded,
        bucket_window=bucket_window if costed else 0,
        max_bypass=max_bypass,
    )
    for op in ops:
        h.apply(op)
        h.check_counts()
    h.close()
    h.check_settled()


# -- 7: reconfiguration through a real batcher -----------------------------------------------------


@dataclass(frozen=True)
class Submit:
    priority: int
    timeout: float | None  # an hour and more: ranks by deadline, never expires in the test
    rows: int  # 0: a plain call; k >= 1: a map of k rows


@dataclass(frozen=True)
class Reconf:
    changes: dict[str, Any] = field(default_factory=dict)


reconf_changes = st.fixed_dictionaries(
    {},
    optional={
        "max_batch_size": st.integers(1, 6),
        "max_wait": st.sampled_from([0.0, 0.001]),
        "latency_target": st.none() | st.sampled_from([0.05, 1.0, 60.0]),
        "max_queue_size": st.none() | st.integers(1, 12),
    },
)
batcher_ops = st.lists(
    st.one_of(
        st.builds(
            Submit,
            priority=st.integers(-1, 2),
            timeout=st.none() | st.sampled_from([3600.0, 3700.0, 3800.0]),
            rows=st.integers(0, 3),
        ),
        st.builds(Reconf, changes=reconf_changes),
    ),
    min_size=1,
    max_size=25,
)


@pytest.mark.anyio
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=batcher_ops)
async def test_reconfiguration_never_loses_or_reorders(ops: list[Submit | Reconf]) -> None:
    """Requests queued behind a running batch, with ``reconfigure`` calls in between: each
    settles once with its own result (or was refused at submission, exactly when the queue was
    full), and the rows reach ``fn`` in rank order (priority, deadline, arrival)."""
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(lambda x: ("out", x), gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0.0) as b:
        first = b.submit_nowait(("first", 0))
        await fn.wait_entered(1)  # it runs; everything else queues behind it
        futures: list[tuple[asyncio.Future[Any], Any]] = []
        ranked: list[tuple[int, float, int, int, Any]] = []
        queued_rows = 0
        bound: int | None = None
        for i, op in enumerate(ops):
            if isinstance(op, Reconf):
                changes: ReconfigureKw = op.changes  # type: ignore[assignment]
                opts = b.reconfigure(**changes)
                bound = opts.max_queue_size
                assert b.statistics().queue_depth == queued_rows  # nothing lost
                continue
            n = max(op.rows, 1)
            full = bound is not None and queued_rows + n > bound
            try:
                if op.rows:
                    items = [(i, j) for j in range(op.rows)]
                    fut: asyncio.Future[Any] = b.map_nowait(
                        items, priority=op.priority, timeout=op.timeout
                    )
                    expected: Any = [("out", x) for x in items]
                else:
                    items = [(i, 0)]
                    fut = b.submit_nowait((i, 0), priority=op.priority, timeout=op.timeout)
                    expected = ("out", (i, 0))
            except QueueFullError:
                assert full
                continue
            assert not full
            queued_rows += n
            futures.append((fut, expected))
            deadline = INF if op.timeout is None else op.timeout
            ranked.extend((-op.priority, deadline, i, j, x) for j, x in enumerate(items))
        await wait_all_tasks_blocked()
        fn.open()
        assert await first == ("out", ("first", 0))
        results = await asyncio.gather(*(f for f, _ in futures))
        assert results == [e for _, e in futures]
        stats = b.statistics()
        assert stats.completed == len(futures) + 1
        assert (stats.failed, stats.cancelled, stats.timed_out, stats.queue_depth) == (0, 0, 0, 0)
    after = [x for batch in fn.batches[1:] for x in batch]
    assert after == [r[4] for r in sorted(ranked)]
    assert sum(map(len, fn.batches)) == 1 + len(ranked)  # each row ran once


# -- the learned estimates -------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    a=st.floats(0.0, 1.0),
    b=st.floats(1e-4, 1.0),
    sizes=st.lists(st.integers(1, 64), min_size=2, max_size=30).filter(
        lambda s: max(s) >= 2 * min(s)
    ),
)
def test_the_learner_recovers_an_exact_linear_run_time(
    a: float, b: float, sizes: list[int]
) -> None:
    learner = RunTimeLearner()
    for n in sizes:
        model = learner.observe(n, a + b * n)
    assert model is not None
    assert model is learner.model
    assert model.samples == len(sizes)
    assert model.unit == "rows"
    assert math.isclose(model.slope, b, rel_tol=1e-6, abs_tol=1e-9)
    assert math.isclose(model.intercept, a, rel_tol=1e-6, abs_tol=1e-7)
    assert math.isclose(model.predict(100), a + 100 * b, rel_tol=1e-6, abs_tol=1e-6)


def test_the_learner_is_proportional_while_it_sees_one_size() -> None:
    learner = RunTimeLearner("cost")
    for _ in range(5):
        model = learner.observe(4, 0.2)
    assert model is not None
    assert (model.intercept, model.samples, model.unit) == (0.0, 5, "cost")
    assert math.isclose(model.slope, 0.05)


def test_the_learner_clamps_a_negative_slope() -> None:
    """Noise that says bigger batches are faster gives a flat model at the weighted mean."""
    learner = RunTimeLearner(decay=0.5)
    learner.observe(1, 1.0)
    model = learner.observe(10, 0.5)
    assert model is not None
    assert model.slope == 0.0
    assert math.isclose(model.intercept, (0.5 * 1.0 + 0.5) / 1.5)
    assert model.largest_within(10.0) == INF


def test_the_learner_goes_through_the_origin_rather_than_below_it() -> None:
    learner = RunTimeLearner()
    learner.observe(1, 0.0)
    model = learner.observe(10, 1.0)
    assert model is not None
    assert model.intercept == 0.0
    assert model.slope > 0.0


def test_the_learner_ignores_meaningless_observations() -> None:
    learner = RunTimeLearner()
    assert learner.observe(0, 1.0) is None
    assert learner.observe(3, math.nan) is None
    assert learner.observe(3, -1.0) is None
    model = learner.observe(2, 0.1)
    assert learner.observe(math.inf, 0.1) is model


def test_run_time_model_largest_within() -> None:
    m = RunTimeModel(intercept=0.01, slope=0.001, samples=3)
    assert math.isclose(m.largest_within(0.05), 40.0)
    assert m.largest_within(0.005) == 0.0  # not even an empty batch


@settings(max_examples=100, deadline=None)
@given(
    rate=st.floats(0.1, 1e5),
    steps=st.lists(st.floats(0.01, 0.5), min_size=40, max_size=60),
)
def test_the_rate_meter_converges_to_a_constant_rate(rate: float, steps: list[float]) -> None:
    meter = RateMeter(tau=0.5)
    t = 10.0
    assert meter.sample(t, 0.0) == 0.0  # the first sample only sets the origin
    for dt in steps:
        t += dt
        got = meter.sample(t, rate * (t - 10.0))
        assert 0.0 <= got <= rate * (1 + 1e-9)
    if t - 10.0 >= 6.0:  # a dozen time constants
        assert math.isclose(meter.rate, rate, rel_tol=1e-3)
    assert meter.sample(t, 1e12) == meter.rate  # no time passed: no change


# -- the policies ----------------------------------------------------------------------------------

MODEL = RunTimeModel(intercept=0.01, slope=0.001, samples=10)


def qs(
    *,
    now: float = 100.0,
    rows: int = 3,
    oldest: float | None = 100.0,
    free: int = 1,
    closing: bool = False,
    full: bool = False,
    in_flight: int = 0,
    deadline: float | None = None,
    cost: float = 0.0,
    rate: float = 0.0,
    model: RunTimeModel | None = MODEL,
) -> QueueState:
    return QueueState(
        now=now,
        queued_rows=rows,
        oldest_enqueued_at=oldest if rows else None,
        free_slots=free,
        closing=closing,
        queue_full=full,
        in_flight=in_flight,
        earliest_deadline=deadline,
        queued_cost=cost,
        arrival_rate=rate,
        model=model,
    )


POLICY = LatencyTarget(latency_target=0.1, max_batch_size=64)


def test_latency_target_dispatches_at_once_when_idle() -> None:
    d = POLICY.decide(qs(rows=3, in_flight=0, rate=500.0))
    assert isinstance(d, Dispatch)
    assert (d.rows, d.max_cost, d.reason) == (3, None, "idle")


def test_latency_target_waits_for_company_until_latest_while_a_batch_runs() -> None:
    state = qs(rows=2, in_flight=1, rate=500.0)
    plan = POLICY.plan(state)
    assert math.isclose(plan.cap, 40.0)  # (0.05 - 0.01) / 0.001
    assert math.isclose(plan.target, 500 * 0.01 / (1 - 500 * 0.001) * 1.25)  # 12.5
    assert plan.latest is not None
    assert math.isclose(plan.latest, 100.0 + 0.05 - MODEL.predict(plan.target))
    assert POLICY.decide(state) == Wait(deadline=plan.latest, wake_at_rows=13)
    late = POLICY.decide(qs(now=plan.latest, rows=2, in_flight=1, rate=500.0))
    assert isinstance(late, Dispatch)
    assert late.reason == "latency target"
    enough = POLICY.decide(qs(rows=13, in_flight=1, rate=500.0))
    assert isinstance(enough, Dispatch)
    assert enough.reason == "target size"
    assert enough.rows == 13


def test_latency_target_dispatches_a_full_batch_capped() -> None:
    d = POLICY.decide(qs(rows=100, in_flight=1, rate=500.0))
    assert isinstance(d, Dispatch)
    assert (d.rows, d.reason) == (40, "full")


def test_latency_target_latest_respects_the_earliest_deadline() -> None:
    plan = POLICY.plan(qs(rows=2, in_flight=1, rate=500.0, deadline=100.02))
    assert plan.latest is not None
    assert math.isclose(plan.latest, 100.02 - MODEL.predict(plan.target))


@pytest.mark.parametrize(
    ("closing", "full", "reason"),
    [(True, False, "closing"), (False, True, "queue full"), (True, True, "closing")],
)
def test_latency_target_closing_or_full_queue_dispatch(
    closing: bool, full: bool, reason: str
) -> None:
    d = POLICY.decide(qs(rows=2, in_flight=1, rate=500.0, closing=closing, full=full))
    assert isinstance(d, Dispatch)
    assert (d.rows, d.reason) == (2, reason)


def test_latency_target_without_a_model_or_slot() -> None:
    d = POLICY.decide(qs(rows=2, in_flight=1, model=None))
    assert isinstance(d, Dispatch)
    assert d.reason == "no model yet"
    assert d.rows == 2
    assert POLICY.decide(qs(rows=5, free=0, in_flight=1)) == Wait(None, None)
    assert POLICY.decide(qs(rows=0)) == Wait(None, 1)


def test_latency_target_by_cost() -> None:
    model = RunTimeModel(0.01, 0.001, 10, "cost")
    policy = LatencyTarget(latency_target=0.1, max_batch_size=64, max_batch_cost=30.0)
    wait = policy.decide(qs(rows=2, in_flight=1, cost=5.0, rate=500.0, model=model))
    plan = policy.plan(qs(rows=2, in_flight=1, cost=5.0, rate=500.0, model=model))
    assert plan.cap == 30.0  # max_batch_cost bounds the cap
    assert wait == Wait(deadline=plan.latest, wake_at_rows=None, wake_at_cost=plan.target)
    full = policy.decide(qs(rows=2, in_flight=1, cost=30.0, rate=500.0, model=model))
    assert isinstance(full, Dispatch)
    assert (full.max_cost, full.reason) == (30.0, "full")


@settings(max_examples=200, deadline=None)
@given(
    r1=st.floats(1e-3, 2000.0),
    r2=st.floats(1e-3, 2000.0),
    a=st.floats(0.0, 0.05),
    b=st.floats(1e-5, 0.01),
)
def test_latency_target_target_grows_with_the_arrival_rate(
    r1: float, r2: float, a: float, b: float
) -> None:
    """More arrivals per second need larger batches to keep up: the target (and the cap, which
    makes room for it) never shrinks as the rate rises."""
    lo, hi = sorted((r1, r2))
    model = RunTimeModel(a, b, 10)
    p_lo = POLICY.plan(qs(rate=lo, in_flight=1, model=model))
    p_hi = POLICY.plan(qs(rate=hi, in_flight=1, model=model))
    assert p_lo.cap <= p_hi.cap <= POLICY.max_batch_size
    assert 1.0 <= p_lo.target <= p_hi.target
    assert p_lo.target <= p_lo.cap
    assert p_hi.target <= p_hi.cap


def test_latency_target_target_at_a_few_rates() -> None:
    targets = [POLICY.plan(qs(rate=r, in_flight=1)).target for r in (10.0, 100.0, 500.0, 900.0)]
    assert targets == sorted(targets)
    assert math.isclose(targets[2], 12.5)
    assert targets[0] == 1.0  # a trickle: a batch of one keeps up


@settings(max_examples=200, deadline=None)
@given(
    t1=st.floats(1e-3, 10.0),
    t2=st.floats(1e-3, 10.0),
    a=st.floats(0.0, 0.05),
    b=st.floats(1e-5, 0.01),
    rate=st.sampled_from([0.0, 10.0, 100.0]),
)
def test_latency_target_cap_shrinks_as_the_target_tightens(
    t1: float, t2: float, a: float, b: float, rate: float
) -> None:
    tight, loose = sorted((t1, t2))
    model = RunTimeModel(a, b, 10)
    state = qs(model=model, rate=rate, in_flight=1)
    cap_tight = LatencyTarget(tight, 10_000).plan(state).cap
    cap_loose = LatencyTarget(loose, 10_000).plan(state).cap
    assert 1.0 <= cap_tight <= cap_loose <= 10_000


def test_latency_target_cap_at_a_few_targets() -> None:
    caps = [LatencyTarget(t, 64).plan(qs()).cap for t in (0.01, 0.04, 0.1, 1.0)]
    assert caps == [1.0, 10.0, 40.0, 64.0]  # (t/2 - a) / b, at least 1, at most max_batch_size


def test_max_size_or_wait_full_by_cost() -> None:
    policy = MaxSizeOrWait(max_batch_size=8, max_wait=0.01, max_batch_cost=50.0)
    d = policy.decide(qs(rows=2, cost=50.0, model=None))
    assert isinstance(d, Dispatch)
    assert (d.rows, d.max_cost, d.reason) == (2, 50.0, "full")
    assert policy.decide(qs(rows=2, cost=49.0, model=None)) == Wait(
        deadline=100.01, wake_at_rows=8, wake_at_cost=50.0
    )
    overdue = policy.decide(qs(now=100.01, rows=2, cost=1.0, model=None))
    assert isinstance(overdue, Dispatch)
    assert (overdue.max_cost, overdue.reason) == (50.0, "max_wait")
    closing = policy.decide(qs(rows=2, closing=True, model=None))
    assert isinstance(closing, Dispatch)
    assert closing.max_cost == 50.0


def test_the_room_wakes_at_cost(loop: asyncio.AbstractEventLoop) -> None:
    """``Wait.wake_at_cost`` reaches the room: arrivals wake the executor at that cost."""
    wakes: list[None] = []
    tally = Tally()
    room: WaitingRoom

    def forget(r: Request) -> None:
        room.forget(r)

    room = WaitingRoom(None, False, tally, Outcomes(tally, forget), lambda: wakes.append(None))
    room.costed = True
    room.wake_at(INF, 10.0)
    for c in (4.0, 5.0):
        req = Request(loop.create_future(), c, None, 0.0)
        req.cost = c
        room.put(req)
    assert not wakes
    req = Request(loop.create_future(), 1.0, None, 0.0)
    req.cost = 1.0
    room.put(req)
    assert len(wakes) == 1
    assert room.cost == 10.0
