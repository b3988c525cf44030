"""The staged forms: StagedForward's four stages, and the wrappers on a staged batcher.

The stage functions are checked called in sequence (no event loop), then through the batcher.
Which request reaches the model is controlled with gates (threading.Event), never with sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch

import batchio
from batchio.integrations.torch import (
    BatchedModule,
    BatchForward,
    CollationError,
    Collator,
    DeviceDefaults,
    StagedForward,
    device_defaults,
)
from batchio.integrations.transformers import SentenceEmbedder

from .conftest import PassRecorder, gather, ids, in_sequence

HOUR = 3600.0


class Recorder(PassRecorder):
    """Records each pass's input_ids; raises for rows holding ``poison``; returns a mapping."""

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        tokens = super().__call__(input_ids, attention_mask)
        return {"tokens": tokens, "real": attention_mask.sum(1)}


ROWS = [{"input_ids": ids(*range(1, n + 1))} for n in (1, 9, 3, 17, 2, 5, 30, 4, 6, 11, 8)]


# -- the stage functions, called in sequence ------------------------------------------------------


@pytest.mark.parametrize("budget", [None, 40])
@pytest.mark.parametrize("shaped", [False, True])
def test_stages_in_sequence_equal_batch_forward(budget: int | None, shaped: bool) -> None:
    collator = (
        Collator(length_buckets=(8, 16, 32), batch_sizes=(1, 2, 4, 8)) if shaped else Collator()
    )
    plain = BatchForward(Recorder(), max_batch_tokens=budget, strip_padding={"tokens"})(ROWS)
    model = Recorder()
    fwd = StagedForward(model, collator=collator, max_batch_tokens=budget, strip_padding={"tokens"})
    staged = in_sequence(fwd, ROWS)
    called = fwd(ROWS)  # __call__ runs the same four stages
    for a, b in zip(called, staged, strict=True):
        assert a["tokens"].tolist() == b["tokens"].tolist()
    for a, b in zip(plain, staged, strict=True):
        assert a["tokens"].tolist() == b["tokens"].tolist()
        assert int(a["real"]) == int(b["real"])
    if shaped:
        assert {p.shape[0] for p in model.passes} <= {1, 2, 4, 8}
        assert {p.shape[1] for p in model.passes} <= {8, 16, 32}


def test_assemble_sorts_and_plans_micro_batches() -> None:
    fwd = StagedForward(Recorder(), max_batch_tokens=40)
    prepared = fwd.prepare(ROWS)
    assembled = fwd.assemble(prepared)  # type: ignore[arg-type]
    assert assembled.size == len(ROWS)
    positions = [mb.positions for mb in assembled.micro_batches]
    assert sorted(i for p in positions for i in p) == list(range(len(ROWS)))
    lengths = [[ROWS[i]["input_ids"].numel() for i in p] for p in positions]
    assert all(ls == sorted(ls, reverse=True) for ls in lengths)  # longest first
    assert all(max(ls) * len(ls) <= 40 or len(ls) == 1 for ls in lengths)


def test_padding_rows_never_reach_a_caller() -> None:
    """3 real rows padded to 8: the model sees 8, the caller gets 3 results, none a pad row's."""
    model = Recorder()
    fwd = StagedForward(model, collator=Collator(batch_sizes=(8,)), strip_padding={"tokens"})
    rows = [{"input_ids": ids(5, 6)}, {"input_ids": ids(7)}, {"input_ids": ids(8, 9, 1)}]
    results = in_sequence(fwd, rows)
    assert [p.shape[0] for p in model.passes] == [8]
    assert [r["tokens"].tolist() for r in results] == [[5, 6], [7], [8, 9, 1]]
    assert [int(r["real"]) for r in results] == [2, 1, 3]


