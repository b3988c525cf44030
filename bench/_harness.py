"""The shared benchmark harness: event loops, the raw asyncio floor, load generators, statistics.

Everything the three benchmarks (``bench_overhead``, ``bench_model``, ``suite``) measure goes
through these functions, so the floor and the load generators exist exactly once.

Load generators:

* :func:`closed_loop`: ``concurrency`` client tasks, each awaiting one request at a time until
  ``requests`` requests have completed in total (a client sends its next request as soon as the
  previous one returns).
* :func:`open_loop`: Poisson arrivals at a fixed offered rate, one task per request, latency measured
  from the *scheduled* arrival time (so a late generator cannot hide queueing: no coordinated
  omission).
* :func:`idle_latency`: one client; each request is paired with a direct call of the batch
  function on the same input, and the added latency is the paired difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.metadata
import inspect
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

__all__ = [
    "BatchSpec",
    "Call",
    "ClosedLoopResult",
    "CountingFn",
    "FloorIntake",
    "IdleLatencyResult",
    "LoopName",
    "OpenLoopResult",
    "Progress",
    "closed_loop",
    "consuming",
    "floor_intake",
    "fmt_range",
    "idle_latency",
    "machine_info",
    "noop_async",
    "noop_sync",
    "open_floor",
    "open_floor_thread",
    "open_loop",
    "percentile",
    "print_table",
    "run_on_loop",
    "summarize",
    "write_json",
]

T = TypeVar("T")
LoopName = Literal["asyncio", "uvloop"]
Call = Callable[[Any], Awaitable[Any]]
"""What a contender hands the load generator: ``await call(item) -> result``."""
BatchFn = Callable[[list[Any]], Any]
"""A batch function, sync (returns a list) or ``async def`` (returns an awaitable of a list)."""

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BatchSpec:
    """The batching options every contender is configured with (as close as each allows)."""

    max_batch_size: int = 64
    max_wait: float = 0.005  # seconds


# -- event loops -------------------------------------------------------------------------------


def run_on_loop(loop: LoopName, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on a fresh event loop of the given kind and close it afterwards."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    gc.collect()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def loop_available(loop: LoopName) -> str | None:
    """``None`` if the loop can be used here, else why not."""
    if loop == "asyncio":
        return None
    try:
        import uvloop  # noqa: F401
    except ImportError as exc:
        return f"uvloop not importable: {exc}"
    return None


# -- batch functions ---------------------------------------------------------------------------


def noop_sync(items: list[Any]) -> list[Any]:
    """The overhead workload: return the inputs (a sync batch function)."""
    return items


async def noop_async(items: list[Any]) -> list[Any]:
    """The overhead workload as an ``async def`` batch function."""
    return items


class CountingFn:
    """Wraps a batch function to count calls and rows, the same way for every contender.

    ``wrap()`` returns a function of the same colour (sync or ``async def``) as the wrapped one, so
    libraries that inspect ``fn`` (batchio, batched) treat it exactly like the original.
    """

    def __init__(self, fn: BatchFn) -> None:
        self.fn = fn
        self.calls = 0
        self.rows = 0
        self.is_async = inspect.iscoroutinefunction(fn)

    def wrap(self) -> BatchFn:
        fn = self.fn
        if self.is_async:

            async def counted_async(items: list[Any]) -> Any:
                self.calls += 1
                self.rows += len(items)
                return await fn(items)

            return counted_async

        def counted(items: list[Any]) -> Any:
            self.calls += 1
            self.rows += len(items)
            return fn(items)

        return counted

    @property
    def mean_batch_size(self) -> float:
        return self.rows / self.calls if self.calls else 0.0


# -- the raw asyncio floor ---------------------------------------------------------------------


class FloorIntake(NamedTuple):
    """A floor's queue (:func:`floor_intake`): what callers and its one consumer share."""

    call: Call
    """Queue ``(future, item)``, wake the consumer if it waits, and await the future."""
    wait: Callable[[], Awaitable[None]]
    """Return once something is queued (at once, without yielding, if something already is)."""
    take: Callable[[], list[tuple[asyncio.Future[Any], Any]]]
    """Remove and return the next chunk: up to ``size`` of the oldest ``(future, item)`` pairs."""


def floor_intake(
    size: int, new_future: Callable[[], asyncio.Future[Any]] | None = None
) -> FloorIntake:
    """The floors' intake: a list of ``(future, item)`` and a future that wakes the consumer.

    ``new_future`` replaces ``loop.create_future`` for the callers' futures. Call it on the loop.
    """
    loop = asyncio.get_running_loop()
    create_future = new_future or loop.create_future
    pending: list[tuple[asyncio.Future[Any], Any]] = []
    wake: list[asyncio.Future[None] | None] = [None]

    async def wait() -> None:
        while not pending:
            waiter = wake[0] = loop.create_future()
            await waiter

    def take() -> list[tuple[asyncio.Future[Any], Any]]:
        chunk = pending[:size]
        del pending[:size]
        return chunk

    async def call(item: Any) -> Any:
        fut = create_future()
        pending.append((fut, item))
        waiter = wake[0]
        if waiter is not None:
            wake[0] = None
            waiter.set_result(None)
        return await fut

    return FloorIntake(call, wait, take)


