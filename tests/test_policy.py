"""The default policy is a pure function of the queue state: tested with numbers, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchio import Dispatch, MaxSizeOrWait, QueueState, Wait


def state(
    *,
    now: float = 100.0,
    rows: int = 0,
    oldest: float | None = None,
    free: int = 1,
    closing: bool = False,
) -> QueueState:
    return QueueState(
        now=now, queued_rows=rows, oldest_enqueued_at=oldest, free_slots=free, closing=closing
    )


POLICY = MaxSizeOrWait(max_batch_size=8, max_wait=0.01)


def test_idle_queue_waits_for_the_first_arrival_without_a_timer() -> None:
    """An empty queue sets no timer: the executor sleeps until a row arrives."""
    assert POLICY.decide(state()) == Wait(deadline=None, wake_at_rows=1)


def test_full_batch_dispatches_at_once() -> None:
    assert POLICY.decide(state(rows=8, oldest=100.0)) == Dispatch(8)
    assert POLICY.decide(state(rows=30, oldest=100.0)) == Dispatch(8)


def test_partial_batch_waits_until_oldest_has_waited_max_wait() -> None:
    """The deadline is the oldest row's arrival plus max_wait, not restarted per arrival."""
    assert POLICY.decide(state(now=100.004, rows=3, oldest=100.0)) == Wait(
        deadline=100.01, wake_at_rows=8
    )


def test_partial_batch_dispatches_once_overdue() -> None:
    assert POLICY.decide(state(now=100.01, rows=3, oldest=100.0)) == Dispatch(3)


def test_no_free_slot_waits_for_a_batch_to_finish() -> None:
    """While every slot is busy, arrivals do not wake the executor and no timer runs."""
    assert POLICY.decide(state(rows=50, oldest=0.0, free=0)) == Wait(None, None)


def test_closing_drains_without_waiting() -> None:
    assert POLICY.decide(state(rows=3, oldest=100.0, closing=True)) == Dispatch(3)


def test_full_queue_dispatches_without_waiting() -> None:
    """With max_queue_size below max_batch_size a batch can never fill: don't wait for it."""
    s = QueueState(
        now=100.0,
        queued_rows=2,
        oldest_enqueued_at=100.0,
        free_slots=1,
        closing=False,
        queue_full=True,
    )
    assert POLICY.decide(s) == Dispatch(2)


@pytest.mark.parametrize(("size", "wait"), [(0, 0.1), (-1, 0.1), (4, -0.5), (4, float("nan"))])
def test_invalid_options_are_rejected(size: int, wait: float) -> None:
    with pytest.raises(ValueError, match="max_"):
        MaxSizeOrWait(max_batch_size=size, max_wait=wait)


@given(
    size=st.integers(1, 512),
    max_wait=st.floats(0, 10, allow_nan=False),
    rows=st.integers(0, 2000),
    age=st.floats(0, 20, allow_nan=False),
    free=st.integers(0, 4),
    closing=st.booleans(),
)
def test_decisions_are_consistent(
    size: int, max_wait: float, rows: int, age: float, free: int, closing: bool
) -> None:
    """Whatever the state: never dispatch an empty or oversized batch or without a free slot;
    a wait's deadline is in the future; and a due or full batch is never left waiting."""
    policy = MaxSizeOrWait(size, max_wait)
    now = 1000.0
    s = state(now=now, rows=rows, oldest=now - age if rows else None, free=free, closing=closing)
    decision = policy.decide(s)
    if isinstance(decision, Dispatch):
        assert free > 0
        assert 1 <= decision.rows <= min(rows, size)
        assert decision.rows == min(rows, size)
    else:
        assert decision.deadline is None or decision.deadline > now
        oldest = s.oldest_enqueued_at
        due = oldest is not None and (closing or rows >= size or now >= oldest + max_wait)
        assert not (free > 0 and due)
        if free > 0 and rows == 0:
            assert decision.wake_at_rows == 1
