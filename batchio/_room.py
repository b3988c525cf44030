"""The waiting room: the FIFO queue of accepted requests, the requests parked for room, and admission.

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

import sys
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from ._exceptions import QueueFullError
from ._request import AT, FUT, GONE, ITEM, PARKED, QUEUED, STATE, Batch, Entry, Request
from ._stats import REJECTED, SUBMITTED, Tally

if TYPE_CHECKING:
    from ._outcomes import Outcomes

__all__: list[str] = []

_INF: Final = float("inf")


class WaitingRoom:
    """The queue and the parked requests of one batcher, with their row counts.

    Args:
        max_rows: the most rows that may be queued (``max_queue_size``), or ``None``.
        wait_for_room: park requests that do not fit (``when_full="wait"``) instead of refusing.
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
        "_outcomes",
        "_parked",
        "_wake",
        "_wake_at",
        "max_rows",
        "parked_rows",
        "rows",
        "wait_for_room",
    )

    def __init__(
        self,
        max_rows: int | None,
        wait_for_room: bool,
        tally: Tally,
        outcomes: Outcomes,
        wake: Callable[[], None],
    ) -> None:
        self._dq: deque[Entry] = deque()
        self._parked: deque[Entry] = deque()
        self.rows = 0  # rows in the queue (a lazily noticed cancellation counts until dropped)
        self.parked_rows = 0
        self.max_rows = max_rows
        self.wait_for_room = wait_for_room
        self._counts = tally.counts
        self._outcomes = outcomes
        self._wake = wake
        self._wake_at: float = _INF

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

    def oldest_enqueued_at(self) -> float | None:
        """When the entry at the front was submitted (after :meth:`drop_dead_front`)."""
        if not self._dq:
            return None
        entry = self._dq[0]
        return entry.enqueued_at if type(entry) is Request else entry[AT]  # type: ignore[index]

    # -- arrivals -----------------------------------------------------------------------------------

    def wake_at(self, rows: float) -> None:
        """Call ``wake`` once the queue holds ``rows`` rows (``inf``: arrivals do not wake)."""
        self._wake_at = rows
        if self.rows >= rows:
            self._fire()

    def _fire(self) -> None:
        self._wake_at = _INF
        self._wake()

    def put_fast(self, entry: list[Any]) -> None:
        """Accept a fast entry (one row): queue it, park it, or raise QueueFullError."""
        if self.max_rows is not None and (self.parked_rows or self.rows >= self.max_rows):
            self._admit_or_refuse(entry, 1)
            return
        self._dq.append(entry)
        self.rows += 1
        self._counts[SUBMITTED] += 1
        if self.rows >= self._wake_at:
            self._fire()

    def put(self, req: Request) -> None:
        """Accept a :class:`Request`: queue it, park it, or raise QueueFullError."""
        rows = req.undispatched
        if self.max_rows is not None and (self.parked_rows or self.rows + rows > self.max_rows):
            self._admit_or_refuse(req, rows)
            return
        self._dq.append(req)
        self.rows += rows
        self._counts[SUBMITTED] += 1
        if self.rows >= self._wake_at:
            self._fire()

    def _admit_or_refuse(self, entry: Entry, rows: int) -> None:
        max_rows: int = self.max_rows  # type: ignore[assignment]
        if not self.parked_rows and self.rows + rows > max_rows:
            self.drop_dead_front()  # amortised O(1): each dead entry is dropped once
        if not self.parked_rows and self.rows + rows <= max_rows:
            self._dq.append(entry)
            self.rows += rows
        elif self.wait_for_room and rows <= max_rows:
            self._set_state(entry, PARKED)
            self._parked.append(entry)
            self.parked_rows += rows
        else:
            self._counts[REJECTED] += 1
            raise QueueFullError(self.rows, rows, max_rows)
        self._counts[SUBMITTED] += 1
        if self.parked_rows or self.rows >= self._wake_at:
            self._fire()  # a full queue is dispatched without waiting for max_wait

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
            if self.rows + rows > max_rows:
                self.drop_dead_front()
                if self.rows + rows > max_rows:
                    break
            parked.popleft()
            self.parked_rows -= rows
            self._set_state(entry, QUEUED)
            self._dq.append(entry)
            self.rows += rows
        if self.rows >= self._wake_at:
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
        rows = req.forget_rows()
        if state == PARKED:
            self.parked_rows -= rows
        elif state == QUEUED:
            self.rows -= rows
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

    # -- leaving for a batch ---------------------------------------------------------------------------

    def take(self, max_rows: int, now: float) -> tuple[Batch, list[float]]:
        """Take up to ``max_rows`` live rows from the front, in order.

        Returns the batch and each new request's wait in the queue. A request found past its
        deadline is timed out instead (its timer may not have fired yet): never dispatched late.
        """
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
        return batch, waits

    def drain(self) -> list[Entry]:
        """Remove and return every live entry, queued or parked, in order."""
        live: list[Entry] = []
        for entry in (*self._dq, *self._parked):
            if type(entry) is Request:
                if entry.state == GONE:
                    continue
                entry.state = GONE
                entry.undispatched = 0
            else:
                if entry[STATE] == GONE:  # type: ignore[index]
                    continue
                entry[STATE] = GONE  # type: ignore[index]
            live.append(entry)
        self._dq.clear()
        self._parked.clear()
        self.rows = self.parked_rows = 0
        return live
