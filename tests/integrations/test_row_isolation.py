"""A bad input fails alone: signature groups, per-row checks and bisection of failed passes.

Rows that differ (dtype, trailing shape, key set) run as separate micro-batches of one batch; a
row that cannot run at all gets its own typed error before batching; a forward pass (or a
tokenizer call) that still fails is re-run in halves, so each culprit gets its own error and
every other row its result.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

import torch

from batchio import BatchioError
from batchio.integrations.torch import BatchedModule, BatchForward, CollationError, Collator
from batchio.integrations.transformers import SentenceEmbedder

from .conftest import PassRecorder, gather, ids

HOUR = 3600.0


def token_rows(tokenizer: Any, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.tensor(v) for k, v in tokenizer(t).items()} for t in texts]


# -- signatures: different rows run apart, in the same batch ---------------------------------------


@pytest.mark.parametrize("first", ["int32", "int64"])
def test_different_dtypes_run_as_separate_micro_batches(first: str) -> None:
    """int32 and int64 ids both succeed, whichever comes first (a tie used to fail the later)."""
    int32 = {"input_ids": ids(1, 2, 3).int()}
    int64 = {"input_ids": ids(4, 5)}
    rows = [int32, int64] if first == "int32" else [int64, int32]
    model = PassRecorder()
    results = BatchForward(model, strip_padding=True)(rows)
    assert [r.tolist() for r in results] == [r["input_ids"].tolist() for r in rows]
    assert [p.dtype for p in model.passes] == [r["input_ids"].dtype for r in rows]


def test_tensor_rows_of_different_shapes_all_run() -> None:
    seen: list[tuple[int, ...]] = []

    def double(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x * 2

    results = BatchForward(double)([torch.ones(2), torch.ones(3), torch.ones(2)])
    assert [r.tolist() for r in results] == [[2.0, 2.0], [2.0, 2.0, 2.0], [2.0, 2.0]]
    assert sorted(seen) == [(1, 3), (2, 2)]


def test_signature_groups_each_keep_the_token_budget() -> None:
    """Each signature group is length-sorted and split under max_batch_tokens on its own."""
    model = PassRecorder()
    rows = [
        {"input_ids": ids(1, 1, 1, 1)},
        {"input_ids": ids(2, 2).int()},
        {"input_ids": ids(3, 3, 3, 3)},
        {"input_ids": ids(4).int()},
        {"input_ids": ids(5)},
    ]
    results = BatchForward(model, max_batch_tokens=8, strip_padding=True)(rows)
    assert [r.tolist() for r in results] == [r["input_ids"].tolist() for r in rows]
    assert all(p.numel() <= 8 for p in model.passes)
    assert {p.dtype for p in model.passes} == {torch.int32, torch.int64}
    assert sum(p.shape[0] for p in model.passes) == len(rows)


@pytest.mark.anyio
async def test_neighbours_of_another_dtype_both_succeed_through_the_batcher() -> None:
    """gather(m(int32 ids), m(int64 ids)): both get their own result from one batch."""
    async with BatchedModule(
        PassRecorder(), strip_padding=True, max_batch_size=2, max_wait=HOUR
    ) as m:
        a, b = await gather(m({"input_ids": ids(1, 2).int()}), m({"input_ids": ids(3, 4, 5)}))
        stats = m.statistics()
    assert stats.batches == 1
    assert a.tolist() == [1, 2]
    assert b.tolist() == [3, 4, 5]


@pytest.mark.anyio
async def test_rows_with_different_keys_match_their_results_alone(
    tiny_bert: Any, tokenizer: Any
) -> None:
    """A row without token_type_ids runs apart from the rows with them, and each matches alone."""
    rows: list[Any] = token_rows(tokenizer, ["the fox", "a lazy dog sat", "on the mat"])
    rows.insert(1, {"input_ids": torch.tensor([2, 5, 3])})
    async with BatchedModule(tiny_bert, max_batch_size=4, max_wait=HOUR) as m:
        outs = await gather(*(m(r) for r in rows))
        stats = m.statistics()
    assert (stats.batches, stats.completed, stats.failed) == (1, 4, 0)
    with torch.inference_mode():
        alone = [tiny_bert(**{k: v[None] for k, v in r.items()}).pooler_output[0] for r in rows]
    for out, ref in zip(outs, alone, strict=True):
        assert float((out.pooler_output - ref).abs().max()) < 1e-4


# -- per-row checks before batching -------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"input_ids": ids(1, 2).to_sparse()}, "sparse_coo"),
        (torch.ones(3).to_sparse(), "sparse_coo"),
        (
            torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
            "a nested tensor",
        ),
        ({"input_ids": torch.tensor([1.0, 2.0])}, "token ids must be integers"),
        ({"token_type_ids": ids(0), "input_ids": ids(1).bool()}, "token ids must be integers"),
        ({"input_ids": ids(*range(1, 10))}, "9 tokens, more than max_length=8"),
    ],
)
def test_row_that_cannot_run_fails_alone_before_batching(bad: Any, message: str) -> None:
    """A sparse tensor, non-integer token ids, a row over max_length: a CollationError for that
    row alone; its neighbours run."""
    model = PassRecorder()
    rows = [{"input_ids": ids(1, 2, 3)}, bad, {"input_ids": ids(4)}]
    results = BatchForward(model, collator=Collator(max_length=8), strip_padding=True)(rows)
    assert results[0].tolist() == [1, 2, 3]
    assert results[2].tolist() == [4]
    assert isinstance(results[1], CollationError)
    assert isinstance(results[1], BatchioError)
    assert message in str(results[1])


def test_invalid_max_length() -> None:
    with pytest.raises(ValueError, match="max_length"):
        Collator(max_length=0)


# -- bisection: a failed pass is re-run in halves -------------------------------------------------


@pytest.mark.parametrize("bad_positions", [[2], [0, 5], [1, 2, 3, 4, 6]])
def test_failed_pass_is_bisected_to_its_culprits(bad_positions: list[int]) -> None:
    """Each bad row gets its own original error (not a CollationError, not a neighbour's); every
    good row gets its result, even when the bad rows are the majority."""
    poison = 99
    rows = [{"input_ids": ids(i + 1, i + 1)} for i in range(7)]
    for p in bad_positions:
        rows[p] = {"input_ids": ids(poison, p + 1)}
    results = BatchForward(PassRecorder(poison=poison), strip_padding=True)(rows)
    errors = [results[p] for p in bad_positions]
    assert all(isinstance(e, IndexError) for e in errors)
    assert len({id(e) for e in errors}) == len(errors)  # each bad row has its own error
    for i, (row, out) in enumerate(zip(rows, results, strict=True)):
        if i not in bad_positions:
            assert out.tolist() == row["input_ids"].tolist()


@pytest.mark.anyio
async def test_out_of_vocabulary_id_fails_only_its_row(tiny_bert: Any, tokenizer: Any) -> None:
    """An id past the vocabulary raises IndexError in the embedding: that row gets it, alone."""
    rows: list[Any] = token_rows(tokenizer, ["the fox", "a lazy dog sat", "on the mat"])
    oov = {k: v.clone() for k, v in rows[0].items()}
    oov["input_ids"][1] = tiny_bert.config.vocab_size + 10
    rows.insert(2, oov)
    async with BatchedModule(tiny_bert, max_batch_size=4, max_wait=HOUR) as m:
        outs = await gather(*(m(r) for r in rows))
        stats = m.statistics()
    assert (stats.batches, stats.completed, stats.failed) == (1, 3, 1)
    assert isinstance(outs[2], IndexError)
    with torch.inference_mode():
        for i in (0, 1, 3):
            ref = tiny_bert(**{k: v[None] for k, v in rows[i].items()}).pooler_output[0]
            assert float((outs[i].pooler_output - ref).abs().max()) < 1e-4


# -- SentenceEmbedder: texts checked one by one, the tokenizer call bisected ----------------------


@pytest.mark.anyio
async def test_lone_surrogate_fails_alone(tiny_bert: Any, tokenizer: Any) -> None:
    """A text that is not valid Unicode gets a CollationError; the other texts embed."""
    async with SentenceEmbedder(tiny_bert, tokenizer, max_batch_size=3, max_wait=HOUR) as e:
        good, bad, other = await gather(e("the fox"), e("a \ud800 dog"), e("a dog"))
    assert isinstance(bad, CollationError)
    assert "UTF-8" in str(bad)
    assert float((good - e.embed_batch(["the fox"])[0]).abs().max()) < 1e-5
    assert float((other - e.embed_batch(["a dog"])[0]).abs().max()) < 1e-5


class PickyTokenizer:
    """Wraps a tokenizer; a whole call fails when any text contains 'poison'."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0
        self.pad_token_id = inner.pad_token_id
        self.model_max_length = inner.model_max_length

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        self.calls += 1
        if any("poison" in t for t in texts):
            raise ValueError("the tokenizer cannot take this text")
        return self.inner(texts, **kwargs)


def test_failed_tokenizer_call_is_bisected(tiny_bert: Any, tokenizer: Any) -> None:
    picky = PickyTokenizer(tokenizer)
    embed = SentenceEmbedder(tiny_bert, picky).embed_batch
    texts = ["the fox", "poison", "a dog", "the cat sat", "more poison"]
    results = embed(texts)
    assert all(isinstance(results[i], ValueError) for i in (1, 4))
    assert results[1] is not results[4]
    for i in (0, 2, 3):
        assert float((results[i] - embed([texts[i]])[0]).abs().max()) < 1e-5
