"""The batcher's options, declared once and shared by ``Batcher``, ``@batch`` and the model wrappers.

:class:`BatcherOptions` holds the defaults and validates every value when it is built, so a bad
option fails at construction with a message that names it, wherever it was given.
:class:`BatcherOptionsKw` is the same list as keyword arguments (``**options:
Unpack[BatcherOptionsKw]``), so type checkers see each name and type; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, TypedDict, cast, final

from ._checks import check_int, check_positive, check_seconds
from ._policy import BatchPolicy, LatencyTarget, MaxSizeOrWait

__all__ = [
    "DEFAULT",
    "BatcherOptions",
    "BatcherOptionsKw",
    "DefaultTimeout",
    "ReconfigureKw",
    "TimeoutArg",
    "WhenFull",
]


@final
class DefaultTimeout:
    """The type of :data:`DEFAULT`: "use the batcher's ``timeout`` option" in a per-call
    ``timeout=``. (``None`` there means no deadline, everywhere.)"""

    __slots__ = ()

    def __repr__(self) -> str:
        return "batchio.DEFAULT"

    def __reduce__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = DefaultTimeout()
"""Per-call ``timeout=DEFAULT`` (the default) takes the batcher's ``timeout`` option."""

TimeoutArg: TypeAlias = "float | DefaultTimeout | None"
"""What a per-call ``timeout=`` accepts: seconds, ``None`` (no deadline) or :data:`DEFAULT`."""

WhenFull: TypeAlias = Literal["reject", "wait", "shed"]
"""What a call does at a full queue (see :attr:`BatcherOptions.when_full`)."""


class BatcherOptionsKw(TypedDict, total=False):
    """The options of :class:`BatcherOptions`, as keyword arguments (each one optional)."""

    max_batch_size: int
    max_wait: float
    max_concurrent_batches: int | None
    allowed_batch_sizes: Sequence[int] | None
    max_queue_size: int | None
    when_full: WhenFull
    timeout: float | None
    batch_time_limit: float | None
    isolate_errors: bool
    policy: BatchPolicy | None
    name: str | None
    latency_target: float | None
    early_timeout: bool
    batch_cost: Callable[[Any], float] | None
    max_batch_cost: float | None
    padded_cost: bool
    bucket_window: int | None
    max_bypass: int


