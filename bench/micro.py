"""Micro-benchmarks behind the decisions in docs/design.md.

    .venv/bin/python -m bench.micro                 # every experiment, both loops, best of 5
    .venv/bin/python -m bench.micro --only hop,loop-check --repeats 3

Experiments (each reported as the best of ``--repeats`` runs of CPU time, which is steadier than
wall time on a shared machine):

- ``hop``: round trip of a no-op call to one worker thread, one call at a time:
  ``run_in_executor`` with a one-thread pool, ``anyio.to_thread.run_sync`` with a capacity
  limiter of 1, and batchio's own worker threads.
- ``future-subclass``: the raw floor (256 clients, chunks of 64) with exact futures and with a
  slotted ``asyncio.Future`` subclass, to show what the subclass costs the C task.
- ``batch-scaling``: batchio with an ``async def`` no-op at 64 rows/256 clients and at
  256 rows/1024 clients; the two solve for the per-batch and per-request costs.
- ``loop-check``: ``asyncio.get_running_loop() is loop`` against ``threading.get_ident() == tid``.
- ``call-paths``: CPU per request through each call path (64 rows, 256 clients, a no-op ``fn``,
  sync and ``async def``): ``await b(x)`` (a coroutine), ``await b.submit_nowait(x)`` (the
  future), the floor, and, with ``$BATCHIO_BASELINE`` set to an older checkout, that version's
  ``await b(x)``: the before/after of a core change, interleaved in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
import anyio.to_thread

import batchio
from batchio._worker import WorkerThreads

from ._harness import (
    ROOT,
    BatchSpec,
    LoopName,
    loop_available,
    machine_info,
    noop_sync,
    open_floor,
    run_on_loop,
    write_json,
)

LOOPS: tuple[LoopName, ...] = ("asyncio", "uvloop")


def best_cpu(repeats: int, loop: LoopName, run: Callable[[], Coroutine[Any, Any, float]]) -> float:
    """The smallest CPU time ``run`` reports over ``repeats`` fresh event loops."""
    return min(run_on_loop(loop, run) for _ in range(repeats))


def noop(x: Any) -> Any:
    return x


async def hop_executor(n: int = 3000) -> float:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1) as pool:
        start = time.process_time()
        for i in range(n):
            await loop.run_in_executor(pool, noop, i)
        return (time.process_time() - start) / n


async def hop_anyio(n: int = 3000) -> float:
    limiter = anyio.CapacityLimiter(1)
    start = time.process_time()
    for i in range(n):
        await anyio.to_thread.run_sync(noop, i, limiter=limiter)
    return (time.process_time() - start) / n


async def hop_batchio(n: int = 3000) -> float:
    threads = WorkerThreads(1, "micro")
    try:
        start = time.process_time()
        for i in range(n):
            await threads.run(noop, i).future
        return (time.process_time() - start) / n
    finally:
        threads.shutdown()


class SlottedFuture(asyncio.Future[Any]):
    """A future carrying request fields, as batchio's first design had it."""

    __slots__ = ("enqueued_at", "item")


async def floor(subclass: bool, requests: int = 100_000, clients: int = 256) -> float:
    """The raw floor's CPU time per request, with exact futures or with ``SlottedFuture``."""
    loop = asyncio.get_running_loop()
    new_future = (lambda: SlottedFuture(loop=loop)) if subclass else None
    per = requests // clients
    async with open_floor(noop_sync, BatchSpec(max_batch_size=64), new_future=new_future) as call:

        async def client() -> None:
            for i in range(per):
                await call(i)

        start = time.process_time()
        await asyncio.gather(*(client() for _ in range(clients)))
        return (time.process_time() - start) / (per * clients)


async def batchio_async_noop(rows: int, clients: int, requests: int = 100_000) -> float:
    """CPU seconds per request, ``await b(x)`` on an ``async def`` no-op (batch-scaling)."""
    return await batchio_calls(batchio.Batcher, "call", True, rows, clients, requests)


