"""Tokenizing texts into per-text rows, with the ``tokenizers`` backend where there is one.

A ``transformers`` tokenizer call builds Python lists of lists, pads nothing here, and then
converts; most of its time goes to Python work under the GIL. A fast tokenizer carries a
``tokenizers.Tokenizer`` (``tokenizer.backend_tokenizer``) whose ``encode_batch`` encodes the
whole batch in Rust, in parallel, without the GIL. :class:`TextTokenizer` uses a private copy of
that backend (so the transformers tokenizer, which reconfigures its backend on every call, can be
used at the same time from other threads), set to truncate to ``max_length`` and never to pad, and
turns each batch's ids into tensors with one conversion for the whole batch. It gives the ids the
tokenizer's own call gives with ``truncation=True, max_length=max_length, padding=False``.

Each text fails alone: a non-string, or a string that is not valid Unicode (a lone surrogate,
which the fast backend would refuse for the whole batch), gets a :class:`CollationError` before
the batch is encoded, and if the encoder still raises, the batch is re-run in halves.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Sequence
from typing import Any, Final, TypeVar, cast

import numpy as np
import torch

from ._collate import CollationError
from ._isolate import run_isolating

__all__ = [
    "TextTokenizer",
    "call_unpadded",
    "default_max_length",
    "text_problem",
    "tokenize_each",
]

R = TypeVar("R")

# Tokenizers without a real limit report a huge sentinel (int(1e30)).
_NO_LIMIT: Final = 100_000


def default_max_length(tokenizer: Any) -> int:
    """The tokenizer's ``model_max_length`` when it is a real limit, else BERT's 512."""
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit <= _NO_LIMIT else 512


def text_problem(text: object) -> str | None:
    """Why ``text`` cannot be tokenized, or None when it can."""
    if not isinstance(text, str):
        return f"expected a str, got {type(text).__name__}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # Fast tokenizers take only valid Unicode, and refuse the whole batch over one text.
        return (
            f"the text cannot be encoded as UTF-8 ({exc.reason} at position {exc.start}); "
            "decode its bytes with errors='replace' or drop the bad characters"
        )
    return None


def call_unpadded(tokenizer: Any, texts: Sequence[str], max_length: int) -> Any:
    """The tokenizer's own call on the batch: truncated to ``max_length``, unpadded, with masks."""
    return tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        padding=False,
        return_attention_mask=True,
    )


def tokenize_each(
    texts: Sequence[object], encode: Callable[[Sequence[str]], Sequence[R]]
) -> list[R | Exception]:
    """``encode`` the valid texts as one batch: one result, or one exception, per text, in order.

    A text :func:`text_problem` refuses gets a :class:`CollationError` and is not encoded; if
    ``encode`` raises, the valid texts are re-run in halves (:func:`run_isolating`).
    """
    results: list[Any] = [None] * len(texts)
    valid: list[int] = []
    for i, text in enumerate(texts):
        problem = text_problem(text)
        if problem is None:
            valid.append(i)
        else:
            results[i] = CollationError(problem)
    if valid:
        encoded = run_isolating(encode, [cast(str, texts[i]) for i in valid])
        for i, row in zip(valid, encoded, strict=True):
            results[i] = row
    return results


Row = dict[str, torch.Tensor]


