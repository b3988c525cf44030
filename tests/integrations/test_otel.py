"""OpenTelemetry metrics and traces, read back through the real SDK's in-memory reader and
exporter."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import subprocess
import sys
import threading
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    NumberDataPoint,
)
from opentelemetry.trace import SpanContext, StatusCode

import batchio
from batchio import Batcher, Stages
from batchio.integrations.otel import BATCH_SPAN, REQUEST_SPAN, instrument
from batchio.testing import GatedBatchFn

from ..conftest import GATE_TIMEOUT
from ._otel import Otel

pytestmark = pytest.mark.anyio

_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


def value(points: dict[str, list[Any]], name: str, **attributes: str) -> float:
    """The value of the one data point of ``name`` with exactly ``attributes``."""
    found = [p for p in points.get(name, []) if dict(p.attributes) == attributes]
    assert len(found) == 1, (name, attributes, points.get(name))
    point = found[0]
    assert isinstance(point, NumberDataPoint)
    return point.value


def histogram(points: dict[str, list[Any]], name: str, batcher: str) -> HistogramDataPoint:
    found = [p for p in points.get(name, []) if dict(p.attributes) == {"batcher": batcher}]
    assert len(found) == 1, (name, batcher)
    assert isinstance(found[0], HistogramDataPoint)
    return found[0]


def labels(points: dict[str, list[Any]], name: str) -> set[str]:
    return {dict(p.attributes)["batcher"] for p in points.get(name, [])}


async def test_one_span_per_batch_linked_to_the_requests_spans(otel: Otel) -> None:
    """Four requests, each in its own span, ride one batch: one ``batchio.batch`` span whose
    links are exactly the four request spans, and in each request's trace a
    ``batchio.request`` child span linked back to the batch span."""
    name = unique("traced")
    async with Batcher(
        lambda xs: [x * 2 for x in xs], max_batch_size=4, max_wait=GATE_TIMEOUT, name=name
    ) as b:
        otel.instrument(b)
        calls = await asyncio.gather(*(otel.call(b, x) for x in range(4)))
    assert [r for r, _ in calls] == [0, 2, 4, 6]
    callers = {ctx.span_id: ctx for _, ctx in calls}

    (batch,) = otel.finished(BATCH_SPAN)
    assert batch.parent is None  # a root: it serves four traces
    assert {link.context.span_id for link in batch.links} == set(callers)
    assert {link.context.trace_id for link in batch.links} == {c.trace_id for c in callers.values()}
    attrs: dict[str, Any] = dict(batch.attributes or {})
    assert attrs["batchio.batcher"] == name
    assert attrs["batchio.batch.rows"] == 4
    assert attrs["batchio.batch.requests"] == 4
    assert attrs["batchio.batch.failed_rows"] == 0
    assert attrs["batchio.batch.run_seconds"] >= 0
    assert attrs["batchio.queue_wait.max_seconds"] >= attrs["batchio.queue_wait.mean_seconds"] >= 0
    assert "error.type" not in attrs
    assert batch.status.status_code is StatusCode.UNSET
    assert batch.start_time is not None
    assert batch.end_time is not None
    assert batch.start_time <= batch.end_time

    requests = otel.finished(REQUEST_SPAN)
    assert len(requests) == 4
    batch_ctx = batch.get_span_context()
    for span in requests:
        assert span.parent is not None
        caller = callers[span.parent.span_id]
        assert span.context.trace_id == caller.trace_id  # in the caller's own trace
        assert [link.context for link in span.links] == [batch_ctx]
        assert span.end_time == batch.end_time
        assert span.start_time is not None
        assert span.end_time is not None
        assert span.start_time <= span.end_time
        span_attrs: dict[str, Any] = dict(span.attributes or {})
        assert span_attrs["batchio.batcher"] == name
        assert span_attrs["batchio.batch.rows"] == 4
        assert span_attrs["batchio.queue_wait_seconds"] >= 0


async def test_a_failing_batch_has_an_error_status(otel: Otel) -> None:
    """The function raises: the batch span (and each request's span) is an error, with the
    exception recorded."""
    name = unique("failing")

    def fn(xs: list[int]) -> list[int]:
        raise KeyError("no such row")

    async with Batcher(fn, max_batch_size=2, max_wait=GATE_TIMEOUT, name=name) as b:
        otel.instrument(b)
        calls = await asyncio.gather(otel.call(b, 1), otel.call(b, 2))
    assert all(isinstance(r, KeyError) for r, _ in calls)
    (batch,) = otel.finished(BATCH_SPAN)
    assert batch.status.status_code is StatusCode.ERROR
    assert "KeyError" in (batch.status.description or "")
    assert dict(batch.attributes or {})["error.type"] == "KeyError"
    assert dict(batch.attributes or {})["batchio.batch.failed_rows"] == 2
    (event,) = batch.events
    assert event.name == "exception"
    assert dict(event.attributes or {})["exception.type"] == "KeyError"
    requests = otel.finished(REQUEST_SPAN)
    assert len(requests) == 2
    assert all(s.status.status_code is StatusCode.ERROR for s in requests)


async def test_a_failed_row_alone_leaves_the_batch_span_ok(otel: Otel) -> None:
    """A per-row exception fails one request, not the batch: status unset, failed_rows 1."""
    name = unique("row")

    def fn(xs: list[int]) -> list[Any]:
        return [ValueError("bad row") if x < 0 else x for x in xs]

    async with Batcher(fn, max_batch_size=2, max_wait=GATE_TIMEOUT, name=name) as b:
        otel.instrument(b)
        calls = await asyncio.gather(otel.call(b, -1), otel.call(b, 5))
    assert isinstance(calls[0][0], ValueError)
    assert calls[1][0] == 5
    (batch,) = otel.finished(BATCH_SPAN)
    assert batch.status.status_code is StatusCode.UNSET
    assert dict(batch.attributes or {})["batchio.batch.failed_rows"] == 1
    # The failed request's own span says so; its neighbour's does not.
    by_parent = {
        s.parent.span_id: s.status.status_code
        for s in otel.finished(REQUEST_SPAN)
        if s.parent is not None
    }
    assert by_parent[calls[0][1].span_id] is StatusCode.ERROR
    assert by_parent[calls[1][1].span_id] is StatusCode.UNSET


async def test_a_map_split_over_batches_waits_once_in_the_histogram(otel: Otel) -> None:
    name = unique("split")
    async with Batcher(lambda xs: xs, max_batch_size=2, max_wait=0.0, name=name) as b:
        otel.instrument(b, tracing=False)
        assert await b.map([1, 2, 3, 4, 5]) == [1, 2, 3, 4, 5]  # three batches
    points = otel.points()
    assert histogram(points, "batchio.batch_size", name).count == 3
    assert histogram(points, "batchio.queue_wait", name).count == 1  # one request


async def test_requests_without_a_span_are_not_linked(otel: Otel) -> None:
    """A request with no current span, or submitted before instrumenting, adds no link and no
    request span; the batch span is still there."""
    name = unique("untraced")
    fn = GatedBatchFn[int, int](lambda x: x, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0.0, name=name) as b:
        early = b.submit_nowait(0)  # dispatched before the observer exists
        await fn.wait_entered()
        queued = b.submit_nowait(1)  # queued before the observer: nothing captured
        handle = otel.instrument(b)
        fn.open()
        assert await early == 0
        assert await queued == 1
        assert await b(2) == 2  # no current span
        handle.uninstrument()
    spans = otel.finished(BATCH_SPAN)
    # the batch dispatched before instrument() is reported too (it was delivered after)
    assert [dict(s.attributes or {})["batchio.batch.rows"] for s in spans] == [1, 1, 1]
    assert all(not s.links for s in spans)
    assert not otel.finished(REQUEST_SPAN)


async def test_request_spans_can_be_turned_off(otel: Otel) -> None:
    name = unique("quiet")
    async with Batcher(lambda xs: xs, max_batch_size=2, max_wait=GATE_TIMEOUT, name=name) as b:
        with otel.instrument(b, request_spans=False, metrics=False) as handle:
            assert handle.label is None
            calls = await asyncio.gather(otel.call(b, 1), otel.call(b, 2))
    (batch,) = otel.finished(BATCH_SPAN)
    assert {link.context.span_id for link in batch.links} == {c.span_id for _, c in calls}
    assert not otel.finished(REQUEST_SPAN)


async def test_metrics_read_back_exactly(otel: Otel) -> None:
    """Counters and gauges from the statistics, histograms from the batches, collected on a
    thread while a batch is held (the loop's thread blocked meanwhile), then after."""
    name = unique("metered")
    fn = GatedBatchFn[int, int](lambda x: x + 1, gated=True)
    async with Batcher(fn, max_batch_size=4, max_wait=0.0, name=name) as b:
        handle = otel.instrument(b, tracing=False)
        assert handle.label == name
        first = b.submit_nowait(0)
        await fn.wait_entered()
        rest = [b.submit_nowait(i) for i in range(1, 7)]  # 6 rows queued behind the held batch

        got: list[dict[str, list[Any]]] = []
        thread = threading.Thread(target=lambda: got.append(otel.points()))
        thread.start()
        thread.join(GATE_TIMEOUT)  # blocks the loop: the collection needs nothing from it
        (held,) = got
        assert value(held, "batchio.in_flight_batches", batcher=name) == 1
        assert value(held, "batchio.queue_depth", batcher=name) == 6
        assert value(held, "batchio.pending_requests", batcher=name) == 7
        assert value(held, "batchio.healthy", batcher=name) == 1

        fn.open()
        assert await first == 1
        assert await asyncio.gather(*rest) == [2, 3, 4, 5, 6, 7]
        assert await b.map([10, 11]) == [11, 12]
    after = otel.points()  # closed: every batch has left in_flight_batches
    # batches: [0], [1, 2, 3, 4], [5, 6], [10, 11]
    assert value(after, "batchio.requests", batcher=name, outcome="completed") == 8
    for outcome in ("failed", "cancelled", "timed_out", "rejected"):
        assert value(after, "batchio.requests", batcher=name, outcome=outcome) == 0
    assert value(after, "batchio.batches", batcher=name) == 4
    assert value(after, "batchio.rows", batcher=name) == 9
    assert value(after, "batchio.queue_depth", batcher=name) == 0
    assert value(after, "batchio.in_flight_batches", batcher=name) == 0
    assert value(after, "batchio.closed", batcher=name) == 1
    size = histogram(after, "batchio.batch_size", name)
    assert (size.count, size.sum, size.min, size.max) == (4, 9, 1, 4)
    assert list(size.explicit_bounds[:4]) == [1, 2, 4, 8]
    assert list(size.bucket_counts[:4]) == [1, 2, 1, 0]  # (..1], (1..2], (2..4], (4..8]
    assert histogram(after, "batchio.queue_wait", name).count == 8  # one per request
    run = histogram(after, "batchio.batch_run", name)
    assert run.count == 4
    assert list(run.explicit_bounds) == list(batchio.TIME_BUCKETS)
    reasons = [p.value for p in after["batchio.scheduler.dispatches"]]
    assert sum(reasons) == 4
    assert value(after, "batchio.scheduler.shed_requests", batcher=name) == 0
    assert value(after, "batchio.scheduler.arrival_rate", batcher=name) >= 0
    assert "batchio.device.busy_ratio" not in after  # not a staged batcher
    handle.uninstrument()
    handle.uninstrument()  # idempotent
    assert name not in labels(otel.points(), "batchio.batches")


async def test_stage_metrics(otel: Otel) -> None:
    name = unique("staged")
    stages = Stages[int, int](
        prepare=lambda xs: [x + 1 for x in xs],
        run=lambda xs: [x * 2 for x in xs],
        finish=lambda xs: list(xs),
        prepare_workers=2,
    )
    async with Batcher(stages, max_batch_size=4, max_wait=0.0, latency_target=1.0, name=name) as b:
        with otel.instrument(b, tracing=False):
            await b.map(range(8))
            got = otel.points()
    for stage, workers in (("prepare", 2), ("device", 1), ("finish", 1)):
        assert value(got, "batchio.stage.jobs", batcher=name, stage=stage) == 2
        assert value(got, "batchio.stage.workers", batcher=name, stage=stage) == workers
        assert value(got, "batchio.stage.queue_depth", batcher=name, stage=stage) == 0
        assert value(got, "batchio.stage.busy", batcher=name, stage=stage) > 0
    assert 0 < value(got, "batchio.device.busy_ratio", batcher=name) <= 1
    assert value(got, "batchio.scheduler.latency_target", batcher=name) == 1.0


async def test_one_provider_one_series_per_batcher(otel: Otel) -> None:
    """A batcher is instrumented once per meter provider; two batchers with one name are
    ``name`` and ``name#2``; a second provider gets instruments of its own."""
    name = unique("twin")
    other = Otel()
    try:
        async with (
            Batcher(lambda xs: xs, name=name) as one,
            Batcher(lambda xs: xs, name=name) as two,
        ):
            first = otel.instrument(one, tracing=False)
            with pytest.raises(ValueError, match="already exported"):
                otel.instrument(one)
            second = otel.instrument(two, tracing=False)
            elsewhere = other.instrument(two, tracing=False)
            assert (first.label, second.label, elsewhere.label) == (name, f"{name}#2", name)
            await one(1)
            await two.map([1, 2])
            got = otel.points()
            assert value(got, "batchio.rows", batcher=name) == 1
            assert value(got, "batchio.rows", batcher=f"{name}#2") == 2
            assert value(other.points(), "batchio.rows", batcher=name) == 2
            first.uninstrument()
            assert otel.instrument(one, tracing=False).label == name  # its label was freed
    finally:
        other.tracer_provider.shutdown()
        other.meter_provider.shutdown()


async def test_a_dropped_batcher_leaves_the_metrics(otel: Otel) -> None:
    """The meter holds batchers weakly: one garbage-collected without uninstrument() is no
    longer reported."""
    name = unique("dropped")
    async with Batcher(lambda xs: xs, name=name) as b:
        otel.instrument(b, tracing=False)
        await b(1)
    assert name in labels(otel.points(), "batchio.batches")
    del b
    gc.collect()
    assert name not in labels(otel.points(), "batchio.batches")


async def test_tracing_off_captures_nothing(otel: Otel) -> None:
    name = unique("metrics-only")
    async with Batcher(lambda xs: xs, max_batch_size=1, name=name) as b:
        with otel.instrument(b, tracing=False):
            await otel.call(b, 1)
    assert [s.name for s in otel.spans.get_finished_spans()] == ["request 1"]


# The global providers can be set once per process, so this runs in a process of its own.
GLOBAL_PROVIDERS = """
import asyncio, json
import batchio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from batchio.integrations.otel import instrument

async def main():
    async with (
        batchio.Batcher(lambda xs: xs, name="early") as early,
        batchio.Batcher(lambda xs: xs, name="late") as late,
    ):
        instrument(early)  # before the SDK is set: the API's proxy providers
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
        trace.set_tracer_provider(tracer_provider)
        instrument(late)
        with trace.get_tracer("caller").start_as_current_span("caller"):
            await early.map([1, 2])
            await late(1)
        data = reader.get_metrics_data()
    rows = {
        p.attributes["batcher"]: p.value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "batchio.rows"
        for p in m.data.data_points
    }
    batches = [s for s in spans.get_finished_spans() if s.name == "batchio.batch"]
    print(json.dumps({"rows": rows, "batch_spans": len(batches)}))

asyncio.run(main())
"""


def test_the_global_providers_before_and_after_the_sdk_is_set() -> None:
    """Batchers instrumented with the global providers, before and after the application sets
    the SDK's, are all exported: one set of instruments serves them (a second set under the
    same names would have its callbacks dropped by the SDK)."""
    done = subprocess.run(
        [sys.executable, "-c", GLOBAL_PROVIDERS],
        capture_output=True,
        text=True,
        timeout=GATE_TIMEOUT * 2,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"rows": {"early": 2, "late": 1}, "batch_spans": 2}


async def test_the_global_providers_unset_cost_nothing() -> None:
    """With no SDK set (the API's no-op proxies), instrumenting works and records nothing."""
    name = unique("global")
    async with Batcher(lambda xs: xs, max_batch_size=1, name=name) as b:
        with instrument(b) as handle:
            assert handle.label == name
            assert await b(1) == 1
        assert await b(2) == 2


async def test_calls_from_threads_link_the_threads_spans(otel: Otel) -> None:
    """``call_sync`` from worker threads, each inside a span of its own: the span current on
    the calling thread is what the batch links to (capture runs in the caller's context)."""
    name = unique("threads")

    def caller(x: int) -> tuple[int, SpanContext]:
        with otel.tracer.start_as_current_span(f"thread {x}") as span:
            return b.call_sync(x), span.get_span_context()

    async with Batcher(
        lambda xs: [x + 1 for x in xs], max_batch_size=2, max_wait=GATE_TIMEOUT, name=name
    ) as b:
        otel.instrument(b)
        calls = await asyncio.gather(*(asyncio.to_thread(caller, x) for x in (1, 2)))
    assert [r for r, _ in calls] == [2, 3]
    (batch,) = otel.finished(BATCH_SPAN)
    assert {link.context.span_id for link in batch.links} == {c.span_id for _, c in calls}
    parents = {s.parent.span_id for s in otel.finished(REQUEST_SPAN) if s.parent is not None}
    assert parents == {c.span_id for _, c in calls}
