"""Validation of option values, shared by every place that accepts one (one message per rule)."""

from __future__ import annotations

import math
import operator
from typing import Any

__all__: list[str] = []


def _kind(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` >= ``minimum`` (``None`` too if ``allow_none``); bools refused."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {_kind(value)}")
    try:
        number = operator.index(value)  # ints and integer-like types (numpy.int64), not 2.5
    except TypeError:
        none = " or None" if allow_none else ""
        raise TypeError(f"{name} must be an int{none}, got {_kind(value)}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {number}")
    return number


def check_seconds(
    name: str, value: Any, *, allow_zero: bool = False, allow_none: bool = False
) -> float | None:
    """``value`` as a finite number of seconds (> 0, or >= 0 if ``allow_zero``), or ``None``."""
    if value is None and allow_none:
        return None
    bound = ">= 0" if allow_zero else "> 0"
    none = ", or None for none" if allow_none else ""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds {bound}{none}; got {_kind(value)}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{name} must be a finite number of seconds{none}; got {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"{name} must be a number of seconds {bound}{none}; got {value!r}")
    return seconds


def check_timeout(value: Any) -> float | None:
    """A per-request ``timeout=``: seconds > 0, or ``None`` for no deadline."""
    return check_seconds("timeout", value, allow_none=True)


def check_priority(value: Any) -> int:
    """A per-call ``priority=``: any ``int`` (higher is served first); bools refused."""
    if isinstance(value, bool):
        raise TypeError(f"priority must be an int, got {_kind(value)}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"priority must be an int, got {_kind(value)}") from None


def check_cost(value: Any) -> float:
    """What ``batch_cost(item)`` returned: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        try:
            value = float(value)  # numpy scalars, 0-d tensors
        except (TypeError, ValueError):
            raise TypeError(f"batch_cost must return a number, got {_kind(value)}") from None
    cost = float(value)
    if not (math.isfinite(cost) and cost >= 0):
        raise ValueError(f"batch_cost must return a finite number >= 0, got {value!r}")
    return cost


def check_positive(name: str, value: Any, *, allow_none: bool = False) -> float | None:
    """``value`` as a finite number > 0 (``None`` too if ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        none = " or None" if allow_none else ""
        raise TypeError(f"{name} must be a number > 0{none}, got {_kind(value)}")
    number = float(value)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number
