"""Collation: turn per-request rows into one padded batch, rejecting rows that cannot join it.

A *row* is one request's input: a tensor (or anything ``torch.as_tensor`` accepts, such as a numpy
array), or a mapping of names to tensors such as one text's tokenizer output. Rows are first
*prepared* one by one (converted, checked, trimmed of any padding they carry), which gives each a
signature. Rows whose signature differs from the batch's (the most common one) fail alone, with a
:class:`CollationError` saying why; the others are padded and stacked.

All of this runs on the batcher's worker thread, never on the event loop.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import torch

from .. import BatchioError

__all__ = [
    "DEFAULT_PAD_VALUES",
    "CollatedBatch",
    "CollationError",
    "Collator",
    "PaddingSide",
    "PreparedRow",
]

PaddingSide: TypeAlias = Literal["left", "right"]

DEFAULT_PAD_VALUES: Final[Mapping[str, float]] = {
    "input_ids": 0,
    "attention_mask": 0,
    "token_type_ids": 0,
    "position_ids": 0,
    "special_tokens_mask": 1,
    "labels": -100,
    "inputs_embeds": 0.0,
    "decoder_input_ids": 0,
    "decoder_attention_mask": 0,
}
"""Pad values of the sequence keys a collator knows without being told (Hugging Face names)."""

# Keys that hold exactly one token per position: a row must be 1-D. A (1, L) row is almost always a
# tokenizer batch of one submitted as a single row, and saying so beats a confusing shape error.
_TOKEN_KEYS: Final = frozenset(
    {
        "input_ids",
        "attention_mask",
        "token_type_ids",
        "position_ids",
        "special_tokens_mask",
        "labels",
        "decoder_input_ids",
        "decoder_attention_mask",
    }
)

Signature: TypeAlias = tuple[Hashable, ...]


class CollationError(BatchioError, ValueError):
    """Raised to a request whose input cannot join its batch; the rest of the batch still runs.

    ``reason`` says what is wrong with the input (a missing key, a shape or dtype that does not
    match the other rows, a value that is not a tensor).
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"cannot batch this input: {reason}")


class PreparedRow:
    """One row converted to tensors and checked, with its sequence length and signature."""

    __slots__ = ("data", "length", "signature")

    def __init__(
        self, data: torch.Tensor | dict[str, torch.Tensor], length: int, signature: Signature
    ) -> None:
        self.data = data
        self.length = length  # tokens in the row; 0 for a row with no sequence dimension
        self.signature = signature


@dataclass(frozen=True, slots=True)
class CollatedBatch:
    """A padded batch ready for the model.

    Attributes:
        data: the stacked tensor, or the mapping of stacked tensors, to call the model with.
        lengths: each row's real length (0 for rows with no sequence dimension).
        padded_length: the sequence length every row was padded to (0 if none).
        padding_side: where the padding went.
    """

    data: torch.Tensor | dict[str, torch.Tensor]
    lengths: list[int]
    padded_length: int
    padding_side: PaddingSide


