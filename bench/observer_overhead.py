"""What an observer costs per request (docs/observability.md): a trivial batch function, three ways.

``plain`` (the fast path), ``request-path`` (``timeout=``: every request is a request object with
a deadline, no observer) and ``observer`` (an observer whose methods do nothing), interleaved,
median of ``--repeats`` runs of ``--requests`` requests each::

    .venv/bin/python -m bench.observer_overhead
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from batchio import Batcher, BatchRecord

MODES = ("plain", "request-path", "observer")


class NullObserver:
    """Captures nothing, records nothing: the observer machinery's own cost."""

    def capture(self) -> object:
        return None

    def batch_done(self, record: BatchRecord) -> None:
        pass


def identity(xs: list[int]) -> list[int]:
    return xs


async def per_request_us(mode: str, requests: int, wave: int = 1000) -> float:
    """Microseconds per request for ``requests`` calls in waves of ``wave`` concurrent ones."""
    kw: dict[str, Any] = {"timeout": 100.0} if mode == "request-path" else {}
    async with Batcher(identity, max_batch_size=256, max_wait=0.0, **kw) as b:
        if mode == "observer":
            b.add_observer(NullObserver())
        await asyncio.gather(*(b(i) for i in range(wave)))  # warm-up
        start = time.perf_counter()
        for _ in range(requests // wave):
            await asyncio.gather(*(b(i) for i in range(wave)))
        return (time.perf_counter() - start) / (requests // wave * wave) * 1e6


async def run(repeats: int, requests: int) -> dict[str, float]:
    """The median per-request cost of each mode, the modes interleaved so drift hits all."""
    samples: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            samples[mode].append(await per_request_us(mode, requests))
    return {m: statistics.median(v) for m, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``python -m bench.observer_overhead --help``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--requests", type=int, default=50_000)
    a = p.parse_args(argv)
    for mode, us in asyncio.run(run(a.repeats, a.requests)).items():
        print(f"{mode:>12}: {us:6.2f} us/request")


if __name__ == "__main__":
    main()
