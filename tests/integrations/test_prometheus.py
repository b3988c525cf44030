"""The Prometheus collector, scraped through prometheus_client's own text exposition and parser.

Every value is read back from the text a real scrape produces, so what is checked is what a
Prometheus server would store.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import batchio
from batchio import (
    Batcher,
    QueueFullError,
    RequestTimeoutError,
    Stages,
)
from batchio.integrations.prometheus import (
    OUTCOMES,
    BatchioCollector,
    batch_size_bounds,
    register,
)
from batchio.testing import GatedBatchFn

from ..conftest import GATE_TIMEOUT

pytestmark = pytest.mark.anyio

_names = itertools.count()


def unique(prefix: str) -> str:
    """A batcher name no other test uses (live batchers of other tests may still be listed)."""
    return f"{prefix}-{next(_names)}"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of one scrape, keyed by (sample name, labels), from the text exposition."""
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def types(registry: CollectorRegistry) -> dict[str, str]:
    """Each metric family's type, as the exposition declares it."""
    text = generate_latest(registry).decode()
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def series(samples: Samples, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
    """Samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return {lbl: v for (n, lbl), v in samples.items() if n == name and want <= lbl}


def buckets(samples: Samples, name: str, batcher: str) -> dict[float, float]:
    """A histogram's cumulative buckets: upper bound -> count."""
    return {
        float(dict(lbl)["le"]): v
        for lbl, v in series(samples, f"{name}_bucket", batcher=batcher).items()
    }


def scrape_from_thread(registry: CollectorRegistry) -> Samples:
    """Scrape on a thread of its own, as an exporter does; the caller's thread waits (blocked:
    called on the loop's thread, this proves the scrape needs nothing from the loop)."""
    out: list[Samples] = []
    thread = threading.Thread(target=lambda: out.append(scrape(registry)))
    thread.start()
    thread.join(GATE_TIMEOUT)
    assert out, "the scrape did not finish"
    return out[0]


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


async def test_counters_and_batch_size_histogram_are_exact(registry: CollectorRegistry) -> None:
    """Batches of known sizes and outcomes read back exactly, including the size histogram's
    buckets, count and sum."""
    name = unique("exact")

    def fn(xs: list[int]) -> list[Any]:
        if -1 in xs:
            raise ValueError("the whole batch fails")
        return [ValueError("this row fails") if x == -2 else x * 10 for x in xs]

    async with Batcher(fn, max_batch_size=4, max_wait=0.0, name=name) as b:
        register(registry, [b])
        assert await b.map(range(4)) == [0, 10, 20, 30]  # one batch of 4
        await b.map(range(3))  # 3
        await b(1)  # 1
        await b.map(range(10))  # 4, 4, 2
        with pytest.raises(ValueError, match="whole batch"):
            await b(-1)  # 1
        with pytest.raises(ValueError, match="this row"):
            await b(-2)  # 1
        got = scrape(registry)

    expected = {"completed": 4, "failed": 2, "cancelled": 0, "timed_out": 0, "rejected": 0}
    for outcome in OUTCOMES:
        assert (
            value(got, "batchio_requests_total", batcher=name, outcome=outcome)
            == (expected[outcome])
        )
    assert value(got, "batchio_batches_total", batcher=name) == 8
    assert value(got, "batchio_rows_total", batcher=name) == 20
    # sizes {1: 3, 2: 1, 3: 1, 4: 3}; bounds 1, 2, 3 and 4 (max_batch_size - 1 and itself), +Inf
    assert buckets(got, "batchio_batch_size_rows", name) == {
        1: 3,
        2: 4,
        3: 5,
        4: 8,
        math.inf: 8,
    }
    assert value(got, "batchio_batch_size_rows_count", batcher=name) == 8
    assert value(got, "batchio_batch_size_rows_sum", batcher=name) == 20
    # one queue wait per request dispatched, one run time per batch, both ending at +Inf
    assert value(got, "batchio_queue_wait_seconds_count", batcher=name) == 6
    assert buckets(got, "batchio_queue_wait_seconds", name)[math.inf] == 6
    assert value(got, "batchio_batch_run_seconds_count", batcher=name) == 8
    run = buckets(got, "batchio_batch_run_seconds", name)
    assert sorted(run) == [*batchio.TIME_BUCKETS, math.inf]
    assert list(run.values()) == sorted(run.values())  # cumulative
    # (no positive sum asserted: uvloop's clock ticks in milliseconds, and these runs are faster)
    assert value(got, "batchio_batch_run_seconds_sum", batcher=name) >= 0
    assert value(got, "batchio_healthy", batcher=name) == 1
    assert value(got, "batchio_closed", batcher=name) == 0
    assert value(got, "batchio_stalled_batches_total", batcher=name) == 0
    # a plain batcher has no stage series
    assert not series(got, "batchio_stage_jobs_total", batcher=name)
    assert not series(got, "batchio_device_busy_ratio", batcher=name)
    # the dispatch reasons add up to the batches
    reasons = series(got, "batchio_scheduler_dispatches_total", batcher=name)
    assert sum(reasons.values()) == 8

    closed = scrape(registry)
    assert value(closed, "batchio_closed", batcher=name) == 1
    assert value(closed, "batchio_batches_total", batcher=name) == 8


async def test_metric_types_and_names_follow_prometheus_conventions(
    registry: CollectorRegistry,
) -> None:
    """Counters are counters (``_total`` samples), histograms histograms, the rest gauges; every
    name starts with ``batchio_``; registering describes the families without scraping."""
    name = unique("types")
    async with Batcher(lambda xs: xs, max_batch_size=2, max_wait=0.0, name=name) as b:
        collector = BatchioCollector([b])
        described = {m.name: m.type for m in collector.describe()}
        assert all(not m.samples for m in collector.describe())
        registry.register(collector)
        await b(1)
        declared = types(registry)
    assert described == declared
    assert all(n.startswith("batchio_") for n in declared)
    counters = {n for n, t in declared.items() if t == "counter"}
    assert counters == {
        "batchio_requests",
        "batchio_batches",
        "batchio_rows",
        "batchio_stalled_batches",
        "batchio_stage_jobs",
        "batchio_stage_busy_seconds",
        "batchio_scheduler_dispatches",
        "batchio_scheduler_early_timeouts",
        "batchio_scheduler_shed_requests",
    }
    assert {n for n, t in declared.items() if t == "histogram"} == {
        "batchio_batch_size_rows",
        "batchio_queue_wait_seconds",
        "batchio_batch_run_seconds",
    }


async def test_timed_out_cancelled_rejected_and_gauges_while_a_batch_runs(
    registry: CollectorRegistry,
) -> None:
    """With a batch held in the function: the gauges show it, scraped from a thread while the
    loop's thread is blocked; then every outcome is counted once."""
    name = unique("gated")
    fn = GatedBatchFn[int, int](lambda x: x, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0.0, max_queue_size=2, name=name) as b:
        register(registry, [b])
        first = b.submit_nowait(0)
        await fn.wait_entered()
        with pytest.raises(RequestTimeoutError):
            await b(1, timeout=0.001)  # queued behind the held batch, so it times out
        victim = b.submit_nowait(2)
        last = b.submit_nowait(3)
        with pytest.raises(QueueFullError):
            b.submit_nowait(4)  # the queue holds 2 rows

        during = scrape_from_thread(registry)  # the loop cannot run meanwhile
        assert value(during, "batchio_in_flight_batches", batcher=name) == 1
        assert value(during, "batchio_queue_depth_rows", batcher=name) == 2
        assert value(during, "batchio_pending_requests", batcher=name) == 3
        assert value(during, "batchio_requests_total", batcher=name, outcome="rejected") == 1
        assert value(during, "batchio_requests_total", batcher=name, outcome="timed_out") == 1

        victim.cancel()
        fn.open()
        assert await first == 0
        assert await last == 3
        with pytest.raises(asyncio.CancelledError):
            await victim
    after = scrape(registry)
    counts = {o: value(after, "batchio_requests_total", batcher=name, outcome=o) for o in OUTCOMES}
    assert counts == {"completed": 2, "failed": 0, "cancelled": 1, "timed_out": 1, "rejected": 1}
    assert value(after, "batchio_pending_requests", batcher=name) == 0
    assert value(after, "batchio_in_flight_batches", batcher=name) == 0
    assert value(after, "batchio_queue_depth_rows", batcher=name) == 0


async def test_scraping_from_a_thread_while_requests_run(registry: CollectorRegistry) -> None:
    """A scraper thread looping over scrapes while hundreds of requests run sees counters that
    only grow, and the last scrape is exact."""
    name = unique("busy")
    fn = GatedBatchFn[int, int](lambda x: x + 1, gated=True)
    stop = threading.Event()
    seen: list[float] = []
    errors: list[BaseException] = []

    def scraper() -> None:
        try:
            while not stop.is_set():
                got = scrape(registry)
                seen.append(value(got, "batchio_requests_total", batcher=name, outcome="completed"))
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)

    async with Batcher(fn, max_batch_size=8, max_wait=0.0, name=name) as b:
        register(registry, [b])
        futures = [b.submit_nowait(i) for i in range(200)]
        await fn.wait_entered()
        held = await asyncio.to_thread(scrape, registry)
        assert value(held, "batchio_in_flight_batches", batcher=name) == 1
        assert value(held, "batchio_pending_requests", batcher=name) == 200
        thread = threading.Thread(target=scraper)
        thread.start()
        try:
            fn.open()
            assert await asyncio.gather(*futures) == [i + 1 for i in range(200)]
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, GATE_TIMEOUT)
    assert not errors
    assert seen == sorted(seen)
    final = scrape(registry)
    assert value(final, "batchio_requests_total", batcher=name, outcome="completed") == 200
    assert value(final, "batchio_rows_total", batcher=name) == 200
    assert value(final, "batchio_queue_wait_seconds_count", batcher=name) == 200


