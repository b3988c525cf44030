"""Collation: turn per-request rows into padded batches, rejecting only rows that cannot run.

A *row* is one request's input: a tensor (or anything ``torch.as_tensor`` accepts, such as a numpy
array), or a mapping of names to tensors such as one text's tokenizer output. Rows are first
*prepared* one by one (converted, checked, trimmed of any padding they carry), which gives each a
signature (its keys, dtypes, devices and per-token shapes). A row that cannot run at all (not a
tensor, a sparse tensor, token ids that are not integers, keys that must share a length but do
not) fails alone with a :class:`CollationError` saying why. Rows that share a signature are padded
and stacked together; rows of different signatures are collated apart (the batch function runs
them as separate micro-batches).

All of this runs on the batcher's worker thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

import torch

from .. import BatchioError
from ._shapes import (
    LengthBuckets,
    bucket_batch_size,
    bucket_length,
    checked_batch_sizes,
    checked_length_buckets,
)

__all__ = [
    "DEFAULT_LENGTH_GROUPS",
    "DEFAULT_PAD_VALUES",
    "CollatedBatch",
    "CollationError",
    "Collator",
    "PaddingSide",
    "PreparedRow",
]

#: Which end of a row the padding goes: ``"right"`` (after the tokens, what encoders expect) or
#: ``"left"`` (before them, what decoder-only models generating from the last position need).
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

# Keys that hold token ids: an embedding lookup takes integers only, and a float row would fail
# its whole micro-batch.
_ID_KEYS: Final = frozenset({"input_ids", "token_type_ids", "position_ids", "decoder_input_ids"})

DEFAULT_LENGTH_GROUPS: Final[tuple[frozenset[str], ...]] = (
    frozenset(
        {
            "input_ids",
            "inputs_embeds",
            "attention_mask",
            "token_type_ids",
            "position_ids",
            "special_tokens_mask",
        }
    ),
    frozenset({"decoder_input_ids", "decoder_attention_mask"}),
)
"""Keys that must share a length in a row: a tokenizer's encoder outputs, and the decoder's.

``labels`` is in neither: it follows the encoder for token classification but the decoder for
sequence-to-sequence models, so it is padded to its own longest row.
"""

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
        lengths: each real row's length (0 for rows with no sequence dimension).
        padded_length: the sequence length every row was padded to (0 if none).
        padding_side: where the padding went.
        padding_rows: rows of padding after the real ones, added to reach an allowed batch size
            (``Collator(batch_sizes=...)``): pad values, attention mask all zero. Their outputs
            are dropped before the results are split.
    """

    data: torch.Tensor | dict[str, torch.Tensor]
    lengths: list[int]
    padded_length: int
    padding_side: PaddingSide
    padding_rows: int = 0

    @property
    def real_rows(self) -> int:
        """How many rows are real (the first ``real_rows``; the rest are padding rows)."""
        return len(self.lengths)

    @property
    def rows(self) -> int:
        """How many rows the batch holds, padding rows included."""
        return len(self.lengths) + self.padding_rows


