"""The public API's types, checked by mypy --strict over the test suite (and run as tests)."""

from __future__ import annotations

import asyncio
from typing import assert_type

import pytest

import batchio

pytestmark = pytest.mark.anyio


def lengths(items: list[str]) -> list[int]:
    return [len(s) for s in items]


async def alengths(items: list[str]) -> list[int]:
    return [len(s) for s in items]


@batchio.batch(max_batch_size=4, max_wait=0.001)
def upper(items: list[str]) -> list[str]:
    return [s.upper() for s in items]


class Model:
    @batchio.batch(max_batch_size=4, max_wait=0.001)
    def double(self, items: list[int]) -> list[int]:
        return [2 * x for x in items]


async def test_batcher_infers_input_and_output_types() -> None:
    async with batchio.Batcher(lengths, max_batch_size=4, max_wait=0.001) as b:
        assert_type(b, batchio.Batcher[str, int])
        fut = b.submit_nowait("abc")
        assert_type(fut, asyncio.Future[int])
        assert_type(await fut, int)
        assert_type(await b("abc"), int)
        assert_type(b.map_nowait(["a"]), asyncio.Future[list[int]])
        assert_type(await b.submit("ab"), int)
        assert_type(await b.map(["a", "bb"]), list[int])
        assert_type(b.statistics(), batchio.BatcherStatistics)
        assert await b.map(["a", "bb"]) == [1, 2]
    async with batchio.Batcher(alengths, max_batch_size=4, max_wait=0.001) as a:
        assert_type(a, batchio.Batcher[str, int])
        assert await a("xyz") == 3


async def test_decorated_functions_and_methods_keep_their_types() -> None:
    assert_type(upper, batchio.BatchedFunction[str, str])
    assert_type(await upper("a"), str)
    m = Model()
    assert_type(m.double, batchio.BatchedFunction[int, int])
    assert_type(await m.double(4), int)
    assert await upper.map(["a", "b"]) == ["A", "B"]
    await upper.aclose()
    await m.double.aclose()


def test_wrong_item_type_is_a_type_error() -> None:
    async def misuse(b: batchio.Batcher[str, int]) -> None:
        await b(42)  # type: ignore[arg-type]

    assert misuse.__name__ == "misuse"
