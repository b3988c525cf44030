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

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Unpack

import anyio.to_thread
import torch

from .. import DEFAULT, Batcher, BatcherOptions, BatcherOptionsKw, DeviceExecutor, TimeoutArg
from ._collate import (
    DEFAULT_LENGTH_GROUPS,
    DEFAULT_PAD_VALUES,
    CollatedBatch,
    CollationError,
    Collator,
    PaddingSide,
    PreparedRow,
)
from ._device import DeviceDefaults, DTypeArg, Placement, device_defaults
from ._forward import AssembledBatch, BatchForward, Postprocess, StagedForward
from ._microbatch import plan_micro_batches
from ._owner import BatcherOwner
from ._split import split_output, stack_outputs
from ._wrap import AUTO, Auto, check_device_executor, make_batcher, resolve_device, setup

__all__ = [
    "DEFAULT_LENGTH_GROUPS",
    "DEFAULT_PAD_VALUES",
    "AssembledBatch",
    "BatchForward",
    "BatchedModule",
    "CollatedBatch",
    "CollationError",
    "Collator",
    "DTypeArg",
    "DeviceDefaults",
    "PaddingSide",
    "Placement",
    "Postprocess",
    "PreparedRow",
    "StagedForward",
    "device_defaults",
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

    It owns the batcher: use it as an async context manager. By default the batcher is staged
    (:class:`batchio.Stages`): rows are checked on ``prepare_workers`` threads as they arrive,
    the next batch is padded into (pinned) buffers while this one runs, the device thread only
    copies in, runs the model and starts the copies out, and results are split on a thread of
    their own. ``m.forward`` is the :class:`StagedForward` doing that, which you can also call
    directly with a list of rows. ``staged=False`` gives the plain form: one worker thread runs a
    :class:`BatchForward` over each batch, start to finish.

    Defaults that depend on the device (see :class:`DeviceDefaults`): on CUDA, the batcher's
    ``max_batch_size`` is 256, ``max_batch_tokens`` follows the device's memory, lengths pad to
    the ladder ``(16, 32, ..., 512)`` and micro-batches to ``8, 16, 32, ...`` rows; on the CPU,
    the batcher's own ``max_batch_size``, no token budget, no buckets (as before).

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
            micro-batches); ``None`` for one pass per batch; ``"auto"`` (default): the device's.
        length_buckets, batch_sizes: shape buckets (see :class:`Collator`); ``"auto"``
            (default): the device's. Ignored when ``collator`` is given.
        dtype: run a module in ``torch.float16`` / ``torch.bfloat16`` (or ``"float16"``,
            ``"bfloat16"``, ``"float32"``); outputs come back as float32. float16 needs CUDA.
        staged: ``True`` (default) for the staged batcher, ``False`` for the plain one.
        prepare_workers: threads that prepare rows (staged only).
        device_executor: a :class:`batchio.DeviceExecutor` whose one thread runs the device
            stage of this model and of every other batcher that names it (staged only);
            ``device_weight`` is this model's share of it.
        strip_padding: which outputs are per-token, returned without padding (see
            :class:`BatchForward`). With ``True``, ``length_buckets="auto"`` means no length
            buckets (``True`` cannot tell a per-token output from one as wide as a bucket);
            name the per-token outputs to keep the device's buckets.
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
        max_batch_tokens: int | Auto | None = AUTO,
        length_buckets: int | Sequence[int] | Auto | None = AUTO,
        batch_sizes: Sequence[int] | Auto | None = AUTO,
        strip_padding: bool | Collection[str | int] = False,
        postprocess: Postprocess | None = None,
        dtype: DTypeArg = None,
        staged: bool = True,
        prepare_workers: int = 2,
        device_executor: DeviceExecutor | None = None,
        device_weight: int = 1,
        options: BatcherOptions | None = None,
        **batcher_options: Unpack[BatcherOptionsKw],
    ) -> None:
        check_device_executor(device_executor, staged)
        chosen = setup(
            resolve_device(model, device),
            options,
            batcher_options,
            max_batch_tokens=max_batch_tokens,
            # strip_padding=True cannot run with length buckets (see BatchForward): the
            # device's default gives way to it; an explicit choice is refused there.
            length_buckets=None
            if strip_padding is True and length_buckets == AUTO
            else length_buckets,
            batch_sizes=batch_sizes,
            name=type(model).__name__,
        )
        if collator is None:
            collator = Collator(
                padding_side=padding_side,
                pad_values=dict(pad_values or {}),
                attention_mask=attention_mask,
                position_ids=position_ids,
                length_buckets=chosen.length_buckets,
                batch_sizes=chosen.batch_sizes,
            )
        forward_type = StagedForward if staged else BatchForward
        self.forward: BatchForward = forward_type(
            model,
            collator=collator,
            device=device,
            output_device=output_device,
            max_batch_tokens=chosen.max_batch_tokens,
            strip_padding=strip_padding,
            postprocess=postprocess,
            dtype=dtype,
        )
        stages = (
            self.forward.stages(
                prepare_workers=prepare_workers, device=device_executor, weight=device_weight
            )
            if isinstance(self.forward, StagedForward)
            else None
        )
        self.batcher: Batcher[Any, Any] = make_batcher(self.forward, stages, chosen.options)

    async def __call__(self, row: Any, *, timeout: TimeoutArg = DEFAULT, priority: int = 0) -> Any:
        """Run one row (a tensor, or a mapping of 1-D tensors) and return its output.

        ``timeout``: seconds, ``None`` for no deadline, or the ``timeout`` option by default.
        ``priority``: higher is served first (see :doc:`scheduling`).

        Raises:
            CollationError: this row cannot run at all (the others still run).
            Exception: whatever the model raised for this row alone; a forward pass that fails is
                re-run in halves, so rows that run fine still get their results.
        """
        return await self.batcher(row, timeout=timeout, priority=priority)

    async def rows(self, batch: Any, *, timeout: TimeoutArg = DEFAULT, priority: int = 0) -> Any:
        """Run a batch of k rows (a tensor, or a mapping of tensors with k rows each) as one request.

        The k rows count k toward ``max_batch_size`` and may share forward passes with other
        requests; the result is stacked back into one batch output of k rows. Rows that carry
        padding (a padded tokenizer output) are trimmed to their attention mask first; per-token
        outputs whose padding was stripped are re-padded with zeros on ``padding_side``.
        """
        rows = split_rows(batch)
        if not rows:
            raise CollationError("the batch has no rows")
        outputs = await self.batcher.map(rows, timeout=timeout, priority=priority)
        side = self.forward.collator.padding_side
        # Stacking copies every row: keep that off the event loop too.
        return await anyio.to_thread.run_sync(stack_outputs, outputs, side)


# Tracebacks and reprs name the public module, not the private one each class lives in.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("batchio.integrations._"):
        _obj.__module__ = __name__
del _name, _obj
