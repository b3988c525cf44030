"""What a batch function may return: sequences, iterators and arrays are split per caller; sets,
mappings, strings, scalars, None and awaitables from a sync function get BatchOutputError.

Defect pinned: a set or a dict passed the length check, so ``gather(b(3), b(1))`` with
``lambda xs: {x * 10 for x in xs}`` returned crossed results, and a dict gave callers its keys.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
import torch

from batchio import Batcher, BatchOutputError, BatchSizeMismatchError

pytestmark = pytest.mark.anyio

HOUR = 3600.0


async def run_batch(fn: Callable[[list[Any]], Any], items: list[Any]) -> list[Any]:
    """One batch of ``items`` through ``fn``; each caller's outcome (result or exception)."""
    async with Batcher(fn, max_batch_size=len(items), max_wait=HOUR) as b:
        return list(await asyncio.gather(*(b(x) for x in items), return_exceptions=True))


@pytest.mark.parametrize(
    ("returned", "why"),
    [
        (lambda xs: {x * 10 for x in xs}, "set"),
        (lambda xs: frozenset(x * 10 for x in xs), "set"),
        (lambda xs: {x: x * 10 for x in xs}, "mapping"),
        (lambda xs: None, "not a sequence"),
        (lambda xs: 42, "not a sequence"),
        (lambda xs: "ab", "string"),
        (lambda xs: b"ab", "string"),
        (lambda xs: np.float64(1.0), "0-d"),
    ],
    ids=["set", "frozenset", "dict", "None", "int", "str", "bytes", "numpy-scalar"],
)
async def test_outputs_that_would_cross_or_are_not_results_get_a_typed_error(
    returned: Callable[[list[int]], Any], why: str
) -> None:
    outcomes = await run_batch(returned, [3, 1])
    for outcome in outcomes:
        assert isinstance(outcome, BatchOutputError)
        assert isinstance(outcome, TypeError)
        assert why in str(outcome)
        assert "one result per input" in str(outcome)


async def test_async_generator_from_a_sync_function_is_refused() -> None:
    def fn(xs: list[int]) -> AsyncIterator[int]:
        async def gen() -> AsyncIterator[int]:
            for x in xs:
                yield x

        return gen()

    for outcome in await run_batch(fn, [1, 2]):
        assert isinstance(outcome, BatchOutputError)
        assert "async def" in str(outcome)


async def test_sync_function_returning_a_coroutine_is_refused_without_a_warning() -> None:
    """The coroutine is closed, so no 'never awaited' RuntimeWarning (warnings are errors here)."""

    async def results(xs: list[int]) -> list[int]:
        return xs

    def fn(xs: list[int]) -> Any:
        return results(xs)

    for outcome in await run_batch(fn, [1, 2]):
        assert isinstance(outcome, BatchOutputError)
    gc.collect()


async def test_async_fn_returning_a_set_is_refused_too() -> None:
    async def fn(xs: list[int]) -> set[int]:
        return set(xs)

    assert all(isinstance(o, BatchOutputError) for o in await run_batch(fn, [1, 2]))


@pytest.mark.parametrize(
    "returned",
    [
        lambda xs: [x * 10 for x in xs],
        lambda xs: tuple(x * 10 for x in xs),
        lambda xs: (x * 10 for x in xs),
        lambda xs: iter([x * 10 for x in xs]),
        lambda xs: range(xs[0] * 10, 10, -10),
    ],
    ids=["list", "tuple", "generator", "iterator", "range"],
)
async def test_sequences_and_iterators_are_split_in_order(
    returned: Callable[[list[int]], Any],
) -> None:
    outcomes = await run_batch(returned, [3, 2])
    assert outcomes == [30, 20]


async def test_wrong_length_is_still_a_size_mismatch() -> None:
    outcomes = await run_batch(lambda xs: (x for x in xs[:-1]), [1, 2, 3])
    assert all(isinstance(o, BatchSizeMismatchError) for o in outcomes)


async def test_numpy_rows_are_copies_that_do_not_keep_the_batch_alive() -> None:
    def fn(xs: list[int]) -> np.ndarray[Any, Any]:
        return np.array([[x, x + 1] for x in xs], dtype=np.float32)

    first, second = await run_batch(fn, [1, 5])
    assert isinstance(first, np.ndarray)
    assert (first.tolist(), second.tolist()) == ([1.0, 2.0], [5.0, 6.0])
    assert (first.base, second.base) == (None, None)  # each owns its memory: not a view


async def test_one_dimensional_numpy_output_gives_scalars() -> None:
    outcomes = await run_batch(lambda xs: np.array(xs) * 2, [1, 5])
    assert [type(o) for o in outcomes] == [np.int64, np.int64]
    assert outcomes == [2, 10]


async def test_torch_rows_are_clones_that_do_not_keep_the_batch_alive() -> None:
    def fn(xs: list[int]) -> torch.Tensor:
        return torch.tensor([[x, x + 1] for x in xs], dtype=torch.float32)

    first, second = await run_batch(fn, [1, 5])
    assert (first.tolist(), second.tolist()) == ([1.0, 2.0], [5.0, 6.0])
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert first.untyped_storage().nbytes() == 2 * 4  # its own row only, not the batch
