"""``@batchio.batch``: a decorator that turns a list-in/list-out function into a per-item awaitable.

The decorated function owns one :class:`~batchio.Batcher` per event loop (and, for a method, per
instance), started lazily on the first call inside a running loop. A batch never mixes requests
from two loops: each loop gets its own queue, executor task and worker thread. Batchers of loops
that have since closed are dropped (and their threads released) the next time a new loop calls in.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, Literal, TypeVar, cast, overload

from ._batcher import Batcher
from ._exceptions import BatcherClosedError
from ._policy import BatchPolicy
from ._stats import BatcherStatistics

__all__ = ["BatchedFunction", "BatchedMethod", "batch"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")
SelfT = TypeVar("SelfT")

_Options = dict[str, Any]


class BatchedFunction(Generic[InT, OutT]):
    """A batch function wrapped by :func:`batch`: ``await f(item)`` returns that item's result.

    Each event loop that calls it gets its own :class:`~batchio.Batcher`, started on first use.
    Close it with ``await f.aclose()`` (from the loop whose batcher should drain) when a program
    wants a clean shutdown; otherwise it lives as long as its loop.
    """

    # Copied from the wrapped function by functools.update_wrapper.
    __name__: str
    __qualname__: str
    __wrapped__: Callable[..., Any]

    def __init__(self, fn: Callable[[list[InT]], Any], options: _Options) -> None:
        self._fn = fn
        self._options = options
        self._batchers: dict[asyncio.AbstractEventLoop, Batcher[InT, OutT]] = {}
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<batchio.batch of {self._fn!r}>"

    def batcher(self) -> Batcher[InT, OutT]:
        """Return the running loop's batcher, starting one if this loop has none (or it closed)."""
        loop = asyncio.get_running_loop()
        b = self._batchers.get(loop)
        if b is not None and not b.closed:
            return b
        for old in [lp for lp in self._batchers if lp.is_closed()]:
            del self._batchers[old]
        b = Batcher(self._fn, **self._options)
        b._start()
        self._batchers[loop] = b
        return b

    def __call__(self, item: InT, *, timeout: float | None = None) -> asyncio.Future[OutT]:
        """Submit one item; await the result. See :meth:`batchio.Batcher.__call__`.

        ``timeout=None`` here means the default given to the decorator.
        """
        if timeout is None:
            return self.batcher()(item)
        return self.batcher()(item, timeout=timeout)

    def map(
        self, items: Iterable[InT], *, timeout: float | None = None
    ) -> asyncio.Future[list[OutT]]:
        """Submit several items as one request; see :meth:`batchio.Batcher.map`."""
        if timeout is None:
            return self.batcher().map(items)
        return self.batcher().map(items, timeout=timeout)

    def statistics(self) -> BatcherStatistics:
        """Statistics of the running loop's batcher."""
        return self.batcher().statistics()

    def _close_all_soon(self) -> None:
        """Stop intake of every loop's batcher; each drains and exits on its own loop."""
        for loop, b in list(self._batchers.items()):
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(b.close)
                except RuntimeError:  # closed meanwhile
                    pass
        self._batchers.clear()

    async def aclose(self, *, cancel_pending: bool = False) -> None:
        """Close and drain the running loop's batcher, if it has one; a later call starts anew."""
        b = self._batchers.pop(asyncio.get_running_loop(), None)
        if b is not None:
            await b.aclose(cancel_pending=cancel_pending)