def _as_tensor(value: object, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value
    else:
        try:
            t = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CollationError(
                f"{what} is a {type(value).__name__}, which is not a tensor and cannot become one "
                f"({exc})"
            ) from None
    # Padding and stacking copy into a dense buffer: a sparse or nested row would fail there, or
    # in the model, taking its whole micro-batch with it.
    if t.is_nested:
        raise CollationError(f"{what} is a nested tensor; only dense tensors can be batched")
    if t.layout != torch.strided:
        raise CollationError(
            f"{what} is a {t.layout} tensor; only dense tensors can be batched (call .to_dense())"
        )
    return t


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


@dataclass(frozen=True, slots=True)
class Collator:
    """Pads and stacks rows into batches (see the module docstring for what a row is).

    Args:
        padding_side: pad sequences on the ``"right"`` (the usual for encoders) or the ``"left"``.
        pad_values: pad value per key, added to (and overriding) :data:`DEFAULT_PAD_VALUES`.
            A key is a *sequence key*, padded along each row's first dimension, when it has a pad
            value; other keys must have the same shape in every row and are stacked. Each
            sequence key is padded to its own longest row.
        attention_mask: the key of the attention mask: padded with 0 when rows carry one, built
            (1 for real tokens, 0 for padding) when they do not. ``None``: no mask is built.
        position_ids: a key under which to add position ids counted over real tokens only, which
            left padding needs for models with absolute positions (BERT and friends). ``None``:
            none are added.
        length_groups: groups of sequence keys that must have the same length within a row (a row
            where they do not fails alone). The group holding ``attention_mask`` (else the first)
            is the row's *main sequence*: the mask and position ids follow it, a padded row is
            trimmed to its mask in it, and its length is the row's length (for the token budget
            and ``strip_padding``). ``attention_mask`` and ``position_ids`` join it when they are
            in no group. Default: :data:`DEFAULT_LENGTH_GROUPS`.
        max_length: the most tokens a sequence key may hold; a longer row fails alone with a
            :class:`CollationError` (it is not truncated). ``None``: no limit. Also the most
            tokens a bucketed length pads to.
        length_buckets: pad each sequence key up to a bucketed length instead of exactly its
            longest row, so a device sees few shapes: an ``int`` ``m`` (a multiple of ``m``) or
            an increasing ladder such as ``(16, 32, 64, 128, 256, 512)`` (the next rung; above
            the top rung, the next multiple of the ladder's last step). Never above
            ``max_length``. ``None`` (the default): pad to the longest row.
        batch_sizes: the allowed row counts of a collated batch, e.g. ``(1, 2, 4, 8, 16, 32)``:
            a batch of ``n`` rows gets padding rows up to the smallest allowed size ``>= n``
            (none above the largest). :attr:`CollatedBatch.padding_rows` counts them. ``None``
            (the default): no padding rows.
    """

    padding_side: PaddingSide = "right"
    pad_values: Mapping[str, float] = field(default_factory=dict)
    attention_mask: str | None = "attention_mask"
    position_ids: str | None = None
    length_groups: Sequence[Collection[str]] = DEFAULT_LENGTH_GROUPS
    max_length: int | None = None
    length_buckets: LengthBuckets | Sequence[int] | None = None
    batch_sizes: Sequence[int] | None = None
    _pads: dict[str, float] = field(init=False, repr=False, compare=False)
    _groups: tuple[frozenset[str], ...] = field(init=False, repr=False, compare=False)
    _main: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f'padding_side must be "left" or "right", got {self.padding_side!r}')
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1 or None, got {self.max_length}")
        object.__setattr__(self, "length_buckets", checked_length_buckets(self.length_buckets))
        object.__setattr__(self, "batch_sizes", checked_batch_sizes(self.batch_sizes))
        pads = {**DEFAULT_PAD_VALUES, **self.pad_values}
        for key in (self.attention_mask, self.position_ids):
            if key is not None:
                pads.setdefault(key, 0)
        groups = _checked_groups(self.length_groups, pads)
        joining = frozenset(
            key
            for key in (self.attention_mask, self.position_ids)
            if key is not None and not any(key in g for g in groups)
        )
        main = next((i for i, g in enumerate(groups) if self.attention_mask in g), 0)
        if joining:
            if groups:
                groups[main] |= joining
            else:
                groups.append(joining)
        object.__setattr__(self, "_pads", pads)
        object.__setattr__(self, "_groups", tuple(groups))
        object.__setattr__(self, "_main", groups[main] if groups else frozenset())

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
            data[key] = self._checked_value(key, value)
        seq_lengths = {k: t.shape[0] for k, t in data.items() if k in self._pads}
        for group in self._groups:
            shared = {k: n for k, n in seq_lengths.items() if k in group}
            if len(set(shared.values())) > 1:
                listed = ", ".join(f"{k}={n}" for k, n in shared.items())
                raise CollationError(
                    f"keys that must share a length (length_groups) have different lengths: "
                    f"{listed}"
                )
        main = [n for k, n in seq_lengths.items() if k in self._main]
        # A row with none of the main sequence's keys is as long as its longest sequence.
        length = main[0] if main else max(seq_lengths.values(), default=0)
        if seq_lengths and not length:
            # Alone it would fail the model; next to a longer row it would "succeed" with that
            # batch's padding as its output. Refuse it here, whatever it is batched with.
            keys = ", ".join(k for k in seq_lengths if not main or k in self._main)
            raise CollationError(f"the sequence is empty ({keys} of length 0): no tokens to run")
        mask_key = self.attention_mask
        if mask_key is not None and mask_key in data:
            length = self._trim_to_mask(data, data[mask_key], length)
        if self.max_length is not None:
            for key, t in data.items():
                if key in self._pads and t.shape[0] > self.max_length:
                    raise CollationError(
                        f"key {key!r} has {t.shape[0]} tokens, more than "
                        f"max_length={self.max_length}"
                    )
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

    def _checked_value(self, key: str, value: object) -> torch.Tensor:
        t = _as_tensor(value, f"key {key!r}")
        if key in self._pads and t.ndim == 0:
            raise CollationError(f"key {key!r} is a sequence key but holds a 0-d tensor")
        if key in _TOKEN_KEYS and t.ndim != 1:
            raise CollationError(
                f"key {key!r} has shape {_shape(t)}; a row holds one sequence (1-D). "
                "To submit several rows at once, split them (BatchedModule.rows does)"
            )
        if key in _ID_KEYS and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise CollationError(f"key {key!r} has dtype {t.dtype}; token ids must be integers")
        return t

    def _trim_to_mask(self, data: dict[str, torch.Tensor], mask: torch.Tensor, length: int) -> int:
        """Drop the padding a row already carries, so it is padded once, to this batch's longest.

        Only the mask's own group is trimmed: other sequence keys have lengths of their own.
        """
        real = mask.nonzero()
        if real.numel() == 0:
            raise CollationError("the attention mask is all zeros: the row has no real tokens")
        first, last = int(real[0, 0]), int(real[-1, 0])
        if first == 0 and last == length - 1:
            return length
        for key in data:
            if key in self._main:
                data[key] = data[key][first : last + 1]
        return last + 1 - first

    # -- the batch -------------------------------------------------------------------------------

    def padded_length(self, longest: int) -> int:
        """The length a batch whose longest row is ``longest`` tokens is padded to."""
        return bucket_length(longest, self.length_buckets, self.max_length)  # type: ignore[arg-type]

    def padded_rows(self, rows: int) -> int:
        """The row count a batch of ``rows`` real rows is padded to."""
        return bucket_batch_size(rows, self.batch_sizes)  # type: ignore[arg-type]

    @property
    def max_rows(self) -> int | None:
        """The largest allowed batch size, or None without ``batch_sizes``."""
        return None if self.batch_sizes is None else max(self.batch_sizes)

    def collate(self, rows: Sequence[PreparedRow], *, pin_memory: bool = False) -> CollatedBatch:
        """Pad and stack rows that share one signature into a :class:`CollatedBatch`.

        Each sequence key is padded to its own longest row (bucketed by ``length_buckets``);
        ``padded_length`` is the main sequence's. With ``batch_sizes``, padding rows follow the
        real ones. ``pin_memory=True`` builds the batch in page-locked memory, for a fast,
        asynchronous copy to a CUDA device (rows already on a device are
        collated there, unpinned: only CPU memory can be pinned).
        """
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        lengths = [r.length for r in rows]
        total = self.padded_rows(len(rows))
        extra = total - len(rows)
        first = rows[0].data
        if isinstance(first, torch.Tensor):
            stacked = _stack([r.data for r in rows], total, pin_memory)  # type: ignore[misc]
            return CollatedBatch(stacked, lengths, 0, self.padding_side, extra)
        longest = self.padded_length(max(lengths))
        out: dict[str, torch.Tensor] = {}
        for key in first:
            column: list[torch.Tensor] = [r.data[key] for r in rows]  # type: ignore[index]
            if key in self._pads:
                out[key] = self._pad(column, self._pads[key], pin_memory, total)
            else:
                out[key] = _stack(column, total, pin_memory)
        has_sequences = any(key in self._pads for key in first)
        mask_key = self.attention_mask
        if has_sequences and mask_key is not None and mask_key not in out:
            out[mask_key] = self._build_mask(lengths, longest, pin_memory, total)
        pos_key = self.position_ids
        if has_sequences and pos_key is not None and pos_key not in out:
            mask = (
                out[mask_key]
                if mask_key is not None
                else self._build_mask(lengths, longest, rows=total)
            )
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            if pin_memory and positions.device.type == "cpu":  # pragma: no cover - needs CUDA
                # Pinned like the rest of the batch, or its copy to the device is a blocking one.
                positions = positions.pin_memory()
            out[pos_key] = positions
        return CollatedBatch(out, lengths, longest, self.padding_side, extra)

    def _pad(
        self, column: list[torch.Tensor], value: float, pin_memory: bool, rows: int
    ) -> torch.Tensor:
        """Stack one sequence key's rows, each padded with ``value`` to the key's padded length.

        Rows past ``len(column)`` are padding rows: ``value`` throughout.
        """
        t0 = column[0]
        longest = self.padded_length(max(t.shape[0] for t in column))
        buf = torch.full(
            (rows, longest, *t0.shape[1:]),
            value,
            dtype=t0.dtype,
            device=t0.device,
            pin_memory=pin_memory and t0.device.type == "cpu",
        )
        right = self.padding_side == "right"
        for i, t in enumerate(column):
            k = t.shape[0]
            if right:
                buf[i, :k] = t
            else:
                buf[i, longest - k :] = t
        return buf

    def _build_mask(
        self, lengths: list[int], longest: int, pin_memory: bool = False, rows: int | None = None
    ) -> torch.Tensor:
        n = len(lengths) if rows is None else rows
        mask = torch.zeros((n, longest), dtype=torch.long, pin_memory=pin_memory)
        for i, k in enumerate(lengths):
            if self.padding_side == "right":
                mask[i, :k] = 1
            else:
                mask[i, longest - k :] = 1
        return mask


