"""What a batch function may return, and how it is split into one outcome per input.

Accepted: a sequence (list, tuple, ``range``, any ``collections.abc.Sequence`` but ``str`` and
``bytes``), an iterator or generator (consumed once), and an array with a leading batch dimension
(NumPy ``ndarray``, torch ``Tensor``, anything with a ``shape`` and ``__getitem__``). Each
caller of an array gets its own row as a copy (``row.clone()``, else ``row.copy()``), never a view
that would keep the whole batch's buffer alive for as long as one caller holds its result.
A sequence is used as it is: ``fn`` must return a new one per call, not a list it reuses.

Refused with :class:`~batchio.BatchOutputError`, which names the contract: sets and mappings
(their order is not the inputs' order, so results would cross between callers), strings and
bytes, scalars, ``None``, async iterators and awaitables.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from ._exceptions import BatchOutputError, BatchSizeMismatchError

__all__: list[str] = []


def _refuse(out: object, why: str) -> BatchOutputError:
    if inspect.iscoroutine(out):
        out.close()  # never awaited on purpose; closing it keeps Python from warning
    return BatchOutputError(type(out), why)


def output_rows(out: Any, expected: int) -> list[Any]:
    """``out`` as a list of ``expected`` outcomes, one per input, in order."""
    kind = type(out)
    if kind is list:
        rows: list[Any] = out
    elif kind is tuple:
        rows = list(out)
    elif isinstance(out, str | bytes | bytearray):
        raise _refuse(out, "a string is not a sequence of results")
    elif isinstance(out, Mapping):
        raise _refuse(out, "a mapping would give callers its keys, not their results")
    elif isinstance(out, AbstractSet):
        raise _refuse(out, "a set has no order, so results would cross between callers")
    elif hasattr(out, "shape") and hasattr(out, "__getitem__") and not hasattr(out, "iloc"):
        rows = _array_rows(out)
    elif isinstance(out, Sequence | Iterator):
        rows = list(out)
    elif inspect.isawaitable(out) or hasattr(out, "__aiter__"):
        raise _refuse(
            out,
            "an awaitable or async iterator from a sync function; declare the function "
            "`async def` and return the results",
        )
    else:
        raise _refuse(out, "it is not a sequence")
    if len(rows) != expected:
        raise BatchSizeMismatchError(expected, len(rows))
    return rows


def _array_rows(out: Any) -> list[Any]:
    shape = tuple(out.shape)
    if not shape:
        raise _refuse(out, "a 0-d array has no batch dimension")
    # Each row is copied so it owns its memory: a view would keep the whole batch alive. An
    # array type with neither method (an immutable tensor, say) hands out its rows as they are.
    copy = "clone" if hasattr(out, "clone") else "copy" if hasattr(out, "copy") else None
    rows = [out[i] for i in range(shape[0])]
    return rows if copy is None else [getattr(row, copy)() for row in rows]
