"""Shape buckets: padded lengths, allowed batch sizes, the shaped planner, and what a model sees."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")

import torch
from hypothesis import given
from hypothesis import strategies as st

from batchio.integrations._shapes import (
    bucket_batch_size,
    bucket_length,
    plan_shaped_micro_batches,
    powers_of_two,
)
from batchio.integrations.torch import BatchForward, Collator, plan_micro_batches

from .conftest import ids

LADDER = (16, 32, 64, 128, 256, 512)


# -- the policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("longest", "buckets", "cap", "expected"),
    [
        (5, None, None, 5),
        (5, 8, None, 8),
        (8, 8, None, 8),
        (9, 8, None, 16),
        (0, 8, None, 0),  # a row with no sequence stays at 0
        (1, LADDER, None, 16),
        (17, LADDER, None, 32),
        (512, LADDER, None, 512),
        (513, LADDER, None, 768),  # above the top rung: multiples of the last step (256)
        (900, LADDER, None, 1024),
        (20, (16,), None, 32),  # a one-rung ladder steps by its rung
        (510, 64, 512, 512),  # never past the cap (the collator's max_length) ...
        (600, 64, 512, 600),  # ... and never below the real longest row
    ],
)
def test_bucket_length(longest: int, buckets: Any, cap: int | None, expected: int) -> None:
    assert bucket_length(longest, buckets, cap) == expected


def test_bucket_batch_size_and_powers_of_two() -> None:
    sizes = powers_of_two(48)
    assert sizes == (1, 2, 4, 8, 16, 32, 48)
    assert powers_of_two(64) == (1, 2, 4, 8, 16, 32, 64)
    assert powers_of_two(1) == (1,)
    assert [bucket_batch_size(n, sizes) for n in (1, 3, 33, 48, 50)] == [1, 4, 48, 48, 50]
    assert bucket_batch_size(7, None) == 7


@given(
    st.lists(st.integers(min_value=0, max_value=300), max_size=40),
    st.one_of(st.none(), st.integers(min_value=1, max_value=2000)),
)
def test_unshaped_plan_is_plan_micro_batches(lengths: list[int], budget: int | None) -> None:
    assert plan_shaped_micro_batches(lengths, budget) == plan_micro_batches(lengths, budget)


@given(
    st.lists(st.integers(min_value=0, max_value=300), max_size=60),
    st.one_of(st.none(), st.integers(min_value=1, max_value=4000)),
    st.sampled_from([8, LADDER]),
    st.sampled_from([(1, 2, 4, 8, 16), (3, 5), (32,)]),
)
def test_shaped_plan_keeps_the_padded_budget(
    lengths: list[int], budget: int | None, buckets: Any, sizes: tuple[int, ...]
) -> None:
    """Every row once; no group above the largest size; a group of several rows costs at most
    the budget at its padded shape, or no more than its first row alone (padded rows filled)."""
    groups = plan_shaped_micro_batches(
        lengths,
        budget,
        padded_length=lambda n: bucket_length(n, buckets),
        padded_rows=lambda n: bucket_batch_size(n, sizes),
        max_rows=max(sizes),
    )
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) <= max(sizes)
        if budget is not None and len(g) > 1:
            longest = bucket_length(max(1, *(lengths[i] for i in g)), buckets)
            padded = bucket_batch_size(len(g), sizes)
            assert longest * padded <= budget or padded == bucket_batch_size(1, sizes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length_buckets": 0}, "length_buckets must be >= 1"),
        ({"length_buckets": ()}, "must not be empty"),
        ({"length_buckets": (16, -1)}, "ints >= 1"),
        ({"batch_sizes": (0, 4)}, "ints >= 1"),
        ({"batch_sizes": "8"}, "sequence of ints"),
    ],
)
def test_invalid_shapes(kwargs: Any, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Collator(**kwargs)


def test_ladder_and_sizes_are_sorted() -> None:
    c = Collator(length_buckets=[64, 16, 32, 16], batch_sizes=[8, 2])
    assert c.length_buckets == (16, 32, 64)
    assert c.batch_sizes == (2, 8)
    assert c.max_rows == 8


# -- the collator --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_length_buckets_pad_every_sequence_key(side: Any) -> None:
    c = Collator(padding_side=side, length_buckets=4, pad_values={"input_ids": 9})
    rows = [
        c.prepare({"input_ids": ids(5, 6, 7, 8, 1), "token_type_ids": ids(0, 0, 0, 0, 1)}),
        c.prepare({"input_ids": ids(2, 3), "token_type_ids": ids(1, 1)}),
    ]
    batch = c.collate(rows)
    assert isinstance(batch.data, dict)
    assert batch.padded_length == 8
    assert {k: tuple(v.shape) for k, v in batch.data.items()} == {
        "input_ids": (2, 8),
        "token_type_ids": (2, 8),
        "attention_mask": (2, 8),
    }
    assert batch.data["attention_mask"].sum(1).tolist() == [5, 2]
    if side == "right":
        assert batch.data["input_ids"][1].tolist() == [2, 3, 9, 9, 9, 9, 9, 9]
    else:
        assert batch.data["input_ids"][1].tolist() == [9, 9, 9, 9, 9, 9, 2, 3]
    assert batch.lengths == [5, 2]
    assert (batch.real_rows, batch.padding_rows, batch.rows) == (2, 0, 2)


def test_batch_sizes_add_padding_rows() -> None:
    """3 real rows in a batch of 4: the padding row has pad ids, a zero mask, zero positions."""
    c = Collator(batch_sizes=(1, 2, 4), pad_values={"input_ids": 7}, position_ids="position_ids")
    rows = [c.prepare({"input_ids": ids(*range(1, n + 1)), "label": n}) for n in (3, 1, 2)]
    batch = c.collate(rows)
    assert isinstance(batch.data, dict)
    assert (batch.real_rows, batch.padding_rows, batch.rows) == (3, 1, 4)
    assert batch.data["input_ids"][3].tolist() == [7, 7, 7]
    assert batch.data["attention_mask"][3].tolist() == [0, 0, 0]
    assert batch.data["position_ids"][3].tolist() == [0, 0, 0]
    assert batch.data["label"].tolist() == [3, 1, 2, 0]
    assert batch.lengths == [3, 1, 2]


def test_batch_sizes_pad_tensor_rows_with_zeros_and_a_carried_mask_with_zeros() -> None:
    c = Collator(batch_sizes=(4,))
    batch = c.collate([c.prepare(torch.ones(2)), c.prepare(torch.ones(2))])
    assert isinstance(batch.data, torch.Tensor)
    assert batch.data.tolist() == [[1, 1], [1, 1], [0, 0], [0, 0]]
    assert batch.padding_rows == 2
    masked = c.collate([c.prepare({"input_ids": ids(1, 2), "attention_mask": ids(1, 1)})])
    assert isinstance(masked.data, dict)
    assert masked.data["attention_mask"].tolist() == [[1, 1], [0, 0], [0, 0], [0, 0]]


def test_above_the_largest_size_no_padding_rows() -> None:
    c = Collator(batch_sizes=(2,))
    batch = c.collate([c.prepare({"input_ids": ids(1)}) for _ in range(3)])
    assert (batch.rows, batch.padding_rows) == (3, 0)


# -- what the model sees, and what callers get ----------------------------------------------------


class Recorder:
    """Records each pass's shape; returns input_ids times the mask and a per-row count."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        self.shapes.append(tuple(input_ids.shape))
        return {"tokens": input_ids * attention_mask, "real": attention_mask.sum(1)}


