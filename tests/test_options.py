"""Options are declared once (BatcherOptions), validated at construction with clear messages, and
shared by Batcher, @batch and the model wrappers.

Defects pinned: ``max_batch_size=2.5`` disabled the cap; ``"8"`` or ``None`` gave raw TypeErrors;
``True`` was accepted; ``max_concurrent_batches=2.5`` failed only at start; ``max_wait=inf`` was
accepted without documentation; ``@batch(max_batch_size=0)`` failed only at the first call.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import pytest

import batchio
import batchio._options
from batchio import Batcher, BatcherOptions, BatcherOptionsKw, MaxSizeOrWait


def identity(items: list[int]) -> list[int]:
    return items


BAD = [
    ({"max_batch_size": 2.5}, TypeError, "max_batch_size must be an int"),
    ({"max_batch_size": "8"}, TypeError, "max_batch_size must be an int"),
    ({"max_batch_size": None}, TypeError, "max_batch_size must be an int"),
    ({"max_batch_size": True}, TypeError, "max_batch_size must be an int"),
    ({"max_batch_size": 0}, ValueError, "max_batch_size must be >= 1"),
    ({"max_concurrent_batches": 2.5}, TypeError, "max_concurrent_batches must be an int"),
    ({"max_concurrent_batches": 0}, ValueError, "max_concurrent_batches must be >= 1"),
    ({"max_wait": float("inf")}, ValueError, "max_wait must be a finite"),
    ({"max_wait": float("nan")}, ValueError, "max_wait must be a finite"),
    ({"max_wait": -1}, ValueError, "max_wait must be a number of seconds >= 0"),
    ({"max_wait": "5ms"}, TypeError, "max_wait must be a number of seconds"),
    ({"max_queue_size": 0}, ValueError, "max_queue_size must be >= 1"),
    ({"max_queue_size": 1.5}, TypeError, "max_queue_size must be an int or None"),
    ({"when_full": "drop"}, ValueError, "when_full"),
    ({"timeout": 0}, ValueError, "timeout must be a number of seconds > 0"),
    ({"timeout": float("inf")}, ValueError, "timeout must be a finite"),
    ({"batch_time_limit": -2}, ValueError, "batch_time_limit"),
    ({"isolate_errors": 1}, TypeError, "isolate_errors must be a bool"),
    ({"policy": object()}, TypeError, "policy must implement batchio.BatchPolicy"),
    ({"name": 3}, TypeError, "name must be a str"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD)
def test_bad_options_fail_at_construction_everywhere(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    """The same value fails the same way in every place that takes options, before any call."""
    with pytest.raises(error, match=message):
        BatcherOptions(**options)
    with pytest.raises(error, match=message):
        Batcher(identity, **options)
    with pytest.raises(error, match=message):
        batchio.batch(**options)


def test_unknown_option_is_named() -> None:
    with pytest.raises(TypeError, match="max_batch"):
        Batcher(identity, max_batch=3)  # type: ignore[call-arg]


def test_integer_like_values_are_normalised() -> None:
    np = pytest.importorskip("numpy")
    opts = BatcherOptions(max_batch_size=np.int64(8), max_wait=1)
    assert (type(opts.max_batch_size), type(opts.max_wait)) == (int, float)


def test_the_keyword_list_and_the_options_type_agree() -> None:
    """BatcherOptionsKw (the typed **kwargs) names exactly the fields, with the same types."""
    fields = {f.name: f.type for f in dataclasses.fields(BatcherOptions)}
    namespace = vars(batchio._options)  # where the annotations were written
    hints = typing.get_type_hints(BatcherOptionsKw, namespace)
    assert set(hints) == set(fields)
    options_hints = typing.get_type_hints(BatcherOptions, namespace)
    for name in fields:
        assert hints[name] == options_hints[name], name


def test_options_are_shared_and_keywords_apply_on_top() -> None:
    base = BatcherOptions(max_batch_size=8, timeout=2.0)
    b = Batcher(identity, options=base, max_wait=0)
    assert b.options == dataclasses.replace(base, max_wait=0.0)
    assert b.max_batch_size == 8
    f = batchio.batch(options=base)(identity)
    assert f.options is base


def test_policy_checks_are_the_options_checks() -> None:
    with pytest.raises(TypeError, match="max_batch_size must be an int"):
        MaxSizeOrWait(max_batch_size=2.5, max_wait=0)  # type: ignore[arg-type]


def test_default_timeout_marker_is_a_named_singleton() -> None:
    import pickle

    assert repr(batchio.DEFAULT) == "batchio.DEFAULT"
    assert pickle.loads(pickle.dumps(batchio.DEFAULT)) is batchio.DEFAULT


def test_options_must_be_a_batcher_options() -> None:
    with pytest.raises(TypeError, match=r"options must be a batchio\.BatcherOptions"):
        Batcher(identity, options={"max_batch_size": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unknown batcher option"):
        BatcherOptions().replace(max_batch=3)


def test_decorating_something_that_is_not_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="decorates a function or method"):
        batchio.batch(42)  # type: ignore[call-overload]