async def batchio_calls(
    cls: Any,
    path: str,
    use_async: bool,
    rows: int = 64,
    clients: int = 256,
    requests: int = 100_000,
) -> float:
    """CPU seconds per request through one call path of a ``Batcher`` class."""

    async def afn(items: list[int]) -> list[int]:
        return items

    def fn(items: list[int]) -> list[int]:
        return items

    per = requests // clients
    async with cls(afn if use_async else fn, max_batch_size=rows, max_wait=0.001) as b:
        call = b.submit_nowait if path == "nowait" else b

        async def client() -> None:
            for i in range(per):
                await call(i)

        start = time.process_time()
        await asyncio.gather(*(client() for _ in range(clients)))
        return (time.process_time() - start) / (per * clients)


async def loop_checks(n: int = 1_000_000) -> tuple[float, float]:
    get_loop, get_ident = asyncio.get_running_loop, threading.get_ident
    loop, tid = get_loop(), get_ident()
    start = time.perf_counter()
    for _ in range(n):
        pass
    empty = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        _ = get_loop() is loop
    by_loop = time.perf_counter() - start - empty
    start = time.perf_counter()
    for _ in range(n):
        _ = get_ident() == tid
    by_thread = time.perf_counter() - start - empty
    return by_loop / n, by_thread / n


def call_paths(repeats: int, loop: LoopName) -> dict[str, float]:
    """Best-of CPU µs per request for each call path, the paths interleaved repeat by repeat."""
    from ._contenders import _baseline_cls

    paths: dict[str, Callable[[], Coroutine[Any, Any, float]]] = {}
    try:
        baseline: Any = _baseline_cls()
    except ImportError:
        baseline = None
    for colour, use_async in (("async", True), ("sync", False)):
        paths[f"{colour} fn: await b(x)"] = functools.partial(
            batchio_calls, batchio.Batcher, "call", use_async
        )
        paths[f"{colour} fn: await b.submit_nowait(x)"] = functools.partial(
            batchio_calls, batchio.Batcher, "nowait", use_async
        )
        if baseline is not None:
            paths[f"{colour} fn: baseline await b(x)"] = functools.partial(
                batchio_calls, baseline, "call", use_async
            )
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeats):
        for name, run in paths.items():
            best[name] = min(best[name], run_on_loop(loop, run))
    return {name: seconds * 1e6 for name, seconds in best.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="hop,future-subclass,batch-scaling,loop-check")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "micro.json"))
    args = p.parse_args()
    only = set(args.only.split(","))
    r = args.repeats
    results: dict[str, Any] = {"machine": machine_info(), "repeats": r}
    loops = [lp for lp in LOOPS if loop_available(lp) is None]
    for lp in loops:
        out: dict[str, Any] = {}
        if "hop" in only:
            out["hop_us"] = {
                "run_in_executor": best_cpu(r, lp, hop_executor) * 1e6,
                "anyio.to_thread": best_cpu(r, lp, hop_anyio) * 1e6,
                "batchio worker": best_cpu(r, lp, hop_batchio) * 1e6,
            }
        if "future-subclass" in only:
            exact = best_cpu(r, lp, lambda: floor(False))
            sub = best_cpu(r, lp, lambda: floor(True))
            out["floor_per_s"] = {"exact future": 1 / exact, "future subclass": 1 / sub}
        if "batch-scaling" in only:
            small = best_cpu(r, lp, lambda: batchio_async_noop(64, 256))
            big = best_cpu(r, lp, lambda: batchio_async_noop(256, 1024))
            per_batch = (small - big) / (1 / 64 - 1 / 256)
            out["scaling_us"] = {
                "per request at 64 rows": small * 1e6,
                "per request at 256 rows": big * 1e6,
                "per batch": per_batch * 1e6,
                "per request without batch costs": (small - per_batch / 64) * 1e6,
            }
        if "loop-check" in only:
            by_loop, by_thread = min(
                (run_on_loop(lp, loop_checks) for _ in range(r)), key=lambda t: t[0]
            )
            out["loop_check_ns"] = {
                "get_running_loop() is loop": by_loop * 1e9,
                "get_ident() == tid": by_thread * 1e9,
            }
        if "call-paths" in only:
            out["call_paths_us"] = call_paths(r, lp)
        results[lp] = out
        print(f"== {lp}")
        for name, table in out.items():
            for k, v in table.items():
                print(f"  {name:14} {k:34} {v:>12,.2f}")
    write_json(__import__("pathlib").Path(args.json), results)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
