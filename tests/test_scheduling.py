"""Scheduling through a real Batcher: priorities, deadline order, cost budgets, bucketing, shedding,
early time-outs, the adaptive policy and its statistics, and live reconfiguration of it.

The policy's own decisions and the waiting room's invariants are property-tested in
``test_scheduling_properties.py``; the controller's convergence is simulated on a fake clock here
(:func:`simulate`), with no event loop at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections import deque
from typing import Any

import pytest

from batchio import (
    Batcher,
    Dispatch,
    LatencyTarget,
    MaxSizeOrWait,
    QueueFullError,
    QueueState,
    RequestShedError,
    RequestTimeoutError,
    Wait,
)
from batchio._estimates import RateMeter, RunTimeLearner
from batchio.testing import GatedBatchFn, VirtualClock, wait_all_tasks_blocked

pytestmark = pytest.mark.anyio


def ident(x: Any) -> Any:
    return x


async def queue_behind_a_gate(
    fn: GatedBatchFn[Any, Any], b: Batcher[Any, Any]
) -> asyncio.Future[Any]:
    """Occupy the batcher with one gated batch, so that what is submitted next queues."""
    first = asyncio.ensure_future(b("gate"))
    await fn.wait_entered(1)
    return first


async def test_higher_priority_is_served_first_then_arrival_order() -> None:
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    async with Batcher(fn, max_batch_size=2, max_wait=0) as b:
        first = await queue_behind_a_gate(fn, b)
        calls = [
            asyncio.ensure_future(b("a")),
            asyncio.ensure_future(b("hi1", priority=5)),
            asyncio.ensure_future(b("low", priority=-1)),
            asyncio.ensure_future(b("hi2", priority=5)),
            asyncio.ensure_future(b("b")),
        ]
        await wait_all_tasks_blocked()
        fn.open()
        assert await first == "gate"
        assert [await c for c in calls] == ["a", "hi1", "low", "hi2", "b"]
    assert fn.batches == [["gate"], ["hi1", "hi2"], ["a", "b"], ["low"]]


async def test_within_a_priority_the_earliest_deadline_goes_first() -> None:
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    async with Batcher(fn, max_batch_size=1, max_wait=0) as b:
        first = await queue_behind_a_gate(fn, b)
        calls = [
            asyncio.ensure_future(b("none")),
            asyncio.ensure_future(b("t30", timeout=30)),
            asyncio.ensure_future(b("t10", timeout=10)),
            asyncio.ensure_future(b("t20", timeout=20)),
            asyncio.ensure_future(b("urgent-none", priority=1)),
        ]
        await wait_all_tasks_blocked()
        fn.open()
        await first
        await asyncio.gather(*calls)
    assert [batch[0] for batch in fn.batches[1:]] == ["urgent-none", "t10", "t20", "t30", "none"]


async def test_map_requests_rank_by_priority_and_stay_whole() -> None:
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    async with Batcher(fn, max_batch_size=3, max_wait=0) as b:
        first = await queue_behind_a_gate(fn, b)
        low = asyncio.ensure_future(b.map(["l1", "l2"]))
        high = asyncio.ensure_future(b.map(["h1", "h2", "h3", "h4"], priority=2))
        nowait = b.map_nowait(["n1"], priority=1)
        single = b.submit_nowait("s", priority=1)
        await wait_all_tasks_blocked()
        fn.open()
        await first
        assert await high == ["h1", "h2", "h3", "h4"]
        assert await low == ["l1", "l2"]
        assert await nowait == ["n1"]
        assert await single == "s"
    assert fn.batches[1:] == [["h1", "h2", "h3"], ["h4", "n1", "s"], ["l1", "l2"]]


@pytest.mark.parametrize("bad", ["high", 1.5, True, None])
async def test_a_priority_that_is_not_an_int_is_refused_at_the_call(bad: Any) -> None:
    async with Batcher(lambda xs: xs, max_batch_size=2) as b:
        with pytest.raises(TypeError, match="priority must be an int"):
            await b(1, priority=bad)
        assert await b(2, priority=3) == 2  # the batcher is fine
        assert b.statistics().submitted == 1


async def test_a_cost_budget_stops_a_batch_before_the_row_over_it() -> None:
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    async with Batcher(fn, max_batch_size=8, max_wait=0, batch_cost=len, max_batch_cost=10) as b:
        first = await queue_behind_a_gate(fn, b)
        items = ["aaaa", "bbbb", "cccc", "x" * 20, "d", "e"]
        calls = [asyncio.ensure_future(b(s)) for s in items]
        await wait_all_tasks_blocked()
        fn.open()
        await first
        assert [await c for c in calls] == items
    # 4+4 fits, +4 would be 12; the 20 runs alone (over budget by itself); then 1+1.
    assert fn.batches[1:] == [["aaaa", "bbbb"], ["cccc"], ["x" * 20], ["d", "e"]]


async def test_a_padded_cost_counts_the_longest_row_times_the_rows() -> None:
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    async with Batcher(
        fn, max_batch_size=8, max_wait=0, batch_cost=len, max_batch_cost=12, padded_cost=True
    ) as b:
        first = await queue_behind_a_gate(fn, b)
        items = ["a", "bb", "c", "dddddd", "e", "f"]
        calls = [asyncio.ensure_future(b(s)) for s in items]
        await wait_all_tasks_blocked()
        fn.open()
        await first
        await asyncio.gather(*calls)
    # 2 x 3 = 6 fits, then 6 x 4 = 24 does not; 6 x 2 = 12 fits, 6 x 3 = 18 does not.
    assert fn.batches[1:] == [["a", "bb", "c"], ["dddddd", "e"], ["f"]]
    assert b.statistics().scheduler is not None


async def test_bucketing_groups_similar_costs_and_holds_its_bypass_bound() -> None:
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    async with Batcher(
        fn,
        max_batch_size=2,
        max_wait=0,
        batch_cost=len,
        padded_cost=True,
        bucket_window=8,
        max_bypass=1,
    ) as b:
        first = await queue_behind_a_gate(fn, b)
        items = ["s1", "long-one", "s2", "long-two", "s3", "s4"]
        calls = [asyncio.ensure_future(b(s)) for s in items]
        await wait_all_tasks_blocked()
        fn.open()
        await first
        assert [await c for c in calls] == items
    # The front request leads each batch and takes the closest cost; "long-one" is passed over
    # once (max_bypass=1), then nothing ranked after it is taken until it is.
    assert fn.batches[1:] == [["s1", "s2"], ["long-one", "long-two"], ["s3", "s4"]]


async def test_a_failing_cost_function_fails_that_call_alone() -> None:
    def cost(x: Any) -> float:
        if x == "boom":
            raise ValueError("no cost for boom")
        return -1.0 if x == "neg" else len(x)

    async with Batcher(lambda xs: xs, max_batch_size=4, batch_cost=cost) as b:
        with pytest.raises(ValueError, match="no cost for boom"):
            await b("boom")
        with pytest.raises(ValueError, match="batch_cost must return a finite number >= 0"):
            await b("neg")
        with pytest.raises(ValueError, match="no cost for boom"):
            await b.map(["ok", "boom"])
        assert await b("fine") == "fine"
        stats = b.statistics()
    assert stats.submitted == stats.completed == 1
    assert stats.healthy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_cost": 10}, "max_batch_cost needs batch_cost"),
        ({"bucket_window": 4}, "bucket_window needs batch_cost"),
        ({"padded_cost": True}, "padded_cost needs batch_cost"),
        ({"latency_target": 0.1, "policy": MaxSizeOrWait(4, 0.0)}, "cannot both be set"),
        ({"latency_target": 0}, "latency_target"),
        ({"batch_cost": len, "max_batch_cost": -1}, "max_batch_cost"),
    ],
)
def test_scheduling_options_are_validated_at_construction(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Batcher(lambda xs: xs, **kwargs)


async def test_shedding_makes_room_for_a_higher_priority_request() -> None:
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    async with Batcher(fn, max_batch_size=4, max_wait=0, max_queue_size=2, when_full="shed") as b:
        first = await queue_behind_a_gate(fn, b)
        early = asyncio.ensure_future(b("early"))
        late = asyncio.ensure_future(b("late"))
        await wait_all_tasks_blocked()
        vip = asyncio.ensure_future(b("vip", priority=1))
        await wait_all_tasks_blocked()
        with pytest.raises(RequestShedError) as info:
            await late  # the lowest-ranked: same priority as "early", but later
        assert isinstance(info.value, QueueFullError)
        assert (info.value.priority, info.value.by_priority) == (0, 1)
        with pytest.raises(QueueFullError) as refused:
            await b("equal")  # nothing of lower priority is left to shed
        assert not isinstance(refused.value, RequestShedError)
        fn.open()
        assert (await first, await early, await vip) == ("gate", "early", "vip")
        stats = b.statistics()
    assert fn.batches[1:] == [["vip", "early"]]
    assert stats.scheduler is not None
    assert stats.scheduler.shed == 1
    assert stats.failed == 1
    assert stats.rejected == 1


class TestOnAVirtualClock:
    """Decisions that depend on time, on asyncio's loop with a virtual clock."""

    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, object]]:
        return ("asyncio", {})

    async def test_a_lone_request_is_dispatched_at_once_under_a_latency_target(self) -> None:
        clock = VirtualClock()
        with clock.install():
            fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident)
            async with Batcher(fn, max_batch_size=64, max_wait=10, latency_target=0.05) as b:
                assert await b(1) == 1  # no time passes: max_wait=10 is not used
                stats = b.statistics()
        assert stats.scheduler is not None
        assert stats.scheduler.policy == "LatencyTarget"
        assert stats.scheduler.last_reason == "idle"
        assert dict(stats.scheduler.dispatch_reasons) == {"idle": 1}

    async def test_early_timeout_fails_what_its_batch_would_finish_too_late(self) -> None:
        clock = VirtualClock()
        with clock.install():

            async def slow(xs: list[int]) -> list[int]:
                clock.advance(0.1 * len(xs))  # the batch "runs" 0.1 s per row
                return xs

            async with Batcher(slow, max_batch_size=1, max_wait=0, early_timeout=True) as b:
                assert [await b(i) for i in range(3)] == [0, 1, 2]  # the model learns 0.1 s/row
                model = b.statistics().scheduler.model  # type: ignore[union-attr]
                assert model is not None
                assert model.predict(1) == pytest.approx(0.1)
                with pytest.raises(RequestTimeoutError) as info:
                    await b(3, timeout=0.05)
                assert info.value.early
                assert not info.value.dispatched
                assert "predicted to finish after the deadline" in str(info.value)
                assert await b(4, timeout=0.5) == 4
                stats = b.statistics()
        assert stats.timed_out == 1
        assert stats.scheduler is not None
        assert stats.scheduler.early_timeouts == 1
        assert stats.rows == 4  # the hopeless request never reached the function

    async def test_a_staged_batcher_waits_while_a_batch_is_pending_for_the_device(self) -> None:
        import threading

        from batchio import Stages

        clock = VirtualClock()
        with clock.install():
            device_gate = threading.Event()

            def run(xs: list[int]) -> list[int]:
                if not device_gate.wait(30):
                    raise TimeoutError
                return xs

            stages: Stages[int, int] = Stages(
                prepare=ident, assemble=ident, run=run, finish=ident, prepare_workers=2
            )
            async with Batcher(stages, max_batch_size=8, latency_target=10.0) as b:
                first = asyncio.ensure_future(b.map([0]))  # idle: dispatched at once
                await wait_all_tasks_blocked()
                rest = [asyncio.ensure_future(b(i)) for i in range(1, 6)]
                await wait_all_tasks_blocked()
                device_gate.set()
                assert await first == [0]
                assert [await r for r in rest] == [1, 2, 3, 4, 5]
                stats = b.statistics()
        # No model yet and the first batch pending: the five queued rows waited for it to reach
        # the device, then went as one batch, not one each into the free slots.
        assert dict(stats.batch_size_histogram) == {1: 1, 5: 1}


