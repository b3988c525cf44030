"""Review of ``Stages(prepare_processes=N)``: each test pins a defect found in review (all fixed):
an exception or a row that cannot cross back from a worker process failed the pool or the batch
instead of its own row, and a stalled prepare wedged a one-process pool. The prepare functions are
module-level, so the spawned worker processes can unpickle them.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from batchio import Batcher, Stages

# Shared with the main tests of prepare_processes (module-level, so the workers can unpickle them).
from tests.test_stage_processes import outcomes, prepare_or_hang, run_rows

pytestmark = pytest.mark.anyio


class TwoArgError(Exception):
    """An exception that pickles but does not unpickle (its __init__ wants two arguments)."""

    def __init__(self, item: int, why: str) -> None:
        super().__init__(f"{item}: {why}")


def prepare_two_arg_error(items: list[int]) -> list[int]:
    if 13 in items:
        raise TwoArgError(13, "unlucky")
    return [x * 10 for x in items]


def prepare_unpicklable_row(items: list[int]) -> list[Any]:
    """A row that cannot be pickled back (a lock) for 13; the others times ten."""
    return [threading.Lock() if x == 13 else x * 10 for x in items]


async def test_an_exception_that_does_not_unpickle_fails_only_its_row() -> None:
    # With threads (prepare_processes=None) this gives [10, TwoArgError, 20, 30].
    stages: Stages[int, Any] = Stages(
        prepare=prepare_two_arg_error, run=run_rows, prepare_processes=1
    )
    async with Batcher(stages, max_batch_size=4, max_wait=0, isolate_errors=True) as batcher:
        results = await outcomes(batcher, [1, 13, 2, 3])
    assert [results[0], results[2], results[3]] == [10, 20, 30], results
    assert isinstance(results[1], Exception)


async def test_an_unpicklable_row_fails_only_its_own_request() -> None:
    stages: Stages[int, Any] = Stages(
        prepare=prepare_unpicklable_row, run=run_rows, prepare_processes=1
    )
    async with Batcher(stages, max_batch_size=4, max_wait=0, isolate_errors=True) as batcher:
        results = await outcomes(batcher, [1, 13, 2, 3])
    assert [results[0], results[2], results[3]] == [10, 20, 30], results


async def test_a_stalled_prepare_does_not_wedge_a_one_process_pool() -> None:
    stages: Stages[int, Any] = Stages(prepare=prepare_or_hang, run=run_rows, prepare_processes=1)
    # The limit is the library's own timer on a job that never returns: the outcome does not
    # depend on how long it is.
    async with Batcher(stages, max_batch_size=1, max_wait=0, batch_time_limit=1.0) as batcher:
        first = await outcomes(batcher, [-1])
        assert isinstance(first[0], Exception)
        second = await outcomes(batcher, [2])
    assert second == [20], second
