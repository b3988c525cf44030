"""The model worker's batch function: collate, micro-batch, run the model, split.

:class:`BatchForward` is a plain synchronous batch function (``rows -> one result per row``), so a
:class:`batchio.Batcher` runs it on its worker thread: no collation or model work ever touches the
event loop. Rows are grouped by signature (rows that differ in keys, dtypes or per-token shapes
run as separate micro-batches of the same batch). A row that cannot run at all gets a
:class:`CollationError` in its slot. A micro-batch whose forward pass raises is re-run in halves,
so each row that fails alone gets its own exception and every other row its result.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeAlias

import torch

from ._collate import CollatedBatch, Collator, PreparedRow, Signature
from ._device import Placement
from ._isolate import run_isolating
from ._shapes import plan_shaped_micro_batches
from ._split import split_output, tree_map

__all__ = ["BatchForward", "Postprocess", "drop_padding_rows"]

Postprocess: TypeAlias = Callable[[Any, CollatedBatch], Any]
"""``postprocess(model_output, batch) -> output``: runs on the device, before outputs are split."""


class BatchForward:
    """A batch function that runs ``model`` over padded, length-sorted micro-batches of rows.

    Call it with a list of rows (see :class:`Collator` for what a row is); it returns one result,
    or one exception, per row, in order. Use it as the ``fn`` of a :class:`batchio.Batcher`, or
    through :class:`BatchedModule`, which does that for you.

    A bad row fails alone. One that cannot run at all gets a :class:`CollationError`; rows that
    differ from their neighbours (another dtype, key set or per-token shape) run in micro-batches
    of their own; and a forward pass that raises is re-run in halves until each failing row is
    alone, so that row gets the model's own exception and the others their results.

    Args:
        model: a ``torch.nn.Module`` or any callable; called as ``model(**batch)`` for rows that
            are mappings and ``model(batch)`` for tensor rows. A module is put in eval mode and,
            with ``device``, moved there.
        collator: how rows are padded and stacked (default: right padding, Hugging Face pad
            values, attention mask built when missing).
        device: where the model runs; see :class:`Placement`. ``None``: where the module's
            parameters are, when they are not on the CPU (inputs are moved there).
        output_device: where results are returned; ``None`` keeps them on ``device``.
        max_batch_tokens: the most padded tokens (longest row x rows) per forward pass. The rows
            of a batch that share a signature are sorted by length and run in micro-batches
            under this budget, which bounds memory and cuts padding. ``None``: one forward pass
            per signature.
        strip_padding: which outputs are per-token, to return only each row's real tokens:
            ``True`` (every tensor whose dimension 1 is the padded length), names or indices of
            top-level outputs (e.g. ``{"last_hidden_state"}``), or ``False``.
        postprocess: ``postprocess(output, batch)`` applied to each micro-batch's output on the
            device (pooling, say), before it is moved and split.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        collator: Collator | None = None,
        device: str | torch.device | None = None,
        output_device: str | torch.device | None = "cpu",
        max_batch_tokens: int | None = None,
        strip_padding: bool | Collection[str | int] = False,
        postprocess: Postprocess | None = None,
    ) -> None:
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
        if device is None and isinstance(model, torch.nn.Module):
            device = _module_device(model)
        self.placement = Placement(device, output_device)
        if isinstance(model, torch.nn.Module):
            model.eval()
            if self.placement.device is not None:
                model.to(self.placement.device)
        self.model = model
        self.collator = collator if collator is not None else Collator()
        self.max_batch_tokens = max_batch_tokens
        self.strip_padding: bool | frozenset[str | int] = (
            strip_padding if isinstance(strip_padding, bool) else frozenset(strip_padding)
        )
        self.postprocess = postprocess

    def __call__(self, rows: Sequence[Any]) -> list[Any]:
        """Run the model over ``rows``; return one result (or ``Exception``) per row, in order."""
        results: list[Any] = [None] * len(rows)
        prepared: dict[int, PreparedRow] = {}
        by_signature: dict[Signature, list[int]] = {}
        for i, row in enumerate(rows):
            try:
                p = self.collator.prepare(row)
            except Exception as exc:  # a row that cannot even be prepared fails alone
                results[i] = exc
                continue
            prepared[i] = p
            by_signature.setdefault(p.signature, []).append(i)

        def run(indices: Sequence[int]) -> list[Any]:
            return self.run_micro_batch([prepared[i] for i in indices])

        for indices in by_signature.values():
            lengths = [prepared[i].length for i in indices]
            for group in self.plan(lengths):
                members = [indices[j] for j in group]
                for i, out in zip(members, run_isolating(run, members), strict=True):
                    results[i] = out
        return results

    def plan(self, lengths: Sequence[int]) -> list[list[int]]:
        """Micro-batches (lists of indices into ``lengths``) for rows of one signature.

        Length-sorted under ``max_batch_tokens``, each costed at its padded shape (the
        collator's ``length_buckets`` and ``batch_sizes``) and no larger than its largest
        allowed batch size.
        """
        c = self.collator
        shaped = c.length_buckets is not None or c.batch_sizes is not None
        return plan_shaped_micro_batches(
            lengths,
            self.max_batch_tokens,
            padded_length=c.padded_length if shaped else None,
            padded_rows=c.padded_rows if shaped else None,
            max_rows=c.max_rows,
        )

    def run_micro_batch(self, rows: Sequence[PreparedRow]) -> list[Any]:
        """Collate rows that share a signature, run one forward pass, and split its output."""
        placement = self.placement
        batch = self.collator.collate(rows, pin_memory=placement.is_cuda)
        with placement.running():
            data = placement.to_device(batch.data)
            on_device = CollatedBatch(data, batch.lengths, batch.padded_length, batch.padding_side)
            output = self.model(**data) if isinstance(data, dict) else self.model(data)
            if self.postprocess is not None:
                output = self.postprocess(output, on_device)
            output = placement.to_output(output)
        return split_output(
            drop_padding_rows(output, batch),
            len(rows),
            lengths=batch.lengths,
            padded_length=batch.padded_length,
            padding_side=batch.padding_side,
            strip_padding=self.strip_padding,
        )


def drop_padding_rows(output: Any, batch: CollatedBatch) -> Any:
    """``output`` without the rows that belong to ``batch``'s padding rows.

    Only tensors with one row per batch row are cut; anything else is left for
    :func:`split_output` to judge (a tensor of another row count is a size mismatch there).
    """
    if not batch.padding_rows:
        return output
    total, real = batch.rows, batch.real_rows

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[:real] if t.ndim and t.shape[0] == total else t

    return tree_map(cut, output)


def _module_device(module: torch.nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer, or None when it is on the CPU."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    if tensor is None or tensor.device.type == "cpu":
        return None
    return tensor.device
