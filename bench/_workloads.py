"""The workloads, written once and used by ``bench_overhead``, ``bench_model`` and ``suite``.

Every ``*_once`` function runs one repeat of one configuration on a fresh event loop and returns
plain numbers; the ``run_*`` functions interleave repeats across configurations (repeat 1 of every
contender, then repeat 2, ...) so slow drift on a shared machine hits every contender alike, and
summarise each figure as min / median / max.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

from ._contenders import Contender
from ._harness import (
    BatchFn,
    BatchSpec,
    CountingFn,
    LoopName,
    Progress,
    closed_loop,
    idle_latency,
    noop_async,
    noop_sync,
    open_loop,
    percentile,
    run_on_loop,
    summarize,
)
from ._model import Embedder

__all__ = [
    "Config",
    "fn_kind",
    "model_ceiling",
    "model_sequential",
    "run_configs",
]

NOOPS: dict[str, BatchFn] = {"sync": noop_sync, "async": noop_async}

Config = tuple[Contender, LoopName, str]  # contender, loop, fn kind ("sync" / "async")


def fn_kind(fn: BatchFn) -> str:
    return "async" if inspect.iscoroutinefunction(fn) else "sync"


def _ms(x: float) -> float:
    return x * 1000.0


def _own_mean_batch(call: Any) -> float:
    """Mean batch size from a contender's own statistics (batchio objects), else 0."""
    stats = getattr(call, "statistics", None)
    return float(stats().mean_batch_size) if callable(stats) else 0.0


# -- one repeat of each workload ---------------------------------------------------------------


def overhead_once(
    contender: Contender, loop: LoopName, fn: BatchFn, spec: BatchSpec, *, requests: int,
    concurrency: int,
) -> dict[str, float]:  # fmt: skip
    """No-op batch function, closed loop: items/s and mean batch size."""
    counter = CountingFn(fn)

    async def main() -> float:
        async with contender.open(counter.wrap(), spec) as call:
            res = await closed_loop(
                call, range(requests), concurrency=concurrency, requests=requests,
                check=lambda x, y: x == y,
            )  # fmt: skip
        return res.items_per_s

    items_per_s = run_on_loop(loop, main)
    return {"items_per_s": items_per_s, "mean_batch_size": counter.mean_batch_size}


def model_closed_once(
    contender: Contender, loop: LoopName, fn: BatchFn, spec: BatchSpec, *,
    sentences: Sequence[str], requests: int, concurrency: int,
) -> dict[str, float]:  # fmt: skip
    """Model batch function, closed loop: sentences/s, latency percentiles, mean batch size."""
    counter = CountingFn(fn)

    mean_batch = [0.0]

    async def main() -> tuple[float, list[float]]:
        async with contender.open(counter.wrap(), spec) as call:
            res = await closed_loop(
                call, sentences, concurrency=concurrency, requests=requests, record_latency=True
            )
            mean_batch[0] = counter.mean_batch_size or _own_mean_batch(call)
        return res.items_per_s, res.latencies or []

    rate, lat = run_on_loop(loop, main)
    return {
        "sentences_per_s": rate,
        "p50_ms": _ms(percentile(lat, 50)),
        "p99_ms": _ms(percentile(lat, 99)),
        "mean_batch_size": mean_batch[0],
    }


def model_open_once(
    contender: Contender, loop: LoopName, fn: BatchFn, spec: BatchSpec, *,
    sentences: Sequence[str], rate: float, requests: int, seed: int, slo: float,
    drain_timeout: float,
) -> dict[str, float]:  # fmt: skip
    """Poisson arrivals at ``rate``: latency percentiles, throughput and goodput."""
    counter = CountingFn(fn)

    own = [0.0]

    async def main() -> Any:
        async with contender.open(counter.wrap(), spec) as call:
            res = await open_loop(
                call, sentences, rate=rate, requests=requests, seed=seed, slo=slo,
                drain_timeout=drain_timeout,
            )  # fmt: skip
            own[0] = _own_mean_batch(call)
        return res

    res = run_on_loop(loop, main)
    mean_batch = counter.mean_batch_size or own[0]
    return {
        "arrival_rate": res.arrival_rate,
        "throughput": res.throughput,
        "goodput": res.goodput,
        "completed_fraction": res.completed / res.requests,
        "p50_ms": _ms(percentile(res.latencies, 50)),
        "p99_ms": _ms(percentile(res.latencies, 99)),
        "mean_batch_size": mean_batch,
    }


