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
import traceback
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeAlias, cast

import torch

from .. import Stages
from ._collate import CollatedBatch, Collator, PreparedRow, Signature
from ._device import DTypeArg, Placement
from ._isolate import run_isolating
from ._shapes import plan_shaped_micro_batches
from ._split import split_output, tree_map

__all__ = ["AssembledBatch", "BatchForward", "Postprocess", "StagedForward", "drop_padding_rows"]

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
            top-level outputs (e.g. ``{"last_hidden_state"}``), or ``False``. ``True`` needs a
            collator without ``length_buckets``: a bucketed length is a fixed rung, which an
            output that is not per-token can match (a pooled vector of hidden size 256 or 512),
            and that output would be cut to each row's token count; name the per-token outputs
            to use both.
        postprocess: ``postprocess(output, batch)`` applied to each micro-batch's output on the
            device (pooling, say), before it is moved and split.
        dtype: cast a module to ``torch.float16`` or ``torch.bfloat16`` (or their names; also
            ``"float32"``) and run in it; floating-point outputs come back as float32. float16
            needs a CUDA device. ``None``: the model's own dtype.
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
        dtype: DTypeArg = None,
    ) -> None:
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1 or None, got {max_batch_tokens}")
        if device is None and isinstance(model, torch.nn.Module):
            device = _module_device(model)
        self.placement = Placement(device, output_device, dtype)
        if isinstance(model, torch.nn.Module):
            model.eval()
            if self.placement.device is not None or self.placement.dtype is not None:
                # One call: moving, then casting, would hold the float32 and the cast copy at once.
                model.to(device=self.placement.device, dtype=self.placement.dtype)
        self.model = model
        self.collator = collator if collator is not None else Collator()
        if strip_padding is True and self.collator.length_buckets is not None:
            raise ValueError(
                "strip_padding=True cannot be used with length_buckets: it strips every tensor "
                "whose dimension 1 is the padded length, and a bucketed length can equal the "
                "width of an output that is not per-token (a pooled vector), which would be cut; "
                'name the per-token outputs (strip_padding={"last_hidden_state"}) or pass '
                "length_buckets=None"
            )
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
            output = placement.to_output(self._forward_on_device(batch))

        def split(out: Any) -> list[Any]:
            return split_output(
                drop_padding_rows(placement.as_float32(out), batch),
                len(rows),
                lengths=batch.lengths,
                padded_length=batch.padded_length,
                padding_side=batch.padding_side,
                strip_padding=self.strip_padding,
            )

        return placement.finish_outputs(output, split)

    def _forward_on_device(self, batch: CollatedBatch) -> Any:
        """Copy ``batch`` to the device, run the model and ``postprocess`` on it (the output stays
        on the device). Called inside ``placement.running()``."""
        data = self.placement.to_device(batch.data)
        on_device = CollatedBatch(
            data, batch.lengths, batch.padded_length, batch.padding_side, batch.padding_rows
        )
        output = self.model(**data) if isinstance(data, dict) else self.model(data)
        if self.postprocess is not None:
            output = self.postprocess(output, on_device)
        return output


class MicroBatch:
    """One micro-batch on its way through the stages: which rows, their batch, then its output."""

    __slots__ = ("batch", "error", "event", "output", "positions", "rows")

    def __init__(self, positions: list[int], rows: list[PreparedRow]) -> None:
        self.positions = positions  # indices into the rows given to assemble
        self.rows = rows
        self.batch: CollatedBatch | None = None
        self.output: Any = None
        self.event: Any = None  # a CUDA event recorded after the copies out, or None
        self.error: Exception | None = None


class AssembledBatch:
    """What :meth:`StagedForward.assemble` hands the device stage, and the device stage finish.

    Attributes:
        size: rows given to ``assemble`` (``finish`` returns one result per row, in that order).
        micro_batches: the micro-batches, collated (and pinned, on CUDA) by ``assemble``; after
            ``run``, each holds its output (or its error) and the event to wait for.
    """

    __slots__ = ("micro_batches", "size")

    def __init__(self, size: int, micro_batches: list[MicroBatch]) -> None:
        self.size = size
        self.micro_batches = micro_batches


