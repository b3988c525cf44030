"""A transformers ``Pipeline`` split into the stages of a :class:`batchio.Stages`.

A pipeline computes ``postprocess(forward(preprocess(x)))``; a list call batches the middle with
``pad_collate_fn`` and splits the batched forward output back into per-input outputs
(``PipelineIterator.loader_batch_item``). :class:`PipelineStages` does the same work, with each
part on the thread where it belongs:

- ``prepare`` (the prepare thread): ``pipe.preprocess`` per input; an input whose preprocess
  raises gets its exception in its slot, and fails alone, at once;
- ``assemble`` (its own thread): ``pad_collate_fn`` over the prepared inputs;
- ``run`` (the device thread, only this): ``pipe.forward`` (which moves the batch to the
  pipeline's device, runs ``_forward`` under the pipeline's inference context and brings the
  outputs back to the CPU);
- ``finish`` (its own thread): split the output per input and ``pipe.postprocess`` each; an input
  whose postprocess raises gets its exception.

The batches the model sees are the ones the list call ``pipe(inputs, batch_size=len(inputs))``
builds, so the results are the same: one batch of all the inputs (a single input is not
collated, as the pipeline does not collate at ``batch_size=1``). A ``ChunkPipeline`` whose
preprocess yields several chunks per input (token classification with ``stride``) runs its
chunks in consecutive groups of ``len(inputs)``, as the list call does, and ``postprocess``
gets each input's chunks together.

Only pipelines whose ``__call__`` is one this module knows to reproduce are staged (see
:func:`unstaged_reason`); the others (question answering, zero-shot classification, speech
recognition, text generation: each prepares its inputs or parameters in its own ``__call__``) run
the plain form.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np
import torch
from transformers.pipelines.base import ChunkPipeline, Pipeline
from transformers.pipelines.base import pad_collate_fn as _untyped_pad_collate_fn
from transformers.pipelines.feature_extraction import FeatureExtractionPipeline
from transformers.pipelines.fill_mask import FillMaskPipeline
from transformers.pipelines.text_classification import TextClassificationPipeline
from transformers.pipelines.token_classification import TokenClassificationPipeline
from transformers.utils.generic import ModelOutput

from .. import DeviceExecutor, Stages

__all__ = ["AssembledInputs", "PipelineStages", "split_batched_output", "unstaged_reason"]

pad_collate_fn: Callable[[Any, Any], Callable[[list[Any]], Any]] = _untyped_pad_collate_fn

# The ``__call__`` methods whose work before ``Pipeline.__call__`` is only what
# ``_sanitize_parameters`` of the call's keywords also does (or, for the list calls the plain
# form makes, nothing): ``Pipeline.__call__`` itself, and the overrides of the common text tasks.
_KNOWN_CALLS: Final = frozenset(
    {
        Pipeline.__call__,
        TextClassificationPipeline.__call__,
        TokenClassificationPipeline.__call__,
        FeatureExtractionPipeline.__call__,
        FillMaskPipeline.__call__,
    }
)


def unstaged_reason(pipe: Any) -> str | None:
    """Why ``pipe`` cannot run staged, or None when it can."""
    if not isinstance(pipe, Pipeline):
        return f"{type(pipe).__name__} is not a transformers Pipeline"
    if type(pipe).__call__ not in _KNOWN_CALLS:
        return (
            f"{type(pipe).__name__} prepares its inputs in its own __call__, which the staged "
            "form does not reproduce"
        )
    try:
        pad_collate_fn(pipe.tokenizer, _feature_extractor(pipe))
    except ValueError as exc:  # no tokenizer, feature extractor or pad token: no batching
        return str(exc)
    return None


def _feature_extractor(pipe: Any) -> Any:
    # As Pipeline.get_iterator picks it.
    fe = getattr(pipe, "feature_extractor", None)
    return fe if fe is not None else getattr(pipe, "image_processor", None)


class AssembledInputs:
    """What :meth:`PipelineStages.assemble` hands the device stage, and the device stage finish.

    Attributes:
        counts: chunks per input, in the order given to ``assemble`` (1 each, unless chunked).
        groups: the forward batches (collated, unless a single input), in order; after ``run``,
            the forward outputs, one per group.
        sizes: chunks in each group.
        collated: whether the groups are collated batches (to be split) or single chunks.
    """

    __slots__ = ("collated", "counts", "groups", "sizes")

    def __init__(
        self, counts: list[int], groups: list[Any], sizes: list[int], collated: bool
    ) -> None:
        self.counts = counts
        self.groups = groups
        self.sizes = sizes
        self.collated = collated


class PipelineStages:
    """The four stages of a transformers pipeline (see the module docstring).

    The parameters of each step are those of one call ``pipe(inputs, **call_kwargs)``:
    ``pipe._sanitize_parameters(**call_kwargs)`` over the pipeline's own, resolved once, here (so
    a bad parameter raises now). The tokenizer is not safe to use from two threads
    at once (a call reconfigures its backend), so ``preprocess`` and ``postprocess`` take turns
    under one lock; ``forward`` and the collation do not take it.

    Args:
        pipe: the pipeline; :func:`unstaged_reason` must be None for it.
        call_kwargs: the keyword arguments of each pipeline call (``top_k=None``, ...).
    """

    def __init__(self, pipe: Any, call_kwargs: dict[str, Any]) -> None:
        reason = unstaged_reason(pipe)
        if reason is not None:
            raise ValueError(f"this pipeline cannot run staged: {reason}")
        self.pipe = pipe
        pre, fwd, post = pipe._sanitize_parameters(**call_kwargs)
        # Fused as Pipeline.__call__ does it, without changing the pipeline's own.
        self.preprocess_params: dict[str, Any] = {**pipe._preprocess_params, **pre}
        self.forward_params: dict[str, Any] = {**pipe._forward_params, **fwd}
        self.postprocess_params: dict[str, Any] = {**pipe._postprocess_params, **post}
        self.collate = pad_collate_fn(pipe.tokenizer, _feature_extractor(pipe))
        self.chunked = isinstance(pipe, ChunkPipeline)
        """Whether preprocess yields chunks (a ``ChunkPipeline``) and postprocess takes a list."""
        self._lock = _lock_for(pipe)

    def __call__(self, inputs: Sequence[Any]) -> list[Any]:
        """Run all four stages on ``inputs`` here; one result (or ``Exception``) per input."""
        prepared = self.prepare(inputs)
        results: list[Any] = list(prepared)
        live = [i for i, p in enumerate(prepared) if not isinstance(p, Exception)]
        if live:
            done = self.finish(self.run(self.assemble([prepared[i] for i in live])))
            for i, out in zip(live, done, strict=True):
                results[i] = out
        return results

    def prepare(self, inputs: Sequence[Any]) -> list[Any]:
        """``pipe.preprocess`` each input: its chunks (a list), or its exception."""
        pipe, params, chunked = self.pipe, self.preprocess_params, self.chunked
        out: list[Any] = []
        with self._lock:
            for item in inputs:
                try:
                    if chunked:
                        chunks = list(pipe.preprocess(item, **params))
                        if not chunks:
                            raise ValueError(
                                "the pipeline's preprocess gave no chunk for this input"
                            )
                    else:
                        chunks = [pipe.preprocess(item, **params)]
                except Exception as exc:
                    out.append(exc)
                else:
                    out.append(chunks)
        return out

    def assemble(self, rows: Sequence[list[Any]]) -> AssembledInputs:
        """Pad the prepared inputs into forward batches of ``len(rows)`` chunks each."""
        n = len(rows)
        chunks = [chunk for row in rows for chunk in row]
        counts = [len(row) for row in rows]
        if n == 1:
            # A shallow copy: forward may pop keys from what it is given (token classification).
            singles = [copy.copy(chunk) for chunk in chunks]
            return AssembledInputs(counts, singles, [1] * len(chunks), collated=False)
        groups = [chunks[i : i + n] for i in range(0, len(chunks), n)]
        return AssembledInputs(
            counts, [self.collate(g) for g in groups], [len(g) for g in groups], collated=True
        )

    def run(self, assembled: AssembledInputs) -> AssembledInputs:
        """The device stage: ``pipe.forward`` each batch (outputs come back on the CPU)."""
        forward, params = self.pipe.forward, self.forward_params
        assembled.groups = [forward(batch, **params) for batch in assembled.groups]
        return assembled

    def finish(self, assembled: AssembledInputs) -> list[Any]:
        """Split the outputs per input and ``pipe.postprocess`` each: one result per input."""
        outputs: list[Any] = []
        for out, size in zip(assembled.groups, assembled.sizes, strict=True):
            if assembled.collated:
                outputs.extend(split_batched_output(out, size))
            else:
                outputs.append(out)
        assembled.groups = []
        postprocess, params = self.pipe.postprocess, self.postprocess_params
        results: list[Any] = []
        start = 0
        with self._lock:
            for count in assembled.counts:
                mine = outputs[start : start + count]
                start += count
                try:
                    if self.chunked:
                        for item in mine:
                            item.pop("is_last")  # as PipelinePackIterator regroups them
                        results.append(postprocess(mine, **params))
                    else:
                        results.append(postprocess(mine[0], **params))
                except Exception as exc:
                    results.append(exc)
        return results

    def stages(self, *, device: DeviceExecutor | None = None, weight: int = 1) -> Stages[Any, Any]:
        """A :class:`batchio.Stages` of these four functions, with one prepare thread (the
        tokenizer takes one caller at a time); ``device``: a shared :class:`DeviceExecutor`."""
        return Stages(
            prepare=self.prepare,
            assemble=self.assemble,
            run=self.run,
            finish=self.finish,
            prepare_workers=1,
            device=device,
            weight=weight,
        )


def split_batched_output(processed: Any, size: int) -> list[Any]:
    """A batched forward output as ``size`` per-item outputs, each shaped like a batch of one.

    As ``transformers.pipelines.pt_utils.PipelineIterator`` unrolls a batch
    (``loader_batch_item``): a tensor is cut into rows ``t[i].unsqueeze(0)``, a mapping (a
    ``ModelOutput`` or dict) key by key, into the mapping's own class.
    """
    if isinstance(processed, torch.Tensor):
        first: Any = processed
    elif isinstance(processed, tuple):
        first = processed[0]
    else:
        first = processed[next(iter(processed.keys()))]
    observed = len(first) if isinstance(first, list) else first.shape[0]
    if observed != size:
        raise ValueError(f"the pipeline's forward gave {observed} rows for a batch of {size}")
    data = processed[0] if isinstance(processed, tuple) else processed
    return [_batch_item(data, i) for i in range(size)]


def _rows(element: tuple[Any, ...], i: int) -> tuple[Any, ...] | None:
    if isinstance(element[0], torch.Tensor):
        return tuple(el[i].unsqueeze(0) for el in element)
    if isinstance(element[0], np.ndarray):
        return tuple(np.expand_dims(el[i], 0) for el in element)
    return None


def _batch_item(data: Any, i: int) -> Any:
    """Item ``i`` of a batched output, as ``PipelineIterator.loader_batch_item`` builds it."""
    if isinstance(data, torch.Tensor):
        return data[i].unsqueeze(0)
    item: dict[str, Any] = {}
    for k, element in data.items():
        if isinstance(element, ModelOutput):
            rows = _rows(element.to_tuple(), i)
            if rows is not None:
                item[k] = rows
            continue
        if k in {"hidden_states", "attentions"} and isinstance(element, tuple):
            rows = _rows(element, i)
            if rows is not None:
                item[k] = rows
            continue
        if k == "cache":
            continue
        if element is None:
            item[k] = None
        elif isinstance(element[i], torch.Tensor):
            item[k] = element[i].unsqueeze(0)
        elif isinstance(element[i], np.ndarray):
            item[k] = np.expand_dims(element[i], 0)
        else:
            item[k] = element[i]
    return data.__class__(item)


_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(pipe: Any) -> threading.Lock:
    """The one lock of ``pipe``'s pre- and postprocessing, shared by every staging of it.

    Two ``BatchedPipeline`` objects over one pipeline (different ``top_k``, say) share its
    tokenizer, which reconfigures itself on each call: they must take turns too. Keyed by the
    tokenizer when there is one (two pipelines may share it), else by the pipeline.
    """
    key = getattr(pipe, "tokenizer", None) or pipe
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.Lock()
        return lock
