"""PyTorch integration: batch tensor and tokenizer-style inputs for a model behind a Batcher.

::

    from batchio.integrations.torch import BatchedModule

    async with BatchedModule(model, max_batch_size=32, max_batch_tokens=8192) as m:
        out = await m({"input_ids": ids})      # one row in, that row's output back
        outs = await m.rows(tokenizer(texts, padding=True, return_tensors="pt"))  # k rows

Collation, the forward pass (under ``torch.inference_mode()``) and splitting all run on the
batcher's worker thread. Importing this module imports torch; ``import batchio`` does not.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Unpack

import anyio.to_thread
import torch

from .. import DEFAULT, Batcher, BatcherOptions, BatcherOptionsKw, TimeoutArg
from ._collate import (
    DEFAULT_LENGTH_GROUPS,
    DEFAULT_PAD_VALUES,
    CollatedBatch,
    CollationError,
    Collator,
    PaddingSide,
    PreparedRow,
)
from ._device import Placement
from ._forward import BatchForward, Postprocess
from ._microbatch import plan_micro_batches
from ._owner import BatcherOwner, own_batcher
from ._split import split_output, stack_outputs

__all__ = [
    "DEFAULT_LENGTH_GROUPS",
    "DEFAULT_PAD_VALUES",
    "BatchForward",
    "BatchedModule",
    "CollatedBatch",
    "CollationError",
    "Collator",
    "PaddingSide",
    "Placement",
    "Postprocess",
    "PreparedRow",
    "plan_micro_batches",
    "split_output",
    "split_rows",
    "stack_outputs",
]


def split_rows(batch: Any) -> list[Any]:
    """Split a batch (a tensor, or a mapping of tensors such as a tokenizer's output) into rows.

    Row ``i`` of a mapping holds row ``i`` of each value. Rows are views, so this is cheap.

    Raises:
        CollationError: the values do not all have the same number of rows.
    """
    if isinstance(batch, Mapping):
        columns = {key: _as_batch_tensor(v, f"key {key!r}") for key, v in batch.items()}
        sizes = {key: t.shape[0] for key, t in columns.items()}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{k}={n}" for k, n in sizes.items())
            raise CollationError(f"the batch's values have different numbers of rows: {listed}")
        n = next(iter(sizes.values()), 0)
        return [{key: t[i] for key, t in columns.items()} for i in range(n)]
    return list(_as_batch_tensor(batch, "the batch").unbind(0))


def _as_batch_tensor(value: object, what: str) -> torch.Tensor:
    try:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CollationError(
            f"{what} cannot become one tensor ({exc}); pad the batch (padding=True) or submit "
            "its rows with map()"
        ) from None
    if t.ndim == 0:
        raise CollationError(f"{what} is 0-d; a batch needs a leading row dimension")
    return t


class BatchedModule(BatcherOwner[Any, Any]):
    """A PyTorch model behind a :class:`batchio.Batcher`: ``await m(row)`` returns that row's output.

    It owns the batcher: use it as an async context manager. Its batch function is a
    :class:`BatchForward` (``m.forward``), which you can also call directly with a list of rows.

    Args:
        model: a ``torch.nn.Module`` or any callable (see :class:`BatchForward`).
        device: where the model runs: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``None``: where the
            module's parameters are. On CUDA, inputs are pinned and copied asynchronously and the
            work runs on a stream this worker owns.
        output_device: where results are returned (default ``"cpu"``); ``None`` keeps them on
            ``device``.
        padding_side, pad_values, attention_mask, position_ids: how rows are padded; see
            :class:`Collator`. Ignored when ``collator`` is given.
        collator: a ready :class:`Collator` (also for its ``length_groups`` and ``max_length``).
        max_batch_tokens: the padded-token budget of one forward pass (length-sorted
            micro-batches); ``None`` for one pass per batch.
        strip_padding: which outputs are per-token, returned without padding (see
            :class:`BatchForward`).
        postprocess: applied to each micro-batch's output on the device (see :class:`BatchForward`).
        options: a :class:`batchio.BatcherOptions` to start from.
        **batcher_options: any option of :class:`batchio.BatcherOptions` (``max_batch_size``,
            ``max_wait``, ``timeout``, ``batch_time_limit``, ...), validated the same way;
            the batcher's ``name`` defaults to the model's class name.
    """

    def __init__(
        self,
        model: Any,
        *,
        device: str | torch.device | None = None,
        output_device: str | torch.device | None = "cpu",
        padding_side: PaddingSide = "right",
        pad_values: Mapping[str, float] | None = None,
        attention_mask: str | None = "attention_mask",
        position_ids: str | None = None,
        collator: Collator | None = None,
        max_batch_tokens: int | None = None,
        strip_padding: bool | Collection[str | int] = False,
        postprocess: Postprocess | None = None,
        options: BatcherOptions | None = None,
        **batcher_options: Unpack[BatcherOptionsKw],
    ) -> None:
        if collator is None:
            collator = Collator(
                padding_side=padding_side,
                pad_values=dict(pad_values or {}),
                attention_mask=attention_mask,
                position_ids=position_ids,
            )
        self.forward = BatchForward(
            model,
            collator=collator,
            device=device,
            output_device=output_device,
            max_batch_tokens=max_batch_tokens,
            strip_padding=strip_padding,
            postprocess=postprocess,
        )
        self.batcher: Batcher[Any, Any] = own_batcher(
            self.forward, options, batcher_options, name=type(model).__name__
        )

    async def __call__(self, row: Any, *, timeout: TimeoutArg = DEFAULT) -> Any:
        """Run one row (a tensor, or a mapping of 1-D tensors) and return its output.

        ``timeout``: seconds, ``None`` for no deadline, or the ``timeout`` option by default.

        Raises:
            CollationError: this row cannot run at all (the others still run).
            Exception: whatever the model raised for this row alone; a forward pass that fails is
                re-run in halves, so rows that run fine still get their results.
        """
        return await self.batcher(row, timeout=timeout)

    async def rows(self, batch: Any, *, timeout: TimeoutArg = DEFAULT) -> Any:
        """Run a batch of k rows (a tensor, or a mapping of tensors with k rows each) as one request.

        The k rows count k toward ``max_batch_size`` and may share forward passes with other
        requests; the result is stacked back into one batch output of k rows. Rows that carry
        padding (a padded tokenizer output) are trimmed to their attention mask first; per-token
        outputs whose padding was stripped are re-padded with zeros on ``padding_side``.
        """
        rows = split_rows(batch)
        if not rows:
            raise CollationError("the batch has no rows")
        outputs = await self.batcher.map(rows, timeout=timeout)
        side = self.forward.collator.padding_side
        # Stacking copies every row: keep that off the event loop too.
        return await anyio.to_thread.run_sync(stack_outputs, outputs, side)


# Tracebacks and reprs name the public module, not the private one each class lives in.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("batchio.integrations._"):
        _obj.__module__ = __name__
del _name, _obj