class StagedForward(BatchForward):
    """:class:`BatchForward` split into the stages of a :class:`batchio.Stages`.

    ``finish(run(assemble(prepare(rows))))`` computes what ``BatchForward(rows)`` does, with each
    part on the thread where it belongs:

    - :meth:`prepare` (CPU, in parallel): :meth:`Collator.prepare` per row; a row that cannot run
      gets its :class:`CollationError` at once.
    - :meth:`assemble` (CPU): group rows by signature, sort by length, plan micro-batches under
      ``max_batch_tokens`` at their padded shape, and collate each (padded to the collator's
      length buckets and batch sizes; in pinned memory on CUDA).
    - :meth:`run` (the device thread, device work only): per micro-batch, copy in
      (``non_blocking``, on this worker's CUDA stream), forward under ``inference_mode``,
      ``postprocess``, start the copies out to pinned CPU memory, record a CUDA event. Nothing
      here waits for the device.
    - :meth:`finish` (CPU): wait on each micro-batch's event, cast reduced precision outputs to
      float32, split into rows and put them back in the order given (outputs left on CUDA are
      cast and split on a finishing stream, waited for: see :meth:`Placement.finish_outputs`).

    On the CPU the same code runs without streams or events.

    A micro-batch whose forward pass raises is re-run in halves *inside* :meth:`run` (collating
    the halves there: the failure path only), so each row that fails alone gets the model's own
    exception and every other row its result, with or without the batcher's
    ``isolate_errors``; :meth:`run` itself raises only what is not an ``Exception``. (An error
    raised asynchronously by a CUDA kernel, such as a device-side assert, surfaces in
    :meth:`finish` for the whole micro-batch, and usually leaves the CUDA context unusable.)

    Calling the object with a list of rows runs the four stages in sequence, on the calling
    thread. :meth:`stages` builds the :class:`batchio.Stages`.
    """

    def __call__(self, rows: Sequence[Any]) -> list[Any]:
        """Run all four stages on ``rows`` here; one result (or ``Exception``) per row."""
        prepared = self.prepare(rows)
        results: list[Any] = list(prepared)
        live = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
        if live:
            rows = [cast(PreparedRow, prepared[i]) for i in live]
            done = self.finish(self.run(self.assemble(rows)))
            for i, out in zip(live, done, strict=True):
                results[i] = out
        return results

    def prepare(self, rows: Sequence[Any]) -> list[PreparedRow | Exception]:
        """:meth:`Collator.prepare` each row: a :class:`PreparedRow`, or the row's error."""
        out: list[PreparedRow | Exception] = []
        prepare = self.collator.prepare
        for row in rows:
            try:
                out.append(prepare(row))
            except Exception as exc:
                out.append(exc)
        return out

    def assemble(self, prepared: Sequence[PreparedRow]) -> AssembledBatch:
        """Plan and collate the micro-batches of ``prepared`` (rows from :meth:`prepare`)."""
        by_signature: dict[Signature, list[int]] = {}
        for i, p in enumerate(prepared):
            by_signature.setdefault(p.signature, []).append(i)
        micro: list[MicroBatch] = []
        for indices in by_signature.values():
            for group in self.plan([prepared[i].length for i in indices]):
                positions = [indices[j] for j in group]
                mb = MicroBatch(positions, [prepared[i] for i in positions])
                try:
                    mb.batch = self.collator.collate(mb.rows, pin_memory=self.placement.is_cuda)
                except Exception as exc:
                    mb.error = exc
                micro.append(mb)
        return AssembledBatch(len(prepared), micro)

    def run(self, assembled: AssembledBatch) -> AssembledBatch:
        """The device stage: start every micro-batch's forward pass and copies out."""
        done: list[MicroBatch] = []
        for mb in assembled.micro_batches:
            if mb.error is not None or mb.batch is None:
                done.append(mb)
            else:
                done.extend(self._launch_isolating(mb))
        assembled.micro_batches = done
        return assembled

    def _launch_isolating(self, mb: MicroBatch) -> list[MicroBatch]:
        assert mb.batch is not None
        try:
            self._launch(mb, mb.batch)
        except Exception as exc:
            traceback.clear_frames(exc.__traceback__)
            if len(mb.rows) == 1:
                mb.error = exc
                return [mb]
        else:
            return [mb]
        # Outside the except block, so the halves' errors do not chain to this one.
        mid = len(mb.rows) // 2
        halves: list[MicroBatch] = []
        for lo, hi in ((0, mid), (mid, len(mb.rows))):
            half = MicroBatch(mb.positions[lo:hi], mb.rows[lo:hi])
            try:
                half.batch = self.collator.collate(half.rows, pin_memory=self.placement.is_cuda)
            except Exception as exc:
                half.error = exc
                halves.append(half)
                continue
            halves.extend(self._launch_isolating(half))
        return halves

    def _launch(self, mb: MicroBatch, batch: CollatedBatch) -> None:
        placement = self.placement
        with placement.running():
            output = self._forward_on_device(batch)
            # Cut the padding rows on the device: they need not cross to the host.
            output = drop_padding_rows(output, batch)
            mb.output, mb.event = placement.to_output_started(output)

    def finish(self, assembled: AssembledBatch) -> list[Any]:
        """Wait for the copies, split each micro-batch's output; one result per row, in order."""
        results: list[Any] = [None] * assembled.size
        for mb in assembled.micro_batches:
            outs: list[Any]
            if mb.error is not None or mb.batch is None:
                outs = [mb.error] * len(mb.positions)
            else:
                try:
                    if mb.event is not None:  # pragma: no cover - needs a CUDA device
                        mb.event.synchronize()
                    outs = self.placement.finish_outputs(mb.output, self._splitter(mb.batch))
                except Exception as exc:
                    outs = [exc] * len(mb.positions)
            for i, out in zip(mb.positions, outs, strict=True):
                results[i] = out
            # Release the pinned buffers and outputs now, not when the whole batch is dropped.
            mb.batch = mb.output = mb.event = None
        return results

    def _splitter(self, batch: CollatedBatch) -> Callable[[Any], list[Any]]:
        def split(output: Any) -> list[Any]:
            return split_output(
                self.placement.as_float32(output),
                batch.real_rows,
                lengths=batch.lengths,
                padded_length=batch.padded_length,
                padding_side=batch.padding_side,
                strip_padding=self.strip_padding,
            )

        return split

    def stages(
        self, *, prepare_workers: int = 2, device: Any = None, weight: int = 1
    ) -> Stages[Any, Any]:
        """A :class:`batchio.Stages` of these four functions (``device``: a shared
        :class:`batchio.DeviceExecutor`)."""
        return Stages(
            prepare=self.prepare,
            assemble=self.assemble,
            run=self.run,
            finish=self.finish,
            prepare_workers=prepare_workers,
            device=device,
            weight=weight,
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
