"""OpenTelemetry metrics and traces for batchio batchers (extra ``otel``: the API package only).

``instrument(batcher)`` adds an observer (:meth:`batchio.Batcher.add_observer`) that

- exports the batcher's statistics through an OTel meter: observable counters and gauges that
  read :meth:`~batchio.Batcher.statistics` snapshots when the reader collects (on the reader's
  thread, never the loop's), and histograms recorded from each finished batch;
- traces each batch: one ``batchio.batch`` span, created after the fact with the batch's own
  start and end times, *linked* to the span of every request it carried (the span that was
  current when the request was submitted), and, in each such request's trace, a short
  ``batchio.request`` span (a child of that request's span) linked back to the batch span.

Why two kinds of span: a batch serves many requests from many traces, so it cannot be a child
of any one of them; it is a root span of its own, linked to each. But a trace viewer shows a
link on the span that holds it, so from one HTTP request's trace the batch would be invisible.
The ``batchio.request`` span puts the batch in that trace: it covers the request's time in the
batcher (from submission to delivery) and links to the batch span. ``request_spans=False``
turns them off (one span per batch only).

Which SDK, exporters, sampler and processors to use is the application's choice: this module
only uses the API (``opentelemetry.trace.get_tracer_provider()`` and
``opentelemetry.metrics.get_meter_provider()`` unless told). Spans are ended on the event
loop's thread, so use a ``BatchSpanProcessor`` (which exports from a thread of its own), not a
``SimpleSpanProcessor`` with a network exporter. Setup, names and a sample trace are in
``docs/observability.md``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, Final, Self

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TracerProvider

import batchio
from batchio import Batcher, BatcherStatistics, BatchRecord

from ._labels import BatcherLabels

__all__ = ["BATCH_SPAN", "REQUEST_SPAN", "SIZE_BUCKETS", "Instrumentation", "instrument"]

BATCH_SPAN: Final = "batchio.batch"
"""The name of the span of one batch (a root span, linked to its requests' spans)."""
REQUEST_SPAN: Final = "batchio.request"
"""The name of the span, in a request's own trace, of its time in one batch."""
SIZE_BUCKETS: Final = tuple(float(2**i) for i in range(13))
"""The bucket bounds advised for the ``batchio.batch_size`` histogram: 1, 2, 4, ... 4096 rows
(a View changes them)."""

_SCOPE: Final = "batchio"
_OUTCOMES: Final = ("completed", "failed", "cancelled", "timed_out", "rejected")

Snapshots = list[tuple[str, BatcherStatistics]]


# The tracer providers each batcher is traced with (weakly keyed: a batcher is not kept alive).
_TRACED: weakref.WeakKeyDictionary[Batcher[Any, Any], list[object]] = weakref.WeakKeyDictionary()
_TRACED_LOCK = threading.Lock()
_GLOBAL = object()  # (the global tracer provider, which tracer_provider=None means)


class Instrumentation:
    """What :func:`instrument` returns: the observer it added, until :meth:`uninstrument`.

    A context manager too: ``with instrument(b): ...`` uninstruments on exit.

    Attributes:
        batcher: the instrumented batcher.
        label: its ``batcher`` attribute in the metrics (its name, or ``name#2``... when
            another instrumented batcher has the same name; see ``docs/observability.md``);
            ``None`` without metrics.
    """

    def __init__(
        self,
        batcher: Batcher[Any, Any],
        *,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
        metrics_on: bool,
        tracing: bool,
        request_spans: bool,
    ) -> None:
        self.batcher = batcher
        self.label: str | None = None
        self._hub: _Meters | None = None
        self._traced: object = None
        tracer = None
        if tracing:
            # Once per tracer provider: a second observer would trace every batch twice.
            key: object = _GLOBAL if tracer_provider is None else tracer_provider
            with _TRACED_LOCK:
                providers = _TRACED.setdefault(batcher, [])
                if any(p is key for p in providers):
                    raise ValueError(f"{batcher!r} is already traced with this tracer provider")
                providers.append(key)
            self._traced = key
            tracer = trace.get_tracer(_SCOPE, batchio.__version__, tracer_provider)
        record: Callable[[BatchRecord], None] | None = None
        if metrics_on:
            try:
                self._hub = _Meters.of(meter_provider)
                self.label = self._hub.add(batcher)
            except BaseException:
                self._untrace()
                raise
            record = self._hub.recorder(self.label)
        self._observer = _Observer(tracer, record, request_spans)
        batcher.add_observer(self._observer)

    def uninstrument(self) -> None:
        """Remove the observer and stop exporting this batcher's metrics (idempotent).

        The observable counters and gauges stop; the histograms' series stay with their last
        values, as the SDK keeps every synchronous instrument's (see ``docs/observability.md``).

        Like :meth:`~batchio.Batcher.add_observer`, call it on the batcher's loop thread (or
        while it is not running).
        """
        self.batcher.remove_observer(self._observer)
        self._untrace()
        if self._hub is not None:
            self._hub.remove(self.batcher)
            self._hub = None

    def _untrace(self) -> None:
        key, self._traced = self._traced, None
        if key is not None:
            with _TRACED_LOCK:
                providers = _TRACED.get(self.batcher, [])
                providers[:] = [p for p in providers if p is not key]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstrument()


def instrument(
    batcher: Batcher[Any, Any],
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    metrics: bool = True,
    tracing: bool = True,
    request_spans: bool = True,
) -> Instrumentation:
    """Export ``batcher``'s metrics and trace its batches through OpenTelemetry.

    Call it on the batcher's event loop thread, or before the batcher starts (as
    :meth:`~batchio.Batcher.add_observer`); requests submitted from then on are traced.

    Args:
        batcher: the batcher to instrument.
        tracer_provider: where spans go; the global one (``trace.get_tracer_provider()``) if
            ``None``.
        meter_provider: where metrics go; the global one if ``None`` (set before or after
            this call). Each provider gets one set of ``batchio.*`` instruments, shared by the
            batchers instrumented with it; pass the global SDK provider either always or never.
        metrics: export the metrics (observable counters and gauges from statistics snapshots,
            histograms from each batch).
        tracing: create a ``batchio.batch`` span per batch, linked to the requests' spans.
        request_spans: with ``tracing``, also a ``batchio.request`` span in each traced
            request's own trace, per batch it rode in, linked to the batch span.

    Returns:
        The :class:`Instrumentation`; call its ``uninstrument()`` (or use it as a context
        manager) to stop.

    Raises:
        ValueError: ``batcher``'s metrics are already exported through this meter provider, or
            it is already traced with this tracer provider.
    """
    return Instrumentation(
        batcher,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        metrics_on=metrics,
        tracing=tracing,
        request_spans=request_spans,
    )


class _Observer:
    """The :class:`batchio.BatchObserver` :func:`instrument` adds."""

    __slots__ = ("_record", "_request_spans", "_tracer")

    def __init__(
        self,
        tracer: trace.Tracer | None,
        record: Callable[[BatchRecord], None] | None,
        request_spans: bool,
    ) -> None:
        self._tracer = tracer
        self._record = record
        self._request_spans = request_spans

    def capture(self) -> object:
        """The caller's current span context, if there is a valid one (and tracing is on)."""
        if self._tracer is None:
            return None
        ctx = trace.get_current_span().get_span_context()
        return ctx if ctx.is_valid else None

    def batch_done(self, record: BatchRecord) -> None:
        """Record the batch's histograms and spans."""
        if self._record is not None:
            self._record(record)
        if self._tracer is not None:
            self._trace(self._tracer, record)

    def _trace(self, tracer: trace.Tracer, record: BatchRecord) -> None:
        waits = record.queue_waits
        callers = [
            (ctx, wait, failed)
            for ctx, wait, failed in zip(record.contexts, waits, record.failed, strict=True)
            if isinstance(ctx, SpanContext)
        ]
        error = record.error
        attributes: dict[str, str | int | float] = {
            "batchio.batcher": record.batcher,
            "batchio.batch.rows": record.rows,
            "batchio.batch.requests": record.requests,
            "batchio.batch.failed_rows": record.failed_rows,
            "batchio.batch.run_seconds": record.run,
            "batchio.queue_wait.max_seconds": max(waits, default=0.0),
            "batchio.queue_wait.mean_seconds": sum(waits) / len(waits) if waits else 0.0,
        }
        if error is not None:
            attributes["error.type"] = type(error).__qualname__
        # A root span: it serves many traces, so it is a child of none of them.
        batch = tracer.start_span(
            BATCH_SPAN,
            context=trace.set_span_in_context(trace.INVALID_SPAN),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            links=[Link(ctx) for ctx, _, _ in callers],
            start_time=record.started_ns,
        )
        if error is not None:
            batch.record_exception(error, timestamp=record.ended_ns)
            batch.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        batch.end(end_time=record.ended_ns)
        if not self._request_spans:
            return
        to_batch = [Link(batch.get_span_context())]
        for ctx, wait, failed in callers:
            span = tracer.start_span(
                REQUEST_SPAN,
                context=trace.set_span_in_context(trace.NonRecordingSpan(ctx)),
                kind=SpanKind.INTERNAL,
                attributes={
                    "batchio.batcher": record.batcher,
                    "batchio.queue_wait_seconds": wait,
                    "batchio.batch.rows": record.rows,
                    "batchio.batch.requests": record.requests,
                },
                links=to_batch,
                # from its submission (this dispatch minus its wait) to the batch's delivery
                start_time=record.started_ns - int(wait * 1e9),
            )
            if error is not None:
                span.set_attribute("error.type", type(error).__qualname__)
                span.record_exception(error, timestamp=record.ended_ns)
                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            elif failed:  # its own row failed, in a batch that ran
                span.set_status(Status(StatusCode.ERROR, "the request's row failed"))
            span.end(end_time=record.ended_ns)


class _Meters:
    """One meter provider's ``batchio.*`` instruments, shared by every batcher instrumented
    with it (an OTel meter keeps the first callbacks registered under a name and drops later
    ones, so each instrument must exist once and report every batcher)."""

    @classmethod
    def of(cls, provider: MeterProvider | None) -> _Meters:
        """The instruments of ``provider`` (``None``: the global one), created on first use."""
        with _HUBS_LOCK:
            if provider is None:
                # One set for the global provider however often the application sets it: a
                # meter got before the SDK is set (the API's proxy) forwards to it once set,
                # and a second set under the same names would have its callbacks dropped.
                hub = _GLOBAL_HUB.get("global")
                if hub is None:
                    hub = _GLOBAL_HUB["global"] = cls(
                        metrics.get_meter(_SCOPE, batchio.__version__)
                    )
                return hub
            hub = _HUBS.get(provider)
            if hub is None:
                hub = _HUBS[provider] = cls(provider.get_meter(_SCOPE, batchio.__version__))
            return hub

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        # Weakly held: a batcher dropped without uninstrument() leaves the metrics on its own.
        self._batchers: dict[int, weakref.ref[Batcher[Any, Any]]] = {}
        self._labels = BatcherLabels(reuse=False)
        self._snapshots: Snapshots = []
        self._served: set[str] = set()
        self._init_instruments(meter)

    def add(self, batcher: Batcher[Any, Any]) -> str:
        """Report ``batcher`` from now on; returns its label."""
        with self._lock:
            if id(batcher) in self._batchers:
                raise ValueError(f"{batcher!r}'s metrics are already exported to this provider")
            key = id(batcher)
            self._batchers[key] = weakref.ref(batcher, lambda _: self._drop(key))
        return self._labels.label(batcher)

    def remove(self, batcher: Batcher[Any, Any]) -> None:
        """Stop reporting ``batcher`` (its label stays its own: see ``_labels``)."""
        self._drop(id(batcher))

    def _drop(self, key: int) -> None:
        # No lock: this is also the weakref callback, which the garbage collector may run on a
        # thread that holds self._lock already (in _take). dict.pop is atomic.
        self._batchers.pop(key, None)

    def _take(self, instrument: str) -> Snapshots:
        # Every observable instrument is called once per collection, each asking for the
        # snapshots: take them once per collection, not once per instrument. An instrument
        # asking again means a new collection has begun.
        with self._lock:
            if instrument in self._served or not self._served:
                self._served.clear()
                refs = self._batchers.copy()  # one atomic step: _drop may pop meanwhile
                batchers = [b for b in (ref() for ref in refs.values()) if b is not None]
                self._snapshots = [(self._labels.label(b), b.statistics()) for b in batchers]
            self._served.add(instrument)
            return self._snapshots

    def recorder(self, label: str) -> Callable[[BatchRecord], None]:
        """What records one batch of the batcher labelled ``label`` into the histograms."""
        attributes = {"batcher": label}
        size, wait, run = self._size, self._wait, self._run

        def record(rec: BatchRecord) -> None:
            size.record(rec.rows, attributes)
            run.record(rec.run, attributes)
            for w, first in zip(rec.queue_waits, rec.first, strict=True):
                if first:  # a map split over batches waited once
                    wait.record(w, attributes)

        return record

    def _init_instruments(self, meter: Meter) -> None:
        self._size = meter.create_histogram(
            "batchio.batch_size",
            unit="rows",
            description="Rows per batch.",
            explicit_bucket_boundaries_advisory=SIZE_BUCKETS,
        )
        self._wait = meter.create_histogram(
            "batchio.queue_wait",
            unit="s",
            description="Seconds from a request's submission to a dispatch of its rows.",
            explicit_bucket_boundaries_advisory=batchio.TIME_BUCKETS,
        )
        self._run = meter.create_histogram(
            "batchio.batch_run",
            unit="s",
            description="Seconds from a batch's dispatch to its results' delivery.",
            explicit_bucket_boundaries_advisory=batchio.TIME_BUCKETS,
        )
        for name, unit, description, read in _COUNTERS:
            meter.create_observable_counter(
                name, [self._callback(name, read)], unit=unit, description=description
            )
        for name, unit, description, read in _GAUGES:
            meter.create_observable_gauge(
                name, [self._callback(name, read)], unit=unit, description=description
            )

    def _callback(
        self, name: str, read: _Reader
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(v, {"batcher": label, **extra})
                for label, stats in self._take(name)
                for v, extra in read(stats)
            ]

        return callback


_HUBS: weakref.WeakKeyDictionary[MeterProvider, _Meters] = weakref.WeakKeyDictionary()
_GLOBAL_HUB: dict[str, _Meters] = {}
_HUBS_LOCK = threading.Lock()

_Reader = Callable[[BatcherStatistics], Iterator[tuple[float, dict[str, str]]]]


def _one(field: str) -> _Reader:
    def read(stats: BatcherStatistics) -> Iterator[tuple[float, dict[str, str]]]:
        yield float(getattr(stats, field)), {}

    return read


def _requests(stats: BatcherStatistics) -> Iterator[tuple[float, dict[str, str]]]:
    for outcome in _OUTCOMES:
        yield getattr(stats, outcome), {"outcome": outcome}


def _stage(field: str) -> _Reader:
    def read(stats: BatcherStatistics) -> Iterator[tuple[float, dict[str, str]]]:
        for stage in stats.stages:
            yield getattr(stage, field), {"stage": stage.name}

    return read


def _sched(field: str) -> _Reader:
    def read(stats: BatcherStatistics) -> Iterator[tuple[float, dict[str, str]]]:
        value = getattr(stats.scheduler, field, None)
        if value is not None:
            yield value, {}

    return read


def _reasons(stats: BatcherStatistics) -> Iterator[tuple[float, dict[str, str]]]:
    reasons = stats.scheduler.dispatch_reasons if stats.scheduler is not None else {}
    for reason, n in sorted(reasons.items()):
        yield n, {"reason": reason}


def _device_busy(stats: BatcherStatistics) -> Iterator[tuple[float, dict[str, str]]]:
    if stats.device_busy_fraction is not None:
        yield stats.device_busy_fraction, {}


# (name, unit, description, reader). With OTel's Prometheus exporter these become the names of
# batchio.integrations.prometheus ("." -> "_", the unit appended, "_total" on counters).
_COUNTERS: Final[tuple[tuple[str, str, str, _Reader], ...]] = (
    ("batchio.requests", "{request}", "Requests resolved, by outcome.", _requests),
    ("batchio.batches", "{batch}", "Batches run.", _one("batches")),
    ("batchio.rows", "{row}", "Rows run through the batch function.", _one("rows")),
    (
        "batchio.stalled_batches",
        "{batch}",
        "Batches that ran past batch_time_limit.",
        _one("stalled_batches"),
    ),
    ("batchio.stage.jobs", "{job}", "Jobs a stage completed.", _stage("jobs")),
    ("batchio.stage.busy", "s", "Seconds jobs spent in the stage.", _stage("busy_seconds")),
    ("batchio.scheduler.dispatches", "{batch}", "Batches dispatched, by reason.", _reasons),
    (
        "batchio.scheduler.early_timeouts",
        "{request}",
        "Requests failed early, predicted to miss their deadline.",
        _sched("early_timeouts"),
    ),
    (
        "batchio.scheduler.shed_requests",
        "{request}",
        "Requests shed from a full queue for a higher-priority one.",
        _sched("shed"),
    ),
)
_GAUGES: Final[tuple[tuple[str, str, str, _Reader], ...]] = (
    ("batchio.queue_depth", "rows", "Rows queued now.", _one("queue_depth")),
    ("batchio.pending_requests", "{request}", "Requests not yet resolved.", _one("pending")),
    ("batchio.in_flight_batches", "{batch}", "Batches running now.", _one("in_flight_batches")),
    (
        "batchio.abandoned_workers",
        "{thread}",
        "Worker threads left behind in a stalled batch.",
        _one("abandoned_workers"),
    ),
    ("batchio.healthy", "", "1 while the executor runs, 0 once it died.", _one("healthy")),
    ("batchio.closed", "", "1 once the batcher no longer accepts requests.", _one("closed")),
    ("batchio.stage.queue_depth", "jobs", "Jobs waiting for the stage.", _stage("queue_depth")),
    ("batchio.stage.workers", "{thread}", "Threads serving the stage.", _stage("workers")),
    ("batchio.device.busy_ratio", "1", "Share of time the device thread works.", _device_busy),
    (
        "batchio.scheduler.arrival_rate",
        "{row}/s",
        "Rows (cost units, with batch_cost) arriving per second, recently.",
        _sched("arrival_rate"),
    ),
    (
        "batchio.scheduler.latency_target",
        "s",
        "The adaptive policy's latency target.",
        _sched("latency_target"),
    ),
)
