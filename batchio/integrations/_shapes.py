"""Shape buckets: a small, fixed set of padded lengths and micro-batch sizes.

On an accelerator a new input shape can cost far more than a repeated one (a kernel choice, an
autotuning pass, a new graph), so a batch is padded up to one of a few lengths and one of a few
row counts instead of to exactly its longest row and its number of rows. Pure Python (no torch):
the policy is tested with plain numbers.

*Length buckets* are an ``int`` ``m`` (pad the length up to a multiple of ``m``) or a *ladder*, an
increasing sequence of lengths (pad up to the next rung). A length above the top rung pads to the
next multiple of the ladder's last step (``top - second rung``, or ``top`` for a one-rung ladder):
that keeps both the number of shapes and the waste bounded, where a multiple of the top rung could
nearly double a long row and "exactly the longest" would make every long batch a new shape. A
bucketed length never passes ``cap`` (the collator's ``max_length``, which a model's position
table usually matches), and never falls below the real longest row.

*Batch sizes* are the allowed row counts of one micro-batch: ``n`` rows are padded with padding
rows up to the smallest allowed size ``>= n`` (the planner never makes a micro-batch larger than
the largest, which a micro-batch above it keeps unpadded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeAlias

from ._microbatch import plan_micro_batches

__all__ = [
    "LengthBuckets",
    "bucket_batch_size",
    "bucket_length",
    "checked_batch_sizes",
    "checked_length_buckets",
    "plan_shaped_micro_batches",
    "powers_of_two",
]

LengthBuckets: TypeAlias = "int | tuple[int, ...]"
"""A multiple (``8``) or a ladder of lengths (``(16, 32, 64, 128, 256, 512)``)."""


def _positive_ints(name: str, values: Sequence[int]) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    out: set[int] = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must hold ints >= 1, got {v!r}")
        out.add(int(v))
    if not out:
        raise ValueError(f"{name} must not be empty")
    return tuple(sorted(out))


def checked_length_buckets(value: int | Sequence[int] | None) -> LengthBuckets | None:
    """``value`` validated: ``None``, an ``int`` >= 1, or a sorted, de-duplicated ladder."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"length_buckets must be an int or a sequence of ints, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"length_buckets must be >= 1, got {value}")
        return value
    return _positive_ints("length_buckets", value)


def checked_batch_sizes(value: Sequence[int] | None) -> tuple[int, ...] | None:
    """``value`` validated: ``None`` or a sorted, de-duplicated tuple of ints >= 1."""
    return None if value is None else _positive_ints("batch_sizes", value)


def bucket_length(longest: int, buckets: LengthBuckets | None, cap: int | None = None) -> int:
    """The length a batch whose longest row has ``longest`` tokens is padded to."""
    if buckets is None or longest <= 0:
        return longest
    if isinstance(buckets, int):
        padded = -(-longest // buckets) * buckets
    else:
        padded = next((rung for rung in buckets if rung >= longest), 0)
        if not padded:
            top = buckets[-1]
            step = top - buckets[-2] if len(buckets) > 1 else top
            padded = top + -(-(longest - top) // step) * step
    if cap is not None:
        padded = min(padded, cap)
    return max(padded, longest)


def bucket_batch_size(rows: int, sizes: tuple[int, ...] | None) -> int:
    """The row count ``rows`` real rows are padded to (``rows`` itself above the largest size)."""
    if sizes is None:
        return rows
    return next((s for s in sizes if s >= rows), rows)


def powers_of_two(largest: int) -> tuple[int, ...]:
    """``1, 2, 4, ...`` below ``largest``, then ``largest`` itself: the default batch sizes."""
    sizes = [1]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != largest:
        sizes.append(largest)
    return tuple(sizes)


def plan_shaped_micro_batches(
    lengths: Sequence[int],
    max_batch_tokens: int | None,
    *,
    padded_length: Callable[[int], int] | None = None,
    padded_rows: Callable[[int], int] | None = None,
    max_rows: int | None = None,
) -> list[list[int]]:
    """Like :func:`plan_micro_batches`, but costing each group at its *padded* shape.

    A group's cost is ``padded_length(longest) x padded_rows(rows)``, which is what the device
    computes over once lengths and row counts are bucketed, and a group never holds more than
    ``max_rows`` rows. Rows are sorted longest first (stably). A group takes the next row while
    its cost stays within ``max_batch_tokens`` *or does not grow* (the row fills a padding row):
    a group whose first row, padded to the smallest batch size, is already over budget fills
    those padding rows with real ones instead of leaving each row a padded group of its own.
    Without any of the three shaping arguments this is exactly :func:`plan_micro_batches`.
    """
    if padded_length is None and padded_rows is None and max_rows is None:
        return plan_micro_batches(lengths, max_batch_tokens)
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
    length_of = padded_length if padded_length is not None else (lambda n: n)
    rows_of = padded_rows if padded_rows is not None else (lambda n: n)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 1
    for i in order:
        if current:
            k = len(current) + 1
            too_many = max_rows is not None and k > max_rows
            # A row that does not grow the padded row count costs nothing (the group is sorted
            # longest first): even a group over budget on its own takes it, rather than leave it
            # to a group of its own padded to as many rows.
            cost = longest * rows_of(k)
            too_big = (
                max_batch_tokens is not None
                and cost > max_batch_tokens
                and cost > longest * rows_of(k - 1)
            )
            if too_many or too_big:
                groups.append(current)
                current = []
        if not current:
            # Sorted longest first: a group's first row is its longest.
            longest = max(1, length_of(max(1, lengths[i])))
        current.append(i)
    if current:
        groups.append(current)
    return groups
