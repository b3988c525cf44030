"""The batcher's own worker threads: where a sync batch function runs.

A job goes in through a ``queue.SimpleQueue`` and its outcome comes back with one
``loop.call_soon_threadsafe``. That round trip costs about half of ``loop.run_in_executor`` with a
``ThreadPoolExecutor`` (no ``concurrent.futures.Future``, locks or chained callbacks in between),
and a third of ``anyio.to_thread.run_sync`` (measured in ``docs/design.md``). The threads belong to
one batcher, so a model, its CUDA context and any thread-local state stay on the same thread.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__: list[str] = []

T = TypeVar("T")

_Job = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[Any], Any], Any]


def settleable(exc: BaseException) -> BaseException:
    """``exc``, or a ``RuntimeError`` wrapping it if a future cannot hold it.

    asyncio futures refuse ``StopIteration`` (it would end the awaiting coroutine instead of being
    raised in it); Python's coroutines convert it the same way.
    """
    if isinstance(exc, StopIteration):
        wrapped = RuntimeError(f"the batch function raised {exc!r}")
        wrapped.__cause__ = exc
        return wrapped
    return exc


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    # The awaiting batch task may have been cancelled (loop shutdown): then nobody wants this.
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


def _work(jobs: queue.SimpleQueue[_Job | None]) -> None:
    while (job := jobs.get()) is not None:
        loop, fut, fn, arg = job
        try:
            outcome: tuple[bool, Any] = (True, fn(arg))
        except BaseException as exc:  # delivered to the batch, which decides what to catch
            outcome = (False, settleable(exc))
        del job, fn, arg  # drop the batch's inputs before waiting for the next job
        try:
            loop.call_soon_threadsafe(_settle, fut, *outcome)
        except RuntimeError:  # the loop was closed meanwhile: nobody is waiting
            pass
        del fut, outcome


class WorkerThreads:
    """``count`` daemon threads that run ``fn(arg)`` jobs and report to the caller's loop."""

    __slots__ = ("__weakref__", "_jobs", "_threads")

    def __init__(self, count: int, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=_work, args=(self._jobs,), name=f"{name}-{i}", daemon=True)
            for i in range(count)
        ]
        for t in self._threads:
            t.start()
        # Threads exit if the owner forgets to shut them down (e.g. its event loop just ended).
        weakref.finalize(self, _stop, self._jobs, count)

    def run(self, fn: Callable[[Any], T], arg: Any) -> asyncio.Future[T]:
        """Run ``fn(arg)`` on a worker thread; the returned future completes on this loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((loop, fut, fn, arg))
        return fut

    def shutdown(self) -> None:
        """Let the threads exit once the jobs already submitted are done; does not wait."""
        _stop(self._jobs, len(self._threads))


def _stop(jobs: queue.SimpleQueue[_Job | None], count: int) -> None:
    for _ in range(count):
        jobs.put(None)
