"""SentenceEmbedder against the device's forward-only limit, side by side (issue 8's GPU targets).

``python -m bench.bench_gpu --device cuda`` measures, for each dtype and batch size asked for
(default: float32 and float16, batches of 64 and 256):

- **forward-only**: the corpus tokenized and collated in advance, exactly as the embedder's own
  stages collate it (same length buckets, batch sizes and token budget), then fed to the device
  stage back to back, two batches in flight, waiting only for the copies out; every shape is
  warmed first. This is what the device can do, with the host out of the way.
- **SentenceEmbedder** (staged, the default) and **SentenceEmbedder[plain]** (``staged=False``)
  serving the same texts to ``--clients`` closed-loop clients.

It prints one line per configuration with ``embedder/forward-only`` last. On a CPU
(``--device cpu --quick``) it runs the same code small, as a smoke test; the ratios there say
little, the model itself being the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_only(embedder: Any, texts: Sequence[str], batch: int, device: str) -> float:
    """Rows/s of the embedder's device stage fed pre-assembled batches back to back."""
    staged = embedder.staged_forward
    tokenize = embedder.prepare

    def assembled() -> list[Any]:
        out = []
        for start in range(0, len(texts), batch):
            rows = tokenize(list(texts[start : start + batch]))
            out.append(staged.assemble([r for r in rows if not isinstance(r, Exception)]))
        return out

    for a in assembled():  # warm every shape this corpus meets
        staged.finish(staged.run(a))
    batches = assembled()
    _sync(device)
    in_flight: deque[Any] = deque()
    start = time.perf_counter()
    for a in batches:
        in_flight.append(staged.run(a))
        if len(in_flight) > 2:
            staged.finish(in_flight.popleft())
    while in_flight:
        staged.finish(in_flight.popleft())
    _sync(device)
    return len(texts) / (time.perf_counter() - start)


async def closed_loop(embedder: Any, texts: Sequence[str], clients: int) -> tuple[float, Any]:
    """Rows/s of ``clients`` closed-loop clients sharing ``texts``; and the final statistics."""
    pending = iter(texts)

    async def client() -> None:
        for text in pending:
            await embedder(text)

    async with embedder:
        warm = list(texts[: 4 * embedder.batcher.max_batch_size])
        await asyncio.gather(*(embedder(t) for t in warm))
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - start
        stats = embedder.statistics()
    return len(texts) / elapsed, stats


def measure(a: argparse.Namespace, dtype: str, batch: int, texts: Sequence[str]) -> dict[str, Any]:
    """One configuration: forward-only, staged and plain, in that order, in this process."""
    from batchio.integrations.transformers import SentenceEmbedder
    from bench._model import default_model_path

    path = a.model or default_model_path()
    common: dict[str, Any] = {
        "device": a.device,
        "dtype": None if dtype == "float32" else dtype,
        "max_batch_size": batch,
        "max_wait": a.max_wait,
        "max_length": a.max_length,
        "prepare_workers": a.prepare_workers,
    }
    staged = SentenceEmbedder(path, **common)
    limit = forward_only(staged, texts, batch, a.device)
    staged_rps, stats = asyncio.run(closed_loop(staged, texts, a.clients))
    plain = SentenceEmbedder(path, staged=False, **common)
    plain_rps, _ = asyncio.run(closed_loop(plain, texts, a.clients))
    return {
        "dtype": dtype,
        "batch": batch,
        "clients": a.clients,
        "forward_only_rps": limit,
        "staged_rps": staged_rps,
        "plain_rps": plain_rps,
        "staged_ratio": staged_rps / limit,
        "plain_ratio": plain_rps / limit,
        "mean_batch": stats.mean_batch_size,
        "device_busy": stats.device_busy_fraction,
        "stage_busy_s": {st.name: st.busy_seconds for st in stats.stages},
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run every configuration, print and save the results."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="local model dir (default: packaged MiniLM)")
    p.add_argument("--dtypes", default="float32,float16")
    p.add_argument("--batches", default="64,256")
    p.add_argument("--clients", type=int, default=256)
    p.add_argument("--texts", type=int, default=16384)
    p.add_argument("--max-wait", type=float, default=0.002)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--prepare-workers", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="small, for a smoke test on a CPU")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.quick:
        a.texts, a.clients, a.batches, a.dtypes = 96, 16, "8", a.dtypes.split(",")[0]

    import torch
    import transformers

    from bench._corpus import corpus

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    if not a.device.startswith("cuda"):
        torch.set_num_threads(1)
    texts = corpus(a.texts)
    name = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    print(f"bench_gpu on {name}, torch {torch.__version__}, {platform.python_version()}")
    rows = []
    for dtype in a.dtypes.split(","):
        for batch in (int(b) for b in a.batches.split(",")):
            r = measure(a, dtype, batch, texts)
            rows.append(r)
            print(
                f"{dtype:8} batch {batch:4} clients {a.clients}: forward-only "
                f"{r['forward_only_rps']:9,.0f}/s  staged {r['staged_rps']:9,.0f}/s  plain "
                f"{r['plain_rps']:9,.0f}/s  mean batch {r['mean_batch']:5.1f}  device busy "
                f"{r['device_busy'] or 0:4.0%}  embedder/forward-only = {r['staged_ratio']:.2f} "
                f"(plain {r['plain_ratio']:.2f})",
                flush=True,
            )
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