async def test_scraping_never_starts_a_batcher(registry: CollectorRegistry) -> None:
    """A batcher that was never started exports zeros and stays unstarted (and is not among the
    live batchers, which the default collector lists)."""
    name = unique("idle")
    b = Batcher(lambda xs: xs, name=name)
    register(registry, [b])
    got = scrape(registry)
    assert value(got, "batchio_batches_total", batcher=name) == 0
    assert value(got, "batchio_requests_total", batcher=name, outcome="completed") == 0
    assert value(got, "batchio_batch_size_rows_count", batcher=name) == 0
    assert "not started" in repr(b)
    assert b not in batchio.live_batchers()


async def test_default_collector_follows_live_batchers_and_disambiguates_names(
    registry: CollectorRegistry,
) -> None:
    """``BatchioCollector()`` exports every live batcher, including ones started after it was
    registered. Two with one name are ``name`` and ``name#2`` (start order), stably."""
    name = unique("twin")
    register(registry)  # batchers=None: batchio.live_batchers() at each scrape
    async with (
        Batcher(lambda xs: [x + 1 for x in xs], name=name) as one,
        Batcher(lambda xs: [x + 2 for x in xs], name=name) as two,
    ):
        await one(0)
        await two.map([0, 0])
        got = scrape(registry)
        # the text exposition would not even parse back duplicates into distinct keys
        assert value(got, "batchio_rows_total", batcher=name) == 1
        assert value(got, "batchio_rows_total", batcher=f"{name}#2") == 2
        again = scrape(registry)
        assert value(again, "batchio_rows_total", batcher=f"{name}#2") == 2
        assert not series(again, "batchio_rows_total", batcher=f"{name}#3")


