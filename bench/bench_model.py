"""Issue 3: batchio on a real model (all-MiniLM-L6-v2 sentence embeddings).

Baselines without a batcher: the offline ceiling (the batch function called directly on full,
length-sorted batches of ``--max-batch-size``; also reported unsorted, i.e. arrival-order padding)
and sequential one-at-a-time calls; and the **forward-only limit**: the same batches tokenized in
advance and fed to the model back to back (no tokenizer, no batcher), i.e. the device itself,
sorted and in arrival order. Then each contender in a closed loop at each
``--concurrency``: sentences/s, p50/p99 latency, mean batch size, ratio to the ceiling. Then the
single-request latency that the batcher adds over a direct call while it is idle.

    .venv/bin/python -m bench.bench_model                          # batchio, CPU, 3 repeats
    .venv/bin/python -m bench.bench_model --device cuda --torch-threads 0
    .venv/bin/python -m bench.bench_model --model /path/to/local/sentence-transformer

Every contender gets the same batch function (tokenize with padding -> forward -> mean-pool ->
normalise; see ``bench/_model.py``). Each closed-loop row is divided by the ceilings and by the
forward-only limits (``÷ fwd``), so a run shows how far each contender is from the device itself.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from ._contenders import (
    EMBEDDER,
    EMBEDDER_MBT,
    EMBEDDER_MBT_PLAIN,
    MODEL_ONLY,
    Contender,
    by_name,
    embedder_contender,
)
from ._corpus import corpus, corpus_stats
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
from ._model import Embedder, load_embedder
from ._workloads import (
    model_ceiling,
    model_closed_once,
    model_idle_once,
    model_sequential,
    run_configs,
)

__all__ = [
    "FORWARD_KEYS",
    "add_forward_ratios",
    "add_model_args",
    "forward_limits",
    "main",
    "model_contenders",
    "model_forward_only",
    "prepare_model",
    "print_baselines",
    "print_closed",
    "print_idle",
    "requests_for",
    "run_baselines",
    "run_closed",
    "run_idle",
]

FORWARD_RATIOS = ("ratio_to_forward_sorted", "ratio_to_forward_arrival")
LoopsFor = Any  # Callable[[Contender], list[LoopName]] | None


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options shared by ``bench_model`` and ``suite``."""
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--model", default=None, help="local model dir (default: packaged MiniLM)")
    p.add_argument(
        "--torch-threads", type=int, default=1,
        help="torch.set_num_threads on CPU (0: leave torch's default). Default 1: one core for "
        "the model, the other for the event loop and clients (this is a 2-core machine).",
    )  # fmt: skip
    p.add_argument("--max-length", type=int, default=128, help="tokenizer truncation")
    p.add_argument("--corpus-size", type=int, default=2048)
    p.add_argument(
        "--max-batch-tokens", type=int, default=256,
        help="padded-token budget of one forward pass for the batchio.SentenceEmbedder+mbt "
        "contender (length-sorted micro-batches)",
    )  # fmt: skip


def prepare_model(a: argparse.Namespace) -> tuple[Embedder, tuple[str, ...]]:
    """Load the model, set torch threads, build the corpus and warm up."""
    import torch

    if a.torch_threads > 0 and not a.device.startswith("cuda"):
        torch.set_num_threads(a.torch_threads)
    embedder = load_embedder(a.model, device=a.device, max_length=a.max_length)
    embedder.torch_threads = torch.get_num_threads()
    sentences = corpus(a.corpus_size)
    embedder.warmup(sentences, (1, 8, a.max_batch_size))
    return embedder, sentences


def model_contenders(
    names: str | None, embedder: Embedder, max_batch_tokens: int = 256
) -> list[Contender]:
    """Contenders for the model workloads: the named ones (no floors), plus batchio's own
    ``SentenceEmbedder`` (plain, and ``+mbt`` with ``max_batch_tokens``) when named, or when
    ``names`` is None (all). They go right after ``batchio``."""
    wanted = None if names is None else [n.strip() for n in names.split(",") if n.strip()]
    plain = None if wanted is None else ",".join(n for n in wanted if n not in MODEL_ONLY)
    out = [c for c in (by_name(plain) if plain != "" else []) if not c.is_floor]
    index = next((i + 1 for i, c in enumerate(out) if c.name == "batchio"), len(out))
    variants = (
        (EMBEDDER, None, True),
        (EMBEDDER_MBT, max_batch_tokens, True),
        (EMBEDDER_MBT_PLAIN, max_batch_tokens, False),
    )
    for name, mbt, staged in variants:  # (not DEADLINE)
        if wanted is None or name in wanted:
            emb = embedder_contender(
                embedder.net, embedder.tokenizer, device=embedder.device,
                max_length=embedder.max_length, max_batch_tokens=mbt, staged=staged,
            )  # fmt: skip
            out.insert(index, emb)
            index += 1
    return out


