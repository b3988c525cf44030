"""The staged BatchedPipeline on tiny random-weight pipelines: the same results as the plain form.

Each batched test fills exactly one batch (max_batch_size = requests sent, max_wait an hour), so
both forms see the same batch and their results can be compared exactly.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch

import batchio
from batchio.integrations.transformers import BatchedPipeline, PipelineStages

from .conftest import TINY, gather

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_blocking")]

HOUR = 3600.0
GATE_SECONDS = 60.0  # only a guard against a hang: no test waits for it to run out


def build(task: str, tokenizer: Any, seed: int = 0) -> Any:
    """A CPU pipeline for ``task`` over a tiny BERT with seeded random weights."""
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    model: Any
    if task == "text-classification":
        config = transformers.BertConfig(vocab_size=vocab, num_labels=3, **TINY)
        model = transformers.BertForSequenceClassification(config)
    elif task == "token-classification":
        config = transformers.BertConfig(vocab_size=vocab, num_labels=5, **TINY)
        model = transformers.BertForTokenClassification(config)
    elif task == "fill-mask":
        model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=vocab, **TINY))
    elif task == "zero-shot-classification":
        labels = {0: "entailment", 1: "neutral", 2: "contradiction"}
        config = transformers.BertConfig(
            vocab_size=vocab, id2label=labels, label2id={v: k for k, v in labels.items()}, **TINY
        )
        model = transformers.BertForSequenceClassification(config)
    else:
        model = transformers.BertModel(transformers.BertConfig(vocab_size=vocab, **TINY))
    return transformers.pipeline(task, model=model.eval(), tokenizer=tokenizer, device="cpu")


CASES = [
    ("text-classification", {}),
    ("text-classification", {"top_k": None}),
    ("token-classification", {}),
    ("token-classification", {"aggregation_strategy": "simple"}),
    ("feature-extraction", {}),
    ("fill-mask", {"top_k": 3}),
]


def inputs_for(task: str, texts: list[str]) -> list[str]:
    return [f"{t} [MASK]" for t in texts] if task == "fill-mask" else texts


@pytest.mark.parametrize(("task", "call_kwargs"), CASES)
async def test_staged_equals_plain(
    task: str, call_kwargs: dict[str, Any], tokenizer: Any, texts: list[str]
) -> None:
    """The staged form gives exactly what the plain form gives, for one batch and for one input."""
    pipe = build(task, tokenizer)
    items = inputs_for(task, texts)
    results = {}
    for staged in (True, False):
        clf = BatchedPipeline(
            pipe, staged=staged, max_batch_size=len(items), max_wait=HOUR, **call_kwargs
        )
        assert clf.staged is staged
        assert clf.unstaged_reason is None
        async with clf:
            batch = await gather(*(clf(x) for x in items))
            assert clf.statistics().batches == 1
        async with BatchedPipeline(pipe, staged=staged, max_batch_size=1, **call_kwargs) as one:
            alone = await one(items[1])
        results[staged] = (batch, alone)
    assert results[True] == results[False]
    assert not any(isinstance(r, Exception) for r in results[True][0])
    # One input alone gets what a list call of one gives (fill-mask unwraps that list).
    list_of_one = pipe([items[1]], **call_kwargs)
    assert results[True][1] == (list_of_one if task == "fill-mask" else list_of_one[0])


async def test_fill_mask_single_input_in_both_forms(tokenizer: Any) -> None:
    """fill-mask unwraps a one-input list call; both forms still give one result per input."""
    pipe = build("fill-mask", tokenizer)
    expected = pipe("the [MASK] fox", top_k=2)
    for staged in (True, False):
        async with BatchedPipeline(pipe, staged=staged, max_batch_size=1, top_k=2) as fill:
            assert await fill("the [MASK] fox") == expected


async def test_chunked_inputs_are_regrouped(tokenizer: Any, texts: list[str]) -> None:
    """Token classification with ``stride`` cuts long texts into several chunks; each text's
    chunks reach postprocess together, as in the plain form."""
    chunky = transformers.BertTokenizerFast(
        vocab={w: i for i, w in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer))))},
        model_max_length=16,
    )
    pipe = build("token-classification", chunky)
    kwargs: dict[str, Any] = {"aggregation_strategy": "simple", "stride": 4}
    stages = PipelineStages(pipe, kwargs)
    prepared = stages.prepare(texts)
    assert max(len(p) for p in prepared) > 2  # the long texts are several chunks
    results = {}
    for staged in (True, False):
        async with BatchedPipeline(
            pipe, staged=staged, max_batch_size=len(texts), max_wait=HOUR, **kwargs
        ) as ner:
            results[staged] = await gather(*(ner(t) for t in texts))
    assert results[True] == results[False]
    assert not any(isinstance(r, Exception) for r in results[True])


async def test_bad_input_fails_alone_at_preparation(tokenizer: Any) -> None:
    """An input whose preprocess raises fails alone; the others share one forward pass, without
    a bisection, and get what a list call of the good inputs gives."""
    pipe = build("text-classification", tokenizer)
    forward_rows: list[int] = []
    real_forward = pipe.forward

    def counting_forward(batch: Any, **params: Any) -> Any:
        forward_rows.append(len(batch["input_ids"]))
        return real_forward(batch, **params)

    pipe.forward = counting_forward
    async with BatchedPipeline(pipe, max_batch_size=4, max_wait=HOUR) as clf:
        results = await gather(clf("the fox"), clf(None), clf.map(["a dog", "a cat"]))
    assert isinstance(results[1], ValueError)  # the tokenizer's own error, for None
    assert forward_rows == [3]
    pipe.forward = real_forward
    assert [results[0], *results[2]] == list(pipe(["the fox", "a dog", "a cat"], batch_size=3))


async def test_postprocess_error_fails_alone(tokenizer: Any) -> None:
    """An input whose postprocess raises gets that error; the others their results."""
    pipe = build("text-classification", tokenizer)
    real_postprocess = pipe.postprocess
    calls = 0

    def second_fails(outputs: Any, **params: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("postprocess failed")
        return real_postprocess(outputs, **params)

    pipe.postprocess = second_fails
    async with BatchedPipeline(pipe, max_batch_size=3, max_wait=HOUR) as clf:
        results = await gather(clf("the fox"), clf("a dog"), clf("a cat"))
    assert isinstance(results[1], RuntimeError)
    assert results[0]["label"].startswith("LABEL_")
    assert results[2]["label"].startswith("LABEL_")


async def test_cancelled_request_never_reaches_forward(tokenizer: Any) -> None:
    """A request cancelled while it waits behind a batch on the device is never run."""
    pipe = build("text-classification", tokenizer)
    entered, release = threading.Event(), threading.Event()
    seen: list[list[str]] = []
    real_forward = pipe.forward

    def gated_forward(batch: Any, **params: Any) -> Any:
        seen.append(tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True))
        if len(seen) == 1:
            entered.set()
            assert release.wait(GATE_SECONDS)
        return real_forward(batch, **params)

    pipe.forward = gated_forward
    results: dict[str, Any] = {}
    async with BatchedPipeline(pipe, max_batch_size=1, max_wait=0, max_concurrent_batches=1) as clf:
        cancelled = anyio.CancelScope()

        async def first() -> None:
            results["first"] = await clf("the fox")

        async def second() -> None:
            with cancelled:
                results["second"] = await clf("a lazy dog")

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            await anyio.to_thread.run_sync(entered.wait)  # the first batch is on the device
            tg.start_soon(second)
            await anyio.wait_all_tasks_blocked()
            cancelled.cancel()
            await anyio.wait_all_tasks_blocked()
            release.set()
        results["third"] = await clf("a cat")
    assert cancelled.cancelled_caught
    assert set(results) == {"first", "third"}
    assert seen == [["the fox"], ["a cat"]]


async def test_pipelines_with_their_own_call_fall_back(tokenizer: Any) -> None:
    """zero-shot classification (a ChunkPipeline that builds its inputs in ``__call__``) runs the
    plain form, and says why."""
    pipe = build("zero-shot-classification", tokenizer)
    labels = ["fox", "dog"]
    zs = BatchedPipeline(pipe, candidate_labels=labels, max_batch_size=2, max_wait=HOUR)
    assert not zs.staged
    assert zs.pipeline_stages is None
    assert zs.unstaged_reason is not None
    assert "__call__" in zs.unstaged_reason
    async with zs:
        got = await gather(zs("the fox"), zs("a dog"))
    expected = pipe(["the fox", "a dog"], candidate_labels=labels, batch_size=2)
    assert got == expected
    with pytest.raises(ValueError, match="plain"):
        BatchedPipeline(pipe, device_executor=batchio.DeviceExecutor())
    with pytest.raises(ValueError, match="staged"):
        PipelineStages(pipe, {})
    plain = BatchedPipeline(build("text-classification", tokenizer), staged=False)
    assert (plain.staged, plain.unstaged_reason) == (False, None)


async def test_shared_device_executor(tokenizer: Any, texts: list[str]) -> None:
    """Two staged pipelines can share one device thread; each gets its own results."""
    clf_pipe = build("text-classification", tokenizer)
    fe_pipe = build("feature-extraction", tokenizer)
    n = len(texts)
    with batchio.DeviceExecutor() as dev:
        async with (
            BatchedPipeline(clf_pipe, device_executor=dev, max_batch_size=n, max_wait=HOUR) as c,
            BatchedPipeline(fe_pipe, device_executor=dev, max_batch_size=n, max_wait=HOUR) as f,
        ):
            got = await gather(c.map(texts), f.map(texts))
    assert got[0] == list(clf_pipe(texts, batch_size=n))
    assert got[1] == list(fe_pipe(texts, batch_size=n))


def test_stages_run_in_sequence_here(tokenizer: Any, texts: list[str]) -> None:
    """Calling PipelineStages runs the four stages on this thread: a bad input gets its error
    in its slot, the others what the list call of the good ones gives."""
    pipe = build("token-classification", tokenizer)
    stages = PipelineStages(pipe, {"ignore_labels": []})
    assert stages.chunked
    got = stages([texts[0], 42, *texts[1:3]])
    assert isinstance(got[1], ValueError)
    assert [got[0], *got[2:]] == pipe(texts[:3], batch_size=3, ignore_labels=[])