class ReconfigureKw(TypedDict, total=False):
    """The options :meth:`Batcher.reconfigure <batchio.Batcher.reconfigure>` can change live."""

    max_batch_size: int
    max_wait: float
    allowed_batch_sizes: Sequence[int] | None
    max_queue_size: int | None
    timeout: float | None
    batch_time_limit: float | None
    isolate_errors: bool
    policy: BatchPolicy | None
    latency_target: float | None
    early_timeout: bool
    max_batch_cost: float | None
    padded_cost: bool
    bucket_window: int | None
    max_bypass: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BatcherOptions:
    """How a batcher forms and runs batches; validated when built, then immutable.

    Attributes:
        max_batch_size: the most rows in one batch (an ``int`` >= 1).
        max_wait: seconds the oldest queued request may wait for a batch to fill before a partial
            batch is dispatched (finite, >= 0; ``0`` dispatches whenever a batch slot is free).
        max_concurrent_batches: batches that may run at once, and worker threads for a sync
            ``fn`` (an ``int`` >= 1). ``None`` (the default): 1 for a batch function, and the
            pipeline depth (``Stages.depth``: one batch per prepare thread, plus three) for
            :class:`~batchio.Stages`.
        allowed_batch_sizes: the only batch sizes ``fn`` (or the stages) may see, in rows, e.g.
            ``(8, 16, 32, 64)``: a batch is padded up to the next allowed size by repeating its
            last row, and the padding rows' results are dropped (they never reach a caller).
            A fixed set of shapes spares an accelerator a slow first run (compilation, kernel
            selection, CUDA graph capture) at every new size. The largest must equal
            ``max_batch_size``. Stored as a sorted tuple. ``None``: batches run at their own
            size.
        max_queue_size: the most rows that may wait in the queue; ``None`` for no bound.
        when_full: what a call does when the queue is full: ``"reject"`` raises
            :class:`~batchio.QueueFullError` at once, ``"wait"`` waits (FIFO) for room, within
            the request's timeout, and ``"shed"`` makes room by failing queued requests of
            lower priority (the lowest-ranked first) with :class:`~batchio.RequestShedError`,
            and raises ``QueueFullError`` when nothing of lower priority is queued.
        timeout: default deadline, in seconds from the call, of each request; ``None`` for none.
            A call overrides it with ``timeout=`` (``None`` there removes it).
        batch_time_limit: seconds one batch may run, from when a worker thread starts it
            (each stage job, for :class:`~batchio.Stages`), before it is declared stalled: its
            requests fail with :class:`~batchio.BatchStalledError`, the stuck worker is abandoned
            and replaced (an ``async def fn`` is cancelled), and the batcher carries on.
            ``None`` (the default): no limit.
        isolate_errors: when ``fn`` raises for a batch, re-run it in halves to find the inputs
            that fail, so the other requests still get their results.
        policy: a custom :class:`~batchio.BatchPolicy`; replaces ``max_batch_size`` and
            ``max_wait``.
        name: a name for logs, reprs and worker threads (default: ``fn``'s qualified name).
        latency_target: seconds: turns on the adaptive policy (:class:`~batchio.LatencyTarget`),
            which keeps queue wait plus run time under this at the p99 while the load allows,
            dispatching at once when the device is idle and growing batches (up to
            ``max_batch_size``) as load rises. ``max_wait`` is then unused. ``None`` (the
            default): the static ``max_batch_size``-or-``max_wait`` rule.
        early_timeout: fail a queued request with :class:`~batchio.RequestTimeoutError`
            (``early=True``) as soon as the batch being formed is predicted (by the learned
            run-time model) to finish after its deadline, instead of running it too late.
        batch_cost: a function of one input giving its cost (its token count, say), a finite
            number >= 0; called on the event loop when the call is made (an error there is that
            call's). Enables ``max_batch_cost`` and ``bucket_window``, and the adaptive policy
            then models run time against cost instead of rows.
        max_batch_cost: the most cost one batch may hold: a batch stops before the row that
            would take it over. A single row over the budget runs alone. ``None``: no budget.
        padded_cost: a batch costs its largest row's cost times its rows (what a padded
            tensor costs) rather than the sum of its rows' costs.
        bucket_window: batch formation may choose rows from the first this many queued
            requests, preferring those whose cost is close to the front request's, so that
            padded batches pad little. ``None`` (the default): strict rank order.
        max_bypass: with ``bucket_window``, the most batches that may take requests ranked
            after a waiting request before it is served: the starvation bound.
    """

    max_batch_size: int = 32
    max_wait: float = 0.005
    max_concurrent_batches: int | None = None
    allowed_batch_sizes: Sequence[int] | None = None
    max_queue_size: int | None = None
    when_full: WhenFull = "reject"
    timeout: float | None = None
    batch_time_limit: float | None = None
    isolate_errors: bool = False
    policy: BatchPolicy | None = None
    name: str | None = None
    latency_target: float | None = None
    early_timeout: bool = False
    batch_cost: Callable[[Any], float] | None = None
    max_batch_cost: float | None = None
    padded_cost: bool = False
    bucket_window: int | None = None
    max_bypass: int = 4

    def __post_init__(self) -> None:
        fix = object.__setattr__  # normalise (numpy ints, ints as seconds) on a frozen instance
        fix(self, "max_batch_size", check_int("max_batch_size", self.max_batch_size, minimum=1))
        fix(self, "max_wait", check_seconds("max_wait", self.max_wait, allow_zero=True))
        fix(
            self,
            "max_concurrent_batches",
            check_int(
                "max_concurrent_batches", self.max_concurrent_batches, minimum=1, allow_none=True
            ),
        )
        fix(
            self,
            "max_queue_size",
            check_int("max_queue_size", self.max_queue_size, minimum=1, allow_none=True),
        )
        if self.when_full not in ("reject", "wait", "shed"):
            raise ValueError(
                f'when_full must be "reject", "wait" or "shed", got {self.when_full!r}'
            )
        fix(self, "timeout", check_seconds("timeout", self.timeout, allow_none=True))
        fix(
            self,
            "batch_time_limit",
            check_seconds("batch_time_limit", self.batch_time_limit, allow_none=True),
        )
        if not isinstance(self.isolate_errors, bool):
            raise TypeError(f"isolate_errors must be a bool, got {self.isolate_errors!r}")
        if self.policy is not None and not isinstance(self.policy, BatchPolicy):
            raise TypeError(
                f"policy must implement batchio.BatchPolicy (max_batch_size and decide()), "
                f"got {self.policy!r}"
            )
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"name must be a str or None, got {self.name!r}")
        if self.allowed_batch_sizes is not None:
            fix(self, "allowed_batch_sizes", self._checked_sizes(self.allowed_batch_sizes))
        self._check_scheduling()

    def _check_scheduling(self) -> None:
        fix = object.__setattr__
        fix(
            self,
            "latency_target",
            check_seconds("latency_target", self.latency_target, allow_none=True),
        )
        if self.latency_target is not None and self.policy is not None:
            raise ValueError("latency_target and policy cannot both be set: pick one policy")
        for flag in ("early_timeout", "padded_cost"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.batch_cost is not None and not callable(self.batch_cost):
            raise TypeError(f"batch_cost must be a function of one input, got {self.batch_cost!r}")
        fix(
            self,
            "max_batch_cost",
            check_positive("max_batch_cost", self.max_batch_cost, allow_none=True),
        )
        fix(
            self,
            "bucket_window",
            check_int("bucket_window", self.bucket_window, minimum=1, allow_none=True),
        )
        fix(self, "max_bypass", check_int("max_bypass", self.max_bypass, minimum=0))
        if self.batch_cost is None:
            for name in ("max_batch_cost", "bucket_window"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} needs batch_cost (the cost of one input)")
            if self.padded_cost:
                raise ValueError("padded_cost needs batch_cost (the cost of one input)")

    def _checked_sizes(self, sizes: object) -> tuple[int, ...]:
        if isinstance(sizes, str | bytes) or not hasattr(sizes, "__iter__"):
            raise TypeError(f"allowed_batch_sizes must be a sequence of ints, got {sizes!r}")
        checked = sorted({check_int("allowed_batch_sizes", n, minimum=1) for n in sizes})  # type: ignore[type-var]
        if not checked:
            raise ValueError("allowed_batch_sizes must hold at least one size, or be None")
        limit = self.make_policy().max_batch_size
        if checked[-1] != limit:
            raise ValueError(
                f"the largest of allowed_batch_sizes ({checked[-1]}) must equal max_batch_size "
                f"({limit}): set max_batch_size={checked[-1]}, or allow {limit}"
            )
        return tuple(cast(list[int], checked))

    def padded_size(self, rows: int) -> int:
        """The size a batch of ``rows`` rows runs at: the next allowed size (or ``rows``)."""
        sizes = self.allowed_batch_sizes
        if sizes is None:
            return rows
        for size in sizes:
            if size >= rows:
                return size
        return rows  # a custom policy's oversized batch runs as it is

    def replace(self, **changes: object) -> BatcherOptions:
        """A copy with ``changes`` applied (validated like the constructor)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown batcher option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def make_policy(self) -> BatchPolicy:
        """The policy these options describe."""
        if self.policy is not None:
            return self.policy
        if self.latency_target is not None:
            return LatencyTarget(self.latency_target, self.max_batch_size, self.max_batch_cost)
        return MaxSizeOrWait(self.max_batch_size, self.max_wait, self.max_batch_cost)


def options_from(options: BatcherOptions | None, changes: BatcherOptionsKw) -> BatcherOptions:
    """``options`` (or the defaults) with the keyword ``changes`` applied."""
    if options is None:
        if not changes:
            return _DEFAULTS
        try:
            return BatcherOptions(**changes)
        except TypeError as exc:
            if "unexpected keyword" in str(exc):
                return BatcherOptions().replace(**changes)  # names the unknown option
            raise
    if not isinstance(options, BatcherOptions):
        raise TypeError(f"options must be a batchio.BatcherOptions, got {options!r}")
    return options.replace(**changes) if changes else options


_DEFAULTS = BatcherOptions()
