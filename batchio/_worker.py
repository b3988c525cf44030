"""Where a batch function runs: calling it, checking what it returned, bisecting a failed batch,
and the batcher's own worker threads for a sync function.

A job goes to the threads through a ``queue.SimpleQueue`` and its outcome comes back with one
``loop.call_soon_threadsafe``. That round trip costs about half of ``loop.run_in_executor`` with a
``ThreadPoolExecutor`` and a third of ``anyio.to_thread.run_sync`` (measured in
``docs/design.md``). The threads belong to one batcher, so a model, its CUDA context and any
thread-local state stay on the same threads.

A thread stuck in a stalled batch cannot be interrupted: it is *abandoned* (its eventual outcome
is dropped, and the thread exits when it returns) and a new thread takes its place.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from ._exceptions import BatchOutputError, BatchSizeMismatchError
from ._outcomes import holdable
from ._outputs import output_rows

__all__: list[str] = []

# Errors about what fn returned, not about any input: bisecting would only repeat them.
CONTRACT_ERRORS = (BatchOutputError, BatchSizeMismatchError)


def is_async_callable(fn: object) -> bool:
    """True for an ``async def`` function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with an async __call__
    )


def call_sync(fn: Callable[[list[Any]], Any], inputs: list[Any], isolate: bool) -> list[Any]:
    """Run a sync ``fn`` on ``inputs`` (on a worker thread); one outcome per input.

    With ``isolate``, a batch that raises is re-run in halves until each failing input is found;
    it gets the error in its slot, and the others their results.
    """
    if not isolate:
        return output_rows(fn(inputs), len(inputs))
    try:
        return output_rows(fn(list(inputs)), len(inputs))  # a copy: fn may mutate its list
    except CONTRACT_ERRORS:
        raise
    except Exception as exc:
        if len(inputs) == 1:
            return [exc]
        mid = len(inputs) // 2
        return [*call_sync(fn, inputs[:mid], True), *call_sync(fn, inputs[mid:], True)]


async def call_async(
    fn: Callable[[list[Any]], Awaitable[Any]], inputs: list[Any], isolate: bool
) -> list[Any]:
    """The ``async def`` form of :func:`call_sync`, awaited on the event loop."""
    if not isolate:
        return output_rows(await fn(inputs), len(inputs))
    try:
        return output_rows(await fn(list(inputs)), len(inputs))
    except CONTRACT_ERRORS:
        raise
    except Exception as exc:
        if len(inputs) == 1:
            return [exc]
        mid = len(inputs) // 2
        first = await call_async(fn, inputs[:mid], True)
        return [*first, *await call_async(fn, inputs[mid:], True)]


class Job:
    """One call of a function on a worker thread; ``future`` completes on the caller's loop.

    ``lane`` says whose job it is on a shared queue (see :mod:`batchio._devexec`); ``elapsed`` is
    the seconds the call took, set on the worker thread before ``future`` completes.
    """

    __slots__ = (
        "abandoned",
        "arg",
        "elapsed",
        "finished",
        "fn",
        "future",
        "lane",
        "loop",
        "running",
        "started",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[[Any], Any],
        arg: Any,
        lane: Any = None,
        notify_start: bool = False,
    ) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.fn: Callable[[Any], Any] | None = fn
        self.arg = arg
        self.lane = lane
        self.elapsed = 0.0
        self.abandoned = False
        self.running = False  # a thread picked it up (set under the threads' lock)
        self.finished = False
        # Completes on the loop when a thread picks the job up: a time limit counts from then,
        # not from the submission (a job may wait behind others for the thread).
        self.started: asyncio.Future[None] | None = loop.create_future() if notify_start else None


class JobQueue(Protocol):
    """Where worker threads take their jobs from: FIFO by default, fair for a shared device.

    ``None`` is the stop signal: :meth:`get` returns it once per :meth:`put` of ``None``, after
    the jobs already queued. :meth:`charge` is told what each job cost once it has run.
    """

    def put(self, job: Job | None) -> None: ...

    def get(self) -> Job | None: ...

    def qsize(self) -> int: ...

    def charge(self, job: Job, elapsed: float) -> None: ...


