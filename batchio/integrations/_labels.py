"""The ``batcher`` label of the metrics exporters: one value per batcher, unique and stable.

Two batchers may share a name (two replicas of one model class in a process, or a batcher
rebuilt while the old one is still referenced). Exporting both as ``batcher="embed"`` would
produce duplicate series, which Prometheus rejects and OpenTelemetry silently merges. So the
first batcher seen with a name gets the name itself, and each later one the lowest free
``name#2``, ``name#3``, ... A batcher keeps its label for as long as it lives, so its series
never change identity. Prometheus's collector reuses a label once its holder has been
garbage-collected (a scrape target restarting looks the same, and ``rate()`` handles it);
OpenTelemetry's never gives a label to another batcher (``reuse=False``), since the SDK would
add the newcomer's counts to the old cumulative stream.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from typing import Any

from batchio import Batcher

__all__ = ["BatcherLabels"]


class BatcherLabels:
    """Assigns each batcher its label value (see the module docstring); thread-safe."""

    __slots__ = ("_ever", "_labels", "_lock")

    def __init__(self, *, reuse: bool = True) -> None:
        self._lock = threading.Lock()
        self._labels: weakref.WeakKeyDictionary[Batcher[Any, Any], str] = (
            weakref.WeakKeyDictionary()
        )
        # With reuse=False, every label ever given out: never given to another batcher (an
        # exporter that keeps a series' history, such as OpenTelemetry's cumulative streams,
        # would splice the newcomer's counts onto the old one's).
        self._ever: set[str] | None = None if reuse else set()

    def label(self, batcher: Batcher[Any, Any]) -> str:
        """The label value of ``batcher``, assigned now if it has none yet."""
        with self._lock:
            return self._assign(batcher)

    def labelled(
        self, batchers: Iterable[Batcher[Any, Any]]
    ) -> list[tuple[Batcher[Any, Any], str]]:
        """Each of ``batchers`` (once, in order) with its label value.

        Batchers seen for the first time are labelled in the order given, so with batchers
        listed in start order the one started first keeps the bare name.
        """
        unique = list(dict.fromkeys(batchers))
        with self._lock:
            return [(b, self._assign(b)) for b in unique]

    def forget(self, batcher: Batcher[Any, Any]) -> None:
        """Free ``batcher``'s label for reuse (no-op if it had none)."""
        with self._lock:
            self._labels.pop(batcher, None)

    def _assign(self, batcher: Batcher[Any, Any]) -> str:
        label = self._labels.get(batcher)
        if label is None:
            taken = set(self._labels.values())
            ever = self._ever
            if ever is not None:
                taken |= ever
            label = name = batcher.name
            n = 1
            while label in taken:
                n += 1
                label = f"{name}#{n}"
            self._labels[batcher] = label
            if ever is not None:
                ever.add(label)
        return label
