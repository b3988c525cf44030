"""The micro-batch planner: pure, so tested with plain lists and Hypothesis (no torch, no loop)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchio.integrations._microbatch import padded_cost, plan_micro_batches


def test_no_budget_is_one_group_in_order() -> None:
    """Without max_batch_tokens the batch runs as it came: one group, original order."""
    assert plan_micro_batches([5, 1, 9], None) == [[0, 1, 2]]


def test_empty() -> None:
    assert plan_micro_batches([], 10) == []
    assert padded_cost([]) == 0


def test_sorted_longest_first_and_grouped_by_budget() -> None:
    """Lengths 9, 9, 5, 1 under a budget of 18: (9, 9) cost 18, then (5, 1) cost 10."""
    assert plan_micro_batches([1, 9, 5, 9], 18) == [[1, 3], [2, 0]]


def test_a_row_over_budget_runs_alone() -> None:
    assert plan_micro_batches([100, 2, 2], 10) == [[0], [1, 2]]


def test_invalid_budget() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        plan_micro_batches([1], 0)


@given(
    lengths=st.lists(st.integers(min_value=0, max_value=600), max_size=80),
    budget=st.integers(min_value=1, max_value=5000),
)
def test_plan_invariants(lengths: list[int], budget: int) -> None:
    """Every row runs exactly once; each group is within budget unless it is a lone row; groups
    are length-sorted, longest first, so padding never exceeds what sorting allows."""
    groups = plan_micro_batches(lengths, budget)
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(groups)
    for g in groups:
        cost = padded_cost([lengths[i] for i in g])
        assert len(g) == 1 or cost <= budget
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
