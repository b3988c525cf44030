"""Statistics: counters kept by the batcher, and the frozen snapshot ``statistics()`` returns."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter, deque
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from ._estimates import RunTimeModel

__all__ = [
    "TIME_BUCKETS",
    "BatcherStatistics",
    "Histogram",
    "Percentiles",
    "SchedulerStatistics",
    "StageStatistics",
]

# Percentiles are computed over the most recent samples only, so a long-running server reports
# current behaviour and memory stays bounded.
SAMPLE_WINDOW: Final = 8192

#: Upper bounds (seconds) of the cumulative queue-wait and batch-run histograms: from half a
#: millisecond (a batch on an idle accelerator) to a minute (a stalled one).
TIME_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts of every observation of a duration since the batcher started, in buckets.

    Unlike :class:`Percentiles` (the recent window), it never forgets: it is what a
    Prometheus or OpenTelemetry histogram exports. ``counts[i]`` counts observations in
    ``(bounds[i - 1], bounds[i]]``; the last entry, ``counts[len(bounds)]``, those above
    ``bounds[-1]``.

    Attributes:
        bounds: the buckets' finite upper bounds, ascending (:data:`~batchio.TIME_BUCKETS`).
        counts: observations per bucket (not cumulative), ``len(bounds) + 1`` of them.
        sum: the sum of every observation.
        count: how many observations there were.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float
    count: int

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """``(upper bound, observations at or below it)`` pairs, ending with ``(inf, count)``."""
        pairs = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            pairs.append((bound, total))
        return tuple(pairs)


class HistogramCounts:
    """The mutable side of a :class:`Histogram` (internal; written on the loop's thread)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = TIME_BUCKETS) -> None:
        self.bounds = bounds
        # One list (counts, then the sum last) so a reader copies all of it in one atomic step.
        self.counts: list[float] = [0] * (len(bounds) + 2)

    def observe(self, value: float) -> None:
        counts = self.counts
        counts[bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def observe_all(self, values: list[float]) -> None:
        counts = self.counts
        bounds = self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        counts[-1] += sum(values)

    def snapshot(self) -> Histogram:
        c = self.counts.copy()
        buckets = tuple(int(n) for n in c[:-1])
        return Histogram(self.bounds, buckets, float(c[-1]), sum(buckets))


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
class StageStatistics:
    """One stage of a staged batcher (see :class:`~batchio.Stages`), in a statistics snapshot.

    Compare the stages' ``busy_seconds`` (or ``run.mean`` times ``jobs``) to see which one is
    the bottleneck: the stage whose workers are busy all the time sets the throughput, and jobs
    pile up in the queue in front of it (``queue_depth``).

    Attributes:
        name: ``"prepare"``, ``"assemble"``, ``"device"`` or ``"finish"``.
        workers: threads serving the stage (the device's is shared when a
            :class:`~batchio.DeviceExecutor` is).
        jobs: jobs (batches, or halves of a failing batch) this stage has completed.
        busy_seconds: seconds this batcher's jobs spent running in the stage.
        queue_depth: this batcher's jobs waiting for a worker of the stage now.
        run: how long each job took.
    """

    name: str
    workers: int
    jobs: int
    busy_seconds: float
    queue_depth: int
    run: Percentiles


@dataclass(frozen=True, slots=True)
class SchedulerStatistics:
    """How the batcher has been deciding when to dispatch, in a statistics snapshot.

    Attributes:
        policy: the policy's class name (``"MaxSizeOrWait"``, ``"LatencyTarget"``, or yours).
        latency_target: the adaptive policy's target, in seconds; ``None`` without it.
        model: the run-time model learned from finished batches (``None`` before the first):
            predicted seconds from dispatch to delivery = ``intercept + slope * size``.
        arrival_rate: rows (or cost, with ``batch_cost``) arriving per second, recently.
        cap: the adaptive policy's largest batch now (rows, or cost): predicted to run within
            half the target. ``None`` for other policies.
        target: the batch size the adaptive policy waits for while a batch is in flight: what
            keeps up with ``arrival_rate``. ``None`` for other policies.
        wait: seconds the executor last chose to wait for more rows before dispatching (the
            time from that decision to the timer it set); ``None`` if it has not waited on a
            timer yet.
        last_reason: why the last batch was dispatched: ``"idle"`` (nothing in flight),
            ``"full"``, ``"target size"``, ``"latency target"``, ``"max_wait"``, ``"queue
            full"``, ``"closing"``, ``"no model yet"``, or a custom policy's reason.
        dispatch_reasons: how many batches were dispatched for each reason.
        early_timeouts: requests failed early, predicted to miss their deadline
            (``early_timeout=True``).
        shed: requests shed from a full queue for a higher-priority one (``when_full="shed"``).
    """

    policy: str
    latency_target: float | None
    model: RunTimeModel | None
    arrival_rate: float
    cap: float | None
    target: float | None
    wait: float | None
    last_reason: str
    dispatch_reasons: MappingProxyType[str, int]
    early_timeouts: int
    shed: int


class SchedulerLog:
    """What the executor notes about its decisions, for :class:`SchedulerStatistics` (internal;
    written on the loop, read by snapshots from any thread)."""

    __slots__ = ("last_reason", "last_state", "last_wait", "reasons")

    def __init__(self) -> None:
        self.reasons: Counter[str] = Counter()
        self.last_reason = ""
        self.last_wait: float | None = None
        self.last_state: Any = None


@dataclass(frozen=True, slots=True)
class BatcherStatistics:
    """A snapshot of a batcher's counters, taken by ``Batcher.statistics()``; it never changes.

    Request counters count calls (a ``map`` of k items is one request of k rows).
    ``submitted == completed + failed + cancelled + timed_out + pending``, where ``pending``
    is every accepted request still queued or running; ``rejected`` requests were never accepted.
    Every snapshot is consistent, including one taken from another thread during a burst: the
    counters are copied in one atomic step.

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
        queue_wait: how long requests waited in the queue before their first row was dispatched
            (the most recent samples).
        batch_run: how long each batch took, from dispatch to results delivered (the most
            recent samples).
        queue_depth: rows queued now.
        in_flight_batches: batches running now.
        stalled_batches: batches that ran past ``batch_time_limit`` (their requests failed with
            ``BatchStalledError``).
        abandoned_workers: worker threads left behind in a stalled batch that have not returned
            yet (each was replaced, so the batcher keeps its capacity).
        healthy: False once the executor has died (see ``BatcherBrokenError``).
        closed: the batcher no longer accepts requests.
        stages: one entry per stage of a staged batcher, in pipeline order; empty for a batch
            function.
        device_busy_fraction: for a staged batcher, the share of wall time its device thread
            (shared or not) has been working since it started; ``None`` otherwise. A value near
            1.0 means the device is the bottleneck, as it should be.
        scheduler: the batching policy's state and decisions (see
            :class:`SchedulerStatistics`).
        queue_wait_histogram: every request's queue wait since the start (the same
            observations as ``queue_wait``, never forgotten), in :data:`~batchio.TIME_BUCKETS`.
        batch_run_histogram: every batch's run time since the start, likewise.
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
    stalled_batches: int
    abandoned_workers: int
    healthy: bool
    closed: bool
    stages: tuple[StageStatistics, ...] = ()
    device_busy_fraction: float | None = None
    scheduler: SchedulerStatistics | None = None
    queue_wait_histogram: Histogram = Histogram(
        TIME_BUCKETS, (0,) * (len(TIME_BUCKETS) + 1), 0.0, 0
    )
    batch_run_histogram: Histogram = Histogram(TIME_BUCKETS, (0,) * (len(TIME_BUCKETS) + 1), 0.0, 0)

    @property
    def mean_batch_size(self) -> float:
        """Mean rows per batch (0.0 before the first batch)."""
        return self.rows / self.batches if self.batches else 0.0


# Indexes of the counters in ``Tally.counts``: one list, so a reader on another thread copies
# all of them in one atomic step (``list.copy`` holds the GIL throughout) and every identity
# between them holds in the copy.
SUBMITTED: Final = 0
COMPLETED: Final = 1
FAILED: Final = 2
CANCELLED: Final = 3
TIMED_OUT: Final = 4
REJECTED: Final = 5
BATCHES: Final = 6
ROWS: Final = 7
STALLED: Final = 8
_COUNTERS: Final = 9


class Tally:
    """The mutable counters and samples behind :class:`BatcherStatistics` (internal).

    Only the event loop's thread writes them; :meth:`snapshot` may run on any thread.
    """

    __slots__ = (
        "batch_run_buckets",
        "batch_runs",
        "counts",
        "histogram",
        "queue_wait_buckets",
        "queue_waits",
    )

    def __init__(self) -> None:
        self.counts = [0] * _COUNTERS
        self.histogram: Counter[int] = Counter()
        self.queue_waits: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.batch_runs: deque[float] = deque(maxlen=SAMPLE_WINDOW)
        self.queue_wait_buckets = HistogramCounts()
        self.batch_run_buckets = HistogramCounts()

    def waited(self, waits: list[float]) -> None:
        """Count the queue waits of requests just dispatched."""
        self.queue_waits.extend(waits)
        self.queue_wait_buckets.observe_all(waits)

    def batch_ran(self, rows: int, seconds: float) -> None:
        """Count one batch of ``rows`` rows that took ``seconds`` from dispatch to delivery."""
        counts = self.counts
        counts[BATCHES] += 1
        counts[ROWS] += rows
        self.histogram[rows] += 1
        self.batch_runs.append(seconds)
        self.batch_run_buckets.observe(seconds)

    def snapshot(
        self,
        *,
        queue_depth: int,
        in_flight: int,
        healthy: bool,
        closed: bool,
        abandoned_workers: int = 0,
        stages: tuple[StageStatistics, ...] = (),
        device_busy_fraction: float | None = None,
        scheduler: SchedulerStatistics | None = None,
    ) -> BatcherStatistics:
        """A frozen, self-consistent copy, safe to take from any thread."""
        c = self.counts.copy()
        histogram = dict(self.histogram)
        queue_waits = list(self.queue_waits)
        batch_runs = list(self.batch_runs)
        resolved = c[COMPLETED] + c[FAILED] + c[CANCELLED] + c[TIMED_OUT]
        return BatcherStatistics(
            submitted=c[SUBMITTED],
            completed=c[COMPLETED],
            failed=c[FAILED],
            cancelled=c[CANCELLED],
            timed_out=c[TIMED_OUT],
            rejected=c[REJECTED],
            pending=c[SUBMITTED] - resolved,
            batches=c[BATCHES],
            rows=c[ROWS],
            batch_size_histogram=MappingProxyType(dict(sorted(histogram.items()))),
            queue_wait=Percentiles.of(queue_waits),
            batch_run=Percentiles.of(batch_runs),
            queue_depth=queue_depth,
            in_flight_batches=in_flight,
            stalled_batches=c[STALLED],
            abandoned_workers=abandoned_workers,
            healthy=healthy,
            closed=closed,
            stages=stages,
            device_busy_fraction=device_busy_fraction,
            scheduler=scheduler,
            queue_wait_histogram=self.queue_wait_buckets.snapshot(),
            batch_run_histogram=self.batch_run_buckets.snapshot(),
        )
