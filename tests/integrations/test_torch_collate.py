"""Collation, splitting and the BatchForward batch function, called directly (no event loop)."""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest

pytest.importorskip("torch")

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchio import BatchioError, BatchSizeMismatchError
from batchio.integrations.torch import (
    BatchForward,
    CollationError,
    Collator,
    split_output,
    split_rows,
    stack_outputs,
)

from .conftest import ids

# -- collation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "expected_ids", "expected_mask"),
    [
        ("right", [[5, 6, 7], [8, 9, 0]], [[1, 1, 1], [1, 1, 0]]),
        ("left", [[5, 6, 7], [0, 8, 9]], [[1, 1, 1], [0, 1, 1]]),
    ],
)
def test_pads_to_longest_and_builds_mask(
    side: Any, expected_ids: list[list[int]], expected_mask: list[list[int]]
) -> None:
    """Rows without a mask get one built: 1 for real tokens, 0 for padding, on the right side."""
    c = Collator(padding_side=side)
    batch = c.collate([c.prepare({"input_ids": ids(5, 6, 7)}), c.prepare({"input_ids": [8, 9]})])
    assert isinstance(batch.data, dict)
    assert batch.data["input_ids"].tolist() == expected_ids
    assert batch.data["attention_mask"].tolist() == expected_mask
    assert batch.lengths == [3, 2]
    assert batch.padded_length == 3


def test_pad_value_per_key_and_fixed_keys_stacked() -> None:
    """input_ids pad with the given pad id, labels with -100; a non-sequence key is stacked."""
    c = Collator(pad_values={"input_ids": 99})
    rows = [
        {"input_ids": ids(1), "labels": ids(4), "image": torch.ones(2, 2)},
        {"input_ids": ids(1, 2, 3), "labels": ids(4, 5, 6), "image": torch.zeros(2, 2)},
    ]
    batch = c.collate([c.prepare(r) for r in rows])
    assert isinstance(batch.data, dict)
    assert batch.data["input_ids"].tolist() == [[1, 99, 99], [1, 2, 3]]
    assert batch.data["labels"].tolist() == [[4, -100, -100], [4, 5, 6]]
    assert batch.data["image"].shape == (2, 2, 2)


