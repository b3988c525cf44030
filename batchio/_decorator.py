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
from typing import Any, Final, Generic, TypeVar, Unpack, cast, overload

from ._batcher import Batcher
from ._exceptions import BatcherClosedError
from ._options import DEFAULT, BatcherOptions, BatcherOptionsKw, TimeoutArg, options_from
from ._stats import BatcherStatistics, Tally

__all__ = ["BatchedFunction", "BatchedMethod", "batch"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")
SelfT = TypeVar("SelfT")

_running_loop: Final = asyncio._get_running_loop


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

    def __init__(self, fn: Callable[[list[InT]], Any], options: BatcherOptions) -> None:
        self._fn = fn
        self._options = options
        self._batchers: dict[asyncio.AbstractEventLoop, Batcher[InT, OutT]] = {}
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"<batchio.batch of {self._fn!r}>"

    @property
    def options(self) -> BatcherOptions:
        """The options every batcher of this function is built with."""
        return self._options

    def batcher(self) -> Batcher[InT, OutT]:
        """Return the running loop's batcher, starting one if this loop has none (or it closed)."""
        loop = asyncio.get_running_loop()
        b = self._batchers.get(loop)
        if b is not None and not b.closed:
            return b
        for old in [lp for lp in self._batchers if lp.is_closed()]:
            del self._batchers[old]
        b = Batcher(self._fn, options=self._options)
        b._start()
        self._batchers[loop] = b
        return b

    async def __call__(
        self, item: InT, *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> OutT:
        """Submit one item and return its result; see :meth:`batchio.Batcher.__call__`.

        ``timeout=None`` means no deadline; leaving it out takes the decorator's ``timeout``.
        ``priority``: higher is served first.
        """
        return await self.batcher()(item, timeout=timeout, priority=priority)

    def submit_nowait(
        self, item: InT, *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> asyncio.Future[OutT]:
        """Submit one item now and return its future; see :meth:`batchio.Batcher.submit_nowait`."""
        return self.batcher().submit_nowait(item, timeout=timeout, priority=priority)

    async def map(
        self, items: Iterable[InT], *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> list[OutT]:
        """Submit several items as one request; see :meth:`batchio.Batcher.map`."""
        return await self.batcher().map(items, timeout=timeout, priority=priority)

    def map_nowait(
        self, items: Iterable[InT], *, timeout: TimeoutArg = DEFAULT, priority: int = 0
    ) -> asyncio.Future[list[OutT]]:
        """The future-returning twin of :meth:`map`."""
        return self.batcher().map_nowait(items, timeout=timeout, priority=priority)

    def statistics(self, loop: asyncio.AbstractEventLoop | None = None) -> BatcherStatistics:
        """Statistics of one loop's batcher: a pure read, safe from any thread.

        Args:
            loop: whose batcher to read. By default the running loop's; called outside any loop
                (a metrics thread, say), that of the only loop with a batcher.

        Never starts a batcher: before the first call, the snapshot is all zeros.

        Raises:
            RuntimeError: called outside a loop while batchers of several loops are alive, and
                no ``loop`` was given.
        """
        batchers = list(self._batchers.items())  # one atomic copy; another thread may add
        if loop is None:
            loop = _running_loop()
        if loop is not None:
            found = [b for lp, b in batchers if lp is loop]
        else:
            found = [b for lp, b in batchers if not lp.is_closed()]
            if len(found) > 1:
                raise RuntimeError(
                    f"{self!r} has batchers on {len(found)} event loops; "
                    "pass statistics(loop=...) to choose one"
                )
        if found:
            return found[0].statistics()
        return Tally().snapshot(queue_depth=0, in_flight=0, healthy=True, closed=False)

    def _close_all_soon(self) -> None:
        """Stop intake of every loop's batcher; each drains and exits on its own loop."""
        for loop, b in list(self._batchers.items()):
            if not loop.is_closed():
                try:
                    loop.call_soon_threadsafe(b.close)
                except RuntimeError:  # closed meanwhile
                    pass
        self._batchers.clear()

    async def aclose(self, *, cancel_pending: bool = False, timeout: float | None = None) -> None:
        """Close and drain the running loop's batcher, if it has one; a later call starts anew.

        Same arguments as :meth:`batchio.Batcher.aclose`.
        """
        b = self._batchers.pop(asyncio.get_running_loop(), None)
        if b is not None:
            await b.aclose(cancel_pending=cancel_pending, timeout=timeout)


class BatchedMethod(Generic[SelfT, InT, OutT]):
    """A batch method wrapped by :func:`batch`; each instance gets its own batchers.

    Instances are told apart by identity (two equal instances never share a batcher, and
    unhashable ones such as plain dataclasses work). They must support weak references: the
    wrapper does not keep them alive, and when one is collected its batchers are closed.
    """

    def __init__(self, fn: Callable[[SelfT, list[InT]], Any], options: BatcherOptions) -> None:
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

    call: Callable[[list[Any]], Any]
    if inspect.iscoroutinefunction(fn):

        async def call_async(items: list[Any]) -> Any:
            return await fn(target(), items)

        call = call_async
    else:

        def call_sync(items: list[Any]) -> Any:
            return fn(target(), items)

        call = call_sync
    # The batcher, its log lines and its threads are named after the method (Class.method).
    call.__name__ = fn.__name__
    call.__qualname__ = fn.__qualname__
    return call


_SyncFn = Callable[[list[InT]], Sequence[OutT | Exception]]
_AsyncFn = Callable[[list[InT]], Awaitable[Sequence[OutT | Exception]]]
_SyncMethod = Callable[[SelfT, list[InT]], Sequence[OutT | Exception]]
_AsyncMethod = Callable[[SelfT, list[InT]], Awaitable[Sequence[OutT | Exception]]]


def _wrap(fn: Callable[..., Any], options: BatcherOptions) -> Any:
    if not callable(fn):
        raise TypeError(f"@batchio.batch decorates a function or method, got {fn!r}")
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) >= 2 and params[0].name in ("self", "cls"):
        return BatchedMethod(fn, options)
    return BatchedFunction(fn, options)


class _Decorator:
    """What ``@batch(...)`` returns: applies the (already validated) options to a function."""

    def __init__(self, options: BatcherOptions) -> None:
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
        return _wrap(fn, self._options)


@overload
def batch(fn: _SyncFn[InT, OutT], /) -> BatchedFunction[InT, OutT]: ...
@overload
def batch(fn: _AsyncFn[InT, OutT], /) -> BatchedFunction[InT, OutT]: ...
@overload
def batch(fn: _SyncMethod[SelfT, InT, OutT], /) -> BatchedMethod[SelfT, InT, OutT]: ...
@overload
def batch(fn: _AsyncMethod[SelfT, InT, OutT], /) -> BatchedMethod[SelfT, InT, OutT]: ...
@overload
def batch(
    *, options: BatcherOptions | None = None, **kwargs: Unpack[BatcherOptionsKw]
) -> _Decorator: ...
def batch(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    options: BatcherOptions | None = None,
    **kwargs: Unpack[BatcherOptionsKw],
) -> Any:
    """Decorate a list-in/list-out function (or method) so each call batches one item.

    ::

        @batchio.batch(max_batch_size=64, max_wait=0.002)
        def embed(texts: list[str]) -> list[list[float]]: ...

        @batchio.batch                          # bare: the default options
        async def score(pairs: list[Pair]) -> list[float]: ...

        vector = await embed("hello")          # one item
        vectors = await embed.map(["a", "b"])  # several items, one request

    The options are those of :class:`~batchio.BatcherOptions`, validated here (a bad one fails at
    decoration, not at the first call). A method (first parameter ``self``) gets one batcher per
    instance, named ``Class.method``. The batcher starts on the first call in a running event
    loop, and each event loop gets its own batcher (see the module docs); use ``await
    f.aclose()`` to drain one before its loop ends.
    """
    opts = options_from(options, kwargs)
    if fn is not None:
        return _wrap(fn, opts)
    return _Decorator(opts)
