"""Adversarial review of the scheduling features (issue 9): each test here pins one defect found in
the ranked waiting room, early time-outs, the run-time learner or live reconfiguration.

Every test is deterministic: gated fakes, ``batchio.testing.VirtualClock`` for anything timed, and
waits that end in a failure rather than a hang.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import types
import weakref
from typing import Any

import pytest

from batchio import (
    Batcher,
    Dispatch,
    QueueFullError,
    QueueState,
    RequestTimeoutError,
    Stages,
    Wait,
)
from batchio.testing import GatedBatchFn, VirtualClock, wait_all_tasks_blocked

from .conftest import GATE_TIMEOUT, wait_event

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def ident(x: Any) -> Any:
    return x


# -- reconfigure: a lowered queue bound and the requests already parked for room --------------------


async def _park_a_map_then_lower_the_bound(
    fn: GatedBatchFn[Any, Any], b: Batcher[Any, Any]
) -> tuple[asyncio.Future[Any], ...]:
    first = asyncio.ensure_future(b("gate"))
    await fn.wait_entered(1)  # ["gate"] runs; what follows queues
    queued = asyncio.ensure_future(b.map([1, 2, 3, 4]))  # 4 rows: the queue is full
    parked = asyncio.ensure_future(b.map([5, 6, 7]))  # 3 more rows: parked for room
    behind = asyncio.ensure_future(b(8))  # one row, parked behind it (first come first served)
    await wait_all_tasks_blocked()
    assert b.statistics().queue_depth == 8
    b.reconfigure(max_queue_size=2)  # smaller than the parked map, not than the row behind it
    return first, queued, parked, behind


async def test_a_parked_map_larger_than_a_lowered_queue_bound_still_resolves() -> None:
    """A request parked for room (``when_full="wait"``) that is larger than a bound lowered by
    ``reconfigure`` must not wait forever once the queue has emptied: it is admitted (the queue is
    empty) or refused with ``QueueFullError``. Today it stays parked for good, and so does every
    request parked behind it, however small (admission is first come first served)."""
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    b = Batcher(fn, max_batch_size=4, max_wait=0, max_queue_size=4, when_full="wait")
    await b.__aenter__()
    try:
        first, queued, parked, behind = await _park_a_map_then_lower_the_bound(fn, b)
        fn.open()
        assert await first == "gate"
        assert await queued == [1, 2, 3, 4]
        await wait_all_tasks_blocked()  # the queue has emptied: today nothing changes after this
        assert parked.done(), "the parked map waits forever on an empty, idle batcher"
        if parked.exception() is not None:
            assert isinstance(parked.exception(), QueueFullError)
        # The one-row request parked behind it fits the new bound: it must run.
        assert await asyncio.wait_for(behind, 5) == 8
    finally:
        await b.aclose(timeout=0)


async def test_closing_with_a_parked_map_larger_than_a_lowered_bound_does_not_hang() -> None:
    """``aclose()`` drains the queue and the parked requests; with the parked map above the lowered
    bound the executor waits for an arrival that cannot come, so ``aclose()`` never returns."""
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    b = Batcher(fn, max_batch_size=4, max_wait=0, max_queue_size=4, when_full="wait")
    await b.__aenter__()
    calls = await _park_a_map_then_lower_the_bound(fn, b)
    fn.open()
    try:
        await asyncio.wait_for(b.aclose(), 5)
    except TimeoutError:
        pytest.fail("aclose() hung on a request parked above the lowered queue bound")
    finally:
        await b.aclose(timeout=0)
        await asyncio.gather(*calls, return_exceptions=True)


async def test_lowering_the_bound_of_a_shedding_queue_does_not_shed_the_queue_for_one_call() -> (
    None
):
    """docs: a smaller ``max_queue_size`` "keeps every queued request and refuses (or parks) new
    ones until the queue is under it"; shedding fails "just enough to make room". With
    ``when_full="shed"`` the room needed is measured against the new bound, so the first
    higher-priority call after the bound is lowered from 6 to 2 sheds five queued requests to
    admit one row."""
    fn: GatedBatchFn[Any, Any] = GatedBatchFn(ident, gated=True)
    async with Batcher(fn, max_batch_size=8, max_wait=0, max_queue_size=6, when_full="shed") as b:
        first = asyncio.ensure_future(b("gate"))
        await fn.wait_entered(1)
        queued = [asyncio.ensure_future(b(i)) for i in range(6)]  # the queue is full
        await wait_all_tasks_blocked()
        b.reconfigure(max_queue_size=2)
        vip = asyncio.ensure_future(b("vip", priority=1))
        await wait_all_tasks_blocked()
        stats = b.statistics()
        fn.open()
        outcomes = await asyncio.gather(first, *queued, vip, return_exceptions=True)
    assert stats.scheduler is not None
    assert stats.scheduler.shed <= 1, outcomes  # one row in, at most one row out


class PacedPolicy:
    """A custom policy that dispatches at most once an hour (a rate limiter): between dispatches
    it waits on the clock alone, ``Wait(deadline, wake_at_rows=None)`` ("None: arrivals do not
    wake it"). It notices being asked again and again with nothing changed, and then dispatches,
    so that a spinning executor ends instead of freezing the test's event loop."""

    max_batch_size = 8

    def __init__(self) -> None:
        self.last: float | None = None
        self.asked_in_a_row = 0
        self.spun = False

    def decide(self, state: QueueState) -> Dispatch | Wait:
        if state.free_slots <= 0:
            return Wait(deadline=None, wake_at_rows=None)
        if state.queued_rows <= 0:
            return Wait(deadline=None, wake_at_rows=1)
        self.asked_in_a_row += 1
        if self.asked_in_a_row > 1000:
            self.spun = True  # the executor asked 1000 times without waiting in between
        if state.closing or self.last is None or self.spun:
            self.last, self.asked_in_a_row = state.now, 0
            return Dispatch(self.max_batch_size)
        return Wait(deadline=self.last + HOUR, wake_at_rows=None)


async def test_a_policy_waiting_on_the_clock_at_a_full_queue_does_not_spin_the_executor() -> None:
    """(A regression of ce8456b, "waiting on cost or time wakes at a full queue".) The executor
    now turns ``Wait(deadline=..., wake_at_rows=None)`` into a wake-up at ``max_queue_size``
    rows; at a queue already full, ``room.wake_at`` fires at once, ``await waiter`` returns
    without yielding, and the executor asks the policy again, for ever, inside one step of the
    event loop: the loop is frozen (no timer, no other task, no deadline runs again)."""
    policy = PacedPolicy()
    async with Batcher(ident, policy=policy, max_queue_size=2) as b:
        assert await b(0) == 0  # dispatched at once; the next batch may go in an hour
        calls = [b.submit_nowait(i) for i in (1, 2)]  # the queue is full
        await wait_all_tasks_blocked()
        spun = policy.spun
        b.reconfigure(policy=None, max_wait=0)
        assert await asyncio.gather(*calls) == [1, 2]
    assert not spun, "the executor asked the policy 1000 times in a row without waiting"


# -- heap mode: what the ranked queue keeps alive while a low-priority request waits ----------------


class Item:
    """An input that can be watched with a weak reference."""

    __slots__ = ("__weakref__", "n")

    def __init__(self, n: int) -> None:
        self.n = n


async def _inputs_kept_alive_while_low_priority_waits(high_timeout: float | None) -> list[int]:
    """Run 20 priority-0 requests (one per batch) past a queued priority -1 request, and return
    which of their inputs are still alive once they all completed, while the low one still waits."""
    entered_gate, release_gate = threading.Event(), threading.Event()
    entered_block, release_block = threading.Event(), threading.Event()

    def fn(xs: list[Any]) -> list[Any]:
        for x in xs:
            if x == "gate":
                entered_gate.set()
                release_gate.wait(GATE_TIMEOUT)
            elif x == "block":
                entered_block.set()
                release_block.wait(GATE_TIMEOUT)
        return [x.n if isinstance(x, Item) else x for x in xs]

    async with Batcher(fn, max_batch_size=1, max_wait=0) as b:
        first = b.submit_nowait("gate")
        await wait_event(entered_gate)
        low = b.submit_nowait("low", priority=-1, timeout=None if high_timeout is None else HOUR)
        refs: list[weakref.ref[Item]] = []
        highs: list[asyncio.Future[Any]] = []
        for i in range(20):
            item = Item(i)
            refs.append(weakref.ref(item))
            highs.append(b.submit_nowait(item, timeout=high_timeout))
        del item
        blocker = b.submit_nowait("block")  # ranks before "low": it keeps "low" queued
        release_gate.set()
        assert await asyncio.gather(*highs) == list(range(20))
        del highs
        await wait_event(entered_block)
        await wait_all_tasks_blocked()
        gc.collect()
        alive = [i for i, ref in enumerate(refs) if ref() is not None]
        assert not low.done()  # it is still queued
        release_block.set()
        assert (await first, await blocker, await low) == ("gate", "block", "low")
    return alive


async def test_completed_requests_are_not_kept_alive_while_a_low_priority_one_waits() -> None:
    """In heap mode the waiting room keeps ``_arrivals`` (every entry in arrival order) and prunes
    it only from the front: while one old low-priority request waits, every request that arrived
    after it and has long completed stays referenced, with its input. Memory grows with the
    traffic for as long as the low-priority request starves (without a timeout, for ever)."""
    alive = await _inputs_kept_alive_while_low_priority_waits(high_timeout=None)
    assert alive == []


async def test_completed_requests_with_deadlines_are_not_kept_alive_by_the_deadline_heap() -> None:
    """The same with deadlines: ``_deadlines`` is pruned only at its top, so a queued request with
    the earliest deadline keeps every later-deadline request that completed meanwhile (and its
    input) alive until that request leaves."""
    alive = await _inputs_kept_alive_while_low_priority_waits(high_timeout=2 * HOUR)
    assert alive == []


# -- early time-outs and the run-time model, on a virtual clock --------------------------------------


class TestOnAVirtualClock:
    """Decisions that depend on time, on asyncio's own loop (uvloop's clock cannot be driven)."""

    @pytest.fixture
    def anyio_backend(self) -> tuple[str, dict[str, object]]:
        return ("asyncio", {})

    async def test_early_timeout_judges_the_batch_formed_not_the_whole_queued_cost(self) -> None:
        """With a ``batch_cost``, the early time-out predicts the run time of
        ``min(queued_cost, max_cost)``: the cost of the *whole queue*, not of the batch being
        formed (one row here, ``max_batch_size=1``). A request at the front whose batch would
        finish in 0.1 s, well before its 0.5 s deadline, is failed early because eleven rows are
        queued."""
        clock = VirtualClock()
        with clock.install():
            gate = asyncio.Event()

            async def slow(xs: list[str]) -> list[str]:
                if "gate" in xs:
                    await gate.wait()
                clock.advance(0.1 * len(xs))  # 0.1 s per row (every row costs 1)
                return xs

            async with Batcher(
                slow,
                max_batch_size=1,
                max_wait=0,
                early_timeout=True,
                batch_cost=lambda x: 1.0,
            ) as b:
                for i in range(3):
                    assert await b(f"warm{i}") == f"warm{i}"  # the model: 0.1 s per unit of cost
                first = asyncio.ensure_future(b("gate"))
                await wait_all_tasks_blocked()
                others = [asyncio.ensure_future(b(f"o{i}")) for i in range(10)]
                urgent = asyncio.ensure_future(b("urgent", timeout=0.5))  # ranks first (EDF)
                await wait_all_tasks_blocked()
                gate.set()
                assert await first == "gate"
                # It runs next, alone: done 0.2 s after its call, 0.3 s before its deadline.
                assert await urgent == "urgent"
                await asyncio.gather(*others)

    async def test_early_timeout_does_not_fail_a_request_that_alone_would_finish_in_time(
        self,
    ) -> None:
        """Two queued requests, each with 0.25 s left; one row takes 0.1 s. The early time-out
        predicts the run time of the two-row batch the policy asked for (0.2 s from ``now`` =
        0.1 s: past both deadlines) and fails both, so the batch formed is empty. Cutting the
        batch after the first would have served it (done at 0.2 s < 0.25 s): the rows went to no
        one, the opposite of "the rows go to requests that can still use them"."""
        clock = VirtualClock()
        with clock.install():
            gate = asyncio.Event()

            async def slow(xs: list[Any]) -> list[Any]:
                if "gate" in xs:
                    await gate.wait()
                clock.advance(0.1 * len(xs))
                return xs

            async with Batcher(slow, max_batch_size=8, max_wait=0, early_timeout=True) as b:
                for i in range(3):
                    assert await b(i) == i  # the model: 0.1 s per row
                first = asyncio.ensure_future(b("gate"))
                await wait_all_tasks_blocked()
                a = asyncio.ensure_future(b("a", timeout=0.25))
                c = asyncio.ensure_future(b("c", timeout=0.25))
                await wait_all_tasks_blocked()
                gate.set()
                assert await first == "gate"
                results = await asyncio.gather(a, c, return_exceptions=True)
                stats = b.statistics()
        assert results[0] == "a", results
        assert stats.rows == 5  # warm-up 3, gate 1, "a" 1

    async def test_an_early_time_out_of_a_split_map_reports_it_was_never_dispatched(
        self,
    ) -> None:
        """docs: an early time-out has ``early=True`` and ``dispatched=False``, and "never takes a
        slot in a batch whose result would come too late". A ``map`` split across batches is
        judged one batch at a time: its first two rows run (0.2 s, within its 0.25 s), then its
        last row is predicted to end at 0.3 s and the whole request is failed early, with
        ``dispatched=True``, after its first rows took a batch's slots for nothing."""
        clock = VirtualClock()
        with clock.install():

            async def slow(xs: list[int]) -> list[int]:
                clock.advance(0.1 * len(xs))
                return xs

            async with Batcher(slow, max_batch_size=2, max_wait=0, early_timeout=True) as b:
                for i in range(3):
                    assert await b(i) == i  # the model: 0.1 s per row
                with pytest.raises(RequestTimeoutError) as info:
                    await b.map([10, 11, 12], timeout=0.25)
                stats = b.statistics()
        assert info.value.early
        assert not info.value.dispatched
        assert stats.rows == 3  # none of the hopeless map's rows reached the function

    async def test_a_staged_batch_that_never_reached_the_device_teaches_no_device_time(
        self,
    ) -> None:
        """The run-time model is "the seconds a batch keeps the bottleneck busy", the device
        stage's thread for ``Stages``. A batch whose every row failed in ``prepare`` never reaches
        the device, yet ``_run_batch`` feeds the learner its dispatch-to-delivery time (1 s of
        preparation here) as device time. The device is instantaneous, but the next request, with
        0.5 s to spare, is failed early as if it would take 1 s."""
        clock = VirtualClock()
        with clock.install():

            def prepare(xs: list[str]) -> list[Any]:
                if "bad" in xs:
                    clock.advance(1.0)  # a slow preparation that fails its row
                return [ValueError("bad row") if x == "bad" else x for x in xs]

            def run(rows: list[str]) -> list[str]:
                return rows  # the device takes no time at all

            stages: Stages[str, str] = Stages(run=run, prepare=prepare)
            async with Batcher(stages, max_batch_size=4, max_wait=0, early_timeout=True) as b:
                with pytest.raises(ValueError, match="bad row"):
                    await b("bad")
                model = b.statistics().scheduler.model  # type: ignore[union-attr]
                assert model is None or model.predict(1) < 0.5, model
                assert await b("ok", timeout=0.5) == "ok"

    async def test_the_device_is_not_seen_free_while_the_next_batch_runs_on_it(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Just-in-time dispatch reads ``_device_until``, set when a device job starts and cleared
        when one finishes. With ``batch_time_limit`` the finished job's ``_stage_job`` resumes
        through ``asyncio.wait`` (two more loop hops than a plain ``await job.future``), so when
        the device thread goes straight from batch A to batch B, B's start is recorded first and
        A's ``finally`` then clears it: the device looks free while B runs, and the next request
        is dispatched at once ("device free soon") instead of just before B is predicted to end.
        (Without ``batch_time_limit`` the same steps keep ``C`` waiting, as they should.)

        The worker threads time jobs with ``time.perf_counter``; here that reads a second virtual
        clock, so the model learns exactly 1 s per batch and the loop's clock stays put.
        """
        clock, device_clock = VirtualClock(), VirtualClock(0.0)
        monkeypatch.setattr(
            "batchio._worker.time", types.SimpleNamespace(perf_counter=device_clock.time)
        )
        with clock.install():
            gates = {"A": threading.Event(), "B": threading.Event()}
            entered = {"A": threading.Event(), "B": threading.Event()}

            def run(rows: list[str]) -> list[str]:
                for r in rows:
                    if r in gates:
                        entered[r].set()
                        gates[r].wait(GATE_TIMEOUT)
                    elif r == "warm":
                        device_clock.advance(1.0)  # the model: a batch keeps the device 1 s
                return rows

            stages: Stages[str, str] = Stages(run=run)
            async with Batcher(
                stages, max_batch_size=8, latency_target=100.0, batch_time_limit=HOUR
            ) as b:
                assert await b("warm") == "warm"
                a = asyncio.ensure_future(b("A"))  # idle: dispatched at once
                await wait_event(entered["A"])
                bb = asyncio.ensure_future(b("B"))  # waits until A is predicted to end...
                await wait_all_tasks_blocked()
                clock.advance(1.0)
                await asyncio.sleep(0)  # (the timer runs after the first check of the tasks)
                await wait_all_tasks_blocked()  # ...then goes, and waits for the device
                assert b.statistics().in_flight_batches == 2
                # The device thread finishes A and starts B before the loop hears of either.
                gates["A"].set()
                assert entered["B"].wait(GATE_TIMEOUT)
                await wait_all_tasks_blocked()
                assert await a == "A"
                c = asyncio.ensure_future(b("C"))  # B has just started: 1 s to go
                await wait_all_tasks_blocked()
                stats = b.statistics()
                gates["B"].set()
                assert await bb == "B"
                clock.advance(1.0)
                assert await c == "C"
        assert stats.in_flight_batches == 1, "C was dispatched while B had just started"
        assert stats.scheduler is not None
        assert stats.scheduler.dispatch_reasons["device free soon"] == 1  # B's, not C's

    async def test_a_batch_being_prepared_does_not_hold_back_an_urgent_request(
        self,
    ) -> None:
        """Rule 5: "another batch is being prepared for the device: wait" returns ``Wait(deadline=
        None, wake_at_rows=cap)`` and ignores ``latest`` (when the most urgent request must start)
        and every deadline. While one slow ``prepare`` runs, a lone request with a deadline waits
        until that batch reaches the device, with the device idle and a prepare thread free, and
        times out in the queue: a request failed by the policy, which "is a target, not a
        deadline: no request fails because of it"."""
        clock = VirtualClock()
        with clock.install():
            entered, release = threading.Event(), threading.Event()

            def prepare(xs: list[str]) -> list[str]:
                if "slow" in xs:
                    entered.set()
                    release.wait(GATE_TIMEOUT)
                return xs

            stages: Stages[str, str] = Stages(run=ident, prepare=prepare, prepare_workers=2)
            async with Batcher(stages, max_batch_size=8, latency_target=10.0) as b:
                assert await b("warm") == "warm"  # a model: the device is fast
                slow = asyncio.ensure_future(b("slow"))  # idle: dispatched at once
                await wait_event(entered)  # its preparation takes as long as the test says
                urgent = asyncio.ensure_future(b("urgent", timeout=8.0))
                await wait_all_tasks_blocked()
                clock.advance(6.0)  # past `latest` (5 s: half the target), before the deadline
                await asyncio.sleep(0)
                await wait_all_tasks_blocked()
                stats = b.statistics()
                release.set()
                assert await slow == "slow"
                assert await urgent == "urgent"
        # By `latest` the urgent request must have gone (the device is idle, a prepare thread
        # free); it is still queued, and stays so until its deadline (8 s) unless "slow" ends.
        assert stats.scheduler is not None
        assert sum(stats.scheduler.dispatch_reasons.values()) == 3, stats.scheduler

    async def test_a_full_queue_wakes_the_executor_when_the_policy_counts_cost(self) -> None:
        """Rule 2 dispatches a full queue. The executor learns of one through the row threshold
        it sets (``wake_at_rows``, clamped to ``max_queue_size``); the adaptive policy counting
        cost answers ``Wait(wake_at_rows=None, wake_at_cost=cap)`` while a batch is being
        prepared, so nothing clamps, the queue fills without a wake-up, and calls are refused
        with ``QueueFullError`` while a batch slot is free. (Without ``batch_cost`` the same
        steps dispatch the full queue at once.)"""
        clock = VirtualClock()
        with clock.install():
            entered, release = threading.Event(), threading.Event()

            def prepare(xs: list[str]) -> list[str]:
                if "slow" in xs:
                    entered.set()
                    release.wait(GATE_TIMEOUT)
                return xs

            stages: Stages[str, str] = Stages(run=ident, prepare=prepare, prepare_workers=2)
            async with Batcher(
                stages,
                max_batch_size=8,
                latency_target=10.0,
                max_queue_size=2,
                batch_cost=lambda x: 1.0,
            ) as b:
                assert await b("warm") == "warm"  # a model (in cost)
                slow = asyncio.ensure_future(b("slow"))
                await wait_event(entered)
                queued = [asyncio.ensure_future(b("x1"))]
                await wait_all_tasks_blocked()  # the executor waits for cost (or "slow")
                queued.append(asyncio.ensure_future(b("x2")))  # the queue is full
                await wait_all_tasks_blocked()
                stats = b.statistics()
                release.set()
                assert await slow == "slow"
                assert await asyncio.gather(*queued) == ["x1", "x2"]
        assert stats.scheduler is not None
        assert stats.scheduler.last_reason == "queue full", stats.scheduler

    async def test_the_adaptive_policy_does_not_crash_the_executor_with_an_unbounded_cost(
        self,
    ) -> None:
        """Rule 6 (no view of the device: an ``async def fn`` with several batches in flight)
        computes ``math.ceil(plan.target)`` before it looks at the unit. Counting cost with no
        ``max_batch_cost``, the ceiling is ``inf``; once requests miss the target (``behind``)
        ``target`` is that ceiling, and with a flat run time (slope 0: the learner's clamp of a
        noisy negative slope, typical of a remote call) ``latest`` is ``inf - inf`` = NaN, so
        rule 6 is reached and ``math.ceil(inf)`` raises ``OverflowError`` in the executor: the
        batcher breaks and every request fails with ``BatcherBrokenError``. (Past the crash,
        ``Wait(deadline=nan)`` would arm a NaN timer.)"""
        clock = VirtualClock()
        with clock.install():
            gate = asyncio.Event()

            async def remote(xs: list[str]) -> list[str]:
                if "gate" in xs:
                    await gate.wait()
                clock.advance(0.1)  # a remote call: 0.1 s whatever the batch
                return xs

            async with Batcher(
                remote,
                latency_target=0.05,  # below the 0.1 s every batch takes: "behind"
                max_concurrent_batches=2,
                batch_cost=lambda x: float(len(x)),
            ) as b:
                assert await b("a") == "a"
                assert await b("abc") == "abc"  # the model: 0.1 s + 0 per unit of cost
                first = asyncio.ensure_future(b("gate"))
                await wait_all_tasks_blocked()
                second = asyncio.ensure_future(b("x"))  # a batch in flight, a slot free
                await wait_all_tasks_blocked()
                healthy = b.healthy
                gate.set()
                outcomes = await asyncio.gather(first, second, return_exceptions=True)
        assert healthy
        assert list(outcomes) == ["gate", "x"]

    async def test_wait_all_tasks_blocked_runs_the_timers_an_advance_made_due(self) -> None:
        """``VirtualClock``'s docstring: after :meth:`advance`, "the timers now due run on the
        loop's next iteration (``await wait_all_tasks_blocked()`` from this module)". They do
        not: ``wait_all_tasks_blocked`` checks the tasks in the same iteration, before the
        callbacks that iteration moved from the timer heap to the ready queue, finds every task
        blocked and returns, so the test asserts before ``max_wait``, a deadline or a policy's
        timer has had any effect (this file's tests need an extra ``asyncio.sleep(0)``)."""
        loop = asyncio.get_running_loop()
        with VirtualClock().install() as clock:
            fired: list[int] = []
            loop.call_at(loop.time() + 1.0, fired.append, 1)
            clock.advance(1.0)
            await wait_all_tasks_blocked()
            assert fired == [1]
