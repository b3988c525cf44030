"""Adversarial review of the production integrations: the Prometheus collector, the OTel
instrumentation and the FastAPI example's edges.

Each test's docstring states the defect it pins (or, for the passing ones, the claim it adds
coverage for). Everything is read back through the real libraries: prometheus_client's text
exposition and parsers, the OTel SDK's in-memory reader and exporter, uvicorn over a socket.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    NumberDataPoint,
)
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families

from batchio import Batcher, Stages
from batchio.integrations.otel import BATCH_SPAN, REQUEST_SPAN, instrument
from batchio.integrations.prometheus import register
from examples.fastapi_app import Settings

from ..conftest import wait_event
from ._otel import Otel
from .test_http_server import (
    ShutdownProbe,
    client,
    fake_app,
    fake_vector,
    served_fake,
    serving,
    uvicorn_loop,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

_names = itertools.count()


def unique(prefix: str) -> str:
    """A batcher name no other test uses (live batchers of other tests may still be listed)."""
    return f"review-{prefix}-{next(_names)}"


# --- helpers ------------------------------------------------------------------------------


def points(otel: Otel) -> dict[tuple[str, frozenset[tuple[str, Any]]], Any]:
    """Every data point of one collection, by (instrument name, attributes)."""
    data = otel.reader.get_metrics_data()
    assert data is not None
    return {
        (m.name, frozenset((p.attributes or {}).items())): p
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for p in m.data.data_points
    }


def bucket_les(registry: CollectorRegistry, batcher: str) -> list[str]:
    """The ``le`` values of ``batchio_batch_size_rows`` for ``batcher``, in exposition order."""
    text = generate_latest(registry).decode()
    return [
        s.labels["le"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "batchio_batch_size_rows_bucket" and s.labels["batcher"] == batcher
    ]


# --- Prometheus ---------------------------------------------------------------------------


async def test_prometheus_bucket_series_survive_a_live_max_batch_size_change() -> None:
    """DEFECT: ``batchio_batch_size_rows``'s bucket bounds are recomputed from the *current*
    ``max_batch_size`` at every scrape (``batch_size_bounds(max_batch_size, largest)``), so a
    live ``reconfigure(max_batch_size=...)`` makes bucket series vanish between two scrapes:
    8 -> 16 drops ``le="7.0"``, 16 -> 4 drops ``le="15.0"`` and ``le="16.0"``. A vanished bucket
    is a series that goes stale in Prometheus, and ``histogram_quantile`` over a ``rate()``
    window that spans the change mixes two bucket layouts.

    Expected: a histogram series' bucket set only ever grows; every ``le`` exported once keeps
    being exported for as long as the batcher is.
    """
    name = unique("buckets")
    registry = CollectorRegistry()
    async with Batcher(lambda xs: xs, max_batch_size=8, max_wait=0.0, name=name) as b:
        register(registry, [b])
        await b.map(range(8))
        seen = set(bucket_les(registry, name))
        for size in (16, 4):
            b.reconfigure(max_batch_size=size)
            await b.map(range(3))
            now = set(bucket_les(registry, name))
            assert seen <= now, f"after max_batch_size={size}: {sorted(seen - now)} vanished"
            seen |= now


async def test_prometheus_openmetrics_exposition_parses_strictly() -> None:
    """Coverage (passes): the collector's families also render in the OpenMetrics format,
    which Prometheus negotiates from ``make_asgi_app`` / ``start_http_server``, and the strict
    OpenMetrics parser (canonical ``le`` values, sorted buckets, ``+Inf`` == count) accepts
    them, for a plain and a staged batcher with every kind of sample present."""
    plain, staged = unique("om-plain"), unique("om-staged")
    registry = CollectorRegistry()
    stages = Stages[int, int](prepare=lambda xs: xs, run=lambda xs: xs, finish=lambda xs: xs)
    async with (
        Batcher(lambda xs: xs, max_batch_size=5, max_wait=0.0, name=plain, latency_target=1.0) as a,
        Batcher(stages, max_batch_size=3, max_wait=0.0, name=staged) as s,
    ):
        register(registry, [a, s])
        await a.map(range(7))
        await s.map(range(4))
        text = openmetrics.generate_latest(registry).decode()  # type: ignore[no-untyped-call]
    parsed = openmetrics_parser.text_string_to_metric_families(text)  # type: ignore[no-untyped-call]
    families = {f.name: f for f in parsed}
    size = families["batchio_batch_size_rows"]
    buckets = {
        s.labels["le"]: s.value
        for s in size.samples
        if s.name.endswith("_bucket") and s.labels["batcher"] == plain
    }
    count = next(
        s.value for s in size.samples if s.name.endswith("_count") and s.labels["batcher"] == plain
    )
    assert buckets["+Inf"] == count == 2  # batches of 5 and 2
    assert families["batchio_stage_jobs"].type == "counter"


# --- OpenTelemetry: metrics ---------------------------------------------------------------


def _monotonic_violations(
    before: dict[tuple[str, frozenset[tuple[str, Any]]], Any],
    after: dict[tuple[str, frozenset[tuple[str, Any]]], Any],
) -> list[str]:
    """Counter and histogram series that went down within one cumulative stream (same
    attributes and the same start time), which OTel's data model forbids."""
    bad = []
    for key, old in before.items():
        new = after.get(key)
        if new is None or new.start_time_unix_nano != old.start_time_unix_nano:
            continue
        if isinstance(old, HistogramDataPoint):
            if new.count < old.count:
                bad.append(f"{key[0]} {dict(key[1])}: count {old.count} -> {new.count}")
        elif isinstance(old, NumberDataPoint) and key[0] in MONOTONIC and new.value < old.value:
            bad.append(f"{key[0]} {dict(key[1])}: {old.value} -> {new.value}")
    return bad