@contextlib.asynccontextmanager
async def consuming(consumer: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``consumer`` as a task for the block; at its end, cancel the task and wait for it."""
    task = asyncio.get_running_loop().create_task(consumer)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def open_floor(
    fn: BatchFn,
    spec: BatchSpec,
    *,
    thread: bool = False,
    new_future: Callable[[], asyncio.Future[Any]] | None = None,
) -> AsyncIterator[Call]:
    """The least work any future-based asyncio batcher can do per request.

    Each request creates one future and appends ``(future, item)`` to a list; one consumer task
    takes chunks of ``max_batch_size``, calls ``fn`` inline (a sync ``fn`` on the loop thread, no
    worker thread) and sets each future's result. No timer, no max_wait, no done-checks, no
    statistics, no error handling: it is a floor to compare against, not a usable batcher.

    With ``thread=True`` a sync ``fn`` runs instead on one dedicated worker thread through
    ``loop.run_in_executor`` (one batch at a time): the floor for batchers that keep a sync
    ``fn`` off the loop, i.e. the cost of the thread hop alone. ``new_future`` replaces
    ``loop.create_future`` (``bench.micro`` measures a ``Future`` subclass with it).
    """
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1) if thread else None
    intake = floor_intake(spec.max_batch_size, new_future)
    is_async = inspect.iscoroutinefunction(fn)

    async def consumer() -> None:
        wait, take = intake.wait, intake.take
        while True:
            await wait()
            chunk = take()
            inputs = [item for _, item in chunk]
            if is_async:
                outputs = await fn(inputs)
            elif pool is not None:
                outputs = await loop.run_in_executor(pool, fn, inputs)
            else:
                outputs = fn(inputs)
            for (fut, _), out in zip(chunk, outputs, strict=True):
                fut.set_result(out)

    try:
        async with consuming(consumer()):
            yield intake.call
    finally:
        if pool is not None:
            pool.shutdown(wait=True)


def open_floor_thread(fn: BatchFn, spec: BatchSpec) -> contextlib.AbstractAsyncContextManager[Call]:
    """:func:`open_floor` with the sync ``fn`` on a dedicated worker thread."""
    return open_floor(fn, spec, thread=True)


# -- load generators ---------------------------------------------------------------------------


@dataclass
class ClosedLoopResult:
    """One closed-loop run."""

    requests: int
    concurrency: int
    elapsed: float
    latencies: list[float] | None = None  # seconds, one per request, when recorded

    @property
    def items_per_s(self) -> float:
        return self.requests / self.elapsed


async def closed_loop(
    call: Call,
    inputs: Sequence[Any],
    *,
    concurrency: int,
    requests: int,
    record_latency: bool = False,
    check: Callable[[Any, Any], bool] | None = None,
) -> ClosedLoopResult:
    """``concurrency`` clients, each awaiting one request at a time, ``requests`` in total.

    Client ``k`` sends requests ``k, k + concurrency, ...`` with input ``inputs[j % len(inputs)]``.
    The overhead benchmark records no per-request latency (two clock reads per request would be a
    visible share of a few microseconds); ``check`` verifies results of the first requests only.
    """
    m = len(inputs)
    lat: list[float] = [0.0] * requests if record_latency else []
    perf = time.perf_counter

    async def client(k: int) -> None:
        if record_latency:
            for j in range(k, requests, concurrency):
                t0 = perf()
                await call(inputs[j % m])
                lat[j] = perf() - t0
        else:
            for j in range(k, requests, concurrency):
                await call(inputs[j % m])

    if check is not None:  # a few untimed requests: the contender really returns the right thing
        for j in range(min(8, m)):
            out = await call(inputs[j])
            if not check(inputs[j], out):
                raise AssertionError(f"wrong result for input {j}: {out!r}")
    t0 = perf()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    elapsed = perf() - t0
    return ClosedLoopResult(requests, concurrency, elapsed, lat if record_latency else None)


@dataclass
class OpenLoopResult:
    """One open-loop (Poisson) run."""

    offered_rate: float  # requests/s asked for
    arrival_rate: float  # requests/s actually launched
    requests: int
    completed: int
    failed: int
    elapsed: float  # first arrival to the last completion or the last arrival, whichever is later
    latencies: list[float] = field(default_factory=list)  # completed requests only, seconds
    slo: float = 0.0

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def goodput(self) -> float:
        """Requests/s completed within the SLO, over the same window as :attr:`throughput`."""
        good = sum(1 for x in self.latencies if x <= self.slo)
        return good / self.elapsed if self.elapsed > 0 else 0.0


async def open_loop(
    call: Call,
    inputs: Sequence[Any],
    *,
    rate: float,
    requests: int,
    seed: int,
    slo: float,
    drain_timeout: float,
) -> OpenLoopResult:
    """Poisson arrivals at ``rate`` requests/s; ``requests`` arrivals, then drain.

    Latency runs from the scheduled arrival time. Requests not finished ``drain_timeout`` seconds
    after the last arrival are cancelled and count as not completed (so past saturation the
    figures show the backlog rather than waiting for it forever).
    """
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)
    offsets: list[float] = []
    t = 0.0
    for _ in range(requests):
        t += rng.expovariate(rate)
        offsets.append(t)
    m = len(inputs)
    lat: list[float] = []
    failed = 0
    last_done = [0.0]

    async def one(j: int, due: float) -> None:
        nonlocal failed
        try:
            await call(inputs[j % m])
        except Exception:
            failed += 1
            return
        now = loop.time()
        lat.append(now - due)
        last_done[0] = max(last_done[0], now)

    tasks: list[asyncio.Task[None]] = []
    start = loop.time() + 0.01
    for j, off in enumerate(offsets):
        due = start + off
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(j, due)))
    launched_at = loop.time()
    _done, not_done = await asyncio.wait(tasks, timeout=drain_timeout)
    for task in not_done:
        task.cancel()
    if not_done:
        await asyncio.wait(not_done)
    arrival_window = max(launched_at - start, 1e-9)
    return OpenLoopResult(
        offered_rate=rate,
        arrival_rate=requests / arrival_window,
        requests=requests,
        completed=len(lat),
        failed=failed,
        elapsed=max(last_done[0] - start, arrival_window),
        latencies=lat,
        slo=slo,
    )


@dataclass
class IdleLatencyResult:
    """Paired single-request latencies: direct call vs through the batcher."""

    direct: list[float]
    batched: list[float]

    @property
    def added(self) -> list[float]:
        return [b - d for b, d in zip(self.batched, self.direct, strict=True)]


async def idle_latency(
    call: Call, direct: Callable[[Any], Any], inputs: Sequence[Any], *, requests: int
) -> IdleLatencyResult:
    """One client; each input is timed once directly (``direct(x)``, blocking) and once through
    ``call`` while the batcher is idle, alternately, so drift affects both sides alike."""
    perf = time.perf_counter
    d_lat: list[float] = []
    b_lat: list[float] = []
    for j in range(requests):
        x = inputs[j % len(inputs)]
        t0 = perf()
        direct(x)
        d_lat.append(perf() - t0)
        await asyncio.sleep(0.002)  # let the batcher go fully idle
        t0 = perf()
        await call(x)
        b_lat.append(perf() - t0)
        await asyncio.sleep(0.002)
    return IdleLatencyResult(d_lat, b_lat)


# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summarize(runs: Sequence[float]) -> dict[str, Any]:
    """min / median / max over repeats, plus the raw runs."""
    return {
        "min": min(runs),
        "median": statistics.median(runs),
        "max": max(runs),
        "runs": list(runs),
    }


# -- environment and output --------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    """``git -C ROOT <args>``'s output, or "" where git is missing or fails."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def _git_commit() -> str | None:
    commit = _git("rev-parse", "--short", "HEAD") or None
    if commit and _git("status", "--porcelain", "batchio"):
        commit += "+dirty(batchio)"
    return commit


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: hardware, OS, Python, library versions, load."""
    dists = [
        "batchio", "anyio", "uvloop", "torch", "transformers", "tokenizers", "numpy",
        "batched", "async-batcher", "aiobatch", "ray",
    ]  # fmt: skip
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "versions": {d: _version(d) for d in dists},
        "git_commit": _git_commit(),
        "loadavg_at_start": os.getloadavg(),
        "argv": sys.argv,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with contextlib.suppress(ImportError):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write results atomically (a ``.tmp`` file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    tmp.replace(path)


# -- output ------------------------------------------------------------------------------------


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a table with rich (left-aligned text columns, right-aligned numbers)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    first = rows[0] if rows else []
    for i, h in enumerate(headers):
        numeric = i < len(first) and first[i][:1].isdigit()
        table.add_column(h, justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console(width=max(140, Console().width)).print(table)


def fmt_range(summary: dict[str, Any], spec: str = ",.0f") -> str:
    """``median (min..max)`` of a :func:`summarize` dict."""
    return f"{summary['median']:{spec}} ({summary['min']:{spec}}..{summary['max']:{spec}})"


# -- progress ----------------------------------------------------------------------------------


class Progress:
    """A thin wrapper over rich's progress bar (silent when ``enabled`` is False)."""

    def __init__(self, total: int, *, enabled: bool = True, description: str = "bench") -> None:
        self._bar: Any = None
        self._task: Any = None
        self.enabled = enabled
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=False,
            )
            self._task = self._bar.add_task(description, total=total)

    @contextlib.contextmanager
    def running(self) -> Iterator[Progress]:
        if self._bar is None:
            yield self
            return
        with self._bar:
            yield self

    def step(self, description: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=description)
            if not self._bar.console.is_terminal:  # a log file: one line per step instead
                done = int(self._bar.tasks[0].completed)
                print(f"[{done}/{self._bar.tasks[0].total}] {description}", flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def log(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message)
        elif self.enabled:
            print(message)