async def test_an_explicit_name_like_a_suffixed_one_does_not_collide(
    registry: CollectorRegistry,
) -> None:
    """A batcher literally named ``x#2`` and a second ``x``: every label stays unique."""
    name = unique("lit")
    a = Batcher(lambda xs: xs, name=name)
    b = Batcher(lambda xs: xs, name=f"{name}#2")
    c = Batcher(lambda xs: xs, name=name)
    register(registry, [a, b, c, a])  # a listed twice: exported once
    labels = [dict(lbl)["batcher"] for lbl in series(scrape(registry), "batchio_batches_total")]
    assert sorted(labels) == sorted([name, f"{name}#2", f"{name}#3"])


async def test_stage_metrics_of_a_staged_batcher(registry: CollectorRegistry) -> None:
    """A staged batcher exports each stage's jobs, busy seconds, queue depth and workers, and
    the device's busy ratio."""
    name = unique("staged")
    stages = Stages[int, int](
        prepare=lambda xs: [x + 1 for x in xs],
        run=lambda xs: [x * 2 for x in xs],
        finish=lambda xs: list(xs),
        prepare_workers=2,
    )
    async with Batcher(stages, max_batch_size=4, max_wait=0.0, name=name) as b:
        register(registry, [b])
        assert await b.map(range(8)) == [2 * (x + 1) for x in range(8)]
        await b.map(range(3))
        got = scrape(registry)
    jobs = series(got, "batchio_stage_jobs_total", batcher=name)
    assert {dict(lbl)["stage"]: v for lbl, v in jobs.items()} == {
        "prepare": 3,
        "device": 3,
        "finish": 3,
    }
    workers = series(got, "batchio_stage_workers", batcher=name)
    assert {dict(lbl)["stage"]: v for lbl, v in workers.items()} == {
        "prepare": 2,
        "device": 1,
        "finish": 1,
    }
    for stage in ("prepare", "device", "finish"):
        assert value(got, "batchio_stage_busy_seconds_total", batcher=name, stage=stage) > 0
        assert value(got, "batchio_stage_queue_depth_jobs", batcher=name, stage=stage) == 0
    assert 0 < value(got, "batchio_device_busy_ratio", batcher=name) <= 1
    assert buckets(got, "batchio_batch_size_rows", name) == {
        1: 0,
        2: 0,
        3: 1,  # the batch of 3
        4: 3,
        math.inf: 3,
    }