def requests_for(concurrency: int, per_client: int, minimum: int) -> int:
    """Closed-loop request count at a concurrency level: ``per_client`` rounds, at least
    ``minimum``."""
    return max(minimum, concurrency * per_client)


def model_forward_only(
    embedder: Embedder, sentences: Sequence[str], *, batch_size: int, sort: bool = True
) -> float:
    """The forward-only limit: the ceiling's batches, tokenized in advance, fed to the model back
    to back (copies in, forward, pooling, copy out); sentences/s.

    On CUDA every batch runs once untimed first, so each shape is warmed (a new shape there can
    cost 10x a repeated one); on CPU a shape costs the same the first time.
    """
    if embedder.tokenize is None or embedder.forward is None:
        raise ValueError("this Embedder does not expose tokenize/forward separately")
    texts = sorted(sentences, key=len) if sort else list(sentences)
    n = len(texts) - len(texts) % batch_size
    encs = [embedder.tokenize(texts[i : i + batch_size]) for i in range(0, n, batch_size)]
    forward = embedder.forward
    if embedder.device.startswith("cuda"):
        for enc in encs:
            forward(enc)
    t0 = time.perf_counter()
    for enc in encs:
        forward(enc)
    return n / (time.perf_counter() - t0)


FORWARD_KEYS = {
    "forward_sorted": "forward-only (sorted)",
    "forward_arrival": "forward-only (arrival order)",
}


