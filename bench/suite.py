"""Issue 4: batchio against its peers, one command.

    .venv-bench/bin/python -m bench.suite            # quick (< 10 min on the 2-core dev box)
    .venv-bench/bin/python -m bench.suite --full     # larger sizes, 5 repeats
    .venv-bench/bin/python -m bench.suite --device cuda --torch-threads 0

Contenders (``--contenders`` to choose): the raw asyncio floor (and the floor with the sync fn on a
worker thread), batchio (default loop and uvloop), mixedbread ``batched`` (``batched.aio.dynamically``
and ``batched.dynamically`` + ``.acall``), ``async-batcher``, ``aiobatch``, and Ray Serve
``@serve.batch`` in-process. A peer that is not installed or cannot run is skipped with the reason.
Run it with ``.venv-bench`` (see ``bench/requirements.txt``) to include Ray; the main venv runs
everything else.

Workloads: (1) overhead: no-op fn, closed loop, 256 clients; (2) MiniLM closed loop at
concurrency 1/16/64/256; (3) MiniLM open loop, Poisson arrivals at 10%-120% of the offline
ceiling; (4) idle single-request latency over a direct model call. Writes
``bench/results/suite-<mode>-<device>.json`` and the plots in ``docs/img/``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from ._contenders import (
    DEADLINE,
    EMBEDDER,
    MODEL_ONLY,
    Contender,
    batchio_deadline_contender,
    by_name,
    loops_for,
)
from ._corpus import corpus_stats
from ._harness import (
    ROOT,
    BatchSpec,
    LoopName,
    Progress,
    fmt_range,
    loop_available,
    machine_info,
    print_table,
    write_json,
)
from ._workloads import model_open_once, run_configs
from .bench_model import (
    add_forward_ratios,
    add_model_args,
    forward_limits,
    model_contenders,
    prepare_model,
    print_baselines,
    print_closed,
    print_idle,
    run_baselines,
    run_closed,
    run_idle,
)
from .bench_overhead import print_overhead, run_overhead

__all__ = ["SIZES", "Sizes", "main", "plot", "run_suite"]


@dataclass(frozen=True)
class Sizes:
    """How big each workload is; ``quick`` and ``full`` below, ``tiny`` for the smoke test."""

    repeats: int
    overhead_requests: int
    overhead_concurrency: int
    concurrencies: tuple[int, ...]
    per_client: int
    min_requests: int
    ceiling_sentences: int
    sequential_sentences: int
    open_levels: tuple[float, ...]  # fractions of the offline ceiling
    open_seconds: float  # arrival window per level
    open_min_requests: int
    idle_requests: int
    corpus_size: int
    peers_async_overhead: bool = True  # overhead with an async fn for peers too (sync always)
    model_uvloop: bool = True  # batchio on uvloop in the model closed loop too
    plain_embedder: bool = True  # batchio.SentenceEmbedder without max_batch_tokens too


SIZES = {
    "tiny": Sizes(1, 2_000, 64, (1, 8), 2, 8, 32, 8, (0.5, 1.2), 0.3, 8, 3, 256),
    "quick": Sizes(
        3, 200_000, 256, (1, 16, 64, 256), 2, 64, 256, 64, (0.1, 0.3, 0.5, 0.8, 1.2), 1.0, 20,
        15, 2048, peers_async_overhead=False, model_uvloop=False, plain_embedder=False,
    ),
    "full": Sizes(
        5, 500_000, 256, (1, 16, 64, 256), 4, 128, 1024, 256,
        (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.2), 8.0, 50, 100, 4096,
    ),
}  # fmt: skip


def run_open(
    contenders: Sequence[Contender], embedder: Any, sentences: Sequence[str], *, spec: BatchSpec,
    loops: list[LoopName], loops_for_: Any, levels: Sequence[float], capacity: float,
    seconds: float, min_requests: int, slo: float, repeats: int, progress: Progress,
    skipped: dict[str, str],
) -> list[dict[str, Any]]:  # fmt: skip
    """Open loop: Poisson arrivals at each fraction of the offline capacity."""
    configs = []
    for c in contenders:
        if c.is_floor or c.unavailable() or not c.supports(embedder.fn):
            continue
        for loop in loops_for_(c):
            for level in levels:
                rate = level * capacity
                n = max(min_requests, round(rate * seconds))

                def once(
                    c: Contender = c, loop: LoopName = loop, rate: float = rate, n: int = n,
                    level: float = level,
                ) -> dict[str, float]:  # fmt: skip
                    return model_open_once(
                        c, loop, embedder.fn, spec, sentences=sentences, rate=rate, requests=n,
                        seed=int(level * 1000), slo=slo, drain_timeout=max(2.0, 2 * slo + 1),
                    )  # fmt: skip

                meta = {
                    "contender": c.name, "loop": loop, "level": level, "offered_rate": rate,
                    "requests": n, "slo_ms": slo * 1000, "options": c.options(spec),
                }  # fmt: skip
                configs.append((f"{c.name}/{loop}/{level:.0%}", once, meta))
    del skipped
    return run_configs(configs, repeats=repeats, progress=progress, label="open loop")


def print_open(rows: list[dict[str, Any]], title: str) -> None:
    table = []
    for r in rows:
        head = [r["contender"], r["loop"], f"{r['level']:.0%}", f"{r['offered_rate']:.1f}"]
        if "p50_ms" not in r:
            table.append([*head, "error: " + r.get("error", "?"), "", "", "", ""])
            continue
        table.append([
            *head, f"{r['completed_fraction']['median']:.0%}",
            fmt_range(r["throughput"], ".1f"), fmt_range(r["goodput"], ".1f"),
            fmt_range(r["p50_ms"], ",.0f"), fmt_range(r["p99_ms"], ",.0f"),
            f"{r['mean_batch_size']['median']:.1f}",
        ])  # fmt: skip
    headers = ["contender", "loop", "load", "offered/s", "done", "throughput/s", "goodput/s", "p50 ms",
               "p99 ms", "mean batch"]  # fmt: skip
    print_table(title, headers, table)


# -- plots -------------------------------------------------------------------------------------


def _label(r: dict[str, Any]) -> str:
    return str(r["contender"]) + ("+uvloop" if r["loop"] == "uvloop" else "")


def plot(results: dict[str, Any], outdir: Path, suffix: str = "") -> list[Path]:
    """Overhead bars, throughput vs concurrency, p99 and goodput vs offered load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    machine = results["machine"]
    foot = (
        f"{machine['cpu']} x{machine['cpus']}, Python {machine['python']}, "
        f"{results['mode']} run {machine['time_utc']}"
    )

    def save(fig: Any, name: str) -> None:
        """Add the machine footer, write ``docs/img/<name><suffix>.png`` and close the figure."""
        fig.text(0.01, 0.005, foot, fontsize=7, color="#555555")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = outdir / f"{name}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # 1. overhead bars
    rows = [r for r in results["overhead"] if "items_per_s" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.6))
        labels = [f"{_label(r)} ({r['fn']} fn)" for r in rows]
        med = [r["items_per_s"]["median"] / 1000 for r in rows]
        lo = [m - r["items_per_s"]["min"] / 1000 for m, r in zip(med, rows, strict=True)]
        hi = [r["items_per_s"]["max"] / 1000 - m for m, r in zip(med, rows, strict=True)]
        colors = [
            "#999999" if r["contender"].startswith("floor")
            else "#1f77b4" if r["contender"] == "batchio" else "#ff7f0e"
            for r in rows
        ]  # fmt: skip
        ax.barh(labels, med, xerr=[lo, hi], color=colors)
        ax.invert_yaxis()
        ax.set_xlabel("thousand requests/s (median, whiskers min..max)")
        ax.set_title(
            f"Overhead: no-op batch fn, {results['sizes']['overhead_concurrency']} clients, "
            f"max_batch_size {results['overhead_spec']['max_batch_size']}"
        )
        save(fig, "overhead")

    ceiling = results["ceiling"]
    # 2. throughput vs concurrency
    rows = [r for r in results["closed"] if "sentences_per_s" in r]
    if rows:
        fig, ax = plt.subplots(figsize=(11, 5.5))
        for name in dict.fromkeys(_label(r) for r in rows):
            mine = [r for r in rows if _label(r) == name]
            xs = [r["concurrency"] for r in mine]
            ys = [r["sentences_per_s"]["median"] for r in mine]
            err = [
                [y - r["sentences_per_s"]["min"] for y, r in zip(ys, mine, strict=True)],
                [r["sentences_per_s"]["max"] - y for y, r in zip(ys, mine, strict=True)],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name,
                        linewidth=2.5 if name.startswith("batchio") else 1.2)  # fmt: skip
        ax.axhline(ceiling["sorted"], color="k", linestyle="--", label="offline ceiling (sorted)")
        ax.axhline(ceiling["arrival"], color="k", linestyle=":",
                   label="offline ceiling (arrival order)")  # fmt: skip
        ax.axhline(ceiling["sequential"], color="#888888", linestyle="-.", label="sequential")
        if "forward_sorted" in ceiling:
            ax.axhline(ceiling["forward_sorted"], color="#2ca02c", linestyle="--",
                       label="forward-only limit (sorted)")  # fmt: skip
            ax.axhline(ceiling["forward_arrival"], color="#2ca02c", linestyle=":",
                       label="forward-only limit (arrival order)")  # fmt: skip
        ax.set_xscale("log", base=2)
        concs = sorted({r["concurrency"] for r in rows})
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("sentences/s (median, bars min..max)")
        ax.set_title(f"MiniLM throughput vs concurrency ({results['device_label']})")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, "throughput_vs_concurrency")

    # 3. p99 and goodput vs offered load
    rows = [r for r in results["open"] if "p99_ms" in r]
    if rows:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
        for name in dict.fromkeys(_label(r) for r in rows):
            mine = [r for r in rows if _label(r) == name]
            xs = [r["level"] * 100 for r in mine]
            width = 2.5 if name.startswith("batchio") else 1.2
            ax1.plot(xs, [r["p99_ms"]["median"] for r in mine], marker="o", label=name,
                     linewidth=width)  # fmt: skip
            ax2.plot(xs, [r["goodput"]["median"] for r in mine], marker="o", label=name,
                     linewidth=width)  # fmt: skip
        arrival_pct = 100 * ceiling["arrival"] / ceiling["sorted"]
        for ax in (ax1, ax2):
            ax.axvline(arrival_pct, color="k", linestyle=":", label="arrival-order ceiling")
            ax.set_xlabel("offered load, % of offline ceiling (sorted)")
        ax1.set_yscale("log")
        ax1.set_ylabel("p99 latency, ms (median of repeats)")
        ax1.set_title("p99 latency vs offered load (Poisson)")
        slo = rows[0]["slo_ms"]
        ax2.plot([0, 120], [0, 1.2 * ceiling["sorted"]], color="#bbbbbb", linestyle="--",
                 label="offered")  # fmt: skip
        ax2.set_ylabel(f"goodput: requests/s done within {slo:.0f} ms")
        ax2.set_title("goodput vs offered load")
        ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        save(fig, "latency_vs_load")
    return written