def _stack(column: list[torch.Tensor], rows: int, pin_memory: bool) -> torch.Tensor:
    """Stack same-shaped tensors; rows past ``len(column)`` (padding rows) are zeros.

    ``pin_memory`` pins CPU tensors only (rows already on a device stay there).
    """
    t0 = column[0]
    pin = pin_memory and t0.device.type == "cpu"
    if rows == len(column):
        stacked = torch.stack(column)
        return stacked.pin_memory() if pin else stacked
    buf = torch.zeros((rows, *t0.shape), dtype=t0.dtype, device=t0.device, pin_memory=pin)
    torch.stack(column, out=buf[: len(column)])
    return buf


def _checked_groups(
    length_groups: Sequence[Collection[str]], pads: Mapping[str, float]
) -> list[frozenset[str]]:
    """``length_groups`` as frozensets, each key a sequence key in one group at most."""
    groups: list[frozenset[str]] = []
    seen: set[str] = set()
    for group in length_groups:
        if isinstance(group, str):
            raise TypeError(f"length_groups holds collections of keys, got the string {group!r}")
        keys = frozenset(group)
        for key in sorted(keys):
            if key in seen:
                raise ValueError(f"key {key!r} is in more than one length group")
            if key not in pads:
                raise ValueError(
                    f"length_groups names {key!r}, but {key!r} has no pad value (add it to "
                    "pad_values): only sequence keys have a length"
                )
        seen |= keys
        groups.append(keys)
    return groups
