"""The shared shape of the model wrappers: an object that owns a Batcher and forwards to it."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, Unpack

from .. import (
    DEFAULT,
    Batcher,
    BatcherOptions,
    BatcherOptionsKw,
    BatcherStatistics,
    ReconfigureKw,
    TimeoutArg,
)
from .._options import options_from

InT = TypeVar("InT")
OutT = TypeVar("OutT")


def own_batcher(
    fn: Callable[[list[Any]], Any],
    options: BatcherOptions | None,
    kwargs: BatcherOptionsKw,
    **defaults: Any,
) -> Batcher[Any, Any]:
    """The wrapper's batcher: ``options`` (or the wrapper's ``defaults``) with ``kwargs`` on top.

    Every option is the core's, validated by :class:`batchio.BatcherOptions`; a wrapper only
    chooses different defaults (a name, say), so nothing is declared twice.
    """
    base = options if options is not None else options_from(None, defaults)  # type: ignore[arg-type]
    return Batcher(fn, options=base, **kwargs)


class BatcherOwner(Generic[InT, OutT]):
    """Owns ``self.batcher``: an async context manager whose calls are batched requests."""

    batcher: Batcher[InT, OutT]

    async def __aenter__(self) -> Self:
        await self.batcher.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.batcher.__aexit__(exc_type, exc, tb)

    async def __call__(
        self, item: InT, *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> OutT:
        """Submit one input and return its result (one request of one row).

        ``timeout`` as in :meth:`batchio.Batcher.__call__`: seconds, ``None`` for no deadline,
        or the wrapper's ``timeout`` option by default. ``priority``: higher is served first.
        """
        return await self.batcher(item, timeout=timeout, priority=priority)

    async def map(
        self, items: Iterable[InT], *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> list[OutT]:
        """Submit several inputs as one request and return their results, in order."""
        return await self.batcher.map(items, timeout=timeout, priority=priority)

    def call_sync(self, item: InT, *, timeout: TimeoutArg = DEFAULT, priority: int = 0) -> OutT:
        """Submit one input from a thread other than the batcher's loop and block for its
        result (see :meth:`batchio.Batcher.call_sync`)."""
        return self.batcher.call_sync(item, timeout=timeout, priority=priority)

    def map_sync(
        self, items: Iterable[InT], *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> list[OutT]:
        """The blocking twin of :meth:`map`, for threads (see :meth:`batchio.Batcher.map_sync`)."""
        return self.batcher.map_sync(items, timeout=timeout, priority=priority)

    def imap(
        self,
        items: Iterable[InT] | AsyncIterable[InT],
        *,
        ordered: bool = True,
        max_in_flight: int | None = None,
        timeout: TimeoutArg = DEFAULT,
        priority: int = 0,
    ) -> AsyncGenerator[OutT, None]:
        """Stream inputs through the model in constant memory: an async iterator over their
        results (see :meth:`batchio.Batcher.imap`; a failed input raises)."""
        return self.batcher.imap(
            items,
            ordered=ordered,
            max_in_flight=max_in_flight,
            timeout=timeout,
            priority=priority,
        )

    def reconfigure(self, **changes: Unpack[ReconfigureKw]) -> BatcherOptions:
        """Change the owned batcher's options live (see :meth:`batchio.Batcher.reconfigure`)."""
        return self.batcher.reconfigure(**changes)

    def statistics(self) -> BatcherStatistics:
        """The owned batcher's :class:`batchio.BatcherStatistics`."""
        return self.batcher.statistics()