MONOTONIC = {
    "batchio.requests",
    "batchio.batches",
    "batchio.rows",
    "batchio.stalled_batches",
    "batchio.stage.jobs",
    "batchio.stage.busy",
    "batchio.scheduler.dispatches",
    "batchio.scheduler.early_timeouts",
    "batchio.scheduler.shed_requests",
}


@pytest.mark.parametrize("how", ["uninstrument", "garbage-collected"])
async def test_otel_a_freed_label_given_to_another_batcher_corrupts_its_series(
    otel: Otel, how: str
) -> None:
    """DEFECT: once batcher A (name ``x``) is uninstrumented, or garbage-collected, the
    meter's ``BatcherLabels`` frees ``x``, and the next batcher B named ``x`` gets the same
    ``batcher="x"`` attributes. The OTel SDK keeps one cumulative stream per attribute set
    (with one start time for the instrument), so:

    - the observable counters of ``batcher="x"`` go *down* within one stream (A's 3 batches,
      then B's 1, same ``start_time_unix_nano``): a monotonic cumulative Sum must never
      decrease without a new start time;
    - the three histograms are the SDK's own aggregations, never reset: B's
      ``batchio.batch_size`` count carries A's 3 batches, so it disagrees with B's
      ``batchio.batches`` (4 against 1).

    Expected: a label given to a batcher is never handed to a *different* batcher through the
    same meter provider (a retired label stays reserved, so B gets ``x#2``), and every
    counter and histogram stream stays monotonic.
    """
    name = unique("reused")
    a = Batcher(lambda xs: xs, max_batch_size=2, max_wait=0.0, name=name)
    async with a:
        handle = otel.instrument(a, tracing=False)
        await a.map(range(6))  # 3 batches
        before = points(otel)
    if how == "uninstrument":
        handle.uninstrument()
    else:
        del a, handle
        gc.collect()
    async with Batcher(lambda xs: xs, max_batch_size=2, max_wait=0.0, name=name) as b:
        label = otel.instrument(b, tracing=False).label
        await b(1)  # 1 batch
        after = points(otel)
    key = frozenset({("batcher", label)})
    assert _monotonic_violations(before, after) == []
    assert after["batchio.batch_size", key].count == after["batchio.batches", key].value


# --- OpenTelemetry: tracing ---------------------------------------------------------------


async def test_otel_request_spans_of_a_failed_batch_carry_the_error_as_documented(
    otel: Otel,
) -> None:
    """DEFECT (code or docs): docs/observability.md says a batch whose function raised "has
    status ERROR, the exception recorded as an event, and ``error.type``; so have its
    ``batchio.request`` spans". The batch span has all three, but ``_Observer._trace`` only
    sets the request spans' status: they carry no exception event and no ``error.type``, so
    from a request's own trace the error's class is not visible (and a backend that groups
    errors by ``error.type`` misses them).

    Expected: each ``batchio.request`` span of a failed batch has status ERROR, an
    ``exception`` event and ``error.type`` (or the page says it has the status only).
    """
    name = unique("failing")

    def fn(xs: list[int]) -> list[int]:
        raise KeyError("model exploded")

    async with Batcher(fn, max_batch_size=2, max_wait=0.0, name=name) as b:
        otel.instrument(b, metrics=False)
        with otel.tracer.start_as_current_span("caller"), pytest.raises(KeyError):
            await b(1)
    (batch,) = otel.finished(BATCH_SPAN)
    assert batch.status.status_code is StatusCode.ERROR
    assert batch.attributes is not None
    assert batch.attributes["error.type"] == "KeyError"
    assert [e.name for e in batch.events] == ["exception"]
    (request,) = otel.finished(REQUEST_SPAN)
    assert request.status.status_code is StatusCode.ERROR
    assert request.attributes is not None
    assert request.attributes.get("error.type") == "KeyError"
    assert [e.name for e in request.events] == ["exception"]