def _as_tensor(value: object, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CollationError(
            f"{what} is a {type(value).__name__}, which is not a tensor and cannot become one "
            f"({exc})"
        ) from None


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


@dataclass(frozen=True, slots=True)
class Collator:
    """Pads and stacks rows into batches (see the module docstring for what a row is).

    Args:
        padding_side: pad sequences on the ``"right"`` (the usual for encoders) or the ``"left"``.
        pad_values: pad value per key, added to (and overriding) :data:`DEFAULT_PAD_VALUES`.
            A key is a *sequence key*, padded along each row's first dimension, when it has a pad
            value; other keys must have the same shape in every row and are stacked.
        attention_mask: the key of the attention mask: padded with 0 when rows carry one, built
            (1 for real tokens, 0 for padding) when they do not. ``None``: no mask is built.
        position_ids: a key under which to add position ids counted over real tokens only, which
            left padding needs for models with absolute positions (BERT and friends). ``None``:
            none are added.
    """

    padding_side: PaddingSide = "right"
    pad_values: Mapping[str, float] = field(default_factory=dict)
    attention_mask: str | None = "attention_mask"
    position_ids: str | None = None
    _pads: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f'padding_side must be "left" or "right", got {self.padding_side!r}')
        pads = {**DEFAULT_PAD_VALUES, **self.pad_values}
        for key in (self.attention_mask, self.position_ids):
            if key is not None:
                pads.setdefault(key, 0)
        object.__setattr__(self, "_pads", pads)

    # -- one row ---------------------------------------------------------------------------------

    def prepare(self, row: object) -> PreparedRow:
        """Convert and check one row; raise :class:`CollationError` if it cannot be batched."""
        if isinstance(row, Mapping):
            return self._prepare_mapping(row)
        t = _as_tensor(row, "the input")
        return PreparedRow(t, 0, ("tensor", _shape(t), t.dtype, t.device))

    def _prepare_mapping(self, row: Mapping[Any, Any]) -> PreparedRow:
        if not row:
            raise CollationError("the input is an empty mapping")
        data: dict[str, torch.Tensor] = {}
        for key, value in row.items():
            if not isinstance(key, str):
                raise CollationError(f"keys must be strings, got {key!r}")
            t = data[key] = _as_tensor(value, f"key {key!r}")
            if key in self._pads and t.ndim == 0:
                raise CollationError(f"key {key!r} is a sequence key but holds a 0-d tensor")
            if key in _TOKEN_KEYS and t.ndim != 1:
                raise CollationError(
                    f"key {key!r} has shape {_shape(t)}; a row holds one sequence (1-D). "
                    "To submit several rows at once, split them (BatchedModule.rows does)"
                )
        seq_lengths = {k: t.shape[0] for k, t in data.items() if k in self._pads}
        if len(set(seq_lengths.values())) > 1:
            listed = ", ".join(f"{k}={n}" for k, n in seq_lengths.items())
            raise CollationError(f"sequence keys have different lengths: {listed}")
        length = next(iter(seq_lengths.values()), 0)
        mask_key = self.attention_mask
        if mask_key is not None and mask_key in data and length:
            length = self._trim_to_mask(data, data[mask_key], length)
        signature = tuple(
            sorted(
                (
                    key,
                    key in self._pads,
                    _shape(t)[1:] if key in self._pads else _shape(t),
                    t.dtype,
                    t.device,
                )
                for key, t in data.items()
            )
        )
        return PreparedRow(data, length, ("mapping", signature))

    def _trim_to_mask(self, data: dict[str, torch.Tensor], mask: torch.Tensor, length: int) -> int:
        """Drop the padding a row already carries, so it is padded once, to this batch's longest."""
        real = mask.nonzero()
        if real.numel() == 0:
            raise CollationError("the attention mask is all zeros: the row has no real tokens")
        first, last = int(real[0, 0]), int(real[-1, 0])
        if first == 0 and last == length - 1:
            return length
        for key in data:
            if key in self._pads:
                data[key] = data[key][first : last + 1]
        return last + 1 - first

    # -- the batch -------------------------------------------------------------------------------

    @staticmethod
    def reference_signature(rows: Sequence[PreparedRow]) -> Signature:
        """The signature most rows share (the earliest wins a tie): the batch is built from it."""
        counts = Counter(r.signature for r in rows)
        return max(counts, key=counts.__getitem__)

    def mismatch(self, row: PreparedRow, reference: PreparedRow) -> CollationError:
        """Say why ``row`` cannot be batched with ``reference``'s rows."""
        kind, ref_kind = row.signature[0], reference.signature[0]
        if kind != ref_kind:
            return CollationError(f"a {kind} input cannot be batched with {ref_kind} inputs")
        if isinstance(row.data, torch.Tensor):
            assert isinstance(reference.data, torch.Tensor)
            return CollationError(
                _describe_tensor("the input", row.data, reference.data, sequence=False)
            )
        assert isinstance(reference.data, dict)
        for key in reference.data:
            if key not in row.data:
                return CollationError(
                    f"missing key {key!r} (the batch's inputs have keys {sorted(reference.data)})"
                )
        for key in row.data:
            if key not in reference.data:
                return CollationError(
                    f"unexpected key {key!r} (the batch's inputs have keys "
                    f"{sorted(reference.data)})"
                )
        for key, t in row.data.items():
            ref = reference.data[key]
            reason = _describe_tensor(f"key {key!r}", t, ref, sequence=key in self._pads)
            if reason:
                return CollationError(reason)
        return CollationError("the input does not match the batch's inputs")  # pragma: no cover

    def collate(self, rows: Sequence[PreparedRow], *, pin_memory: bool = False) -> CollatedBatch:
        """Pad and stack rows that share one signature into a :class:`CollatedBatch`.

        ``pin_memory=True`` builds the batch in page-locked memory, for a fast, asynchronous copy
        to a CUDA device.
        """
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        lengths = [r.length for r in rows]
        first = rows[0].data
        if isinstance(first, torch.Tensor):
            stacked = torch.stack([r.data for r in rows])  # type: ignore[misc]
            if pin_memory:
                stacked = stacked.pin_memory()
            return CollatedBatch(stacked, lengths, 0, self.padding_side)
        n, longest = len(rows), max(lengths)
        right = self.padding_side == "right"
        out: dict[str, torch.Tensor] = {}
        for key, t0 in first.items():
            column = [r.data[key] for r in rows]  # type: ignore[index]
            if key not in self._pads:
                stacked = torch.stack(column)
                out[key] = stacked.pin_memory() if pin_memory else stacked
                continue
            buf = torch.full(
                (n, longest, *t0.shape[1:]),
                self._pads[key],
                dtype=t0.dtype,
                device=t0.device,
                pin_memory=pin_memory,
            )
            for i, t in enumerate(column):
                k = t.shape[0]
                if right:
                    buf[i, :k] = t
                else:
                    buf[i, longest - k :] = t
            out[key] = buf
        has_sequences = any(key in self._pads for key in first)
        mask_key = self.attention_mask
        if has_sequences and mask_key is not None and mask_key not in out:
            out[mask_key] = self._build_mask(lengths, longest, pin_memory)
        pos_key = self.position_ids
        if has_sequences and pos_key is not None and pos_key not in out:
            mask = out[mask_key] if mask_key is not None else self._build_mask(lengths, longest)
            out[pos_key] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return CollatedBatch(out, lengths, longest, self.padding_side)

    def _build_mask(
        self, lengths: list[int], longest: int, pin_memory: bool = False
    ) -> torch.Tensor:
        mask = torch.zeros((len(lengths), longest), dtype=torch.long, pin_memory=pin_memory)
        for i, k in enumerate(lengths):
            if self.padding_side == "right":
                mask[i, :k] = 1
            else:
                mask[i, longest - k :] = 1
        return mask


def _describe_tensor(what: str, t: torch.Tensor, ref: torch.Tensor, *, sequence: bool) -> str:
    """Why tensor ``t`` cannot be stacked with ``ref`` ('' if it can)."""
    if t.dtype != ref.dtype:
        return f"{what} has dtype {t.dtype}, but the batch's has {ref.dtype}"
    if t.device != ref.device:
        return f"{what} is on device {t.device}, but the batch's is on {ref.device}"
    shape, ref_shape = _shape(t), _shape(ref)
    if sequence:
        if shape[1:] != ref_shape[1:]:
            return f"{what} has per-token shape {shape[1:]}, but the batch's has {ref_shape[1:]}"
        return ""
    if shape != ref_shape:
        return f"{what} has shape {shape}, but the batch's has {ref_shape}"
    return ""
