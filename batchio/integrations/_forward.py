"""The model worker's batch function: collate, micro-batch, run the model, split.

:class:`BatchForward` is a plain synchronous batch function (``rows -> one result per row``), so a
:class:`batchio.Batcher` runs it on its worker thread: no collation or model work ever touches the
event loop. A row that cannot join the batch gets a :class:`CollationError` in its slot; a
micro-batch whose forward pass raises gets that exception in each of its rows' slots; every other
row still gets its result.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeAlias

import torch

from ._collate import CollatedBatch, CollationError, Collator, PreparedRow
from ._device import Placement
from ._microbatch import plan_micro_batches
from ._split import split_output

__all__ = ["BatchForward", "Postprocess"]

Postprocess: TypeAlias = Callable[[Any, CollatedBatch], Any]
"""``postprocess(model_output, batch) -> output``: runs on the device, before outputs are split."""


class BatchForward:
    """A batch function that runs ``model`` over padded, length-sorted micro-batches of rows.

    Call it with a list of rows (see :class:`Collator` for what a row is); it returns one result,
    or one exception, per row, in order. Use it as the ``fn`` of a :class:`batchio.Batcher`, or
    through :class:`BatchedModule`, which does that for you.

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
            of a batch are sorted by length and run in micro-batches under this budget, which
            bounds memory and cuts padding. ``None``: one forward pass per batch.
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
        for i, row in enumerate(rows):
            try:
                prepared[i] = self.collator.prepare(row)
            except CollationError as exc:
                results[i] = exc
        if not prepared:
            return results
        reference_sig = self.collator.reference_signature(list(prepared.values()))
        reference = next(p for p in prepared.values() if p.signature == reference_sig)
        valid: list[int] = []
        for i, p in prepared.items():
            if p.signature == reference_sig:
                valid.append(i)
            else:
                results[i] = self.collator.mismatch(p, reference)
        groups = plan_micro_batches([prepared[i].length for i in valid], self.max_batch_tokens)
        for group in groups:
            indices = [valid[j] for j in group]
            try:
                outputs = self.run_micro_batch([prepared[i] for i in indices])
            except Exception as exc:
                # The error outlives this call (callers hold it); its frames must not keep the
                # batch's tensors, possibly gigabytes of device memory, alive with it.
                traceback.clear_frames(exc.__traceback__)
                for i in indices:
                    results[i] = exc
            else:
                for i, out in zip(indices, outputs, strict=True):
                    results[i] = out
        return results

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
            output,
            len(rows),
            lengths=batch.lengths,
            padded_length=batch.padded_length,
            padding_side=batch.padding_side,
            strip_padding=self.strip_padding,
        )


def _module_device(module: torch.nn.Module) -> torch.device | None:
    """The device of a module's first parameter or buffer, or None when it is on the CPU."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    if tensor is None or tensor.device.type == "cpu":
        return None
    return tensor.device