class FifoQueue:
    """The plain job queue: first come, first served."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Job | None] = queue.SimpleQueue()

    def put(self, job: Job | None) -> None:
        self._q.put(job)

    def get(self) -> Job | None:
        return self._q.get()

    def qsize(self) -> int:
        return self._q.qsize()

    def charge(self, job: Job, elapsed: float) -> None:
        pass


def _settle(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    # The awaiting batch may be gone (stalled, cancelled at loop shutdown): then nobody wants it.
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class _Shared:
    """What the threads share with their owner (not the owner itself, so it can be collected)."""

    __slots__ = ("abandoned", "busy", "count", "jobs", "lock", "running", "stopped")

    def __init__(self, count: int, jobs: JobQueue) -> None:
        self.jobs = jobs
        self.lock = threading.Lock()
        self.stopped = False  # told to exit: no thread takes jobs any more
        self.count = count  # threads that take jobs (abandoned ones excluded)
        self.abandoned = 0  # abandoned threads that have not returned yet
        self.busy = 0.0  # seconds spent in jobs that finished, over all threads
        self.running: dict[int, float] = {}  # thread id -> when its current job started


# Which pool the current thread works for: a batch function calling its own batcher's
# call_sync() from there would wait for a batch slot its own job holds.
_here = threading.local()


def _work(shared: _Shared) -> None:
    _here.shared = shared
    jobs = shared.jobs
    clock = time.perf_counter
    me = threading.get_ident()
    while (job := jobs.get()) is not None:
        started = clock()
        with shared.lock:
            if job.abandoned:  # given up before it started: nobody waits for it
                job.fn = job.arg = None
                continue
            job.running = True
            shared.running[me] = started
        fn, arg = job.fn, job.arg
        job.fn = job.arg = None
        if job.started is not None:
            try:
                job.loop.call_soon_threadsafe(_settle, job.started, True, None)
            except RuntimeError:  # the loop was closed meanwhile
                pass
        try:
            outcome: tuple[bool, Any] = (True, fn(arg))  # type: ignore[misc]
        except BaseException as exc:  # delivered to the batch, which decides what to catch
            outcome = (False, holdable(exc))
        del fn, arg  # drop the batch's inputs before waiting for the next job
        elapsed = job.elapsed = clock() - started
        with shared.lock:  # decided once: either abandoned, or finished in time
            shared.running.pop(me, None)
            shared.busy += elapsed
            abandoned = job.abandoned
            if abandoned:
                shared.abandoned -= 1
            else:
                job.finished = True
        jobs.charge(job, elapsed)  # a stalled job's time counts too, on a shared device
        if abandoned:
            return  # a replacement took this thread's place
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, *outcome)
        except RuntimeError:  # the loop was closed meanwhile: nobody is waiting
            pass
        del job, outcome


def _stop(shared: _Shared) -> None:
    shared.stopped = True
    for _ in range(shared.count):
        shared.jobs.put(None)


class WorkerThreads:
    """``count`` daemon threads that run jobs and report to the job's loop."""

    __slots__ = ("__weakref__", "_name", "_serials", "_shared")

    def __init__(self, count: int, name: str, jobs: JobQueue | None = None) -> None:
        self._shared = _Shared(count, jobs if jobs is not None else FifoQueue())
        self._name = name
        self._serials = itertools.count()  # next() is atomic: threads of any loop may spawn
        for _ in range(count):
            self._spawn()
        # Threads exit if the owner forgets to shut them down (e.g. its event loop just ended).
        weakref.finalize(self, _stop, self._shared)

    @property
    def abandoned(self) -> int:
        """Abandoned threads still stuck in their job."""
        return self._shared.abandoned

    @property
    def workers(self) -> int:
        """Threads that take jobs (abandoned ones not counted; none once shut down)."""
        shared = self._shared
        return 0 if shared.stopped else shared.count

    def owns_current_thread(self) -> bool:
        """True on one of these threads (running one of their jobs)."""
        return getattr(_here, "shared", None) is self._shared

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a thread."""
        return self._shared.jobs.qsize()

    def busy_seconds(self) -> float:
        """Seconds the threads have spent in jobs so far, the jobs still running included."""
        shared = self._shared
        now = time.perf_counter()
        with shared.lock:
            return shared.busy + sum(now - t for t in shared.running.values())

    def _spawn(self) -> None:
        name = f"{self._name}-{next(self._serials)}"
        threading.Thread(target=_work, args=(self._shared,), name=name, daemon=True).start()

    def run(
        self, fn: Callable[[Any], Any], arg: Any, lane: Any = None, notify_start: bool = False
    ) -> Job:
        """Run ``fn(arg)`` on a worker thread; await the returned job's ``future`` (and, with
        ``notify_start``, its ``started`` future, done when a thread picks it up)."""
        job = Job(asyncio.get_running_loop(), fn, arg, lane, notify_start)
        self._shared.jobs.put(job)
        return job

    def abandon(self, job: Job, *, replace: bool = True) -> None:
        """Give up on ``job`` (stalled, or closing): drop its outcome; with ``replace``, start a
        thread in its place."""
        shared = self._shared
        with shared.lock:
            if job.abandoned or job.finished:
                return
            job.abandoned = True
            if not job.running:
                return  # still queued: the thread that picks it up skips it, none is stuck
            shared.abandoned += 1
            if not replace:
                shared.count -= 1
        if replace:
            self._spawn()

    def shutdown(self) -> None:
        """Let the threads exit once the jobs already submitted are done; does not wait."""
        _stop(self._shared)
