"""Hugging Face ``transformers`` integration: a batched sentence embedder and a batched pipeline.

::

    from batchio.integrations.transformers import SentenceEmbedder

    async with SentenceEmbedder("path/to/all-MiniLM-L6-v2", max_batch_size=64) as embed:
        vector = await embed("a sentence")          # a 1-D float32 CPU tensor

By default the embedder's batcher is staged (:class:`batchio.Stages`): texts are tokenized by the
tokenizer's fast backend on ``prepare_workers`` threads as they arrive, the next batch is padded
while this one is on the device, the device thread runs only the copies and the forward pass, and
pooled outputs are split on a thread of their own. The event loop only queues strings and hands
back tensors. Importing this module imports torch and transformers.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Sequence
from typing import Any, Final, Unpack, cast

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.pipelines.fill_mask import FillMaskPipeline

from .. import Batcher, BatcherOptions, BatcherOptionsKw, DeviceExecutor
from .._options import options_from
from ._device import DTypeArg
from ._forward import StagedForward
from ._owner import BatcherOwner
from ._pipeline import PipelineStages, unstaged_reason
from ._shapes import LengthBuckets
from ._tokenize import TextTokenizer, call_unpadded, default_max_length, tokenize_each
from ._wrap import (
    AUTO,
    Auto,
    check_device_executor,
    make_batcher,
    resolve_device,
    scheduling_defaults,
    setup,
)
from .torch import BatchForward, CollatedBatch, Collator, PaddingSide, PreparedRow

__all__ = [
    "CPU_TEXT_TOKEN_BUDGET",
    "BatchedPipeline",
    "PipelineStages",
    "SentenceEmbedder",
    "TextEmbeddingFn",
    "TextTokenizer",
    "mean_pool",
]

#: :class:`SentenceEmbedder`'s padded-token budget per forward pass on the CPU (its
#: ``max_batch_tokens="auto"`` there): measured on MiniLM, length-sorted micro-batches under it
#: serve about twice the texts per second of one pass padded to the longest text.
CPU_TEXT_TOKEN_BUDGET: Final = 256


def mean_pool(output: Any, batch: CollatedBatch, *, normalize: bool = True) -> torch.Tensor:
    """Average each row's token embeddings over its real tokens; optionally L2-normalise.

    ``output`` is a model output with ``last_hidden_state`` (or a tuple whose first item is it);
    the mask comes from ``batch.data["attention_mask"]``. Returns a ``(rows, hidden)`` tensor.
    """
    hidden: torch.Tensor = (
        output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    )
    assert isinstance(batch.data, dict)
    mask = batch.data["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if normalize:
        pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
    return pooled


class TextEmbeddingFn:
    """The sentence embedder's batch function: ``texts -> one embedding (or exception) per text``.

    Synchronous, so it can also be called directly (for a baseline, or from a thread): it
    tokenizes with the tokenizer's own call and runs a :class:`BatchForward`, all on the calling
    thread. Arguments are those of :class:`SentenceEmbedder` that shape the computation
    (``length_buckets`` and ``batch_sizes`` as in :class:`Collator`, ``None`` by default).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: str | torch.device | None = None,
        normalize: bool = True,
        max_length: int | None = None,
        padding_side: PaddingSide = "right",
        max_batch_tokens: int | None = None,
        length_buckets: LengthBuckets | Sequence[int] | None = None,
        batch_sizes: Sequence[int] | None = None,
        dtype: DTypeArg = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.normalize = normalize
        self.max_length = max_length if max_length is not None else default_max_length(tokenizer)
        # With left padding, models with absolute positions need positions counted over real
        # tokens only, or every token's position shifts by the padding before it.
        forward_params = inspect.signature(getattr(model, "forward", model)).parameters
        wants_positions = padding_side == "left" and "position_ids" in forward_params
        takes_any = any(p.kind is p.VAR_KEYWORD for p in forward_params.values())
        self.model_keys: frozenset[str] | None = None if takes_any else frozenset(forward_params)
        """The model's keyword parameters (None when it takes ``**kwargs``)."""
        self.collator = Collator(
            padding_side=padding_side,
            pad_values={"input_ids": tokenizer.pad_token_id or 0},
            position_ids="position_ids" if wants_positions else None,
            # Texts are truncated to max_length, so no row fails this; it caps the buckets.
            max_length=self.max_length,
            length_buckets=length_buckets,
            batch_sizes=batch_sizes,
        )
        self.forward = BatchForward(
            model,
            collator=self.collator,
            device=device,
            output_device="cpu",
            max_batch_tokens=max_batch_tokens,
            postprocess=self._pool,
            dtype=dtype,
        )

    def _pool(self, output: Any, batch: CollatedBatch) -> torch.Tensor:
        return mean_pool(output, batch, normalize=self.normalize)

    def __call__(self, texts: Sequence[object]) -> list[Any]:
        """Embed ``texts``: one embedding, or one exception, per text, in order.

        A non-string, or a string that cannot be encoded as UTF-8 (a lone surrogate), gets a
        :class:`CollationError` before the batch is tokenized. If the tokenizer call still fails,
        it is re-run in halves, so only the texts it cannot take get its error.
        """
        results: list[Any] = tokenize_each(texts, self._tokenize)
        rows = [(i, row) for i, row in enumerate(results) if not isinstance(row, Exception)]
        outputs = self.forward([row for _, row in rows]) if rows else []
        for (i, _), out in zip(rows, outputs, strict=True):
            results[i] = out
        return results

    def _tokenize(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        # One call tokenizes the whole batch (the fast tokenizers parallelise it); no padding here,
        # the collator pads each micro-batch to its own longest row.
        encoded = call_unpadded(self.tokenizer, texts, self.max_length)
        # Only the keys the model takes (as the staged TextTokenizer does): a model without
        # token_type_ids would otherwise fail every text it is given.
        wanted = self.model_keys
        keys = [k for k in encoded if wanted is None or k == "input_ids" or k in wanted]
        return [{key: encoded[key][j] for key in keys} for j in range(len(texts))]


class SentenceEmbedder(BatcherOwner[str, torch.Tensor]):
    """Batched sentence embeddings: ``await embedder(text)`` returns that text's embedding.

    The embedding is a 1-D ``float32`` CPU ``torch.Tensor`` (mean of the token embeddings over
    real tokens, L2-normalised by default); ``.numpy()`` it if you need an array. Concurrent calls
    are grouped into batches by a :class:`batchio.Batcher` this object owns: use it as an async
    context manager. The model and tokenizer load in the constructor (from local files only).
    A bad text fails alone: a non-string or a text that is not valid Unicode gets a
    :class:`CollationError`, and a failing tokenizer call or forward pass is re-run in halves so
    that only the texts that fail get its error.

    By default the batcher is staged (see the module docstring): ``prepare`` tokenizes with a
    :class:`TextTokenizer` (the fast backend, where the tokenizer has one) and checks each row,
    and :attr:`staged_forward`, a :class:`StagedForward`, does the rest. ``staged=False`` gives
    the plain form, one worker thread running :attr:`embed_batch` (a :class:`TextEmbeddingFn`,
    which tokenizes with the tokenizer's call) over each batch. :attr:`embed_batch` is there in
    both forms, a plain synchronous function for one-off calls and baselines.

    Defaults that depend on the device: on CUDA, ``max_batch_size`` 256, ``max_batch_tokens``
    from the device's memory, lengths padded to the ladder ``(16, 32, ..., 512)`` (capped at
    ``max_length``) and micro-batches to ``8, 16, 32, ...`` rows (see
    :class:`batchio.integrations.torch.DeviceDefaults`); on the CPU, the batcher's own batch
    size, no buckets, and a budget of :data:`CPU_TEXT_TOKEN_BUDGET` (256) padded tokens per
    forward pass: sorting each batch by length and running it in micro-batches under the
    budget about doubles a CPU's throughput over one pass padded to the longest text
    (``docs/benchmarks.md``, sections 2 and 8).

    Args:
        model: a local model directory, or a loaded ``transformers`` model (e.g. ``AutoModel``).
        tokenizer: the tokenizer; loaded from ``model`` when it is a path.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; ``None`` runs where the model is.
        normalize: L2-normalise each embedding.
        max_length: truncate texts to this many tokens (default: the tokenizer's limit, or 512).
        padding_side: ``"right"`` or ``"left"``; the results are the same, up to float rounding.
        max_batch_tokens: the padded-token budget of one forward pass; a batch is sorted by
            length and run in micro-batches under it. ``None``: one pass per batch.
            ``"auto"`` (default): the device's (:data:`CPU_TEXT_TOKEN_BUDGET` on the CPU).
        length_buckets, batch_sizes: shape buckets (see :class:`Collator`); ``"auto"``
            (default): the device's (none on the CPU).
        dtype: run the model in ``torch.float16`` / ``torch.bfloat16`` (or ``"float16"``,
            ``"bfloat16"``, ``"float32"``); embeddings are float32 either way. float16 needs a
            CUDA device. ``None``: the model's own dtype.
        staged: ``True`` (default) for the staged batcher, ``False`` for the plain one.
        prepare_workers: threads that tokenize (staged only).
        device_executor: a :class:`batchio.DeviceExecutor` to share one device thread with other
            batchers (staged only); ``device_weight`` is this embedder's share of it.
        options: a :class:`batchio.BatcherOptions` to start from.
        **batcher_options: any option of :class:`batchio.BatcherOptions`, validated the same way;
            the batcher's ``name`` defaults to ``"SentenceEmbedder"``.
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | Any,
        tokenizer: Any = None,
        *,
        device: str | torch.device | None = None,
        normalize: bool = True,
        max_length: int | None = None,
        padding_side: PaddingSide = "right",
        max_batch_tokens: int | Auto | None = AUTO,
        length_buckets: int | Sequence[int] | Auto | None = AUTO,
        batch_sizes: Sequence[int] | Auto | None = AUTO,
        dtype: DTypeArg = None,
        staged: bool = True,
        prepare_workers: int = 2,
        device_executor: DeviceExecutor | None = None,
        device_weight: int = 1,
        options: BatcherOptions | None = None,
        **batcher_options: Unpack[BatcherOptionsKw],
    ) -> None:
        check_device_executor(device_executor, staged)
        if isinstance(model, str | os.PathLike):
            path = os.fspath(model)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
        if tokenizer is None:
            raise TypeError("pass the tokenizer along with a loaded model")
        chosen = setup(
            resolve_device(model, device),
            options,
            batcher_options,
            max_batch_tokens=max_batch_tokens,
            length_buckets=length_buckets,
            batch_sizes=batch_sizes,
            cpu_max_batch_tokens=CPU_TEXT_TOKEN_BUDGET,
            name="SentenceEmbedder",
        )
        self.embed_batch = TextEmbeddingFn(
            model,
            tokenizer,
            device=device,
            normalize=normalize,
            max_length=max_length,
            padding_side=padding_side,
            max_batch_tokens=chosen.max_batch_tokens,
            length_buckets=chosen.length_buckets,
            batch_sizes=chosen.batch_sizes,
            dtype=dtype,
        )
        self.staged_forward: StagedForward | None = None
        """The device, assembly and finishing stages (None for ``staged=False``)."""
        self.text_tokenizer: TextTokenizer | None = None
        """The preparation stage's tokenizer (None for ``staged=False``)."""
        stages = None
        if staged:
            plain = self.embed_batch
            self.text_tokenizer = TextTokenizer(
                tokenizer,
                max_length=plain.max_length,
                keys=plain.model_keys,
                # The collator builds the same all-ones mask, cheaper than checking one per row.
                attention_mask=False,
            )
            self.staged_forward = StagedForward(
                model,
                collator=plain.collator,
                device=plain.forward.placement.device,
                output_device="cpu",
                max_batch_tokens=chosen.max_batch_tokens,
                postprocess=plain._pool,
                dtype=dtype,
            )
            stages = self.staged_forward.stages(
                prepare_workers=prepare_workers, device=device_executor, weight=device_weight
            )
            stages = dataclasses.replace(stages, prepare=self.prepare)
        self.batcher: Batcher[str, torch.Tensor] = make_batcher(
            self.embed_batch, stages, chosen.options
        )

    def prepare(self, texts: Sequence[object]) -> list[PreparedRow | Exception]:
        """The staged form's preparation: tokenize ``texts`` and check each row.

        One :class:`PreparedRow`, or one exception, per text (see :class:`TextTokenizer`).
        """
        assert self.text_tokenizer is not None
        assert self.staged_forward is not None
        rows = self.text_tokenizer(texts)
        prepare = self.staged_forward.collator.prepare
        out: list[PreparedRow | Exception] = []
        for row in rows:
            if isinstance(row, Exception):
                out.append(row)
                continue
            try:
                out.append(prepare(row))
            except Exception as exc:
                out.append(exc)
        return out


class BatchedPipeline(BatcherOwner[Any, Any]):
    """Batched calls to a ``transformers.pipeline``: ``await classify(text)`` returns its result.

    Each caller gets what the pipeline gives for its input in a list call
    ``pipe(inputs, batch_size=len(inputs), **call_kwargs)``. By default the batcher is staged
    (:class:`batchio.Stages`, see :class:`PipelineStages`): ``pipe.preprocess`` runs per input on
    the prepare thread (an input whose preprocess raises fails alone, at once), the padding
    (``pad_collate_fn``) on a thread of its own, only ``pipe.forward`` on the device thread, and
    the split and ``pipe.postprocess`` per input on the finishing thread; the model sees the same
    batches as in the list call, so the results are the same. Staged are the pipelines whose
    ``__call__`` adds nothing to a list call that the staged form does not do: text
    classification, token classification (ner), feature extraction, fill-mask, and any pipeline
    that keeps ``Pipeline.__call__``. The others (question answering, zero-shot classification,
    speech recognition, text generation, ...) fall back to the plain form by themselves;
    :attr:`unstaged_reason` says why. ``staged=False`` always gives the plain form: each batch is
    one ``pipe(inputs, batch_size=len(inputs), **call_kwargs)`` call on the worker thread.

    With ``isolate_errors=True`` (the default) a batch that fails is re-run in halves, so a bad
    input fails only its own request.

    Args:
        pipe: the pipeline (e.g. ``pipeline("text-classification", model=..., tokenizer=...)``).
            It runs on its own device (``pipeline(..., device=...)``), in its own dtype
            (``pipeline(..., dtype=...)``).
        staged: ``True`` (default) for the staged batcher where the pipeline allows it,
            ``False`` for the plain one.
        device_executor: a :class:`batchio.DeviceExecutor` to share one device thread with other
            batchers (staged only); ``device_weight`` is this pipeline's share of it.
        options: a :class:`batchio.BatcherOptions` to start from; it replaces this wrapper's
            defaults (``isolate_errors`` included), so set what you want in it.
        **kwargs: the options of :class:`batchio.BatcherOptions` by name (``max_batch_size``,
            ``timeout``, ...; here ``isolate_errors`` defaults to true and ``name`` to
            ``pipeline:<task>``); every other keyword is passed to each pipeline call
            (``top_k=None``, ``truncation=True``).
    """

    def __init__(
        self,
        pipe: Any,
        *,
        staged: bool = True,
        device_executor: DeviceExecutor | None = None,
        device_weight: int = 1,
        options: BatcherOptions | None = None,
        **kwargs: Any,
    ) -> None:
        check_device_executor(device_executor, staged)
        names = {f.name for f in dataclasses.fields(BatcherOptions)}
        batcher_options = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        self.pipe = pipe
        self.call_kwargs = kwargs
        self.unstaged_reason: str | None = unstaged_reason(pipe) if staged else None
        """Why a ``staged=True`` pipeline runs the plain form (None when it runs staged, or
        with ``staged=False``)."""
        self.pipeline_stages: PipelineStages | None = None
        """The four stages (None in the plain form)."""
        stages = None
        if staged and self.unstaged_reason is None:
            self.pipeline_stages = PipelineStages(pipe, kwargs)
            stages = self.pipeline_stages.stages(device=device_executor, weight=device_weight)
        elif device_executor is not None:
            raise ValueError(
                f"device_executor needs the staged form, and this pipeline runs the plain one: "
                f"{self.unstaged_reason}"
            )
        name = f"pipeline:{getattr(pipe, 'task', type(pipe).__name__)}"
        defaults = {
            **scheduling_defaults(cast(BatcherOptionsKw, batcher_options)),
            "isolate_errors": True,
            "name": name,
        }
        base = options if options is not None else options_from(None, defaults)  # type: ignore[arg-type]
        self.batcher: Batcher[Any, Any] = Batcher(
            stages if stages is not None else self.run_batch,
            options=base,
            **cast(BatcherOptionsKw, batcher_options),
        )

    @property
    def staged(self) -> bool:
        """Whether the batcher is staged."""
        return self.pipeline_stages is not None

    def run_batch(self, inputs: list[Any]) -> list[Any]:
        """The plain batch function: one pipeline call over ``inputs``, one result per input."""
        out = self.pipe(inputs, batch_size=len(inputs), **self.call_kwargs)
        if len(inputs) == 1 and isinstance(self.pipe, FillMaskPipeline):
            # fill-mask unwraps the result of a one-input list call.
            return [out]
        return list(out)


# Tracebacks and reprs name the public module, not the private one each class lives in.
TextTokenizer.__module__ = __name__
PipelineStages.__module__ = __name__
