"""Helpers for testing code that uses batchio, deterministically (no sleeps).

:class:`GatedBatchFn` is a batch function that records every batch and, while its gate is closed,
blocks inside the call: "a batch is running" becomes a state the test controls.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio.to_thread

__all__ = ["GatedBatchFn"]

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