@pytest.mark.parametrize("bad_positions", [[2], [0, 5], [1, 2, 3, 4, 6]])
def test_failed_pass_is_bisected_inside_run(bad_positions: list[int]) -> None:
    poison = 99
    rows = [{"input_ids": ids(i + 1, i + 1)} for i in range(7)]
    for p in bad_positions:
        rows[p] = {"input_ids": ids(poison, p + 1)}
    results = in_sequence(StagedForward(Recorder(poison=poison), strip_padding=True), rows)
    errors = [results[p] for p in bad_positions]
    assert all(isinstance(e, IndexError) for e in errors)
    assert len({id(e) for e in errors}) == len(errors)
    for i, (row, out) in enumerate(zip(rows, results, strict=True)):
        if i not in bad_positions:
            assert out["tokens"].tolist() == row["input_ids"].tolist()


def test_prepare_fails_a_bad_row_alone() -> None:
    fwd = StagedForward(Recorder())
    prepared = fwd.prepare([{"input_ids": ids(1)}, {"input_ids": torch.tensor([1.0])}, "text"])
    assert not isinstance(prepared[0], Exception)
    assert isinstance(prepared[1], CollationError)
    assert isinstance(prepared[2], CollationError)


def test_stages_object() -> None:
    fwd = StagedForward(Recorder())
    stages = fwd.stages(prepare_workers=3)
    assert isinstance(stages, batchio.Stages)
    assert (stages.prepare, stages.assemble, stages.run, stages.finish) == (
        fwd.prepare,
        fwd.assemble,
        fwd.run,
        fwd.finish,
    )
    assert stages.prepare_workers == 3


# -- dtype and device defaults --------------------------------------------------------------------


def test_device_defaults_on_the_cpu_keep_todays_behaviour() -> None:
    assert device_defaults(None) == DeviceDefaults()
    assert device_defaults(torch.device("cpu")).batch_sizes(64) is None
    cuda = DeviceDefaults(256, 65536, (16, 32), cuda=True)
    assert cuda.batch_sizes(256) == (8, 16, 32, 64, 128, 256)
    assert cuda.batch_sizes(48) == (8, 16, 32, 48)
    assert cuda.batch_sizes(4) == (4,)


def test_dtype_validation(tiny_bert: Any, tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        BatchForward(Recorder(), dtype="float16")
    with pytest.raises(ValueError, match="dtype must be"):
        BatchForward(Recorder(), dtype="int8")
    with pytest.raises(ValueError, match="dtype must be"):
        BatchForward(Recorder(), dtype=torch.int64)
    assert BatchForward(Recorder(), dtype="bf16").placement.dtype == torch.bfloat16


@pytest.mark.anyio
async def test_bfloat16_on_the_cpu_returns_float32(tokenizer: Any) -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
    )
    reference = transformers.BertModel(config).eval()
    model = transformers.BertModel(config).eval()
    model.load_state_dict(reference.state_dict())
    texts = ["the fox", "a lazy dog sat on the mat"]
    full = SentenceEmbedder(reference, tokenizer).embed_batch(texts)
    async with SentenceEmbedder(
        model, tokenizer, dtype="bfloat16", max_batch_size=2, max_wait=HOUR
    ) as e:
        half = await gather(*(e(t) for t in texts))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in half)
    assert max(float((a - b).abs().max()) for a, b in zip(full, half, strict=True)) < 0.05


# -- the wrappers on the staged batcher -----------------------------------------------------------


pytest_anyio = pytest.mark.anyio


