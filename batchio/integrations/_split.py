"""Splitting a model's batch output into one output per row, and stacking rows back.

An output is a tree: a tensor, a tuple or list (named tuples included), a mapping (``dict``, or a
``transformers`` ``ModelOutput``, which is rebuilt as its own class), or ``None``. Tensors are split
along dimension 0; a 0-d tensor and any non-tensor leaf go to every row as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from .. import BatchSizeMismatchError
from ._collate import PaddingSide

__all__ = ["split_output", "stack_outputs", "tree_map"]


def tree_map(fn: Callable[[torch.Tensor], torch.Tensor], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in an output tree, keeping its structure and types."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        return _rebuild_mapping(tree, {k: tree_map(fn, v) for k, v in tree.items()})
    if isinstance(tree, tuple | list):
        return _rebuild_sequence(tree, [tree_map(fn, v) for v in tree])
    return tree


def _rebuild_mapping(like: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    # ModelOutput is a dataclass over an OrderedDict: its own class takes its fields back as
    # keywords. Other mappings come back as plain dicts.
    if dataclasses.is_dataclass(like):
        return type(like)(**items)
    return items


def _rebuild_sequence(like: tuple[Any, ...] | list[Any], items: list[Any]) -> Any:
    if isinstance(like, list):
        return items
    if hasattr(like, "_fields"):  # a named tuple
        return type(like)(*items)
    return tuple(items)


def split_output(
    output: Any,
    n: int,
    *,
    lengths: list[int],
    padded_length: int,
    padding_side: PaddingSide,
    strip_padding: bool | Collection[str | int] = False,
) -> list[Any]:
    """Split a batch ``output`` of ``n`` rows into ``n`` outputs of the same structure.

    Each row gets a copy of its slice, so holding one result does not keep the whole batch alive.

    Args:
        lengths: each row's real sequence length (from the collated batch).
        padded_length: the length the batch was padded to.
        strip_padding: which outputs are per-token, so that each row gets only its real tokens:
            ``True`` for every tensor with at least 2 dimensions whose dimension 1 equals
            ``padded_length``; a collection of top-level keys (mappings) or indices (tuples);
            ``False`` for none.

    Raises:
        BatchSizeMismatchError: a tensor in the output does not have ``n`` rows.
    """

    def strip(t: torch.Tensor, i: int) -> torch.Tensor:
        k = lengths[i]
        if padding_side == "right":
            return t[i, :k]
        return t[i, padded_length - k :]

    def split(node: Any, path: str, stripped: bool) -> list[Any]:
        if isinstance(node, torch.Tensor):
            if node.ndim == 0:
                return [node] * n
            if node.shape[0] != n:
                err = BatchSizeMismatchError(n, node.shape[0])
                err.add_note(f"the model output {path} has shape {tuple(node.shape)}")
                raise err
            if stripped and padded_length and node.ndim >= 2 and node.shape[1] == padded_length:
                return [strip(node, i).clone() for i in range(n)]
            return [row.clone() for row in node.unbind(0)]
        if isinstance(node, Mapping):
            columns = {
                key: split(v, f"{path}[{key!r}]", stripped or _named(strip_padding, key, path))
                for key, v in node.items()
            }
            return [
                _rebuild_mapping(node, {key: col[i] for key, col in columns.items()})
                for i in range(n)
            ]
        if isinstance(node, tuple | list):
            parts = [
                split(v, f"{path}[{j}]", stripped or _named(strip_padding, j, path))
                for j, v in enumerate(node)
            ]
            return [_rebuild_sequence(node, [p[i] for p in parts]) for i in range(n)]
        return [node] * n

    return split(output, "output", strip_padding is True)


def _named(strip_padding: bool | Collection[str | int], key: Any, path: str) -> bool:
    """Whether the user named this top-level key or index as a per-token output."""
    if isinstance(strip_padding, bool):
        return strip_padding
    return path == "output" and key in strip_padding


def stack_outputs(rows: list[Any], padding_side: PaddingSide) -> Any:
    """Stack per-row outputs back into one batch output (the inverse of :func:`split_output`).

    Tensors whose first dimension differs between rows (per-token outputs with padding stripped)
    are padded with zeros on ``padding_side`` to the longest.
    """
    if not rows:
        raise ValueError("cannot stack an empty list of outputs")
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return _stack_tensors(rows, padding_side)
    if isinstance(first, Mapping):
        return _rebuild_mapping(
            first, {key: stack_outputs([r[key] for r in rows], padding_side) for key in first}
        )
    if isinstance(first, tuple | list):
        return _rebuild_sequence(
            first,
            [stack_outputs([r[j] for r in rows], padding_side) for j in range(len(first))],
        )
    return first if all(r is first for r in rows) else list(rows)


def _stack_tensors(rows: list[torch.Tensor], padding_side: PaddingSide) -> torch.Tensor:
    if rows[0].ndim == 0 or all(r.shape == rows[0].shape for r in rows):
        return torch.stack(rows)
    longest = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros((len(rows), longest, *rows[0].shape[1:]))
    for i, r in enumerate(rows):
        if padding_side == "right":
            out[i, : r.shape[0]] = r
        else:
            out[i, longest - r.shape[0] :] = r
    return out
