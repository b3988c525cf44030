"""The errors batchio raises.

::

    BatchioError
     ├── QueueFullError          the queue is at max_queue_size (load shedding)
     ├── BatcherClosedError      you closed the batcher, or never started it
     ├── BatcherBrokenError      the executor died: an external cause, not your call
     ├── BatchSizeMismatchError  fn returned the wrong number of results (also a ValueError)
     └── RequestTimeoutError     the request's deadline passed (also a TimeoutError)

Errors raised by *your* batch function are delivered to the callers as they are (the same
exception object to every request of the failed batch), so ``except MyModelError`` works.
"""

from __future__ import annotations

__all__ = [
    "BatchSizeMismatchError",
    "BatcherBrokenError",
    "BatcherClosedError",
    "BatchioError",
    "QueueFullError",
    "RequestTimeoutError",
]


class BatchioError(Exception):
    """Base class of every error batchio itself raises."""


class QueueFullError(BatchioError):
    """Raised by a submit when the queue already holds ``max_queue_size`` rows.

    Only raised with ``when_full="reject"`` (the default), or when a single request has more rows
    than ``max_queue_size`` and so could never fit.
    """

    def __init__(self, queued: int, requested: int, max_queue_size: int) -> None:
        self.queued = queued
        self.requested = requested
        self.max_queue_size = max_queue_size
        super().__init__(
            f"queue full: {queued} rows queued, {requested} more requested, "
            f"max_queue_size={max_queue_size}"
        )


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
    """

    def __init__(self, timeout: float, *, dispatched: bool) -> None:
        self.timeout = timeout
        self.dispatched = dispatched
        where = "while its batch was running" if dispatched else "while queued"
        super().__init__(f"request timed out after {timeout:g} s ({where})")