@pytest_anyio
@pytest.mark.parametrize("buckets", [False, True])
async def test_staged_embedder_equals_the_plain_one(
    tiny_bert: Any, tokenizer: Any, texts: list[str], buckets: bool
) -> None:
    shapes: dict[str, Any] = (
        {"length_buckets": (16, 32, 64, 128), "batch_sizes": (4, 8, 16)}
        if buckets
        else {"length_buckets": None, "batch_sizes": None}
    )
    results = []
    for staged in (True, False):
        e = SentenceEmbedder(
            tiny_bert,
            tokenizer,
            staged=staged,
            max_batch_tokens=200,
            max_batch_size=len(texts),
            max_wait=HOUR,
            **shapes,
        )
        async with e:
            results.append(await gather(*(e(t) for t in texts)))
            assert e.statistics().batches == 1
            assert len(e.statistics().stages) == (4 if staged else 0)
    staged_out, plain_out = results
    for a, b in zip(staged_out, plain_out, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest_anyio
async def test_staged_embedder_bad_text_fails_alone(tiny_bert: Any, tokenizer: Any) -> None:
    async with SentenceEmbedder(tiny_bert, tokenizer, max_batch_size=4, max_wait=HOUR) as e:
        outs = await gather(e("the fox"), e(42), e("a \ud800 dog"), e("a dog"))  # type: ignore[arg-type]
    assert isinstance(outs[1], CollationError)
    assert isinstance(outs[2], CollationError)
    assert torch.allclose(outs[0], e.embed_batch(["the fox"])[0], atol=1e-5)
    assert torch.allclose(outs[3], e.embed_batch(["a dog"])[0], atol=1e-5)


class GatedTokenizer:
    """A tokenizer without a fast backend whose calls wait for ``gate`` (the prepare stage)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_input_names = inner.model_input_names
        self.model_max_length = inner.model_max_length
        self.pad_token_id = inner.pad_token_id
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.entered.set()
        self.gate.wait()
        return self.inner(texts, **kwargs)


class SeenTexts:
    """A model wrapper that records every input_ids row it is given."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.rows: list[list[int]] = []

    def __call__(self, **batch: torch.Tensor) -> Any:
        mask = batch["attention_mask"]
        for row, m in zip(batch["input_ids"], mask, strict=True):
            self.rows.append(row[m.bool()].tolist())
        return self.model(**batch)


@pytest_anyio
async def test_a_cancelled_request_never_reaches_the_model(tiny_bert: Any, tokenizer: Any) -> None:
    """Cancelled while its batch is being prepared: the model never sees its text."""
    gated = GatedTokenizer(tokenizer)
    model = SeenTexts(tiny_bert)
    async with SentenceEmbedder(model, gated, max_batch_size=2, max_wait=HOUR) as e:
        doomed = asyncio.ensure_future(e("the cat sat on the mat"))
        kept = asyncio.ensure_future(e("a dog"))
        await anyio.to_thread.run_sync(gated.entered.wait)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        gated.gate.set()
        out = await kept
        stats = e.statistics()
    assert out.shape == (32,)
    assert model.rows == [tokenizer("a dog")["input_ids"]]
    assert stats.cancelled == 1


@pytest_anyio
async def test_staged_module_and_a_shared_device_executor(tiny_bert: Any, tokenizer: Any) -> None:
    rows = [{k: torch.tensor(v) for k, v in tokenizer(t).items()} for t in ["the fox", "a dog"]]
    with batchio.DeviceExecutor() as dev:
        a = BatchedModule(tiny_bert, device_executor=dev, max_batch_size=2, max_wait=HOUR)
        b = BatchedModule(Recorder(), device_executor=dev, max_batch_size=1, max_wait=HOUR)
        async with a, b:
            out_a = await gather(*(a(r) for r in rows))
            out_b = await b({"input_ids": ids(1, 2)})
    assert all(o.pooler_output.shape == (32,) for o in out_a)
    assert out_b["tokens"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="staged=True"):
        BatchedModule(tiny_bert, staged=False, device_executor=batchio.DeviceExecutor())


@pytest_anyio
async def test_real_minilm_staged_equals_plain(minilm_path: Path) -> None:
    texts = [
        "A man is eating food.",
        "The new movie is awesome and everybody in the theatre applauded at the end.",
        "",
        "Stock markets fell sharply today. " * 30,
    ]

    def load() -> tuple[Any, Any]:
        model = transformers.AutoModel.from_pretrained(minilm_path, local_files_only=True)
        tok = transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
        return model, tok

    model, tok = await anyio.to_thread.run_sync(load)
    e = SentenceEmbedder(
        model, tok, length_buckets=(16, 32, 64, 128, 256), max_batch_size=4, max_wait=HOUR
    )
    async with e:
        staged = await gather(*(e(t) for t in texts))
    plain = e.embed_batch(texts)
    for a, b in zip(staged, plain, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
