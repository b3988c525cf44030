"""Micro-batch planning: split one collected batch into length-sorted groups under a token budget.

Pure Python (no torch), so the policy is tested with plain lists. The cost of a padded group is
``longest length x rows``: what the model actually computes over once every row is padded to the
longest one.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["padded_cost", "plan_micro_batches"]


def padded_cost(lengths: Sequence[int]) -> int:
    """Tokens a group costs once padded to its longest row (a length below 1 counts as 1)."""
    if not lengths:
        return 0
    return max(1, *lengths) * len(lengths)


def plan_micro_batches(lengths: Sequence[int], max_batch_tokens: int | None) -> list[list[int]]:
    """Group row indices into micro-batches whose padded cost stays within ``max_batch_tokens``.

    Rows are sorted longest first (stably, so equal lengths keep their order), and each group takes
    the next rows while ``longest x rows <= max_batch_tokens``. Sorting puts rows of similar length
    together, which is what keeps padding low. A row longer than the budget on its own still runs,
    alone. With ``max_batch_tokens=None`` the whole batch is one group, in its original order.

    Returns:
        Lists of indices into ``lengths``; every index appears exactly once.
    """
    n = len(lengths)
    if n == 0:
        return []
    if max_batch_tokens is None:
        return [list(range(n))]
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
    order = sorted(range(n), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 1
    for i in order:
        if current and longest * (len(current) + 1) > max_batch_tokens:
            groups.append(current)
            current = []
        if not current:
            # Sorted longest first: a group's first row is its longest.
            longest = max(1, lengths[i])
        current.append(i)
    groups.append(current)
    return groups
