"""Prometheus metrics for batchio batchers, through ``prometheus_client`` (extra ``prometheus``).

:class:`BatchioCollector` is a custom collector: at each scrape it reads every batcher's
:meth:`~batchio.Batcher.statistics` snapshot and turns it into metric families, one series per
batcher (label ``batcher``). Nothing is counted twice and nothing is kept in between: the batcher
already counts, the collector only translates. A scrape never blocks the event loop, never
starts a batcher, and runs on whatever thread the exporter scrapes from.

Serve it with prometheus_client as usual::

    from prometheus_client import start_http_server
    from batchio.integrations.prometheus import register

    register()               # every live batcher, into prometheus_client.REGISTRY
    start_http_server(9464)  # standalone: a thread serving /metrics

or, in an ASGI app (FastAPI)::

    from prometheus_client import make_asgi_app
    register()
    app.mount("/metrics", make_asgi_app())

The metric names and what they mean are listed in ``docs/observability.md``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, CollectorRegistry

import batchio
from batchio import Batcher, BatcherStatistics, Histogram

from ._labels import BatcherLabels

__all__ = ["OUTCOMES", "BatchioCollector", "batch_size_bounds", "register"]

OUTCOMES: Final = ("completed", "failed", "cancelled", "timed_out", "rejected")
"""The ``outcome`` label values of ``batchio_requests_total``: the statistics' field names."""


def batch_size_bounds(max_batch_size: int, largest: int = 0) -> tuple[int, ...]:
    """The buckets of ``batchio_batch_size_rows``: powers of two, and the largest batch size.

    Powers of two from 1 up to ``max_batch_size``, plus ``max_batch_size - 1`` and
    ``max_batch_size`` themselves, so that the full batches are one bucket's count minus the
    previous one's. A batch larger than ``max_batch_size`` (seen after ``reconfigure`` shrank
    it) extends the powers of two up to ``largest``.
    """
    bounds = {max_batch_size - 1, max_batch_size} - {0}
    power = 1
    while power < max(max_batch_size, largest):
        bounds.add(power)
        power *= 2
    if largest > max(bounds, default=0):
        bounds.add(power)
    return tuple(sorted(bounds))


class BatchioCollector:
    """A ``prometheus_client`` collector of batchio batchers' statistics.

    Args:
        batchers: the batchers to export; ``None`` (the default) exports
            :func:`batchio.live_batchers` as listed at each scrape, so batchers started later
            appear on their own. An explicit iterable is read once, here.

    Every series has the label ``batcher``: the batcher's ``name``. Two batchers with one name
    are told apart deterministically: the first (in start order, or in ``batchers``' order)
    keeps the name, each later one gets the lowest free ``name#2``, ``name#3``, ..., and keeps
    it for its whole life.

    Register it with :func:`register` (or ``registry.register(BatchioCollector(...))``). One
    collector per registry: a second one would export the same series twice, which the
    registry refuses.
    """

    def __init__(self, batchers: Iterable[Batcher[Any, Any]] | None = None) -> None:
        self._batchers = None if batchers is None else tuple(batchers)
        self._labels = BatcherLabels()
        # Every batch-size bound exported so far, per batcher: a bucket series, once exported,
        # stays (a reconfigure() of max_batch_size adds bounds, never removes one).
        self._bounds: weakref.WeakKeyDictionary[Batcher[Any, Any], frozenset[int]] = (
            weakref.WeakKeyDictionary()
        )
        self._bounds_lock = threading.Lock()

    def describe(self) -> list[Metric]:
        """The metric families without samples, so registering never scrapes a batcher."""
        return list(_Families())

    def collect(self) -> Iterator[Metric]:
        """Read every batcher's statistics snapshot and yield the metric families."""
        batchers = batchio.live_batchers() if self._batchers is None else self._batchers
        families = _Families()
        for batcher, label in self._labels.labelled(batchers):
            stats = batcher.statistics()
            largest = max(stats.batch_size_histogram, default=0)
            now = batch_size_bounds(batcher.max_batch_size, largest)
            with self._bounds_lock:  # (two scrapes at once, from two exporter threads)
                bounds = self._bounds[batcher] = self._bounds.get(batcher, frozenset()) | set(now)
            families.add(label, stats, tuple(sorted(bounds)))
        yield from families


