"""The errors batchio raises.

::

    BatchioError
     ├── QueueFullError          the queue is at max_queue_size (load shedding)
     ├── BatcherClosedError      you closed the batcher, or never started it
     ├── BatcherBrokenError      the executor died: an external cause, not your call
     ├── BatcherLoopError        called from another event loop than the batcher's (RuntimeError)
     ├── BatchSizeMismatchError  fn returned the wrong number of results (also a ValueError)
     ├── BatchOutputError        fn returned something that is not one result per input (TypeError)
     ├── BatchFunctionError      fn raised a BaseException that is not an Exception
     ├── BatchStalledError       the batch ran past batch_time_limit (also a TimeoutError)
     ├── DeviceClosedError       a device stage met a closed DeviceExecutor (RuntimeError)
     └── RequestTimeoutError     the request's deadline passed (also a TimeoutError)

Errors raised by *your* batch function are delivered to the callers as they are (the same
exception object to every request of the failed batch), so ``except MyModelError`` works.
"""

from __future__ import annotations

__all__ = [
    "BatchFunctionError",
    "BatchOutputError",
    "BatchSizeMismatchError",
    "BatchStalledError",
    "BatcherBrokenError",
    "BatcherClosedError",
    "BatcherLoopError",
    "BatchioError",
    "DeviceClosedError",
    "QueueFullError",
    "RequestTimeoutError",
]


class BatchioError(Exception):
    """Base class of every error batchio itself raises."""


class QueueFullError(BatchioError):
    """Raised by a submit when the queue already holds ``max_queue_size`` rows.

    Raised with ``when_full="reject"`` (the default) or ``"shed"`` (when nothing of lower priority
    can make room), or when a single request has more rows than ``max_queue_size`` and so could
    never fit. Its subclass :class:`RequestShedError` fails a queued request shed for a
    higher-priority one.
    """

    def __init__(self, queued: int, requested: int, max_queue_size: int) -> None:
        self.queued = queued
        self.requested = requested
        self.max_queue_size = max_queue_size
        super().__init__(
            f"queue full: {queued} rows queued, {requested} more requested, "
            f"max_queue_size={max_queue_size}"
        )


class RequestShedError(QueueFullError):
    """Delivered to a queued request that was shed to make room for a higher-priority one.

    Only with ``when_full="shed"``: a request that arrives at a full queue evicts queued requests
    of strictly lower priority (the lowest first, the latest-ranked within it), which fail with
    this error. A subclass of :class:`QueueFullError`, so a handler of overload catches both.

    Attributes:
        priority: the shed request's priority.
        by_priority: the priority of the request it made room for.
    """

    def __init__(self, priority: int, by_priority: int, max_queue_size: int) -> None:
        self.priority = priority
        self.by_priority = by_priority
        BatchioError.__init__(
            self,
            f"request shed from a full queue (max_queue_size={max_queue_size}): priority "
            f"{priority} made room for a request of priority {by_priority}",
        )
        self.queued = max_queue_size
        self.requested = 0
        self.max_queue_size = max_queue_size


class BatcherClosedError(BatchioError):
    """Raised by a submit to a batcher that was closed, or was never started.

    Also delivered to requests still queued when the batcher is closed with
    ``aclose(cancel_pending=True)``. This is the error of *your* lifecycle call, as opposed to
    :class:`BatcherBrokenError`.
    """


class BatcherBrokenError(BatchioError):
    """Raised when the batcher's executor died, so the request can never complete.

    Every pending request gets this error at once, later submits get it too, and
    ``Batcher.healthy`` turns false. ``__cause__`` holds the error that killed the executor.
    """


class BatchSizeMismatchError(BatchioError, ValueError):
    """Raised to every request of a batch whose function returned the wrong number of results."""

    def __init__(self, expected: int, actual: int) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"batch function returned {actual} results for a batch of {expected} inputs; "
            "it must return exactly one result per input, in order"
        )


class RequestTimeoutError(BatchioError, TimeoutError):
    """Raised when a request's deadline passes before its result is delivered.

    A request whose deadline passes while it is still queued is never handed to the batch
    function. One whose deadline passes while its batch runs gets this error at the deadline, and
    its result is dropped when the batch finishes.

    With ``early_timeout=True`` a queued request is also failed with it, ``early`` set, as soon
    as the batch being formed is predicted to finish after its deadline (see
    :doc:`scheduling`): it never takes a slot in a batch whose result would come too late.
    """

    def __init__(self, timeout: float, *, dispatched: bool, early: bool = False) -> None:
        self.timeout = timeout
        self.dispatched = dispatched
        self.early = early
        if early:
            where = "failed early: its batch was predicted to finish after the deadline"
        else:
            where = "while its batch was running" if dispatched else "while queued"
        super().__init__(f"request timed out after {timeout:g} s ({where})")


class BatcherLoopError(BatchioError, RuntimeError):
    """Raised by a call from another event loop (or thread) than the one that started the batcher.

    A batcher belongs to one running event loop; nothing is queued when this is raised. (A
    batcher whose loop has been closed raises :class:`BatcherBrokenError` instead.)
    """


class BatchOutputError(BatchioError, TypeError):
    """Raised to every request of a batch whose function returned something other than one
    result per input: a set or mapping (whose order would cross results between callers), a
    string, a scalar, ``None``, or an awaitable from a sync function.
    """

    def __init__(self, returned: type, why: str) -> None:
        self.returned = returned
        super().__init__(
            f"batch function returned a {returned.__qualname__}: {why}. It must return one "
            "result per input, in order: a sequence (list, tuple), an iterator, or an array "
            "with a leading batch dimension"
        )


class BatchFunctionError(BatchioError):
    """Raised to every request of a batch whose function raised a ``BaseException`` that is not
    an ``Exception`` (a custom ``BaseException`` subclass, ``GeneratorExit``, or a
    ``CancelledError`` the function raised itself). ``__cause__`` is the original.

    The batcher stays healthy: the batch failed, not the batcher. ``KeyboardInterrupt`` and
    ``SystemExit`` are different: they propagate, and the batcher breaks.
    """


class BatchStalledError(BatchioError, TimeoutError):
    """Raised to every request of a batch that ran longer than ``batch_time_limit``.

    The stuck worker thread is abandoned and replaced (an ``async def`` function is cancelled),
    so later batches run; ``statistics().stalled_batches`` counts these batches.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(
            f"batch stalled: the batch function ran longer than batch_time_limit={limit:g} s"
        )


class DeviceClosedError(BatchioError, RuntimeError):
    """Raised to the requests of a batch whose device stage went to a closed
    :class:`~batchio.DeviceExecutor`.

    The executor outlives the batchers that share it; close it after them. The batcher itself
    stays healthy (it may be given work again once it has a device), and the batch is not
    bisected under ``isolate_errors``: no input caused this.
    """
