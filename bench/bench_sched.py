"""Issue 9: scheduling toward a latency target, in an open loop.

Poisson arrivals from 10 % to 150 % of each workload's capacity, on two workloads:

* ``minilm``: the suite's open-loop batch function (``bench/_model.py``: tokenize, MiniLM forward,
  pool, normalise) on the CPU, one torch thread, ``max_batch_size`` 32. Capacity (100 %) is the
  best offline **arrival-order** throughput of batch sizes 1, 8 and 32 (full batches in corpus
  order, the most a FIFO batcher can reach: on a CPU, padding makes a FIFO batch of 32 slower
  per row than one of 8). The suite's 100 % is the length-sorted ceiling, which no contender
  here can reach; it is in the JSON too.
* ``sim``: a simulated accelerator, a batch function that sleeps ``a + b * rows`` seconds without
  the GIL (``bench/_simdevice.sleep_until``), ``max_batch_size`` 64. Capacity is its offline
  ceiling: full batches back to back.

Each batch function holds a lock while it runs (one device: a contender that runs two batches at
once queues the second on it, it does not get a second device).

The SLO is the suite's: ``--slo-factor`` (4) times one full batch of ``max_batch_size`` at its
ceiling rate. Contenders:

* ``batchio[latency_target]``: ``Batcher(fn, max_batch_size=B, latency_target=SLO)``, nothing else;
* ``batchio[latency_target+deadline]``: the same plus ``timeout=SLO, early_timeout=True``;
* ``batchio[latency_target mcb=2]`` (diagnostic): the same as the first with
  ``max_concurrent_batches=2``, the only setting in which the policy's "wait for the target size"
  rule can act (with one batch slot a batch is dispatched whenever the slot is free);
* ``batchio[default]``: ``Batcher(fn, max_batch_size=B)`` (``max_wait`` 5 ms, the default);
* a grid of static settings, ``max_wait`` in {0, 1, 5} ms by ``max_batch_size`` in {B/4, B}, and
  ``batchio[best static (oracle)]``: per load level, the grid cell with the best goodput (ties
  within 2 %: the lowest p99), chosen after the fact, which no real deployment can do;
* ``batchio+deadline``: the suite's static batchio with ``timeout=SLO``;
* the suite's peers (batched, async-batcher, aiobatch, Ray Serve); those not importable here are
  skipped with the reason.

For each contender and load: offered rate, throughput, goodput within the SLO, p50/p99 of the
served requests, failures; for every batchio contender, the controller as ``statistics()``
reports it, sampled during the arrivals (target, cap, wait, arrival rate) and at the end (dispatch
reasons, early time-outs, the run-time model, mean batch size). Then the idle case: one client, the
latency added over a direct call, for ``latency_target``, ``max_wait=0`` and the default.

Each repeat opens a fresh batcher and sends ``warmup_s`` of arrivals (not measured) before the
measured window, in one Poisson stream, so the window starts warm: the run-time model learned,
the arrival-rate meter converged, the backlog of that load in place.

    .venv/bin/python -m bench.bench_sched            # the documented run (about 25 min here)
    .venv/bin/python -m bench.bench_sched --quick    # under 2 minutes
    .venv/bin/python -m bench.bench_sched --report bench/results/sched.json   # Markdown tables

Writes ``bench/results/sched.json`` (``sched-quick.json`` with ``--quick``) and
``docs/img/sched-{p99,goodput,controller}.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import batchio

from ._contenders import (
    CONTENDERS,
    Contender,
    batchio_deadline_contender,
    batchio_options_contender,
)
from ._harness import (
    ROOT,
    BatchFn,
    BatchSpec,
    CountingFn,
    Progress,
    fmt_range,
    machine_info,
    open_loop,
    percentile,
    print_table,
    run_on_loop,
    summarize,
    write_json,
)
from ._simdevice import sleep_until
from ._workloads import model_ceiling, model_idle_once, run_configs
from .report import md_range, md_table

__all__ = ["SIZES", "Sizes", "main", "plot", "render_markdown", "run_sched"]

LT = "batchio[latency_target]"
LT_DEADLINE = "batchio[latency_target+deadline]"
LT_MCB2 = "batchio[latency_target mcb=2]"
DEFAULT = "batchio[default]"
ORACLE = "batchio[best static (oracle)]"
CONTROLLED = (LT, LT_DEADLINE, LT_MCB2)
WORKLOADS = ("minilm", "sim")


@dataclass(frozen=True)
class Sizes:
    """How big the run is: ``full`` (the documented run), ``quick`` and ``tiny`` (smoke test)."""

    levels: tuple[float, ...]  # fractions of the workload's capacity
    repeats: int
    window_s: dict[str, float]  # measured Poisson arrival window per level, by workload
    warmup_s: dict[str, float]  # arrivals just before it at the same rate, not measured
    min_requests: int
    idle_requests: dict[str, int]
    ceiling_rows: int  # rows timed for each offline ceiling (in full batches)
    ceiling_repeats: int
    grid_waits: tuple[float, ...] = (0.0, 0.001, 0.005)


SIZES = {
    "full": Sizes(
        levels=(0.1, 0.3, 0.5, 0.7, 0.9, 1.1, 1.3, 1.5), repeats=2,
        window_s={"minilm": 1.5, "sim": 1.0}, warmup_s={"minilm": 1.0, "sim": 1.0},
        min_requests=16, idle_requests={"minilm": 40, "sim": 200}, ceiling_rows=256,
        ceiling_repeats=3,
    ),
    "quick": Sizes(
        levels=(0.3, 0.9, 1.5), repeats=1,
        window_s={"minilm": 0.5, "sim": 0.25}, warmup_s={"minilm": 0.3, "sim": 0.15},
        min_requests=10, idle_requests={"minilm": 10, "sim": 50}, ceiling_rows=64,
        ceiling_repeats=1, grid_waits=(0.0, 0.005),
    ),
    "tiny": Sizes(
        levels=(0.5, 1.2), repeats=1,
        window_s={"minilm": 0.3, "sim": 0.1}, warmup_s={"minilm": 0.2, "sim": 0.05},
        min_requests=8, idle_requests={"minilm": 5, "sim": 10}, ceiling_rows=64,
        ceiling_repeats=1, grid_waits=(0.0, 0.005),
    ),
}  # fmt: skip


def _batchio_diff() -> str | None:
    """A short hash of ``git diff HEAD -- batchio`` (the uncommitted core that was measured)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "diff", "HEAD", "--", "batchio"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return hashlib.sha1(out.stdout).hexdigest()[:12] if out.stdout else None