def register(
    registry: CollectorRegistry = REGISTRY,
    batchers: Iterable[Batcher[Any, Any]] | None = None,
) -> BatchioCollector:
    """Register a :class:`BatchioCollector` of ``batchers`` (``None``: every live batcher) with
    ``registry`` (``prometheus_client``'s default one unless told), and return it.

    ``registry.unregister(collector)`` takes it off again.

    Raises:
        ValueError: ``registry`` already exports these metric names (a second collector).
    """
    collector = BatchioCollector(batchers)
    registry.register(collector)
    return collector


def _le(bound: float) -> str:
    # The text format's spelling of a bucket's upper bound: "+Inf", else a float ("4.0").
    return "+Inf" if bound == math.inf else repr(float(bound))


def _buckets(pairs: Iterable[tuple[float, int]]) -> list[tuple[str, float]]:
    return [(_le(bound), float(count)) for bound, count in pairs]


def _size_buckets(sizes: Mapping[int, int], bounds: tuple[int, ...]) -> list[tuple[str, float]]:
    pairs: list[tuple[float, int]] = []
    ordered = sorted(sizes.items())
    total = i = 0
    for bound in bounds:
        while i < len(ordered) and ordered[i][0] <= bound:
            total += ordered[i][1]
            i += 1
        pairs.append((bound, total))
    pairs.append((math.inf, sum(sizes.values())))
    return _buckets(pairs)


