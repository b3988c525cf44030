"""Statistics: counters kept by the batcher, and the frozen snapshot ``statistics()`` returns."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

__all__ = ["BatcherStatistics", "Percentiles"]

# Percentiles are computed over the most recent samples only, so a long-running server reports
# current behaviour and memory stays bounded.
SAMPLE_WINDOW: Final = 8192


@dataclass(frozen=True, slots=True)
class Percentiles:
    """Percentiles, in seconds, of the most recent samples of a duration (zeros when none yet)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: deque[float] | list[float]) -> Percentiles:
        """Summarise ``samples`` (nearest-rank percentiles)."""
        if not samples:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(samples)
        n = len(ordered)

        def rank(q: float) -> float:
            return ordered[min(n - 1, max(0, int(q * n + 0.5) - 1))]

        return cls(n, rank(0.50), rank(0.90), rank(0.99), ordered[-1], sum(ordered) / n)


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """A snapshot of a batcher's counters, taken by ``Batcher.statistics()``; it never changes.

    Request counters count calls (a ``map`` of k items is one request of k rows).
    ``submitted == completed + failed + cancelled + timed_out + pending``, where ``pending``
    is every accepted request still queued or running; ``rejected`` requests were never accepted.

    Attributes:
        submitted: requests accepted into the queue.
        completed: requests that got their result.
        failed: requests that got an error other than a timeout (fn errors included).
        cancelled: requests whose caller was cancelled before a result was delivered.
        timed_out: requests that got ``RequestTimeoutError``.
        rejected: submits refused at the door (``QueueFullError``).
        pending: accepted requests not yet resolved.
        batches: batches run (successful or not).
        rows: rows run through the batch function, over all batches.
        batch_size_histogram: batch size (rows) to number of batches of that size.
        queue_wait: how long requests waited in the queue before their first row was dispatched.
        batch_run: how long each batch took, from dispatch to results delivered.
        queue_depth: rows queued now.
        in_flight_batches: batches running now.
        healthy: False once the executor has died (see ``BatcherBrokenError``).
        closed: the batcher no longer accepts requests.
    """

    submitted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    rejected: int
    pending: int
    batches: int
    rows: int
    batch_size_histogram: MappingProxyType[int, int]
    queue_wait: Percentiles
    batch_run: Percentiles
    queue_depth: int
    in_flight_batches: int
    healthy: bool
    closed: bool

    @property
    def mean_batch_size(self) -> float:
        """Mean rows per batch (0.0 before the first batch)."""
        return self.rows / self.batches if self.batches else 0.0


class StatsRecorder:
    """The mutable counters behind :class:`BatcherStatistics` (internal)."""

    __slots__ = (
        "batch_runs",
        "batches",
        "cancelled",
        "completed",
        "failed",
        "histogram",
        "queue_waits",
        "rejected",
        "rows",
        "submitted",
        "timed_out",
    )

    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.cancelled = 0
        self.timed_out = 0
        self.rejected = 0
        self.batches = 0
        self.rows = 0
        self.histogram: Counter[int] = Counter()
        self.queue_waits: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.batch_runs: deque[float] = deque(maxlen=SAMPLE_WINDOW)

    def snapshot(
        self,
        *,
        queue_depth: int,
        in_flight: int,
        healthy: bool,
        closed: bool,
        uncounted_cancelled: int = 0,
    ) -> BatcherStatistics:
        cancelled = self.cancelled + uncounted_cancelled
        resolved = self.completed + self.failed + cancelled + self.timed_out
        return BatcherStatistics(
            submitted=self.submitted,
            completed=self.completed,
            failed=self.failed,
            cancelled=cancelled,
            timed_out=self.timed_out,
            rejected=self.rejected,
            pending=self.submitted - resolved,
            batches=self.batches,
            rows=self.rows,
            batch_size_histogram=MappingProxyType(dict(sorted(self.histogram.items()))),
            queue_wait=Percentiles.of(self.queue_waits),
            batch_run=Percentiles.of(self.batch_runs),
            queue_depth=queue_depth,
            in_flight_batches=in_flight,
            healthy=healthy,
            closed=closed,
        )