async def test_reconfigure_switches_the_policy_live_and_back() -> None:
    async with Batcher(lambda xs: xs, max_batch_size=4, max_wait=0.001) as b:
        assert type(b.statistics().scheduler.policy) is str  # type: ignore[union-attr]
        b.reconfigure(latency_target=0.02)
        assert await b(1) == 1
        stats = b.statistics()
        assert stats.scheduler is not None
        assert (stats.scheduler.policy, stats.scheduler.latency_target) == ("LatencyTarget", 0.02)
        b.reconfigure(latency_target=None)
        assert await b(2) == 2
        assert b.statistics().scheduler.policy == "MaxSizeOrWait"  # type: ignore[union-attr]
        with pytest.raises(ValueError, match="cannot both be set"):
            b.reconfigure(latency_target=0.02, policy=MaxSizeOrWait(4, 0.0))
        with pytest.raises(TypeError, match="batch_cost"):
            b.reconfigure(batch_cost=len)  # type: ignore[call-arg]
        assert b.options.latency_target is None


# -- the controller on a simulated device, on a fake clock ------------------------------------------


def simulate(
    policy: Any, *, rate: float, a: float, b: float, requests: int, seed: int = 1
) -> tuple[list[float], list[int], RunTimeLearner]:
    """One device (one batch at a time) that takes ``a + b * rows`` seconds, Poisson arrivals at
    ``rate``; the policy decides at every arrival, completion and timer, as the executor does.
    Returns each request's latency, each batch's size, and the learner."""
    rng = random.Random(seed)
    arrivals: deque[float] = deque()
    t = 0.0
    for _ in range(requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    learner, meter = RunTimeLearner(), RateMeter()
    queue: deque[float] = deque()
    latencies: list[float] = []
    sizes: list[int] = []
    arrived = 0
    running: tuple[float, list[float]] | None = None  # (ends at, arrival times)
    timer: float | None = None
    recent = 0.0
    now = 0.0
    while arrivals or queue or running:
        events = [x for x in (arrivals[0] if arrivals else None, timer) if x is not None]
        if running is not None:
            events.append(running[0])
        now = min(events)
        if running is not None and running[0] <= now:
            ends, batch = running
            seconds = a + b * len(batch)
            learner.observe(len(batch), seconds)
            worst = max(ends - x for x in batch)
            recent = worst if len(sizes) == 1 else recent + 0.2 * (worst - recent)
            latencies.extend(ends - x for x in batch)
            running = None
        while arrivals and arrivals[0] <= now:
            queue.append(arrivals.popleft())
            arrived += 1
        if timer is not None and timer <= now:
            timer = None
        state = QueueState(
            now=now,
            queued_rows=len(queue),
            oldest_enqueued_at=queue[0] if queue else None,
            free_slots=0 if running else 1,
            closing=not arrivals,
            in_flight=1 if running else 0,
            arrival_rate=meter.sample(now, arrived),
            model=learner.model,
            recent_latency=recent,
        )
        decision = policy.decide(state)
        if isinstance(decision, Dispatch):
            batch = [queue.popleft() for _ in range(min(decision.rows, len(queue)))]
            sizes.append(len(batch))
            running = (now + a + b * len(batch), batch)
            timer = None
        elif decision.deadline is not None and decision.deadline > now:
            timer = decision.deadline
    return latencies, sizes, learner


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


A, B, MAX = 0.005, 0.0001, 64  # 5 ms a batch + 0.1 ms a row: 64 rows in 11.4 ms
CAPACITY = MAX / (A + B * MAX)


def test_the_controller_adds_nothing_at_idle_and_learns_the_device() -> None:
    policy = LatencyTarget(0.05, MAX)
    rate = 0.05 / (A + B)  # one request every 20 device-times: the device is mostly idle
    latencies, sizes, learner = simulate(policy, rate=rate, a=A, b=B, requests=2000)
    # A request finds the device idle: it runs at once, alone.
    assert p(latencies, 0.5) == pytest.approx(A + B, rel=1e-6)
    assert sum(sizes) / len(sizes) < 1.1
    static = MaxSizeOrWait(MAX, 0.005)
    static_latencies, _, _ = simulate(static, rate=rate, a=A, b=B, requests=2000)
    assert p(static_latencies, 0.5) > p(latencies, 0.5) + 0.004  # max_wait's 5 ms, paid
    model = learner.model
    assert model is not None
    assert model.predict(1) == pytest.approx(A + B, rel=0.01)


@pytest.mark.parametrize("load", [0.5, 0.8, 0.9])
def test_the_controller_grows_batches_with_load_and_holds_the_target(load: float) -> None:
    target = 0.05
    latencies, sizes, learner = simulate(
        LatencyTarget(target, MAX), rate=load * CAPACITY, a=A, b=B, requests=20000
    )
    assert p(latencies, 0.99) <= target
    assert sum(sizes) / len(sizes) > 1 + 10 * load  # batches grew with the load
    model = learner.model
    assert model is not None
    assert model.intercept == pytest.approx(A, rel=0.05)
    assert model.slope == pytest.approx(B, rel=0.05)


def test_past_saturation_the_controller_runs_the_largest_batches() -> None:
    _latencies, sizes, _ = simulate(
        LatencyTarget(0.05, MAX), rate=1.5 * CAPACITY, a=A, b=B, requests=20000
    )
    # Nothing keeps up: the controller sides with throughput, full batches.
    tail = sizes[len(sizes) // 2 :]
    assert sum(tail) / len(tail) > 0.95 * MAX


def test_a_tighter_target_caps_the_batch_size() -> None:
    # 2 ms a row, no batching gain to speak of: a 20 ms target allows ~5 rows within half of it.
    latencies, sizes, _ = simulate(
        LatencyTarget(0.02, MAX), rate=200, a=0.0005, b=0.002, requests=5000
    )
    assert max(sizes[len(sizes) // 10 :]) <= 6
    assert p(latencies, 0.99) <= 0.02


def test_the_controller_waits_for_company_only_while_the_device_is_busy() -> None:
    policy = LatencyTarget(0.05, MAX)
    from batchio import RunTimeModel

    model = RunTimeModel(A, B, samples=10)
    base: dict[str, Any] = {
        "queued_rows": 3,
        "oldest_enqueued_at": 0.0,
        "closing": False,
        "arrival_rate": 0.5 * CAPACITY,
        "model": model,
    }
    idle = policy.decide(QueueState(now=0.0, free_slots=2, in_flight=0, **base))
    assert isinstance(idle, Dispatch)
    assert idle.reason == "idle"
    # A staged device busy until t=0.01, preparation takes 2 ms: form the batch at 0.008.
    busy = policy.decide(
        QueueState(now=0.0, free_slots=1, in_flight=1, device_free_at=0.01, lead_time=0.002, **base)
    )
    assert isinstance(busy, Wait)
    assert busy.deadline == pytest.approx(0.008)
    due = policy.decide(
        QueueState(
            now=0.008, free_slots=1, in_flight=1, device_free_at=0.01, lead_time=0.002, **base
        )
    )
    assert isinstance(due, Dispatch)
    assert due.reason == "device free soon"
    pending = policy.decide(
        QueueState(
            now=0.0, free_slots=1, in_flight=2, pending_batches=1, device_free_at=0.01, **base
        )
    )
    assert isinstance(pending, Wait)
    assert pending.deadline == policy.plan(QueueState(now=0.0, free_slots=1, **base)).latest
    assert pending.wake_at_rows == MAX


async def test_the_decorator_takes_priorities_too() -> None:
    from batchio import batch

    seen: list[list[int]] = []

    @batch(max_batch_size=8, max_wait=0)
    def double(xs: list[int]) -> list[int]:
        seen.append(list(xs))
        return [2 * x for x in xs]

    try:
        assert await double(1, priority=4) == 2
        assert await double.map([2, 3], priority=-2) == [4, 6]
        assert await double.submit_nowait(4, priority=1) == 8
        assert await double.map_nowait([5], priority=1) == [10]
        with pytest.raises(TypeError, match="priority must be an int"):
            await double(6, priority="urgent")  # type: ignore[arg-type]
    finally:
        await double.aclose()
    assert sorted(x for b in seen for x in b) == [1, 2, 3, 4, 5]


def test_near_capacity_an_idle_device_waits_for_the_keep_up_size() -> None:
    from batchio import RunTimeModel

    policy = LatencyTarget(0.05, MAX)
    model = RunTimeModel(A, B, samples=10)
    near = QueueState(
        now=0.0,
        queued_rows=3,
        oldest_enqueued_at=0.0,
        free_slots=1,
        closing=False,
        arrival_rate=0.9 * CAPACITY,
        model=model,
    )
    plan = policy.plan(near)
    decision = policy.decide(near)
    assert isinstance(decision, Wait)  # 3 rows would pay a whole batch's 5 ms for little
    assert decision.deadline == plan.latest
    assert decision.wake_at_rows == math.ceil(plan.target)
    assert plan.target > 3
    light = policy.decide(dataclasses.replace(near, arrival_rate=0.3 * CAPACITY))
    assert isinstance(light, Dispatch)
    assert light.reason == "idle"
