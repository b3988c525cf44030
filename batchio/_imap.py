"""Streaming many inputs through a batcher in constant memory: what ``Batcher.imap`` returns.

A feeder task pulls inputs from the source (an iterable or an async iterable) and submits each as
its own request, never more than ``max_in_flight`` unconsumed at once: a result waiting to be
yielded still holds its slot, so a slow consumer stops the feeder instead of piling results up.
The consumer yields results in input order, or as they complete.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterable
from typing import Any

from ._exceptions import BatcherBrokenError, BatcherClosedError, BatcherLoopError
from ._request import Entry, entry_future

__all__: list[str] = []

# Refusals that say the batcher can take nothing (closed, broken, the wrong loop): they end the
# stream, after the results before them, even with return_exceptions.
_ENDS_THE_STREAM = (BatcherClosedError, BatcherBrokenError, BatcherLoopError)


async def stream(
    source: Iterable[Any] | AsyncIterable[Any],
    submit: Callable[[Any], Entry],
    cancel: Callable[[Entry], None],
    *,
    ordered: bool,
    max_in_flight: int,
    return_exceptions: bool,
) -> AsyncGenerator[Any, None]:
    """Yield the result of ``submit(item)`` for each item of ``source`` (see ``Batcher.imap``)."""
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max_in_flight)
    outstanding: dict[asyncio.Future[Any], Entry | None] = {}  # submitted, not yet yielded
    order: deque[asyncio.Future[Any]] = deque()  # in input order, or in completion order
    waiter: asyncio.Future[None] | None = None
    fed_all = False
    source_error: BaseException | None = None

    def wake(_: object = None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def completed(fut: asyncio.Future[Any]) -> None:
        if not ordered:
            order.append(fut)
        wake()

    def put(item: Any) -> None:
        try:
            entry: Entry | None = submit(item)
            fut = entry_future(entry)  # type: ignore[arg-type]
        except _ENDS_THE_STREAM:
            raise  # about the batcher, not the item: every later item would get it too
        except Exception as exc:  # refused at the door (a full queue, say): this item's error
            entry = None
            fut = loop.create_future()
            fut.set_exception(exc)
        outstanding[fut] = entry
        if ordered:
            order.append(fut)
        fut.add_done_callback(completed)

    async def feed() -> None:
        # A slot first, then the next item: never more inputs pulled than slots held.
        nonlocal fed_all, source_error
        try:
            if isinstance(source, AsyncIterable):
                ait = aiter(source)
                while True:
                    await slots.acquire()
                    try:
                        item = await anext(ait)
                    except StopAsyncIteration:
                        break
                    put(item)
            else:
                it = iter(source)
                while True:
                    await slots.acquire()
                    try:
                        item = next(it)
                    except StopIteration:
                        break
                    put(item)
        except Exception as exc:  # the source (or the batcher) failed: raised after the results
            source_error = exc
        finally:
            fed_all = True
            wake()

    feeder = loop.create_task(feed(), name="batchio-imap-feeder")
    try:
        while True:
            if order and order[0].done():
                fut = order.popleft()
                del outstanding[fut]
                slots.release()
                if fut.cancelled():
                    raise asyncio.CancelledError("a request of this imap was cancelled")
                exc = fut.exception()
                if exc is None:
                    yield fut.result()
                elif return_exceptions and isinstance(exc, Exception):
                    yield exc
                else:
                    raise exc
                continue
            if fed_all and not outstanding:
                if source_error is not None:
                    raise source_error
                return
            waiter = loop.create_future()
            try:
                await waiter
            finally:
                waiter = None
    finally:
        # Leaving early (break, an error, cancellation): stop feeding, withdraw what is queued.
        feeder.cancel()
        for fut, entry in outstanding.items():
            if not fut.done():
                fut.cancel()
                if entry is not None:
                    cancel(entry)
            elif not fut.cancelled():
                fut.exception()  # seen: errors of items never yielded are not "unretrieved"
        outstanding.clear()
        order.clear()
        await asyncio.gather(feeder, return_exceptions=True)