# -- workloads ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """One batch function with its inputs, capacity and SLO."""

    name: str
    label: str
    fn: BatchFn  # holds the device lock while it runs
    inputs: Sequence[Any]
    max_batch_size: int
    capacity: float  # rows/s at 100 % load
    slo: float  # seconds
    info: dict[str, Any]


def _one_device(fn: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """``fn`` behind a lock: one batch at a time, as on one device."""
    lock = threading.Lock()

    def on_device(items: list[Any]) -> Any:
        with lock:
            return fn(items)

    return on_device


def sim_fn(a: float, b: float) -> Callable[[list[Any]], list[Any]]:
    """The simulated accelerator: ``a + b * rows`` seconds without the GIL; returns the inputs."""

    def device(items: list[Any]) -> list[Any]:
        sleep_until(time.perf_counter() + a + b * len(items))
        return items

    return device


def sim_workload(a: argparse.Namespace, sizes: Sizes) -> Workload:
    bs = a.sim_batch_size
    fn = _one_device(sim_fn(a.sim_a, a.sim_b))
    inputs = list(range(1024))
    runs = []
    batches = max(4, sizes.ceiling_rows * 4 // bs)  # a sim batch is cheap: 4x the rows
    for _ in range(sizes.ceiling_repeats):
        t0 = time.perf_counter()
        for _ in range(batches):
            fn(inputs[:bs])
        runs.append(batches * bs / (time.perf_counter() - t0))
    ceiling = summarize(runs)
    capacity = ceiling["median"]
    slo = a.slo_factor * bs / capacity
    info = {
        "fn": f"time.sleep-based: {a.sim_a * 1e3:g} ms + {a.sim_b * 1e3:g} ms/row, GIL released",
        "a_s": a.sim_a, "b_s_per_row": a.sim_b, "max_batch_size": bs,
        "ceiling": ceiling, "analytic_ceiling": bs / (a.sim_a + a.sim_b * bs),
        "one_row_s": a.sim_a + a.sim_b,
    }  # fmt: skip
    label = f"simulated accelerator ({a.sim_a * 1e3:g} ms + {a.sim_b * 1e3:g} ms/row, batch {bs})"
    return Workload("sim", label, fn, inputs, bs, capacity, slo, info)


def minilm_workload(a: argparse.Namespace, sizes: Sizes) -> Workload:
    from ._corpus import corpus_stats
    from .bench_model import prepare_model

    a.max_batch_size = a.minilm_batch_size
    embedder, sentences = prepare_model(a)
    bs = a.minilm_batch_size
    sample = sentences[: sizes.ceiling_rows]
    small = max(1, bs // 4)
    arrival: list[float] = []
    sorted_: list[float] = []
    by_size: dict[int, list[float]] = {1: [], small: []}
    for _ in range(sizes.ceiling_repeats):  # interleaved, like run_baselines
        arrival.append(model_ceiling(embedder, sample, batch_size=bs, sort=False))
        sorted_.append(model_ceiling(embedder, sample, batch_size=bs, sort=True))
        for size, runs in by_size.items():  # FIFO batches of the static grid's smaller size
            runs.append(model_ceiling(embedder, sample, batch_size=size, sort=False))
    # Capacity: the best FIFO (arrival-order) throughput of the batch sizes in play. On a CPU
    # the padding of larger arrival-order batches can cost more than batching saves, so the
    # ceiling at max_batch_size alone can be below what smaller batches reach. The SLO is the
    # suite's: a few full batches at max_batch_size.
    ceilings = {bs: statistics.median(arrival)} | {
        k: statistics.median(v) for k, v in by_size.items()
    }
    best = max(ceilings, key=lambda k: ceilings[k])
    capacity = ceilings[best]
    slo = a.slo_factor * bs / ceilings[bs]
    info = {
        "fn": "bench/_model.py load_embedder: the suite's plain batch fn",
        "model_path": embedder.model_path, "device": embedder.device,
        "torch_threads": embedder.torch_threads, "max_length": embedder.max_length,
        "max_batch_size": bs, "ceiling": summarize(arrival), "ceiling_sorted": summarize(sorted_),
        "ceiling_arrival_by_batch_size": {str(k): summarize(v) for k, v in by_size.items()},
        "capacity_basis": f"arrival-order ceiling at batch size {best}, the best of "
        f"{sorted(ceilings)}",
        "ceiling_sentences": len(sample), "corpus": corpus_stats(sentences),
    }  # fmt: skip
    label = f"MiniLM on the CPU ({embedder.torch_threads} torch thread, batch {bs})"
    return Workload("minilm", label, _one_device(embedder.fn), sentences, bs, capacity, slo, info)


# -- contenders --------------------------------------------------------------------------------


def grid_name(max_wait: float, max_batch_size: int, *, mcb: int = 1) -> str:
    slots = "" if mcb == 1 else f" mcb={mcb}"
    return f"batchio[max_wait={max_wait * 1000:g}ms bs={max_batch_size}{slots}]"


def contenders_for(w: Workload, sizes: Sizes) -> tuple[list[Contender], list[str], dict[str, str]]:
    """The contenders for one workload, the names of the static grid, and the skipped peers."""
    bs, slo = w.max_batch_size, w.slo
    out = [
        batchio_options_contender(LT, latency_target=slo),
        batchio_options_contender(LT_DEADLINE, latency_target=slo, timeout=slo, early_timeout=True),
        batchio_options_contender(LT_MCB2, latency_target=slo, max_concurrent_batches=2),
        batchio_options_contender(DEFAULT),
    ]
    grid = [DEFAULT]
    for size in (max(1, bs // 4), bs):
        for wait in sizes.grid_waits:
            if (wait, size) == (0.005, bs):
                continue  # that cell is batchio[default]
            name = grid_name(wait, size)
            out.append(batchio_options_contender(name, max_wait=wait, max_batch_size=size))
            grid.append(name)
    out.append(batchio_deadline_contender(slo))
    out += [  # diagnostic, run only when named: a second batch slot, static policy
        batchio_options_contender(grid_name(t, bs, mcb=2), max_wait=t, max_concurrent_batches=2)
        for t in sizes.grid_waits
    ]
    skipped: dict[str, str] = {}
    for c in CONTENDERS:
        if c.is_floor or c.name.startswith("batchio"):
            continue
        reason = c.unavailable()
        if reason:
            skipped[c.name] = reason
        else:
            out.append(c)
    return out, grid, skipped


# -- one open-loop repeat ----------------------------------------------------------------------


def _median(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _controller(stats: Any, before: Any, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """What a batchio contender's ``statistics()`` says about its decisions during the measured
    window: counters as the difference from the snapshot ``before`` it (taken at the end of the
    warm-up), percentiles over the batcher's recent samples (the warm-up's included)."""
    s = stats.scheduler
    model = s.model
    batches = stats.batches - before.batches
    rows = stats.rows - before.rows
    old_reasons = before.scheduler.dispatch_reasons
    reasons = {
        k: v - old_reasons.get(k, 0)
        for k, v in s.dispatch_reasons.items()
        if v - old_reasons.get(k, 0) > 0
    }
    return {
        "policy": s.policy,
        "mean_batch_size": rows / batches if batches else 0.0,
        "batches": batches,
        "dispatch_reasons": reasons,
        "early_timeouts": s.early_timeouts - before.scheduler.early_timeouts,
        "timed_out": stats.timed_out - before.timed_out,
        "queue_wait_p50_ms": stats.queue_wait.p50 * 1000,
        "queue_wait_p99_ms": stats.queue_wait.p99 * 1000,
        "batch_run_p50_ms": stats.batch_run.p50 * 1000,
        "batch_run_p99_ms": stats.batch_run.p99 * 1000,
        "model": None if model is None else {
            "intercept_ms": model.intercept * 1000, "slope_ms": model.slope * 1000,
            "samples": model.samples, "unit": model.unit,
        },
        # medians of the samples taken every sample_s during the measured arrivals
        "samples": len(samples),
        "target": _median([x["target"] for x in samples]),
        "cap": _median([x["cap"] for x in samples]),
        "wait_ms": _median([None if x["wait"] is None else x["wait"] * 1000 for x in samples]),
        "arrival_rate": _median([x["arrival_rate"] for x in samples]),
        "queue_depth": _median([x["queue_depth"] for x in samples]),
    }  # fmt: skip


def _arrivals_end(rate: float, requests: int, seed: int) -> float:
    """When :func:`open_loop` schedules its last arrival, from its start (the same draws)."""
    rng = random.Random(seed)
    return sum(rng.expovariate(rate) for _ in range(requests))


def open_once(
    c: Contender, fn: BatchFn, spec: BatchSpec, *, inputs: Sequence[Any], rate: float,
    requests: int, warmup: int, seed: int, slo: float, drain_timeout: float, sample_s: float,
    controller: list[dict[str, Any]],
) -> dict[str, float]:  # fmt: skip
    """One Poisson repeat: ``warmup`` arrivals (not measured), then at once ``requests``
    measured ones at the same rate, one stream, so the measured window starts with the backlog,
    the learned run-time model and the arrival rate of a batcher already under this load. A
    batchio contender's decisions in the window are appended to ``controller``."""
    counter = CountingFn(fn)
    samples: list[dict[str, Any]] = []

    async def sample(stats: Callable[[], Any], until: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until:
            await asyncio.sleep(sample_s)
            st = stats()
            s = st.scheduler
            samples.append({
                "target": s.target, "cap": s.cap, "wait": s.wait,
                "arrival_rate": s.arrival_rate, "queue_depth": st.queue_depth,
            })  # fmt: skip

    async def main() -> tuple[Any, float]:
        loop = asyncio.get_running_loop()
        async with c.open(counter.wrap(), spec) as call:
            warm = None
            if warmup > 0:
                warm = loop.create_task(open_loop(
                    call, inputs, rate=rate, requests=warmup, seed=seed + 7919, slo=slo,
                    drain_timeout=drain_timeout,
                ))  # fmt: skip
                await asyncio.sleep(0.01 + _arrivals_end(rate, warmup, seed + 7919))
            calls0, rows0 = counter.calls, counter.rows
            stats: Any = getattr(call, "statistics", None)
            sampler = before = None
            if callable(stats):
                before = stats()
                until = loop.time() + 0.01 + _arrivals_end(rate, requests, seed)
                sampler = loop.create_task(sample(stats, until))
            res = await open_loop(
                call, inputs, rate=rate, requests=requests, seed=seed, slo=slo,
                drain_timeout=drain_timeout,
            )  # fmt: skip
            calls, rows = counter.calls - calls0, counter.rows - rows0
            if sampler is not None:
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
                controller.append(_controller(stats(), before, samples))
            if warm is not None:
                await warm
        return res, rows / calls if calls else 0.0

    res, mean_batch = run_on_loop("asyncio", main)
    return {
        "arrival_rate": res.arrival_rate,
        "throughput": res.throughput,
        "goodput": res.goodput,
        "completed_fraction": res.completed / res.requests,
        "failed_fraction": res.failed / res.requests,
        "unfinished_fraction": (res.requests - res.completed - res.failed) / res.requests,
        "p50_ms": percentile(res.latencies, 50) * 1000,
        "p99_ms": percentile(res.latencies, 99) * 1000,
        "mean_batch_size": mean_batch,
    }


def _merge_controller(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One controller record per row: medians over repeats; reasons and counts summed."""
    out: dict[str, Any] = {"repeats": runs}
    for key in ("mean_batch_size", "target", "cap", "wait_ms", "arrival_rate", "queue_depth",
                "queue_wait_p50_ms", "queue_wait_p99_ms", "batch_run_p50_ms"):  # fmt: skip
        out[key] = _median([r[key] for r in runs])
    reasons: dict[str, int] = {}
    for r in runs:
        for k, v in r["dispatch_reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    out["dispatch_reasons"] = reasons
    for key in ("early_timeouts", "batches", "samples", "timed_out"):
        out[key] = sum(r[key] for r in runs)
    out["model"] = runs[-1]["model"]
    out["policy"] = runs[-1]["policy"]
    return out


def run_open(
    w: Workload, contenders: Sequence[Contender], sizes: Sizes, *, repeats: int,
    progress: Progress,
) -> list[dict[str, Any]]:  # fmt: skip
    spec = BatchSpec(w.max_batch_size, 0.005)
    window = sizes.window_s[w.name]
    warm_s = sizes.warmup_s[w.name]
    configs = []
    side: dict[str, list[dict[str, Any]]] = {}
    for c in contenders:
        for level in sizes.levels:
            rate = level * w.capacity
            n = max(sizes.min_requests, round(rate * window))
            n_warm = round(rate * warm_s)
            key = f"{w.name}/{c.name}/{level:.0%}"
            side[key] = []

            def once(
                c: Contender = c, rate: float = rate, n: int = n, n_warm: int = n_warm,
                level: float = level, key: str = key,
            ) -> dict[str, float]:  # fmt: skip
                return open_once(
                    c, w.fn, spec, inputs=w.inputs, rate=rate, requests=n, warmup=n_warm,
                    seed=int(level * 1000), slo=w.slo, drain_timeout=max(2.0, 2 * w.slo + 1),
                    sample_s=min(0.1, window / 20), controller=side[key],
                )  # fmt: skip

            meta = {
                "workload": w.name, "contender": c.name, "level": level, "offered_rate": rate,
                "requests": n, "warmup_requests": n_warm, "slo_ms": w.slo * 1000,
                "options": c.options(spec),
            }  # fmt: skip
            configs.append((key, once, meta))
    rows = run_configs(configs, repeats=repeats, progress=progress, label="open loop")
    for r in rows:
        if side.get(r["key"]):
            r["controller"] = _merge_controller(side[r["key"]])
    return rows


def oracle_rows(rows: Sequence[dict[str, Any]], grid: Sequence[str]) -> list[dict[str, Any]]:
    """Per workload and level, the static grid cell with the best goodput (ties within 2 %: the
    lowest p99), chosen after the fact."""
    out = []
    cells = [r for r in rows if r["contender"] in grid and "goodput" in r]
    for wl in dict.fromkeys(r["workload"] for r in cells):
        for level in dict.fromkeys(r["level"] for r in cells if r["workload"] == wl):
            mine = [r for r in cells if r["workload"] == wl and r["level"] == level]
            best = max(r["goodput"]["median"] for r in mine)
            close = [r for r in mine if r["goodput"]["median"] >= 0.98 * best]
            pick = min(close, key=lambda r: r["p99_ms"]["median"])
            row = {k: v for k, v in pick.items() if k != "controller"}
            row.update(contender=ORACLE, chosen=pick["contender"], key=f"{wl}/{ORACLE}/{level:.0%}")
            out.append(row)
    return out


def run_idle(
    w: Workload, contenders: Sequence[Contender], sizes: Sizes, *, repeats: int,
    progress: Progress,
) -> list[dict[str, Any]]:  # fmt: skip
    """One client: latency added over a direct call, batcher idle at each arrival."""
    spec = BatchSpec(w.max_batch_size, 0.005)
    n = sizes.idle_requests[w.name]
    configs = []
    for c in contenders:

        def once(c: Contender = c) -> dict[str, float]:
            return model_idle_once(c, "asyncio", w.fn, spec, sentences=w.inputs, requests=n)

        meta = {
            "workload": w.name, "contender": c.name, "kind": _idle_kind(c.name, w),
            "requests": n, "options": c.options(spec),
        }  # fmt: skip
        configs.append((f"{w.name}/{c.name}/idle", once, meta))
    return run_configs(configs, repeats=repeats, progress=progress, label="idle")


# -- the run -----------------------------------------------------------------------------------


def run_sched(a: argparse.Namespace) -> dict[str, Any]:
    sizes = SIZES[a.mode]
    if a.levels:
        sizes = replace(sizes, levels=tuple(float(x) for x in a.levels.split(",")))
    repeats = a.repeats or sizes.repeats
    wanted = None if not a.contenders else {n.strip() for n in a.contenders.split(",")}
    info = machine_info()
    info["batchio_uncommitted_diff"] = _batchio_diff()
    info["batchio_path"] = str(Path(batchio.__file__).parent)
    results: dict[str, Any] = {
        "benchmark": "sched", "mode": a.mode, "machine": info, "sizes": asdict(sizes),
        "repeats": repeats, "args": vars(a), "workloads": {}, "open": [], "idle": [],
        "skipped": {},
    }  # fmt: skip
    t_start = time.perf_counter()
    built: list[tuple[Workload, list[Contender], list[str]]] = []
    for name in a.workloads.split(","):
        w = (minilm_workload if name == "minilm" else sim_workload)(a, sizes)
        cs, grid, skipped = contenders_for(w, sizes)
        if wanted is not None:
            cs = [c for c in cs if c.name in wanted]
            grid = [g for g in grid if g in wanted]
        else:
            cs = [c for c in cs if not c.name.endswith(" mcb=2]") or c.name == LT_MCB2]
        results["skipped"].update(skipped)
        results["workloads"][w.name] = {
            "label": w.label, "capacity": w.capacity, "slo_s": w.slo, **w.info,
            "grid": grid, "contenders": [c.name for c in cs],
        }  # fmt: skip
        built.append((w, cs, grid))
    total = 0
    for w, cs, _ in built:
        total += repeats * len(cs) * len(sizes.levels)
        total += repeats * len([c for c in cs if _idle_kind(c.name, w) is not None])
    progress = Progress(total, enabled=not a.quiet, description="sched")
    with progress.running():
        for w, cs, grid in built:
            t0 = time.perf_counter()
            progress.log(
                f"[bold]{w.label}: capacity {w.capacity:,.1f}/s, SLO {w.slo * 1000:,.1f} ms"
            )
            rows = run_open(w, cs, sizes, repeats=repeats, progress=progress)
            results["open"] += rows + oracle_rows(rows, grid)
            idle_cs = [c for c in cs if _idle_kind(c.name, w) is not None]
            results["idle"] += run_idle(w, idle_cs, sizes, repeats=repeats, progress=progress)
            results["workloads"][w.name]["wall_s"] = time.perf_counter() - t0
    results["wall_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    return results


def _idle_kind(name: str, w: Workload) -> str | None:
    """The idle comparison's three batchio settings (latency_target, max_wait=0, default)."""
    kinds = {
        LT: "latency_target",
        DEFAULT: "max_wait=5ms (default)",
        grid_name(0.0, w.max_batch_size): "max_wait=0",
    }
    return kinds.get(name)


# -- output ------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _reasons(ctl: dict[str, Any]) -> str:
    reasons: dict[str, int] = ctl["dispatch_reasons"]
    total = sum(reasons.values()) or 1
    return ", ".join(
        f"{k} {v / total:.0%}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])
    )


def print_results(results: dict[str, Any]) -> None:
    from rich.markup import escape  # contender names have [brackets]

    for wl, wi in results["workloads"].items():
        rows = [r for r in results["open"] if r["workload"] == wl]
        table = []
        for r in rows:
            head = [escape(r["contender"]), f"{r['level']:.0%}", f"{r['offered_rate']:,.1f}"]
            if "p50_ms" not in r:
                table.append([*head, "error: " + r.get("error", "?"), "", "", "", "", "", ""])
                continue
            table.append([
                *head, fmt_range(r["throughput"], ",.1f"), fmt_range(r["goodput"], ",.1f"),
                f"{r['failed_fraction']['median']:.0%}",
                f"{r['unfinished_fraction']['median']:.0%}",
                fmt_range(r["p50_ms"], ",.1f"), fmt_range(r["p99_ms"], ",.1f"),
                f"{r['mean_batch_size']['median']:.1f}"
                + (f" ← {escape(r['chosen'])}" if "chosen" in r else ""),
            ])  # fmt: skip
        headers = ["contender", "load", "offered/s", "throughput/s", "goodput/s", "failed",
                   "unfinished", "p50 ms", "p99 ms", "mean batch"]  # fmt: skip
        print_table(
            f"{wi['label']}: capacity {wi['capacity']:,.1f}/s, SLO {wi['slo_s'] * 1000:,.1f} ms",
            headers, table,
        )  # fmt: skip
        ctl = []
        for r in rows:
            c = r.get("controller")
            if c is None or r["contender"] not in CONTROLLED:
                continue
            m = c["model"]
            ctl.append([
                escape(r["contender"]), f"{r['level']:.0%}", _fmt(c["mean_batch_size"], ".1f"),
                _fmt(c["target"], ".1f"), _fmt(c["cap"], ".1f"), _fmt(c["wait_ms"], ".2f"),
                _fmt(c["arrival_rate"], ",.0f"), _fmt(c["queue_wait_p99_ms"], ",.1f"),
                "—" if m is None else f"{m['intercept_ms']:.2f} + {m['slope_ms']:.3f}/row",
                _reasons(c), str(c["early_timeouts"]),
            ])  # fmt: skip
        if ctl:
            print_table(
                f"{wl}: the controller (medians of samples during the arrivals)",
                ["contender", "load", "mean batch", "target", "cap", "wait ms", "rate/s",
                 "queue wait p99 ms", "model ms", "dispatch reasons", "early t/o"], ctl,
            )  # fmt: skip
    idle = [
        [r["workload"], escape(r["contender"]), fmt_range(r["direct_p50_ms"], ".2f"),
         fmt_range(r["added_p50_ms"], ".2f"), fmt_range(r["added_p99_ms"], ".2f")]
        for r in results["idle"] if "added_p50_ms" in r
    ]  # fmt: skip
    if idle:
        print_table(
            "idle: one client, latency added over a direct call",
            ["workload", "contender", "direct p50 ms", "added p50 ms", "added p99 ms"], idle,
        )  # fmt: skip
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return md_table(headers, rows, left=2)


OPEN_HEADERS = ("contender", "load", "offered/s", "throughput/s", "goodput/s", "failed",
                "unfinished", "p50 ms", "p99 ms", "mean batch")  # fmt: skip
CONTROLLER_HEADERS = ("contender", "load", "mean batch", "target", "cap", "wait ms", "rate/s",
                      "model ms", "dispatch reasons", "early time-outs (all repeats)")  # fmt: skip


def summary_md(results: dict[str, Any], wl: str) -> str:
    """One row per load: goodput/s and p99 ms of the main contenders side by side (the best
    peer is the one with the most goodput at that load)."""
    wi = results["workloads"][wl]
    rows = [r for r in results["open"] if r["workload"] == wl and "goodput" in r]
    peers = [c for c in wi["contenders"] if not c.startswith("batchio")]
    zero = grid_name(0.0, wi["max_batch_size"])
    cols = [LT, LT_DEADLINE, ORACLE, DEFAULT, zero, "batchio+deadline"]
    cols = [c for c in cols if c == ORACLE or c in wi["contenders"]]

    def cell(r: dict[str, Any] | None) -> str:
        if r is None:
            return ""
        return f"{r['goodput']['median']:,.0f} / {r['p99_ms']['median']:,.0f}"

    body = []
    for level in dict.fromkeys(r["level"] for r in rows):
        at = {r["contender"]: r for r in rows if r["level"] == level}
        line = [f"{level:.0%}"]
        for c in cols:
            line.append(cell(at.get(c)))
            if c == ORACLE and c in at:
                line[-1] += f" `{at[c]['chosen'].removeprefix('batchio')}`"
        mine = [at[p] for p in peers if p in at]
        best = max(mine, key=lambda r: r["goodput"]["median"], default=None)
        line.append("" if best is None else f"{cell(best)} ({best['contender']})")
        body.append(line)
    short = {LT: "latency_target", LT_DEADLINE: "latency_target+deadline",
             ORACLE: "best static (oracle)", DEFAULT: "default (5 ms)", zero: "max_wait=0",
             "batchio+deadline": "static+deadline"}  # fmt: skip
    headers = ["load", *(short[c] for c in cols), "best peer"]
    out = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out)


def render_markdown(results: dict[str, Any], *, all_grid: bool = False) -> str:
    """The tables of ``docs/benchmarks.md`` section 7, from a results file."""
    parts = []
    m = results["machine"]
    parts.append(
        f"*{m['cpu']} x{m['cpus']}, {m['platform']}, Python {m['python']}, batchio commit "
        f"{m.get('git_commit')} (uncommitted core diff {m.get('batchio_uncommitted_diff')}), load "
        f"avg {'/'.join(f'{x:.2f}' for x in m['loadavg_at_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in m.get('loadavg_at_end', []))} at end; {results['mode']} "
        f"mode, {results['repeats']} repeat(s); run at {m['time_utc']}, "
        f"{results['wall_s'] / 60:.1f} min.*"
    )
    for wl, wi in results["workloads"].items():
        rows = [r for r in results["open"] if r["workload"] == wl]
        grid = set(wi["grid"]) - {DEFAULT}
        body = []
        for r in rows:
            if r["contender"] in grid and not all_grid:
                continue
            if "p50_ms" not in r:
                body.append([r["contender"], f"{r['level']:.0%}", "error", r.get("error", "")])
                continue
            name = r["contender"] + (f" ← `{r['chosen']}`" if "chosen" in r else "")
            body.append([
                name, f"{r['level']:.0%}", f"{r['offered_rate']:,.0f}",
                md_range(r["throughput"], ",.0f"), md_range(r["goodput"], ",.0f"),
                f"{r['failed_fraction']['median']:.0%}",
                f"{r['unfinished_fraction']['median']:.0%}",
                md_range(r["p50_ms"], ",.1f"), md_range(r["p99_ms"], ",.1f"),
                f"{r['mean_batch_size']['median']:.1f}",
            ])  # fmt: skip
        title = (
            f"**{wi['label']}**: capacity {wi['capacity']:,.1f}/s, SLO {wi['slo_s'] * 1000:,.1f} ms"
        )
        parts.append(f"{title}: goodput/s / p99 ms\n\n{summary_md(results, wl)}")
        parts.append(f"{title}, every contender:\n\n{_md_table(OPEN_HEADERS, body)}")
        ctl = []
        for r in rows:
            c = r.get("controller")
            if c is None or r["contender"] not in CONTROLLED:
                continue
            mod = c["model"]
            ctl.append([
                r["contender"], f"{r['level']:.0%}", _fmt(c["mean_batch_size"], ".1f"),
                _fmt(c["target"], ".1f"), _fmt(c["cap"], ".0f"), _fmt(c["wait_ms"], ".2f"),
                _fmt(c["arrival_rate"], ",.0f"),
                "—" if mod is None else f"{mod['intercept_ms']:.2f} + {mod['slope_ms']:.3f}·n",
                _reasons(c), str(c["early_timeouts"]),
            ])  # fmt: skip
        title = f"Controller, {wl} (medians of `statistics()` samples during the arrivals):"
        parts.append(title + "\n\n" + _md_table(CONTROLLER_HEADERS, ctl))
    idle = [
        [r["workload"], f"{r['contender']} ({r['kind']})", md_range(r["direct_p50_ms"], ".2f"),
         md_range(r["added_p50_ms"], ".2f"), md_range(r["added_p99_ms"], ".2f")]
        for r in results["idle"] if "added_p50_ms" in r
    ]  # fmt: skip
    parts.append(
        _md_table(["workload", "contender", "direct p50 ms", "added p50 ms", "added p99 ms"], idle)
    )
    return "\n\n".join(parts)


# -- plots -------------------------------------------------------------------------------------

_STYLE: dict[str, dict[str, Any]] = {
    LT: {"color": "#1f77b4", "linewidth": 2.8},
    LT_DEADLINE: {"color": "#17becf", "linewidth": 2.4},
    LT_MCB2: {"color": "#9467bd", "linewidth": 1.6, "linestyle": "-."},
    ORACLE: {"color": "black", "linewidth": 2.0, "linestyle": "--"},
    DEFAULT: {"color": "#ff7f0e", "linewidth": 1.8},
    "batchio+deadline": {"color": "#d62728", "linewidth": 1.4},
    "batched.aio": {"color": "#8c564b", "linewidth": 1.2},
    "batched.thread": {"color": "#e377c2", "linewidth": 1.2},
    "async-batcher": {"color": "#2ca02c", "linewidth": 1.2},
    "aiobatch": {"color": "#bcbd22", "linewidth": 1.2},
    "ray.serve.batch": {"color": "#7f7f7f", "linewidth": 1.2},
}


def plot(results: dict[str, Any], outdir: Path, suffix: str = "") -> list[Path]:
    """``sched-p99``, ``sched-goodput`` (one panel per workload) and ``sched-controller``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    m = results["machine"]
    foot = f"{m['cpu']} x{m['cpus']}, Python {m['python']}, {results['mode']} run {m['time_utc']}"
    wls = list(results["workloads"])

    def save(fig: Any, name: str) -> None:
        fig.text(0.01, 0.005, foot, fontsize=7, color="#555555")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = outdir / f"{name}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for fig_name, key, ylabel in (
        ("sched-p99", "p99_ms", "p99 latency of served requests, ms"),
        ("sched-goodput", "goodput", "goodput: requests/s done within the SLO"),
    ):
        fig, axes = plt.subplots(1, len(wls), figsize=(7.5 * len(wls) + 2.5, 5.5), squeeze=False)
        for ax, wl in zip(axes[0], wls, strict=True):
            wi = results["workloads"][wl]
            rows = [r for r in results["open"] if r["workload"] == wl and key in r]
            grid = set(wi["grid"]) - {DEFAULT}
            for name in dict.fromkeys(r["contender"] for r in rows):
                mine = [r for r in rows if r["contender"] == name]
                style = _STYLE.get(name)
                if style is None:
                    style = (
                        {"color": "#bbbbbb", "linewidth": 0.8, "linestyle": ":"}
                        if name in grid else {"linewidth": 1.2}
                    )  # fmt: skip
                ax.plot([r["level"] * 100 for r in mine], [r[key]["median"] for r in mine],
                        marker="o", markersize=3, label=name, **style)  # fmt: skip
            if key == "p99_ms":
                ax.set_yscale("log")
                ax.axhline(wi["slo_s"] * 1000, color="k", linestyle=":", linewidth=1, label="SLO")
            else:
                top = max(results["sizes"]["levels"])
                ax.plot([0, top * 100], [0, top * wi["capacity"]], color="#bbbbbb",
                        linestyle="--", linewidth=1, label="offered")  # fmt: skip
                ax.set_ylim(bottom=0)
            ax.set_xlabel("offered load, % of capacity")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{wi['label']}\nSLO {wi['slo_s'] * 1000:,.0f} ms", fontsize=10)
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, fig_name)

    fig, axes = plt.subplots(len(wls), 2, figsize=(14, 4.3 * len(wls)), squeeze=False)
    for (ax_b, ax_w), wl in zip(axes, wls, strict=True):
        wi = results["workloads"][wl]
        rows = [r for r in results["open"] if r["workload"] == wl and "controller" in r]
        for name in CONTROLLED:
            mine = [r for r in rows if r["contender"] == name]
            if not mine:
                continue
            xs = [r["level"] * 100 for r in mine]
            color = _STYLE[name]["color"]
            ctl = [r["controller"] for r in mine]
            ax_b.plot(xs, [c["mean_batch_size"] for c in ctl], marker="o", color=color,
                      label=f"{name}: mean batch")  # fmt: skip
            ax_b.plot(xs, [c["target"] if c["target"] is not None else float("nan") for c in ctl],
                      marker="x", linestyle="--", color=color, label=f"{name}: target")  # fmt: skip
            ax_w.plot(xs, [c["wait_ms"] if c["wait_ms"] is not None else 0.0 for c in ctl],
                      marker="o", color=color, label=f"{name}: scheduler.wait")  # fmt: skip
            ax_w.plot(xs, [c["queue_wait_p50_ms"] for c in ctl], marker="x", linestyle="--",
                      color=color, label=f"{name}: queue wait p50")  # fmt: skip
        for name in (DEFAULT, grid_name(0.0, wi["max_batch_size"])):
            mine = [r for r in rows if r["contender"] == name]
            if mine:
                ax_b.plot([r["level"] * 100 for r in mine],
                          [r["controller"]["mean_batch_size"] for r in mine], marker=".",
                          linewidth=1, color="#ff7f0e" if name == DEFAULT else "#7f7f7f",
                          label=f"{name}: mean batch")  # fmt: skip
        ax_b.axhline(wi["max_batch_size"], color="k", linestyle=":", linewidth=1,
                     label="max_batch_size")  # fmt: skip
        ax_b.set_ylabel("rows per batch")
        ax_b.set_title(f"{wi['label']}: batch size the controller chose", fontsize=10)
        ax_w.set_yscale("symlog", linthresh=1.0)
        ax_w.set_ylabel("ms (linear below 1, log above)")
        ax_w.set_title(f"{wl}: the wait it chose (0 = never set a timer)", fontsize=10)
        for ax in (ax_b, ax_w):
            ax.set_xlabel("offered load, % of capacity")
            ax.legend(fontsize=7)
    save(fig, "sched-controller")
    return written


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    from .bench_model import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="under 2 minutes: 3 levels, 1 repeat, short windows")  # fmt: skip
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="seconds: the smoke test")  # fmt: skip
    p.set_defaults(mode="full")
    add_model_args(p)
    p.add_argument("--workloads", default="minilm,sim")
    p.add_argument("--minilm-batch-size", type=int, default=32)
    p.add_argument("--sim-batch-size", type=int, default=64)
    p.add_argument("--sim-a", type=float, default=0.005, help="seconds per simulated batch")
    p.add_argument("--sim-b", type=float, default=0.00015, help="seconds per simulated row")
    p.add_argument("--slo-factor", type=float, default=4.0,
                   help="SLO = factor x one full batch at the capacity rate; also the "
                   "latency_target and the deadline contenders' timeout")  # fmt: skip
    p.add_argument("--levels", default=None, help="comma-separated fractions of capacity")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--contenders", default=None, help="comma-separated names; default all")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plots", type=Path, default=None,
                   help="where the plots go (default: docs/img/ for the full run; --quick and "
                   "--tiny write none unless asked)")  # fmt: skip
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report", type=Path, default=None,
                   help="print the Markdown tables of a results file and exit")  # fmt: skip
    a = p.parse_args(argv)
    if a.report is not None:
        print(render_markdown(json.loads(a.report.read_text())))
        return
    results = run_sched(a)
    print_results(results)
    out = a.json or ROOT / ("bench/results/sched.json" if a.mode == "full"
                            else f"bench/results/sched-{a.mode}.json")  # fmt: skip
    write_json(out, results)
    print(f"wrote {out} ({results['wall_s']:.0f} s)")
    plots = a.plots or (ROOT / "docs/img" if a.mode == "full" else None)
    if plots is not None and not a.no_plots:
        for path in plot(results, plots):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