async def test_otel_names_through_the_prometheus_exporter_match_the_collector() -> None:
    """Coverage (passes): docs/observability.md says OTel's Prometheus exporter turns each
    ``batchio.*`` instrument into the collector's Prometheus name. Both are rendered for the
    same plain (latency-target) and staged batchers, and the sets of metric names agree,
    stage and device-ratio metrics included."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY

    plain, staged = unique("names-plain"), unique("names-staged")
    reader = PrometheusMetricReader()  # registers a collector with prometheus_client.REGISTRY
    provider = MeterProvider(metric_readers=[reader])
    ours = CollectorRegistry()
    stages = Stages[int, int](prepare=lambda xs: xs, run=lambda xs: xs, finish=lambda xs: xs)
    try:
        async with (
            Batcher(
                lambda xs: xs, max_batch_size=4, max_wait=0.0, name=plain, latency_target=1.0
            ) as a,
            Batcher(stages, max_batch_size=4, max_wait=0.0, name=staged) as s,
        ):
            instrument(a, meter_provider=provider, tracing=False)
            instrument(s, meter_provider=provider, tracing=False)
            register(ours, [a, s])
            await a.map(range(5))
            await s.map(range(5))
            otel_text = generate_latest(REGISTRY).decode()
            our_text = generate_latest(ours).decode()
    finally:
        provider.shutdown()  # unregisters the exporter's collector from REGISTRY

    def names(text: str, batchers: set[str]) -> set[str]:
        return {
            s.name
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("batchio_") and s.labels.get("batcher") in batchers
        }

    want = {plain, staged}
    assert names(otel_text, want) == names(our_text, want)


# --- the FastAPI example ------------------------------------------------------------------


async def test_http_bad_bodies_are_client_errors_and_never_reach_the_batcher(
    anyio_backend: Any,
) -> None:
    """Coverage (passes): invalid JSON, a JSON array, a null or numeric text, a missing
    ``text``, an empty body and a non-UTF-8 body are each a 4xx before the batcher; an empty
    text and a non-ASCII text (astral code points included) are served as themselves, and a
    small chunked body is accepted."""
    app = fake_app(Settings(max_body_bytes=1000))
    json_type = {"content-type": "application/json"}
    bad = [
        b"{not json",
        b"[1, 2]",
        b'{"text": null}',
        b'{"text": 5}',
        b'{"texts": "a"}',
        b"",
        b'{"text": "\xff\xfe"}',
    ]

    async def chunks() -> Any:
        for part in (b'{"text": ', b'"chunked"}'):
            yield part

    with serving(app, uvicorn_loop(anyio_backend)) as served:
        fake = served_fake(app)
        fake.gate.set()
        async with client(served.url) as c:
            refused = [await c.post("/embed", content=body, headers=json_type) for body in bad]
            empty = await c.post("/embed", json={"text": ""})
            emoji = await c.post("/embed", json={"text": "héllo 🚀 世界"})
            chunked = await c.post("/embed", content=chunks(), headers=json_type)
    assert [r.status_code for r in refused] == [422, 422, 422, 422, 422, 422, 400]
    assert empty.status_code == emoji.status_code == chunked.status_code == 200
    assert emoji.json() == {"embedding": fake_vector("héllo 🚀 世界")}
    assert chunked.json() == {"embedding": fake_vector("chunked")}
    assert fake.seen == ["", "héllo 🚀 世界", "chunked"]


async def test_http_413_keeps_the_connection_for_the_next_request(anyio_backend: Any) -> None:
    """Coverage (passes): docs/serving.md says that after a 413 "uvicorn discards the rest of
    the upload and keeps the connection". On one raw keep-alive connection, an oversized body
    that is sent in full (declared, then chunked) gets 413, and the request pipelined after it
    on the same connection is still served."""
    app = fake_app(Settings(max_body_bytes=100))
    good = b'{"text":"next"}'
    body = b'{"text":"' + b"a" * 5000 + b'"}'
    head = b"POST /embed HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    follow = head + b"Content-Length: %d\r\n\r\n%s" % (len(good), good)
    uploads = [
        head + b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
        head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body),
    ]
    with serving(app, uvicorn_loop(anyio_backend)) as served:
        served_fake(app).gate.set()
        host, port = served.url.removeprefix("http://").split(":")
        for upload in uploads:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(upload + follow)
                await writer.drain()
                statuses = []
                for _ in range(2):
                    status = await asyncio.wait_for(reader.readline(), 20)
                    statuses.append(status.split()[1])
                    length = 0
                    while (line := await asyncio.wait_for(reader.readline(), 20)) != b"\r\n":
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":")[1])
                    await asyncio.wait_for(reader.readexactly(length), 20)
            finally:
                writer.close()
            assert statuses == [b"413", b"200"]


def test_docs_say_the_examples_metrics_endpoint_is_sync_it_is_async() -> None:
    """DEFECT (docs): docs/observability.md shows the registry-of-its-own pattern "as
    ``examples/fastapi_app.py`` does" with ``def metrics()`` and the comment "a sync endpoint:
    the scrape runs in the thread pool". The example's ``/metrics`` is ``async def``: the scrape
    (every ``statistics()`` call and the text rendering) runs on the event loop.

    Expected: the page and the example agree (either the example's endpoint is sync, or the
    page shows ``async def`` and says the scrape runs on the loop).
    """
    app = fake_app(Settings())
    (route,) = [r for r in app.routes if isinstance(r, APIRoute) and r.path == "/metrics"]
    assert not inspect.iscoroutinefunction(route.endpoint)


async def test_a_probe_during_the_drain_is_refused_as_the_docs_say(anyio_backend: Any) -> None:
    """Found in review (docs): docs/serving.md and the Kubernetes manifest in docs/scaling.md
    said ``/health`` answers 503 while the service shuts down, so a draining pod would leave
    the Service's endpoints through its readiness probe. It never does: the batcher is closed
    only in the lifespan's exit, after uvicorn has closed its listening socket and waited for the
    requests in flight. The pages now say so; this pins what they describe: while a held request
    drains, a probe's connection is refused (and the held request still gets its answer).
    """
    app = fake_app(Settings(max_batch_size=1, max_wait=0.0))
    probe = ShutdownProbe()
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(probe)
    try:
        with serving(app, uvicorn_loop(anyio_backend)) as served:
            fake = served_fake(app)
            async with client(served.url) as c:
                held = asyncio.ensure_future(c.post("/embed", json={"text": "held"}))
                await wait_event(fake.entered)
                served.server.should_exit = True
                await wait_event(probe.waiting)
                try:
                    status: int | str = (await c.get("/health")).status_code
                except httpx.ConnectError:
                    status = "connection refused"
                finally:
                    fake.gate.set()
                    await held
    finally:
        uvicorn_log.removeHandler(probe)
    assert status == "connection refused"
    assert held.result().status_code == 200


def test_the_docs_describe_the_refused_probe() -> None:
    """The pages say what the test above pins, not a 503 during the drain."""
    root = Path(__file__).resolve().parents[2]
    serving_md = (root / "docs" / "serving.md").read_text()
    scaling_md = (root / "docs" / "scaling.md").read_text()
    assert "a probe then gets a refused connection" in serving_md
    assert "503 once it is closed (shutting down)" not in serving_md
    assert "the probe is refused" in scaling_md


async def test_otel_instrumenting_a_batcher_twice_for_tracing_is_refused(otel: Otel) -> None:
    """DEFECT: docs/observability.md says "a batcher is instrumented once per provider (a
    second time raises ``ValueError``)", but the check lives in the metrics hub only: with
    ``metrics=False`` a second ``instrument()`` on the same batcher and tracer provider adds a
    second observer, and every batch is then traced twice (two ``batchio.batch`` spans, two
    ``batchio.request`` spans per request, and the request's trace shows it in two batches).

    Expected: the second ``instrument(b, metrics=False)`` raises ``ValueError`` (or is a
    no-op), and one batch gives one batch span.
    """
    name = unique("twice")
    async with Batcher(lambda xs: xs, max_batch_size=2, name=name) as b:
        otel.instrument(b, metrics=False)
        with pytest.raises(ValueError, match="already"):
            otel.instrument(b, metrics=False)
        with otel.tracer.start_as_current_span("caller"):
            await b(1)
    assert len(otel.finished(BATCH_SPAN)) == 1
    assert len(otel.finished(REQUEST_SPAN)) == 1
