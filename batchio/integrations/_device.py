"""Device placement for a model worker: where inputs go, where the work runs, where outputs land.

On a CUDA device the batch is collated in pinned memory and copied with ``non_blocking=True`` on a
CUDA stream the worker owns, the forward pass is queued on that stream, and outputs are copied back
the same way; the worker waits for its stream once per micro-batch, so results are complete when it
returns them. Owning a stream keeps this model's copies and kernels off the default stream, where
other models or the application may be working.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ._split import tree_map

__all__ = ["Placement"]


class Placement:
    """Where a model worker runs (``device``) and where it returns outputs (``output_device``).

    Args:
        device: the device the model runs on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
            ``torch.device``); ``None`` leaves inputs where they are.
        output_device: where outputs are returned; ``None`` leaves them on ``device``.
    """

    __slots__ = ("_lock", "_stream", "device", "output_device")

    def __init__(
        self, device: str | torch.device | None, output_device: str | torch.device | None
    ) -> None:
        self.device = None if device is None else torch.device(device)
        if self.device is not None and self.device.type == "cuda" and self.device.index is None:
            # Pin "cuda" to the current device now, so the stream and the model agree later.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.output_device = None if output_device is None else torch.device(output_device)
        self._stream: Any = None
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
        """Move every tensor of ``tree`` to ``device`` (asynchronously from pinned memory)."""
        device = self.device
        if device is None:
            return tree
        non_blocking = self.is_cuda
        return tree_map(lambda t: t.to(device, non_blocking=non_blocking), tree)

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