class _Families:
    """The metric families of one scrape, filled batcher by batcher."""

    def __init__(self) -> None:
        b = ["batcher"]
        s = ["batcher", "stage"]
        self.requests = CounterMetricFamily(
            "batchio_requests",
            "Requests resolved, by outcome (rejected: refused at the door, never queued).",
            labels=["batcher", "outcome"],
        )
        self.batches = CounterMetricFamily("batchio_batches", "Batches run.", labels=b)
        self.rows = CounterMetricFamily(
            "batchio_rows", "Rows run through the batch function.", labels=b
        )
        self.stalled = CounterMetricFamily(
            "batchio_stalled_batches", "Batches that ran past batch_time_limit.", labels=b
        )
        self.size = HistogramMetricFamily(
            "batchio_batch_size_rows", "Rows per batch (exact: from every batch).", labels=b
        )
        self.queue_wait = HistogramMetricFamily(
            "batchio_queue_wait_seconds",
            "Seconds from a request's submission to the dispatch of its first row.",
            labels=b,
        )
        self.batch_run = HistogramMetricFamily(
            "batchio_batch_run_seconds",
            "Seconds from a batch's dispatch to its results' delivery.",
            labels=b,
        )
        self.queue_depth = GaugeMetricFamily(
            "batchio_queue_depth_rows", "Rows queued now.", labels=b
        )
        self.pending = GaugeMetricFamily(
            "batchio_pending_requests", "Accepted requests not yet resolved.", labels=b
        )
        self.in_flight = GaugeMetricFamily(
            "batchio_in_flight_batches", "Batches running now.", labels=b
        )
        self.abandoned = GaugeMetricFamily(
            "batchio_abandoned_workers",
            "Worker threads left behind in a stalled batch, not returned yet.",
            labels=b,
        )
        self.healthy = GaugeMetricFamily(
            "batchio_healthy", "1 while the executor runs, 0 once it has died.", labels=b
        )
        self.closed = GaugeMetricFamily(
            "batchio_closed", "1 once the batcher no longer accepts requests.", labels=b
        )
        self.stage_jobs = CounterMetricFamily(
            "batchio_stage_jobs", "Jobs a stage of a staged batcher completed.", labels=s
        )
        self.stage_busy = CounterMetricFamily(
            "batchio_stage_busy_seconds",
            "Seconds this batcher's jobs spent running in the stage.",
            labels=s,
        )
        self.stage_queue = GaugeMetricFamily(
            "batchio_stage_queue_depth_jobs",
            "This batcher's jobs waiting for a worker of the stage now.",
            labels=s,
        )
        self.stage_workers = GaugeMetricFamily(
            "batchio_stage_workers", "Threads serving the stage.", labels=s
        )
        self.device_busy = GaugeMetricFamily(
            "batchio_device_busy_ratio",
            "Share of wall time the staged batcher's device thread has been working (0 to 1).",
            labels=b,
        )
        self.dispatches = CounterMetricFamily(
            "batchio_scheduler_dispatches",
            "Batches dispatched, by the scheduler's reason.",
            labels=["batcher", "reason"],
        )
        self.arrival = GaugeMetricFamily(
            "batchio_scheduler_arrival_rate_per_second",
            "Rows (cost units, with batch_cost) arriving per second, recently.",
            labels=b,
        )
        self.early = CounterMetricFamily(
            "batchio_scheduler_early_timeouts",
            "Requests failed early, predicted to miss their deadline (early_timeout=True).",
            labels=b,
        )
        self.shed = CounterMetricFamily(
            "batchio_scheduler_shed_requests",
            "Requests shed from a full queue for a higher-priority one (when_full='shed').",
            labels=b,
        )
        self.target = GaugeMetricFamily(
            "batchio_scheduler_latency_target_seconds",
            "The adaptive policy's latency target (latency_target batchers only).",
            labels=b,
        )

    def __iter__(self) -> Iterator[Metric]:
        return (m for m in vars(self).values() if isinstance(m, Metric))

    def add(self, label: str, stats: BatcherStatistics, size_bounds: tuple[int, ...]) -> None:
        """Add one batcher's snapshot ``stats`` under ``batcher=label``, its batch sizes in the
        buckets ``size_bounds``."""
        b = [label]
        for outcome in OUTCOMES:
            self.requests.add_metric([label, outcome], getattr(stats, outcome))
        self.batches.add_metric(b, stats.batches)
        self.rows.add_metric(b, stats.rows)
        self.stalled.add_metric(b, stats.stalled_batches)
        sizes = stats.batch_size_histogram
        self.size.add_metric(
            b,
            _size_buckets(sizes, size_bounds),
            float(sum(size * n for size, n in sizes.items())),
        )
        self._histogram(self.queue_wait, b, stats.queue_wait_histogram)
        self._histogram(self.batch_run, b, stats.batch_run_histogram)
        self.queue_depth.add_metric(b, stats.queue_depth)
        self.pending.add_metric(b, stats.pending)
        self.in_flight.add_metric(b, stats.in_flight_batches)
        self.abandoned.add_metric(b, stats.abandoned_workers)
        self.healthy.add_metric(b, float(stats.healthy))
        self.closed.add_metric(b, float(stats.closed))
        for stage in stats.stages:
            s = [label, stage.name]
            self.stage_jobs.add_metric(s, stage.jobs)
            self.stage_busy.add_metric(s, stage.busy_seconds)
            self.stage_queue.add_metric(s, stage.queue_depth)
            self.stage_workers.add_metric(s, stage.workers)
        if stats.device_busy_fraction is not None:
            self.device_busy.add_metric(b, stats.device_busy_fraction)
        sched = stats.scheduler
        if sched is None:  # pragma: no cover - statistics() always sets it (optional by type)
            return
        for reason, n in sorted(sched.dispatch_reasons.items()):
            self.dispatches.add_metric([label, reason], n)
        self.arrival.add_metric(b, sched.arrival_rate)
        self.early.add_metric(b, sched.early_timeouts)
        self.shed.add_metric(b, sched.shed)
        if sched.latency_target is not None:
            self.target.add_metric(b, sched.latency_target)

    @staticmethod
    def _histogram(family: HistogramMetricFamily, b: list[str], hist: Histogram) -> None:
        family.add_metric(b, _buckets(hist.cumulative()), hist.sum)