def model_idle_once(
    contender: Contender, loop: LoopName, fn: BatchFn, spec: BatchSpec, *,
    sentences: Sequence[str], requests: int,
) -> dict[str, float]:  # fmt: skip
    """One client, batcher idle at each arrival: latency added over a direct call."""

    async def main() -> Any:
        async with contender.open(fn, spec) as call:
            return await idle_latency(call, lambda x: fn([x]), sentences, requests=requests)

    res = run_on_loop(loop, main)
    added = res.added
    return {
        "direct_p50_ms": _ms(percentile(res.direct, 50)),
        "batched_p50_ms": _ms(percentile(res.batched, 50)),
        "batched_p99_ms": _ms(percentile(res.batched, 99)),
        "added_p50_ms": _ms(percentile(added, 50)),
        "added_p99_ms": _ms(percentile(added, 99)),
    }


# -- baselines without a batcher ---------------------------------------------------------------


def model_ceiling(
    embedder: Embedder, sentences: Sequence[str], *, batch_size: int, sort: bool = True
) -> float:
    """Offline ceiling: the batch function called directly on full batches (length-sorted by
    default, so padding is minimal); sentences/s."""
    texts = sorted(sentences, key=len) if sort else list(sentences)
    n = len(texts) - len(texts) % batch_size
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        embedder.fn(texts[i : i + batch_size])
    return n / (time.perf_counter() - t0)


def model_sequential(embedder: Embedder, sentences: Sequence[str]) -> dict[str, float]:
    """One sentence at a time, no batcher, no event loop."""
    lat: list[float] = []
    perf = time.perf_counter
    t0 = perf()
    for s in sentences:
        t = perf()
        embedder.fn([s])
        lat.append(perf() - t)
    total = perf() - t0
    return {
        "sentences_per_s": len(sentences) / total,
        "p50_ms": _ms(percentile(lat, 50)),
        "p99_ms": _ms(percentile(lat, 99)),
    }


# -- repeats -----------------------------------------------------------------------------------


def run_configs(
    configs: Sequence[tuple[str, Callable[[], dict[str, float]], dict[str, Any]]],
    *,
    repeats: int,
    progress: Progress,
    label: str,
) -> list[dict[str, Any]]:
    """Run each ``(key, once, meta)`` ``repeats`` times, interleaved; summarise every figure.

    A configuration that raises is recorded with its error and dropped from later repeats, so one
    broken peer cannot sink the suite.
    """
    runs: dict[str, list[dict[str, float]]] = {key: [] for key, _, _ in configs}
    errors: dict[str, str] = {}
    for r in range(repeats):
        for key, once, _meta in configs:
            if key in errors:
                progress.advance()
                continue
            progress.step(f"{label}: {key} (repeat {r + 1}/{repeats})")
            try:
                runs[key].append(once())
            except Exception as exc:
                errors[key] = f"{type(exc).__name__}: {exc}"
                progress.log(f"[red]{key} failed[/red]: {errors[key]}")
            progress.advance()
    out: list[dict[str, Any]] = []
    for key, _, meta in configs:
        row: dict[str, Any] = {"key": key, **meta}
        if key in errors:
            row["error"] = errors[key]
        if runs[key]:
            row["repeats"] = len(runs[key])
            for fig in runs[key][0]:
                row[fig] = summarize([run[fig] for run in runs[key]])
        out.append(row)
    return out


def spec_dict(spec: BatchSpec) -> dict[str, Any]:
    return asdict(spec)
