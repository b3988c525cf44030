"""The waiting room: the queue of accepted requests, the requests parked for room, and admission.

The queue is ranked by priority (higher first), then deadline (earliest first; none last), then
arrival. While every new entry ranks after the last one (the usual case: one priority, no
deadlines or one timeout for all) the queue is a plain FIFO deque; the first entry that would
jump ahead turns it into a heap keyed ``(-priority, deadline, arrival)``, which turns back into a
deque once it empties. Either way the entries leave in rank order.

Every change to where a request's rows are goes through an operation here, and each costs O(1)
amortised whatever the queue's length: admission and rejection compare counts, a request that
leaves early (cancelled, timed out, failed) is marked ``GONE`` and its rows uncounted at once, and
its entry is skipped when it reaches the front.

Cancellation through ``await batcher(x)`` is noticed at once (the call's coroutine reports it). A
future from ``submit_nowait`` that its caller cancels is noticed lazily: when it reaches the
front of the queue, when a rejection is about to happen (dead entries at the front are dropped
first), or at close. Until then its row still counts in the queue.
"""

from __future__ import annotations

import bisect
import heapq
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

from ._exceptions import QueueFullError, RequestShedError
from ._request import AT, FUT, GONE, ITEM, PARKED, QUEUED, STATE, Batch, Entry, Request
from ._stats import REJECTED, SUBMITTED, Tally

if TYPE_CHECKING:
    from ._outcomes import Outcomes

__all__: list[str] = []

_INF: Final = float("inf")
_FAST_KEY: Final = (0, _INF)  # the rank of a fast entry: priority 0, no deadline


def _rank(entry: Entry) -> tuple[int, float]:
    if type(entry) is Request:
        d = entry.deadline
        return (-entry.priority, _INF if d is None else d)
    return _FAST_KEY


def _keep_seq(entry: list[Any], seq: int) -> None:
    """Remember a fast entry's place in the heap (its fifth item), to put it back there."""
    if len(entry) > 4:
        entry[4] = seq
    else:
        entry.append(seq)


def _live(entry: Entry) -> bool:
    if type(entry) is Request:
        return entry.state != GONE
    return bool(entry[STATE] != GONE)  # type: ignore[index]


