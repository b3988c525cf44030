"""Every async test runs under the default asyncio loop and under uvloop (anyio's pytest plugin).

pytest-asyncio is installed in strict mode, so it never claims these tests; modules mark their
async tests with ``pytest.mark.anyio``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from blockbuster import blockbuster_ctx

from batchio import Batcher, BatchStalledError, Stages

GATE_TIMEOUT = 20.0  # a broken test fails instead of hanging

_BACKENDS: list[Any] = [pytest.param(("asyncio", {}), id="asyncio")]
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dev dependency; Windows has none
    pass
else:
    _BACKENDS.append(
        pytest.param(("asyncio", {"loop_factory": uvloop.new_event_loop}), id="uvloop")
    )


@pytest.fixture(params=_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture
def no_blocking() -> Iterator[None]:
    """Fail the test if batchio makes a blocking call on the event loop's thread (blockbuster).

    blockbuster is a dev dependency: a missing one is an error, not a reason to skip.
    """
    with blockbuster_ctx("batchio"):
        yield


@pytest.fixture(autouse=True)
def _core_never_blocks(request: pytest.FixtureRequest) -> None:
    """Every async test of the core runs under :func:`no_blocking`, not opt-in.

    The integration tests load real models in their setup (file reads on the loop, on purpose),
    so their modules opt in where the code under test is batchio's alone.
    """
    if request.node.get_closest_marker("anyio") is not None and "integrations" not in (
        request.path.parts
    ):
        request.getfixturevalue("no_blocking")


# A skip must have a reason a user would accept. Anything else (typically a dev dependency missing
# on a fresh machine, which would turn whole files green-but-skipped) fails the run.
ALLOWED_SKIP_REASONS = ("needs a CUDA device",)


def _fail_unexpected_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not report.skipped:
        return
    longrepr = report.longrepr
    reason = str(longrepr[-1]) if isinstance(longrepr, tuple) else str(longrepr)
    if not any(ok in reason for ok in ALLOWED_SKIP_REASONS):
        report.outcome = "failed"
        report.longrepr = f"unexpected skip (only {ALLOWED_SKIP_REASONS} may skip): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())  # type: ignore[attr-defined]


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())  # type: ignore[attr-defined]


# -- helpers the test modules import (``from .conftest import ...``) ------------------------------


async def wait_event(ev: threading.Event) -> None:
    """Wait for a worker thread to set ``ev``, without blocking the loop."""
    if not await asyncio.to_thread(ev.wait, GATE_TIMEOUT):
        raise TimeoutError("the event was never set")


@contextlib.asynccontextmanager
async def stalled_staged_batcher() -> AsyncIterator[Batcher[int, int]]:
    """A staged batcher (``max_batch_size=1``, ``batch_time_limit=0.05``) whose device stage has
    stalled: ``b(0)`` has raised :class:`BatchStalledError`, its thread still stuck in the job.

    The stuck thread is let go only after the batcher has closed.
    """
    release = threading.Event()

    def run(xs: list[int]) -> list[int]:
        if 0 in xs:
            release.wait(GATE_TIMEOUT)
        return xs

    try:
        async with Batcher(
            Stages[int, int](run=run), max_batch_size=1, max_wait=0.0, batch_time_limit=0.05
        ) as b:
            with pytest.raises(BatchStalledError):
                await b(0)
            yield b
    finally:
        release.set()
