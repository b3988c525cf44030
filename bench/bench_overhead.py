"""Issue 2: per-request overhead of batchio against the raw asyncio floor.

A no-op batch function (it returns its inputs), ``--concurrency`` client tasks in a closed loop,
``--requests`` requests, ``max_batch_size=--max-batch-size``. Prints items/s for each contender,
loop and batch-function colour, and the ratio to the floor measured in the same run on the same
loop with the same function colour.

    .venv/bin/python -m bench.bench_overhead                      # 200k requests, 3 repeats
    .venv/bin/python -m bench.bench_overhead --requests 20000 --repeats 1   # quick look
    .venv/bin/python -m bench.bench_overhead --profile            # cProfile one batchio run

Sync batch functions run on batchio's worker thread (one hop per batch); the ``async`` variant
awaits an ``async def`` no-op on the loop, so it measures the pure asyncio path.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from pathlib import Path
from typing import Any, cast

from ._contenders import Contender, by_name
from ._harness import (
    ROOT,
    BatchSpec,
    LoopName,
    Progress,
    closed_loop,
    fmt_range,
    loop_available,
    machine_info,
    print_table,
    run_on_loop,
    write_json,
)
from ._workloads import NOOPS, overhead_once, run_configs

__all__ = ["main", "print_overhead", "run_overhead"]


def run_overhead(
    contenders: list[Contender],
    *,
    loops: list[LoopName],
    fn_kinds: list[str],
    spec: BatchSpec,
    requests: int,
    concurrency: int,
    repeats: int,
    progress: Progress,
    skipped: dict[str, str],
    loops_for: Any = None,
    kinds_for: Any = None,
) -> list[dict[str, Any]]:
    """Run the overhead workload; returns one summarised row per (contender, loop, fn)."""
    configs = []
    for c in contenders:
        reason = c.unavailable()
        if reason:
            skipped[c.name] = reason
            continue
        for loop in loops_for(c) if loops_for else loops:
            for kind in kinds_for(c) if kinds_for else fn_kinds:
                fn = NOOPS[kind]
                if not c.supports(fn):
                    skipped.setdefault(f"{c.name} ({kind} fn)", f"{c.name} takes no {kind} fn")
                    continue

                def once(c: Contender = c, loop: LoopName = loop, fn: Any = fn) -> dict[str, float]:
                    return overhead_once(
                        c, loop, fn, spec, requests=requests, concurrency=concurrency
                    )

                meta = {
                    "contender": c.name,
                    "loop": loop,
                    "fn": kind,
                    "options": c.options(spec),
                    "description": c.description,
                }
                configs.append((f"{c.name}/{loop}/{kind}", once, meta))
    rows = run_configs(configs, repeats=repeats, progress=progress, label="overhead")
    floors = {
        (r["loop"], r["fn"]): r["items_per_s"]["median"]
        for r in rows
        if r["contender"] == "floor" and "items_per_s" in r
    }
    for r in rows:
        floor = floors.get((r["loop"], r["fn"]))
        if floor and "items_per_s" in r:
            r["ratio_to_floor"] = r["items_per_s"]["median"] / floor
            r["us_per_request"] = 1e6 / r["items_per_s"]["median"]
    return rows


def print_overhead(rows: list[dict[str, Any]], title: str) -> None:
    table = []
    for r in rows:
        if "items_per_s" not in r:
            table.append([r["contender"], r["loop"], r["fn"], "error: " + r.get("error", "?")])
            continue
        table.append([
            r["contender"], r["loop"], r["fn"], fmt_range(r["items_per_s"]),
            f"{r.get('us_per_request', 0):.2f}", f"{r.get('ratio_to_floor', float('nan')):.2f}",
            f"{r['mean_batch_size']['median']:.1f}",
        ])  # fmt: skip
    headers = ["contender", "loop", "fn", "items/s median (min..max)", "µs/req", "÷ floor",
               "mean batch"]  # fmt: skip
    print_table(title, headers, table)


def _profile(spec: BatchSpec, requests: int, concurrency: int, loop: LoopName, kind: str) -> None:
    contender = by_name("batchio")[0]
    prof = cProfile.Profile()
    prof.enable()
    overhead_once(contender, loop, NOOPS[kind], spec, requests=requests, concurrency=concurrency)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(30)
    print(out.getvalue())


def _cpu_accounting(
    contenders: list[Contender], spec: BatchSpec, requests: int, concurrency: int,
    loop: LoopName, kinds: list[str],
) -> None:  # fmt: skip
    """Wall time vs CPU time of the loop thread per request: busy (CPU-bound) or waiting?"""

    def once(c: Contender, fn: Any) -> tuple[float, float, float]:
        async def main() -> tuple[float, float, float]:
            async with c.open(fn, spec) as call:
                w0, p0, t0 = time.perf_counter(), time.process_time(), time.thread_time()
                await closed_loop(call, range(requests), concurrency=concurrency, requests=requests)
                return (
                    time.perf_counter() - w0, time.process_time() - p0, time.thread_time() - t0
                )  # fmt: skip

        return run_on_loop(loop, main)

    rows = []
    for c in contenders:
        for kind in kinds:
            fn = NOOPS[kind]
            if not c.supports(fn) or c.unavailable():
                continue
            wall, proc, thread = once(c, fn)
            us = 1e6 / requests
            rows.append([
                c.name, kind, f"{wall * us:.2f}", f"{proc * us:.2f}", f"{thread * us:.2f}",
                f"{max(0.0, 1 - thread / wall):.0%}",
            ])  # fmt: skip
    headers = ["contender", "fn", "wall µs/req", "process CPU µs/req", "loop-thread CPU µs/req",
               "loop idle"]  # fmt: skip
    print_table(f"CPU accounting ({loop}, {requests:,} requests, 1 run each)", headers, rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-wait", type=float, default=0.005, help="seconds (batchio's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loops", default="asyncio,uvloop")
    p.add_argument("--fn", default="sync,async", help="batch function colour(s)")
    p.add_argument("--contenders", default="floor,batchio")
    p.add_argument("--json", type=Path, default=ROOT / "bench/results/overhead.json")
    p.add_argument("--profile", action="store_true", help="cProfile one batchio run and exit")
    p.add_argument(
        "--cpu", action="store_true",
        help="print wall vs loop-thread CPU time per request for each contender and exit",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    spec = BatchSpec(a.max_batch_size, a.max_wait)
    loops = [
        cast(LoopName, x) for x in a.loops.split(",") if loop_available(cast(LoopName, x)) is None
    ]
    kinds = a.fn.split(",")
    if a.profile:
        _profile(spec, a.requests, a.concurrency, loops[0], kinds[0])
        return
    contenders = by_name(a.contenders)
    if a.cpu:
        _cpu_accounting(contenders, spec, a.requests, a.concurrency, loops[0], kinds)
        return
    total = a.repeats * len(contenders) * len(loops) * len(kinds)
    progress = Progress(total, enabled=not a.quiet, description="overhead")
    skipped: dict[str, str] = {}
    info = machine_info()
    with progress.running():
        rows = run_overhead(
            contenders, loops=loops, fn_kinds=kinds, spec=spec, requests=a.requests,
            concurrency=a.concurrency, repeats=a.repeats, progress=progress, skipped=skipped,
        )  # fmt: skip
    print_overhead(rows, f"overhead: no-op fn, {a.concurrency} clients, {a.requests:,} requests")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    write_json(a.json, {
        "benchmark": "overhead", "machine": info, "spec": vars(spec) if hasattr(spec, "__dict__")
        else {"max_batch_size": spec.max_batch_size, "max_wait": spec.max_wait},
        "requests": a.requests, "concurrency": a.concurrency, "repeats": a.repeats,
        "rows": rows, "skipped": skipped,
    })  # fmt: skip
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