def forward_limits(baselines: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{"forward_sorted": sentences/s, "forward_arrival": ...}`` from :func:`run_baselines`."""
    by_key = {r["key"]: r for r in baselines if "sentences_per_s" in r}
    return {
        name: by_key[key]["sentences_per_s"]["median"]
        for name, key in FORWARD_KEYS.items()
        if key in by_key
    }


def add_forward_ratios(rows: Sequence[dict[str, Any]], limits: dict[str, float]) -> None:
    """Each closed-loop row gains ``ratio_to_forward_sorted`` / ``ratio_to_forward_arrival``."""
    for r in rows:
        if "sentences_per_s" in r:
            for name, rate in limits.items():
                r[f"ratio_to_{name}"] = r["sentences_per_s"]["median"] / rate


def run_baselines(
    embedder: Embedder, sentences: Sequence[str], *, spec: BatchSpec, ceiling_sentences: int,
    sequential_sentences: int, repeats: int, progress: Progress,
) -> list[dict[str, Any]]:  # fmt: skip
    """Offline ceiling (sorted and arrival order), sequential calls, and the forward-only limit
    (sorted and arrival order), in that order."""
    sample = sentences[:ceiling_sentences]
    seq_sample = sentences[:sequential_sentences]
    bs = spec.max_batch_size
    configs = [
        (
            "ceiling (sorted)",
            lambda: {"sentences_per_s": model_ceiling(embedder, sample, batch_size=bs)},
            {"baseline": "ceiling", "sorted": True, "batch_size": bs, "sentences": len(sample)},
        ),
        (
            "ceiling (arrival order)",
            lambda: {"sentences_per_s": model_ceiling(embedder, sample, batch_size=bs, sort=False)},
            {"baseline": "ceiling", "sorted": False, "batch_size": bs, "sentences": len(sample)},
        ),
        (
            "sequential",
            lambda: model_sequential(embedder, seq_sample),
            {"baseline": "sequential", "batch_size": 1, "sentences": len(seq_sample)},
        ),
    ]
    for key, sort in (
        (FORWARD_KEYS["forward_sorted"], True),
        (FORWARD_KEYS["forward_arrival"], False),
    ):

        def fwd(sort: bool = sort) -> dict[str, float]:
            rate = model_forward_only(embedder, sample, batch_size=bs, sort=sort)
            return {"sentences_per_s": rate}

        meta = {
            "baseline": "forward-only",
            "sorted": sort,
            "batch_size": bs,
            "sentences": len(sample),
        }
        configs.append((key, fwd, meta))
    return run_configs(configs, repeats=repeats, progress=progress, label="baselines")


def _usable(c: Contender, fn: Any, skipped: dict[str, str]) -> bool:
    if c.is_floor:
        return False  # the floor runs fn on the loop thread: not meaningful for a model
    reason = c.unavailable()
    if reason:
        skipped[c.name] = reason
        return False
    if not c.supports(fn):
        skipped[c.name] = "takes no sync batch function"
        return False
    return True


def run_closed(
    contenders: Sequence[Contender], embedder: Embedder, sentences: Sequence[str], *,
    spec: BatchSpec, loops: list[LoopName], loops_for: LoopsFor, concurrencies: Sequence[int],
    per_client: int, minimum: int, repeats: int, progress: Progress, skipped: dict[str, str],
    ceiling: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """Closed loop at each concurrency for each contender and loop."""
    configs = []
    for c in contenders:
        if not _usable(c, embedder.fn, skipped):
            continue
        for loop in loops_for(c) if loops_for else loops:
            for conc in concurrencies:
                n = requests_for(conc, per_client, minimum)

                def once(
                    c: Contender = c, loop: LoopName = loop, conc: int = conc, n: int = n
                ) -> dict[str, float]:
                    return model_closed_once(
                        c, loop, embedder.fn, spec, sentences=sentences, requests=n,
                        concurrency=conc,
                    )  # fmt: skip

                meta = {
                    "contender": c.name, "loop": loop, "concurrency": conc, "requests": n,
                    "options": c.options(spec),
                }  # fmt: skip
                configs.append((f"{c.name}/{loop}/c={conc}", once, meta))
    rows = run_configs(configs, repeats=repeats, progress=progress, label="closed loop")
    for r in rows:
        if "sentences_per_s" in r:
            r["ratio_to_ceiling"] = r["sentences_per_s"]["median"] / ceiling
    return rows


def run_idle(
    contenders: Sequence[Contender], embedder: Embedder, sentences: Sequence[str], *,
    spec: BatchSpec, loops: list[LoopName], loops_for: LoopsFor, requests: int, repeats: int,
    progress: Progress, skipped: dict[str, str], max_waits: Sequence[float],
) -> list[dict[str, Any]]:  # fmt: skip
    """Idle single-request latency added over a direct call, for each ``max_wait``."""
    configs = []
    for c in contenders:
        if not _usable(c, embedder.fn, skipped):
            continue
        for loop in loops_for(c) if loops_for else loops:
            for mw in max_waits:
                s = BatchSpec(spec.max_batch_size, mw)

                def once(
                    c: Contender = c, loop: LoopName = loop, s: BatchSpec = s
                ) -> dict[str, float]:
                    return model_idle_once(
                        c, loop, embedder.fn, s, sentences=sentences, requests=requests
                    )

                meta = {
                    "contender": c.name, "loop": loop, "max_wait": mw, "requests": requests,
                    "options": c.options(s),
                }  # fmt: skip
                configs.append((f"{c.name}/{loop}/max_wait={mw * 1000:g}ms", once, meta))
    return run_configs(configs, repeats=repeats, progress=progress, label="idle latency")


def print_baselines(rows: list[dict[str, Any]], title: str) -> None:
    table = []
    for r in rows:
        if "sentences_per_s" not in r:
            table.append([r["key"], "error: " + r.get("error", "?"), "", ""])
            continue
        p50 = fmt_range(r["p50_ms"], ".1f") if "p50_ms" in r else ""
        p99 = fmt_range(r["p99_ms"], ".1f") if "p99_ms" in r else ""
        table.append([r["key"], fmt_range(r["sentences_per_s"], ",.1f"), p50, p99])
    print_table(title, ["baseline", "sentences/s", "p50 ms", "p99 ms"], table)


def print_closed(rows: list[dict[str, Any]], title: str) -> None:
    table = []
    for r in rows:
        head = [r["contender"], r["loop"], str(r["concurrency"])]
        if "sentences_per_s" not in r:
            table.append([*head, "error: " + r.get("error", "?"), "", "", "", "", "", ""])
            continue
        fwd = [f"{r[k]:.2f}" if k in r else "" for k in FORWARD_RATIOS]
        table.append([
            *head, fmt_range(r["sentences_per_s"], ",.1f"),
            f"{r['ratio_to_ceiling']:.2f}", *fwd, f"{r['mean_batch_size']['median']:.1f}",
            fmt_range(r["p50_ms"], ".1f"), fmt_range(r["p99_ms"], ".1f"),
        ])  # fmt: skip
    headers = ["contender", "loop", "conc", "sentences/s", "÷ ceiling", "÷ fwd sorted",
               "÷ fwd arrival", "mean batch", "p50 ms", "p99 ms"]  # fmt: skip
    print_table(title, headers, table)


def print_idle(rows: list[dict[str, Any]], title: str) -> None:
    table = []
    for r in rows:
        head = [r["contender"], r["loop"], f"{r['max_wait'] * 1000:g}"]
        if "added_p50_ms" not in r:
            table.append([*head, "error: " + r.get("error", "?"), "", "", ""])
            continue
        table.append([
            *head, fmt_range(r["direct_p50_ms"], ".2f"), fmt_range(r["batched_p50_ms"], ".2f"),
            fmt_range(r["added_p50_ms"], ".2f"), fmt_range(r["added_p99_ms"], ".2f"),
        ])  # fmt: skip
    headers = ["contender", "loop", "max_wait ms", "direct p50 ms", "batched p50 ms",
               "added p50 ms", "added p99 ms"]  # fmt: skip
    print_table(title, headers, table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_model_args(p)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-wait", type=float, default=0.005, help="seconds")
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--per-client", type=int, default=3, help="closed-loop rounds per client")
    p.add_argument("--min-requests", type=int, default=64, help="closed-loop minimum requests")
    p.add_argument("--ceiling-sentences", type=int, default=512)
    p.add_argument("--sequential-sentences", type=int, default=128)
    p.add_argument("--idle-requests", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loops", default="asyncio,uvloop")
    p.add_argument(
        "--contenders", default="batchio,batchio.SentenceEmbedder,batchio.SentenceEmbedder+mbt"
    )
    p.add_argument("--json", type=Path, default=ROOT / "bench/results/model.json")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    spec = BatchSpec(a.max_batch_size, a.max_wait)
    loops = [cast(LoopName, x) for x in a.loops.split(",")]
    loops = [x for x in loops if loop_available(x) is None]
    concs = [int(x) for x in a.concurrency.split(",")]
    embedder, sentences = prepare_model(a)
    contenders = model_contenders(a.contenders, embedder, a.max_batch_tokens)
    info = machine_info()
    n_cfg = len(contenders) * len(loops)
    total = a.repeats * (5 + n_cfg * len(concs) + n_cfg * 2)
    progress = Progress(total, enabled=not a.quiet, description="model")
    skipped: dict[str, str] = {}
    with progress.running():
        base = run_baselines(
            embedder, sentences, spec=spec, ceiling_sentences=a.ceiling_sentences,
            sequential_sentences=a.sequential_sentences, repeats=a.repeats, progress=progress,
        )  # fmt: skip
        ceiling = base[0]["sentences_per_s"]["median"]
        arrival = base[1]["sentences_per_s"]["median"]
        closed = run_closed(
            contenders, embedder, sentences, spec=spec, loops=loops, loops_for=None,
            concurrencies=concs, per_client=a.per_client, minimum=a.min_requests,
            repeats=a.repeats, progress=progress, skipped=skipped, ceiling=ceiling,
        )  # fmt: skip
        for r in closed:
            if "sentences_per_s" in r:
                r["ratio_to_arrival_ceiling"] = r["sentences_per_s"]["median"] / arrival
        forward = forward_limits(base)
        add_forward_ratios(closed, forward)
        idle = run_idle(
            contenders, embedder, sentences, spec=spec, loops=loops, loops_for=None,
            requests=a.idle_requests, repeats=a.repeats, progress=progress, skipped=skipped,
            max_waits=(a.max_wait, 0.0),
        )  # fmt: skip
    dev = f"{a.device}, torch threads {embedder.torch_threads}"
    print_baselines(base, f"baselines: MiniLM on {dev}, batch {a.max_batch_size}")
    print_closed(closed, f"closed loop: {a.max_batch_size=}, {a.max_wait=}s")
    print_idle(idle, "idle single-request latency added over a direct call")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    write_json(a.json, {
        "benchmark": "model", "machine": info, "spec": asdict(spec), "args": vars(a),
        "model": {"path": embedder.model_path, "device": embedder.device,
                  "torch_threads": embedder.torch_threads, "max_length": embedder.max_length,
                  "fn": "bench/_model.py load_embedder (same fn for every contender)"},
        "corpus": corpus_stats(sentences), "baselines": base, "forward_only": forward,
        "closed": closed, "idle": idle,
        "skipped": skipped,
    })  # fmt: skip
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