@pytest.mark.parametrize("budget", [None, 64])
def test_shaped_batches_give_the_unshaped_results(budget: int | None) -> None:
    """The model sees only allowed shapes; callers get exactly the unshaped results, and no
    output of a padding row reaches anyone."""
    rows = [{"input_ids": ids(*range(1, n + 1))} for n in (1, 9, 3, 17, 2, 5, 30, 4, 6, 11, 8)]
    plain = BatchForward(Recorder(), max_batch_tokens=budget, strip_padding={"tokens"})(rows)
    model = Recorder()
    collator = Collator(length_buckets=(8, 16, 32), batch_sizes=(1, 2, 4, 8))
    shaped = BatchForward(
        model, collator=collator, max_batch_tokens=budget, strip_padding={"tokens"}
    )(rows)
    assert len(shaped) == len(rows)
    for a, b in zip(plain, shaped, strict=True):
        assert a["tokens"].tolist() == b["tokens"].tolist()
        assert int(a["real"]) == int(b["real"])
    assert {s[0] for s in model.shapes} <= {1, 2, 4, 8}
    assert {s[1] for s in model.shapes} <= {8, 16, 32}
    if budget is not None:
        assert all(s[0] * s[1] <= budget or s[0] == 1 for s in model.shapes)


def test_shaped_batches_of_a_real_model_equal_unshaped(tiny_bert: Any, tokenizer: Any) -> None:
    texts = ["the fox", "a lazy dog sat on the mat", "the", "quick brown fox jumps over"]
    rows = [{k: torch.tensor(v) for k, v in tokenizer(t).items()} for t in texts]
    plain = BatchForward(tiny_bert)(rows)
    shaped = BatchForward(tiny_bert, collator=Collator(length_buckets=16, batch_sizes=(8,)))(rows)
    for a, b in zip(plain, shaped, strict=True):
        assert float((a.pooler_output - b.pooler_output).abs().max()) < 1e-5
