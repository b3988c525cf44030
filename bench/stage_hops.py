"""What a stage costs in latency: sequential one-row batches, plain vs staged.

``python -m bench.stage_hops`` prints the mean time per batch for a plain batch function, for
``Stages(run=...)`` alone and for all four stages, each doing nothing. The difference is the price
of the thread hops a staged batch makes; under load the stages overlap, so it is latency, not
throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from batchio import Batcher, Stages


def _same(xs: list[Any]) -> list[Any]:
    return xs


async def _per_batch(fn: Any, n: int) -> float:
    async with Batcher(fn, max_batch_size=1, max_wait=0.0) as b:
        for _ in range(min(n, 200)):  # warm the threads up
            await b(1)
        start = time.perf_counter()
        for _ in range(n):
            await b(1)
        return (time.perf_counter() - start) / n


async def _main(n: int) -> None:
    forms: list[tuple[str, Any]] = [
        ("plain fn", _same),
        ("Stages(run)", Stages[Any, Any](run=_same)),
        (
            "Stages(prepare, assemble, run, finish)",
            Stages[Any, Any](prepare=_same, assemble=_same, run=_same, finish=_same),
        ),
    ]
    for label, fn in forms:
        print(f"{label:40} {await _per_batch(fn, n) * 1e6:8.1f} us per sequential batch")


def main() -> None:
    """Run the measurement (``--batches N``)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(_main(args.batches))


if __name__ == "__main__":
    main()
