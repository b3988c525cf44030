"""Device placement for a model worker: where inputs go, where the work runs, where outputs land.

On a CUDA device the batch is collated in pinned memory and copied with ``non_blocking=True`` on a
CUDA stream the worker owns, the forward pass is queued on that stream, and outputs are copied back
the same way. The plain worker waits for its stream once per micro-batch; the staged one records a
CUDA event after the copies and returns, and its finishing thread waits on that event (not on the
stream, which by then holds the next batch's work). Owning a stream keeps this model's copies and
kernels off the default stream, where other models or the application may be working. Outputs
that stay on a CUDA device are cast and split on a second stream the worker owns, after marking
them in use there (``record_stream``), and waited for: see :meth:`Placement.finish_outputs`.

This module also holds the device-derived defaults of the model wrappers
(:func:`device_defaults`) and the ``dtype`` option (:func:`checked_dtype`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import torch

from ._shapes import LengthBuckets
from ._split import tree_map

__all__ = [
    "CUDA_LENGTH_LADDER",
    "DTypeArg",
    "DeviceDefaults",
    "Placement",
    "checked_dtype",
    "cuda_batch_sizes",
    "device_defaults",
]

DTypeArg: TypeAlias = "torch.dtype | str | None"
"""A ``dtype=`` option: ``torch.float16``, ``torch.bfloat16``, ``torch.float32``, their names
(``"float16"``, ``"fp16"``, ``"half"``, ``"bfloat16"``, ``"bf16"``, ``"float32"``, ``"fp32"``),
or ``None`` (leave the model as it is)."""

_DTYPES: Final[dict[str, torch.dtype]] = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}

_REDUCED: Final = frozenset({torch.float16, torch.bfloat16})


def checked_dtype(dtype: DTypeArg, device: torch.device | None) -> torch.dtype | None:
    """``dtype`` as a ``torch.dtype`` (or None), refused where it cannot run.

    float16 needs a CUDA device (CPU matmuls in float16 are slow or missing); bfloat16 and
    float32 run anywhere.
    """
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype.removeprefix("torch.")]
    if not isinstance(dtype, torch.dtype) or dtype not in set(_DTYPES.values()):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
    on_cuda = device is not None and device.type == "cuda"
    if dtype == torch.float16 and not on_cuda:
        raise ValueError("dtype=float16 needs a CUDA device; use bfloat16 or float32 on the CPU")
    return dtype


CUDA_LENGTH_LADDER: Final = (16, 32, 64, 128, 256, 512)
"""The default length buckets on CUDA (capped at the collator's ``max_length``)."""


def cuda_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The default allowed micro-batch sizes on CUDA: ``8, 16, 32, ...`` up to ``max_batch_size``.

    Below 8 rows a GPU's time hardly depends on the row count, so small micro-batches share the
    shape of 8 rows instead of adding four more shapes.
    """
    sizes = [s for s in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if s < max_batch_size]
    return (*sizes, max_batch_size)


@dataclass(frozen=True, slots=True)
class DeviceDefaults:
    """What the model wrappers pick when not told, for one device.

    On a CUDA device:

    - ``max_batch_size`` 256 (the batcher's; the plain default is 32);
    - ``max_batch_tokens`` ``1024 x`` the device's memory in GiB
      (``torch.cuda.get_device_properties(device).total_memory``), clamped to 8192..65536
      (65536 on an 80 GB H100: 256 rows of 256 tokens), a budget sized for BERT-class encoders
      (pass your own for larger models);
    - ``length_buckets`` :data:`CUDA_LENGTH_LADDER` and ``batch_sizes``
      :func:`cuda_batch_sizes` of the batch size, so the device sees a few dozen shapes.

    On the CPU: no token budget (:class:`~batchio.integrations.transformers.SentenceEmbedder`
    sets its own), no buckets, the batcher's own batch size
    (``None`` everywhere). Padding to buckets buys nothing there (a CPU kernel costs the same for
    every shape) and costs the padded tokens.
    """

    max_batch_size: int | None = None
    max_batch_tokens: int | None = None
    length_buckets: LengthBuckets | None = None
    cuda: bool = False

    def batch_sizes(self, max_batch_size: int) -> tuple[int, ...] | None:
        """The allowed micro-batch sizes for a batcher of ``max_batch_size`` rows."""
        return cuda_batch_sizes(max_batch_size) if self.cuda else None


def device_defaults(device: torch.device | None) -> DeviceDefaults:
    """The :class:`DeviceDefaults` for ``device`` (``None``: the CPU)."""
    if device is None or device.type != "cuda":
        return DeviceDefaults()
    total = torch.cuda.get_device_properties(device).total_memory  # pragma: no cover - CUDA only
    budget = min(65536, max(8192, 1024 * (total // 2**30)))  # pragma: no cover - CUDA only
    return DeviceDefaults(256, budget, CUDA_LENGTH_LADDER, True)  # pragma: no cover - CUDA only


class Placement:
    """Where a model worker runs (``device``) and where it returns outputs (``output_device``).

    Args:
        device: the device the model runs on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
            ``torch.device``); ``None`` leaves inputs where they are.
        output_device: where outputs are returned; ``None`` leaves them on ``device``.
    """

    __slots__ = ("_finish_streams", "_lock", "_stream", "device", "dtype", "output_device")

    def __init__(
        self,
        device: str | torch.device | None,
        output_device: str | torch.device | None,
        dtype: DTypeArg = None,
    ) -> None:
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and self.device.index is None:
            # Pin "cuda" to the current device now, so the stream and the model agree later.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.output_device = None if output_device is None else torch.device(output_device)
        self.dtype = checked_dtype(dtype, self.device)
        self._stream: Any = None
        self._finish_streams: dict[torch.device, Any] = {}
        self._lock = threading.Lock()

    @property
    def is_cuda(self) -> bool:
        """True when the work runs on a CUDA device."""
        return self.device is not None and self.device.type == "cuda"

    def _cuda_stream(self) -> Any:  # pragma: no cover - needs a CUDA device
        with self._lock:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            return self._stream

    def _finish_stream(self, device: torch.device) -> Any:  # pragma: no cover - needs CUDA
        with self._lock:
            stream = self._finish_streams.get(device)
            if stream is None:
                stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
                self._finish_streams[device] = stream
            return stream

    @property
    def outputs_may_be_on_cuda(self) -> bool:
        """True when outputs can stay on a CUDA device (``output_device`` None or CUDA)."""
        out = self.output_device
        return self.is_cuda and (out is None or out.type == "cuda")

    def finish_outputs(self, tree: Any, finish: Callable[[Any], list[Any]]) -> list[Any]:
        """``finish(tree)`` (the cast to float32 and the split of one micro-batch's output).

        Call it once the outputs are complete (after :meth:`to_output`, or once the event of
        :meth:`to_output_started` has completed). Outputs on the CPU are finished here, as they
        are. Outputs left on a CUDA device were allocated on the worker's stream, and the caching
        allocator may hand their memory to the worker's next micro-batch as soon as they are
        freed: so the casts and copies run on a finishing stream of this worker (one per
        device), each source tensor is marked in use there (``record_stream``) before it can be
        freed, and this waits for that stream's work, so the results handed on are complete.
        """
        if not self.outputs_may_be_on_cuda:
            return finish(tree)
        return self._finish_on_cuda(tree, finish)  # pragma: no cover - needs a CUDA device

    def _finish_on_cuda(
        self, tree: Any, finish: Callable[[Any], list[Any]]
    ) -> list[Any]:  # pragma: no cover - needs a CUDA device
        on_cuda: list[torch.Tensor] = []

        def collect(t: torch.Tensor) -> torch.Tensor:
            if t.is_cuda:
                on_cuda.append(t)
            return t

        tree_map(collect, tree)
        if not on_cuda:
            return finish(tree)
        streams = {t.device: self._finish_stream(t.device) for t in on_cuda}
        with contextlib.ExitStack() as stack:
            for stream in streams.values():
                stack.enter_context(torch.cuda.stream(stream))
            for t in on_cuda:
                t.record_stream(streams[t.device])
            out = finish(tree)
            events = []
            for stream in streams.values():
                event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
                event.record(stream)
                events.append(event)
        for event in events:
            event.synchronize()
        return out

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Inference mode, on this worker's CUDA stream when there is one."""
        with torch.inference_mode():
            if not self.is_cuda:
                yield
                return
            with torch.cuda.stream(self._cuda_stream()):  # pragma: no cover - needs CUDA
                yield

    def to_device(self, tree: Any) -> Any:
        """Move every tensor of ``tree`` to ``device`` (asynchronously from pinned memory).

        With ``dtype``, floating-point inputs (``inputs_embeds``, say) are cast to it, as the
        model was, once on the device: a copy that also changes the dtype would go from pinned
        memory through a pageable temporary, synchronously. Inputs already on the CUDA device
        were written on another stream (the collating thread's): this worker's stream waits for
        that stream and marks them in use (``record_stream``).
        """
        device, dtype = self.device, self.dtype
        if device is None and dtype is None:
            return tree
        is_cuda = self.is_cuda
        waited = False

        def move(t: torch.Tensor) -> torch.Tensor:
            nonlocal waited
            if is_cuda and t.device == device:  # pragma: no cover - needs a CUDA device
                stream = self._cuda_stream()
                if not waited:
                    stream.wait_stream(torch.cuda.default_stream(t.device))
                    waited = True
                t.record_stream(stream)
            moved = t.to(device=device, non_blocking=is_cuda)
            if dtype is not None and moved.is_floating_point() and moved.dtype != dtype:
                moved = moved.to(dtype)
            return moved

        return tree_map(move, tree)

    def as_float32(self, tree: Any) -> Any:
        """``tree`` with float16/bfloat16 tensors as float32 (outputs of a reduced ``dtype``)."""
        if self.dtype not in _REDUCED:
            return tree
        return tree_map(lambda t: t.float() if t.dtype in _REDUCED else t, tree)

    def to_output_started(self, tree: Any) -> tuple[Any, Any]:
        """Start moving ``tree`` to ``output_device``; return it with a CUDA event (or None).

        Call it inside :meth:`running`. On CUDA the copies to the CPU land in pinned memory
        (``non_blocking=True`` from a CUDA tensor allocates it so); the tensors may be read once
        the event has completed (``event.synchronize()``). Elsewhere the event is None and the
        tensors are ready.
        """
        out_device = self.output_device
        if out_device is not None:
            non_blocking = self.is_cuda
            tree = tree_map(lambda t: t.to(out_device, non_blocking=non_blocking), tree)
        if not self.is_cuda:
            return tree, None
        # blocking=True: synchronize() sleeps on the event instead of spinning a CPU core.
        event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]  # pragma: no cover
        event.record(self._cuda_stream())  # pragma: no cover - needs a CUDA device
        return tree, event  # pragma: no cover - needs a CUDA device

    def to_output(self, tree: Any) -> Any:
        """Move ``tree`` to ``output_device`` and wait until this worker's stream is done.

        Call it inside :meth:`running`, so that the copies are queued behind the forward pass.
        """
        out_device = self.output_device
        if out_device is not None:
            non_blocking = self.is_cuda
            tree = tree_map(lambda t: t.to(out_device, non_blocking=non_blocking), tree)
        if self.is_cuda:  # pragma: no cover - needs a CUDA device
            # Results leave this thread next: they must be complete, whichever device holds them.
            self._cuda_stream().synchronize()
        return tree
