"""The example in docs/testing.md, kept here so it cannot rot."""

from __future__ import annotations

import asyncio

import pytest
from anyio import wait_all_tasks_blocked

from batchio import Batcher
from batchio.testing import GatedBatchFn

pytestmark = pytest.mark.anyio


async def test_requests_queue_while_a_batch_runs() -> None:
    fn: GatedBatchFn[int, int] = GatedBatchFn(lambda x: x * 2, gated=True)
    async with Batcher(fn, max_batch_size=4, max_wait=0) as b:
        first = asyncio.ensure_future(b(1))
        await fn.wait_entered(1)
        rest = [asyncio.ensure_future(b(i)) for i in range(2, 6)]
        await wait_all_tasks_blocked()
        assert b.statistics().queue_depth == 4
        fn.open()
        assert await first == 2
        assert await asyncio.gather(*rest) == [4, 6, 8, 10]
    assert fn.batches == [[1], [2, 3, 4, 5]]
