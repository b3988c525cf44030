"""The batching policy: a pure, synchronous decision, with no event loop and no clock of its own.

The executor describes the queue to the policy as a :class:`QueueState` and carries out what the
policy answers: :class:`Dispatch` a batch now, or :class:`Wait` until a deadline or until enough rows
have arrived. Because the policy reads time only from the state it is given, it is tested with plain
numbers (see ``tests/test_policy.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from ._checks import check_int, check_seconds
from ._estimates import RunTimeModel

__all__ = [
    "BatchPolicy",
    "Dispatch",
    "LatencyTarget",
    "MaxSizeOrWait",
    "Plan",
    "QueueState",
    "Wait",
]

_INF: Final = float("inf")
_NEAR_CAPACITY: Final = 0.75  # the device's busy share, at full batches, above which to wait


@dataclass(frozen=True, slots=True)
class QueueState:
    """What the executor knows when it asks the policy what to do.

    Attributes:
        now: the event loop's monotonic clock (``loop.time()``), in seconds.
        queued_rows: rows waiting in the queue (a ``map`` request of k items counts k).
        oldest_enqueued_at: when the front request (the next to leave: the oldest, in arrival
            order) was submitted, or ``None`` if none is queued.
        free_slots: batches that may start now (``max_concurrent_batches`` minus those in flight).
        closing: the batcher no longer accepts requests and is draining its queue.
        queue_full: the queue holds ``max_queue_size`` rows (or requests wait for room), so the
            batch cannot grow by waiting.
        in_flight: batches running now.
        earliest_deadline: the deadline (``loop.time()``) of the front request, if it has one:
            the earliest of the top priority's (``oldest_enqueued_at`` is the front's too).
        queued_cost: the ``batch_cost`` of the queued rows (0.0 without a cost function).
        arrival_rate: rows (or cost, with a cost function) arriving per second, recently.
        model: the fitted run-time model, once a batch has finished (see
            :class:`~batchio.RunTimeModel`): seconds a batch keeps the bottleneck busy (the
            device stage's thread, for :class:`~batchio.Stages`; the worker thread for a sync
            ``fn``).
        pending_batches: dispatched batches whose device job has not started yet (staged
            batchers; 0 otherwise): they are being prepared, or wait for the device.
        device_free_at: when the device is predicted to finish the batch it runs (``None``:
            idle, or not a staged batcher).
        lead_time: recent seconds from a staged batch's dispatch to its device job's start
            (preparation); 0.0 otherwise.
        recent_latency: the recent (exponentially weighted) latency of the slowest request of
            each batch: its queue wait plus its batch's dispatch-to-delivery time.
    """

    now: float
    queued_rows: int
    oldest_enqueued_at: float | None
    free_slots: int
    closing: bool
    queue_full: bool = False
    in_flight: int = 0
    earliest_deadline: float | None = None
    queued_cost: float = 0.0
    arrival_rate: float = 0.0
    model: RunTimeModel | None = None
    pending_batches: int = 0
    device_free_at: float | None = None
    lead_time: float = 0.0
    recent_latency: float = 0.0


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Start a batch now with at most ``rows`` rows (and at most ``max_cost`` of ``batch_cost``,
    if set), taken from the front of the queue; ``reason`` says why, for the statistics."""

    rows: int
    max_cost: float | None = None
    reason: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait for something to change before asking again.

    The executor is woken at ``deadline`` (a ``loop.time()`` value; ``None`` for no timer), when
    the queue reaches ``wake_at_rows`` rows (``None``: arrivals do not wake it) or
    ``wake_at_cost`` of cost, when a batch finishes, or when the batcher closes.
    """

    deadline: float | None
    wake_at_rows: int | None
    wake_at_cost: float | None = None


@runtime_checkable
class BatchPolicy(Protocol):
    """Decides, from a :class:`QueueState`, whether to start a batch or to wait.

    Implementations must be pure and cheap: the executor calls ``decide`` once per batch and once
    per wake-up, never per request. It is not asked while nothing is queued: the executor then
    waits for an arrival (there is nothing to decide).
    """

    @property
    def max_batch_size(self) -> int:
        """The most rows a batch may hold."""
        ...

    def decide(self, state: QueueState) -> Dispatch | Wait:
        """Return what the executor should do now."""
        ...


@dataclass(frozen=True, slots=True)
class MaxSizeOrWait:
    """The default policy: dispatch when a full batch is queued, or when the oldest queued row has
    waited ``max_wait`` seconds, whichever comes first.

    A batch is also full when the queued rows' cost reaches ``max_batch_cost`` (with a
    ``batch_cost``). While every batch slot is busy it waits for a batch to finish, and the next
    batch then forms from the backlog at once. While closing, or when the queue is full
    (``max_queue_size``), it dispatches whatever is queued without waiting.
    """

    max_batch_size: int
    max_wait: float
    max_batch_cost: float | None = None

    def __post_init__(self) -> None:
        fix = object.__setattr__
        fix(self, "max_batch_size", check_int("max_batch_size", self.max_batch_size, minimum=1))
        fix(self, "max_wait", check_seconds("max_wait", self.max_wait, allow_zero=True))

    def decide(self, state: QueueState) -> Dispatch | Wait:
        """Dispatch a full or overdue batch; otherwise say when to look again."""
        if state.free_slots <= 0:
            return Wait(deadline=None, wake_at_rows=None)
        if state.queued_rows <= 0 or state.oldest_enqueued_at is None:
            return Wait(deadline=None, wake_at_rows=1)
        rows = min(state.queued_rows, self.max_batch_size)
        budget = self.max_batch_cost
        if state.closing:
            return Dispatch(rows, budget, "closing")
        if state.queue_full:
            return Dispatch(rows, budget, "queue full")
        if state.queued_rows >= self.max_batch_size or (
            budget is not None and state.queued_cost >= budget
        ):
            return Dispatch(rows, budget, "full")
        deadline = state.oldest_enqueued_at + self.max_wait
        if state.now >= deadline:
            return Dispatch(rows, budget, "max_wait")
        return Wait(deadline=deadline, wake_at_rows=self.max_batch_size, wake_at_cost=budget)


@dataclass(frozen=True, slots=True)
class Plan:
    """What :class:`LatencyTarget` makes of a :class:`QueueState` (in the model's unit: rows,
    or cost with a ``batch_cost``).

    Attributes:
        cap: the largest batch predicted to run within half the latency target (never less
            than one row), or, when the arrivals need larger batches to keep up, that larger
            size; ``max_batch_size`` / ``max_batch_cost`` bound it.
        target: the batch size that keeps up with the arrivals, with headroom: while a batch
            is in flight, the next one waits for this much (or for ``latest``).
        latest: when the next batch must start for the most urgent queued request to finish
            within the target (or its deadline); ``None`` with nothing queued.
        behind: requests miss the target (the recent latency is over it, or the oldest queued
            request has waited half of it): the backlog is cleared with the largest batches
            allowed (``cap`` and ``target`` are the ceiling).
    """

    cap: float
    target: float
    latest: float | None
    behind: bool = False


@dataclass(frozen=True, slots=True)
class LatencyTarget:
    """The adaptive policy: keep queue wait plus run time under ``latency_target`` (at the p99)
    while the load allows it, with batches as large as the load needs and no larger.

    It reads the fitted :class:`~batchio.RunTimeModel` and the arrival rate from the
    :class:`QueueState` (the executor learns both), and decides, in this order:

    1. no free batch slot: wait for one; nothing queued: wait for an arrival;
    2. closing, or the queue full: dispatch;
    3. a full batch queued (``cap``: the largest batch predicted to run within half the target,
       or larger when the arrival rate needs larger batches to keep up, bounded by
       ``max_batch_size`` and ``max_batch_cost``): dispatch it;
    4. no batch in flight (the device is idle): dispatch what is queued at once, since waiting
       would only add latency; so a lone request costs about a direct call. Except near
       capacity (arrivals would keep the device busy 75 % of the time even at ``cap``-sized
       batches): then wait for ``target`` rows, or until ``latest``, since a small batch there
       pays a whole batch's overhead and leaves less headroom for the next;
    5. otherwise (a batch is running and a slot is free), for :class:`~batchio.Stages`: while
       another batch is being prepared for the device, wait; else dispatch *just in time*, when
       the device is predicted to free up less the recent preparation time (``lead_time``),
       or at ``latest`` (when the most urgent request must start to finish within half the
       target, or before its own deadline), whichever is first. So the next batch holds every
       row that arrived while the device worked, and the device does not idle;
    6. without a view of the device (an ``async def fn`` running several batches at once):
       wait until ``target`` is queued (the size at which batches keep up with the arrivals,
       times ``headroom``) or until ``latest``, then dispatch.

    Under light load it behaves like ``max_wait=0``; as load rises, work queued while the device
    is busy forms larger batches, up to ``cap``. Half the target is left for queueing: a request
    waits for the batch ahead of it and then its own, each predicted within half of it.
    """

    latency_target: float
    max_batch_size: int
    max_batch_cost: float | None = None
    headroom: float = 1.25

    def __post_init__(self) -> None:
        fix = object.__setattr__
        fix(self, "latency_target", check_seconds("latency_target", self.latency_target))
        fix(self, "max_batch_size", check_int("max_batch_size", self.max_batch_size, minimum=1))

    def plan(self, state: QueueState) -> Plan:
        """The cap, the target size and the latest start the decision is made from."""
        m = state.model
        by_cost = m is not None and m.unit == "cost"
        ceiling = (
            (self.max_batch_cost if self.max_batch_cost is not None else _INF)
            if by_cost
            else float(self.max_batch_size)
        )
        half = self.latency_target / 2
        due: float | None = None
        if state.oldest_enqueued_at is not None:
            due = state.oldest_enqueued_at + half
            if state.earliest_deadline is not None:
                due = min(due, state.earliest_deadline)
        if m is None:  # nothing learned yet: no size to aim at, only the time left
            return Plan(ceiling, ceiling, due)
        behind = state.recent_latency > self.latency_target or (
            state.oldest_enqueued_at is not None and state.now - state.oldest_enqueued_at >= half
        )
        cap = min(ceiling, max(m.largest_within(half), 1.0))  # a lone row always runs
        target = 1.0  # no arrivals seen lately: no company to wait for
        rate = state.arrival_rate
        if rate > 0:
            if rate * m.slope < 1:
                # Batches of n keep up when n / (a + b n) >= rate: n >= rate a / (1 - rate b).
                need = rate * m.intercept / (1 - rate * m.slope)
            else:
                need = _INF  # no batch size keeps up: the largest allowed
            # Arrivals that need larger batches than the target allows get them: a queue that
            # grows without bound is later for everyone.
            cap = min(ceiling, max(cap, need))
            target = min(cap, max(1.0, need * self.headroom))
        if behind:
            # Requests miss the target already (recently, or the oldest queued one has spent its
            # queueing half): the load is past what the target allows, and the largest batches
            # clear the backlog soonest (one batch of n finishes its last row before several
            # smaller ones would) and serve the most per second. This also keeps a closed loop
            # of many clients at full batches.
            cap = target = ceiling
        latest = None if due is None else due - state.lead_time - m.predict(target)
        return Plan(cap, target, latest, behind)

    def decide(self, state: QueueState) -> Dispatch | Wait:
        """Dispatch now, or wait for company while the most urgent request can afford it."""
        if state.free_slots <= 0:
            return Wait(deadline=None, wake_at_rows=None)
        if state.queued_rows <= 0 or state.oldest_enqueued_at is None:
            return Wait(deadline=None, wake_at_rows=1)
        plan = self.plan(state)
        m = state.model
        by_cost = m is not None and m.unit == "cost"
        rows = min(state.queued_rows, self.max_batch_size)
        if by_cost:
            max_cost: float | None = plan.cap if math.isfinite(plan.cap) else None
            queued = state.queued_cost
        else:
            max_cost = self.max_batch_cost
            rows = max(1, min(rows, int(plan.cap)))
            queued = float(state.queued_rows)
        if state.closing:
            return Dispatch(rows, max_cost, "closing")
        if state.queue_full:
            return Dispatch(rows, max_cost, "queue full")
        if queued >= plan.cap:
            return Dispatch(rows, max_cost, "full")
        assert plan.latest is not None
        if state.in_flight == 0:
            if m is not None and not plan.behind and queued < plan.target:
                # Near capacity (full batches would keep the device busy most of the time), a
                # batch of the few rows that came in meanwhile pays the whole per-batch cost
                # and leaves less headroom for the next: wait for the keep-up size instead,
                # within the time the target leaves.
                busy = state.arrival_rate * m.predict(plan.cap) / plan.cap
                if busy >= _NEAR_CAPACITY:
                    if state.now >= plan.latest:
                        return Dispatch(rows, max_cost, "latency target")
                    return Wait(
                        deadline=plan.latest,
                        wake_at_rows=None if by_cost else math.ceil(plan.target),
                        wake_at_cost=plan.target if by_cost else None,
                    )
            return Dispatch(rows, max_cost, "idle")
        full_rows = None if by_cost else math.ceil(plan.cap)
        full_cost = plan.cap if by_cost and math.isfinite(plan.cap) else None
        if state.pending_batches > 0:
            # A batch is being prepared for the device already: another would queue behind it.
            # Wait for it to reach the device (the executor is woken), for a full batch, or
            # until the most urgent request must start.
            if state.now >= plan.latest:
                return Dispatch(rows, max_cost, "latency target")
            return Wait(deadline=plan.latest, wake_at_rows=full_rows, wake_at_cost=full_cost)
        if m is None:
            return Dispatch(rows, max_cost, "no model yet")
        if state.device_free_at is not None:
            # Just in time: form the next batch as late as it can be prepared before the device
            # frees, so it holds every row that arrived meanwhile and the device never idles.
            start = state.device_free_at - state.lead_time
            if not plan.behind:  # (behind, the target is lost: only keeping up counts)
                start = min(start, plan.latest)
            if state.now >= start:
                reason = "latency target" if start == plan.latest else "device free soon"
                return Dispatch(rows, max_cost, reason)
            return Wait(deadline=start, wake_at_rows=full_rows, wake_at_cost=full_cost)
        # No view of the device (an async fn running several batches at once): wait for the
        # size that keeps up with the arrivals, or until the most urgent request must start.
        if queued >= plan.target:
            return Dispatch(rows, max_cost, "target size")
        if state.now >= plan.latest:
            return Dispatch(rows, max_cost, "latency target")
        return Wait(
            deadline=plan.latest,
            wake_at_rows=None if by_cost else math.ceil(plan.target),
            wake_at_cost=plan.target if by_cost and math.isfinite(plan.target) else None,
        )