class TextTokenizer:
    """Texts to rows: ``tokenize(texts)`` returns one row (or one exception) per text, in order.

    A row is a mapping of 1-D ``int64`` tensors, unpadded: ``input_ids``, ``attention_mask`` (all
    ones) and, when the tokenizer returns them and ``keys`` allows it, ``token_type_ids``. Rows
    are what :class:`Collator.prepare` takes. Thread-safe: several threads may tokenize at once.

    Args:
        tokenizer: a ``transformers`` tokenizer. With a fast backend (``backend_tokenizer``) the
            texts are encoded by it directly; otherwise by the tokenizer's own call.
        max_length: truncate each text to this many tokens, special tokens included (default:
            the tokenizer's ``model_max_length``, or 512 when it has no real limit).
        keys: the row keys wanted (e.g. the model's forward parameters): a key the tokenizer
            produces but ``keys`` leaves out is not returned. ``None``: every key the tokenizer
            returns by default (its ``model_input_names``).
        attention_mask: include the (all-ones) ``attention_mask``. ``False`` leaves it out, for a
            :class:`Collator` to build at collation: the same mask, and preparing a row then skips
            checking it (about 40% of the cost of :meth:`Collator.prepare` on short texts).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        keys: Collection[str] | None = None,
        attention_mask: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length if max_length is not None else default_max_length(tokenizer)
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        names = list(getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
        if "input_ids" not in names:
            names.insert(0, "input_ids")
        if keys is not None:
            names = [k for k in names if k == "input_ids" or k in keys]
        if not attention_mask:
            names = [k for k in names if k != "attention_mask"]
        self.keys: tuple[str, ...] = tuple(names)
        self.backend: Any = _configured_backend(tokenizer, self.max_length)
        self._encode: Callable[[list[str]], list[Any]] | None = None
        if self.backend is not None:
            fast = getattr(self.backend, "encode_batch_fast", None)  # no offsets: cheaper
            self._encode = fast if fast is not None else self.backend.encode_batch

    @property
    def is_fast(self) -> bool:
        """True when texts are encoded by the ``tokenizers`` backend directly."""
        return self._encode is not None

    def __call__(self, texts: Sequence[object]) -> list[Row | Exception]:
        """Tokenize ``texts``: one row, or one :class:`CollationError` (or encoder error), each."""
        return tokenize_each(texts, self.encode)

    def encode(self, texts: Sequence[str]) -> list[Row]:
        """Tokenize valid strings as one batch (raises for the whole batch if the encoder does)."""
        if self._encode is None:
            return self._encode_with_call(texts)
        encodings = self._encode(list(texts))
        # Under the GIL from here: every ``Encoding.ids`` read builds a new Python list, so each
        # is read once, and one list -> array conversion for the batch, then views per row
        # (per-row tensor construction costs more than the encoding itself for short texts).
        id_lists = [e.ids for e in encodings]
        lengths = list(map(len, id_lists))
        total = sum(lengths)
        columns: dict[str, list[torch.Tensor]] = {
            "input_ids": _split(_flat(id_lists, total), lengths)
        }
        for key in self.keys:
            if key == "token_type_ids":
                columns[key] = _split(_flat([e.type_ids for e in encodings], total), lengths)
            elif key == "attention_mask":
                # No padding: every token is real.
                columns[key] = _split(torch.ones(total, dtype=torch.long), lengths)
            elif key == "special_tokens_mask":
                masks = [e.special_tokens_mask for e in encodings]
                columns[key] = _split(_flat(masks, total), lengths)
        keys = [k for k in self.keys if k in columns]
        return [{k: columns[k][j] for k in keys} for j in range(len(encodings))]

    def _encode_with_call(self, texts: Sequence[str]) -> list[Row]:
        encoded = call_unpadded(self.tokenizer, texts, self.max_length)
        keys = [k for k in encoded if k in self.keys]
        return [
            {k: torch.as_tensor(encoded[k][j], dtype=torch.long) for k in keys}
            for j in range(len(texts))
        ]


def _flat(lists: list[list[int]], total: int) -> torch.Tensor:
    flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int64, count=total)
    return torch.from_numpy(flat)


def _split(flat: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    return list(torch.split(flat, lengths))


def _configured_backend(tokenizer: Any, max_length: int) -> Any:
    """A private copy of the tokenizer's fast backend, truncating like its call, never padding.

    ``None`` when the tokenizer has no ``tokenizers`` backend.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    import tokenizers  # a dependency of every fast transformers tokenizer

    own = tokenizers.Tokenizer.from_str(backend.to_str())
    own.no_padding()
    own.enable_truncation(
        max_length,
        stride=0,
        strategy="longest_first",
        direction=getattr(tokenizer, "truncation_side", "right"),
    )
    # The tokenizer's call sets this on its backend each time; the copy must match it.
    own.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return own
