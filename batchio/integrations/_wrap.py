"""What the model wrappers share: device-derived defaults, resolved options, the staged batcher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import torch

from .. import Batcher, BatcherOptions, BatcherOptionsKw, DeviceExecutor, Stages
from .._options import options_from
from ._device import DeviceDefaults, device_defaults
from ._shapes import LengthBuckets

__all__ = [
    "AUTO",
    "DEFAULT_LATENCY_TARGET",
    "Auto",
    "WrapperSetup",
    "resolve_device",
    "scheduling_defaults",
    "setup",
]

Auto: TypeAlias = Literal["auto"]
AUTO: Final = "auto"
"""Default of the wrappers' shape options: chosen from the device (see :class:`DeviceDefaults`)."""

DEFAULT_LATENCY_TARGET: Final = 0.1
"""The model wrappers' default ``latency_target``, in seconds: the adaptive policy, aiming at a
p99 of queue wait plus run time under 100 ms (an interactive request's budget)."""

_STATIC_RULE: Final = frozenset({"latency_target", "max_wait", "policy"})


def scheduling_defaults(kwargs: BatcherOptionsKw) -> dict[str, Any]:
    """The wrappers' default policy: ``latency_target=DEFAULT_LATENCY_TARGET``, unless the
    caller chose one (``latency_target``, ``policy``, or a ``max_wait`` for the static rule)."""
    if _STATIC_RULE & set(kwargs):
        return {}
    return {"latency_target": DEFAULT_LATENCY_TARGET}


def resolve_device(model: Any, device: str | torch.device | None) -> torch.device | None:
    """The device the model will run on: ``device``, else a module's own when not the CPU."""
    if device is not None:
        d = torch.device(device)
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", torch.cuda.current_device())  # pragma: no cover - CUDA
        return d
    if isinstance(model, torch.nn.Module):
        tensor = next(iter([*model.parameters(), *model.buffers()]), None)
        if tensor is not None and tensor.device.type != "cpu":
            return tensor.device  # pragma: no cover - needs an accelerator
    return None


@dataclass(frozen=True, slots=True)
class WrapperSetup:
    """A wrapper's resolved options and shapes."""

    options: BatcherOptions
    defaults: DeviceDefaults
    max_batch_tokens: int | None
    length_buckets: LengthBuckets | Sequence[int] | None
    batch_sizes: Sequence[int] | None


def setup(
    device: torch.device | None,
    options: BatcherOptions | None,
    kwargs: BatcherOptionsKw,
    *,
    max_batch_tokens: int | Auto | None,
    length_buckets: int | Sequence[int] | Auto | None,
    batch_sizes: Sequence[int] | Auto | None,
    cpu_max_batch_tokens: int | None = None,
    **wrapper_defaults: Any,
) -> WrapperSetup:
    """Options and shapes, each the caller's where given, else the device's default.

    ``options`` (when given) replaces the wrapper's defaults, the device's ``max_batch_size``
    and the default ``latency_target`` included; ``kwargs`` go on top of either.
    ``cpu_max_batch_tokens`` is the wrapper's own token budget off CUDA (a text wrapper's), for
    ``max_batch_tokens="auto"``.
    """
    dd = device_defaults(device)
    if max_batch_tokens == AUTO and not dd.cuda and cpu_max_batch_tokens is not None:
        max_batch_tokens = cpu_max_batch_tokens
    if options is None:
        base_kw = {**scheduling_defaults(kwargs), **wrapper_defaults}
        if dd.max_batch_size is not None:
            base_kw["max_batch_size"] = dd.max_batch_size
        base = options_from(None, base_kw)  # type: ignore[arg-type]
    else:
        base = options
    opts = options_from(base, kwargs)
    return WrapperSetup(
        opts,
        dd,
        dd.max_batch_tokens if max_batch_tokens == AUTO else max_batch_tokens,
        dd.length_buckets if length_buckets == AUTO else length_buckets,
        dd.batch_sizes(opts.max_batch_size) if batch_sizes == AUTO else batch_sizes,
    )


def make_batcher(
    fn: Any, stages: Stages[Any, Any] | None, options: BatcherOptions
) -> Batcher[Any, Any]:
    """The wrapper's batcher: staged when ``stages`` is given, else over the plain ``fn``."""
    return Batcher(stages if stages is not None else fn, options=options)


def check_device_executor(executor: DeviceExecutor | None, staged: bool) -> None:
    """A shared device executor needs the staged form (the plain one has no device stage)."""
    if executor is not None and not staged:
        raise ValueError("device_executor needs staged=True: the plain form has no device stage")
