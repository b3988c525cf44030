"""Helpers for testing code that uses batchio, deterministically (no sleeps).

:class:`GatedBatchFn` is a batch function that records every batch and, while its gate is closed,
blocks inside the call: "a batch is running" becomes a state the test controls.

:class:`VirtualClock` replaces an asyncio event loop's clock, so ``max_wait``, deadlines and
``batch_time_limit`` elapse when the test says so, not when real time passes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

import anyio.to_thread

__all__ = ["GatedBatchFn", "VirtualClock", "wait_all_tasks_blocked"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")


class GatedBatchFn(Generic[InT, OutT]):
    """A sync batch function ``list[InT] -> list[OutT]`` gated by a :class:`threading.Event`.

    Each call records its inputs in :attr:`batches`, then waits for the gate to be open, then
    returns ``[transform(x) for x in items]``. The gate starts open unless ``gated=True``.

    Args:
        transform: maps one input to its output (outputs derived from inputs make mix-ups visible).
        gated: start with the gate closed.
        gate_timeout: seconds a call waits for the gate before failing with ``TimeoutError``, so a
            broken test fails instead of hanging.
    """

    def __init__(
        self,
        transform: Callable[[InT], OutT],
        *,
        gated: bool = False,
        gate_timeout: float = 30.0,
    ) -> None:
        self.transform = transform
        self.batches: list[list[InT]] = []
        self.gate_timeout = gate_timeout
        self._gate = threading.Event()
        if not gated:
            self._gate.set()
        self._entered = threading.Condition()

    def __call__(self, items: list[InT]) -> list[OutT]:
        with self._entered:
            self.batches.append(list(items))
            self._entered.notify_all()
        if not self._gate.wait(self.gate_timeout):
            raise TimeoutError(f"gate stayed closed for {self.gate_timeout} s")
        return [self.transform(x) for x in items]

    @property
    def calls(self) -> int:
        """How many batches have entered the function."""
        return len(self.batches)

    def open(self) -> None:
        """Let blocked and future calls return."""
        self._gate.set()

    def close(self) -> None:
        """Make future calls block until :meth:`open`."""
        self._gate.clear()

    async def wait_entered(self, calls: int = 1) -> None:
        """Wait until at least ``calls`` batches have entered the function."""

        def wait() -> None:
            with self._entered:
                if not self._entered.wait_for(
                    lambda: len(self.batches) >= calls, self.gate_timeout
                ):
                    raise TimeoutError(
                        f"{calls} batches did not enter within {self.gate_timeout} s"
                    )

        await anyio.to_thread.run_sync(wait)


class VirtualClock:
    """A fake monotonic clock for an asyncio event loop (the way aiolimiter's tests drive time).

    While :meth:`install`-ed, the loop's ``time()`` returns :attr:`now`, so its timers
    (``call_at``, ``asyncio.sleep``, ``asyncio.wait(timeout=)``) and every batcher started on it
    afterwards follow this clock. Time moves only when the test calls :meth:`advance`; the
    timers now due run on the loop's next iteration (``await wait_all_tasks_blocked()`` from this
    module: anyio's sleeps on the loop's clock between its checks, so under a stopped clock it
    would wait forever).

    Install it before starting the batcher: a batcher reads its loop's clock when it starts.
    Only asyncio's own event loops can be driven this way: uvloop's clock lives in C.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def time(self) -> float:
        """The current virtual time, in seconds."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (>= 0)."""
        if seconds < 0:
            raise ValueError(f"time only moves forward; got {seconds}")
        self.now += seconds

    @contextmanager
    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> Iterator[VirtualClock]:
        """Make ``loop`` (default: the running loop) read this clock until the block ends."""
        loop = loop or asyncio.get_running_loop()
        if not isinstance(loop, asyncio.BaseEventLoop):
            raise TypeError(f"VirtualClock drives asyncio's own event loops, not {loop!r}")
        loop.time = self.time  # type: ignore[method-assign]
        try:
            yield self
        finally:
            del loop.time


async def wait_all_tasks_blocked() -> None:
    """Return once every other task of the running loop waits on something that is not done.

    anyio's function of the same name, made safe under a :class:`VirtualClock`: it yields with
    ``asyncio.sleep(0)`` only, never with a timed sleep.
    """
    this = asyncio.current_task()
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(0)
        for task in asyncio.all_tasks():
            if task is this:
                continue
            waiter = getattr(task, "_fut_waiter", None)  # asyncio's own record, as anyio reads it
            if waiter is None or waiter.done():
                break
        else:
            if not _callbacks_due(loop):
                return


def _callbacks_due(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop has callbacks to run now: ready ones, or timers a clock advance made
    due (asyncio's own loops; a loop without these records, uvloop's, says no)."""
    if getattr(loop, "_ready", None):
        return True
    scheduled = getattr(loop, "_scheduled", None)
    if scheduled:
        now = loop.time()
        return any(not h.cancelled() and h.when() <= now for h in scheduled)
    return False
