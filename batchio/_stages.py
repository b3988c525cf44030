"""The staged shape of a batch function: prepare, assemble, run on the device, finish.

A plain batch function does all of its work on one thread, so an accelerator waits while the CPU
tokenizes, pads and splits. :class:`Stages` names those parts, and the batcher runs each on
workers of its own, so that while batch N is on the device, batch N+1 is being assembled and
batch N+2 prepared (the "mixed CPU/GPU/IO workloads" advice of TensorFlow Serving's batching
guide). The device thread runs device work only.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeAlias, TypeVar, cast

from ._checks import check_int
from ._devexec import DeviceExecutor, Lane, QueueClosed
from ._exceptions import DeviceClosedError
from ._outcomes import Outcomes
from ._outputs import output_rows
from ._processes import PrepareProcesses
from ._request import Batch, Owner, Request
from ._stats import SAMPLE_WINDOW, Percentiles, StageStatistics
from ._worker import CONTRACT_ERRORS, Job, WorkerThreads, call_sync, is_async_callable

__all__ = ["Stages"]

InT = TypeVar("InT")
OutT = TypeVar("OutT")

PREPARE: Final = "prepare"
ASSEMBLE: Final = "assemble"
DEVICE: Final = "device"
FINISH: Final = "finish"


# Not slotted: `Stages[int, str](...)` records its type arguments on the instance, which a frozen
# slotted dataclass refuses with a TypeError (a frozen one's AttributeError is tolerated).
@dataclass(frozen=True, kw_only=True)
class Stages(Generic[InT, OutT]):
    """A batch function split into stages that run on different workers and overlap.

    Pass it to :class:`~batchio.Batcher` in place of ``fn``. Every stage is a plain synchronous
    function; only ``run`` is required. A batch goes through them in order::

        prepare(items)     -> one prepared row (or an Exception) per item   prepare_workers threads
        assemble(rows)     -> one assembled batch (padded, pinned buffers)  its own thread
        run(assembled)     -> the device's output                           the device thread
        finish(output)     -> one result (or an Exception) per row          its own thread

    A stage that is left out passes its input on unchanged (without ``finish``, ``run`` must
    return one result per row). The contract is the plain batcher's at every stage:

    - a prepared slot holding an ``Exception`` fails that request alone, at once, and its row goes
      no further;
    - a request cancelled or timed out before its batch is assembled never reaches the device
      (one cancelled after assembly rides along, and its result is dropped); a batch with no live
      request left is not run at all;
    - when ``assemble``, ``run`` or ``finish`` raises, the rows it was given fail with that error,
      or, with ``isolate_errors``, are run again in halves through those stages, so only the rows
      that fail alone get it;
    - ``batch_time_limit`` bounds each stage's job: a stalled job fails its rows with
      :class:`~batchio.BatchStalledError`, and its thread is abandoned and replaced;
    - ``statistics().stages`` reports each stage's jobs, busy time and queue depth.

    While one batch is on the device the next ones are assembled and prepared, so a staged batcher
    keeps several batches in flight: ``max_concurrent_batches`` defaults to
    ``prepare_workers + 3`` here (one per preparing thread, one assembling, one on the device, one
    finishing; with ``prepare_processes``, ``max(prepare_workers, prepare_processes) + 3``).

    Attributes:
        run: the device stage, ``run(assembled) -> output``. It runs alone on the device thread:
            copies in, the forward pass, copies out started. Keep CPU work out of it.
        prepare: ``prepare(items) -> rows``, one prepared row or ``Exception`` per item (say,
            tokenizing texts). Several batches are prepared at once, on ``prepare_workers``
            threads.
        assemble: ``assemble(rows) -> batch``, e.g. padding the prepared rows into pinned host
            buffers. It gets only the rows still live.
        finish: ``finish(output) -> results``, one per row given to ``assemble`` (wait for the
            copy, split, convert).
        prepare_workers: threads of the prepare stage (>= 1).
        prepare_processes: run ``prepare`` in this many worker processes (>= 1; "spawn" start
            method), out of this process's GIL; ``None`` (the default): on the prepare threads.
            ``prepare`` must then be picklable (a module-level function, or an object of a
            module-level class); it is sent once to each process, and each batch's items and
            prepared rows cross the process boundary by pickle. The prepare threads, at least
            ``prepare_processes`` of them, each hand one batch to the pool and wait without the
            GIL. The processes start with the batcher and stop at its close; one that dies fails
            the batches it held with ``concurrent.futures.process.BrokenProcessPool`` and a new
            pool takes its place.
        device: a :class:`~batchio.DeviceExecutor` whose one thread runs this batcher's device
            stage, shared fairly with the other batchers that name it. ``None``: the batcher has
            a device thread of its own.
        weight: this batcher's share of a shared ``device`` (>= 1), relative to the others'.
    """

    run: Callable[[Any], Any]
    prepare: Callable[[list[InT]], Sequence[Any]] | None = None
    assemble: Callable[[list[Any]], Any] | None = None
    finish: Callable[[Any], Sequence[OutT | Exception]] | None = None
    prepare_workers: int = 2
    prepare_processes: int | None = None
    device: DeviceExecutor | None = None
    weight: int = 1

    def __post_init__(self) -> None:
        for name in (DEVICE, PREPARE, ASSEMBLE, FINISH):
            fn = self.run if name == DEVICE else getattr(self, name)
            if fn is None and name != DEVICE:
                continue
            if not callable(fn):
                raise TypeError(f"the {name} stage must be callable, got {fn!r}")
            if is_async_callable(fn):
                raise TypeError(
                    f"the {name} stage must be a plain function: stages run on threads "
                    "(an async batch function goes to Batcher directly)"
                )
        fix = object.__setattr__
        fix(self, "prepare_workers", check_int("prepare_workers", self.prepare_workers, minimum=1))
        fix(self, "weight", check_int("weight", self.weight, minimum=1))
        if self.prepare_processes is not None:
            count = check_int("prepare_processes", self.prepare_processes, minimum=1)
            fix(self, "prepare_processes", count)
            if self.prepare is None:
                raise TypeError("prepare_processes needs a prepare stage to run in them")
            import pickle  # only here: `import batchio` stays light

            try:
                pickle.dumps(self.prepare)
            except Exception as exc:
                raise TypeError(
                    f"prepare_processes={count} runs prepare in worker processes, so it must "
                    f"be picklable: a module-level function or an object of a module-level "
                    f"class (not a lambda, a nested function or a bound method of an object "
                    f"that holds a lock); pickling {self.prepare!r} failed: {exc}"
                ) from exc
        if self.device is not None and not isinstance(self.device, DeviceExecutor):
            raise TypeError(f"device must be a batchio.DeviceExecutor, got {self.device!r}")

    @property
    def prepare_threads(self) -> int:
        """Threads of the prepare stage: ``prepare_workers``, and at least one per process."""
        return max(self.prepare_workers, self.prepare_processes or 0)

    @property
    def depth(self) -> int:
        """Batches in flight by default: one per stage worker."""
        return self.prepare_threads + 3


# -- running a staged batch (internal) -------------------------------------------------------------

STALLED: Final = object()
"""What a stage job gives back when it ran past ``batch_time_limit`` (its batch already failed)."""

_DROPPED: Final = object()
"""The slot of a row that went no further (its request is done): delivery finds it settled."""


class StageWork:
    """One stage's workers and its counters, kept on the event loop's thread."""

    __slots__ = ("_device", "_threads", "busy", "jobs", "lane", "name", "runs")

    def __init__(
        self,
        name: str,
        threads: WorkerThreads | None,
        device: DeviceExecutor | None = None,
        lane: Lane | None = None,
    ) -> None:
        self.name = name
        self._threads = threads
        self._device = device
        self.lane = lane
        self.jobs = 0
        self.busy = 0.0
        self.runs: deque[float] = deque(maxlen=SAMPLE_WINDOW)

    @property
    def shared(self) -> bool:
        """True for the device stage on a :class:`DeviceExecutor` other batchers may share."""
        return self._device is not None

    @property
    def threads(self) -> WorkerThreads:
        if self._device is not None:
            return self._device.threads  # raises DeviceClosedError once it is closed
        assert self._threads is not None
        return self._threads

    @property
    def abandoned(self) -> int:
        """Threads of this stage stuck in an abandoned job (a shared device's, all of them)."""
        if self._device is not None:
            return self._device.abandoned
        assert self._threads is not None
        return self._threads.abandoned

    def run(
        self, pool: WorkerThreads, fn: Callable[[Any], Any], arg: Any, notify_start: bool
    ) -> Job:
        try:
            return pool.run(fn, arg, self.lane, notify_start)
        except QueueClosed:  # closed between looking the pool up and queueing the job
            raise DeviceClosedError(f"{self._device!r} is closed") from None

    def record(self, job: Job) -> None:
        self.jobs += 1
        self.busy += job.elapsed
        self.runs.append(job.elapsed)

    def shutdown(self) -> None:
        if self._threads is not None:
            self._threads.shutdown()

    def statistics(self) -> StageStatistics:
        if self._device is not None:
            depth = self._device.queued(cast(Lane, self.lane))
            workers = 0 if self._device.closed else 1
        else:
            assert self._threads is not None
            depth, workers = self._threads.queue_depth, self._threads.workers
        return StageStatistics(
            name=self.name,
            workers=workers,
            jobs=self.jobs,
            busy_seconds=self.busy,
            queue_depth=depth,
            run=Percentiles.of(list(self.runs)),
        )


StageCall: TypeAlias = Callable[[StageWork, Callable[[Any], Any], Any, Batch], Awaitable[Any]]
"""How the batcher runs one stage job for a batch: ``call(work, fn, arg, batch)``, returning the
job's result or :data:`STALLED` (the batcher applies ``batch_time_limit`` and the accounting)."""


class Pipeline:
    """The workers of one staged batcher, and the walk of one batch through its stages."""

    __slots__ = (
        "_closed",
        "_device",
        "_own_device",
        "_padded_size",
        "_prepare",
        "_processes",
        "_works",
        "outcomes",
        "stages",
    )

    def __init__(
        self,
        stages: Stages[Any, Any],
        name: str,
        outcomes: Outcomes,
        padded_size: Callable[[int], int],
    ) -> None:
        self.stages = stages
        self.outcomes = outcomes
        self._padded_size = padded_size
        self._closed = False
        self._own_device = stages.device is None
        device = self._device = (
            DeviceExecutor(f"{name}-device") if stages.device is None else stages.device
        )
        works: dict[str, StageWork] = {}
        self._prepare: Callable[..., list[Any]] | None = None
        self._processes: PrepareProcesses | None = None
        if stages.prepare is not None:
            works[PREPARE] = StageWork(
                PREPARE, WorkerThreads(stages.prepare_threads, f"batchio-{name}-prepare")
            )
            if stages.prepare_processes is not None:
                self._processes = PrepareProcesses(stages.prepare, stages.prepare_processes)
                self._prepare = self._processes.prepare
            else:
                self._prepare = functools.partial(call_sync, stages.prepare)
        if stages.assemble is not None:
            works[ASSEMBLE] = StageWork(ASSEMBLE, WorkerThreads(1, f"batchio-{name}-assemble"))
        if self._own_device:
            works[DEVICE] = StageWork(DEVICE, device.threads, lane=device.lane(name, 1))
        else:
            works[DEVICE] = StageWork(
                DEVICE, None, device=device, lane=device.lane(name, stages.weight)
            )
        works[FINISH] = StageWork(FINISH, WorkerThreads(1, f"batchio-{name}-finish"))
        self._works = works

    def shutdown(self) -> None:
        """Let every thread of this batcher's own go (a shared device stays open); idempotent."""
        if self._closed:
            return
        self._closed = True
        for work in self._works.values():
            if not work.shared:
                work.shutdown()
        if self._processes is not None:
            self._processes.shutdown()
        if self._own_device:
            self._device.close()

    def owns_current_thread(self) -> bool:
        """True on a thread of one of the stages (the shared device's included)."""
        for work in self._works.values():
            try:
                pool = work.threads
            except DeviceClosedError:
                continue
            if pool.owns_current_thread():
                return True
        return False

    def statistics(self) -> tuple[tuple[StageStatistics, ...], float, int]:
        """Each stage's statistics, the device thread's busy fraction, abandoned threads."""
        works = self._works.values()
        return (
            tuple(work.statistics() for work in works),
            self._device.busy_fraction(),
            sum(work.abandoned for work in works),
        )

    async def run(self, batch: Batch, call: StageCall, isolate: bool) -> Any:
        """Walk ``batch`` through the stages; one outcome per row, or :data:`STALLED`."""
        inputs = batch.inputs
        n = len(inputs)
        owners, futures = _row_owners(batch)
        results: list[Any] = [_DROPPED] * n
        prepared: Sequence[Any] = inputs
        if self._prepare is not None:
            prepared = await call(
                self._works[PREPARE],
                functools.partial(self._prepare, isolate=isolate),
                inputs,
                batch,
            )
            if prepared is STALLED:
                if self._processes is not None:
                    self._processes.retire()  # its worker process is stuck in that job
                return STALLED
            fail = self.outcomes.fail
            for i, row in enumerate(prepared):
                if isinstance(row, BaseException):
                    results[i] = row
                    if not futures[i].done():  # a cancelled one is counted at delivery, once
                        fail(owners[i], row)  # now: its caller need not wait for the others
        live = [i for i in range(n) if not futures[i].done()]
        if live:
            rows = [prepared[i] for i in live]
            tail = await self._tail(rows, [futures[i] for i in live], batch, call, isolate)
            if tail is STALLED:
                return STALLED
            for i, out in zip(live, cast(list[Any], tail), strict=True):
                results[i] = out
        return results

    async def _tail(
        self,
        rows: list[Any],
        owners: list[asyncio.Future[Any]],
        batch: Batch,
        call: StageCall,
        isolate: bool,
    ) -> Any:
        """Assemble, run and finish ``rows``: one outcome each, or :data:`STALLED`."""
        n = len(rows)
        stages = self.stages
        size = self._padded_size(n)
        # Always a new list: a stage may sort or pad what it is given in place, and a bisection
        # must still cut the rows in their callers' order.
        padded = [*rows, *[rows[-1]] * (size - n)]
        try:
            assembled: Any = padded
            if stages.assemble is not None:
                assembled = await call(self._works[ASSEMBLE], stages.assemble, padded, batch)
                if assembled is STALLED:
                    return STALLED
            if all(owner.done() for owner in owners):
                return [_DROPPED] * n  # everyone left while it was assembled: spare the device
            device_job = functools.partial(_unless_all_gone, stages.run, owners)
            output = await call(self._works[DEVICE], device_job, assembled, batch)
            if output is STALLED:
                return STALLED
            if output is _ALL_GONE:  # everyone left while it waited for the device thread
                batch.service = -1.0  # it did not run: nothing for the run-time model to learn
                return [_DROPPED] * n
            finish = functools.partial(_finish, stages.finish, size)
            outcomes = await call(self._works[FINISH], finish, output, batch)
            if outcomes is STALLED:
                return STALLED
            return cast(list[Any], outcomes)[:n]
        except (*CONTRACT_ERRORS, DeviceClosedError) as exc:
            return [exc] * n  # not about any row (what a stage returned, no device): no bisection
        except Exception as exc:
            if not isolate or n == 1:
                return [exc] * n
        mid = n // 2
        first = await self._tail(rows[:mid], owners[:mid], batch, call, isolate)
        if first is STALLED:
            return STALLED
        second = await self._tail(rows[mid:], owners[mid:], batch, call, isolate)
        if second is STALLED:
            return STALLED
        return [*cast(list[Any], first), *cast(list[Any], second)]


_ALL_GONE: Final = object()  # what a device job returns when nobody waits for it any more


def _unless_all_gone(
    run: Callable[[Any], Any], owners: list[asyncio.Future[Any]], assembled: Any
) -> Any:
    """The device job: ``run(assembled)``, unless every caller left while it was queued for the
    device thread (a shared device may have other batchers' jobs ahead of it). Reading a
    future's state from this thread is safe: it is one attribute, set on the loop."""
    if all(owner.done() for owner in owners):
        return _ALL_GONE
    return run(assembled)


def _finish(finish: Callable[[Any], Any] | None, rows: int, output: Any) -> list[Any]:
    """The finish stage's job: the user's ``finish``, then the output contract's checks."""
    return output_rows(output if finish is None else finish(output), rows)


def _row_owners(batch: Batch) -> tuple[list[Owner], list[asyncio.Future[Any]]]:
    """Whose each row of ``batch`` is, and the future that says whether they still wait."""
    if batch.simple:
        futures = cast("list[asyncio.Future[Any]]", batch.owners)
        return batch.owners, futures
    owners: list[Owner] = []
    futures = []
    for owner, count in zip(batch.owners, batch.counts, strict=True):
        fut = owner.future if type(owner) is Request else owner
        owners.extend([owner] * count)
        futures.extend([cast("asyncio.Future[Any]", fut)] * count)
    return owners, futures
