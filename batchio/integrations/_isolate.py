"""Bisection of a failed batch call, so that only the inputs that make it fail get an error.

Pure Python (no torch). A call over several inputs that raises is run again on each half, down to
single inputs: an input that still fails alone gets its own exception, every other input its
result. With one bad input among ``n`` that costs about ``2 log2(n)`` extra calls; when every input
fails, ``2n - 1`` calls in all.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["run_isolating"]

T = TypeVar("T")
R = TypeVar("R")


def run_isolating(
    run: Callable[[Sequence[T]], Sequence[R]], items: Sequence[T]
) -> list[R | Exception]:
    """``run(items)``, bisected on failure: one result, or one exception, per item, in order.

    ``run`` must return one result per item. ``Exception`` subclasses are caught; anything else
    (cancellation, ``KeyboardInterrupt``) propagates.
    """
    try:
        outputs = run(items)
    except Exception as exc:
        # The error outlives this call (callers hold it); its frames must not keep the batch's
        # tensors, possibly gigabytes of device memory, alive with it.
        traceback.clear_frames(exc.__traceback__)
        if len(items) <= 1:
            return [exc]
    else:
        return list(outputs)
    # Outside the except block, so the halves' errors do not chain to this batch's error.
    mid = len(items) // 2
    return [*run_isolating(run, items[:mid]), *run_isolating(run, items[mid:])]