# -- the suite ---------------------------------------------------------------------------------


def run_suite(a: argparse.Namespace) -> dict[str, Any]:
    """Run every workload and return the results dict (also written as JSON by ``main``)."""
    sizes = SIZES[a.mode]
    loops = [cast(LoopName, x) for x in a.loops.split(",")]
    loops = [x for x in loops if loop_available(x) is None]
    contenders = by_name(a.contenders)

    def lf(c: Contender) -> list[LoopName]:
        return loops_for(c, loops, a.peers_on_uvloop)

    skipped: dict[str, str] = {}
    for c in contenders:
        reason = c.unavailable()
        if reason:
            skipped[c.name] = reason
    live = [c for c in contenders if c.name not in skipped]
    names = a.contenders

    def lf_default(c: Contender) -> list[LoopName]:
        """Open loop and idle latency: every contender on the default loop only."""
        return [x for x in lf(c) if x == "asyncio"] or lf(c)[:1]

    n_model = len([c for c in live if not c.is_floor and c.sync_fn]) + sum(
        names is None or n in names for n in MODEL_ONLY
    )

    def kinds(c: Contender) -> list[str]:
        ours = c.is_floor or c.name == "batchio"
        return ["sync", "async"] if ours or sizes.peers_async_overhead else ["sync"]

    lf_model = lf if sizes.model_uvloop else lf_default
    n_over = sum(len(lf(c)) * len([k for k in kinds(c) if k == "sync" or c.async_fn]) for c in live)
    n_closed = (n_model + int(sizes.model_uvloop)) * len(sizes.concurrencies)
    n_open = n_model * len(sizes.open_levels)  # - plain SentenceEmbedder + batchio+deadline
    n_idle = n_model * 2
    total = sizes.repeats * (n_over + 5 + n_closed + n_open + n_idle)
    progress = Progress(total, enabled=not a.quiet, description="suite")
    info = machine_info()
    t_start = time.perf_counter()
    ospec = BatchSpec(a.overhead_max_batch_size, a.max_wait)
    spec = BatchSpec(a.max_batch_size, a.max_wait)
    a.max_batch_size = spec.max_batch_size
    a.corpus_size = sizes.corpus_size
    results: dict[str, Any] = {
        "benchmark": "suite", "mode": a.mode, "machine": info, "sizes": asdict(sizes),
        "overhead_spec": asdict(ospec), "model_spec": asdict(spec), "args": vars(a),
    }  # fmt: skip
    with progress.running():
        walls: dict[str, float] = {}
        results["wall_s_by_workload"] = walls
        t0 = time.perf_counter()
        if "overhead" in a.workloads:
            progress.log("[bold]workload 1: overhead")
            results["overhead"] = run_overhead(
                [c for c in live if c.name != "batchio.SentenceEmbedder"], loops=loops, fn_kinds=["sync", "async"], spec=ospec,
                requests=sizes.overhead_requests, concurrency=sizes.overhead_concurrency,
                repeats=sizes.repeats, progress=progress, skipped=skipped, loops_for=lf,
                kinds_for=kinds,
            )  # fmt: skip
        else:
            results["overhead"] = []
        walls["overhead"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        embedder, sentences = prepare_model(a)
        model_cs = [
            c for c in model_contenders(names, embedder, a.max_batch_tokens)
            if c.name not in skipped and c.sync_fn and not c.unavailable()
            and (sizes.plain_embedder or c.name != EMBEDDER or (names and EMBEDDER in names))
        ]  # fmt: skip
        results["model"] = {
            "path": embedder.model_path, "device": embedder.device,
            "torch_threads": embedder.torch_threads, "max_length": embedder.max_length,
            "fn": "bench/_model.py load_embedder: the same plain fn for every contender",
        }  # fmt: skip
        results["corpus"] = corpus_stats(sentences)
        results["device_label"] = (
            f"{embedder.device}, {embedder.torch_threads} torch thread(s), "
            f"max_batch_size {spec.max_batch_size}"
        )
        progress.log("[bold]baselines")
        base = run_baselines(
            embedder, sentences, spec=spec, ceiling_sentences=sizes.ceiling_sentences,
            sequential_sentences=sizes.sequential_sentences, repeats=sizes.repeats,
            progress=progress,
        )  # fmt: skip
        results["baselines"] = base
        ceiling = {
            "sorted": base[0]["sentences_per_s"]["median"],
            "arrival": base[1]["sentences_per_s"]["median"],
            "sequential": base[2]["sentences_per_s"]["median"],
            **forward_limits(base),
        }
        results["ceiling"] = ceiling
        walls["model load + baselines"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "closed" in a.workloads:
            progress.log("[bold]workload 2: closed loop")
            closed = run_closed(
                model_cs, embedder, sentences, spec=spec, loops=loops, loops_for=lf_model,
                concurrencies=sizes.concurrencies, per_client=sizes.per_client,
                minimum=sizes.min_requests, repeats=sizes.repeats, progress=progress,
                skipped=skipped, ceiling=ceiling["sorted"],
            )  # fmt: skip
            for r in closed:
                if "sentences_per_s" in r:
                    r["ratio_to_arrival_ceiling"] = (
                        r["sentences_per_s"]["median"] / ceiling["arrival"]
                    )
            add_forward_ratios(closed, forward_limits(base))
            results["closed"] = closed
        else:
            results["closed"] = []
        walls["closed"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        # A full FIFO batch takes max_batch_size / arrival-order ceiling seconds; a request that
        # arrives while one runs waits for it and then for its own: ~2 batch times at best.
        slo = a.slo_factor * spec.max_batch_size / ceiling["arrival"]
        results["slo_s"] = slo
        if "open" in a.workloads:
            progress.log(f"[bold]workload 3: open loop (goodput SLO {slo * 1000:.0f} ms)")
            open_cs = [c for c in model_cs if c.name != EMBEDDER]
            if names is None or DEADLINE in names:  # batchio with timeout = the SLO, after batchio
                at = next((i + 1 for i, c in enumerate(open_cs) if c.name == "batchio"), 0)
                open_cs.insert(at, batchio_deadline_contender(slo))
            results["open"] = run_open(
                open_cs, embedder, sentences, spec=spec,
                loops=loops, loops_for_=lf_default,
                levels=sizes.open_levels, capacity=ceiling["sorted"], seconds=sizes.open_seconds,
                min_requests=sizes.open_min_requests, slo=slo, repeats=sizes.repeats,
                progress=progress, skipped=skipped,
            )  # fmt: skip
        else:
            results["open"] = []
        walls["open"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if "idle" in a.workloads:
            progress.log("[bold]workload 4: idle latency")
            results["idle"] = run_idle(
                model_cs, embedder, sentences, spec=spec, loops=loops, loops_for=lf_default,
                requests=sizes.idle_requests, repeats=sizes.repeats, progress=progress,
                skipped=skipped, max_waits=(spec.max_wait, 0.0),
            )  # fmt: skip
        else:
            results["idle"] = []
        walls["idle"] = time.perf_counter() - t0
    results["skipped"] = skipped
    results["wall_s"] = time.perf_counter() - t_start
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    return results


def print_suite(results: dict[str, Any]) -> None:
    ov = results["overhead_spec"]
    if results["overhead"]:
        print_overhead(
            results["overhead"],
            f"1. overhead: no-op fn, {results['sizes']['overhead_concurrency']} clients, "
            f"{results['sizes']['overhead_requests']:,} requests, max_batch_size "
            f"{ov['max_batch_size']}, max_wait {ov['max_wait']}s",
        )
    print_baselines(results["baselines"], f"baselines: MiniLM, {results['device_label']}")
    if results["closed"]:
        print_closed(results["closed"], "2. closed loop (÷ ceiling = ÷ sorted offline ceiling)")
    if results["open"]:
        print_open(results["open"], f"3. open loop, goodput SLO {results['slo_s'] * 1000:.0f} ms")
    if results["idle"]:
        print_idle(results["idle"], "4. idle single-request latency over a direct call")
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="seconds-long smoke run")  # fmt: skip
    p.set_defaults(mode="quick")
    add_model_args(p)
    p.add_argument("--max-batch-size", type=int, default=32, help="model workloads")
    p.add_argument("--overhead-max-batch-size", type=int, default=64)
    p.add_argument("--max-wait", type=float, default=0.005, help="seconds, every contender")
    p.add_argument("--slo-factor", type=float, default=4.0,
                   help="goodput SLO = factor x (time of one full batch at the arrival-order "
                   "ceiling rate); also batchio+deadline's timeout")  # fmt: skip
    p.add_argument("--loops", default="asyncio,uvloop")
    p.add_argument("--peers-on-uvloop", action="store_true", help="also run peers on uvloop")
    p.add_argument("--contenders", default=None, help="comma-separated; default all")
    p.add_argument("--workloads", default="overhead,closed,open,idle")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plots", type=Path, default=ROOT / "docs/img")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    results = run_suite(a)
    print_suite(results)
    out = a.json or ROOT / f"bench/results/suite-{a.mode}-{a.device.replace(':', '')}.json"
    write_json(out, results)
    print(f"wrote {out} ({results['wall_s']:.0f} s)")
    if not a.no_plots:
        suffix = "" if a.device == "cpu" else f"-{a.device.replace(':', '')}"
        for path in plot(results, a.plots, suffix):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
