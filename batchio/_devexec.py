"""One device thread shared by several batchers, which interleaves their batches fairly.

Each batcher that names a :class:`DeviceExecutor` gets a *lane*: its own FIFO of device jobs. When
the thread is free it takes the next job of the lane that has had the least service so far,
counted in device seconds (``share="time"``) or in batches (``share="batches"``), each divided by
the lane's weight. This is stride scheduling, as a weighted fair queue does it: a lane that was
idle starts at the current virtual time rather than with credit for its idle period, so waking
up never lets it monopolise the device.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from types import TracebackType
from typing import Final, Literal, TypeAlias, cast, final

from ._checks import check_int
from ._exceptions import DeviceClosedError
from ._worker import Job, WorkerThreads

__all__ = ["DeviceExecutor", "Share"]

Share: TypeAlias = Literal["time", "batches"]
"""How a shared device is divided: by device seconds or by batches, in proportion to weight."""

_SHARES: Final = ("time", "batches")


class QueueClosed(RuntimeError):
    """A job was put on a closed :class:`FairQueue` (internal)."""


class Lane:
    """One batcher's place on a shared device (internal)."""

    __slots__ = ("busy", "jobs", "name", "served", "weight")

    def __init__(self, name: str, weight: int) -> None:
        self.name = name
        self.weight = weight
        self.jobs: deque[Job] = deque()
        self.served = 0.0  # virtual service received: cost / weight, summed
        self.busy = 0.0  # device seconds this lane's jobs took


class FairQueue:
    """The job queue of a shared device: the least-served waiting lane goes next (internal)."""

    __slots__ = ("_by_time", "_closed", "_cond", "_lanes", "_stops", "_vtime", "_waiting")

    def __init__(self, share: Share) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._by_time = share == "time"
        self._lanes: list[Lane] = []  # lanes with jobs waiting, in the order they became so
        self._waiting = 0
        self._stops = 0
        self._vtime = 0.0  # the service level of the lane served last
        self._closed = False

    def close(self) -> None:
        """Refuse new jobs from now on (the stop signals still go through)."""
        with self._cond:
            self._closed = True

    def put(self, job: Job | None) -> None:
        with self._cond:
            if job is None:
                self._stops += 1
            else:
                if self._closed:
                    raise QueueClosed("the DeviceExecutor is closed")
                lane: Lane = job.lane
                if not lane.jobs:
                    # Idle time earns no credit: a lane that wakes up joins at the current level.
                    lane.served = max(lane.served, self._vtime)
                    self._lanes.append(lane)
                lane.jobs.append(job)
                self._waiting += 1
            self._cond.notify()

    def get(self) -> Job | None:
        with self._cond:
            while not self._waiting:
                if self._stops:
                    self._stops -= 1
                    return None
                self._cond.wait()
            lanes = self._lanes
            best = min(range(len(lanes)), key=lambda i: lanes[i].served)
            lane = lanes[best]
            job = lane.jobs.popleft()
            if not lane.jobs:
                del lanes[best]
            self._waiting -= 1
            self._vtime = lane.served
            if not self._by_time:
                lane.served += 1.0 / lane.weight
            return job

    def qsize(self) -> int:
        return self._waiting

    def charge(self, job: Job, elapsed: float) -> None:
        lane: Lane = job.lane
        with self._cond:
            lane.busy += elapsed
            if self._by_time:
                lane.served += elapsed / lane.weight


@final
class DeviceExecutor:
    """A device's one thread, shared by the device stages of several batchers.

    Give it to each batcher's :class:`~batchio.Stages` as ``device=``: their device stages then
    run one at a time on this thread, interleaved fairly, instead of each batcher's own thread
    competing for the device. With ``share="time"`` (the default) each batcher gets device time in
    proportion to its ``Stages.weight`` while several have work waiting; with ``share="batches"``
    it gets batches in that proportion. A batcher alone on the device gets all of it.

    Use it as a context manager (or call :meth:`close`) around the batchers that use it::

        with DeviceExecutor("cuda:0") as gpu:
            async with Batcher(Stages(run=embed, device=gpu)) as a, \\
                       Batcher(Stages(run=rerank, device=gpu, weight=2)) as b:
                ...

    Args:
        name: names the thread (``batchio-<name>-0``) and appears in reprs.
        share: ``"time"`` or ``"batches"``: what the weights divide.
    """

    __slots__ = ("_final", "_name", "_pool", "_queue", "_share", "_started", "_threads")

    def __init__(self, name: str = "device", *, share: Share = "time") -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name!r}")
        if share not in _SHARES:
            raise ValueError(f'share must be "time" or "batches", got {share!r}')
        self._name = name
        self._share: Share = share
        self._queue = FairQueue(share)
        self._pool = WorkerThreads(1, f"batchio-{name}", self._queue)
        self._threads: WorkerThreads | None = self._pool  # None once closed
        self._started = time.perf_counter()
        self._final: tuple[float, float] | None = None  # (busy, wall) seconds when closed

    def __repr__(self) -> str:
        state = "closed" if self._threads is None else "open"
        return f"<batchio.DeviceExecutor {self._name!r} {state} share={self._share!r}>"

    def __enter__(self) -> DeviceExecutor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def name(self) -> str:
        """The name given at construction."""
        return self._name

    @property
    def share(self) -> Share:
        """What the lanes' weights divide: ``"time"`` or ``"batches"``."""
        return self._share

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called; device jobs are then refused."""
        return self._threads is None

    def close(self) -> None:
        """Refuse new device jobs and let the thread exit once those queued have run."""
        threads = self._threads
        if threads is not None:
            self._final = (threads.busy_seconds(), time.perf_counter() - self._started)
            self._threads = None
            self._queue.close()
            threads.shutdown()

    def busy_fraction(self) -> float:
        """The share of wall time, from when this executor was made until now (or until it was
        closed), that its thread was working."""
        threads = self._threads
        if threads is not None:
            busy, wall = threads.busy_seconds(), time.perf_counter() - self._started
        elif self._final is not None:
            busy, wall = self._final
        else:  # pragma: no cover - closed implies _final
            return 0.0
        return min(1.0, busy / wall) if wall > 0 else 0.0

    @property
    def abandoned(self) -> int:
        """Device threads left behind in a stalled job that have not returned yet."""
        return self._pool.abandoned

    # -- for the batchers -------------------------------------------------------------------------

    def lane(self, name: str, weight: int) -> Lane:
        """A new lane for one batcher (internal)."""
        return Lane(name, cast(int, check_int("weight", weight, minimum=1)))

    @property
    def threads(self) -> WorkerThreads:
        """The worker thread (internal); raises once closed."""
        threads = self._threads
        if threads is None:
            raise DeviceClosedError(f"{self!r} is closed")
        return threads

    def queued(self, lane: Lane) -> int:
        """Jobs of ``lane`` waiting for the device (internal)."""
        return len(lane.jobs)