class WaitingRoom:
    """The queue and the parked requests of one batcher, with their row counts.

    Args:
        max_rows: the most rows that may be queued (``max_queue_size``), or ``None``.
        wait_for_room: park requests that do not fit (``when_full="wait"``) instead of refusing.
        shed: make room for a request at a full queue by shedding queued requests of lower
            priority (``when_full="shed"``).
        tally: where admissions and rejections are counted.
        outcomes: settles requests found dead or expired here.
        wake: called when the queue reaches the row count set by :meth:`wake_at`, when a
            request is parked (a full queue should be dispatched without waiting), and when
            room frees while requests are parked (the executor then calls
            :meth:`admit_parked`).
    """

    __slots__ = (
        "_counts",
        "_dq",
        "_fifo_fast",
        "_heap",
        "_outcomes",
        "_parked",
        "_seq",
        "_wake",
        "_wake_at",
        "_wake_at_cost",
        "arrived",
        "bucket_window",
        "cost",
        "costed",
        "early_timeouts",
        "max_bypass",
        "max_rows",
        "padded",
        "parked_rows",
        "rows",
        "shed",
        "shed_count",
        "wait_for_room",
    )

    def __init__(
        self,
        max_rows: int | None,
        wait_for_room: bool,
        tally: Tally,
        outcomes: Outcomes,
        wake: Callable[[], None],
        *,
        shed: bool = False,
    ) -> None:
        self._dq: deque[Entry] = deque()
        # The ranked form of the queue, when an entry jumped ahead: (-priority, deadline, seq,
        # entry) tuples. None while the queue is the FIFO deque.
        self._heap: list[tuple[int, float, int, Entry]] | None = None
        self._seq = 0
        self._fifo_fast = True  # a fast entry may be appended to the deque as it is
        self._parked: deque[Entry] = deque()
        self.rows = 0  # rows in the queue (a lazily noticed cancellation counts until dropped)
        self.cost = 0.0  # the cost of the queued rows, with a cost function
        self.arrived = 0.0  # rows (or cost, with a cost function) ever queued: the arrival meter
        self.parked_rows = 0
        self.max_rows = max_rows
        self.wait_for_room = wait_for_room
        self.shed = shed
        self.shed_count = 0
        self.early_timeouts = 0
        # Batch formation, set by the batcher from its options.
        self.costed = False  # requests carry a cost (batch_cost is set)
        self.padded = False  # a batch costs its largest row's cost times its rows
        self.bucket_window = 0  # requests batch formation may choose from (0: strict order)
        self.max_bypass = 0
        self._counts = tally.counts
        self._outcomes = outcomes
        self._wake = wake
        self._wake_at: float = _INF
        self._wake_at_cost: float = _INF

    # -- reading ------------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Rows waiting: queued plus parked."""
        return self.rows + self.parked_rows

    @property
    def full(self) -> bool:
        """The queue cannot take another row (or requests are parked for room)."""
        return self.max_rows is not None and (self.rows >= self.max_rows or self.parked_rows > 0)

    @property
    def empty(self) -> bool:
        """Nothing queued or parked."""
        return not self.rows and not self.parked_rows

    def _front(self) -> Entry | None:
        heap = self._heap
        if heap is None:
            return self._dq[0] if self._dq else None
        return heap[0][3] if heap else None

    def oldest_enqueued_at(self) -> float | None:
        """When the front entry (the next to leave) was submitted, after
        :meth:`drop_dead_front`. In arrival order that is the oldest; in rank order it is the
        front's, so a low-priority request left waiting does not hurry every batch."""
        entry = self._front()
        if entry is None:
            return None
        return entry.enqueued_at if type(entry) is Request else entry[AT]  # type: ignore[index]

    def earliest_deadline(self) -> float | None:
        """The front entry's deadline, if it has one (after :meth:`drop_dead_front`): the
        earliest of the top priority's (a lower priority's does not lead the next batch)."""
        entry = self._front()
        return entry.deadline if type(entry) is Request else None

    # -- arrivals -----------------------------------------------------------------------------------

    def wake_at(self, rows: float, cost: float = _INF) -> None:
        """Call ``wake`` once the queue holds ``rows`` rows or ``cost`` of cost (``inf``:
        arrivals do not wake)."""
        self._wake_at = rows
        self._wake_at_cost = cost
        if self.rows >= rows or self.cost >= cost:
            self._fire()

    def _fire(self) -> None:
        self._wake_at = self._wake_at_cost = _INF
        self._wake()

    def put_fast(self, entry: list[Any]) -> None:
        """Accept a fast entry (one row): queue it, park it, or raise QueueFullError."""
        if not self._fifo_fast or (
            self.max_rows is not None and (self.parked_rows or self.rows >= self.max_rows)
        ):
            self._put_slow(entry, 1)
            return
        self._dq.append(entry)
        self.rows += 1
        self.arrived += 1
        self._counts[SUBMITTED] += 1
        if self.rows >= self._wake_at:
            self._fire()

    def put(self, req: Request) -> None:
        """Accept a :class:`Request`: queue it, park it, or raise QueueFullError."""
        self._put_slow(req, req.undispatched)

    def _put_slow(self, entry: Entry, rows: int) -> None:
        max_rows = self.max_rows
        if max_rows is not None and (self.parked_rows or self.rows + rows > max_rows):
            self._admit_or_refuse(entry, rows)
            return
        self._enqueue(entry, rows)
        self._counts[SUBMITTED] += 1
        if self.rows >= self._wake_at or self.cost >= self._wake_at_cost:
            self._fire()

    def _enqueue(self, entry: Entry, rows: int) -> None:
        """Put a live entry into the queue at its rank and count it."""
        rank = _rank(entry)
        heap = self._heap
        if heap is None:
            dq = self._dq
            if not dq or rank >= _rank(dq[-1]):
                dq.append(entry)
                if rank[0] > 0:
                    self._fifo_fast = False  # a fast entry would rank ahead of this one
            else:
                heap = self._to_heap()
        if heap is not None:
            self._seq += 1
            key = (rank[0], rank[1], self._seq)
            if type(entry) is Request:
                entry.key = key
            else:
                _keep_seq(entry, self._seq)  # type: ignore[arg-type]
            heapq.heappush(heap, (*key, entry))
        self.rows += rows
        if type(entry) is Request:
            self.cost += entry.cost
            self.arrived += entry.cost if self.costed else rows
        else:
            self.arrived += 1

    def _to_heap(self) -> list[tuple[int, float, int, Entry]]:
        """Turn the FIFO deque into the ranked heap (its order is already a valid heap's)."""
        heap: list[tuple[int, float, int, Entry]] = []
        seq = self._seq
        for entry in self._dq:
            seq += 1
            negp, d = _rank(entry)
            if type(entry) is Request:
                entry.key = (negp, d, seq)
            else:
                _keep_seq(entry, seq)  # type: ignore[arg-type]
            heap.append((negp, d, seq, entry))
        self._seq = seq
        self._dq.clear()
        self._heap = heap  # sorted, hence a heap
        self._fifo_fast = False
        return heap

    def _settle_order(self) -> None:
        """Once the heap has emptied, go back to the FIFO deque."""
        heap = self._heap
        if heap is not None and not heap:
            self._heap = None
            self._fifo_fast = True
        elif heap is None and not self._dq:
            self._fifo_fast = True

    def _admit_or_refuse(self, entry: Entry, rows: int) -> None:
        max_rows: int = self.max_rows  # type: ignore[assignment]
        made_room = False
        if not self.parked_rows and self.rows + rows > max_rows:
            self.drop_dead_front()  # amortised O(1): each dead entry is dropped once
            if self.shed and rows <= max_rows and self.rows + rows > max_rows:
                made_room = self._shed_for(entry, rows, max_rows)
        if not self.parked_rows and (made_room or self.rows + rows <= max_rows):
            self._enqueue(entry, rows)
        elif self.wait_for_room and rows <= max_rows:
            self._set_state(entry, PARKED)
            self._parked.append(entry)
            self.parked_rows += rows
        else:
            self._counts[REJECTED] += 1
            raise QueueFullError(self.rows, rows, max_rows)
        self._counts[SUBMITTED] += 1
        if self.parked_rows or self.rows >= self._wake_at or self.cost >= self._wake_at_cost:
            self._fire()  # a full queue is dispatched without waiting for max_wait
        elif self.max_rows is not None and self.rows >= self.max_rows:
            self._fire()

    def _shed_for(self, entry: Entry, rows: int, max_rows: int) -> bool:
        """Fail queued requests of lower priority than ``entry``, the lowest-ranked first, so
        that ``rows`` more fit; shed nothing when that cannot make room. True if it made room.

        Over a bound lowered by ``reconfigure`` the queue is let down gently: at most ``rows``
        are shed for ``rows`` admitted (one in, one out), never the whole excess at once.
        """
        priority = entry.priority if type(entry) is Request else 0
        self._purge_dead()  # a cancelled row makes room before a live request is shed
        need = min(rows, self.rows + rows - max_rows)
        if need <= 0:
            return True
        victims: list[Entry] = []
        freed = 0
        for victim in self._lowest_first():
            vp = victim.priority if type(victim) is Request else 0
            if vp >= priority:
                break
            if type(victim) is Request and victim.undispatched < victim.rows:
                continue  # partly running already: its rest is not shed
            victims.append(victim)
            freed += victim.undispatched if type(victim) is Request else 1
            if freed >= need:
                break
        if freed < need:
            return False  # the request is refused; nobody is shed for nothing
        for victim in victims:
            self._remove(victim)
            self.shed_count += 1
            vp = victim.priority if type(victim) is Request else 0
            exc = RequestShedError(vp, priority, max_rows)
            if type(victim) is Request:
                self._outcomes.fail(victim, exc)  # uncounts its rows (forget)
            else:
                victim[STATE] = GONE  # type: ignore[index]
                victim[ITEM] = None  # type: ignore[index]
                self.rows -= 1
                self._outcomes.fail(victim[FUT], exc)  # type: ignore[index]
        return True

    def _purge_dead(self) -> None:
        """Drop every queued entry whose caller is gone, wherever it is (O(n): only when
        shedding at a full queue, where the queue is scanned anyway)."""
        heap = self._heap
        entries = list(self._dq) if heap is None else [t[3] for t in heap]
        dead: list[Entry] = []
        for e in entries:
            if type(e) is Request:
                if e.state != GONE and e.future.done():
                    dead.append(e)
            elif e[STATE] != GONE and e[FUT].done():  # type: ignore[index]
                dead.append(e)
        for e in dead:
            self._remove(e)
            if type(e) is Request:
                self._outcomes.cancelled(e)  # uncounts its rows
            else:
                self.rows -= 1
                self._drop_fast(e)  # type: ignore[arg-type]

    def _lowest_first(self) -> Iterator[Entry]:
        """The live queued entries, the lowest-ranked first."""
        heap = self._heap
        entries: Iterable[Entry] = (
            reversed(self._dq) if heap is None else (t[3] for t in sorted(heap, reverse=True))
        )
        for entry in entries:
            if type(entry) is Request:
                if entry.state == GONE or entry.future.done():
                    continue
            elif entry[STATE] == GONE or entry[FUT].done():  # type: ignore[index]
                continue
            yield entry

    def _remove(self, entry: Entry) -> None:
        """Take ``entry`` out of the queue's structure (its rows are uncounted by the caller)."""
        heap = self._heap
        if heap is None:
            if self._dq and self._dq[-1] is entry:
                self._dq.pop()
            else:
                self._dq.remove(entry)
        else:
            for i, t in enumerate(heap):
                if t[3] is entry:
                    heap[i] = heap[-1]
                    heap.pop()
                    heapq.heapify(heap)
                    break
        self._settle_order()

    @staticmethod
    def _set_state(entry: Entry, state: int) -> None:
        if type(entry) is Request:
            entry.state = state
        else:
            entry[STATE] = state  # type: ignore[index]

    def set_limit(self, max_rows: int | None) -> None:
        """A new ``max_queue_size``: parked requests that now fit are admitted, in order (all of
        them when the bound is lifted); queued ones stay, whatever the new bound."""
        if max_rows is None and self.parked_rows:
            self.max_rows = sys.maxsize  # admit every parked request, then lift the bound
            self.admit_parked()
        self.max_rows = max_rows
        if self.parked_rows:
            self._fire()  # the executor admits what fits (admit_parked) when it looks again

    def admit_parked(self) -> None:
        """Move parked requests into the queue, in order, while they fit."""
        parked = self._parked
        max_rows: int = self.max_rows  # type: ignore[assignment]
        while parked:
            entry = parked[0]
            if type(entry) is Request:
                if entry.state == GONE:
                    parked.popleft()
                    continue
                rows = entry.undispatched
                if entry.future.done():  # cancelled, not yet noticed
                    parked.popleft()
                    self.parked_rows -= rows
                    entry.state = GONE
                    self._outcomes.cancelled(entry)
                    continue
            else:
                if entry[STATE] == GONE:  # type: ignore[index]
                    parked.popleft()
                    continue
                rows = 1
                if entry[FUT].done():  # type: ignore[index]
                    parked.popleft()
                    self.parked_rows -= 1
                    self._drop_fast(entry)  # type: ignore[arg-type]
                    continue
            if rows > max_rows:
                # Larger than a bound lowered since it was parked: it can never fit, and it
                # would hold back everyone parked behind it.
                parked.popleft()
                self.parked_rows -= rows
                if type(entry) is Request:
                    entry.state = GONE
                    entry.undispatched = 0
                    self._outcomes.fail(entry, QueueFullError(self.rows, rows, max_rows))
                else:
                    entry[STATE] = GONE  # type: ignore[index]
                    self._outcomes.fail(entry[FUT], QueueFullError(self.rows, rows, max_rows))  # type: ignore[index]
                continue
            if self.rows + rows > max_rows:
                self.drop_dead_front()
                if self.rows + rows > max_rows:
                    break
            parked.popleft()
            self.parked_rows -= rows
            self._set_state(entry, QUEUED)
            self._enqueue(entry, rows)
        if self.rows >= self._wake_at or self.cost >= self._wake_at_cost:
            self._fire()

    # -- leaving early -------------------------------------------------------------------------------

    def cancel(self, entry: Entry) -> None:
        """The caller of ``entry`` was cancelled (reported by the call's coroutine)."""
        if type(entry) is Request:
            self._outcomes.cancelled(entry)  # forgets its rows still here, if any
            return
        state = entry[STATE]  # type: ignore[index]
        if state == GONE:  # taken into a batch: the batch counts it when it reports
            return
        if state == PARKED:
            self.parked_rows -= 1
        else:
            self.rows -= 1
        self._drop_fast(entry)  # type: ignore[arg-type]
        self._after_leave()

    def forget(self, req: Request) -> None:
        """Drop the rows ``req`` still has here (it was settled, or its caller cancelled)."""
        state = req.state
        cost = req.cost
        rows = req.forget_rows()
        if state == PARKED:
            self.parked_rows -= rows
        elif state == QUEUED:
            self.rows -= rows
            self.cost = self.cost - cost if self.rows else 0.0
        self._after_leave()

    def _after_leave(self) -> None:
        # Room was freed: the executor admits the parked requests when it next looks (never
        # from here, which may be deep inside admit_parked, take or drop_dead_front).
        if self._parked:
            self._wake()

    def _drop_fast(self, entry: list[Any]) -> None:
        """A fast entry leaves without running: mark it, let go of its input, count it."""
        entry[STATE] = GONE
        entry[ITEM] = None
        self._outcomes.cancelled(entry[FUT])

    def drop_dead_front(self) -> None:
        """Drop entries at the front whose callers are gone, so the front is live."""
        if self._heap is not None:
            self._drop_dead_top(self._heap)
            return
        dq = self._dq
        while dq:
            entry = dq[0]
            if type(entry) is Request:
                if entry.state != GONE and not entry.future.done():
                    return
                dq.popleft()
                if entry.state != GONE:
                    self._outcomes.cancelled(entry)  # uncounts its rows
            else:
                if entry[STATE] != GONE and not entry[FUT].done():  # type: ignore[index]
                    return
                dq.popleft()
                if entry[STATE] != GONE:  # type: ignore[index]
                    self.rows -= 1
                    self._drop_fast(entry)  # type: ignore[arg-type]
        self._fifo_fast = True

    def _drop_dead_top(self, heap: list[tuple[int, float, int, Entry]]) -> None:
        while heap:
            entry = heap[0][3]
            if type(entry) is Request:
                if entry.state != GONE and not entry.future.done():
                    break
                heapq.heappop(heap)
                if entry.state != GONE:
                    self._outcomes.cancelled(entry)
            else:
                if entry[STATE] != GONE and not entry[FUT].done():  # type: ignore[index]
                    break
                heapq.heappop(heap)
                if entry[STATE] != GONE:  # type: ignore[index]
                    self.rows -= 1
                    self._drop_fast(entry)  # type: ignore[arg-type]
        self._settle_order()

    # -- leaving for a batch ---------------------------------------------------------------------------

    def take(
        self,
        max_rows: int,
        now: float,
        max_cost: float | None = None,
        predict: Callable[[float], float] | None = None,
    ) -> tuple[Batch, list[float]]:
        """Take up to ``max_rows`` live rows (and at most ``max_cost`` of cost) in rank order.

        Returns the batch and each new request's wait in the queue. A request found past its
        deadline is timed out instead (its timer may not have fired yet): never dispatched late.
        With a cost budget the first row always fits (an oversized item runs alone); with a
        bucket window, rows of similar cost are picked from the front of the queue, within the
        bypass bound (see :meth:`_take_bucketed`).

        With ``predict`` (seconds a batch of a size runs; ``early_timeout``), a request not yet
        dispatched whose deadline falls before ``now`` plus its own predicted run time (alone,
        or over the batches a large ``map`` needs) is timed out early, and the batch is the one
        that serves the most requests in time (see :meth:`_take_in_time`).
        """
        if self._heap is not None or self.costed or predict is not None:
            if self.costed and self.bucket_window > 1:
                return self._take_bucketed(max_rows, now, max_cost, predict)
            return self._take_ranked(max_rows, now, max_cost, predict)
        batch = Batch()
        waits: list[float] = []
        dq = self._dq
        popleft = dq.popleft
        # The per-row hot loop: appends bound once, the batch's lists filled directly while it
        # is simple (one plain future per row).
        add_input, add_owner, add_wait = batch.inputs.append, batch.owners.append, waits.append
        room = max_rows
        taken = 0
        while room and dq:
            entry = popleft()
            if type(entry) is not Request:
                fast: list[Any] = entry  # type: ignore[assignment]
                if fast[STATE] == GONE:
                    continue
                fut = fast[FUT]
                if fut.done():  # a submit_nowait future its caller cancelled
                    self.rows -= 1
                    self._drop_fast(fast)
                    continue
                fast[STATE] = GONE
                if batch.simple:
                    add_input(fast[ITEM])
                    add_owner(fut)
                else:
                    batch.add_fast(fut, fast[ITEM])
                add_wait(now - fast[AT])
                room -= 1
                taken += 1
                continue
            req = entry
            if req.state == GONE:
                continue
            if req.future.done():
                self._outcomes.cancelled(req)
                continue
            if req.deadline is not None and req.deadline <= now:
                self._outcomes.time_out(req)  # uncounts its rows
                continue
            if req.offset == 0:
                waits.append(now - req.enqueued_at)
            n = batch.add_request(req, room)
            room -= n
            taken += n
            if req.undispatched:
                dq.appendleft(req)  # the rest of a split map request stays at the front
            else:
                req.state = GONE
        self.rows -= taken
        if not dq:
            self._fifo_fast = True
        return batch, waits

    # The general forms: a ranked heap, costs, early time-outs, bucketing. Slower per row than
    # the FIFO loop above, and only used when one of those is in play.

    def _pop(self) -> Entry | None:
        heap = self._heap
        if heap is None:
            return self._dq.popleft() if self._dq else None
        return heapq.heappop(heap)[3] if heap else None

    def _push_back(self, entries: list[Entry]) -> None:
        """Put popped, untaken entries (in rank order) back where they were."""
        heap = self._heap
        if heap is None:
            self._dq.extendleft(reversed(entries))
            return
        for e in entries:
            if type(e) is Request:
                heapq.heappush(heap, (*e.key, e))  # type: ignore[misc]
            else:
                heapq.heappush(heap, (0, _INF, e[4], e))  # type: ignore[index]

    def _push_front(self, entries: list[Request]) -> None:
        """Put popped, untaken requests back where they were (``entries`` in rank order)."""
        heap = self._heap
        if heap is None:
            self._dq.extendleft(reversed(entries))
        else:
            for req in entries:
                heapq.heappush(heap, (*req.key, req))  # type: ignore[misc]

    def _live_next(
        self, now: float, predict: Callable[[float], float] | None, max_rows: int
    ) -> Entry | None:
        """The next live entry in rank order, settling dead, expired and hopeless ones."""
        while True:
            entry = self._pop()
            if entry is None or type(entry) is not Request:
                if entry is not None:
                    fast: list[Any] = entry  # type: ignore[assignment]
                    if fast[STATE] == GONE:
                        continue
                    if fast[FUT].done():
                        self.rows -= 1
                        self._drop_fast(fast)
                        continue
                return entry
            req = entry
            if req.state == GONE:
                continue
            if req.future.done():
                self._outcomes.cancelled(req)
                continue
            deadline = req.deadline
            if deadline is not None:
                if deadline <= now:
                    self._outcomes.time_out(req)
                    continue
                if (
                    predict is not None
                    and req.offset == 0
                    and deadline < now + self._alone(req, predict, max_rows)
                ):
                    self.early_timeouts += 1
                    self._outcomes.time_out(req, early=True)
                    continue
            return req

    def _alone(self, req: Request, predict: Callable[[float], float], max_rows: int) -> float:
        """Predicted seconds to run all of ``req``'s rows, from the front of the queue: one
        batch, or as many full ones as a large ``map`` needs."""
        rows = req.undispatched
        full, rest = divmod(rows, max_rows)
        if not self.costed:
            return full * predict(max_rows) + (predict(rest) if rest else 0.0)
        per_row = req.max_cost() if self.padded else req.cost / rows
        return full * predict(per_row * max_rows) + (predict(per_row * rest) if rest else 0.0)

    def _size(self, rows: int, csum: float, cmax: float) -> float:
        """A batch's size as the run-time model counts it."""
        if not self.costed:
            return rows
        return cmax * rows if self.padded else csum

    def _in_time(
        self,
        predict: Callable[[float], float] | None,
        now: float,
        size: float,
        limit: float,
    ) -> bool:
        """Whether a batch of ``size`` is predicted to finish by ``limit`` (the earliest
        deadline of the requests it would complete)."""
        return predict is None or limit == _INF or now + predict(size) <= limit

    def _fit(
        self, req: Request, room: int, taken: int, csum: float, cmax: float, max_cost: float | None
    ) -> tuple[int, float, float]:
        """How many of ``req``'s next rows (up to ``room``) fit a batch of ``taken`` rows that
        costs ``csum`` (largest row ``cmax``): ``(rows, new csum, new cmax)``."""
        costs = req.costs
        upto = min(room, req.undispatched)
        if costs is None:
            if req.is_map:  # no cost function: rows only
                return upto, csum, cmax
            row_costs = [req.cost]
        else:
            row_costs = costs[req.offset : req.offset + upto]
        n = 0
        padded = self.padded
        for c in row_costs:
            over = max(cmax, c) * (taken + n + 1) if padded else csum + c
            if max_cost is not None and taken + n and over > max_cost:
                break  # (the batch's first row always fits)
            n += 1
            csum += c
            cmax = max(cmax, c)
        return n, csum, cmax

    def _add(self, batch: Batch, req: Request, n: int, now: float, waits: list[float]) -> None:
        if req.offset == 0:
            waits.append(now - req.enqueued_at)
        before = req.cost
        batch.add_request(req, n)
        self.cost -= before - (req.cost if req.undispatched else 0.0)
        if not req.undispatched:
            req.state = GONE
            req.item = req.items = None  # the batch holds them; the index entries must not

    def _finish_take(self, batch: Batch, taken: int, csum: float, cmax: float) -> None:
        self.rows -= taken
        if not self.rows:
            self.cost = 0.0
        batch.cost = cmax * taken if self.padded else csum
        self._settle_order()

    def _take_ranked(
        self,
        max_rows: int,
        now: float,
        max_cost: float | None,
        predict: Callable[[float], float] | None,
    ) -> tuple[Batch, list[float]]:
        if predict is not None:
            return self._take_in_time(max_rows, now, max_cost, predict)
        batch = Batch()
        waits: list[float] = []
        room, taken, csum, cmax = max_rows, 0, 0.0, 0.0
        while room:
            entry = self._live_next(now, None, max_rows)
            if entry is None:
                break
            if type(entry) is not Request:
                self._add_fast(batch, entry, now, waits)  # type: ignore[arg-type]
                room -= 1
                taken += 1
                continue
            n, csum, cmax = self._fit(entry, room, taken, csum, cmax, max_cost)
            if n == 0:
                self._push_front([entry])  # over the budget: it leads the next batch
                break
            self._add(batch, entry, n, now, waits)
            room -= n
            taken += n
            if entry.undispatched:
                self._push_front([entry])  # the rest of a split map request stays in front
                break
        self._finish_take(batch, taken, csum, cmax)
        return batch, waits

    def _add_fast(self, batch: Batch, fast: list[Any], now: float, waits: list[float]) -> None:
        fast[STATE] = GONE
        batch.add_fast(fast[FUT], fast[ITEM])
        fast[ITEM] = None  # the batch holds it; the index entries must not
        waits.append(now - fast[AT])

    def _fit_after(
        self,
        cands: list[tuple[Entry, int, float]],
        req: Request,
        room: int,
        max_cost: float | None,
    ) -> int:
        """Rows of ``req`` that fit after the candidates (under ``max_cost``)."""
        if max_cost is None or not self.costed:
            return min(room, req.undispatched)
        taken, csum, cmax = 0, 0.0, 0.0
        for e, n, _ in cands:
            if type(e) is Request:
                _, csum, cmax = self._fit(e, n, taken, csum, cmax, None)
            taken += n
        return self._fit(req, room, taken, csum, cmax, max_cost)[0]

    def _best_prefix(
        self,
        cands: list[tuple[Entry, int, float]],
        now: float,
        predict: Callable[[float], float],
    ) -> tuple[int, float]:
        """The prefix of ``cands`` that serves the most requests by their deadlines (the
        longest on a tie), and when it is predicted to finish."""
        best, best_count, best_finish = 0, -1, now
        deadlines: list[float] = []
        taken, csum, cmax = 0, 0.0, 0.0
        for i, (e, n, d) in enumerate(cands):
            if type(e) is Request and self.costed:
                _, csum, cmax = self._fit(e, n, taken, csum, cmax, None)
            taken += n
            finish = now + predict(self._size(taken, csum, cmax))
            bisect.insort(deadlines, d)
            count = len(deadlines) - bisect.bisect_left(deadlines, finish)
            if count >= best_count:
                best, best_count, best_finish = i + 1, count, finish
        return best, best_finish

    def _take_in_time(
        self,
        max_rows: int,
        now: float,
        max_cost: float | None,
        predict: Callable[[float], float],
    ) -> tuple[Batch, list[float]]:
        """``early_timeout``: the batch, of the rows at the front, that serves the most requests
        within their deadlines.

        Requests late even alone were failed already (:meth:`_live_next`). Of the rest, the
        candidates are taken in rank order as a plain batch would be; for each prefix of them,
        the requests whose deadline falls after ``now`` plus the prefix's predicted run time are
        counted (a request without a deadline always counts), and the prefix with the most
        (the longest, on a tie: the most rows for the same result) is the batch. Its requests
        that would finish late are failed early, since a later batch would be later still, and
        their places are filled from behind, until none is late; the candidates after it go
        back to the front. So a batch stays large under overload (the hopeless are dropped, not
        served in small batches), and a short queue of tight deadlines gets a small one.
        """
        cands: list[tuple[Entry, int, float]] = []  # (entry, rows, deadline): in rank order
        room, taken = max_rows, 0
        while True:
            # Fill up to max_rows candidates (with the budget), in rank order.
            while room:
                entry = self._live_next(now, predict, max_rows)
                if entry is None:
                    break
                if type(entry) is not Request:
                    cands.append((entry, 1, _INF))
                    taken += 1
                    room -= 1
                    continue
                n = self._fit_after(cands, entry, room, max_cost)
                if n == 0:
                    self._push_front([entry])  # over the budget: it leads the next batch
                    break
                completes = n == entry.undispatched
                d = entry.deadline if completes and entry.deadline is not None else _INF
                cands.append((entry, n, d))
                taken += n
                room -= n
                if not completes:
                    break  # the rest of a split map request: nothing after it
            best, finish = self._best_prefix(cands, now, predict)
            late = [
                i
                for i, (e, _, d) in enumerate(cands[:best])
                if d < finish and type(e) is Request and e.offset == 0
            ]
            if not late:
                break
            # In time alone, not in the batch that serves the most: a later batch would be
            # later still. Fail them, and fill their places from behind (so the batch stays as
            # large as the queue allows).
            for i in reversed(late):
                entry, n, _ = cands.pop(i)
                self.early_timeouts += 1
                self._outcomes.time_out(entry, early=True)  # type: ignore[arg-type]
                taken -= n
                room += n
            if cands and cands[-1][2] == _INF and type(cands[-1][0]) is Request:
                last = cands[-1][0]
                if last.undispatched > cands[-1][1]:
                    break  # a split map closes the batch: nothing refills behind it
        batch = Batch()
        waits: list[float] = []
        rows = 0
        csum = cmax = 0.0
        for entry, n, _ in cands[:best]:
            if type(entry) is not Request:
                self._add_fast(batch, entry, now, waits)  # type: ignore[arg-type]
                rows += 1
                continue
            if self.costed:
                _, csum, cmax = self._fit(entry, n, rows, csum, cmax, None)
            self._add(batch, entry, n, now, waits)
            rows += n
            if entry.undispatched:
                self._push_front([entry])  # the rest of a split map request stays in front
        self._push_back([c[0] for c in cands[best:]])
        self._finish_take(batch, rows, csum, cmax)
        return batch, waits

    def _take_bucketed(
        self,
        max_rows: int,
        now: float,
        max_cost: float | None,
        predict: Callable[[float], float] | None,
    ) -> tuple[Batch, list[float]]:
        """Form a batch from the first ``bucket_window`` requests, preferring rows whose cost is
        close to the front request's, so that a padded batch pads little.

        The front request always goes first. A request behind it that batches passed over
        (taking one ranked after it) ``max_bypass`` times closes the window: nothing ranked after
        it is taken until it is. So no request is passed over more than ``max_bypass`` times.
        """
        window: list[Request] = []
        bound = self.max_bypass
        while len(window) < self.bucket_window:
            entry = self._live_next(now, predict, max_rows)
            if entry is None:
                break
            assert type(entry) is Request  # with a cost function every request carries its cost
            window.append(entry)
            if entry.bypassed >= bound and len(window) > 1:
                break  # (the front request is always taken: it closes nothing)
        batch = Batch()
        waits: list[float] = []
        if not window:
            self._finish_take(batch, 0, 0.0, 0.0)
            return batch, waits
        head = window[0]
        n, csum, cmax = self._fit(head, max_rows, 0, 0.0, 0.0, max_cost)
        limit = head.deadline if head.deadline is not None and n == head.undispatched else _INF
        self._add(batch, head, n, now, waits)
        room, taken = max_rows - n, n
        chosen = [0]
        if not head.undispatched and room and len(window) > 1:
            ref = cmax
            last = len(window) - 1
            forced = last if window[last].bypassed >= bound else -1  # it goes first, if it fits
            order = sorted(
                range(1, len(window)),
                key=lambda i: (i != forced, abs(window[i].max_cost() - ref), i),
            )
            for i in order:
                req = window[i]
                rows = req.undispatched
                if rows > room:
                    continue
                k, s, m = self._fit(req, rows, taken, csum, cmax, max_cost)
                own = req.deadline if req.deadline is not None else _INF
                if k < rows or not self._in_time(
                    predict, now, self._size(taken + rows, s, m), min(limit, own)
                ):
                    continue
                csum, cmax, limit = s, m, min(limit, own)
                self._add(batch, req, rows, now, waits)
                chosen.append(i)
                room -= rows
                taken += rows
                if not room:
                    break
        last_chosen = max(chosen)
        keep: list[Request] = []
        picked = set(chosen)
        for i, req in enumerate(window):
            if i in picked:
                if req.undispatched:
                    keep.append(req)  # the head, split: the rest stays in front
                continue
            if i < last_chosen:
                req.bypassed += 1
            keep.append(req)
        self._push_front(keep)
        self._finish_take(batch, taken, csum, cmax)
        return batch, waits

    def drain(self) -> list[Entry]:
        """Remove and return every live entry, queued or parked, in order."""
        live: list[Entry] = []
        queued: Any = self._dq if self._heap is None else [t[3] for t in sorted(self._heap)]
        for entry in (*queued, *self._parked):
            if type(entry) is Request:
                if entry.state == GONE:
                    continue
                entry.state = GONE
                entry.undispatched = 0
            else:
                if entry[STATE] == GONE:
                    continue
                entry[STATE] = GONE
            live.append(entry)
        self._dq.clear()
        self._parked.clear()
        self._heap = None
        self._fifo_fast = True
        self.rows = self.parked_rows = 0
        self.cost = 0.0
        return live