def test_existing_mask_padded_and_rows_trimmed_to_it() -> None:
    """A row that carries its own padding (from a padded tokenizer batch) is trimmed to its mask,
    then padded once, to this batch's longest row, on this collator's side."""
    c = Collator(padding_side="left")
    padded_right = {"input_ids": ids(7, 8, 0, 0), "attention_mask": ids(1, 1, 0, 0)}
    padded_left = {"input_ids": ids(0, 9, 9, 9), "attention_mask": ids(0, 1, 1, 1)}
    rows = [c.prepare(padded_right), c.prepare(padded_left)]
    assert [r.length for r in rows] == [2, 3]
    batch = c.collate(rows)
    assert isinstance(batch.data, dict)
    assert batch.data["input_ids"].tolist() == [[0, 7, 8], [9, 9, 9]]
    assert batch.data["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]


def test_position_ids_count_real_tokens_only() -> None:
    """With left padding, positions start at 0 on each row's first real token."""
    c = Collator(padding_side="left", position_ids="position_ids")
    batch = c.collate([c.prepare({"input_ids": ids(1, 2, 3)}), c.prepare({"input_ids": ids(4)})])
    assert isinstance(batch.data, dict)
    assert batch.data["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_sequence_keys_padded_each_to_its_own_longest() -> None:
    """A key outside the length groups is padded to its own longest row, not to input_ids';
    the mask follows input_ids (its group)."""
    c = Collator(pad_values={"features": -1.0})
    rows = [
        {"input_ids": ids(1, 2, 3), "features": torch.ones(2, 2, 2)},
        {"input_ids": ids(4), "features": torch.ones(4, 2, 2)},
    ]
    batch = c.collate([c.prepare(r) for r in rows])
    assert isinstance(batch.data, dict)
    assert batch.data["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.data["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.data["features"].shape == (2, 4, 2, 2)
    assert batch.data["features"][0, 2:].eq(-1.0).all()
    assert batch.data["features"][1].eq(1.0).all()
    assert (batch.lengths, batch.padded_length) == ([3, 1], 3)


def test_seq2seq_labels_have_their_own_length() -> None:
    """labels (decoder side) need not match input_ids; each pads to its own longest."""
    c = Collator(padding_side="left")
    rows = [
        {"input_ids": ids(1, 2, 3, 4), "labels": ids(7)},
        {"input_ids": ids(5), "labels": ids(8, 9)},
    ]
    batch = c.collate([c.prepare(r) for r in rows])
    assert isinstance(batch.data, dict)
    assert batch.data["input_ids"].tolist() == [[1, 2, 3, 4], [0, 0, 0, 5]]
    assert batch.data["labels"].tolist() == [[-100, 7], [8, 9]]
    assert batch.data["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]


def test_trimming_to_the_mask_leaves_other_keys_alone() -> None:
    """A padded row is trimmed to its mask in the mask's group only."""
    c = Collator(pad_values={"features": 0.0})
    row = c.prepare(
        {
            "input_ids": ids(7, 8, 0, 0),
            "attention_mask": ids(1, 1, 0, 0),
            "features": torch.ones(3, 2),
        }
    )
    assert isinstance(row.data, dict)
    assert row.length == 2
    assert row.data["input_ids"].tolist() == [7, 8]
    assert row.data["features"].shape == (3, 2)


def test_declared_length_group_is_checked() -> None:
    """Keys declared in one length group must share a length in each row."""
    c = Collator(
        pad_values={"features": 0.0},
        length_groups=[{"input_ids", "attention_mask", "features"}],
    )
    with pytest.raises(CollationError, match="different lengths: input_ids=3, features=2"):
        c.prepare({"input_ids": ids(1, 2, 3), "features": torch.ones(2, 2)})
    assert c.prepare({"input_ids": ids(1, 2), "features": torch.ones(2, 2)}).length == 2


def test_custom_mask_key_joins_its_declared_group() -> None:
    """A mask under another name needs no pad value of its own and follows its group."""
    c = Collator(attention_mask="mask", pad_values={"ids": 0}, length_groups=[{"ids", "mask"}])
    batch = c.collate([c.prepare({"ids": ids(1, 2)}), c.prepare({"ids": ids(3)})])
    assert isinstance(batch.data, dict)
    assert batch.data["mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(CollationError, match="different lengths: ids=2, mask=1"):
        c.prepare({"ids": ids(1, 2), "mask": ids(1)})


def test_no_length_groups_pads_every_key_alone() -> None:
    c = Collator(length_groups=[], attention_mask=None)
    batch = c.collate(
        [
            c.prepare({"input_ids": ids(1, 2), "token_type_ids": ids(0)}),
            c.prepare({"input_ids": ids(3), "token_type_ids": ids(1, 1, 1)}),
        ]
    )
    assert isinstance(batch.data, dict)
    assert batch.data["input_ids"].tolist() == [[1, 2], [3, 0]]
    assert batch.data["token_type_ids"].tolist() == [[0, 0, 0], [1, 1, 1]]
    assert "attention_mask" not in batch.data


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ([{"input_ids"}, {"input_ids", "labels"}], "more than one length group"),
        ([{"input_ids", "features"}], "'features' has no pad value"),
    ],
)
def test_invalid_length_groups(groups: list[set[str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Collator(length_groups=groups)
    with pytest.raises(TypeError, match="got the string 'input_ids'"):
        Collator(length_groups=["input_ids"])


def test_tensor_and_numpy_rows_stack() -> None:
    c = Collator()
    rows = [c.prepare(torch.ones(3)), c.prepare(np.zeros(3, dtype=np.float32))]
    batch = c.collate(rows)
    assert isinstance(batch.data, torch.Tensor)
    assert batch.data.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]


def test_empty_collate_is_a_bug() -> None:
    with pytest.raises(ValueError, match="empty"):
        Collator().collate([])


def test_invalid_padding_side() -> None:
    with pytest.raises(ValueError, match="padding_side"):
        Collator(padding_side="middle")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"input_ids": ids(1, 2), "attention_mask": ids(1)}, "different lengths"),
        ({"input_ids": torch.ones(1, 3, dtype=torch.long)}, r"shape \(1, 3\).*1-D"),
        ({"input_ids": ids(1), "attention_mask": ids(0)}, "all zeros"),
        ({"input_ids": "not token ids"}, "key 'input_ids' is a str"),
        ({"input_ids": torch.tensor(3)}, "0-d"),
        ({}, "empty mapping"),
        ({1: ids(1)}, "keys must be strings"),
        (object(), "not a tensor"),
    ],
)
def test_bad_row_rejected_on_its_own(row: Any, message: str) -> None:
    with pytest.raises(CollationError, match=message) as info:
        Collator().prepare(row)
    assert isinstance(info.value, BatchioError)
    assert isinstance(info.value, ValueError)


# -- the batch function: per-row failures --------------------------------------------------------


def echo_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A 'model' whose output per row is its own ids times the mask (padding becomes 0)."""
    return input_ids * attention_mask


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"input_ids": ids(1, 2)[None]}, r"shape (1, 2); a row holds one sequence"),
        ({"input_ids": torch.ones(2, 3)[0]}, "dtype torch.float32"),
        ("text", "the input is a str, which is not a tensor"),
    ],
)
def test_bad_row_fails_alone_and_batch_proceeds(bad: Any, message: str) -> None:
    """A row that cannot run gets a CollationError naming the problem; the other rows run."""
    fn = BatchForward(echo_ids, strip_padding=True)
    results = fn([{"input_ids": ids(1, 2, 3)}, bad, {"input_ids": ids(4)}])
    assert results[0].tolist() == [1, 2, 3]
    assert results[2].tolist() == [4]
    assert isinstance(results[1], CollationError)
    assert results[1].reason
    assert message in str(results[1])


@pytest.mark.parametrize(
    "odd",
    [
        {"input_ids": ids(1, 2), "token_type_ids": ids(0, 0)},
        {"labels": ids(1)},
        torch.ones(3),
    ],
)
def test_row_of_another_signature_runs_apart_and_gets_the_models_own_error(odd: Any) -> None:
    """A row with other keys (or a tensor among mappings) is not refused: it runs in its own
    micro-batch, and here the model itself rejects it (a TypeError for that row only)."""
    fn = BatchForward(echo_ids, strip_padding=True)
    results = fn([{"input_ids": ids(1, 2, 3)}, odd, {"input_ids": ids(4)}])
    assert results[0].tolist() == [1, 2, 3]
    assert results[2].tolist() == [4]
    assert isinstance(results[1], TypeError)


def test_all_rows_bad() -> None:
    results = BatchForward(echo_ids)([{}, {}])
    assert all(isinstance(r, CollationError) for r in results)


def test_forward_error_fails_only_its_micro_batch() -> None:
    """With micro-batches, a forward pass that raises fails its own rows; the others succeed."""

    def picky(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > 3:
            raise RuntimeError("too long for this model")
        return input_ids.sum(dim=1)

    fn = BatchForward(picky, max_batch_tokens=4)
    results = fn([{"input_ids": ids(1)}, {"input_ids": ids(1, 1, 1, 1, 1)}, {"input_ids": ids(2)}])
    assert results[0].tolist() == 1
    assert results[2].tolist() == 2
    assert isinstance(results[1], RuntimeError)


def test_invalid_max_batch_tokens() -> None:
    with pytest.raises(ValueError, match="max_batch_tokens"):
        BatchForward(echo_ids, max_batch_tokens=0)


# -- micro-batches -------------------------------------------------------------------------------


class RecordingModel(torch.nn.Module):
    """Records the shape of every batch it sees; returns per-token ids and a per-row sum."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        self.shapes.append(tuple(input_ids.shape))
        tokens = input_ids * attention_mask
        return {"tokens": tokens, "total": tokens.sum(dim=1)}


@pytest.mark.parametrize("side", ["left", "right"])
def test_micro_batches_bounded_sorted_and_back_in_order(side: Any) -> None:
    """Rows run length-sorted in passes of at most max_batch_tokens padded tokens; each caller
    gets its own row's result, in the order given, with per-token padding stripped."""
    lengths = [1, 8, 2, 7, 3, 8, 1]
    rows = [{"input_ids": torch.arange(1, n + 1)} for n in lengths]
    model = RecordingModel()
    fn = BatchForward(
        model,
        collator=Collator(padding_side=side),
        max_batch_tokens=16,
        strip_padding={"tokens"},
    )
    results = fn(rows)
    assert all(rows_ * longest <= 16 for rows_, longest in model.shapes)
    assert sum(r for r, _ in model.shapes) == len(rows)
    assert [longest for _, longest in model.shapes] == sorted(
        (longest for _, longest in model.shapes), reverse=True
    )
    for n, out in zip(lengths, results, strict=True):
        assert out["tokens"].tolist() == list(range(1, n + 1))
        assert out["total"].item() == n * (n + 1) // 2


def test_device_defaults_to_where_the_module_is() -> None:
    """Without device=, inputs follow the module's parameters (meta stands in for a GPU here)."""
    assert BatchForward(torch.nn.Linear(2, 2, device="meta")).placement.device == torch.device(
        "meta"
    )
    assert BatchForward(torch.nn.Linear(2, 2)).placement.device is None
    assert BatchForward(torch.nn.ReLU()).placement.device is None


def test_module_put_in_eval_mode() -> None:
    module = torch.nn.Dropout(p=0.5).train()
    BatchForward(module)
    assert not module.training


def test_forward_runs_in_inference_mode() -> None:
    seen: list[bool] = []

    def model(x: torch.Tensor) -> torch.Tensor:
        seen.append(torch.is_inference_mode_enabled())
        return x

    BatchForward(model)([torch.ones(1)])
    assert seen == [True]


# -- splitting outputs ----------------------------------------------------------------------------


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


@dataclass
class FakeModelOutput(OrderedDict[str, Any]):
    """Shaped like transformers.ModelOutput: a dataclass over an OrderedDict."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for key in ("last_hidden_state", "pooler_output"):
            if getattr(self, key) is not None:
                self[key] = getattr(self, key)


def split(output: Any, n: int, **kw: Any) -> list[Any]:
    return split_output(output, n, lengths=[1, 3], padded_length=3, padding_side="right", **kw)


def test_split_tensor_copies_rows() -> None:
    out = torch.arange(6).reshape(2, 3)
    rows = split(out, 2)
    assert [r.tolist() for r in rows] == [[0, 1, 2], [3, 4, 5]]
    rows[0][0] = 100
    assert out[0, 0] == 0  # a row is its own copy, not a view of the batch


def test_split_structures() -> None:
    loss = torch.tensor(0.5)
    out = {"pair": Pair(torch.ones(2), torch.zeros(2)), "list": [torch.ones(2)], "loss": loss}
    rows = split({**out, "none": None, "name": "x"}, 2)
    assert isinstance(rows[1]["pair"], Pair)
    assert rows[1]["pair"].b.item() == 0
    assert isinstance(rows[1]["list"], list)
    assert rows[0]["loss"] is loss
    assert rows[0]["none"] is None
    assert rows[1]["name"] == "x"
    assert type(split((torch.ones(2),), 2)[0]) is tuple


def test_split_model_output_keeps_class_and_strips_named_outputs() -> None:
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    out = FakeModelOutput(last_hidden_state=hidden, pooler_output=torch.ones(2, 3))
    rows = split(out, 2, strip_padding={"last_hidden_state"})
    assert isinstance(rows[0], FakeModelOutput)
    assert rows[0].last_hidden_state is not None
    assert rows[0].last_hidden_state.shape == (1, 2)
    assert rows[1]["last_hidden_state"].shape == (3, 2)
    # Not named, so not stripped, though its dimension 1 equals the padded length.
    assert rows[0]["pooler_output"].shape == (3,)


def test_split_strip_true_and_left_padding() -> None:
    out = torch.tensor([[0, 0, 7], [1, 2, 3]])
    rows = split_output(
        out, 2, lengths=[1, 3], padded_length=3, padding_side="left", strip_padding=True
    )
    assert [r.tolist() for r in rows] == [[7], [1, 2, 3]]
    by_index = split_output(
        (out, out), 2, lengths=[1, 3], padded_length=3, padding_side="left", strip_padding={1}
    )
    assert by_index[0][0].tolist() == [0, 0, 7]
    assert by_index[0][1].tolist() == [7]


def test_split_wrong_row_count() -> None:
    with pytest.raises(BatchSizeMismatchError) as info:
        split({"logits": torch.ones(3, 2)}, 2)
    assert "output['logits']" in str(info.value.__notes__)


# -- rows in, rows out ---------------------------------------------------------------------------


def test_split_rows_and_stack_outputs_round_trip() -> None:
    batch = {"input_ids": torch.arange(6).reshape(2, 3), "mask": [[1, 1, 1], [1, 1, 0]]}
    rows = split_rows(batch)
    assert len(rows) == 2
    assert rows[1]["mask"].tolist() == [1, 1, 0]
    assert split_rows(torch.ones(4, 2))[3].shape == (2,)
    ragged = [
        {"t": torch.ones(1), "s": torch.tensor(1.0)},
        {"t": torch.ones(3), "s": torch.tensor(2.0)},
    ]
    stacked = stack_outputs(ragged, "left")
    assert stacked["t"].tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    assert stacked["s"].tolist() == [1.0, 2.0]
    assert stack_outputs([(torch.ones(1), None)] * 2, "right")[1] is None
    assert stack_outputs([Pair(torch.ones(1), torch.ones(1))] * 2, "right").a.shape == (2, 1)
    assert stack_outputs(["x", "y"], "right") == ["x", "y"]


def test_split_rows_rejects_ragged_or_0d() -> None:
    with pytest.raises(CollationError, match="different numbers of rows"):
        split_rows({"a": torch.ones(2, 3), "b": torch.ones(3, 3)})
    with pytest.raises(CollationError, match="0-d"):
        split_rows(torch.tensor(1.0))
    with pytest.raises(CollationError, match="key 'input_ids' cannot become one tensor"):
        split_rows({"input_ids": [[1, 2], [3]]})  # an unpadded tokenizer batch
    with pytest.raises(ValueError, match="empty"):
        stack_outputs([], "right")


# -- properties and memory -------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=12),
    side=st.sampled_from(["left", "right"]),
    budget=st.one_of(st.none(), st.integers(min_value=1, max_value=60)),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_round_trip_any_lengths_side_and_budget(
    lengths: list[int], side: Any, budget: int | None, seed: int
) -> None:
    """Through collation, micro-batching, an identity model and splitting, every row comes back
    exactly as it went in, in the caller's order, whatever the lengths, side and budget."""
    gen = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(1, 100, (n,), generator=gen)} for n in lengths]
    fn = BatchForward(
        echo_ids,
        collator=Collator(padding_side=side),
        max_batch_tokens=budget,
        strip_padding=True,
    )
    results = fn(rows)
    assert [r.tolist() for r in results] == [row["input_ids"].tolist() for row in rows]


def test_failed_forward_does_not_keep_batch_tensors_alive() -> None:
    """The exception a failed forward pass delivers keeps its traceback, not the batch's tensors."""
    refs: list[weakref.ref[torch.Tensor]] = []

    def failing(x: torch.Tensor) -> torch.Tensor:
        scratch = x * 2  # stands in for activations, possibly device memory
        refs.append(weakref.ref(scratch))
        refs.append(weakref.ref(x))
        raise RuntimeError("out of memory (simulated)")

    results = BatchForward(failing)([torch.ones(1000), torch.ones(1000)])
    gc.collect()
    assert all(isinstance(r, RuntimeError) for r in results)
    assert results[0] is not results[1]  # bisected: each row's own run, its own error
    assert all(r.__traceback__ is not None for r in results)  # still debuggable
    assert len(refs) == 6  # the pair, then each row alone
    assert [r() for r in refs] == [None] * 6
