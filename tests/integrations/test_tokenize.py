"""TextTokenizer: the tokenizers backend gives the tokenizer call's ids, and each text fails alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import torch

from batchio.integrations.torch import CollationError, Collator
from batchio.integrations.transformers import TextTokenizer

CORPUS = [
    "",
    "the fox",
    "  the   lazy dog  ",
    "héllo wörld 你好 🤖 ﬁ e\u0301",
    "[CLS] the [SEP] [MASK] special tokens inside",
    "the quick brown fox jumps over the lazy dog " * 40,  # truncates
    "x" * 3000,
]


def reference(tokenizer: Any, texts: list[str], max_length: int) -> Any:
    return tokenizer(texts, truncation=True, max_length=max_length, padding=False)


def assert_same_as_call(tok: TextTokenizer, tokenizer: Any, max_length: int) -> None:
    rows = tok(CORPUS)
    ref = reference(tokenizer, CORPUS, max_length)
    assert set(tok.keys) == set(ref.keys())
    for j, row in enumerate(rows):
        assert isinstance(row, dict)
        assert set(row) == set(ref.keys())
        for key in ref:
            assert row[key].dtype == torch.long
            assert row[key].tolist() == ref[key][j], (j, key)


@pytest.mark.parametrize("max_length", [1, 3, 8, 512])
def test_backend_ids_equal_the_tokenizer_call(tokenizer: Any, max_length: int) -> None:
    tok = TextTokenizer(tokenizer, max_length=max_length)
    assert tok.is_fast
    assert_same_as_call(tok, tokenizer, max_length)


@pytest.mark.parametrize("max_length", [16, 128])
def test_real_minilm_tokenizer_ids_equal_its_call(minilm_path: Path, max_length: int) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    assert_same_as_call(TextTokenizer(tokenizer, max_length=max_length), tokenizer, max_length)


def test_default_max_length_is_the_tokenizers_or_512(minilm_path: Path, tokenizer: Any) -> None:
    real = transformers.AutoTokenizer.from_pretrained(minilm_path, local_files_only=True)
    assert TextTokenizer(real).max_length == real.model_max_length
    assert TextTokenizer(tokenizer).max_length == 512  # no real limit: BERT's


def test_left_truncation_follows_the_tokenizer(tokenizer: Any) -> None:
    left = transformers.BertTokenizer(vocab=tokenizer.get_vocab(), truncation_side="left")
    tok = TextTokenizer(left, max_length=5)
    text = "the quick brown fox jumps over"
    row = tok([text])[0]
    assert isinstance(row, dict)
    assert row["input_ids"].tolist() == reference(left, [text], 5)["input_ids"][0]


def test_using_the_tokenizer_meanwhile_does_not_change_the_copy(tokenizer: Any) -> None:
    """The transformers call reconfigures its own backend; the private copy keeps its settings."""
    tok = TextTokenizer(tokenizer, max_length=4)
    tokenizer(["the fox"] * 2, padding="max_length", max_length=20, truncation=True)
    row = tok(["the quick brown fox jumps"])[0]
    assert isinstance(row, dict)
    assert row["input_ids"].shape == (4,)


def test_keys_and_attention_mask_options(tokenizer: Any) -> None:
    only_ids = TextTokenizer(tokenizer, keys={"input_ids", "attention_mask"}, attention_mask=False)
    assert only_ids.keys == ("input_ids",)
    row = only_ids(["the fox"])[0]
    assert isinstance(row, dict)
    assert list(row) == ["input_ids"]
    # The collator builds the same mask the tokenizer would have given.
    full = TextTokenizer(tokenizer)(["the fox", "a"])
    built = Collator().collate([Collator().prepare(r) for r in only_ids(["the fox", "a"])])
    given = Collator().collate([Collator().prepare(r) for r in full])
    assert isinstance(built.data, dict)
    assert isinstance(given.data, dict)
    assert torch.equal(built.data["attention_mask"], given.data["attention_mask"])


def test_bad_texts_fail_alone(tokenizer: Any) -> None:
    rows = TextTokenizer(tokenizer)(["the fox", 42, "a \ud800 dog", b"bytes", "a dog"])
    assert isinstance(rows[0], dict)
    assert isinstance(rows[4], dict)
    for i, words in ((1, "expected a str, got int"), (2, "UTF-8"), (3, "got bytes")):
        assert isinstance(rows[i], CollationError)
        assert words in str(rows[i])


class NoBackend:
    """A tokenizer without a fast backend: only its call works (a 'slow' tokenizer)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.model_input_names = inner.model_input_names
        self.model_max_length = inner.model_max_length

    def __call__(self, texts: list[str], **kwargs: Any) -> Any:
        if any("poison" in t for t in texts):
            raise ValueError("the tokenizer cannot take this text")
        return self.inner(texts, **kwargs)


def test_without_a_backend_the_tokenizer_call_is_used(tokenizer: Any) -> None:
    slow = TextTokenizer(NoBackend(tokenizer), max_length=8)
    assert not slow.is_fast
    assert_same_as_call(slow, tokenizer, 8)


def test_a_failing_encoder_is_bisected(tokenizer: Any) -> None:
    rows = TextTokenizer(NoBackend(tokenizer))(["the fox", "poison", "a dog", "more poison"])
    assert isinstance(rows[1], ValueError)
    assert isinstance(rows[3], ValueError)
    assert rows[1] is not rows[3]
    assert isinstance(rows[0], dict)
    assert isinstance(rows[2], dict)


def test_invalid_max_length(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="max_length"):
        TextTokenizer(tokenizer, max_length=0)