class BatchedMethod(Generic[SelfT, InT, OutT]):
    """A batch method wrapped by :func:`batch`; each instance gets its own batchers.

    Instances are told apart by identity (two equal instances never share a batcher, and
    unhashable ones such as plain dataclasses work). They must support weak references: the
    wrapper does not keep them alive, and when one is collected its batchers are closed.
    """

    def __init__(self, fn: Callable[[SelfT, list[InT]], Any], options: _Options) -> None:
        self._fn = fn
        self._options = options
        self._bound: dict[int, BatchedFunction[InT, OutT]] = {}
        functools.update_wrapper(cast(Any, self), fn)

    @overload
    def __get__(self, instance: None, owner: type[Any]) -> BatchedMethod[SelfT, InT, OutT]: ...
    @overload
    def __get__(self, instance: SelfT, owner: type[Any]) -> BatchedFunction[InT, OutT]: ...
    def __get__(
        self, instance: SelfT | None, owner: type[Any]
    ) -> BatchedFunction[InT, OutT] | BatchedMethod[SelfT, InT, OutT]:
        if instance is None:
            return self
        key = id(instance)
        bound = self._bound.get(key)
        if bound is None:
            try:
                bound = BatchedFunction(_weak_method(self._fn, instance), self._options)
                # Runs when the instance is collected, before its id can be reused.
                weakref.finalize(instance, self._forget, key)
            except TypeError:
                raise TypeError(
                    f"@batchio.batch methods need instances that support weak references; "
                    f"{type(instance).__name__} does not (add '__weakref__' to its __slots__)"
                ) from None
            self._bound[key] = bound
        return bound

    def _forget(self, key: int) -> None:
        bound = self._bound.pop(key, None)
        if bound is not None:
            bound._close_all_soon()


def _weak_method(fn: Callable[..., Any], instance: object) -> Callable[[list[Any]], Any]:
    """Bind ``fn`` to ``instance`` through a weak reference, so the batcher does not keep it alive."""
    ref = weakref.ref(instance)

    def target() -> object:
        obj = ref()
        if obj is None:
            raise BatcherClosedError("the instance of this batched method was garbage-collected")
        return obj

    if inspect.iscoroutinefunction(fn):

        async def call_async(items: list[Any]) -> Any:
            return await fn(target(), items)

        return call_async

    def call(items: list[Any]) -> Any:
        return fn(target(), items)

    return call


_SyncFn = Callable[[list[InT]], Sequence[OutT | Exception]]
_AsyncFn = Callable[[list[InT]], Awaitable[Sequence[OutT | Exception]]]
_SyncMethod = Callable[[SelfT, list[InT]], Sequence[OutT | Exception]]
_AsyncMethod = Callable[[SelfT, list[InT]], Awaitable[Sequence[OutT | Exception]]]


class _Decorator:
    def __init__(self, options: _Options) -> None:
        self._options = options

    @overload
    def __call__(self, fn: _SyncFn[InT, OutT]) -> BatchedFunction[InT, OutT]: ...
    @overload
    def __call__(self, fn: _AsyncFn[InT, OutT]) -> BatchedFunction[InT, OutT]: ...
    @overload
    def __call__(self, fn: _SyncMethod[SelfT, InT, OutT]) -> BatchedMethod[SelfT, InT, OutT]: ...
    @overload
    def __call__(self, fn: _AsyncMethod[SelfT, InT, OutT]) -> BatchedMethod[SelfT, InT, OutT]: ...
    def __call__(self, fn: Callable[..., Any]) -> Any:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(params) >= 2 and params[0].name in ("self", "cls"):
            return BatchedMethod(fn, self._options)
        return BatchedFunction(fn, self._options)


def batch(
    *,
    max_batch_size: int = 32,
    max_wait: float = 0.005,
    max_concurrent_batches: int = 1,
    max_queue_size: int | None = None,
    when_full: Literal["reject", "wait"] = "reject",
    timeout: float | None = None,
    isolate_errors: bool = False,
    policy: BatchPolicy | None = None,
    name: str | None = None,
) -> _Decorator:
    """Decorate a list-in/list-out function (or method) so each call batches one item.

    ::

        @batchio.batch(max_batch_size=64, max_wait=0.002)
        def embed(texts: list[str]) -> list[list[float]]: ...

        vector = await embed("hello")          # one item
        vectors = await embed.map(["a", "b"])  # several items, one request

    The options are those of :class:`~batchio.Batcher`. A method (first parameter ``self``) gets
    one batcher per instance. The batcher starts on the first call in a running event loop, and
    each event loop gets its own batcher (see the module docs); use ``await f.aclose()`` to drain
    one before its loop ends.
    """
    return _Decorator(
        {
            "max_batch_size": max_batch_size,
            "max_wait": max_wait,
            "max_concurrent_batches": max_concurrent_batches,
            "max_queue_size": max_queue_size,
            "when_full": when_full,
            "timeout": timeout,
            "isolate_errors": isolate_errors,
            "policy": policy,
            "name": name,
        }
    )
