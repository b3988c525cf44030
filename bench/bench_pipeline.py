"""Issue 8: how close each batcher keeps a (simulated) accelerator to its own limit.

The device is simulated (``bench/_simdevice.py``): it sleeps without the GIL for
``a + b * padded_tokens`` seconds per batch, plus a penalty the first time it sees a shape, with
the constants fitted to issue 8's H100 MiniLM runs. The rest is real: the MiniLM tokenizer's fast
backend on the bench corpus, numpy collation to a ladder of shapes, the split into rows. So on a
CPU-only machine this shows whether the host side (event loop, tokenizing, collating,
splitting) keeps the device busy.

Contenders, side by side in one run, the same closed-loop clients:

* ``staged``: ``batchio.Batcher(batchio.Stages(prepare=tokenize, assemble=collate, run=device,
  finish=split))``: preparation on a thread pool, assembly, device and finishing overlapping
  (``--prepare-processes N``: tokenizing in N worker processes instead, out of the GIL).
* ``single-worker``: ``batchio.Batcher(fn)``, fn doing all four in series on its one thread.
* the best peer of ``docs/benchmarks.md`` (``--peer``, default async-batcher), with the same fn.
* ``limit``: the device fed tokenized, collated batches of the same size back to back.

    .venv/bin/python -m bench.bench_pipeline                   # 256 clients, batch 64
    .venv/bin/python -m bench.bench_pipeline --batch-size 256 --clients 1024
    .venv/bin/python -m bench.bench_pipeline --quick

Every shape of the ladder is warmed before timing (a server does so at start-up), so the
penalty only strikes shapes outside it: ``--no-buckets`` pads to the longest row instead and
shows what that costs; ``--cold`` skips the warm-up. The last line printed is
``staged/limit = X.XX`` (``n/a`` when the staged contender cannot run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._contenders import by_name
from ._corpus import corpus
from ._harness import (
    ROOT,
    BatchSpec,
    Call,
    Progress,
    closed_loop,
    consuming,
    floor_intake,
    fmt_range,
    machine_info,
    percentile,
    print_table,
    run_on_loop,
    write_json,
)
from ._simdevice import Collated, FloatArray, Preparation, SimulatedDevice, fit_h100
from ._workloads import run_configs
from .report import PIPELINE_HEADERS, pipeline_rows

__all__ = ["main", "run_pipeline"]

STAGED = "staged"
SINGLE = "single-worker"
LIMIT = "limit"
FLOOR = "pipeline-floor"


def staged_unavailable() -> str | None:
    """Why the staged contender cannot run here, or ``None``."""
    import batchio

    if not hasattr(batchio, "Stages"):
        return "batchio.Stages is not in this core yet (issue 8's staged Batcher)"
    return None


@dataclass(frozen=True)
class Setup:
    """What every run shares."""

    prep: Preparation
    sentences: tuple[str, ...]
    spec: BatchSpec
    clients: int
    requests: int
    warm: bool
    prepare_workers: int | None
    loop: Any = "asyncio"
    prepare_processes: int | None = None


Opener = Callable[[Setup, SimulatedDevice], contextlib.AbstractAsyncContextManager[Call]]


@contextlib.asynccontextmanager
async def _open_staged(s: Setup, device: SimulatedDevice) -> AsyncIterator[Call]:
    import batchio

    prep = s.prep

    def run(batch: Collated) -> tuple[FloatArray, int]:
        return device(batch), batch.rows

    def finish(out: tuple[FloatArray, int]) -> list[FloatArray]:
        return prep.split(*out)

    kw: dict[str, Any] = {}
    if s.prepare_workers is not None:
        kw["prepare_workers"] = s.prepare_workers
    tokenize: Callable[[list[str]], Any] = prep.tokenize
    if s.prepare_processes is not None:
        # Sent once to each worker process (the Preparation pickles with its tokenizer); rows
        # come back as lists, which unpickle faster than small arrays.
        kw["prepare_processes"] = s.prepare_processes
        tokenize = prep.tokenize_lists
    stages = batchio.Stages(prepare=tokenize, assemble=prep.collate, run=run, finish=finish, **kw)
    batcher = batchio.Batcher(
        stages, max_batch_size=s.spec.max_batch_size, max_wait=s.spec.max_wait
    )
    async with batcher:
        yield batcher


@contextlib.asynccontextmanager
async def _open_single(s: Setup, device: SimulatedDevice) -> AsyncIterator[Call]:
    import batchio

    fn = s.prep.in_series(device)
    async with batchio.Batcher(
        fn, max_batch_size=s.spec.max_batch_size, max_wait=s.spec.max_wait
    ) as batcher:
        yield batcher


@contextlib.asynccontextmanager
async def _open_pipeline_floor(s: Setup, device: SimulatedDevice) -> AsyncIterator[Call]:
    """A hand-rolled staged pipeline on raw asyncio, no checks: what the staged form could reach.

    One consumer takes chunks of ``max_batch_size`` (no max_wait timer) and starts a task per
    batch, at most ``prepare_workers + 2`` at once; each task hops through four executors
    (tokenize on a pool, collate, device, split on one thread each) and sets its futures.
    """
    loop = asyncio.get_running_loop()
    prep = s.prep
    workers = s.prepare_workers or 2
    pools = [ThreadPoolExecutor(workers)] + [ThreadPoolExecutor(1) for _ in range(3)]
    intake = floor_intake(s.spec.max_batch_size)
    slots = asyncio.Semaphore(workers + 2)
    tasks: set[asyncio.Task[None]] = set()

    async def one(chunk: list[tuple[asyncio.Future[Any], str]]) -> None:
        try:
            rows = await loop.run_in_executor(pools[0], prep.tokenize, [t for _, t in chunk])
            batch = await loop.run_in_executor(pools[1], prep.collate, rows)
            out = await loop.run_in_executor(pools[2], device, batch)
            res = await loop.run_in_executor(pools[3], prep.split, out, batch.rows)
            for (fut, _), r in zip(chunk, res, strict=True):
                fut.set_result(r)
        finally:
            slots.release()

    async def consumer() -> None:
        wait, take = intake.wait, intake.take
        while True:
            await wait()
            await slots.acquire()
            task = loop.create_task(one(take()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    try:
        async with consuming(consumer()):
            yield intake.call
    finally:
        for pool in pools:
            pool.shutdown(wait=True)


def _peer_opener(name: str) -> Opener:
    contender = by_name(name)[0]

    def open_peer(
        s: Setup, device: SimulatedDevice
    ) -> contextlib.AbstractAsyncContextManager[Call]:
        return contender.open(s.prep.in_series(device), s.spec)

    return open_peer


def _token_counts(prep: Preparation, sentences: Sequence[str]) -> dict[str, int]:
    return {t: len(ids) for t, ids in zip(sentences, prep.tokenize(sentences), strict=True)}


def contender_once(
    s: Setup, opener: Opener, model: Any, tokens: dict[str, int]
) -> dict[str, float]:
    """One closed-loop run on a fresh device: rows/s, latency, device busy share, new shapes."""
    device = SimulatedDevice(model)
    if s.warm:
        device.warm(s.prep.shapes())
    stats: dict[str, Any] = {}

    async def main() -> tuple[float, list[float]]:
        async with opener(s, device) as call:
            # One untimed full batch: every caller gets its own row back (column 0 = its tokens).
            probe = s.sentences[: s.spec.max_batch_size]
            outs = await asyncio.gather(*(call(x) for x in probe))
            for x, y in zip(probe, outs, strict=True):
                if int(y[0]) != tokens[x]:
                    raise AssertionError(f"wrong row for {x!r}: {int(y[0])} != {tokens[x]}")
            device.reset_stats()
            res = await closed_loop(
                call, s.sentences, concurrency=s.clients, requests=s.requests, record_latency=True
            )
            statistics = getattr(call, "statistics", None)
            if callable(statistics):
                snap = statistics()
                stats["device_busy_fraction"] = getattr(snap, "device_busy_fraction", None)
                stages = getattr(snap, "stages", None)
                if stages:
                    stats["stages"] = [
                        {"name": st.name, "jobs": st.jobs, "busy_s": st.busy_seconds}
                        for st in stages
                    ]
        return res.elapsed, res.latencies or []

    elapsed, lat = run_on_loop(s.loop, main)
    st = device.stats
    return {
        "rows_per_s": s.requests / elapsed,
        "p50_ms": percentile(lat, 50) * 1000,
        "p99_ms": percentile(lat, 99) * 1000,
        "mean_batch": st.rows / st.calls if st.calls else 0.0,
        "device_busy": st.busy_s / elapsed,
        "new_shapes": float(st.new_shapes),
        "calls": float(st.calls),
    }


def limit_once(s: Setup, model: Any) -> dict[str, float]:
    """The device alone: the same rows, tokenized and collated in advance, back to back."""
    device = SimulatedDevice(model)
    if s.warm:
        device.warm(s.prep.shapes())
    bs = s.spec.max_batch_size
    m = len(s.sentences)
    n = s.requests - s.requests % bs
    texts = [s.sentences[j % m] for j in range(n)]
    batches = [s.prep.collate(s.prep.tokenize(texts[i : i + bs])) for i in range(0, n, bs)]
    t0 = time.perf_counter()
    for batch in batches:
        device(batch)
    elapsed = time.perf_counter() - t0
    st = device.stats
    return {
        "rows_per_s": n / elapsed,
        "mean_batch": st.rows / st.calls,
        "device_busy": st.busy_s / elapsed,
        "new_shapes": float(st.new_shapes),
        "calls": float(st.calls),
    }


def run_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    """Every contender and the limit, repeats interleaved; the results dict."""
    spec = BatchSpec(a.batch_size, a.max_wait)
    prep = Preparation(spec.max_batch_size, max_length=a.max_length, buckets=not a.no_buckets)
    sentences = corpus(a.corpus_size)
    tokens = _token_counts(prep, sentences)
    model = fit_h100([tokens[t] for t in sentences])
    s = Setup(
        prep, sentences, spec, a.clients, a.requests, warm=not a.cold,
        prepare_workers=a.prepare_workers, loop=a.loop, prepare_processes=a.prepare_processes,
    )  # fmt: skip
    skipped: dict[str, str] = {}
    openers: list[tuple[str, Opener]] = []
    why = staged_unavailable()
    if why:
        skipped[STAGED] = why
    else:
        openers.append((STAGED, _open_staged))
    openers.append((SINGLE, _open_single))
    if a.floor:
        openers.append((FLOOR, _open_pipeline_floor))
    for peer in filter(None, (p.strip() for p in a.peer.split(","))):
        reason = by_name(peer)[0].unavailable()
        if reason:
            skipped[peer] = reason
        else:
            openers.append((peer, _peer_opener(peer)))
    configs: list[tuple[str, Callable[[], dict[str, float]], dict[str, Any]]] = [
        (LIMIT, lambda: limit_once(s, model), {"contender": LIMIT})
    ]
    for name, opener in openers:

        def once(opener: Opener = opener) -> dict[str, float]:
            return contender_once(s, opener, model, tokens)

        configs.append((name, once, {"contender": name}))
    progress = Progress(a.repeats * len(configs), enabled=not a.quiet, description="pipeline")
    info = machine_info()
    with progress.running():
        rows = run_configs(configs, repeats=a.repeats, progress=progress, label="pipeline")
    limit = next(r for r in rows if r["contender"] == LIMIT)
    limit_rate = limit["rows_per_s"]["median"] if "rows_per_s" in limit else float("nan")
    for r in rows:
        if "rows_per_s" in r:
            r["ratio_to_limit"] = r["rows_per_s"]["median"] / limit_rate
    model_d = asdict(model)
    info["loadavg_at_end"] = os.getloadavg()
    return {
        "benchmark": "pipeline", "machine": info, "spec": asdict(spec), "args": vars(a),
        "device_model": model_d, "rows_ladder": prep.rows_ladder,
        "length_ladder": prep.length_ladder, "rows": rows, "skipped": skipped,
    }  # fmt: skip


def print_pipeline(results: dict[str, Any]) -> None:
    a = results["args"]
    m = results["device_model"]
    table = pipeline_rows(results["rows"], fmt_range, no_error="?")
    title = (
        f"simulated device (a={m['a'] * 1000:.2f} ms + b={m['b'] * 1e9:.0f} ns/padded token, "
        f"new shape +{m['new_shape'] * 1000:.1f} ms); {a['clients']} clients, "
        f"{a['requests']:,} requests, max_batch_size {a['batch_size']}, max_wait {a['max_wait']}s"
    )
    print_table(title, PIPELINE_HEADERS, table)
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")


def staged_line(results: dict[str, Any]) -> str:
    staged = next((r for r in results["rows"] if r["contender"] == STAGED), None)
    if staged is None or "ratio_to_limit" not in staged:
        return "staged/limit = n/a"
    return f"staged/limit = {staged['ratio_to_limit']:.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=256, help="closed-loop client tasks")
    p.add_argument("--requests", type=int, default=None, help="default 24,000 (--quick 6,000)")
    p.add_argument("--batch-size", type=int, default=64, help="max_batch_size of every batcher")
    p.add_argument("--max-wait", type=float, default=0.005, help="seconds, every contender")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (--quick 1)")
    p.add_argument("--quick", action="store_true", help="fewer requests, one repeat")
    p.add_argument("--peer", default="async-batcher",
                   help="peer(s) from bench/_contenders.py, comma-separated ('' for none)")  # fmt: skip
    p.add_argument("--prepare-workers", type=int, default=None, help="staged: prepare threads")
    p.add_argument("--prepare-processes", type=int, default=None,
                   help="staged: tokenize in N worker processes (Stages(prepare_processes=N))")  # fmt: skip
    p.add_argument("--max-length", type=int, default=128, help="tokenizer truncation")
    p.add_argument("--corpus-size", type=int, default=2048)
    p.add_argument("--no-buckets", action="store_true", help="pad to the longest row instead")
    p.add_argument("--cold", action="store_true", help="no warm-up of the ladder's shapes")
    p.add_argument("--floor", action="store_true",
                   help="also run pipeline-floor: a hand-rolled staged pipeline on raw asyncio")  # fmt: skip
    p.add_argument("--loop", default="asyncio", choices=["asyncio", "uvloop"])
    p.add_argument("--json", type=Path, default=ROOT / "bench/results/pipeline.json")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.requests is None:
        a.requests = 6_000 if a.quick else 24_000
    if a.repeats is None:
        a.repeats = 1 if a.quick else 3
    results = run_pipeline(a)
    print_pipeline(results)
    write_json(a.json, results)
    print(f"wrote {a.json}")
    print(staged_line(results))


if __name__ == "__main__":
    main()