async def test_scheduler_figures(registry: CollectorRegistry) -> None:
    """The adaptive policy's target is exported; the dispatch reasons are a counter by reason."""
    name = unique("sched")
    async with Batcher(lambda xs: xs, max_batch_size=4, latency_target=0.5, name=name) as b:
        register(registry, [b])
        await b.map(range(4))
        got = scrape(registry)
    assert value(got, "batchio_scheduler_latency_target_seconds", batcher=name) == 0.5
    reasons = series(got, "batchio_scheduler_dispatches_total", batcher=name)
    assert sum(reasons.values()) == 1
    assert all("reason" in dict(lbl) for lbl in reasons)
    assert value(got, "batchio_scheduler_arrival_rate_per_second", batcher=name) >= 0
    assert value(got, "batchio_scheduler_shed_requests_total", batcher=name) == 0
    assert value(got, "batchio_scheduler_early_timeouts_total", batcher=name) == 0


def test_register_once_per_registry(registry: CollectorRegistry) -> None:
    """A second collector in one registry is refused (its series would be duplicates);
    unregistering takes the series away."""
    b = Batcher(lambda xs: xs, name=unique("reg"))
    collector = register(registry, [b])
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        register(registry, [b])
    registry.unregister(collector)
    assert not scrape(registry)


@pytest.mark.parametrize(
    ("max_batch_size", "largest", "expected"),
    [
        (1, 0, (1,)),
        (2, 0, (1, 2)),
        (4, 0, (1, 2, 3, 4)),
        (10, 0, (1, 2, 4, 8, 9, 10)),
        (32, 7, (1, 2, 4, 8, 16, 31, 32)),
        (8, 16, (1, 2, 4, 7, 8, 16)),  # max_batch_size was reduced after bigger batches ran
        (8, 20, (1, 2, 4, 7, 8, 16, 32)),
    ],
)
def test_batch_size_bounds(max_batch_size: int, largest: int, expected: tuple[int, ...]) -> None:
    assert batch_size_bounds(max_batch_size, largest) == expected
