"""A batch function that raises a BaseException which is not an Exception.

Defect pinned: a custom BaseException subclass, GeneratorExit, or a CancelledError raised by the
function itself reached callers as ``BatcherBrokenError("batch did not complete")`` with the
original lost, ``healthy`` still true, and "Task exception was never retrieved" on stderr.
Now: callers get BatchFunctionError whose ``__cause__`` is the original, the batcher stays
healthy and keeps serving. KeyboardInterrupt and SystemExit propagate, and the batcher breaks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from batchio import Batcher, BatcherBrokenError, BatchFunctionError

pytestmark = pytest.mark.anyio


class Custom(BaseException):
    pass


RAISED: list[Callable[[], BaseException]] = [
    Custom,
    GeneratorExit,
    asyncio.CancelledError,
]


def raising(kind: Callable[[], BaseException], use_async: bool) -> Any:
    def fn(items: list[int]) -> list[int]:
        if 0 in items:
            raise kind()
        return items

    async def afn(items: list[int]) -> list[int]:
        return fn(items)

    return afn if use_async else fn


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", RAISED, ids=lambda k: k.__name__)
async def test_base_exception_from_fn_fails_the_batch_with_its_cause(
    kind: Callable[[], BaseException], use_async: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    async with Batcher(raising(kind, use_async), max_batch_size=2, max_wait=0) as b:
        outcomes = await asyncio.gather(b(0), b.map([1]), return_exceptions=True)
        for outcome in outcomes:
            assert isinstance(outcome, BatchFunctionError)
            assert isinstance(outcome.__cause__, kind)  # type: ignore[arg-type]
        assert b.healthy
        assert await b(5) == 5  # the batcher carries on
    stats = b.statistics()
    assert (stats.failed, stats.completed, stats.pending, stats.healthy) == (2, 1, 0, True)
    assert not [r for r in caplog.records if r.name == "asyncio"]  # nothing "never retrieved"


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("kind", [KeyboardInterrupt, SystemExit])
def test_keyboard_interrupt_and_system_exit_propagate_and_break_the_batcher(
    kind: type[BaseException], use_async: bool
) -> None:
    """They are not the batch's to swallow: they leave the event loop, and the batcher is broken
    (its requests get BatcherBrokenError with the original as cause)."""
    seen: dict[str, Any] = {}

    async def main() -> None:
        b = Batcher(raising(kind, use_async), max_batch_size=1, max_wait=0)
        seen["batcher"] = b
        await b.__aenter__()
        fut = seen["fut"] = b.submit_nowait(0)
        await fut

    with pytest.raises(kind):
        asyncio.run(main())
    b = seen["batcher"]
    assert not b.healthy
    error = seen["fut"].exception()
    assert isinstance(error, BatcherBrokenError)
    assert isinstance(error.__cause__, kind)
