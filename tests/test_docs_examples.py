"""The examples in docs/testing.md, run from the page itself so they cannot rot."""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.anyio

PAGE = Path(__file__).parents[1] / "docs" / "testing.md"


def example(name: str) -> Callable[[], Coroutine[Any, Any, None]]:
    """The async test function ``name`` defined by one of the page's python blocks."""
    for block in re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL):
        if f"async def {name}(" in block:
            namespace: dict[str, Any] = {}
            exec(compile(block, str(PAGE), "exec"), namespace)  # noqa: S102 - our own docs
            return namespace[name]  # type: ignore[no-any-return]
    raise AssertionError(f"{name} is not on {PAGE.name} any more")


async def test_requests_queue_while_a_batch_runs() -> None:
    await example("test_requests_queue_while_a_batch_runs")()


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])  # a virtual clock: asyncio only
async def test_a_queued_request_times_out_without_running() -> None:
    await example("test_a_queued_request_times_out_without_running")()
