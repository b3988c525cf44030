"""The batching policy: a pure, synchronous decision, with no event loop and no clock of its own.

The executor describes the queue to the policy as a :class:`QueueState` and carries out what the
policy answers: :class:`Dispatch` a batch now, or :class:`Wait` until a deadline or until enough rows
have arrived. Because the policy reads time only from the state it is given, it is tested with plain
numbers (see ``tests/test_policy.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ._checks import check_int, check_seconds

__all__ = ["BatchPolicy", "Dispatch", "MaxSizeOrWait", "QueueState", "Wait"]


@dataclass(frozen=True, slots=True)
class QueueState:
    """What the executor knows when it asks the policy what to do.

    Attributes:
        now: the event loop's monotonic clock (``loop.time()``), in seconds.
        queued_rows: rows waiting in the queue (a ``map`` request of k items counts k).
        oldest_enqueued_at: when the oldest queued row was submitted, or ``None`` if none is queued.
        free_slots: batches that may start now (``max_concurrent_batches`` minus those in flight).
        closing: the batcher no longer accepts requests and is draining its queue.
        queue_full: the queue holds ``max_queue_size`` rows (or requests wait for room), so the
            batch cannot grow by waiting.
    """

    now: float
    queued_rows: int
    oldest_enqueued_at: float | None
    free_slots: int
    closing: bool
    queue_full: bool = False


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Start a batch now with at most ``rows`` rows, taken from the front of the queue."""

    rows: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait for something to change before asking again.

    The executor is woken at ``deadline`` (a ``loop.time()`` value; ``None`` for no timer), when
    the queue reaches ``wake_at_rows`` rows (``None``: arrivals do not wake it), when a batch
    finishes, or when the batcher closes.
    """

    deadline: float | None
    wake_at_rows: int | None


@runtime_checkable
class BatchPolicy(Protocol):
    """Decides, from a :class:`QueueState`, whether to start a batch or to wait.

    Implementations must be pure and cheap: the executor calls ``decide`` once per batch and once
    per wake-up, never per request.
    """

    @property
    def max_batch_size(self) -> int:
        """The most rows a batch may hold."""
        ...

    def decide(self, state: QueueState) -> Dispatch | Wait:
        """Return what the executor should do now."""
        ...


@dataclass(frozen=True, slots=True)
class MaxSizeOrWait:
    """The default policy: dispatch when a full batch is queued, or when the oldest queued row has
    waited ``max_wait`` seconds, whichever comes first.

    While every batch slot is busy it waits for a batch to finish, and the next batch then forms
    from the backlog at once. While closing, or when the queue is full (``max_queue_size``), it
    dispatches whatever is queued without waiting.
    """

    max_batch_size: int
    max_wait: float

    def __post_init__(self) -> None:
        fix = object.__setattr__
        fix(self, "max_batch_size", check_int("max_batch_size", self.max_batch_size, minimum=1))
        fix(self, "max_wait", check_seconds("max_wait", self.max_wait, allow_zero=True))

    def decide(self, state: QueueState) -> Dispatch | Wait:
        """Dispatch a full or overdue batch; otherwise say when to look again."""
        if state.free_slots <= 0:
            return Wait(deadline=None, wake_at_rows=None)
        if state.queued_rows <= 0 or state.oldest_enqueued_at is None:
            return Wait(deadline=None, wake_at_rows=1)
        rows = min(state.queued_rows, self.max_batch_size)
        if state.closing or state.queue_full or state.queued_rows >= self.max_batch_size:
            return Dispatch(rows)
        deadline = state.oldest_enqueued_at + self.max_wait
        if state.now >= deadline:
            return Dispatch(rows)
        return Wait(deadline=deadline, wake_at_rows=self.max_batch_size)
